//! Ingress (`networking.k8s.io/v1`) of portier's class: each one a tenant draft with
//! its rules' hosts, its paths as routes, its `tls[].secretName` certificates.

use k8s_openapi::api::networking::v1::{HTTPIngressPath, Ingress, IngressSpec};
use portier_config::Kubernetes;
use serde_json::json;

use super::backend::{BackendError, Backends, PortRef};
use super::gateway::tls_pair;
use super::status::{address, INGRESS_CONTROLLER};
use super::{Draft, Problem, Translation};
use crate::objects::{Key, Kind, ObjRef, Objects};

pub(super) fn translate(
    objects: &Objects,
    k: &Kubernetes,
    watched: &dyn Fn(&str) -> bool,
    backends: &mut Backends<'_>,
    drafts: &mut Vec<Draft>,
    t: &mut Translation,
) {
    // An Ingress without a class is portier's when portier's IngressClass is the default.
    let default_class = objects.ingress_classes.values().any(|c| {
        c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(INGRESS_CONTROLLER)
            && c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("ingressclass.kubernetes.io/is-default-class"))
                .is_some_and(|v| v == "true")
    });
    for (key, ing) in objects.ingresses.iter() {
        let class = ing
            .spec
            .as_ref()
            .and_then(|s| s.ingress_class_name.as_deref());
        let ours = match class {
            Some(c) => c == k.ingress_class,
            None => default_class,
        };
        if !ours || !watched(&key.0) {
            continue;
        }
        let source = ObjRef {
            kind: Kind::Ingress,
            namespace: key.0.clone(),
            name: key.1.clone(),
        };
        match draft(objects, key, ing, backends, t, &source) {
            Ok(d) => {
                if let Some((ip, value)) = address(&k.status_address) {
                    let entry = if ip {
                        json!({ "ip": value })
                    } else {
                        json!({ "hostname": value })
                    };
                    t.status.ingresses.insert(
                        key.clone(),
                        json!({ "loadBalancer": { "ingress": [entry] } }),
                    );
                }
                drafts.push(d);
            }
            Err(problems) => t.problems.extend(problems),
        }
    }
}

fn draft(
    objects: &Objects,
    key: &Key,
    ing: &Ingress,
    backends: &mut Backends<'_>,
    t: &mut Translation,
    source: &ObjRef,
) -> Result<Draft, Vec<Problem>> {
    let problem = |field: String, message: String| Problem {
        object: source.clone(),
        field,
        message,
    };
    let mut problems = Vec::new();
    let mut d = Draft {
        source: source.clone(),
        values: super::annotations(&ing.metadata),
        hosts: Vec::new(),
        pool: None,
        routes: Vec::new(),
    };
    let spec = ing.spec.clone().unwrap_or_default();
    for (ri, rule) in spec.rules.iter().flatten().enumerate() {
        let at = format!("/spec/rules/{ri}");
        match rule.host.as_deref() {
            Some(h) if !d.hosts.iter().any(|x| x == h) => d.hosts.push(h.to_string()),
            Some(_) => {}
            None => problems.push(problem(
                at.clone(),
                "a rule without host (every host) is not supported".into(),
            )),
        }
        for (pi, p) in rule.http.iter().flat_map(|h| h.paths.iter()).enumerate() {
            let field = format!("{at}/http/paths/{pi}");
            match ingress_path(key, p, &field, backends, t, source) {
                Ok((path, exact, pool)) => d.add_path(path, exact, pool),
                Err(e) => problems.push(e),
            }
        }
    }
    certificates(objects, key, &spec, t, source);
    if problems.is_empty() {
        Ok(d)
    } else {
        Err(problems)
    }
}

/// One path of a rule: its path, whether exact, and its pool; or why not. A Service
/// that does not exist yet is a pool without members (its requests fail), logged.
fn ingress_path(
    key: &Key,
    p: &HTTPIngressPath,
    field: &str,
    backends: &mut Backends<'_>,
    t: &mut Translation,
    source: &ObjRef,
) -> Result<(String, bool, usize), Problem> {
    let problem = |field: String, message: String| Problem {
        object: source.clone(),
        field,
        message,
    };
    let exact = p.path_type == "Exact";
    let path = p.path.clone().unwrap_or_else(|| "/".into());
    if !path.starts_with('/') {
        return Err(problem(
            format!("{field}/path"),
            format!("path \"{path}\" does not start with /"),
        ));
    }
    let Some(svc) = p.backend.service.as_ref() else {
        return Err(problem(
            format!("{field}/backend"),
            "only Service backends are supported".into(),
        ));
    };
    let port = match svc.port.as_ref() {
        Some(sp) if sp.number.is_some() => PortRef::Number(sp.number.unwrap_or_default()),
        Some(sp) if sp.name.is_some() => PortRef::Name(sp.name.clone().unwrap_or_default()),
        _ => {
            return Err(problem(
                format!("{field}/backend/service/port"),
                "a Service backend needs a port".into(),
            ))
        }
    };
    let pool = match backends.pool(&key.0, &svc.name, &port) {
        Ok(i) => i,
        Err(BackendError::NotFound(m)) => {
            t.problems
                .push(problem(format!("{field}/backend/service"), m));
            backends.empty(&format!("{}/{}:{}", key.0, svc.name, port_label(&port)))
        }
        Err(BackendError::Invalid(m)) => {
            return Err(problem(format!("{field}/backend/service"), m));
        }
    };
    Ok((path, exact, pool))
}

/// The `tls[].secretName` certificates into `t.certs`; a Secret not there (yet) is a
/// warning.
fn certificates(
    objects: &Objects,
    key: &Key,
    spec: &IngressSpec,
    t: &mut Translation,
    source: &ObjRef,
) {
    for (ti, tls) in spec.tls.iter().flatten().enumerate() {
        let Some(name) = tls.secret_name.as_deref() else {
            continue;
        };
        match objects.secrets.get(&(key.0.clone(), name.to_string())).and_then(|s| tls_pair(s)) {
            Some(pair) => {
                if !t.certs.iter().any(|c| c.name == pair.name) {
                    t.certs.push(pair);
                }
            }
            None => t.warnings.push(Problem {
                object: source.clone(),
                field: format!("/spec/tls/{ti}/secretName"),
                message: format!("Secret {}/{name} is not (yet) a kubernetes.io/tls Secret with tls.crt and tls.key: no certificate from it", key.0),
            }),
        }
    }
}

fn port_label(p: &PortRef) -> String {
    match p {
        PortRef::Number(n) => n.to_string(),
        PortRef::Name(s) => s.clone(),
    }
}
