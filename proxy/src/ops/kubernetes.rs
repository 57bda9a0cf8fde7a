//! `[kubernetes]` on the control side: starts the provider, turns each change of the
//! objects into the running configuration (the file's, merged with the objects'), and
//! keeps the endpoints, certificates and `/status` up to date.
//!
//! A change of pools or tenants builds a new snapshot (as a reload does, without one);
//! a change of endpoints only replaces the members of the pools whose endpoints changed
//! (as `discover` does): the snapshot stays, and rendezvous hashing moves only the
//! tenants and sessions that were on the endpoints that went.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use portier_config::{Config, Pool, Tenant};
use portier_k8s::provider::{self, Sink};
use portier_k8s::translate::{Endpoints, SecretPair};
use portier_k8s::Objects;
use portier_runtime::backend::{BackendKey, Members, Role};

use crate::state::Shared;

/// Starts the provider when the configuration has `[kubernetes]`.
pub async fn run(shared: Arc<Shared>) {
    let Some(k) = shared.snapshot.load().config.kubernetes.clone() else {
        return;
    };
    shared.metrics.register_kubernetes();
    let state = shared.kubernetes.clone();
    state.started.store(true, Ordering::Relaxed);
    // At start the snapshot's configuration is the file's alone.
    *state.base.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(shared.snapshot.load().config.clone());
    let client = loop {
        match provider::client(&k).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the Kubernetes client; trying again in 5 s");
                *state.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    };
    let gauge = shared.metrics.kubernetes_connected.clone();
    let _ = state
        .on_connected
        .set(Box::new(move |up| gauge.set(i64::from(up))));
    tokio::spawn(portier_k8s::writer::run(
        client.clone(),
        k.clone(),
        state.clone(),
    ));
    let sink: Arc<dyn Sink> = Arc::new(Apply(shared.clone()));
    provider::run(client, k, state, sink).await;
}

struct Apply(Arc<Shared>);

impl Sink for Apply {
    fn objects_changed(&self, objects: Arc<Objects>, endpoints_only: bool) {
        if endpoints_only {
            // Only EndpointSlices changed: the members of the pools, nothing else.
            let services = self
                .0
                .kubernetes
                .applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .services
                .clone();
            install_endpoints(
                &self.0,
                &portier_k8s::translate::endpoints(&objects, &services),
            );
            return;
        }
        apply(&self.0, &objects);
    }
}

/// The configuration to run: the file's `file`, merged with the last objects seen
/// (a reload calls this; the file is remembered for the next change of objects).
pub fn compose(shared: &Arc<Shared>, file: Config) -> Config {
    if file.kubernetes.is_none() {
        return file;
    }
    let state = &shared.kubernetes;
    *state.base.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(file.clone()));
    let t = translate(&file, &state.objects());
    install_endpoints(shared, &t.endpoints);
    install_certs(shared, &t.certs);
    merge_and_record(shared, file, t)
}

fn translate(file: &Config, objects: &Objects) -> portier_k8s::Translation {
    let k = file.kubernetes.clone().unwrap_or_default();
    let redirect = file.tls.as_ref().is_some_and(|t| t.redirect_http);
    portier_k8s::translate(objects, &k, &file.defaults, redirect)
}

/// Applies a change of the objects: endpoints and certificates in place; a new
/// snapshot only when the pools or tenants served changed.
fn apply(shared: &Arc<Shared>, objects: &Objects) {
    let state = &shared.kubernetes;
    let Some(file) = state.base.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
        return;
    };
    let mut t = translate(&file, objects);
    install_endpoints(shared, &t.endpoints);
    let (same, certs_same, conflicts) = {
        let a = state.applied.lock().unwrap_or_else(|e| e.into_inner());
        (
            t.serves_as(&a.pools, &a.tenants, &a.certs),
            a.certs == t.certs,
            a.conflicts.clone(),
        )
    };
    if !certs_same {
        install_certs(shared, &t.certs);
    }
    if same {
        // Endpoints, or nothing served, changed: the snapshot stays.
        portier_k8s::mark_conflicts(&mut t, &conflicts);
        record(shared, &t, None);
        return;
    }
    let config = merge_and_record(shared, (*file).clone(), t);
    let tenants = config.tenants.len();
    crate::ops::reload::swap_in(shared, config);
    shared.forget_unused_backends();
    tracing::info!(
        tenants,
        objects = objects.len(),
        "Kubernetes objects applied"
    );
}

