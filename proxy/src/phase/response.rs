//! The response on its way back to the client: before a worker is asked, the
//! encoding the client gets and the asset cache (a fresh entry is the answer); then the
//! worker's response header as the client gets it; then its body — compressed,
//! captured for the cache, and read ahead of the client so the worker is freed.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use portier_config::Class;

use crate::io::assets::{self, AssetCache, CacheState, Lookup};
use crate::io::compress;
use crate::io::forward;
use crate::phase::answer::Answer;
use crate::phase::ctx::Ctx;
use crate::snapshot::Snapshot;
use portier_runtime::access_log::{AccessLog, AccessRecord};
use portier_runtime::live::Outcome;
use portier_runtime::telemetry::Metrics;

/// The response as it goes to the client: the request id echoed, HSTS on TLS.
/// Edited in place, as the request is (vendor patch 34).
pub fn headers(cache: &Arc<AssetCache>, ctx: &mut Ctx, resp: &mut ResponseHeader) -> Result<()> {
    // The asset cache decides on the worker's answer; compression then changes the
    // headers; the entry keeps them as the client gets them.
    let ttl = match &ctx.response.cache {
        CacheState::Miss { fill: Some(_), .. } => assets::lifetime(resp),
        _ => None,
    };
    client_headers(ctx, resp)?;
    if ctx.response.compressible {
        ctx.response.encoder = compress::response_headers(ctx.response.encoding, resp)?;
    }
    if let CacheState::Miss { key, fill } = &mut ctx.response.cache {
        resp.insert_header(forward::X_CACHE, "miss")?;
        if let (Some(ttl), Some(fill)) = (ttl, fill.take()) {
            ctx.response.capture = Some(Box::new(assets::Capture::start(
                cache,
                key.clone(),
                fill,
                resp,
                ttl,
            )));
        }
        // An answer the cache cannot keep wakes the waiters now (`fill` dropped).
        *fill = None;
    }
    Ok(())
}

/// What every worker answer gets on its way to the client: the request id (replacing
/// the worker's own), HSTS over TLS, `Secure` and `SameSite` on Odoo's session cookie.
/// Edited in place (vendor patch 34).
pub fn client_headers(ctx: &Ctx, resp: &mut ResponseHeader) -> Result<()> {
    let hsts = ctx
        .hsts()
        .map(|hsts| {
            HeaderValue::try_from(hsts)
                .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "hsts"))
        })
        .transpose()?;
    let secure_cookies = crate::phase::edge::secures_cookies(ctx);
    let headers = resp.headers_mut();
    if secure_cookies {
        if let header::Entry::Occupied(mut cookies) = headers.entry(header::SET_COOKIE) {
            for value in cookies.iter_mut() {
                if let Some(secured) = crate::phase::edge::secure_session_cookie(value) {
                    *value = secured;
                }
            }
        }
    }
    headers.insert(forward::X_REQUEST_ID, ctx.request_id.clone());
    if let Some(hsts) = hsts {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts);
    }
    Ok(())
}

/// Before a worker is asked: the response's encoding (`compress`), then the asset
/// cache. A fresh entry is the answer; a miss fills it, or waits for the request
/// already filling it.
pub async fn prepare(
    cache: &Arc<AssetCache>,
    metrics: &Metrics,
    session: &Session,
    ctx: &mut Ctx,
    snap: &Snapshot,
) -> Option<Answer> {
    let tenant = ctx.tenant(snap)?;
    let class = ctx.route.class?;
    let settings = tenant.settings.clone();
    if compress::applies(
        settings.compress,
        class,
        session.req_header(),
        ctx.route.websocket,
    ) {
        ctx.response.compressible = true;
        ctx.response.encoding = compress::negotiate(
            session
                .req_header()
                .headers
                .get_all(header::ACCEPT_ENCODING)
                .iter(),
        );
    }
    if settings.cache_assets == 0 || !cache.enabled() || !assets::cacheable_request(session, class)
    {
        return None;
    }
    cached(cache, metrics, session, ctx, snap, &settings).await
}

