//! Gateway API: portier's GatewayClass, its Gateways and their listeners
//! (certificates, `allowedRoutes`), and the HTTPRoutes attached to them, each one a
//! tenant draft with the status of each of its parents.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use portier_config::Kubernetes;
use serde_json::{json, Value};

use super::backend::{granted, Backends};
use super::status::{address, Cond, ParentStatus, GATEWAY_CONTROLLER};
use super::{Draft, Problem, SecretPair, Translation};
use crate::gateway::{Gateway, HttpRoute, Listener, ObjectRef, GROUP};
use crate::objects::{Key, Kind, ObjRef, Objects};

/// A listener of one of portier's Gateways.
struct Lis<'a> {
    l: &'a Listener,
    /// Usable: a supported protocol, its certificates resolved.
    ok: bool,
    conditions: Vec<Cond>,
    attached: u32,
}

pub(super) fn translate(
    objects: &Objects,
    k: &Kubernetes,
    watched: &dyn Fn(&str) -> bool,
    redirect_http: bool,
    backends: &mut Backends<'_>,
    drafts: &mut Vec<Draft>,
    t: &mut Translation,
) {
    let class_key = (String::new(), k.gateway_class.clone());
    let Some(class) = objects.gateway_classes.get(&class_key) else {
        return;
    };
    if class.spec.controller_name != GATEWAY_CONTROLLER {
        return;
    }
    let gen = class.metadata.generation;
    t.status.gateway_classes.insert(
        k.gateway_class.clone(),
        json!({ "conditions": [Cond::new("Accepted", true, "Accepted", "portier serves the Gateways of this class").at(gen)] }),
    );
    let mut gateways: BTreeMap<Key, (&Gateway, Vec<Lis<'_>>)> = BTreeMap::new();
    for (key, gw) in objects.gateways.iter() {
        if gw.spec.gateway_class_name != k.gateway_class || !watched(&key.0) {
            continue;
        }
        let listeners = gw
            .spec
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| listener(objects, key, i, l, t))
            .collect();
        gateways.insert(key.clone(), (gw, listeners));
    }
    for (key, route) in objects.http_routes.iter() {
        if watched(&key.0) {
            if let Some(d) = route_draft(
                objects,
                key,
                route,
                &mut gateways,
                redirect_http,
                backends,
                t,
            ) {
                drafts.push(d);
            }
        }
    }
    for (key, (gw, listeners)) in gateways {
        t.status
            .gateways
            .insert(key, gateway_status(gw, &listeners, &k.status_address));
    }
}

/// A listener's conditions; its certificates go to `certs`.
fn listener<'a>(
    objects: &Objects,
    key: &Key,
    index: usize,
    l: &'a Listener,
    t: &mut Translation,
) -> Lis<'a> {
    let mut lis = Lis {
        l,
        ok: true,
        conditions: Vec::new(),
        attached: 0,
    };
    let mut refs_ok = Cond::new("ResolvedRefs", true, "ResolvedRefs", "");
    match l.protocol.as_str() {
        "HTTP" => {}
        "HTTPS" => {
            let tls = l.tls.clone().unwrap_or_default();
            if tls.mode.as_deref().is_some_and(|m| m != "Terminate") {
                lis.ok = false;
                lis.conditions.push(Cond::new(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    "portier terminates TLS: only mode Terminate",
                ));
            }
            if let Some(bad) = certificates(objects, key, index, l, &tls.certificate_refs, t) {
                refs_ok = bad;
            }
        }
        other => {
            lis.ok = false;
            lis.conditions.push(Cond::new(
                "Accepted",
                false,
                "UnsupportedProtocol",
                format!("protocol {other}: portier serves HTTP and HTTPS listeners"),
            ));
        }
    }
    if lis.ok {
        lis.conditions
            .push(Cond::new("Accepted", true, "Accepted", ""));
    }
    lis.conditions.push(Cond::new(
        "Programmed",
        lis.ok,
        if lis.ok { "Programmed" } else { "Invalid" },
        "",
    ));
    lis.conditions.push(refs_ok);
    lis
}

