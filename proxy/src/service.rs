//! The pingora `ProxyHttp` implementation, and nothing else: each method names its
//! phase and calls the steps of the module that owns it (docs/architecture.md, "The
//! request path"): `request` (set-up, framing, redirect, tenant, class, limits),
//! `edge` (maintenance, login, WebSockets), `body`, `attempt` (backend of each attempt,
//! retries), `upstream` (the request as it goes to the worker), `response` (cache,
//! compression, read-ahead, logging), with every answer portier writes itself in
//! `answer`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, Result};

use crate::io::forward;
use crate::phase::answer::{self, Answer};
use crate::phase::attempt;
use crate::phase::body;
use crate::phase::ctx::{Ctx, RequestGuard};
use crate::phase::edge::{self, LoginProbe};
use crate::phase::filestore;
use crate::phase::request;
use crate::phase::response;
use crate::phase::upstream;
use crate::snapshot::Snapshot;
use crate::state::Shared;
use portier_runtime::telemetry::Refusal;

pub struct Proxy {
    pub shared: Arc<Shared>,
}

impl Proxy {
    /// The phases before a worker is picked, in order; `Err` is the answer to send
    /// instead. Each step takes the parts of the process state it needs.
    async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Result<(), Answer>> {
        let sh = &*self.shared;
        let Some(snap) = ctx.snap.clone() else {
            return Ok(Err(Answer::error(500)));
        };
        let route = (|| {
            request::check_framing(session)?;
            let host = request::host(session)?;
            request::acme_challenge(&snap, session, ctx)?;
            request::https_redirect(&sh.certs, &snap, session, ctx, &host)?;
            let m = request::tenant((&sh.metrics, &sh.live), &snap, session, ctx, &host)?;
            let class = request::classify(&snap, session, ctx)?;
            edge::maintenance(&snap, session, ctx)?;
            let req = session.req_header();
            let probe = LoginProbe::of(&req.method, req.uri.path());
            Ok((
                probe,
                request::tenant_limiter(&sh.limits, &snap, ctx, &m, class),
            ))
        })();
        let (probe, limits) = match route {
            Ok(r) => r,
            Err(answer) => return Ok(Err(answer)),
        };
        if probe.is_login(None) {
            if let Err(a) = self.login(&snap, session, ctx).await {
                return Ok(Err(a));
            }
        }
        if let Some(limits) = limits {
            if let Err(a) = request::tenant_limits(&sh.cluster, ctx, limits).await {
                return Ok(Err(a));
            }
        }
        if let Some(a) = response::prepare(&sh.assets, &sh.metrics, session, ctx, &snap).await {
            return Ok(Err(a));
        }
        ctx.body.keep = probe == LoginProbe::XmlRpc;
        if let Err(a) = body::receive(session, ctx, &snap, &sh.metrics).await? {
            return Ok(Err(a));
        }
        // An XML-RPC `common` call is a login attempt by its body.
        if probe == LoginProbe::XmlRpc && probe.is_login(ctx.body.kept.take().as_ref()) {
            if let Err(a) = self.login(&snap, session, ctx).await {
                return Ok(Err(a));
            }
        }
        Ok(Ok(()))
    }

    /// A login attempt's limit (`edge::login`), with the parts of the state it needs.
    async fn login(&self, snap: &Snapshot, session: &Session, ctx: &Ctx) -> Result<(), Answer> {
        let sh = &*self.shared;
        edge::login(&sh.login, &sh.cluster, &sh.metrics, snap, session, ctx).await
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

    /// Request phase (`request`, `edge`, `body`, `response::prepare`): set-up, then the
    /// phases before a worker is picked; a refusal is answered here (`answer`).
    async fn request_filter(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Result<bool> {
        ctx.guard = Some(RequestGuard::new(&self.shared.inflight));
        request::begin(session, ctx, self.shared.snapshot.load_full());
        match self.admit(session, ctx).await? {
            Ok(()) => Ok(false),
            Err(answer) => answer::send(session, ctx, answer).await.map(|()| true),
        }
    }

    /// Request body phase (`body`): `max_body` on a body that streams.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        body::count_streamed(ctx, body)
    }

    /// Attempt phase (`attempt`): the backend of the next attempt.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Box<Ctx>,
    ) -> Result<Box<HttpPeer>> {
        attempt::peer(ctx).await
    }

