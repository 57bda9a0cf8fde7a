//! Per-request state, as data: what the phases found out about the request and what
//! they hold for it, in groups owned by the phase that fills them — the route
//! (`request`), the attempts at backends (`attempt`, which also holds the decisions
//! about them), the request body (`body`) and the response on its way back
//! (`response`). Nothing here decides anything beyond reading the snapshot.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use pingora::protocols::http::compression::Algorithm;
use portier_config::{Class, Tenant};

use crate::io::assets::{CacheState, Capture};
use crate::io::compress::Encoder;
use crate::io::filestore::Handover;
use crate::io::spool::ResponseBuffer;
use crate::snapshot::{PoolRt, Snapshot};
use portier_runtime::admission::Slot;
use portier_runtime::backend::{InflightGuard, Role};
use portier_runtime::limits::Permit;
use portier_runtime::live::Live;
use portier_runtime::telemetry::{Refusal, TenantStats};

/// Per-request state.
pub struct Ctx {
    /// When the request's header had arrived (`request_filter`).
    pub start: Instant,
    /// The configuration the request sees from start to end.
    pub snap: Option<Arc<Snapshot>>,
    /// Counts the request in flight for the drain.
    pub guard: Option<RequestGuard>,
    /// Kept from the client or generated; shared (not copied) into both headers.
    pub request_id: HeaderValue,
    pub tls: bool,
    pub client_ip: Option<IpAddr>,
    /// Why portier answered the request itself, if it did.
    pub refused: Option<Refusal>,
    /// A concurrency slot of the tenant's limit, held until the request ends.
    pub permit: Option<Permit>,
    pub route: Route,
    pub attempt: Attempt,
    pub body: RequestBody,
    pub response: ResponseState,
}

/// Where the request goes: its tenant, class and affinity keys (`request`).
#[derive(Default)]
pub struct Route {
    /// The tenant's position in the snapshot's tenants.
    pub tenant: Option<usize>,
    /// The effective tenant name (a template's captured label).
    pub tenant_name: Option<Arc<str>>,
    pub stats: Option<Arc<TenantStats>>,
    /// The tenant's figures over the last minute (`/status/tenants`).
    pub live: Option<Arc<Live>>,
    pub class: Option<Class>,
    /// The request's pool (in the snapshot's pools): the tenant's, or for an HTTP
    /// request its longest matching route's.
    pub pool: Option<usize>,
    pub websocket: bool,
    /// Rendezvous keys: the effective tenant name and the `session_id` cookie.
    pub tenant_hash: u64,
    pub session_hash: Option<u64>,
}

/// The request's attempts at backends (`attempt`).
#[derive(Default)]
pub struct Attempt {
    /// The backend of the current attempt (its in-flight count held).
    pub backend: Option<InflightGuard>,
    /// Backends already tried for this request.
    pub tried: Vec<SocketAddr>,
    /// Attempts made, every one counted (the access log's `attempts`).
    pub count: u32,
    /// Attempts that failed on a stale pooled connection (they use up no retry).
    pub stale: u32,
    /// The current attempt's outcome was fed to the breaker.
    pub outcome_recorded: bool,
    /// A 502-504 answer is being retried on another backend.
    pub retry_on_status: bool,
    /// The current attempt's response head arrived from the worker.
    pub response_started: bool,
    /// The next attempt goes out on a fresh connection, and may go to the backend
    /// whose pooled connection just turned out stale.
    pub retry_fresh: bool,
    /// A worker slot of the current attempt's backend (pools with `workers`), held
    /// until the worker's response has been read whole.
    pub slot: Option<Slot>,
    /// Time spent waiting for worker slots.
    pub queued: Duration,
}

/// The request body as received before a worker is picked (`body`).
#[derive(Default)]
pub struct RequestBody {
    /// The body was read completely before a worker was picked.
    pub preread: bool,
    /// Keep a copy (a reference) of the received body in `kept` (login probes).
    pub keep: bool,
    pub kept: Option<Bytes>,
    /// Request body bytes seen so far (for `max_body` on streamed bodies).
    pub seen: u64,
}

/// The response on its way back (`response`): read ahead of the client, compressed,
/// captured for the asset cache.
#[derive(Default)]
pub struct ResponseState {
    /// The worker's response, read ahead of the client.
    pub buffer: ResponseBuffer,
    /// The encoding the client gets if the response is compressible (`compress`).
    pub encoding: Option<Algorithm>,
    /// `compress` applies to this request's class and method (its response may vary
    /// by `Accept-Encoding`); false skips the response-side checks entirely.
    pub compressible: bool,
    pub encoder: Option<Encoder>,
    /// The request's part in the asset cache, and the response being captured for it.
    pub cache: CacheState,
    /// Boxed: only an asset-cache miss captures, and every request holds this state.
    pub capture: Option<Box<Capture>>,
    /// The worker handed a file over (`X-Accel-Redirect`): what the client gets instead.
    pub handover: Option<Handover>,
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx::new()
    }
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx {
            start: Instant::now(),
            snap: None,
            guard: None,
            request_id: HeaderValue::from_static(""),
            tls: false,
            client_ip: None,
            refused: None,
            permit: None,
            route: Route::default(),
            attempt: Attempt::default(),
            body: RequestBody::default(),
            response: ResponseState::default(),
        }
    }

    pub fn tenant<'a>(&self, snap: &'a Snapshot) -> Option<&'a Tenant> {
        self.route.tenant.and_then(|t| snap.config.tenants.get(t))
    }

    /// The request's pool: its route's (see [`Route::pool`]), else its tenant's.
    pub fn pool<'a>(&self, snap: &'a Snapshot) -> Option<&'a Arc<PoolRt>> {
        match self.route.pool {
            Some(p) => snap.pools.get(p),
            None => self.tenant(snap).and_then(|t| snap.pools.get(t.pool)),
        }
    }

    /// The name of the request's pool (for metrics).
    pub fn pool_name(&self) -> Option<&str> {
        let snap = self.snap.as_ref()?;
        self.pool(snap).map(|p| &*p.name)
    }

    /// The Strict-Transport-Security value for a TLS response, if configured.
    pub fn hsts(&self) -> Option<&str> {
        if !self.tls {
            return None;
        }
        self.snap.as_ref()?.config.tls.as_ref()?.hsts.as_deref()
    }

    /// Which list of the pool serves the request.
    pub fn role(&self) -> Role {
        if self.route.class == Some(Class::Longpolling) {
            Role::Longpolling
        } else {
            Role::Http
        }
    }
}

/// Counts a request as in flight (for the drain) until it is dropped with its context.
pub struct RequestGuard(Arc<AtomicU64>);

impl RequestGuard {
    pub fn new(inflight: &Arc<AtomicU64>) -> Self {
        inflight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(inflight.clone())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request in flight holds its context, a held longpoll or an open WebSocket
    /// for its whole life: what only some responses need (a spool file, an asset
    /// capture) is boxed, and the context stays within mimalloc's 640-byte size class
    /// (it was 1 104 bytes with those inline).
    #[test]
    fn the_request_context_stays_small() {
        let size = std::mem::size_of::<Ctx>();
        assert!(size <= 640, "the request context is {size} bytes");
    }
}
