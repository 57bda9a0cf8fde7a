//! The two kinds of state (DESIGN.md): the immutable config [`Snapshot`], swapped
//! atomically on reload, and long-lived runtime state keyed by stable identity
//! ([`Backend`]s in the [`Registry`]), which a reload reconciles instead of rebuilding.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use portier_config::{Config, Pool};

use crate::admission::PoolQueue;
use crate::backend::{BackendKey, Members, Registry, Role};
use crate::telemetry::{Metrics, TenantStats};

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
    /// The tenant's limiters, resolved on its first limited request.
    pub limiter: OnceLock<Arc<crate::limits::TenantLimiter>>,
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
            dbfilter: http::HeaderValue::try_from(crate::forward::dbfilter_for(db)).ok()?,
        })
    }
}

/// Everything a request needs from the configuration, swapped as one.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub pools: Vec<Arc<PoolRt>>,
    pub tenants: Vec<TenantRt>,
    pub loaded_at: SystemTime,
}

impl Snapshot {
    /// Compiles a validated config against the long-lived runtime state.
    /// `discovered` holds the current members of pools with `discover`.
    pub fn build(
        config: Config,
        registry: &Registry,
        metrics: &Metrics,
        discovered: &DashMap<String, Arc<Members>>,
    ) -> Snapshot {
        let pools = config
            .pools
            .iter()
            .map(|p| {
                metrics.declare_pool(&p.name);
                let name: Arc<str> = Arc::from(p.name.as_str());
                if p.discover.is_some() {
                    let members = discovered
                        .get(&p.name)
                        .map(|m| m.clone())
                        .unwrap_or_default();
                    return Arc::new(PoolRt {
                        queue: registry.queue(&name, metrics),
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
                    queue: registry.queue(&name, metrics),
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

/// Outcome of the last reload, for `/status`.
#[derive(Clone, Debug, Default)]
pub struct ReloadStatus {
    pub last_error: Option<String>,
}

/// Process-wide state shared by the data plane and the control plane.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: Registry,
    pub metrics: Metrics,
    /// Per-tenant rate and concurrency limiters (survive reloads).
    pub limits: crate::limits::Limits,
    /// Per-address login limiters (survive reloads).
    pub login: crate::edge::LoginLimits,
    /// `[cluster]`: the Redis that rate limits are shared through (maintained by
    /// `cluster::supervise` on the control thread).
    pub cluster: arc_swap::ArcSwapOption<crate::cluster::Cluster>,
    /// ACME's hosts and account (survive reloads).
    pub acme: crate::acme::AcmeState,
    /// Cached asset bundles (survive reloads).
    pub assets: Arc<crate::assets::AssetCache>,
    /// Bumped after each applied reload (WebSockets of tenants entering maintenance
    /// watch it).
    pub reloaded: tokio::sync::watch::Sender<u64>,
    /// The TLS certificates, served through the SNI resolver.
    pub certs: Arc<portier_certs::CertStore>,
    /// Summary of the certificate directory at the last load (change detection).
    pub cert_fingerprint: Mutex<u64>,
    pub access_log: crate::access_log::AccessLog,
    /// Listeners are bound and the config is loaded.
    pub ready: AtomicBool,
    /// SIGTERM/SIGINT received.
    pub draining: AtomicBool,
    /// Requests between `request_filter` and `logging`.
    pub inflight: AtomicU64,
    pub reload_status: Mutex<ReloadStatus>,
    /// Current members of pools with `discover`, by pool name (survives reloads).
    pub discovered: DashMap<String, Arc<Members>>,
    /// The file reloads read; `None` for the demo's embedded config.
    pub config_path: Option<std::path::PathBuf>,
}

impl Shared {
    pub fn new(config: Config, config_path: Option<std::path::PathBuf>) -> Arc<Shared> {
        let metrics = Metrics::new();
        let registry = Registry::default();
        let access = config.log.access;
        let assets = crate::assets::AssetCache::new(config.defaults.cache_assets);
        let discovered = DashMap::new();
        let snapshot = Snapshot::build(config, &registry, &metrics, &discovered);
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry,
            metrics,
            limits: Default::default(),
            login: Default::default(),
            cluster: arc_swap::ArcSwapOption::empty(),
            acme: Default::default(),
            assets,
            reloaded: tokio::sync::watch::Sender::new(0),
            certs: Arc::new(portier_certs::CertStore::new()),
            cert_fingerprint: Mutex::new(0),
            access_log: crate::access_log::AccessLog::new(access),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            inflight: AtomicU64::new(0),
            reload_status: Mutex::new(ReloadStatus::default()),
            discovered,
            config_path,
        })
    }

    /// Forgets backends that no pool of the current snapshot has (once their
    /// requests are done); their metric series go with them.
    pub fn forget_unused_backends(&self) {
        let snap = self.snapshot.load();
        self.registry.retain(
            |k| {
                snap.pools.iter().any(|p| {
                    *p.name == *k.pool && {
                        let m = p.members.load();
                        m.http
                            .iter()
                            .chain(m.longpolling.iter())
                            .any(|b| b.key == *k)
                    }
                })
            },
            &self.metrics,
        );
    }
}

/// Counts a request as in flight for the drain; decrements when dropped.
pub struct RequestGuard(Arc<Shared>);

impl RequestGuard {
    pub fn new(shared: &Arc<Shared>) -> Self {
        shared.inflight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(shared.clone())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// This process among replicas (lock owners, announcements): `HOSTNAME:PID`.
pub fn replica_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}:{}", host.trim(), std::process::id())
    })
}
