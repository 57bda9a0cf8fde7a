//! Per-request state, and what it decides about the request's attempts: which
//! backends are still candidates, whether a request may be sent again, and the
//! breaker bookkeeping of each attempt.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::HeaderValue;
use pingora::proxy::Session;
use portier_config::{Class, Tenant};

use crate::admission;
use crate::backend::{InflightGuard, Role};
use crate::balance;
use crate::breaker;
use crate::limits;
use crate::snapshot::{PoolRt, Snapshot};
use crate::state::RequestGuard;
use crate::telemetry::{Refusal, TenantStats};

/// Per-request state.
pub struct Ctx {
    pub start: Instant,
    pub snap: Option<Arc<Snapshot>>,
    pub tenant: Option<usize>,
    pub tenant_name: Option<Arc<str>>,
    pub stats: Option<Arc<TenantStats>>,
    pub class: Option<Class>,
    /// Kept from the client or generated; shared (not copied) into both headers.
    pub request_id: HeaderValue,
    pub refused: Option<Refusal>,
    /// The backend of the current attempt (its in-flight count held).
    pub backend: Option<InflightGuard>,
    /// Backends already tried for this request.
    pub tried: Vec<SocketAddr>,
    pub attempts: u32,
    /// The current attempt's outcome was fed to the breaker.
    pub outcome_recorded: bool,
    /// A 502-504 answer is being retried on another backend.
    pub retry_on_status: bool,
    /// The current attempt's response head arrived from the worker.
    pub response_started: bool,
    /// The next attempt goes out on a fresh connection, and may go to the backend
    /// whose pooled connection just turned out stale.
    pub retry_fresh: bool,
    /// Attempts that failed on a stale pooled connection (they use up no retry).
    pub stale: u32,
    /// Rendezvous keys: the effective tenant name and the `session_id` cookie.
    pub tenant_hash: u64,
    pub session_hash: Option<u64>,
    pub tls: bool,
    pub websocket: bool,
    /// The body was read completely before a worker was picked.
    pub body_preread: bool,
    /// Keep a copy (a reference) of the received body in `body` (login probes).
    pub keep_body: bool,
    pub body: Option<bytes::Bytes>,
    /// Request body bytes seen so far (for `max_body` on streamed bodies).
    pub body_seen: u64,
    pub client_ip: Option<IpAddr>,
    /// A concurrency slot of the tenant's limit, held until the request ends.
    pub permit: Option<limits::Permit>,
    /// A worker slot of the current attempt's backend (pools with `workers`), held
    /// until the worker's response has been read whole.
    pub slot: Option<admission::Slot>,
    /// Time spent waiting for worker slots.
    pub queued: std::time::Duration,
    /// The worker's response, read ahead of the client.
    pub response: crate::spool::ResponseBuffer,
    /// The encoding the client gets if the response is compressible (`compress`).
    pub encoding: Option<pingora::protocols::http::compression::Algorithm>,
    /// `compress` applies to this request's class and method (its response may vary
    /// by `Accept-Encoding`); false skips the response-side checks entirely.
    pub compressible: bool,
    pub encoder: Option<crate::compress::Encoder>,
    /// The request's part in the asset cache, and the response being captured for it.
    pub cache: crate::assets::CacheState,
    pub capture: Option<crate::assets::Capture>,
    pub guard: Option<RequestGuard>,
}

impl Ctx {
    pub fn new() -> Ctx {
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
            response_started: false,
            retry_fresh: false,
            stale: 0,
            tenant_hash: 0,
            session_hash: None,
            tls: false,
            websocket: false,
            body_preread: false,
            keep_body: false,
            body: None,
            body_seen: 0,
            client_ip: None,
            permit: None,
            slot: None,
            queued: std::time::Duration::ZERO,
            response: Default::default(),
            encoding: None,
            compressible: false,
            encoder: None,
            cache: Default::default(),
            capture: None,
            guard: None,
        }
    }

    pub fn tenant<'a>(&self, snap: &'a Snapshot) -> Option<&'a Tenant> {
        self.tenant.and_then(|t| snap.config.tenants.get(t))
    }

    pub fn pool<'a>(&self, snap: &'a Snapshot) -> Option<&'a Arc<PoolRt>> {
        self.tenant(snap).and_then(|t| snap.pools.get(t.pool))
    }

    /// The Strict-Transport-Security value for a TLS response, if configured.
    pub fn hsts(&self) -> Option<&str> {
        if !self.tls {
            return None;
        }
        self.snap.as_ref()?.config.tls.as_ref()?.hsts.as_deref()
    }

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
        self.attempts.saturating_sub(self.stale) <= self.retries()
    }

    pub fn retries(&self) -> u32 {
        self.snap
            .as_ref()
            .and_then(|s| self.pool(s))
            .map(|p| p.cfg.retries)
            .unwrap_or(0)
    }

    pub fn role(&self) -> Role {
        if self.class == Some(Class::Longpolling) {
            Role::Longpolling
        } else {
            Role::Http
        }
    }

    pub fn want<'a>(&'a self, pool: &PoolRt, now: u64) -> balance::Want<'a> {
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
    pub fn record_outcome(&mut self, ok: bool) {
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
            b.breaker_changed(state);
        }
    }

    /// The name of the request's pool (for metrics).
    pub fn pool_name(&self) -> Option<&str> {
        let snap = self.snap.as_ref()?;
        self.pool(snap).map(|p| &*p.name)
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
