//! The upstream phases: picking the backend of an attempt, deciding whether a failed
//! attempt is retried (DESIGN.md; contract "Health and circuit breaking"), and the
//! request and response headers as they cross portier ("What goes upstream").

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};
use portier_config::Class;

use crate::admission::{self, NoSlot};
use crate::assets::{self, CacheState};
use crate::backend::{Backend, InflightGuard, Role};
use crate::balance;
use crate::breaker;
use crate::compress;
use crate::ctx::Ctx;
use crate::forward;
use crate::request::request_host;
use crate::snapshot::{DatabaseHeaders, PoolRt, Snapshot};
use crate::state::Shared;
use crate::telemetry::{Metrics, Refusal, Retry};

/// How long an idle upstream connection stays in the pool.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);
/// Stale pooled connections a request may meet before such failures count as attempts.
const MAX_STALE: u32 = 2;
/// The pingora reuse key of connections opened for a retry after a stale one.
const FRESH_GROUP: u64 = 0x0053_5441_4c45;

/// Picks the backend of the next attempt (waiting for a worker slot on pools with
/// `workers`) and describes the connection to it.
pub async fn peer(ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
    let snap = ctx
        .snap
        .clone()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "no snapshot"))?;
    let tenant = ctx
        .tenant(&snap)
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "no tenant"))?;
    let pool = ctx
        .pool(&snap)
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "no pool"))?;
    let fresh = std::mem::take(&mut ctx.retry_fresh);
    if fresh {
        ctx.tried.pop();
    }
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
    // The previous attempt's slot goes back before this one takes one.
    ctx.slot = None;
    let backend = if ctx.role() == Role::Http && pool.cfg.workers > 0 {
        match worker_slot(ctx, pool, members.list(Role::Http), backend).await {
            Ok(b) => b,
            Err(why) => {
                ctx.refused = Some(why);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no worker slot for the request",
                ));
            }
        }
    } else {
        backend
    };
    ctx.outcome_recorded = false;
    ctx.retry_on_status = false;
    ctx.response_started = false;
    ctx.tried.push(backend.addr());
    ctx.attempts += 1;
    let addr = backend.addr();
    ctx.backend = Some(InflightGuard::new(backend));

    let s = &tenant.settings;
    let timeout = if ctx.websocket {
        s.websocket_idle
    } else if ctx.class == Some(Class::Longpolling) {
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
    // The worker's response header is rebuilt without its names' case for the client
    // (`response_headers`), so that case is not kept when it is read (vendor patch 31).
    peer.options.h1_ignore_header_case = true;
    if fresh {
        // A reuse key of its own finds no pooled connection; released with no idle
        // time, the connection is not kept either.
        peer.group_key = FRESH_GROUP;
        peer.options.idle_timeout = Some(Duration::ZERO);
    }
    Ok(Box::new(peer))
}

/// A worker slot for the request: on `picked` (the session's backend, or the least
/// busy of the tenant's) if free, else on any backend the request may use (not a
/// session's), else in the pool's queue. Returns the backend of the slot, held in
/// `ctx.slot`.
async fn worker_slot(
    ctx: &mut Ctx,
    pool: &PoolRt,
    list: &[Arc<Backend>],
    picked: Arc<Backend>,
) -> std::result::Result<Arc<Backend>, Refusal> {
    let cap = pool.cfg.workers;
    let class = ctx.class.unwrap_or(Class::Interactive);
    let slots = cap.saturating_mul(list.len() as u32);
    let gate = admission::gate(class, slots, pool.cfg.queue.reserve);
    let granted = if admission::try_acquire(&picked, cap, &pool.queue, gate) {
        picked
    } else {
        let targets = match ctx.session_hash {
            Some(_) => vec![picked],
            None => balance::candidates(list, &ctx.want(pool, breaker::now_ms()), &picked),
        };
        let free = match ctx.session_hash {
            Some(_) => None,
            None => targets
                .iter()
                .find(|b| admission::try_acquire(b, cap, &pool.queue, gate))
                .cloned(),
        };
        match free {
            Some(b) => b,
            None => {
                let start = Instant::now();
                let q = &pool.cfg.queue;
                let waited = pool
                    .queue
                    .wait(
                        admission::Waiting {
                            class,
                            tenant: ctx.tenant_hash,
                        },
                        targets,
                        (cap, gate),
                        *q,
                    )
                    .await;
                ctx.queued += start.elapsed();
                match waited {
                    Ok(b) => b,
                    Err(NoSlot::Full) => return Err(Refusal::QueueFull),
                    Err(NoSlot::Timeout) => return Err(Refusal::QueueTimeout),
                }
            }
        }
    };
    ctx.slot = Some(admission::Slot::taken(granted.clone(), pool.queue.clone()));
    Ok(granted)
}