    /// Attempt phase (`attempt`): a connect failure, retried on another backend.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Box<Ctx>,
        e: Box<Error>,
    ) -> Box<Error> {
        attempt::connect_failed(ctx, &self.shared.metrics, e)
    }

    /// Attempt phase (`attempt`): a failure after connecting, retried when allowed.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Box<Ctx>,
        client_reused: bool,
    ) -> Box<Error> {
        attempt::proxy_failed(ctx, &self.shared.metrics, session, peer, e, client_reused)
    }

    /// Attempt phase (`attempt`): the worker's status feeds the breaker; 502-504 retried;
    /// a file handed over is taken over (`filestore`).
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        attempt::response_status(ctx, session, resp.status.as_u16())?;
        filestore::take_over(ctx, session.req_header(), resp).await
    }

    /// Upstream phase (`upstream`): the request header as the worker gets it.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        upstream::request_headers(ctx, session.req_header(), upstream)
    }

    /// Response phase (`response`): the response header as the client gets it.
    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        response::headers(&self.shared.assets, ctx, resp)
    }

    /// Response body phase (`response`): compressed, captured, read ahead.
    async fn response_body_async_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        let (cache, metrics) = (&self.shared.assets, &self.shared.metrics);
        response::body(cache, metrics, ctx, body, end_of_stream).await
    }

    /// WebSocket phase (`edge`): closed (1001) when its tenant enters maintenance.
    fn upgraded_interrupt(
        &self,
        ctx: &mut Box<Ctx>,
    ) -> Option<futures_util::future::BoxFuture<'static, Option<Bytes>>> {
        if !ctx.route.websocket {
            return None;
        }
        let shared = self.shared.clone();
        let reloads = shared.reloaded.subscribe();
        edge::websocket_interrupt(reloads, move || shared.snapshot.load_full(), ctx)
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // portier does not compress: no module at all (pingora's default adds a
        // disabled compression module that still costs work per request).
    }

    /// Failure phase (`answer`): the answer to a request that failed before its response.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Box<Ctx>,
    ) -> FailToProxy {
        match ctx.response.handover.take() {
            Some(h) => filestore::send(session, ctx, h, &self.shared.metrics).await,
            None => answer::failed(session, e, ctx).await,
        }
    }

    /// Refusals and handed-over files are in the access log already.
    fn suppress_error_log(&self, _session: &Session, ctx: &Box<Ctx>, e: &Error) -> bool {
        ctx.refused.is_some() || *e.etype() == filestore::HANDOVER
    }

    /// Logging phase (`response::log`): the tenant's metrics and the access record.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Box<Ctx>) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or_else(|| e.map(|_| 499))
            .unwrap_or(0);
        let req = session.req_header();
        let (log, metrics) = (&self.shared.access_log, &self.shared.metrics);
        let at = (req.method.as_str(), req.uri.path());
        response::log(
            log,
            metrics,
            ctx,
            at,
            status,
            session.body_bytes_sent() as u64,
        );
    }

    /// Header-timeout phase (`response::log`): a 408 counted and logged, with no request.
    fn request_header_timed_out(&self, session: &pingora::protocols::http::ServerSession) {
        self.shared.metrics.refused_header_timeout.inc();
        let client = session.client_addr().map(|a| a.to_string());
        tracing::debug!(
            client = client.as_deref().unwrap_or("-"),
            "request header timed out"
        );
        let mut ctx = Ctx::new();
        ctx.refused = Some(Refusal::HeaderTimeout);
        ctx.request_id = forward::new_request_id();
        let (log, metrics) = (&self.shared.access_log, &self.shared.metrics);
        response::log(log, metrics, &ctx, ("-", "-"), 408, 0);
    }
}
