//! Kubernetes objects for the tests, as the API server stores them (JSON), and a
//! portier configuration with `[kubernetes]` pointing at the stand-in.

use std::net::SocketAddr;

use base64::Engine;
use serde_json::{json, Value};

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