/// Marks `e` for a retry on another backend and counts it.
fn retry(ctx: &Ctx, metrics: &Metrics, e: &mut Error, why: Retry) {
    e.set_retry(true);
    if let Some(pool) = ctx.pool_name() {
        metrics.retried(pool, why);
    }
}

/// `fail_to_connect`: nothing reached the worker, so another one may always be tried.
pub fn connect_failed(ctx: &mut Ctx, metrics: &Metrics, mut e: Box<Error>) -> Box<Error> {
    ctx.record_outcome(false);
    if ctx.attempts <= ctx.retries() && ctx.has_alternative() {
        retry(ctx, metrics, &mut e, Retry::Connect);
    }
    e
}

/// `error_while_proxy`: whether an attempt that failed after connecting is retried
/// (contract r2, "Health and circuit breaking"). Idempotent requests are sent again
/// to another backend after an upstream timeout (not longpolls) and after the worker
/// closed or reset the connection before its response (an Odoo worker recycled by
/// `limit_request`, or killed by `limit_time_real`/`limit_memory_hard`, does that).
/// Every such failure counts toward the backend's breaker.
pub fn proxy_failed(
    ctx: &mut Ctx,
    metrics: &Metrics,
    session: &Session,
    peer: &HttpPeer,
    e: Box<Error>,
    client_reused: bool,
) -> Box<Error> {
    let mut e = e.more_context(format!("backend {peer}"));
    if ctx.retry_on_status {
        // upstream_response_filter asked for this retry (and checked it is allowed).
        retry(ctx, metrics, &mut e, Retry::Status);
        return e;
    }
    let upstream_fault = *e.esource() == ErrorSource::Upstream;
    if upstream_fault {
        ctx.record_outcome(false);
    }
    // pingora marks a connection closed or reset while the response head was awaited
    // as retryable on reused connections only; before the head, nothing of the
    // response reached portier. A fresh connection reset while the request was being
    // written (a worker accepting and resetting) is the same case for the contract.
    let closed_early = upstream_fault
        && !ctx.response_started
        && (matches!(e.retry, RetryType::ReusedOnly)
            || matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            ));
    let timed_out = upstream_fault
        && matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        )
        && ctx.class != Some(Class::Longpolling);
    let resendable =
        ctx.resendable(session) && session.response_written().is_none() && !ctx.websocket;
    if !resendable {
        e.set_retry(false);
    } else if closed_early && client_reused && ctx.stale < MAX_STALE {
        // A pooled connection the worker had closed (Odoo drops idle connections
        // after its socket timeout, and a recycled process drops its own): that says
        // nothing about the worker, so the request goes out again on a fresh
        // connection, to any usable backend (its own included), using up no retry.
        ctx.stale += 1;
        ctx.retry_fresh = true;
        retry(ctx, metrics, &mut e, Retry::Closed);
    } else if !ctx.retry_left() {
        e.set_retry(false);
    } else if (timed_out || closed_early) && ctx.has_alternative() {
        let why = if timed_out {
            Retry::Timeout
        } else {
            Retry::Closed
        };
        retry(ctx, metrics, &mut e, why);
    } else {
        e.retry.decide_reuse(client_reused);
    }
    e
}

