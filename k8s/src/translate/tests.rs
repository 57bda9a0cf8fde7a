//! Translation rules that need no API server: attachment (`allowedRoutes`, listener
//! hostnames), conditions and reasons, Ingress classes, wildcard hostnames.

use std::sync::Arc;

use portier_config::{Kubernetes, Settings};

use super::*;
use crate::yaml::read_str;

fn objects(text: &str) -> Objects {
    let mut o = Objects::default();
    for d in read_str("t.yaml", text).unwrap() {
        o.put_json(d.value).unwrap();
    }
    o
}

const BASE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: portier}
spec: {controllerName: portier.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: infra}
spec:
  gatewayClassName: portier
  listeners:
  - name: same
    protocol: HTTP
    port: 80
    hostname: "*.same.test"
  - name: selected
    protocol: HTTP
    port: 80
    hostname: "*.sel.test"
    allowedRoutes:
      namespaces:
        from: Selector
        selector: {matchLabels: {portier: "yes"}}
  - name: tcp
    protocol: TCP
    port: 5432
---
apiVersion: v1
kind: Namespace
metadata: {name: labelled, labels: {portier: "yes"}}
---
apiVersion: v1
kind: Service
metadata: {name: odoo, namespace: infra}
spec: {ports: [{name: http, port: 8069}]}
---
apiVersion: v1
kind: Service
metadata: {name: odoo, namespace: labelled}
spec: {ports: [{name: http, port: 8069}]}
---
apiVersion: v1
kind: Service
metadata: {name: odoo, namespace: other}
spec: {ports: [{name: http, port: 8069}]}
"#;

fn route(ns: &str, name: &str, host: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: [{{name: edge, namespace: infra}}]\n  hostnames: [\"{host}\"]\n  rules: [{{backendRefs: [{{name: odoo, port: 8069}}]}}]\n"
    )
}

fn run(extra: &str) -> Translation {
    translate(
        &objects(&format!("{BASE}{extra}")),
        &Kubernetes::default(),
        &Arc::new(Settings::default()),
        false,
    )
}

fn accepted(t: &Translation, ns: &str, name: &str) -> (String, String) {
    let c = t
        .status
        .route_condition(&(ns.into(), name.into()), "Accepted");
    (c[0].status.to_string(), c[0].reason.clone())
}

#[test]
fn allowed_routes_same_and_selector() {
    let t = run(&[
        route("infra", "same", "a.same.test"),
        route("other", "not-same", "b.same.test"),
        route("labelled", "selected", "c.sel.test"),
        route("other", "not-selected", "d.sel.test"),
    ]
    .concat());
    assert_eq!(
        accepted(&t, "infra", "same"),
        ("True".into(), "Accepted".into())
    );
    assert_eq!(
        accepted(&t, "labelled", "selected"),
        ("True".into(), "Accepted".into())
    );
    // A route from a namespace no listener admits.
    assert_eq!(accepted(&t, "other", "not-same").1, "NotAllowedByListeners");
    assert_eq!(
        accepted(&t, "other", "not-selected").1,
        "NotAllowedByListeners"
    );
    let names: Vec<&str> = t.tenants.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["infra/same", "labelled/selected"]);
    // The TCP listener is refused; the Gateway is still programmed.
    let gw = &t.status.gateways[&("infra".to_string(), "edge".to_string())];
    assert_eq!(
        gw["listeners"][2]["conditions"][0]["reason"],
        "UnsupportedProtocol"
    );
    assert_eq!(gw["listeners"][0]["attachedRoutes"], 1);
    assert_eq!(gw["conditions"][1]["type"], "Programmed");
    assert_eq!(gw["conditions"][1]["status"], "True");
    assert_eq!(
        t.status.gateway_classes["portier"]["conditions"][0]["status"],
        "True"
    );
}

#[test]
fn not_allowed_by_listeners_and_no_matching_listener_hostname() {
    // Allowed (same namespace) but no listener's hostname matches.
    let mut t = run(&route("infra", "r", "x.elsewhere.test"));
    assert_eq!(accepted(&t, "infra", "r").1, "NoMatchingListenerHostname");
    assert!(t.tenants.is_empty());
    let one = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r2, namespace: other}
