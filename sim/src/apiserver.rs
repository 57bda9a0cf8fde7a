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

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::task::JoinSet;

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
                async move { Ok::<_, Infallible>(handle(inner, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn reply(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// The parts of a resource path.
struct Target {
    res: &'static Res,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Result<Target, ()> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(()),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => {
            (Some(ns.to_string()), [&[*plural][..], rest].concat())
        }
        _ => (None, rest.to_vec()),
    };
    let find = |plural: &str| {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    };
    match rest.as_slice() {
        [plural] => Ok(Target {
            res: find(plural).ok_or(())?,
            namespace,
            name: None,
            status: false,
        }),
        [plural, name] => Ok(Target {
            res: find(plural).ok_or(())?,
            namespace,
            name: Some(name.to_string()),
            status: false,
        }),
        [plural, name, "status"] => Ok(Target {
            res: find(plural).ok_or(())?,
            namespace,
            name: Some(name.to_string()),
            status: true,
        }),
        // `GET /api/v1/namespaces/NAME`: the Namespace itself.
        [] if namespace.is_some() && group.is_empty() => Ok(Target {
            res: find("namespaces").ok_or(())?,
            namespace: None,
            name: namespace,
            status: false,
        }),
        _ => Err(()),
    }
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2C", ",").replace("%3D", "=")))
        .collect()
}

fn count(inner: &Inner, verb: &str) {
    *inner
        .store
        .lock()
        .unwrap()
        .requests
        .entry(verb.to_string())
        .or_default() += 1;
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if let Some(d) = discovery(&path) {
        count(&inner, "discovery");
        return reply(StatusCode::OK, &d);
    }
    let Ok(t) = parse_path(&path) else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    let q = query(&req);
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    match (method, &t.name) {
        (Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            count(&inner, "watch");
            watch(inner, t.res, t.namespace, &q)
        }
        (Method::GET, None) => {
            count(&inner, "list");
            list(&inner, t.res, t.namespace.as_deref(), &q)
        }
        (Method::GET, Some(name)) => {
            count(&inner, "get");
            let st = inner.store.lock().unwrap();
            let ns = t.namespace.clone().unwrap_or_default();
            match st.objects.get(&(t.res.plural, ns, name.clone())) {
                Some(o) => reply(StatusCode::OK, o),
                None => not_found(t.res, name),
            }
        }
        (Method::POST, None) => {
            count(&inner, "create");
            write(&inner, &t, &body, Write::Create, &content_type)
        }
        (Method::PUT, Some(_)) => {
            count(&inner, "update");
            write(&inner, &t, &body, Write::Replace, &content_type)
        }
        (Method::PATCH, Some(_)) => {
            count(&inner, "patch");
            write(&inner, &t, &body, Write::Patch, &content_type)
        }
        (Method::DELETE, Some(name)) => {
            count(&inner, "delete");
            let mut st = inner.store.lock().unwrap();
            let ns = t.namespace.clone().unwrap_or_default();
            match remove(&mut st, &inner.changes, t.res, &ns, name) {
                Some(o) => reply(StatusCode::OK, &o),
                None => not_found(t.res, name),
            }
        }
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the stand-in",
        ),
    }
}

fn not_found(r: &Res, name: &str) -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{}.{} \"{name}\" not found", r.plural, r.group),
    )
}

/// The legacy discovery documents (what kubectl reads).
fn discovery(path: &str) -> Option<Value> {
    let resources = |group: &str, version: &str| {
        let mut list: Vec<Value> = Vec::new();
        for r in RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            list.push(json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}));
            if r.status {
                list.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                    "kind": r.kind, "verbs": ["get", "patch", "update"]}));
            }
        }
        json!({"kind": "APIResourceList", "apiVersion": "v1",
               "groupVersion": if group.is_empty() { version.to_string() } else { format!("{group}/{version}") },
               "resources": list})
    };
    match path.trim_end_matches('/') {
        "/version" => Some(
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-portier-standin", "platform": "linux/amd64"}),
        ),
        "/api" => Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ),
        "/api/v1" => Some(resources("", "v1")),
        "/apis" => {
            let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
                let v = groups.entry(r.group).or_default();
                if !v.contains(&r.version) {
                    v.push(r.version);
                }
            }
            let groups: Vec<Value> = groups
                .iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        p => {
            let parts: Vec<&str> = p.trim_start_matches('/').split('/').collect();
            match parts.as_slice() {
                ["apis", g, v] if RESOURCES.iter().any(|r| r.group == *g && r.version == *v) => {
                    Some(resources(g, v))
                }
                _ => None,
            }
        }
    }
}