/// `upstream_response_filter`: feeds the breaker and turns a 502-504 answer into a
/// retry on another backend when the request may be sent again.
pub fn response_status(ctx: &mut Ctx, session: &Session, status: u16) -> Result<()> {
    ctx.response_started = true;
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

/// The request as it goes upstream.
///
/// Edited in place, through the header map (vendor patch 34): the headers the client
/// sent go on as they are (names without their case, as read: vendor patch 31), the
/// client's copies of the headers portier sets never pass (so a client cannot pick
/// another tenant's database), and portier's are added.
pub fn request_headers(
    ctx: &Ctx,
    client: &RequestHeader,
    upstream: &mut RequestHeader,
) -> Result<()> {
    let Some(snap) = ctx.snap.as_ref() else {
        return Ok(());
    };
    let Some(tenant) = ctx.tenant(snap) else {
        return Ok(());
    };
    let settings = &tenant.settings;
    let out = upstream.headers_mut();
    // A client rarely sends any of them: one pass over the names finds them (nothing is
    // allocated when there are none), then each is removed with all its values.
    let dropped: Vec<header::HeaderName> = out
        .keys()
        .filter(|name| {
            forward::is_own_header(name) || (ctx.body_preread && *name == header::EXPECT)
        })
        .cloned()
        .collect();
    for name in dropped {
        out.remove(name);
    }
    // Room for the six portier sets on every proxied request (X-Odoo-dbfilter,
    // X-Forwarded-Host, -For, -Proto, X-Real-IP, X-Request-Id) at once, rather than as
    // the map fills; the rarer Host and X-Odoo-Database grow it if they do not fit. The
    // map keeps a power of two of slots and the worker's connection keeps this header for
    // as long as it is open (a WebSocket: hours), so the bound is kept tight.
    out.reserve(6);
    let has_host = out.contains_key(header::HOST);
    database_headers(ctx, snap, out)?;
    if let Some(h) = request_host(client) {
        let h = HeaderValue::from_str(h)
            .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "host"))?;
        if !has_host {
            out.insert(header::HOST, h.clone());
        }
        out.insert(forward::X_FORWARDED_HOST, h);
    }
    if let Some(peer_ip) = ctx.client_ip {
        let trusted = settings.is_trusted_proxy(peer_ip);
        let mut sent = client.headers.get_all(&forward::X_FORWARDED_FOR).iter();
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
                let xff = HeaderValue::try_from(xff)
                    .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "x-forwarded-for"))?;
                out.insert(forward::X_FORWARDED_FOR, xff);
                out.insert(forward::X_REAL_IP, forward::ip_header_value(real));
            }
            _ => {
                // The common case: one address, formatted once.
                let ip = forward::ip_header_value(peer_ip);
                out.insert(forward::X_FORWARDED_FOR, ip.clone());
                out.insert(forward::X_REAL_IP, ip);
            }
        }
        if trusted {
            if let Some(p) = client.headers.get(&forward::X_FORWARDED_PROTO) {
                if p == "http" || p == "https" {
                    proto = p.clone();
                }
            }
        }
        out.insert(forward::X_FORWARDED_PROTO, proto);
    }
    out.insert(forward::X_REQUEST_ID, ctx.request_id.clone());
    Ok(())
}

/// The tenant's database (contract r2, "What goes upstream"): `X-Odoo-dbfilter:
/// ^NAME$` on every request; `X-Odoo-Database: NAME` only on integration requests
/// without a `session_id` cookie. Odoo 19 (`odoo/http.py`, `_get_session_and_dbname`)
/// treats a request with that header and no session as a stateless call whose
/// session is never saved, so on browser traffic it would make logging in
/// impossible, and with a session of another database Odoo answers 403.
fn database_headers(ctx: &Ctx, snap: &Snapshot, out: &mut HeaderMap) -> Result<()> {
    let with_database = ctx.class == Some(Class::Integration) && ctx.session_hash.is_none();
    let fixed = ctx
        .tenant
        .and_then(|t| snap.tenants.get(t))
        .and_then(|t| t.database.as_ref());
    if let Some(h) = fixed {
        out.insert(forward::X_ODOO_DBFILTER, h.dbfilter.clone());
        if with_database {
            out.insert(forward::X_ODOO_DATABASE, h.database.clone());
        }
        return Ok(());
    }
    let (Some(tenant), Some(name)) = (ctx.tenant(snap), ctx.tenant_name.as_deref()) else {
        return Ok(());
    };
    let Some(h) = tenant
        .database_for(name)
        .and_then(|db| DatabaseHeaders::new(&db))
    else {
        return Ok(());
    };
    out.insert(forward::X_ODOO_DBFILTER, h.dbfilter);
    if with_database {
        out.insert(forward::X_ODOO_DATABASE, h.database);
    }
    Ok(())
}

/// The response as it goes to the client: the request id echoed, HSTS on TLS.
/// Edited in place, as the request is (vendor patch 34).
pub fn response_headers(shared: &Shared, ctx: &mut Ctx, resp: &mut ResponseHeader) -> Result<()> {
    // The asset cache decides on the worker's answer; compression then changes the
    // headers; the entry keeps them as the client gets them.
    let ttl = match &ctx.cache {
        CacheState::Miss { fill: Some(_), .. } => assets::lifetime(resp),
        _ => None,
    };
    let hsts = ctx
        .hsts()
        .map(|hsts| {
            HeaderValue::try_from(hsts)
                .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "hsts"))
        })
        .transpose()?;
    let secure_cookies = crate::edge::secures_cookies(ctx);
    let headers = resp.headers_mut();
    if secure_cookies {
        if let header::Entry::Occupied(mut cookies) = headers.entry(header::SET_COOKIE) {
            for value in cookies.iter_mut() {
                if let Some(secured) = crate::edge::secure_session_cookie(value) {
                    *value = secured;
                }
            }
        }
    }
    // The worker's own X-Request-Id, if any, is replaced.
    headers.insert(forward::X_REQUEST_ID, ctx.request_id.clone());
    if let Some(hsts) = hsts {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts);
    }
    if ctx.compressible {
        ctx.encoder = compress::response_headers(ctx.encoding, resp)?;
    }
    if let CacheState::Miss { key, fill } = &mut ctx.cache {
        resp.insert_header(forward::X_CACHE, "miss")?;
        if let (Some(ttl), Some(fill)) = (ttl, fill.take()) {
            ctx.capture = Some(assets::Capture::start(
                &shared.assets,
                key.clone(),
                fill,
                resp,
                ttl,
            ));
        }
        // An answer the cache cannot keep wakes the waiters now (`fill` dropped).
        *fill = None;
    }
    Ok(())
}