spec:
  parentRefs: [{name: edge, namespace: infra, sectionName: same}]
  hostnames: ["x.same.test"]
  rules: [{backendRefs: [{name: odoo, port: 8069}]}]
"#;
    t = run(one);
    assert_eq!(accepted(&t, "other", "r2").1, "NotAllowedByListeners");
    assert!(t
        .problems
        .iter()
        .any(|p| p.message.contains("NotAllowedByListeners")));
}

#[test]
fn listener_hostnames_and_wildcards() {
    // A route without hostnames takes the listener's; a wildcard becomes a template.
    let text = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: any, namespace: infra, annotations: {portier.dev/database: "{tenant}"}}
spec:
  parentRefs: [{name: edge, namespace: infra, sectionName: same}]
  rules: [{backendRefs: [{name: odoo, port: 8069}]}]
"#;
    let t = run(text);
    assert_eq!(t.tenants[0].hosts[0].to_string(), "{tenant}.same.test");
    assert_eq!(t.tenants[0].database.as_deref(), Some("{tenant}"));
}

#[test]
fn ingress_classes() {
    let ingress = |name: &str, class: &str| {
        let class = if class.is_empty() {
            String::new()
        } else {
            format!("  ingressClassName: {class}\n")
        };
        format!("---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: infra}}\nspec:\n{class}  rules:\n  - host: {name}.test\n    http:\n      paths:\n      - {{path: /, pathType: ImplementationSpecific, backend: {{service: {{name: odoo, port: {{number: 8069}}}}}}}}\n")
    };
    let text = [
        ingress("ours", "portier"),
        ingress("theirs", "nginx"),
        ingress("classless", ""),
    ]
    .concat();
    let t = run(&text);
    let names: Vec<&str> = t.tenants.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(
        names,
        ["infra/ours"],
        "without a default IngressClass, a classless Ingress is not portier's"
    );
    let default = "---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: portier, annotations: {ingressclass.kubernetes.io/is-default-class: \"true\"}}\nspec: {controller: portier.dev/ingress-controller}\n";
    let t = run(&[text, default.to_string()].concat());
    let mut names: Vec<&str> = t.tenants.iter().map(|x| x.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["infra/classless", "infra/ours"]);
}

#[test]
fn watched_namespaces_only() {
    let k = Kubernetes {
        namespaces: vec!["labelled".into()],
        ..Default::default()
    };
    let text = format!(
        "{BASE}{}{}",
        route("labelled", "in", "c.sel.test"),
        route("infra", "out", "a.same.test")
    );
    // The Gateway is in `infra`, which is not watched: nothing attaches.
    let t = translate(&objects(&text), &k, &Arc::new(Settings::default()), false);
    assert!(t.tenants.is_empty());
    let k = Kubernetes {
        namespaces: vec!["labelled".into(), "infra".into()],
        ..Default::default()
    };
    let t = translate(&objects(&text), &k, &Arc::new(Settings::default()), false);
    assert_eq!(t.tenants.len(), 2);
}

fn rule_route(name: &str, rule: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: infra}}\nspec:\n  parentRefs: [{{name: edge, namespace: infra, sectionName: same}}]\n  hostnames: [\"{name}.same.test\"]\n  rules:\n  - backendRefs: [{{name: odoo, port: 8069}}]\n  - {rule}\n"
    )
}