/// A listener's certificate Secrets into `t.certs`; the `ResolvedRefs` condition of the
/// last one that does not resolve, if any.
fn certificates(
    objects: &Objects,
    key: &Key,
    index: usize,
    l: &Listener,
    refs: &[ObjectRef],
    t: &mut Translation,
) -> Option<Cond> {
    let ns = key.0.as_str();
    let mut bad = None;
    for r in refs {
        let secret_ns = r.namespace.clone().unwrap_or_else(|| ns.to_string());
        let secret = (secret_ns.clone(), r.name.clone());
        if r.kind.as_deref().unwrap_or("Secret") != "Secret"
            || !r.group.as_deref().unwrap_or("").is_empty()
        {
            bad = Some(Cond::new(
                "ResolvedRefs",
                false,
                "InvalidCertificateRef",
                format!("{} is not a Secret", r.name),
            ));
        } else if !granted(objects, GROUP, "Gateway", ns, "Secret", &secret_ns, &r.name) {
            bad = Some(Cond::new(
                "ResolvedRefs",
                false,
                "RefNotPermitted",
                format!(
                    "no ReferenceGrant in {secret_ns} lets this Gateway use Secret {}",
                    r.name
                ),
            ));
        } else if let Some(pair) = objects.secrets.get(&secret).and_then(|s| tls_pair(s)) {
            if !t.certs.iter().any(|c| c.name == pair.name) {
                t.certs.push(pair);
            }
        } else {
            let m = format!("Secret {secret_ns}/{} is not (yet) a kubernetes.io/tls Secret with tls.crt and tls.key: no certificate from it", r.name);
            t.warnings.push(Problem {
                object: ObjRef {
                    kind: Kind::Gateway,
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                },
                field: format!("/spec/listeners/{index}/tls/certificateRefs"),
                message: format!("listener {}: {m}", l.name),
            });
            bad = Some(Cond::new("ResolvedRefs", false, "InvalidCertificateRef", m));
        }
    }
    bad
}

/// A Secret's PEM pair, if it is a `kubernetes.io/tls` Secret with both.
pub(super) fn tls_pair(s: &k8s_openapi::api::core::v1::Secret) -> Option<SecretPair> {
    let data = s.data.as_ref()?;
    Some(SecretPair {
        name: format!(
            "{}/{}",
            s.metadata.namespace.as_deref()?,
            s.metadata.name.as_deref()?
        ),
        crt: data.get("tls.crt")?.0.clone(),
        key: data.get("tls.key")?.0.clone(),
    })
}