/// Property tests of the request header rewrite (the stable-Rust stand-in for fuzzing;
/// `scripts/fuzz.sh` runs them longer): whatever headers a client sends, the worker
/// gets exactly the tenant's database headers, portier's forwarding headers and
/// request id, and never a client's own copy of them.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> u32 {
        crate::forward::props::fuzz_cases(500)
    }

    fn snapshot(trusted: bool) -> Arc<Snapshot> {
        let text = format!(
            "[listen]\nhttp = \"127.0.0.1:80\"\n[defaults]\ntrusted_proxies = [{}]\n[pools.p]\nhttp = [\"127.0.0.1:8069\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\ndatabase = \"acme\"\n",
            if trusted { "\"10.0.0.0/8\"" } else { "" }
        );
        let (config, _) = portier_config::load_str(&text, std::path::Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e:?}"));
        Arc::new(Snapshot::build(
            config,
            &crate::backend::Registry::default(),
            &crate::admission::Queues::default(),
            &crate::telemetry::Metrics::new(),
            &dashmap::DashMap::new(),
        ))
    }

    fn header() -> impl Strategy<Value = (String, String)> {
        let name = prop::sample::select(vec![
            "x-odoo-database",
            "X-Odoo-Dbfilter",
            "x-forwarded-for",
            "X-Forwarded-Host",
            "x-forwarded-proto",
            "x-real-ip",
            "x-request-id",
            "host",
            "cookie",
            "x-custom",
            "accept",
        ]);
        let value = prop::sample::select(vec![
            "acme2",
            "^.*$",
            "203.0.113.9",
            "10.1.2.3, 203.0.113.9",
            "evil.test",
            "https",
            "session_id=abc",
            "x",
            "",
        ]);
        (name, value).prop_map(|(n, v)| (n.to_string(), v.to_string()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        #[test]
        fn the_worker_gets_portiers_headers_and_never_a_clients_copy(
            headers in prop::collection::vec(header(), 0..10),
            integration in any::<bool>(),
            session in any::<bool>(),
            trusted in any::<bool>(),
            tls in any::<bool>(),
        ) {
            let snap = snapshot(trusted);
            let mut client = RequestHeader::build("POST", b"/jsonrpc", None).unwrap();
            for (n, v) in &headers {
                client.append_header(n.clone(), v.as_str()).unwrap();
            }
            let mut ctx = Ctx::new();
            ctx.snap = Some(snap);
            ctx.tenant = Some(0);
            ctx.tenant_name = Some(Arc::from("acme"));
            ctx.class = Some(if integration { Class::Integration } else { Class::Interactive });
            ctx.session_hash = session.then_some(1);
            ctx.tls = tls;
            ctx.request_id = HeaderValue::from_static("rid-1");
            let peer: std::net::IpAddr = if trusted { "10.9.9.9" } else { "198.51.100.7" }.parse().unwrap();
            ctx.client_ip = Some(peer);
            let mut upstream = client.clone();
            request_headers(&ctx, &client, &mut upstream).unwrap();
            let all = |name: &str| -> Vec<String> {
                upstream.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_string()).collect()
            };
            prop_assert_eq!(all("x-odoo-dbfilter"), vec!["^acme$".to_string()]);
            let want_db: Vec<String> = if integration && !session { vec!["acme".into()] } else { vec![] };
            prop_assert_eq!(all("x-odoo-database"), want_db);
            prop_assert_eq!(all("x-request-id"), vec!["rid-1".to_string()]);
            let xff = all("x-forwarded-for");
            prop_assert_eq!(xff.len(), 1);
            prop_assert!(xff[0].ends_with(&peer.to_string()), "{:?}", xff);
            if !trusted {
                prop_assert_eq!(&xff[0], &peer.to_string(), "an untrusted peer's chain is dropped");
                prop_assert_eq!(all("x-forwarded-proto"), vec![if tls { "https" } else { "http" }.to_string()]);
            }
            prop_assert_eq!(all("x-real-ip").len(), 1);
            prop_assert!(all("x-forwarded-host").len() <= 1);
            // Everything else the client sent is passed on unchanged.
            for (n, v) in &headers {
                let name = http::HeaderName::from_bytes(n.as_bytes()).unwrap();
                if !forward::is_own_header(&name) && name != header::HOST {
                    prop_assert!(upstream.headers.get_all(&name).iter().any(|x| x == v.as_str()), "{} lost", n);
                }
            }
        }
    }
}