#[test]
fn exact_paths_filters_and_unsupported_matches() {
    let text = [
        rule_route("exact", "{matches: [{path: {type: Exact, value: /web/login}}], backendRefs: [{name: odoo, port: 8069}]}"),
        rule_route("query", "{matches: [{queryParams: [{name: a, value: b}]}], backendRefs: [{name: odoo, port: 8069}]}"),
        rule_route("method", "{matches: [{method: POST}], backendRefs: [{name: odoo, port: 8069}]}"),
        rule_route("header-filter", "{filters: [{type: RequestHeaderModifier}], backendRefs: [{name: odoo, port: 8069}]}"),
        rule_route("redirect", "{filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]}"),
        rule_route("regex", "{matches: [{path: {type: RegularExpression, value: /a.*}}], backendRefs: [{name: odoo, port: 8069}]}"),
    ]
    .concat();
    let t = run(&text);
    let exact = t.tenants.iter().find(|x| x.name == "infra/exact").unwrap();
    assert_eq!(exact.routes.len(), 1);
    assert!(exact.routes[0].exact && exact.routes[0].path == "/web/login");
    for (name, what) in [
        ("query", "queryParams"),
        ("method", "method"),
        ("header-filter", "RequestHeaderModifier"),
        ("redirect", "redirect_http"),
        ("regex", "RegularExpression"),
    ] {
        let c = t
            .status
            .route_condition(&("infra".into(), name.into()), "Accepted");
        assert_eq!(
            (c[0].status, c[0].reason.as_str()),
            ("False", "UnsupportedValue"),
            "{name}"
        );
        assert!(c[0].message.contains(what), "{name}: {}", c[0].message);
        assert!(!t.tenants.iter().any(|x| x.name == format!("infra/{name}")));
    }
    // A redirect to https is what `redirect_http = true` does: accepted then.
    let t = translate(
        &objects(&format!(
            "{BASE}{}",
            rule_route(
                "redirect",
                "{filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]}"
            )
        )),
        &Kubernetes::default(),
        &Arc::new(Settings::default()),
        true,
    );
    assert_eq!(
        accepted(&t, "infra", "redirect"),
        ("True".into(), "Accepted".into())
    );
}

const SECRET: &str = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: wild, namespace: certs}\ntype: kubernetes.io/tls\ndata: {tls.crt: Y3J0, tls.key: a2V5}\n";

fn https_gateway() -> String {
    "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: tls, namespace: infra}\nspec:\n  gatewayClassName: portier\n  listeners:\n  - {name: https, protocol: HTTPS, port: 443, tls: {certificateRefs: [{name: wild, namespace: certs}]}}\n".into()
}

#[test]
fn a_certificate_ref_into_another_namespace_needs_a_reference_grant() {
    let t = run(&format!("{}{SECRET}", https_gateway()));
    assert!(t.certs.is_empty());
    let gw = &t.status.gateways[&("infra".to_string(), "tls".to_string())];
    assert_eq!(
        gw["listeners"][0]["conditions"][2]["reason"], "RefNotPermitted",
        "{gw}"
    );
    let grant = "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: certs}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}]\n  to: [{group: \"\", kind: Secret, name: wild}]\n";
    let t = run(&format!("{}{SECRET}{grant}", https_gateway()));
    assert_eq!(t.certs.len(), 1);
    assert_eq!(t.certs[0].name, "certs/wild");
    assert_eq!(
        (t.certs[0].crt.as_slice(), t.certs[0].key.as_slice()),
        (&b"crt"[..], &b"key"[..])
    );
}

#[test]
fn ingress_tls_secrets_are_certificates_and_default_backend_is_ignored() {
    let text = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: shop-tls, namespace: infra}\ntype: kubernetes.io/tls\ndata: {tls.crt: Y3J0, tls.key: a2V5}\n---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: shop, namespace: infra}\nspec:\n  ingressClassName: portier\n  defaultBackend: {service: {name: other, port: {number: 80}}}\n  tls: [{secretName: shop-tls}]\n  rules:\n  - host: shop.test\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: odoo, port: {number: 8069}}}}]}\n";
    let t = run(text);
    assert_eq!(t.certs.len(), 1);
    assert_eq!(t.certs[0].name, "infra/shop-tls");
    assert_eq!(t.tenants.len(), 1);
    assert!(
        t.pools.iter().all(|p| !p.name.contains("other")),
        "defaultBackend ignored"
    );
    assert!(t.problems.is_empty(), "{:?}", t.problems);
}
