//! The provider: one kube-rs watcher per kind (list, then watch from the last resource
//! version; a watch the server ends with 410 Gone is listed again; reconnects with
//! backoff), all feeding one [`Objects`] store, and a loop that tells the [`Sink`]
//! when the store changed (changes within 50 ms are applied together).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use portier_config::Kubernetes;
use tokio::sync::Notify;

use crate::gateway::{Gateway, GatewayClass, HttpRoute, ReferenceGrant};
use crate::objects::{key_of, Kind, Objects, Stored};

/// What the provider tells the proxy.
pub trait Sink: Send + Sync + 'static {
    /// The objects changed; `endpoints_only`: only EndpointSlices did.
    fn objects_changed(&self, objects: Arc<Objects>, endpoints_only: bool);
}

/// The provider's state, for `/status` and the metric.
#[derive(Default)]
pub struct State {
    pub objects: Mutex<Arc<Objects>>,
    /// Every watcher's last list or watch succeeded.
    pub connected: AtomicBool,
    /// The provider runs (`[kubernetes]` was there at start).
    pub started: AtomicBool,
    /// Watchers that have listed at least once.
    pub synced: AtomicUsize,
    pub last_sync: Mutex<Option<SystemTime>>,
    pub last_error: Mutex<Option<String>>,
    /// The file's configuration, which the objects are merged into.
    pub base: Mutex<Option<Arc<portier_config::Config>>>,
    /// What was applied last.
    pub applied: Mutex<Applied>,
    /// The status each object should have (the status writer's input).
    pub status: Mutex<Arc<crate::translate::Status>>,
    /// Told when `status` changed or the objects did (the writer wakes up).
    pub status_changed: Notify,
    /// Called when the connection state changes.
    pub on_connected: std::sync::OnceLock<Box<dyn Fn(bool) + Send + Sync>>,
}

impl State {
    /// Sets whether every watch is up, and tells the hook (the metric).
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        if let Some(hook) = self.on_connected.get() {
            hook(up);
        }
    }

    pub fn objects(&self) -> Arc<Objects> {
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The client for `[kubernetes]`: its kubeconfig, else the pod's service account,
/// then `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(k: &Kubernetes) -> Result<Client, String> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    Client::try_from(config).map_err(|e| e.to_string())
}

/// What the last translation applied served, its conflicts with the file, and its
/// problems' messages.
#[derive(Default)]
pub struct Applied {
    pub pools: Vec<portier_config::Pool>,
    pub tenants: Vec<portier_config::Tenant>,
    pub certs: Vec<crate::translate::SecretPair>,
    pub conflicts: crate::translate::Conflicts,
    pub problems: Vec<String>,
    /// The Service and port of each pool (an EndpointSlice change needs only these).
    pub services: std::collections::BTreeMap<String, (String, String, i32)>,
}

/// Watches every kind until the task is aborted.
pub async fn run(client: Client, k: Kubernetes, state: Arc<State>, sink: Arc<dyn Sink>) {
    let store = Arc::new(Mutex::new(Objects::default()));
    let changed = Arc::new(Notify::new());
    let dirty = Arc::new(Mutex::new(Dirty::default()));
    let health = Arc::new(Health::default());
    // Three cluster-scoped kinds, seven namespaced ones (one watch per namespace).
    let total = 3 + 7 * k.namespaces.len().max(1);
    health.total.store(total, Ordering::Relaxed);
    let mut watchers = 0;
    let shared = Shared {
        store: store.clone(),
        changed: changed.clone(),
        dirty: dirty.clone(),
        health: health.clone(),
        state: state.clone(),
    };
    macro_rules! watch {
        ($ty:ty, cluster) => {{
            watchers += 1;
            tokio::spawn(watch_kind(
                Api::<$ty>::all(client.clone()),
                None,
                shared.clone(),
            ));
        }};
        ($ty:ty) => {{
            if k.namespaces.is_empty() {
                watchers += 1;
                tokio::spawn(watch_kind(
                    Api::<$ty>::all(client.clone()),
                    None,
                    shared.clone(),
                ));
            } else {
                for ns in &k.namespaces {
                    watchers += 1;
                    let api = Api::<$ty>::namespaced(client.clone(), ns);
                    tokio::spawn(watch_kind(api, Some(ns.clone()), shared.clone()));
                }
            }
        }};
    }
    watch!(GatewayClass, cluster);
    watch!(IngressClass, cluster);
    watch!(Namespace, cluster);
    watch!(Gateway);
    watch!(HttpRoute);
    watch!(ReferenceGrant);
    watch!(Ingress);
    watch!(Service);
    watch!(EndpointSlice);
    watch!(Secret);
    debug_assert_eq!(watchers, total);
    tokio::spawn(probe(client.clone(), state.clone(), health.clone()));
    loop {
        changed.notified().await;
        // Let a burst of events land together.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if state.synced.load(Ordering::Relaxed) < watchers {
            continue; // serve nothing half-listed
        }
        let d = std::mem::take(&mut *dirty.lock().unwrap_or_else(|e| e.into_inner()));
        if !(d.config || d.slices || d.status) {
            continue;
        }
        let snapshot = Arc::new(store.lock().unwrap_or_else(|e| e.into_inner()).clone());
        *state.objects.lock().unwrap_or_else(|e| e.into_inner()) = snapshot.clone();
        if d.config || d.slices {
            sink.objects_changed(snapshot, !d.config);
        }
        // The objects' own status may have changed (the writer compares again).
        state.status_changed.notify_one();
    }
}

