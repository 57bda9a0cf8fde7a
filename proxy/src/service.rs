//! The pingora `ProxyHttp` implementation: a thin sequence of the pieces in the
//! request path (DESIGN.md): snapshot -> tenant -> class -> admission -> backend ->
//! upstream (headers rewritten) -> response, metrics, access log.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use portier_config::class::{is_database_manager, normalize_path};
use portier_config::{normalize_host, Class, Tenant};

use crate::backend::{InflightGuard, Role};
use crate::balance;
use crate::breaker;
use crate::forward::{self, MAX_HEADER_BYTES};
use crate::hash;
use crate::health;
use crate::limits;
use crate::state::{PoolRt, RequestGuard, Shared, Snapshot};
use crate::telemetry::{AccessRecord, Refusal, TenantStats};

/// Keep-alive timeout for idle client connections (nginx's default).
const CLIENT_KEEPALIVE_SECS: u64 = 75;
/// Timeout for reading a request body from the client and for writing to it.
const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle upstream connection stays in the pool.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);
/// Bodies at most this large can be read before a worker is picked: pingora replays
/// a pre-read body from its 64 KiB retry buffer (see README, "Request bodies").
const PREREAD_LIMIT: u64 = 64 * 1024;
/// A refused request's unread body up to this size is drained to keep the connection.
const DRAIN_LIMIT: u64 = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

const MAINTENANCE_PAGE: &str = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Maintenance</title></head>\n<body style=\"font-family:sans-serif;text-align:center;margin-top:15%\">\n<h1>Back in a moment</h1>\n<p>This service is briefly unavailable. Please try again in a few seconds.</p>\n</body></html>\n";

pub struct Proxy {
    pub shared: Arc<Shared>,
}

/// A response portier writes itself.
struct Reply<'a> {
    status: u16,
    content_type: &'static str,
    body: Bytes,
    extra: &'a [(&'static str, String)],
    close: bool,
}

impl Reply<'static> {
    fn text(status: u16, text: &str, close: bool) -> Self {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from(format!("{text}\n")),
            extra: &[],
            close,
        }
    }
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    snap: Option<Arc<Snapshot>>,
    tenant: Option<usize>,
    tenant_name: Option<Arc<str>>,
    stats: Option<Arc<TenantStats>>,
    class: Option<Class>,
    /// Kept from the client or generated; shared (not copied) into both headers.
    request_id: HeaderValue,
    refused: Option<Refusal>,
    /// The backend of the current attempt (its in-flight count held).
    backend: Option<InflightGuard>,
    /// Backends already tried for this request.
    tried: Vec<std::net::SocketAddr>,
    attempts: u32,
    /// The current attempt's outcome was fed to the breaker.
    outcome_recorded: bool,
    /// A 502-504 answer is being retried on another backend.
    retry_on_status: bool,
    /// Rendezvous keys: the effective tenant name and the `session_id` cookie.
    tenant_hash: u64,
    session_hash: Option<u64>,
    tls: bool,
    websocket: bool,
    /// The body was read completely before a worker was picked.
    body_preread: bool,
    /// Request body bytes seen so far (for `max_body` on streamed bodies).
    body_seen: u64,
    client_ip: Option<IpAddr>,
    /// A concurrency slot of the tenant's limit, held until the request ends.
    _permit: Option<limits::Permit>,
    _guard: Option<RequestGuard>,
}

