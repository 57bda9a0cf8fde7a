//! Kubernetes objects for the tests, as the API server stores them (JSON), and a
//! portier configuration with `[kubernetes]` pointing at the stand-in, and a portier
//! started on it.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::apiserver::ApiServer;
use crate::{get, Portier, Ports, SimWorker};

pub const GW: &str = "gateway.networking.k8s.io/v1";

pub fn gateway_class() -> Value {
    json!({"apiVersion": GW, "kind": "GatewayClass", "metadata": {"name": "portier"},
           "spec": {"controllerName": "portier.dev/gateway-controller"}})
}

/// A Gateway `edge` in `ns` with an HTTP listener and an HTTPS one (its certificate
/// Secrets `certs`), routes from every namespace.
pub fn gateway(ns: &str, certs: &[&str]) -> Value {
    let refs: Vec<Value> = certs
        .iter()
        .map(|c| json!({"kind": "Secret", "name": c}))
        .collect();
    json!({"apiVersion": GW, "kind": "Gateway", "metadata": {"name": "edge", "namespace": ns},
           "spec": {"gatewayClassName": "portier", "listeners": [
               {"name": "http", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}},
               {"name": "https", "port": 443, "protocol": "HTTPS", "tls": {"mode": "Terminate", "certificateRefs": refs},
                "allowedRoutes": {"namespaces": {"from": "All"}}}]}})
}

/// A Service with the HTTP port 8069 (`http`) and the longpolling port 8072.
pub fn service(ns: &str, name: &str, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns, "annotations": annotations},
           "spec": {"clusterIP": "None", "ports": [
               {"name": "http", "port": 8069, "targetPort": 8069},
               {"name": "longpolling", "port": 8072, "targetPort": 8072}]}})
}

/// One endpoint state.
#[derive(Clone, Copy)]
pub enum Ep {
    Ready,
    Terminating,
    NotReady,
}

/// An EndpointSlice of Service `svc` with one endpoint: `http` the worker's address
/// (port `http`), `lp` the longpolling one (port `longpolling`, a slice of its own
/// since its port number differs).
pub fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    port_name: &str,
    addr: SocketAddr,
    state: Ep,
) -> Value {
    let (ready, serving, terminating) = match state {
        Ep::Ready => (true, true, false),
        Ep::Terminating => (false, true, true),
        Ep::NotReady => (false, false, false),
    };
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4",
           "ports": [{"name": port_name, "port": addr.port(), "protocol": "TCP"}],
           "endpoints": [{"addresses": [addr.ip().to_string()],
                          "conditions": {"ready": ready, "serving": serving, "terminating": terminating}}]})
}

/// An HTTPRoute attached to Gateway `gw_ns/edge`; `rules` as JSON.
pub fn route(
    ns: &str,
    name: &str,
    gw_ns: &str,
    hosts: &[&str],
    rules: Value,
    annotations: Value,
) -> Value {
    json!({"apiVersion": GW, "kind": "HTTPRoute",
           "metadata": {"name": name, "namespace": ns, "annotations": annotations},
           "spec": {"parentRefs": [{"name": "edge", "namespace": gw_ns}], "hostnames": hosts, "rules": rules}})
}

/// The tests' usual route: `shop/acme` for acme.test, every path to Service `odoo`.
pub fn acme_route() -> Value {
    route(
        "shop",
        "acme",
        "infra",
        &["acme.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    )
}

/// A rule sending `paths` (PathPrefix; none: every path) to `svc` port 8069.
pub fn rule(paths: &[&str], svc: &str) -> Value {
    let matches: Vec<Value> = paths
        .iter()
        .map(|p| json!({"path": {"type": "PathPrefix", "value": p}}))
        .collect();
    json!({"matches": matches, "backendRefs": [{"name": svc, "port": 8069}]})
}

/// A `kubernetes.io/tls` Secret.
pub fn tls_secret(ns: &str, name: &str, crt: &str, key: &str) -> Value {
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
           "type": "kubernetes.io/tls", "data": {"tls.crt": b(crt), "tls.key": b(key)}})
}

/// The condition `kind` of an HTTPRoute's first parent, as the API server holds it.
pub fn route_condition(obj: &Value, kind: &str) -> Option<Value> {
    obj["status"]["parents"][0]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Cluster {
    pub api: ApiServer,
    pub p: Portier,
}

pub fn config(
    ports: &Ports,
    kubeconfig: &std::path::Path,
    listen_extra: &str,
    extra: &str,
) -> String {
    format!(
        "{}{listen_extra}\n[kubernetes]\nkubeconfig = \"{}\"\nstatus_address = \"203.0.113.7\"\n{extra}",
        ports.listen(),
        kubeconfig.display()
    )
}

pub async fn start(extra_file: &str) -> Cluster {
    start_with("", extra_file, &[]).await
}

/// portier against a fresh stand-in; `listen_extra` goes into `[listen]`.
pub async fn start_with(listen_extra: &str, extra_file: &str, env: &[(&str, &str)]) -> Cluster {
    let api = ApiServer::start().await;
    let ports = Ports::new();
    let p = replica(&api, &ports, listen_extra, extra_file, env).await;
    Cluster { api, p }
}

/// One more portier on the same stand-in.
pub async fn replica(
    api: &ApiServer,
    ports: &Ports,
    listen_extra: &str,
    extra_file: &str,
    env: &[(&str, &str)],
) -> Portier {
    let kc_dir =
        std::env::temp_dir().join(format!("portier-kc-{}-{}", api.addr.port(), ports.admin));
    std::fs::create_dir_all(&kc_dir).unwrap();
    let kc = api.kubeconfig(&kc_dir);
    Portier::start_with(ports, &config(ports, &kc, listen_extra, extra_file), env).await
}

impl Cluster {
    /// Waits until `host`'s `path` is answered by worker `name`.
    pub async fn served_by(&self, host: &str, path: &str, name: &str) -> bool {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = get(self.p.http, host, path).await {
                if r.worker() == Some(name) {
                    return true;
                }
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The worker that answered `host`'s `path` (a GET on a new connection).
    pub async fn worker(&self, host: &str, path: &str) -> Option<String> {
        let r = get(self.p.http, host, path).await.ok()?;
        r.worker().map(str::to_string)
    }

    pub async fn status_of(&self, host: &str) -> u16 {
        get(self.p.http, host, "/web/login")
            .await
            .map(|r| r.status)
            .unwrap_or(0)
    }

    /// The basic set: class, Gateway, Service `odoo` in `shop` with worker `w`.
    pub fn base(&self, w: &SimWorker) {
        self.api.apply(gateway_class());
        self.api.apply(gateway("infra", &[]));
        self.api.apply(service("shop", "odoo", json!({})));
        self.api
            .apply(slice("shop", "odoo-a", "odoo", "http", w.addr(), Ep::Ready));
    }
}

pub async fn eventually_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
