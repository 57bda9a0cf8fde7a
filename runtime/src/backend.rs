//! Backends: long-lived runtime state keyed by stable identity (`pool`, `role`,
//! `address`), kept in the [`Registry`] across reloads, and the current [`Members`]
//! of a pool.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use crate::breaker::{Breaker, BreakerState, HealthState};
use crate::hash::backend_hash;
use crate::telemetry::{BackendStats, Metrics};

/// Which list of a pool a backend is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Http,
    Longpolling,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Http => "http",
            Role::Longpolling => "longpolling",
        }
    }
}

/// Stable identity of a backend across reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pool: Arc<str>,
    pub role: Role,
    pub addr: SocketAddr,
}

/// One Odoo worker port and what portier knows about it.
pub struct Backend {
    pub key: BackendKey,
    /// `addr` as text, for logs and labels (formatted once).
    pub addr_str: Arc<str>,
    /// Identity in rendezvous hashing.
    pub hash: u64,
    pub inflight: AtomicU64,
    /// Worker slots taken (`admission.rs`).
    pub busy: AtomicU32,
    pub health: HealthState,
    pub breaker: Breaker,
    pub stats: BackendStats,
}

impl Backend {
    /// Applies a health transition to a backend's metric and logs it.
    pub fn health_changed(&self, up: bool) {
        self.stats.up.set(i64::from(up));
        if up {
            tracing::info!(pool = %self.key.pool, backend = %self.addr_str, role = self.key.role.as_str(), "backend is up");
        } else {
            tracing::warn!(pool = %self.key.pool, backend = %self.addr_str, role = self.key.role.as_str(), "backend is down (health checks failing)");
        }
    }

    /// Applies a breaker transition to a backend's metric and logs it.
    pub fn breaker_changed(&self, state: BreakerState) {
        self.stats
            .breaker_open
            .set(i64::from(state != BreakerState::Closed));
        match state {
            BreakerState::Open => {
                tracing::warn!(pool = %self.key.pool, backend = %self.addr_str, "circuit breaker opened")
            }
            BreakerState::Closed => {
                tracing::info!(pool = %self.key.pool, backend = %self.addr_str, "circuit breaker closed")
            }
            BreakerState::HalfOpen => {}
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.key.addr
    }
}

/// Decrements a backend's in-flight counter when dropped.
pub struct InflightGuard(pub Arc<Backend>);

impl InflightGuard {
    pub fn new(b: Arc<Backend>) -> Self {
        b.inflight.fetch_add(1, Ordering::Relaxed);
        b.stats.inflight.inc();
        InflightGuard(b)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.stats.inflight.dec();
    }
}

/// Every backend portier has seen, by identity; they survive reloads.
#[derive(Default)]
pub struct Registry {
    backends: DashMap<BackendKey, Arc<Backend>>,
}

impl Registry {
    pub fn get_or_create(&self, key: BackendKey, metrics: &Metrics) -> Arc<Backend> {
        if let Some(b) = self.backends.get(&key) {
            return b.clone();
        }
        self.backends
            .entry(key.clone())
            .or_insert_with(|| {
                let addr_str: Arc<str> = Arc::from(key.addr.to_string());
                Arc::new(Backend {
                    stats: metrics.backend_stats(&key.pool, &addr_str),
                    hash: backend_hash(&key.addr),
                    key,
                    addr_str,
                    inflight: AtomicU64::new(0),
                    busy: AtomicU32::new(0),
                    health: Default::default(),
                    breaker: Default::default(),
                })
            })
            .clone()
    }

    /// Forgets backends no longer referenced by any pool (their metrics series go too).
    pub fn retain(&self, keep: impl Fn(&BackendKey) -> bool, metrics: &Metrics) {
        self.backends.retain(|k, b| {
            let kept = keep(k) || b.inflight.load(Ordering::Relaxed) > 0;
            if !kept {
                metrics.remove_backend(&k.pool, &b.addr_str);
            }
            kept
        });
    }
}

/// The current members of a pool (replaced as a whole when membership changes).
#[derive(Default)]
pub struct Members {
    pub http: Vec<Arc<Backend>>,
    pub longpolling: Vec<Arc<Backend>>,
}

impl Members {
    pub fn list(&self, role: Role) -> &[Arc<Backend>] {
        match role {
            Role::Http => &self.http,
            // A pool without a gevent port serves longpolling from its http workers.
            Role::Longpolling if self.longpolling.is_empty() => &self.http,
            Role::Longpolling => &self.longpolling,
        }
    }
}