fn list(
    inner: &Inner,
    r: &'static Res,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let st = inner.store.lock().unwrap();
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((p, n, _), _)| *p == r.plural && ns.is_none_or(|ns| ns == n))
        .filter(|(_, o)| labels_match(o, &selector))
        .map(|(_, o)| o.clone())
        .collect();
    reply(
        StatusCode::OK,
        &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
    )
}

/// `a=b,c=d` equality selectors only.
fn labels_match(o: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|kv| match kv.split_once('=') {
            Some((k, v)) => o["metadata"]["labels"][k].as_str() == Some(v),
            None => !o["metadata"]["labels"][kv].is_null(),
        })
}

fn event(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(
    inner: Arc<Inner>,
    r: &'static Res,
    ns: Option<String>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800u64);
    // Subscribe first, then replay: nothing falls between the two.
    let mut sub = inner.changes.subscribe();
    let (replay, last, gone) = {
        let st = inner.store.lock().unwrap();
        let matches =
            |c: &Change| c.plural == r.plural && ns.as_ref().is_none_or(|n| *n == c.namespace);
        if from == 0 {
            // No version: every object as ADDED, then changes.
            let objs: Vec<Bytes> = st
                .objects
                .iter()
                .filter(|((p, n, _), _)| *p == r.plural && ns.as_ref().is_none_or(|ns| ns == n))
                .map(|(_, o)| event("ADDED", o))
                .collect();
            (objs, st.rv, false)
        } else if from < st.floor {
            (Vec::new(), st.rv, true)
        } else {
            let objs = st
                .log
                .iter()
                .filter(|c| c.rv > from && matches(c))
                .map(|c| event(c.kind, &c.object))
                .collect();
            (objs, st.rv, false)
        }
    };
    tokio::spawn(async move {
        if gone {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410});
            let _ = tx.send(Ok(Frame::data(event("ERROR", &status)))).await;
            return;
        }
        for b in replay {
            if tx.send(Ok(Frame::data(b))).await.is_err() {
                return;
            }
        }
        let end = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.tick().await;
        let mut seen = last;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => return,
                _ = tick.tick(), if bookmarks => {
                    let rv = inner.store.lock().unwrap().rv;
                    let mark = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(Ok(Frame::data(event("BOOKMARK", &mark)))).await.is_err() {
                        return;
                    }
                }
                c = sub.recv() => match c {
                    Ok(c) => {
                        if c.rv <= seen || c.plural != r.plural || ns.as_ref().is_some_and(|n| *n != c.namespace) {
                            continue;
                        }
                        seen = c.rv;
                        if tx.send(Ok(Frame::data(event(c.kind, &c.object)))).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
            }
        }
    });
    let stream = tokio_stream_from(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("response")
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

enum Write {
    Create,
    Replace,
    Patch,
}

fn write(inner: &Inner, t: &Target, body: &[u8], how: Write, content_type: &str) -> Response<Body> {
    let patch: Value = match parse_body(body, content_type) {
        Ok(v) => v,
        Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let ns = if t.res.namespaced {
        t.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let name = t
        .name
        .clone()
        .or_else(|| patch["metadata"]["name"].as_str().map(str::to_string))
        .unwrap_or_default();
    let mut st = inner.store.lock().unwrap();
    let prev = st
        .objects
        .get(&(t.res.plural, ns.clone(), name.clone()))
        .cloned();
    let next = match (&how, &prev) {
        (Write::Create, Some(_)) => {
            return failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", t.res.plural),
            )
        }
        (Write::Create, None) => patch,
        (_, None) => return not_found(t.res, &name),
        (Write::Replace, Some(p)) => {
            let want = patch["metadata"]["resourceVersion"].as_str().unwrap_or("");
            let have = p["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !want.is_empty() && want != have {
                return failure(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", t.res.plural),
                );
            }
            patch
        }
        (Write::Patch, Some(p)) => {
            let mut doc = p.clone();
            if content_type.starts_with("application/json-patch+json") {
                if let Err(e) = json_patch(&mut doc, &patch) {
                    return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e);
                }
            } else {
                // Merge patch; server-side apply is applied as a merge of its fields.
                merge(&mut doc, &patch);
            }
            doc
        }
    };
    // The status subresource changes status only; the main resource everything else.
    let next = match (&prev, t.res.status) {
        (Some(p), true) if t.status => {
            let mut o = p.clone();
            o["status"] = next["status"].clone();
            o
        }
        (Some(p), true) => {
            let mut o = next;
            o["status"] = p["status"].clone();
            o
        }
        _ => next,
    };
    let out = put(&mut st, &inner.changes, t.res, &ns, next, prev.as_ref());
    let code = if prev.is_none() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    reply(code, &out)
}

fn parse_body(body: &[u8], content_type: &str) -> Result<Value, String> {
    if content_type.starts_with("application/apply-patch+yaml") {
        // kube-rs and kubectl send JSON, which is YAML.
        return serde_json::from_slice(body).map_err(|e| {
            format!("apply patch: {e} (the stand-in reads JSON-formatted YAML only)")
        });
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// RFC 7386.
fn merge(doc: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !doc.is_object() {
                *doc = json!({});
            }
            for (k, v) in p {
                if v.is_null() {
                    if let Some(m) = doc.as_object_mut() {
                        m.remove(k);
                    }
                } else {
                    merge(&mut doc[k.as_str()], v);
                }
            }
        }
        other => *doc = other.clone(),
    }
}

/// RFC 6902: add, replace, remove, test.
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    for op in ops.as_array().ok_or("a JSON patch is an array")? {
        let path = op["path"].as_str().ok_or("op without path")?;
        let (parent, last) = path.rsplit_once('/').ok_or("bad path")?;
        let last = last.replace("~1", "/").replace("~0", "~");
        match op["op"].as_str() {
            Some("test") => {
                if doc.pointer(path) != Some(&op["value"]) {
                    return Err(format!("test failed at {path}"));
                }
            }
            Some("remove") => {
                let p = doc.pointer_mut(parent).ok_or("no parent")?;
                match p {
                    Value::Object(m) => {
                        m.remove(&last).ok_or("nothing to remove")?;
                    }
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        if i >= a.len() {
                            return Err("bad index".into());
                        }
                        a.remove(i);
                    }
                    _ => return Err("bad parent".into()),
                }
            }
            Some("add") | Some("replace") => {
                let p = doc.pointer_mut(parent).ok_or("no parent")?;
                let v = op["value"].clone();
                match p {
                    Value::Object(m) => {
                        m.insert(last, v);
                    }
                    Value::Array(a) if last == "-" => a.push(v),
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        if op["op"] == "add" && i <= a.len() {
                            a.insert(i, v);
                        } else if i < a.len() {
                            a[i] = v;
                        } else {
                            return Err("bad index".into());
                        }
                    }
                    _ => return Err("bad parent".into()),
                }
            }
            other => return Err(format!("op {other:?} not supported")),
        }
    }
    Ok(())
}

