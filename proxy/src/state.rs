//! The process's state, shared by the data plane and the control plane: the current
//! [`Snapshot`] (swapped atomically on reload) and the long-lived runtime state that
//! survives reloads, each part owned by the module that defines it (backends and
//! queues, limits, the asset cache, ACME, cluster, certificates, telemetry). Phases
//! take the parts they need; the control side (reload, admin, background tasks) holds
//! the whole.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use portier_config::Config;

use crate::snapshot::Snapshot;
use portier_runtime::admission::Queues;
use portier_runtime::backend::{Members, Registry};
use portier_runtime::telemetry::Metrics;

/// Outcome of the last reload, for `/status`.
#[derive(Clone, Debug, Default)]
pub struct ReloadStatus {
    pub last_error: Option<String>,
}

/// Process-wide state shared by the data plane and the control plane.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: Registry,
    /// Every pool's worker queue (survive reloads).
    pub queues: Queues,
    pub metrics: Metrics,
    /// Each tenant's figures over the last minute (`/status/tenants`; survive reloads).
    pub live: portier_runtime::live::LiveTenants,
    /// Per-tenant rate and concurrency limiters (survive reloads).
    pub limits: portier_runtime::limits::Limits,
    /// Per-address login limiters (survive reloads).
    pub login: portier_runtime::limits::LoginLimits,
    /// `[cluster]`: the Redis that rate limits are shared through (maintained by
    /// `cluster::supervise` on the control thread).
    pub cluster: arc_swap::ArcSwapOption<portier_runtime::cluster::Cluster>,
    /// ACME's hosts and account (survive reloads).
    pub acme: crate::acme::AcmeState,
    /// Cached asset bundles (survive reloads).
    pub assets: Arc<crate::io::assets::AssetCache>,
    /// Bumped after each applied reload (WebSockets of tenants entering maintenance
    /// watch it).
    pub reloaded: tokio::sync::watch::Sender<u64>,
    /// The TLS certificates, served through the SNI resolver.
    pub certs: Arc<portier_certs::CertStore>,
    /// Summary of the certificate directory at the last load (change detection).
    pub cert_fingerprint: Mutex<u64>,
    pub access_log: portier_runtime::access_log::AccessLog,
    /// Listeners are bound and the config is loaded.
    pub ready: AtomicBool,
    /// SIGTERM/SIGINT received.
    pub draining: AtomicBool,
    /// Requests between `request_filter` and `logging` (each holds a `RequestGuard`).
    pub inflight: Arc<AtomicU64>,
    pub reload_status: Mutex<ReloadStatus>,
    /// Current members of pools with `discover`, by pool name (survives reloads).
    pub discovered: DashMap<String, Arc<Members>>,
    /// `[kubernetes]`: the objects seen, the connection, the status to write.
    pub kubernetes: Arc<portier_k8s::provider::State>,
    /// The file reloads read; `None` for the demo's embedded config.
    pub config_path: Option<std::path::PathBuf>,
}

impl Shared {
    pub fn new(config: Config, config_path: Option<std::path::PathBuf>) -> Arc<Shared> {
        let metrics = Metrics::new();
        let registry = Registry::default();
        let queues = Queues::default();
        let access = config.log.access;
        let assets = crate::io::assets::AssetCache::new(config.defaults.cache_assets);
        let discovered = DashMap::new();
        let snapshot = Snapshot::build(config, &registry, &queues, &metrics, &discovered);
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry,
            queues,
            metrics,
            live: Default::default(),
            limits: Default::default(),
            login: Default::default(),
            cluster: arc_swap::ArcSwapOption::empty(),
            acme: Default::default(),
            assets,
            reloaded: tokio::sync::watch::Sender::new(0),
            certs: Arc::new(portier_certs::CertStore::new()),
            cert_fingerprint: Mutex::new(0),
            access_log: portier_runtime::access_log::AccessLog::new(access),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            inflight: Arc::default(),
            reload_status: Mutex::new(ReloadStatus::default()),
            discovered,
            kubernetes: Arc::default(),
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
