//! `discover`: a pool's members from DNS (all A/AAAA records of a name, e.g. a
//! Kubernetes headless Service), re-resolved every `every`. Membership is reconciled
//! by backend identity, so health and breaker state of pods that stay are kept, and
//! rendezvous hashing moves only the tenants and sessions of pods that come or go.
//! A failed resolution keeps the last known set and is logged.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use portier_config::Discover;
use tokio::task::AbortHandle;

use crate::state::Shared;
use portier_runtime::backend::{BackendKey, Members, Role};

/// Runs one discovery task per pool with `discover`, following reloads.
#[derive(Default)]
pub struct Discoverers {
    running: HashMap<Arc<str>, (AbortHandle, Discover)>,
}

impl Discoverers {
    pub fn reconcile(&mut self, shared: &Arc<Shared>) {
        let snap = shared.snapshot.load();
        let desired: HashMap<Arc<str>, Discover> = snap
            .pools
            .iter()
            .filter_map(|p| p.cfg.discover.clone().map(|d| (p.name.clone(), d)))
            .collect();
        self.running.retain(|name, (handle, cfg)| {
            let keep = desired.get(name) == Some(cfg);
            if !keep {
                handle.abort();
                if !desired.contains_key(name) {
                    shared.discovered.remove(&**name);
                }
            }
            keep
        });
        for (name, cfg) in desired {
            if self.running.contains_key(&name) {
                continue;
            }
            let handle =
                tokio::spawn(run(shared.clone(), name.clone(), cfg.clone())).abort_handle();
            self.running.insert(name, (handle, cfg));
        }
    }
}

fn resolver(cfg: &Discover) -> Result<TokioResolver, String> {
    let mut builder = match cfg.resolver {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(|e| e.to_string())?,
    };
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // Every round asks the server: membership must follow the records, not a cache.
    opts.cache_size = 0;
    opts.timeout = cfg.every.min(std::time::Duration::from_secs(5));
    opts.attempts = 2;
    builder.build().map_err(|e| e.to_string())
}

/// Resolves `cfg.dns` once: every address of its A and AAAA records.
pub async fn resolve(resolver: &TokioResolver, cfg: &Discover) -> Result<BTreeSet<IpAddr>, String> {
    // A trailing dot makes the name absolute: no search-domain expansion.
    let name = format!("{}.", cfg.dns);
    let lookup = resolver
        .lookup_ip(name.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let ips: BTreeSet<IpAddr> = lookup.iter().collect();
    if ips.is_empty() {
        return Err("no A/AAAA records".into());
    }
    Ok(ips)
}

async fn run(shared: Arc<Shared>, pool: Arc<str>, cfg: Discover) {
    let resolver = match resolver(&cfg) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(pool = %pool, error = %e, "cannot set up DNS discovery");
            return;
        }
    };
    let mut known: Option<BTreeSet<IpAddr>> = None;
    loop {
        match resolve(&resolver, &cfg).await {
            Ok(ips) => {
                if known.as_ref() != Some(&ips) {
                    apply(&shared, &pool, &cfg, &ips);
                    tracing::info!(pool = %pool, dns = %cfg.dns, members = ?ips, "discovered pool members");
                    known = Some(ips);
                }
            }
            Err(e) => {
                tracing::warn!(pool = %pool, dns = %cfg.dns, error = %e,
                    "DNS discovery failed; keeping the last known members");
            }
        }
        tokio::time::sleep(cfg.every).await;
    }
}

/// Builds the pool's members from `ips` and installs them (runtime map and the
/// current snapshot).
fn apply(shared: &Arc<Shared>, pool: &Arc<str>, cfg: &Discover, ips: &BTreeSet<IpAddr>) {
    let make = |role: Role, port: u16| {
        ips.iter()
            .map(|ip| {
                shared.registry.get_or_create(
                    BackendKey {
                        pool: pool.clone(),
                        role,
                        addr: SocketAddr::new(*ip, port),
                    },
                    &shared.metrics,
                )
            })
            .collect::<Vec<_>>()
    };
    let members = Arc::new(Members {
        http: make(Role::Http, cfg.http_port),
        longpolling: cfg
            .longpolling_port
            .map(|p| make(Role::Longpolling, p))
            .unwrap_or_default(),
    });
    shared.discovered.insert(pool.to_string(), members.clone());
    let snap = shared.snapshot.load();
    if let Some(p) = snap.pools.iter().find(|p| p.name == *pool) {
        p.members.store(members);
    }
    shared.forget_unused_backends();
}