/// The asset cache's answer to a cacheable request, or `None` with the request's part
/// in the cache recorded (it fills the entry, or found it being filled too long).
async fn cached(
    cache: &Arc<AssetCache>,
    metrics: &Metrics,
    session: &Session,
    ctx: &mut Ctx,
    snap: &Snapshot,
    settings: &portier_config::Settings,
) -> Option<Answer> {
    let owner = snap.tenants.get(ctx.route.tenant?)?.name.clone();
    let uri = session
        .req_header()
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let name = ctx.route.tenant_name.clone()?;
    let key = assets::KeyRef::new(&owner, &name, uri, ctx.response.encoding);
    let mut waited = false;
    loop {
        match cache.lookup(&key) {
            Lookup::Hit(entry) => {
                ctx.response.cache = CacheState::Hit;
                metrics.cache_hits.inc();
                return Some(Answer::Cached(entry));
            }
            Lookup::Fill(fill) => {
                ctx.response.cache = CacheState::Miss {
                    key: key.to_owned(),
                    fill: Some(fill),
                };
                metrics.cache_misses.inc();
                return None;
            }
            Lookup::Wait(mut done) if !waited => {
                // Collapsed: wait (at most the request timeout) for the filler.
                let _ = tokio::time::timeout(settings.request_timeout, done.changed()).await;
                waited = true;
            }
            Lookup::Wait(_) => {
                ctx.response.cache = CacheState::Miss {
                    key: key.to_owned(),
                    fill: None,
                };
                metrics.cache_misses.inc();
                return None;
            }
        }
    }
}

/// The worker's response body on its way: compressed, captured for the asset cache,
/// and held ahead of the client.
pub async fn body(
    cache: &AssetCache,
    metrics: &Metrics,
    ctx: &mut Ctx,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
) -> Result<()> {
    if let Some(encoder) = ctx.response.encoder.as_mut() {
        compress::body(encoder, body, end_of_stream)?;
    }
    if let Some(capture) = ctx.response.capture.as_mut() {
        if body.as_ref().is_some_and(|b| !capture.push(b)) {
            // Too big to keep: the waiters go to the worker.
            ctx.response.capture = None;
        }
        if end_of_stream {
            if let Some(capture) = ctx.response.capture.take() {
                capture.finish(cache);
            }
        }
    }
    read_ahead(ctx, body, end_of_stream, metrics).await
}

/// Holds the worker's response ahead of the client (not for longpolls and WebSockets),
/// and frees the worker slot once the last byte is read from the worker.
async fn read_ahead(
    ctx: &mut Ctx,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
    metrics: &Metrics,
) -> Result<()> {
    let holds = !ctx.route.websocket && !matches!(ctx.route.class, Some(Class::Longpolling) | None);
    if let (true, Some(snap)) = (holds, ctx.snap.clone()) {
        if let Some(t) = ctx.tenant(&snap) {
            let dir = &snap.config.listen.spool_dir;
            ctx.response
                .buffer
                .read_ahead(body, end_of_stream, &t.settings, dir, metrics)
                .await?;
        }
    }
    if end_of_stream {
        ctx.attempt.slot = None;
    }
    Ok(())
}

/// The logging phase: the tenant's metrics and the access record (the only place one
/// is built). `method` and `path` are `-` for a request whose header never arrived.
pub fn log(
    access: &AccessLog,
    metrics: &Metrics,
    ctx: &Ctx,
    (method, path): (&str, &str),
    status: u16,
    bytes: u64,
) {
    let elapsed = ctx.start.elapsed();
    if let (Some(stats), Some(class)) = (&ctx.route.stats, ctx.route.class) {
        stats.observe(class, status, elapsed.as_secs_f64());
    }
    if let Some(live) = &ctx.route.live {
        let outcome = Outcome {
            status,
            refused: ctx.refused.is_some(),
            // The requests that reached a worker (portier's own answers have no latency
            // of the tenant's workers).
            worker_ms: (ctx.attempt.count > 0 && ctx.refused.is_none())
                .then_some(elapsed.as_secs_f64() * 1000.0),
        };
        live.record(portier_runtime::live::now_s(), outcome);
    }
    if !access.enabled() {
        return;
    }
    let record = AccessRecord {
        request_id: ctx.request_id.to_str().unwrap_or("-"),
        tenant: ctx.route.tenant_name.as_deref(),
        class: ctx.route.class,
        method,
        path,
        status,
        bytes,
        duration_ms: elapsed.as_secs_f64() * 1000.0,
        backend: ctx.attempt.backend.as_ref().map(|g| &*g.0.addr_str),
        refused: ctx.refused,
        queued_ms: ctx.attempt.queued.as_secs_f64() * 1000.0,
        attempts: ctx.attempt.count,
        cache: ctx.response.cache.log(),
    };
    if !access.log(&record) {
        metrics.access_log_dropped.inc();
    }
}
