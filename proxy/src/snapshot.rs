//! The configuration as a request sees it: an immutable [`Snapshot`] compiled from a
//! validated [`Config`] against the long-lived runtime state ([`Backend`]s by identity,
//! each pool's queue), swapped atomically on reload. A request loads it once and keeps
//! that `Arc` to its end, so a reload never changes a request half-way.
//!
//! [`Backend`]: portier_runtime::backend::Backend

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use portier_config::{Config, Health, Pool};

use portier_runtime::admission::{PoolQueue, Queues};
use portier_runtime::backend::{BackendKey, Members, Registry, Role};
use portier_runtime::telemetry::{Metrics, TenantStats};

/// A pool in a snapshot.
pub struct PoolRt {
    pub name: Arc<str>,
    pub cfg: Pool,
    pub members: ArcSwap<Members>,
    /// Round-robin cursor for breaking least-in-flight ties.
    pub rr: AtomicUsize,
    /// Requests waiting for a worker slot (long-lived per pool name).
    pub queue: Arc<PoolQueue>,
}

/// A tenant in a snapshot.
pub struct TenantRt {
    pub name: Arc<str>,
    /// Metric handles for exact-host tenants, resolved on the tenant's first request
    /// (template tenants resolve theirs per captured name).
    pub stats: OnceLock<Arc<TenantStats>>,
    /// The tenant's live figures, resolved on its first request (exact-host tenants).
    pub live: OnceLock<Arc<portier_runtime::live::Live>>,
    /// The tenant's limiters, resolved on its first limited request.
    pub limiter: OnceLock<Arc<portier_runtime::limits::TenantLimiter>>,
    /// The database headers of a tenant whose database name is fixed, built once.
    pub database: Option<DatabaseHeaders>,
}

/// The values of `X-Odoo-Database` and `X-Odoo-dbfilter` for one database.
pub struct DatabaseHeaders {
    pub database: http::HeaderValue,
    pub dbfilter: http::HeaderValue,
}

impl DatabaseHeaders {
    pub fn new(db: &str) -> Option<DatabaseHeaders> {
        Some(DatabaseHeaders {
            database: http::HeaderValue::from_str(db).ok()?,
            dbfilter: http::HeaderValue::try_from(crate::io::forward::dbfilter_for(db)).ok()?,
        })
    }
}

/// A pool with worker slots shows its queue's series from the start; one without
/// never queues.
fn declared(queue: Arc<PoolQueue>, p: &Pool) -> Arc<PoolQueue> {
    if p.workers > 0 {
        queue.declare();
    }
    queue
}

/// Everything a request needs from the configuration, swapped as one.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub pools: Vec<Arc<PoolRt>>,
    pub tenants: Vec<TenantRt>,
    pub loaded_at: SystemTime,
}

impl Snapshot {
    /// Each pool's members and its `health` settings (what the active checks follow).
    pub fn health_targets(&self) -> Vec<(Arc<Members>, Option<&Health>)> {
        self.pools
            .iter()
            .map(|p| (p.members.load_full(), p.cfg.health.as_ref()))
            .collect()
    }

    /// Compiles a validated config against the long-lived runtime state.
    /// `discovered` holds the current members of pools with `discover`.
    pub fn build(
        config: Config,
        registry: &Registry,
        queues: &Queues,
        metrics: &Metrics,
        discovered: &DashMap<String, Arc<Members>>,
    ) -> Snapshot {
        let pools = config
            .pools
            .iter()
            .map(|p| {
                metrics.declare_pool(&p.name);
                let name: Arc<str> = Arc::from(p.name.as_str());
                // Members found at run time (DNS `discover`, Kubernetes endpoints).
                if p.discover.is_some() || p.provided {
                    let members = discovered
                        .get(&p.name)
                        .map(|m| m.clone())
                        .unwrap_or_default();
                    return Arc::new(PoolRt {
                        queue: declared(queues.get(&name, metrics), p),
                        name,
                        cfg: p.clone(),
                        members: ArcSwap::new(members),
                        rr: AtomicUsize::new(0),
                    });
                }
                let members = Members {
                    http: p
                        .http
                        .iter()
                        .map(|a| {
                            registry.get_or_create(
                                BackendKey {
                                    pool: name.clone(),
                                    role: Role::Http,
                                    addr: *a,
                                },
                                metrics,
                            )
                        })
                        .collect(),
                    longpolling: p
                        .longpolling
                        .iter()
                        .map(|a| {
                            registry.get_or_create(
                                BackendKey {
                                    pool: name.clone(),
                                    role: Role::Longpolling,
                                    addr: *a,
                                },
                                metrics,
                            )
                        })
                        .collect(),
                };
                Arc::new(PoolRt {
                    queue: declared(queues.get(&name, metrics), p),
                    name,
                    cfg: p.clone(),
                    members: ArcSwap::from_pointee(members),
                    rr: AtomicUsize::new(0),
                })
            })
            .collect();
        let tenants = config
            .tenants
            .iter()
            .map(|t| TenantRt {
                name: Arc::from(t.name.as_str()),
                stats: OnceLock::new(),
                live: OnceLock::new(),
                limiter: OnceLock::new(),
                database: t
                    .database
                    .as_deref()
                    .filter(|d| !d.contains("{tenant}"))
                    .and_then(DatabaseHeaders::new),
            })
            .collect();
        Snapshot {
            config: Arc::new(config),
            pools,
            tenants,
            loaded_at: SystemTime::now(),
        }
    }
}
