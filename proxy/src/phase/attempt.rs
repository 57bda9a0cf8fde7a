//! A request's attempts at backends (contract "Health and circuit breaking", "Worker
//! slots and the queue"): the backend of each attempt (waiting for a worker slot on
//! pools with `workers`), and what a failed attempt leads to — another attempt on
//! another backend, one on a fresh connection after a stale pooled one, or the end.
//! The decisions (`want`, `may_resend`, `has_alternative`, `record_outcome`) read the
//! request's [`Ctx`] and are here, next to the flow that asks them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};
use portier_config::Class;

use crate::phase::ctx::Ctx;
use crate::snapshot::PoolRt;
use portier_runtime::admission::{self, NoSlot};
use portier_runtime::backend::{Backend, InflightGuard, Role};
use portier_runtime::balance;
use portier_runtime::breaker;
use portier_runtime::telemetry::{Metrics, Refusal, Retry};

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
    let fresh = std::mem::take(&mut ctx.attempt.retry_fresh);
    if fresh {
        ctx.attempt.tried.pop();
    }
    let members = pool.members.load();
    let picked = balance::pick(
        members.list(ctx.role()),
        &pool.rr,
        &ctx.want(pool, breaker::now_ms()),
    );
    let Some(backend) = picked else {
        if ctx.attempt.count == 0 {
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
    ctx.attempt.slot = None;
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
    ctx.attempt.outcome_recorded = false;
    ctx.attempt.retry_on_status = false;
    ctx.attempt.response_started = false;
    ctx.attempt.tried.push(backend.addr());
    ctx.attempt.count += 1;
    let addr = backend.addr();
    ctx.attempt.backend = Some(InflightGuard::new(backend));

    Ok(Box::new(http_peer(ctx, &tenant.settings, addr, fresh)))
}

/// The connection to `addr` for this attempt: the tenant's timeouts for the request's
/// kind, pooled connections reused unless the attempt must go out on a `fresh` one.
fn http_peer(ctx: &Ctx, s: &portier_config::Settings, addr: SocketAddr, fresh: bool) -> HttpPeer {
    let timeout = if ctx.route.websocket {
        s.websocket_idle
    } else if ctx.route.class == Some(Class::Longpolling) {
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
    peer
}

/// A worker slot for the request: on `picked` (the session's backend, or the least
/// busy of the tenant's) if free, else on any backend the request may use (not a
/// session's), else in the pool's queue. Returns the backend of the slot, held in
/// `ctx.attempt.slot`.
async fn worker_slot(
    ctx: &mut Ctx,
    pool: &PoolRt,
    list: &[Arc<Backend>],
    picked: Arc<Backend>,
) -> std::result::Result<Arc<Backend>, Refusal> {
    let cap = pool.cfg.workers;
    let class = ctx.route.class.unwrap_or(Class::Interactive);
    let slots = cap.saturating_mul(list.len() as u32);
    let gate = admission::gate(class, slots, pool.cfg.queue.reserve);
    let granted = if admission::try_acquire(&picked, cap, &pool.queue, gate) {
        picked
    } else {
        let targets = match ctx.route.session_hash {
            Some(_) => vec![picked],
            None => balance::candidates(list, &ctx.want(pool, breaker::now_ms()), &picked),
        };
        let free = match ctx.route.session_hash {
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
                            tenant: ctx.route.tenant_hash,
                        },
                        targets,
                        (cap, gate),
                        *q,
                    )
                    .await;
                ctx.attempt.queued += start.elapsed();
                match waited {
                    Ok(b) => b,
                    Err(NoSlot::Full) => return Err(Refusal::QueueFull),
                    Err(NoSlot::Timeout) => return Err(Refusal::QueueTimeout),
                }
            }
        }
    };
    ctx.attempt.slot = Some(admission::Slot::taken(granted.clone(), pool.queue.clone()));
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
    if ctx.attempt.count <= ctx.retries() && ctx.has_alternative() {
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
    if ctx.response.handover.is_some() {
        // The worker answered and handed a file over: nothing failed, nothing to retry.
        e.set_retry(false);
        return e;
    }
    if ctx.attempt.retry_on_status {
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
        && !ctx.attempt.response_started
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
        && ctx.route.class != Some(Class::Longpolling);
    let resendable =
        ctx.resendable(session) && session.response_written().is_none() && !ctx.route.websocket;
    if !resendable {
        e.set_retry(false);
    } else if closed_early && client_reused && ctx.attempt.stale < MAX_STALE {
        // A pooled connection the worker had closed (Odoo drops idle connections
        // after its socket timeout, and a recycled process drops its own): that says
        // nothing about the worker, so the request goes out again on a fresh
        // connection, to any usable backend (its own included), using up no retry.
        ctx.attempt.stale += 1;
        ctx.attempt.retry_fresh = true;
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
    ctx.attempt.response_started = true;
    if status < 200 && status != 101 {
        return Ok(());
    }
    let failed = (502..=504).contains(&status);
    ctx.record_outcome(!failed);
    if failed && ctx.may_resend(session) && ctx.has_alternative() {
        ctx.attempt.retry_on_status = true;
        let mut e = Error::explain(
            ErrorType::HTTPStatus(status),
            format!("backend answered {status}; retrying on another backend"),
        );
        e.as_up();
        return Err(e);
    }
    Ok(())
}

impl Ctx {
    /// A retry of a request that already reached a worker is allowed: attempts
    /// left, and the request may be sent again ([`Self::resendable`]).
    pub fn may_resend(&self, session: &Session) -> bool {
        self.retry_left() && self.resendable(session)
    }

    /// The request may be sent again at all: an idempotent method, and the whole body
    /// still buffered for a replay. Sending it again after a stale pooled connection
    /// needs only this (it uses up no retry).
    pub fn resendable(&self, session: &Session) -> bool {
        session.req_header().method.is_idempotent() && !session.as_ref().retry_buffer_truncated()
    }

    /// Retries left: attempts beyond the first, less those that met a stale pooled
    /// connection, are within the pool's `retries`.
    pub fn retry_left(&self) -> bool {
        self.attempt.count.saturating_sub(self.attempt.stale) <= self.retries()
    }

    /// The pool's `retries`.
    pub fn retries(&self) -> u32 {
        self.snap
            .as_ref()
            .and_then(|s| self.pool(s))
            .map(|p| p.cfg.retries)
            .unwrap_or(0)
    }

    /// What the balancer is asked for: the tenant's spread, the affinity keys, the
    /// backends already tried left out.
    pub fn want<'a>(&'a self, pool: &PoolRt, now: u64) -> balance::Want<'a> {
        balance::Want {
            spread: if self.role() == Role::Http {
                pool.cfg.spread
            } else {
                0
            },
            tenant: self.route.tenant_hash,
            session: self.route.session_hash,
            exclude: &self.attempt.tried,
            now,
            open_for: pool.cfg.breaker.open_for.as_millis() as u64,
        }
    }

    /// Feeds the current attempt's outcome to its backend's breaker (once).
    pub fn record_outcome(&mut self, ok: bool) {
        if self.attempt.outcome_recorded {
            return;
        }
        self.attempt.outcome_recorded = true;
        let (Some(guard), Some(snap)) = (&self.attempt.backend, &self.snap) else {
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
            b.breaker_changed(state);
        }
    }

    /// True when another usable backend could take a retry of this request.
    pub fn has_alternative(&self) -> bool {
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