/// Stores `obj` as the next version, with the metadata the server owns.
fn put(
    st: &mut Store,
    changes: &broadcast::Sender<Change>,
    r: &'static Res,
    ns: &str,
    mut obj: Value,
    prev: Option<&Value>,
) -> Value {
    st.rv += 1;
    let rv = st.rv;
    obj["apiVersion"] = json!(r.api_version());
    obj["kind"] = json!(r.kind);
    if r.namespaced {
        obj["metadata"]["namespace"] = json!(ns);
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let generation = match prev {
        Some(p) => {
            obj["metadata"]["uid"] = p["metadata"]["uid"].clone();
            obj["metadata"]["creationTimestamp"] = p["metadata"]["creationTimestamp"].clone();
            let g = p["metadata"]["generation"].as_i64().unwrap_or(1);
            if p["spec"] != obj["spec"] {
                g + 1
            } else {
                g
            }
        }
        None => {
            st.uid += 1;
            obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", st.uid));
            obj["metadata"]["creationTimestamp"] = json!("2026-12-07T00:00:00Z");
            1
        }
    };
    obj["metadata"]["generation"] = json!(generation);
    let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
    st.objects
        .insert((r.plural, ns.to_string(), name), obj.clone());
    let c = Change {
        rv,
        plural: r.plural,
        namespace: ns.to_string(),
        kind,
        object: obj.clone(),
    };
    st.log.push(c.clone());
    let _ = changes.send(c);
    obj
}

fn remove(
    st: &mut Store,
    changes: &broadcast::Sender<Change>,
    r: &'static Res,
    ns: &str,
    name: &str,
) -> Option<Value> {
    let ns = if r.namespaced { ns } else { "" };
    let mut obj = st
        .objects
        .remove(&(r.plural, ns.to_string(), name.to_string()))?;
    st.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    let c = Change {
        rv: st.rv,
        plural: r.plural,
        namespace: ns.to_string(),
        kind: "DELETED",
        object: obj.clone(),
    };
    st.log.push(c.clone());
    let _ = changes.send(c);
    Some(obj)
}