/// What changed since the objects were last handed on.
#[derive(Default)]
struct Dirty {
    /// Something translated into the configuration (not only endpoints or status).
    config: bool,
    /// EndpointSlices.
    slices: bool,
    /// Only the status of objects portier writes status to (its own writes coming back).
    status: bool,
}

/// Which watchers are failing.
#[derive(Default)]
struct Health {
    total: AtomicUsize,
    /// When a watcher last failed.
    last_error_at: Mutex<Option<std::time::Instant>>,
}

/// While disconnected, asks the API server its version every second: a resumed watch
/// says nothing until something changes, so this is how portier learns it is back.
/// Connected again once it answers and no watcher has failed for a second. At rest
/// (connected) it sends nothing.
async fn probe(client: Client, state: Arc<State>, health: Arc<Health>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let total = health.total.load(Ordering::Relaxed);
        if state.connected.load(Ordering::Relaxed) || state.synced.load(Ordering::Relaxed) < total {
            continue;
        }
        if client.apiserver_version().await.is_err() {
            continue;
        }
        let quiet = health
            .last_error_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if quiet {
            state.set_connected(true);
            *state.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::info!("the Kubernetes API server is back");
        }
    }
}

/// A watcher failed: disconnected (said once), the error kept for `/status`.
fn lost(health: &Health, state: &State, msg: String) {
    *health
        .last_error_at
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    if state.connected.load(Ordering::Relaxed) {
        state.set_connected(false);
        tracing::error!(error = %msg, "lost the Kubernetes API server; serving the last objects seen");
    }
    *state.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
}

/// What every watcher shares.
#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Objects>>,
    changed: Arc<Notify>,
    dirty: Arc<Mutex<Dirty>>,
    health: Arc<Health>,
    state: Arc<State>,
}

async fn watch_kind<K: Stored>(api: Api<K>, ns: Option<String>, shared: Shared) {
    let Shared {
        store,
        changed,
        dirty,
        health,
        state,
    } = shared;
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut buffer: Vec<K> = Vec::new();
    let mut synced = false;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                lost(&health, &state, format!("{}: {e}", K::KIND.name()));
                continue;
            }
        };
        let mut status_only = false;
        let touched = {
            let mut objects = store.lock().unwrap_or_else(|e| e.into_inner());
            match ev {
                Event::Init => {
                    buffer.clear();
                    false
                }
                Event::InitApply(o) => {
                    buffer.push(o);
                    false
                }
                Event::InitDone => {
                    objects.replace_all(ns.as_deref(), std::mem::take(&mut buffer));
                    if !synced {
                        synced = true;
                        if state.synced.fetch_add(1, Ordering::Relaxed) + 1
                            == health.total.load(Ordering::Relaxed)
                        {
                            state.set_connected(true);
                        }
                    }
                    true
                }
                Event::Apply(mut o) => {
                    crate::objects::slim(&mut o);
                    status_only = K::map(&mut objects)
                        .get(&key_of(&o))
                        .is_some_and(|old| K::same_but_status(old, &o));
                    objects.put(o);
                    true
                }
                Event::Delete(o) => {
                    objects.remove::<K>(&key_of(&o));
                    true
                }
            }
        };
        if touched {
            *state.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
            let mut d = dirty.lock().unwrap_or_else(|e| e.into_inner());
            if status_only {
                d.status = true;
            } else if K::KIND == Kind::EndpointSlice {
                d.slices = true;
            } else {
                d.config = true;
            }
            drop(d);
            changed.notify_one();
        }
    }
}
