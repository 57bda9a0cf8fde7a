//! A Kubernetes API server stand-in for the end-to-end tests and the bench: it speaks the real
//! protocol over HTTP/1.1 on 127.0.0.1, so the real kube-rs client inside portier (and
//! `kubectl`) run against it unmodified. What it implements:
//!
//! - discovery (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/GROUP/VERSION`);
//! - get, list (with the collection's `resourceVersion`), create, replace (optimistic
//!   concurrency: a stale `metadata.resourceVersion` is `409 Conflict`), delete;
//! - watch as newline-delimited JSON events from a resource version, with `BOOKMARK`
//!   events when asked (`allowWatchBookmarks`), `timeoutSeconds`, and `410 Gone` (an
//!   `ERROR` event) for a version older than the last compaction;
//! - the `status` subresource: merge patch, JSON patch, server-side apply (applied as
//!   a merge of the given fields; field managers are not tracked), and replace; a
//!   write to the main resource leaves `status` alone and bumps `metadata.generation`
//!   when `spec` changes;
//! - a count of requests by verb (a client at rest must only hold its watches);
//! - stop and start again on the same port with the same objects (the server away).

mod http;
mod store;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::task::JoinSet;

use store::{put, remove};

/// One kind of resource the stand-in serves.
#[derive(Clone, Copy, Debug)]
pub struct Res {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub status: bool,
}

impl Res {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

pub const RESOURCES: &[Res] = &[
    res("", "v1", "namespaces", "Namespace", false, true),
    res("", "v1", "services", "Service", true, true),
    res("", "v1", "secrets", "Secret", true, false),
    res(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        false,
    ),
    res(
        "networking.k8s.io",
        "v1",
        "ingresses",
        "Ingress",
        true,
        true,
    ),
    res(
        "networking.k8s.io",
        "v1",
        "ingressclasses",
        "IngressClass",
        false,
        false,
    ),
    res("coordination.k8s.io", "v1", "leases", "Lease", true, false),
    res(
        "gateway.networking.k8s.io",
        "v1",
        "gatewayclasses",
        "GatewayClass",
        false,
        true,
    ),
    res(
        "gateway.networking.k8s.io",
        "v1",
        "gateways",
        "Gateway",
        true,
        true,
    ),
    res(
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
        "HTTPRoute",
        true,
        true,
    ),
    res(
        "gateway.networking.k8s.io",
        "v1beta1",
        "referencegrants",
        "ReferenceGrant",
        true,
        false,
    ),
];

const fn res(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
) -> Res {
    Res {
        group,
        version,
        plural,
        kind,
        namespaced,
        status,
    }
}

fn by_kind(kind: &str) -> Option<&'static Res> {
    RESOURCES.iter().find(|r| r.kind == kind)
}

/// A change, as watches see it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: &'static str,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches from a version before this get 410 Gone.
    floor: u64,
    objects: BTreeMap<(&'static str, String, String), Value>,
    log: Vec<Change>,
    requests: BTreeMap<String, u64>,
    uid: u64,
}

struct Inner {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
}

/// The stand-in. Dropping it stops it.
pub struct ApiServer {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    tasks: Option<JoinSet<()>>,
}

impl ApiServer {
    /// Starts on a free port of 127.0.0.1 (in the current tokio runtime).
    pub async fn start() -> ApiServer {
        let (changes, _) = broadcast::channel(65_536);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            changes,
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local address");
        let mut tasks = JoinSet::new();
        tasks.spawn(accept(listener, inner.clone()));
        ApiServer {
            addr,
            inner,
            tasks: Some(tasks),
        }
    }

    /// Stops answering: the listener closes and every connection (watches included) is cut.
    pub fn stop(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.abort_all();
        }
    }

    /// Answers again on the same port, with the same objects.
    pub async fn resume(&mut self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let inner = self.inner.clone();
        let mut set = JoinSet::new();
        set.spawn(accept(listener, inner));
        self.tasks = Some(set);
    }

    /// A kubeconfig for this server, written in `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: http://{}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: test\n    namespace: default\ncurrent-context: standin\nusers:\n- name: test\n  user:\n    token: test-token\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces an object (given with `apiVersion`, `kind`, `metadata`),
    /// status included; returns it as stored.
    pub fn apply(&self, obj: Value) -> Value {
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let r = by_kind(&kind).unwrap_or_else(|| panic!("the stand-in does not serve {kind}"));
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        let ns = if r.namespaced { ns } else { String::new() };
        let mut st = self.inner.store.lock().unwrap();
        let prev = st
            .objects
            .get(&(r.plural, ns.clone(), name.clone()))
            .cloned();
        put(&mut st, &self.inner.changes, r, &ns, obj, prev.as_ref())
    }

    /// Deletes an object; true when it existed.
    pub fn delete(&self, kind: &str, ns: &str, name: &str) -> bool {
        let r = by_kind(kind).expect("known kind");
        let mut st = self.inner.store.lock().unwrap();
        remove(&mut st, &self.inner.changes, r, ns, name).is_some()
    }

    /// The object as stored.
    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let r = by_kind(kind).expect("known kind");
        let ns = if r.namespaced { ns } else { "" };
        let st = self.inner.store.lock().unwrap();
        st.objects
            .get(&(r.plural, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Forgets the change history: a watch resumed from an older version gets 410 Gone
    /// (as after an etcd compaction); open watches are cut (the server restarts).
    pub async fn compact(&mut self) {
        {
            let mut st = self.inner.store.lock().unwrap();
            st.floor = st.rv;
            st.log.clear();
        }
        self.stop();
        self.resume().await;
    }

    /// Requests by verb (`list`, `watch`, `get`, `create`, `update`, `patch`, `delete`,
    /// `discovery`) since the start.
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.inner.store.lock().unwrap().requests.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept(listener: tokio::net::TcpListener, inner: Arc<Inner>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let inner = inner.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(http::handle(inner, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}