impl Ctx {
    fn tenant<'a>(&self, snap: &'a Snapshot) -> Option<&'a Tenant> {
        self.tenant.and_then(|t| snap.config.tenants.get(t))
    }

    fn pool<'a>(&self, snap: &'a Snapshot) -> Option<&'a Arc<PoolRt>> {
        self.tenant(snap).and_then(|t| snap.pools.get(t.pool))
    }

    /// A retry of a request that already reached a worker is allowed: attempts
    /// left, an idempotent method, and the whole body still buffered for a replay.
    fn may_resend(&self, session: &Session) -> bool {
        self.attempts <= self.retries()
            && session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
    }

    fn retries(&self) -> u32 {
        self.snap
            .as_ref()
            .and_then(|s| self.pool(s))
            .map(|p| p.cfg.retries)
            .unwrap_or(0)
    }

    fn role(&self) -> Role {
        if self.class == Some(Class::Longpolling) {
            Role::Longpolling
        } else {
            Role::Http
        }
    }

    fn want<'a>(&'a self, pool: &PoolRt, now: u64) -> balance::Want<'a> {
        balance::Want {
            spread: if self.role() == Role::Http {
                pool.cfg.spread
            } else {
                0
            },
            tenant: self.tenant_hash,
            session: self.session_hash,
            exclude: &self.tried,
            now,
            open_for: pool.cfg.breaker.open_for.as_millis() as u64,
        }
    }

    /// Feeds the current attempt's outcome to its backend's breaker (once).
    fn record_outcome(&mut self, ok: bool) {
        if self.outcome_recorded {
            return;
        }
        self.outcome_recorded = true;
        let (Some(guard), Some(snap)) = (&self.backend, &self.snap) else {
            return;
        };
        let Some(pool) = self.pool(snap) else { return };
        let b = &guard.0;
        let cfg = pool.cfg.breaker;
        if let Some(state) = b.breaker.record(
            ok,
            breaker::now_ms(),
            cfg.failures,
            cfg.open_for.as_millis() as u64,
        ) {
            health::breaker_changed(b, state);
        }
    }

    /// True when another usable backend could take a retry of this request.
    fn has_alternative(&self) -> bool {
        let Some(snap) = &self.snap else { return false };
        let Some(pool) = self.pool(snap) else {
            return false;
        };
        let members = pool.members.load();
        let w = self.want(pool, breaker::now_ms());
        members.list(self.role()).iter().any(|b| {
            b.health.is_up() && b.breaker.peek(w.now, w.open_for) && !w.exclude.contains(&b.addr())
        })
    }
}

fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// The request's host as sent: the authority of an absolute URI or `:authority`
/// (HTTP/2), else the `Host` header.
fn request_host(req: &RequestHeader) -> Option<&str> {
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str());
    }
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
}

fn content_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse().ok())
}