fn gateway_status(gw: &Gateway, listeners: &[Lis<'_>], status_address: &str) -> Value {
    let gen = gw.metadata.generation;
    let programmed = listeners.iter().any(|l| l.ok);
    let mut status = json!({
        "conditions": [
            Cond::new("Accepted", true, "Accepted", "").at(gen),
            Cond::new("Programmed", programmed, if programmed { "Programmed" } else { "Invalid" }, "").at(gen),
        ],
        "listeners": listeners.iter().map(|l| json!({
            "name": l.l.name,
            "supportedKinds": [{ "group": GROUP, "kind": "HTTPRoute" }],
            "attachedRoutes": l.attached,
            "conditions": l.conditions.iter().cloned().map(|c| c.at(gen)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    if let Some((ip, value)) = address(status_address) {
        status["addresses"] =
            json!([{ "type": if ip { "IPAddress" } else { "Hostname" }, "value": value }]);
    }
    status
}

/// Whether `allowedRoutes` lets a route of `route_ns` attach.
fn allows(objects: &Objects, l: &Listener, gw_ns: &str, route_ns: &str) -> bool {
    let from = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref());
    match from.and_then(|f| f.from.as_deref()).unwrap_or("Same") {
        "All" => true,
        "Selector" => {
            let labels = objects
                .namespaces
                .get(&(String::new(), route_ns.to_string()))
                .and_then(|n| n.metadata.labels.clone())
                .unwrap_or_default();
            from.and_then(|f| f.selector.as_ref())
                .is_some_and(|s| selects(s, &labels))
        }
        _ => gw_ns == route_ns,
    }
}

/// A label selector against a set of labels.
fn selects(s: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = s
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_exprs = s.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    by_labels && by_exprs
}

/// The hostnames a route gets on a listener: each route hostname that the listener's
/// matches (or the listener's own, more specific one); all of them when the listener
/// has none.
fn intersect(route: &[String], listener: Option<&str>) -> Vec<String> {
    let wild = |pattern: &str, host: &str| {
        pattern
            .strip_prefix('*')
            .is_some_and(|suffix| host.len() > suffix.len() && host.ends_with(suffix))
    };
    match listener {
        None => route.to_vec(),
        Some(l) if route.is_empty() => vec![l.to_string()],
        Some(l) => route
            .iter()
            .filter_map(|h| {
                if h == l || wild(l, h) {
                    Some(h.clone())
                } else if wild(h, l) {
                    Some(l.to_string())
                } else {
                    None
                }
            })
            .collect(),
    }
}

fn route_draft(
    objects: &Objects,
    key: &Key,
    route: &HttpRoute,
    gateways: &mut BTreeMap<Key, (&Gateway, Vec<Lis<'_>>)>,
    redirect_http: bool,
    backends: &mut Backends<'_>,
    t: &mut Translation,
) -> Option<Draft> {
    let source = ObjRef {
        kind: Kind::HttpRoute,
        namespace: key.0.clone(),
        name: key.1.clone(),
    };
    let gen = route.metadata.generation;
    let (mut parents, hosts) = attach(objects, key, route, gateways);
    if parents.is_empty() {
        return None; // not attached to portier: none of its business
    }
    let attached = parents.iter().any(|p| p.conditions[0].status == "True");
    if !attached {
        let why = &parents[0].conditions[0];
        t.problems.push(Problem {
            object: source.clone(),
            field: "/spec/parentRefs".into(),
            message: format!(
                "not accepted by any Gateway ({}: {})",
                why.reason, why.message
            ),
        });
    }
    let (draft, unsupported, unresolved) = super::rules::rules(
        objects,
        key,
        route,
        redirect_http,
        backends,
        hosts,
        source.clone(),
    );
    for p in &mut parents {
        if attached && p.conditions[0].status == "True" {
            if let Some((_, m)) = unsupported.first() {
                p.conditions[0] =
                    Cond::new("Accepted", false, "UnsupportedValue", m.clone()).at(gen);
            }
        }
        p.conditions.push(match unresolved.first() {
            Some((reason, m, _)) => Cond::new("ResolvedRefs", false, reason, m.clone()).at(gen),
            None => Cond::new("ResolvedRefs", true, "ResolvedRefs", "").at(gen),
        });
    }
    let problems = unsupported
        .iter()
        .map(|(field, message)| (field, message))
        .chain(
            unresolved
                .iter()
                .map(|(_, message, field)| (field, message)),
        );
    for (field, message) in problems {
        t.problems.push(Problem {
            object: source.clone(),
            field: field.clone(),
            message: message.clone(),
        });
    }
    if !attached || !unsupported.is_empty() {
        t.status.routes.insert(key.clone(), parents);
        return None;
    }
    if draft.hosts.is_empty() {
        t.problems.push(Problem {
            object: source,
            field: "/spec/hostnames".into(),
            message: "no hostnames: a route for every host is not supported; give `hostnames` (or a listener `hostname`)".into(),
        });
        for p in &mut parents {
            p.conditions[0] = Cond::new(
                "Accepted",
                false,
                "UnsupportedValue",
                "no hostnames: a route for every host is not supported",
            )
            .at(gen);
        }
        t.status.routes.insert(key.clone(), parents);
        return None;
    }
    t.status.routes.insert(key.clone(), parents);
    Some(draft)
}

/// The route's attachment to each of portier's Gateways it names: a parent status with
/// its `Accepted` condition each, and the hostnames it gets on the listeners that take it.
fn attach(
    objects: &Objects,
    key: &Key,
    route: &HttpRoute,
    gateways: &mut BTreeMap<Key, (&Gateway, Vec<Lis<'_>>)>,
) -> (Vec<ParentStatus>, Vec<String>) {
    let gen = route.metadata.generation;
    let mut parents = Vec::new();
    let mut hosts: Vec<String> = Vec::new();
    for p in &route.spec.parent_refs {
        if p.group.as_deref().unwrap_or(GROUP) != GROUP
            || p.kind.as_deref().unwrap_or("Gateway") != "Gateway"
        {
            continue;
        }
        let gw_ns = p.namespace.clone().unwrap_or_else(|| key.0.clone());
        let Some((_, listeners)) = gateways.get_mut(&(gw_ns.clone(), p.name.clone())) else {
            continue;
        };
        let mut parent_ref = p.clone();
        parent_ref.namespace = Some(gw_ns.clone());
        let mut allowed: Vec<&mut Lis<'_>> = listeners
            .iter_mut()
            .filter(|l| p.section_name.as_ref().is_none_or(|s| *s == l.l.name))
            .filter(|l| p.port.is_none_or(|port| port == l.l.port))
            .filter(|l| l.ok && allows(objects, l.l, &gw_ns, &key.0))
            .collect();
        let mut found = Vec::new();
        for l in allowed.iter_mut() {
            let these = intersect(&route.spec.hostnames, l.l.hostname.as_deref());
            if !these.is_empty() {
                l.attached += 1;
            }
            found.extend(these);
        }
        let accepted = if allowed.is_empty() {
            Cond::new(
                "Accepted",
                false,
                "NotAllowedByListeners",
                "no listener of the Gateway allows this route",
            )
        } else if found.is_empty() {
            Cond::new(
                "Accepted",
                false,
                "NoMatchingListenerHostname",
                "no hostname of the route matches a listener's",
            )
        } else {
            for h in found {
                if !hosts.contains(&h) {
                    hosts.push(h);
                }
            }
            Cond::new("Accepted", true, "Accepted", "")
        };
        parents.push(ParentStatus {
            parent: parent_ref,
            conditions: vec![accepted.at(gen)],
        });
    }
    (parents, hosts)
}