/// Merges `t` into the file's configuration and records what it serves.
fn merge_and_record(shared: &Shared, file: Config, t: portier_k8s::Translation) -> Config {
    let served = (t.pools.clone(), t.tenants.clone(), t.certs.clone());
    let services = t.services.clone();
    let (config, t, conflicts) = portier_k8s::merge(file, t);
    record(shared, &t, Some((served, conflicts)));
    shared
        .kubernetes
        .applied
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .services = services;
    config
}

/// The certificates of the Secrets, installed in the store (a bad pair keeps the
/// previous one).
fn install_certs(shared: &Shared, certs: &[SecretPair]) {
    let pairs: Vec<(String, Vec<u8>, Vec<u8>)> = certs
        .iter()
        .map(|c| (c.name.clone(), c.crt.clone(), c.key.clone()))
        .collect();
    for (name, e) in shared.certs.set_provided(&pairs) {
        tracing::error!(secret = %name, error = %e, "certificate of a Secret rejected; the previous one (if any) stays in use");
    }
    crate::ops::tls::update_expiry(shared);
}

type Served = (Vec<Pool>, Vec<Tenant>, Vec<SecretPair>);

/// Remembers what was applied (`served`, when a new configuration was built) and the
/// status to write; logs problems that are new.
fn record(
    shared: &Shared,
    t: &portier_k8s::Translation,
    served: Option<(Served, portier_k8s::Conflicts)>,
) {
    let messages: Vec<String> = t
        .problems
        .iter()
        .chain(t.warnings.iter())
        .map(|p| format!("{}: {}", p.object, p.message))
        .collect();
    let mut applied = shared
        .kubernetes
        .applied
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for m in messages.iter().filter(|m| !applied.problems.contains(m)) {
        tracing::warn!(problem = %m, "Kubernetes object not (fully) served");
    }
    applied.problems = messages;
    if let Some(((pools, tenants, certs), conflicts)) = served {
        applied.pools = pools;
        applied.tenants = tenants;
        applied.certs = certs;
        applied.conflicts = conflicts;
    }
    drop(applied);
    let mut cur = shared
        .kubernetes
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if **cur != t.status {
        *cur = Arc::new(t.status.clone());
        shared.kubernetes.status_changed.notify_one();
    }
}

/// Each provided pool's members, by identity (a backend that stays keeps its health,
/// breaker and in-flight count); only pools whose endpoints changed are touched.
fn install_endpoints(shared: &Arc<Shared>, endpoints: &BTreeMap<String, Endpoints>) {
    let snap = shared.snapshot.load();
    let mut changed = false;
    for (pool, eps) in endpoints {
        let name: Arc<str> = Arc::from(pool.as_str());
        let same = shared.discovered.get(pool).is_some_and(|m| {
            m.http
                .iter()
                .map(|b| b.key.addr)
                .eq(eps.http.iter().copied())
                && m.longpolling
                    .iter()
                    .map(|b| b.key.addr)
                    .eq(eps.longpolling.iter().copied())
        });
        if same {
            continue;
        }
        let make = |role: Role, addrs: &[std::net::SocketAddr]| {
            addrs
                .iter()
                .map(|a| {
                    shared.registry.get_or_create(
                        BackendKey {
                            pool: name.clone(),
                            role,
                            addr: *a,
                        },
                        &shared.metrics,
                    )
                })
                .collect::<Vec<_>>()
        };
        let members = Arc::new(Members {
            http: make(Role::Http, &eps.http),
            longpolling: make(Role::Longpolling, &eps.longpolling),
        });
        shared.discovered.insert(pool.clone(), members.clone());
        if let Some(p) = snap.pools.iter().find(|p| *p.name == *pool) {
            p.members.store(members);
        }
        tracing::info!(pool = %pool, http = ?eps.http, longpolling = ?eps.longpolling, "endpoints changed");
        changed = true;
    }
    if changed {
        shared.forget_unused_backends();
    }
}

/// `/status` `kubernetes`.
pub fn status_json(shared: &Shared) -> serde_json::Value {
    let s = &shared.kubernetes;
    let last_sync = s
        .last_sync
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string());
    serde_json::json!({
        "connected": s.connected.load(Ordering::Relaxed),
        "objects": s.objects().len(),
        "last_sync": last_sync,
        "last_error": s.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        "problems": s.applied.lock().unwrap_or_else(|e| e.into_inner()).problems.clone(),
    })
}