fn is_websocket(req: &RequestHeader) -> bool {
    req.headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

impl Proxy {
    /// The Strict-Transport-Security value for a TLS response, if configured.
    fn hsts<'a>(&self, ctx: &'a Ctx) -> Option<&'a str> {
        if !ctx.tls {
            return None;
        }
        ctx.snap.as_ref()?.config.tls.as_ref()?.hsts.as_deref()
    }

    /// Writes a complete response of portier's own.
    async fn respond(&self, session: &mut Session, ctx: &Ctx, reply: Reply<'_>) -> Result<()> {
        let Reply {
            status,
            content_type,
            body,
            extra,
            mut close,
        } = reply;
        if !close && !session.is_body_done() {
            // An unread body would be taken for the next request: read and drop a
            // small one to keep the connection; close it otherwise.
            let small = content_length(session.req_header()).is_some_and(|n| n <= DRAIN_LIMIT);
            close = !small
                || !matches!(
                    tokio::time::timeout(DRAIN_TIMEOUT, session.drain_request_body()).await,
                    Ok(Ok(()))
                );
        }
        if close {
            session.set_keepalive(None);
        }
        let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
        h.insert_header(header::CONTENT_TYPE, content_type)?;
        h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        h.insert_header("x-request-id", ctx.request_id.clone())?;
        h.insert_header(header::CACHE_CONTROL, "no-store")?;
        for (k, v) in extra {
            h.insert_header(*k, v.as_str())?;
        }
        if let Some(hsts) = self.hsts(ctx) {
            h.insert_header(header::STRICT_TRANSPORT_SECURITY, hsts)?;
        }
        if close {
            h.insert_header(header::CONNECTION, "close")?;
        }
        let head_only = session.req_header().method == http::Method::HEAD;
        session
            .write_response_header(Box::new(h), head_only)
            .await?;
        if !head_only {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// Refuses the request with a short text body; returns `Ok(true)` for `request_filter`.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        why: Refusal,
        text: &str,
        close: bool,
    ) -> Result<bool> {
        ctx.refused = Some(why);
        self.respond(session, ctx, Reply::text(status, text, close))
            .await?;
        Ok(true)
    }

    /// Reads the request body before a worker is picked, when it is small enough to
    /// be replayed. Returns a refusal to send, if any.
    async fn preread_body(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        max_body: u64,
        declared: Option<u64>,
    ) -> Result<Option<(u16, Refusal, &'static str)>> {
        session.enable_retry_buffering();
        if forward::expects_continue(
            session
                .req_header()
                .headers
                .get(header::EXPECT)
                .map(|v| v.as_bytes()),
        ) {
            session.write_continue_response().await?;
        }
        let chunked = declared.is_none();
        let mut reads = 0u32;
        loop {
            if session.is_body_done() {
                ctx.body_preread = true;
                return Ok(None);
            }
            // A chunked body of unknown size is read only until the first data arrives:
            // a second read could overflow pingora's 64 KiB replay buffer.
            if chunked && ctx.body_seen > 0 {
                return Ok(None);
            }
            reads += 1;
            if reads > 1024 {
                return Ok(None);
            }
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    ctx.body_seen += chunk.len() as u64;
                    if ctx.body_seen > max_body {
                        return Ok(Some((413, Refusal::BodyTooLarge, "request body too large")));
                    }
                }
                Ok(None) => {
                    ctx.body_preread = true;
                    return Ok(None);
                }
                Err(e) => {
                    return Ok(Some(match e.etype() {
                        ErrorType::ReadTimedout => (
                            408,
                            Refusal::BadRequest,
                            "timed out reading the request body",
                        ),
                        _ => (400, Refusal::BadRequest, "malformed request body"),
                    }));
                }
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            snap: None,
            tenant: None,
            tenant_name: None,
            stats: None,
            class: None,
            request_id: HeaderValue::from_static(""),
            refused: None,
            backend: None,
            tried: Vec::new(),
            attempts: 0,
            outcome_recorded: false,
            retry_on_status: false,
            tenant_hash: 0,
            session_hash: None,
            tls: false,
            websocket: false,
            body_preread: false,
            body_seen: 0,
            client_ip: None,
            _permit: None,
            _guard: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx._guard = Some(RequestGuard::new(&self.shared));
        ctx.start = Instant::now();
        let snap = self.shared.snapshot.load_full();
        ctx.snap = Some(snap.clone());
        ctx.tls = is_tls(session);
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| forward::canonical(a.ip()));
        ctx.request_id = match session.req_header().headers.get("x-request-id") {
            Some(v) if forward::valid_request_id(v.as_bytes()) => v.clone(),
            _ => HeaderValue::try_from(forward::new_request_id())
                .unwrap_or_else(|_| HeaderValue::from_static("-")),
        };
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(CLIENT_KEEPALIVE_SECS));
        }
        session.set_write_timeout(Some(CLIENT_IO_TIMEOUT));

        // Framing checks that need the raw HTTP/1 header block.
        if let Some(h1) = session.as_http1() {
            let raw = h1.get_headers_raw_bytes();
            if raw.len() > MAX_HEADER_BYTES {
                return self
                    .refuse(
                        session,
                        ctx,
                        431,
                        Refusal::BadRequest,
                        "request header fields too large",
                        true,
                    )
                    .await;
            }
            if session
                .req_header()
                .headers
                .contains_key(header::TRANSFER_ENCODING)
                && forward::raw_has_content_length(&raw)
            {
                return self
                    .refuse(
                        session,
                        ctx,
                        400,
                        Refusal::BadRequest,
                        "both Content-Length and Transfer-Encoding",
                        true,
                    )
                    .await;
            }
        }

        // 1. Tenant, by host.
        let Some(raw_host) = request_host(session.req_header()) else {
            return self
                .refuse(session, ctx, 400, Refusal::BadRequest, "missing Host", true)
                .await;
        };
        let host = normalize_host(raw_host);

        // Plain HTTP for a host a certificate covers: 308 to https (ACME challenges
        // pass, so certificates can be issued and renewed over HTTP).
        if !ctx.tls {
            if let (Some(tls), Some(https)) = (&snap.config.tls, snap.config.listen.https) {
                if tls.redirect_http
                    && !session
                        .req_header()
                        .uri
                        .path()
                        .starts_with("/.well-known/acme-challenge/")
                    && self.shared.certs.covers(&host)
                {
                    let target = session
                        .req_header()
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/");
                    let location = forward::https_location(&host, https.port(), target);
                    let extra = [("location", location)];
                    let reply = Reply {
                        status: 308,
                        content_type: "text/plain; charset=utf-8",
                        body: Bytes::from_static(b"moved to https\n"),
                        extra: &extra,
                        close: false,
                    };
                    self.respond(session, ctx, reply).await?;
                    return Ok(true);
                }
            }
        }

        let Some(m) = snap.config.hosts.lookup(&host) else {
            return self
                .refuse(
                    session,
                    ctx,
                    404,
                    Refusal::UnknownHost,
                    "unknown host",
                    false,
                )
                .await;
        };
        let tenant_id = m.tenant;
        let (name, stats) = match m.captured {
            Some(label) => (Arc::from(label), self.shared.metrics.tenant_stats(label)),
            None => {
                let t = &snap.tenants[tenant_id];
                let stats = t
                    .stats
                    .get_or_init(|| self.shared.metrics.tenant_stats(&t.name))
                    .clone();
                (t.name.clone(), stats)
            }
        };
        ctx.tenant_hash = hash::hash_bytes(name.as_bytes());
        ctx.session_hash = balance::session_id(
            session
                .req_header()
                .headers
                .get_all(header::COOKIE)
                .iter()
                .map(|v| v.as_bytes()),
        )
        .map(hash::hash_bytes);
        ctx.tenant = Some(tenant_id);
        ctx.tenant_name = Some(name);
        ctx.stats = Some(stats);
        let tenant = &snap.config.tenants[tenant_id];
        let settings = &tenant.settings;

        // 2. Class, from the normalised path.
        let path = normalize_path(session.req_header().uri.path());
        let class = Class::of(&path);
        ctx.class = Some(class);
        ctx.websocket = class == Class::Longpolling && is_websocket(session.req_header());

        if settings.block_database_manager
            && is_database_manager(&path)
            && !ctx.client_ip.is_some_and(|ip| settings.is_admin(ip))
        {
            return self
                .refuse(
                    session,
                    ctx,
                    403,
                    Refusal::DatabaseManager,
                    "the database manager is not available from this address",
                    false,
                )
                .await;
        }

        // Tenant limits on integration (and optionally interactive) traffic.
        let limit = match class {
            Class::Integration => settings.integration,
            Class::Interactive => settings.interactive,
            Class::Static | Class::Longpolling => None,
        };
        if let Some(limit) = limit {
            let limiter = match m.captured {
                Some(label) => self.shared.limits.get(label),
                None => {
                    let t = &snap.tenants[tenant_id];
                    t.limiter
                        .get_or_init(|| self.shared.limits.get(&t.name))
                        .clone()
                }
            };
            match limiter.admit(class, &limit) {
                Ok(permit) => ctx._permit = permit,
                Err(refused) => {
                    if let Some(stats) = &ctx.stats {
                        stats.rate_limited(class);
                    }
                    ctx.refused = Some(refused.why);
                    let name = ctx.tenant_name.clone().unwrap_or_else(|| Arc::from(""));
                    let body = limits::refusal_body(&refused, &name, class);
                    let extra = [("retry-after", refused.retry_after.to_string())];
                    let reply = Reply {
                        status: 429,
                        content_type: "application/json",
                        body: Bytes::from(body),
                        extra: &extra,
                        close: false,
                    };
                    self.respond(session, ctx, reply).await?;
                    return Ok(true);
                }
            }
        }

        // Request body: size limit and pre-read.
        let declared = content_length(session.req_header());
        if declared.is_some_and(|n| n > settings.max_body) {
            return self
                .refuse(
                    session,
                    ctx,
                    413,
                    Refusal::BodyTooLarge,
                    "request body too large",
                    true,
                )
                .await;
        }
        session.set_read_timeout(Some(CLIENT_IO_TIMEOUT));
        let has_body = !session.is_body_empty();
        let cap = settings.buffer_body.min(PREREAD_LIMIT);
        if has_body && declared.is_none_or(|n| n <= cap) {
            if let Some((status, why, text)) = self
                .preread_body(session, ctx, settings.max_body, declared)
                .await?
            {
                return self.refuse(session, ctx, status, why, text, true).await;
            }
        }
        if ctx.websocket {
            session.set_read_timeout(Some(settings.websocket_idle));
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.body_preread || ctx.websocket {
            return Ok(());
        }
        if let Some(b) = body {
            ctx.body_seen += b.len() as u64;
            let max = ctx
                .snap
                .as_ref()
                .and_then(|s| ctx.tenant(s).map(|t| t.settings.max_body))
                .unwrap_or(u64::MAX);
            if ctx.body_seen > max {
                ctx.refused = Some(Refusal::BodyTooLarge);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body over max_body",
                ));
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let snap = ctx
            .snap
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no snapshot"))?;
        let tenant = ctx
            .tenant(&snap)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no tenant"))?;
        let class = ctx.class.unwrap_or(Class::Interactive);
        let pool = ctx
            .pool(&snap)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no pool"))?;
        let members = pool.members.load();
        let picked = balance::pick(
            members.list(ctx.role()),
            &pool.rr,
            &ctx.want(pool, breaker::now_ms()),
        );
        let Some(backend) = picked else {
            if ctx.attempts == 0 {
                ctx.refused = Some(Refusal::NoBackend);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no backend available",
                ));
            }
            return Err(Error::explain(
                ErrorType::HTTPStatus(502),
                "backend failed and no other backend is left to retry on",
            ));
        };
        ctx.outcome_recorded = false;
        ctx.retry_on_status = false;
        ctx.tried.push(backend.addr());
        ctx.attempts += 1;
        let addr = backend.addr();
        ctx.backend = Some(InflightGuard::new(backend));

        let s = &tenant.settings;
        let timeout = if ctx.websocket {
            s.websocket_idle
        } else if class == Class::Longpolling {
            s.longpolling_timeout
        } else {
            s.request_timeout
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(s.connect_timeout);
        peer.options.total_connection_timeout = Some(s.connect_timeout);
        peer.options.read_timeout = Some(timeout);
        peer.options.write_timeout = Some(timeout);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.record_outcome(false);
        // Nothing reached the worker: always safe to try another one.
        if ctx.attempts <= ctx.retries() && ctx.has_alternative() {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("backend {peer}"));
        if ctx.retry_on_status {
            // upstream_response_filter asked for this retry (and checked it is allowed).
            e.set_retry(true);
            return e;
        }
        let upstream_fault = *e.esource() == ErrorSource::Upstream;
        if upstream_fault {
            ctx.record_outcome(false);
        }
        let allowed =
            ctx.may_resend(session) && session.response_written().is_none() && !ctx.websocket;
        if !allowed {
            e.set_retry(false);
        } else if upstream_fault
            && matches!(
                e.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout
            )
            && ctx.class != Some(Class::Longpolling)
            && ctx.has_alternative()
        {
            // A worker that timed out (504) is retried on another, as for a 504 answer.
            e.set_retry(true);
        } else {
            // A stale pooled connection is retried; anything else on a fresh one is not.
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if status < 200 && status != 101 {
            return Ok(());
        }
        let failed = (502..=504).contains(&status);
        ctx.record_outcome(!failed);
        if failed && ctx.may_resend(session) && ctx.has_alternative() {
            ctx.retry_on_status = true;
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                format!("backend answered {status}; retrying on another backend"),
            );
            e.as_up();
            return Err(e);
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(snap) = ctx.snap.clone() else {
            return Ok(());
        };
        let Some(tenant) = ctx.tenant(&snap) else {
            return Ok(());
        };
        let settings = &tenant.settings;
        // The request is rebuilt once, with room for the headers portier sets and no
        // case-preserving name map (names are case-insensitive): pingora's per-header
        // inserts into the case-preserving copy cost more than the whole rebuild.
        // Client copies of the headers portier sets never pass (so a client cannot
        // pick another tenant's database).
        let mut out = RequestHeader::build_no_case(
            upstream.method.clone(),
            upstream.raw_path(),
            Some(upstream.headers.len() + 8),
        )?;
        out.set_version(upstream.version);
        let mut has_host = false;
        for (name, value) in upstream.headers.iter() {
            if forward::is_own_header(name) || (ctx.body_preread && name == header::EXPECT) {
                continue;
            }
            has_host |= name == header::HOST;
            out.append_header(name.clone(), value.clone())?;
        }
        if let Some(name) = ctx.tenant_name.as_deref() {
            if let Some(db) = tenant.database_for(name) {
                let db = HeaderValue::from_str(&db)
                    .map_err(|_| Error::explain(ErrorType::InternalError, "database name"))?;
                out.insert_header("x-odoo-dbfilter", db.clone())?;
                out.insert_header("x-odoo-database", db)?;
            }
        }
        let req = session.req_header();
        if let Some(h) = request_host(req) {
            let h = HeaderValue::from_str(h)
                .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "host"))?;
            if !has_host {
                out.insert_header(header::HOST, h.clone())?;
            }
            out.insert_header("x-forwarded-host", h)?;
        }
        if let Some(peer_ip) = ctx.client_ip {
            let trusted = settings.is_trusted_proxy(peer_ip);
            let mut sent = req.headers.get_all("x-forwarded-for").iter();
            let proto = if ctx.tls { "https" } else { "http" };
            let mut proto = HeaderValue::from_static(proto);
            match (trusted, sent.next()) {
                (true, Some(first)) => {
                    let mut chain = String::from_utf8_lossy(first.as_bytes()).into_owned();
                    for v in sent {
                        chain.push_str(", ");
                        chain.push_str(&String::from_utf8_lossy(v.as_bytes()));
                    }
                    let (xff, real) = forward::forwarded_for(peer_ip, Some(&chain), settings);
                    out.insert_header("x-forwarded-for", xff)?;
                    out.insert_header("x-real-ip", real.to_string())?;
                }
                _ => {
                    // The common case: one address, formatted once.
                    let ip = HeaderValue::try_from(peer_ip.to_string())
                        .map_err(|_| Error::explain(ErrorType::InternalError, "ip"))?;
                    out.insert_header("x-forwarded-for", ip.clone())?;
                    out.insert_header("x-real-ip", ip)?;
                }
            }
            if trusted {
                if let Some(p) = req.headers.get("x-forwarded-proto") {
                    if p == "http" || p == "https" {
                        proto = p.clone();
                    }
                }
            }
            out.insert_header("x-forwarded-proto", proto)?;
        }
        out.insert_header("x-request-id", ctx.request_id.clone())?;
        *upstream = out;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // As for the request: one rebuild without the case map beats inserting.
        let mut out = ResponseHeader::build_no_case(resp.status, Some(resp.headers.len() + 2))?;
        out.set_version(resp.version);
        for (name, value) in resp.headers.iter() {
            if name != "x-request-id" {
                out.append_header(name.clone(), value.clone())?;
            }
        }
        out.insert_header("x-request-id", ctx.request_id.clone())?;
        if let Some(hsts) = self.hsts(ctx) {
            out.insert_header(header::STRICT_TRANSPORT_SECURITY, hsts)?;
        }
        *resp = out;
        Ok(())
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // portier does not compress: no module at all (pingora's default adds a
        // disabled compression module that still costs work per request).
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(c) => *c,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if *e.esource() == ErrorSource::Upstream =>
            {
                504
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    ErrorType::ReadTimedout => 408,
                    _ => {
                        ctx.refused.get_or_insert(Refusal::BadRequest);
                        400
                    }
                },
                _ => 500,
            },
        };
        if code > 0 && session.response_written().is_none() {
            let res = if code == 503 && ctx.refused == Some(Refusal::NoBackend) {
                let reply = Reply {
                    status: 503,
                    content_type: "text/html; charset=utf-8",
                    body: Bytes::from_static(MAINTENANCE_PAGE.as_bytes()),
                    extra: &[("retry-after", "5".to_string())],
                    close: false,
                };
                self.respond(session, ctx, reply).await
            } else {
                let text = match code {
                    400 => "bad request",
                    408 => "request timeout",
                    413 => "request body too large",
                    502 => "bad gateway",
                    504 => "gateway timeout",
                    _ => "error",
                };
                self.respond(session, ctx, Reply::text(code, text, true))
                    .await
            };
            if let Err(err) = res {
                tracing::debug!(error = %err, "cannot send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _error: &Error) -> bool {
        // Refusals are in the access log already.
        ctx.refused.is_some()
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or_else(|| e.map(|_| 499))
            .unwrap_or(0);
        let elapsed = ctx.start.elapsed();
        if let (Some(stats), Some(class)) = (&ctx.stats, ctx.class) {
            stats.observe(class, status, elapsed.as_secs_f64());
        }
        let log = &self.shared.access_log;
        if log.enabled() {
            let req = session.req_header();
            let record = AccessRecord {
                request_id: ctx.request_id.to_str().unwrap_or("-"),
                tenant: ctx.tenant_name.as_deref(),
                class: ctx.class,
                method: req.method.as_str(),
                path: req.uri.path(),
                status,
                bytes: session.body_bytes_sent() as u64,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                backend: ctx.backend.as_ref().map(|g| &*g.0.addr_str),
                refused: ctx.refused,
            };
            if !log.log(&record) {
                self.shared.metrics.access_log_dropped.inc();
            }
        }
    }
}
