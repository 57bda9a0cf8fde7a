//! The request phases before a worker is picked (docs/architecture.md, "The request path"):
//! framing checks, the https redirect, the tenant by host, the class by path, the
//! database-manager block and the tenant's limits. Each is a short step that either
//! lets the request go on or returns the [`Answer`] to send instead.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use portier_config::class::{is_database_manager, normalize_path};
use portier_config::{normalize_host, Class, HostMatch};

use crate::io::forward::{self, MAX_HEADER_BYTES};
use crate::phase::answer::Answer;
use crate::phase::ctx::Ctx;
use crate::snapshot::Snapshot;
use arc_swap::ArcSwapOption;
use portier_certs::CertStore;
use portier_runtime::balance;
use portier_runtime::cluster::Cluster;
use portier_runtime::hash;
use portier_runtime::limits::Limits;
use portier_runtime::live::LiveTenants;
use portier_runtime::telemetry::Metrics;
use portier_runtime::telemetry::Refusal;

/// Where ACME HTTP-01 challenges are answered: never redirected.
const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// The request's host as sent: the authority of an absolute URI or `:authority`
/// (HTTP/2), else the `Host` header.
pub fn request_host(req: &RequestHeader) -> Option<&str> {
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str());
    }
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
}

fn is_websocket(req: &RequestHeader) -> bool {
    req.headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Framing checks that need the raw HTTP/1 header block: oversized header blocks
/// (431) and `Content-Length` together with `Transfer-Encoding` (400).
pub fn check_framing(session: &Session) -> Result<(), Answer> {
    let Some(h1) = session.as_http1() else {
        return Ok(());
    };
    let raw = h1.get_headers_raw_bytes();
    if raw.len() > MAX_HEADER_BYTES {
        return Err(Answer::refuse(
            431,
            Refusal::BadRequest,
            "request header fields too large",
            true,
        ));
    }
    if session
        .req_header()
        .headers
        .contains_key(header::TRANSFER_ENCODING)
        && forward::raw_has_content_length(&raw)
    {
        return Err(Answer::refuse(
            400,
            Refusal::BadRequest,
            "both Content-Length and Transfer-Encoding",
            true,
        ));
    }
    Ok(())
}

/// The normalised host (port and case dropped).
pub fn host(session: &Session) -> Result<Cow<'_, str>, Answer> {
    request_host(session.req_header())
        .map(normalize_host)
        .ok_or_else(|| Answer::refuse(400, Refusal::BadRequest, "missing Host", true))
}

/// Per-request set-up: the snapshot the request keeps to its end, the client address,
/// the request id, the client's keep-alive and write timeouts.
pub fn begin(session: &mut Session, ctx: &mut Ctx, snap: Arc<Snapshot>) {
    ctx.start = Instant::now();
    ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    ctx.client_ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| forward::canonical(a.ip()));
    let mut request_id = match session.req_header().headers.get(&forward::X_REQUEST_ID) {
        Some(v) if forward::valid_request_id(v.as_bytes()) => v.clone(),
        _ => forward::new_request_id(),
    };
    // Over HTTP/2 a value that differs on every response is sent as a never-indexed
    // literal (HPACK, RFC 7541 section 6.2.3): h2's encoder otherwise inserts every
    // value into the connection's dynamic table, where each new id evicts entries
    // that do repeat. No effect on HTTP/1.
    request_id.set_sensitive(true);
    ctx.request_id = request_id;
    if session.get_keepalive().is_some() {
        let idle = snap.config.listen.idle_timeout.as_secs().max(1);
        session.set_keepalive(Some(idle));
    }
    session.set_write_timeout(Some(crate::phase::body::CLIENT_IO_TIMEOUT));
    ctx.snap = Some(snap);
}

/// An ACME HTTP-01 validation (`[tls.acme]`) on the `http` listener is answered before
/// any redirect or tenant lookup, with the key authorization ACME published.
pub fn acme_challenge(snap: &Snapshot, session: &Session, ctx: &Ctx) -> Result<(), Answer> {
    if ctx.tls {
        return Ok(());
    }
    match crate::acme::http01_answer(&snap.config, session.req_header().uri.path()) {
        Some(key_authorization) => Err(Answer::AcmeChallenge(Bytes::from(key_authorization))),
        None => Ok(()),
    }
}

/// Plain HTTP for a host a certificate covers: 308 to https (ACME challenges pass,
/// so certificates can be issued and renewed over HTTP).
pub fn https_redirect(
    certs: &CertStore,
    snap: &Snapshot,
    session: &Session,
    ctx: &Ctx,
    host: &str,
) -> Result<(), Answer> {
    if ctx.tls {
        return Ok(());
    }
    let (Some(tls), Some(https)) = (&snap.config.tls, snap.config.listen.https) else {
        return Ok(());
    };
    let uri = &session.req_header().uri;
    if !tls.redirect_http || uri.path().starts_with(ACME_CHALLENGE) || !certs.covers(host) {
        return Ok(());
    }
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Err(Answer::Redirect {
        location: forward::https_location(host, https.port(), target),
    })
}

