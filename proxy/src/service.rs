//! The pingora `ProxyHttp` implementation: each method is a few named phase steps
//! (DESIGN.md, "The request path"), each in the module that owns it: `request`
//! (framing, redirect, tenant, class, limits), `body`, `upstream` (backend, retries,
//! headers), with every refusal answered by `answer`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::access_log::AccessRecord;
use crate::answer::{self, Answer};
use crate::assets::{self, CacheState, Lookup};
use crate::body;
use crate::compress;
use crate::ctx::Ctx;
use crate::edge::{self, LoginProbe};
use crate::forward;
use crate::request;
use crate::snapshot::Snapshot;
use crate::state::{RequestGuard, Shared};
use crate::telemetry::Refusal;
use crate::upstream;

pub struct Proxy {
    pub shared: Arc<Shared>,
}

fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

impl Proxy {
    /// Per-request set-up: snapshot, client address, request id, client timeouts.
    fn begin(&self, session: &mut Session, ctx: &mut Ctx) {
        ctx.guard = Some(RequestGuard::new(&self.shared));
        ctx.start = Instant::now();
        ctx.snap = Some(self.shared.snapshot.load_full());
        ctx.tls = is_tls(session);
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| forward::canonical(a.ip()));
        let mut request_id = match session.req_header().headers.get(&forward::X_REQUEST_ID) {
            Some(v) if forward::valid_request_id(v.as_bytes()) => v.clone(),
            _ => HeaderValue::from_bytes(&forward::new_request_id_bytes())
                .unwrap_or_else(|_| HeaderValue::from_static("-")),
        };
        // Over HTTP/2 a value that differs on every response is sent as a never-indexed
        // literal (HPACK, RFC 7541 section 6.2.3): h2's encoder otherwise inserts every
        // value into the connection's dynamic table, where each new id evicts entries
        // that do repeat. No effect on HTTP/1.
        request_id.set_sensitive(true);
        ctx.request_id = request_id;
        if session.get_keepalive().is_some() {
            let idle = ctx
                .snap
                .as_ref()
                .map(|s| s.config.listen.idle_timeout.as_secs().max(1))
                .unwrap_or(75);
            session.set_keepalive(Some(idle));
        }
        session.set_write_timeout(Some(body::CLIENT_IO_TIMEOUT));
    }

    /// The response's encoding (`compress`), then the asset cache: a fresh entry is the
    /// answer; a miss fills it, or waits for the request already filling it.
    async fn prepare_response(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        snap: &Snapshot,
    ) -> Option<Answer> {
        let tenant = ctx.tenant(snap)?;
        let class = ctx.class?;
        let settings = tenant.settings.clone();
        if compress::applies(
            settings.compress,
            class,
            session.req_header(),
            ctx.websocket,
        ) {
            ctx.compressible = true;
            ctx.encoding = compress::negotiate(
                session
                    .req_header()
                    .headers
                    .get_all(http::header::ACCEPT_ENCODING)
                    .iter(),
            );
        }
        let cache = &self.shared.assets;
        if settings.cache_assets == 0
            || !cache.enabled()
            || !assets::cacheable_request(session, class)
        {
            return None;
        }
        let owner = snap.tenants.get(ctx.tenant?)?.name.clone();
        let uri = session
            .req_header()
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let name = ctx.tenant_name.clone()?;
        let key = assets::KeyRef::new(&owner, &name, uri, ctx.encoding);
        let metrics = &self.shared.metrics;
        let mut waited = false;
        loop {
            match cache.lookup(&key) {
                Lookup::Hit(entry) => {
                    ctx.cache = CacheState::Hit;
                    metrics.cache_hits.inc();
                    return Some(Answer::Cached(entry));
                }
                Lookup::Fill(fill) => {
                    ctx.cache = CacheState::Miss {
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
                    ctx.cache = CacheState::Miss {
                        key: key.to_owned(),
                        fill: None,
                    };
                    metrics.cache_misses.inc();
                    return None;
                }
            }
        }
    }

    /// The phases before a worker is picked; `Err` is the answer to send instead.
    async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Result<(), Answer>> {
        let Some(snap) = ctx.snap.clone() else {
            return Ok(Err(Answer::error(500)));
        };
        let phases = (|| {
            request::check_framing(session)?;
            let host = request::host(session)?;
            request::acme_challenge(&snap, session, ctx)?;
            request::https_redirect(&self.shared, &snap, session, ctx, &host)?;
            let m = request::tenant(&self.shared, &snap, session, ctx, &host)?;
            let class = request::classify(&snap, session, ctx)?;
            edge::maintenance(&snap, session, ctx)?;
            let req = session.req_header();
            let probe = LoginProbe::of(&req.method, req.uri.path());
            let limits = request::tenant_limiter(&self.shared, &snap, ctx, &m, class);
            Ok((probe, limits))
        })();
        let (probe, limits) = match phases {
            Ok(p) => p,
            Err(answer) => return Ok(Err(answer)),
        };
        if probe == LoginProbe::Path {
            if let Err(answer) = edge::login(&self.shared, &snap, session, ctx, probe, None).await {
                return Ok(Err(answer));
            }
        }
        if let Some(limits) = limits {
            if let Err(answer) = request::tenant_limits(&self.shared, ctx, limits).await {
                return Ok(Err(answer));
            }
        }
        if let Some(answer) = self.prepare_response(session, ctx, &snap).await {
            return Ok(Err(answer));
        }
        let Some(tenant) = ctx.tenant(&snap) else {
            return Ok(Err(Answer::error(500)));
        };
        let spool_dir = &snap.config.listen.spool_dir;
        ctx.keep_body = probe == LoginProbe::XmlRpc;
        if let Err(answer) = body::receive(
            session,
            ctx,
            &tenant.settings,
            spool_dir,
            &self.shared.metrics,
        )
        .await?
        {
            return Ok(Err(answer));
        }
        if probe == LoginProbe::XmlRpc {
            let body = ctx.body.take();
            if let Err(answer) =
                edge::login(&self.shared, &snap, session, ctx, probe, body.as_ref()).await
            {
                return Ok(Err(answer));
            }
        }
        Ok(Ok(()))
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    // Boxed: the context lives in every state of pingora's request future (twice,
    // as argument and local), so inline its 1 KiB would be held two or three times by
    // every request in flight (a held longpoll or WebSocket) and copied with the future.
    type CTX = Box<Ctx>;

    fn new_ctx(&self) -> Box<Ctx> {
        Box::new(Ctx::new())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Result<bool> {
        self.begin(session, ctx);
        match self.admit(session, ctx).await? {
            Ok(()) => Ok(false),
            Err(answer) => {
                answer::send(session, ctx, answer).await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        body::count_streamed(ctx, body)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Box<Ctx>,
    ) -> Result<Box<HttpPeer>> {
        upstream::peer(ctx).await
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Box<Ctx>,
        e: Box<Error>,
    ) -> Box<Error> {
        upstream::connect_failed(ctx, &self.shared.metrics, e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Box<Ctx>,
        client_reused: bool,
    ) -> Box<Error> {
        upstream::proxy_failed(ctx, &self.shared.metrics, session, peer, e, client_reused)
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        upstream::response_status(ctx, session, resp.status.as_u16())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        upstream::request_headers(ctx, session.req_header(), upstream)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        upstream::response_headers(&self.shared, ctx, resp)
    }

    fn request_header_timed_out(&self, session: &pingora::protocols::http::ServerSession) {
        self.shared.metrics.refused_header_timeout.inc();
        let log = &self.shared.access_log;
        if log.enabled() {
            let id = forward::new_request_id();
            let client = session.client_addr().map(|a| a.to_string());
            tracing::debug!(
                client = client.as_deref().unwrap_or("-"),
                "request header timed out"
            );
            let record = AccessRecord {
                request_id: &id,
                tenant: None,
                class: None,
                method: "-",
                path: "-",
                status: 408,
                bytes: 0,
                duration_ms: 0.0,
                backend: None,
                refused: Some(Refusal::HeaderTimeout),
                queued_ms: 0.0,
                attempts: 0,
                cache: None,
            };
            if !log.log(&record) {
                self.shared.metrics.access_log_dropped.inc();
            }
        }
    }

    fn upgraded_interrupt(
        &self,
        ctx: &mut Box<Ctx>,
    ) -> Option<futures_util::future::BoxFuture<'static, Option<Bytes>>> {
        if !ctx.websocket {
            return None;
        }
        edge::websocket_interrupt(&self.shared, ctx)
    }

    async fn response_body_async_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        if let Some(encoder) = ctx.encoder.as_mut() {
            compress::body(encoder, body, end_of_stream)?;
        }
        if let Some(capture) = ctx.capture.as_mut() {
            if body.as_ref().is_some_and(|b| !capture.push(b)) {
                // Too big to keep: the waiters go to the worker.
                ctx.capture = None;
            }
            if end_of_stream {
                if let Some(capture) = ctx.capture.take() {
                    capture.finish(&self.shared.assets);
                }
            }
        }
        read_ahead(ctx, body, end_of_stream, &self.shared.metrics).await
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // portier does not compress: no module at all (pingora's default adds a
        // disabled compression module that still costs work per request).
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Box<Ctx>,
    ) -> FailToProxy {
        let code = error_status(e, ctx);
        if code > 0 && session.response_written().is_none() {
            let answer = match (code, ctx.refused) {
                (503, Some(Refusal::NoBackend)) => Answer::Unavailable,
                (503, Some(why @ (Refusal::QueueFull | Refusal::QueueTimeout))) => {
                    Answer::NoSlot(why)
                }
                _ => Answer::error(code),
            };
            if let Err(err) = answer::send(session, ctx, answer).await {
                tracing::debug!(error = %err, "cannot send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Box<Ctx>, _error: &Error) -> bool {
        // Refusals are in the access log already.
        ctx.refused.is_some()
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Box<Ctx>) {
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
                queued_ms: ctx.queued.as_secs_f64() * 1000.0,
                attempts: ctx.attempts,
                cache: ctx.cache.log(),
            };
            if !log.log(&record) {
                self.shared.metrics.access_log_dropped.inc();
            }
        }
    }
}

/// The status for a failed request: the error's own, 504 for upstream timeouts, 502
/// for other upstream failures, 408/400 for client faults, 0 (nothing to send) when
/// the client is gone.
fn error_status(e: &Error, ctx: &mut Ctx) -> u16 {
    match e.etype() {
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
    }
}

/// Holds the worker's response ahead of the client (not for longpolls and WebSockets),
/// and frees the worker slot once the last byte is read from the worker.
async fn read_ahead(
    ctx: &mut Ctx,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
    metrics: &crate::telemetry::Metrics,
) -> Result<()> {
    let holds =
        !ctx.websocket && !matches!(ctx.class, Some(portier_config::Class::Longpolling) | None);
    if let (true, Some(snap)) = (holds, ctx.snap.clone()) {
        if let Some(t) = ctx.tenant(&snap) {
            let dir = &snap.config.listen.spool_dir;
            ctx.response
                .read_ahead(body, end_of_stream, &t.settings, dir, metrics)
                .await?;
        }
    }
    if end_of_stream {
        ctx.slot = None;
    }
    Ok(())
}