/// The tenant by host: sets the tenant, its effective name, its metric handles and
/// the rendezvous keys. Unknown hosts get 404.
pub fn tenant<'h>(
    (metrics, live): (&Metrics, &LiveTenants),
    snap: &Snapshot,
    session: &Session,
    ctx: &mut Ctx,
    host: &'h str,
) -> Result<HostMatch<'h>, Answer> {
    let Some(m) = snap.config.hosts.lookup(host) else {
        return Err(Answer::refuse(
            404,
            Refusal::UnknownHost,
            "unknown host",
            false,
        ));
    };
    let t = &snap.tenants[m.tenant];
    let (name, stats, figures) = match m.captured {
        Some(label) => {
            let name: Arc<str> = Arc::from(label);
            let figures = live.get(&name, &t.name);
            (name, metrics.tenant_stats(label), figures)
        }
        None => {
            let stats = t
                .stats
                .get_or_init(|| metrics.tenant_stats(&t.name))
                .clone();
            let figures = t.live.get_or_init(|| live.get(&t.name, &t.name)).clone();
            (t.name.clone(), stats, figures)
        }
    };
    ctx.route.live = Some(figures);
    ctx.route.tenant_hash = hash::hash_bytes(name.as_bytes());
    ctx.route.session_hash = balance::session_id(
        session
            .req_header()
            .headers
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes()),
    )
    .map(hash::hash_bytes);
    ctx.route.tenant = Some(m.tenant);
    ctx.route.tenant_name = Some(name);
    ctx.route.stats = Some(stats);
    Ok(m)
}

/// The class and the pool from the normalised path (a tenant's `routes` send HTTP
/// requests under a prefix to another pool; longpolling always uses the tenant's), and
/// the database-manager block (decided on the path as the worker will see it).
pub fn classify(snap: &Snapshot, session: &Session, ctx: &mut Ctx) -> Result<Class, Answer> {
    let path = normalize_path(session.req_header().uri.path());
    crate::phase::filestore::internal(&path)?;
    let class = Class::of(&path);
    ctx.route.class = Some(class);
    ctx.route.websocket = class == Class::Longpolling && is_websocket(session.req_header());
    let Some(tenant) = ctx.tenant(snap) else {
        return Ok(class);
    };
    ctx.route.pool = Some(match class {
        Class::Longpolling => tenant.pool,
        _ => tenant.pool_for(&path),
    });
    let settings = &tenant.settings;
    if settings.block_database_manager
        && is_database_manager(&path)
        && !ctx.client_ip.is_some_and(|ip| settings.is_admin(ip))
    {
        return Err(Answer::refuse(
            403,
            Refusal::DatabaseManager,
            "the database manager is not available from this address",
            false,
        ));
    }
    Ok(class)
}

/// The limits that apply to a request: its tenant's limiter, class and limit.
pub struct TenantLimits {
    limiter: Arc<portier_runtime::limits::TenantLimiter>,
    class: Class,
    limit: portier_config::Limit,
}

/// The tenant's limits on integration (and optionally interactive) traffic, if its
/// class has any: checked by [`tenant_limits`].
pub fn tenant_limiter(
    limits: &Limits,
    snap: &Snapshot,
    ctx: &Ctx,
    m: &HostMatch<'_>,
    class: Class,
) -> Option<TenantLimits> {
    let settings = &ctx.tenant(snap)?.settings;
    let limit = match class {
        Class::Integration => settings.integration,
        Class::Interactive => settings.interactive,
        Class::Static | Class::Longpolling => None,
    }?;
    let limiter = match m.captured {
        Some(label) => limits.get(label),
        None => {
            let t = &snap.tenants[m.tenant];
            t.limiter.get_or_init(|| limits.get(&t.name)).clone()
        }
    };
    Some(TenantLimits {
        limiter,
        class,
        limit,
    })
}

/// The tenant's rate and concurrency limits (the rate shared across replicas with
/// `[cluster]`); the concurrency slot is held in `ctx` until the request ends.
pub async fn tenant_limits(
    cluster: &ArcSwapOption<Cluster>,
    ctx: &mut Ctx,
    l: TenantLimits,
) -> Result<(), Answer> {
    let tenant = ctx
        .route
        .tenant_name
        .clone()
        .unwrap_or_else(|| Arc::from(""));
    let cluster = cluster.load_full();
    match l
        .limiter
        .admit(l.class, &l.limit, cluster.as_deref(), &tenant)
        .await
    {
        Ok(permit) => {
            ctx.permit = permit;
            Ok(())
        }
        Err(refused) => {
            if let Some(stats) = &ctx.route.stats {
                stats.rate_limited(l.class);
            }
            Err(Answer::Limited {
                refused,
                tenant,
                class: l.class,
            })
        }
    }
}
