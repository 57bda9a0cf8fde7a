//! `[kubernetes]` end to end, what is served: portier's real kube-rs client against the
//! API server stand-in (`portier_sim::apiserver`), simulated Odoo workers as the
//! endpoints. Each test names the contract's sentence ("Kubernetes") it checks.

use portier_tests::k8s::*;
use portier_tests::*;
use serde_json::json;

/// "A route is a tenant", "Rules are routes and pools", "Endpoints", "Status":
/// an HTTPRoute is served from its Service's ready endpoints; endpoints added and
/// removed apply without a reload; the route's status is written; deleting it stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_is_served_from_its_services_ready_endpoints() {
    let c = start("").await;
    let (a, b) = (sim("a").await, sim("b").await);
    c.base(&a);
    c.api.apply(acme_route());
    assert!(
        c.served_by("acme.test", "/web/login", "a").await,
        "{}",
        c.p.stderr().join("\n")
    );

    // Status: accepted, references resolved, written by the lease holder.
    assert!(
        eventually_async(WAIT, || async {
            let r = c.api.get("HTTPRoute", "shop", "acme").unwrap();
            route_condition(&r, "Accepted").is_some_and(|x| x["status"] == "True")
                && route_condition(&r, "ResolvedRefs").is_some_and(|x| x["status"] == "True")
        })
        .await,
        "{}",
        c.api.get("HTTPRoute", "shop", "acme").unwrap()
    );
    let gw = c.api.get("Gateway", "infra", "edge").unwrap();
    assert!(
        eventually_async(WAIT, || async {
            let gw = c.api.get("Gateway", "infra", "edge").unwrap();
            gw["status"]["listeners"][0]["attachedRoutes"] == 1
                && gw["status"]["addresses"][0]["value"] == "203.0.113.7"
        })
        .await,
        "{gw}"
    );
    // GatewayClass Accepted; Gateway Accepted and Programmed.
    let cond = |o: &serde_json::Value, kind: &str| {
        o["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|x| x["type"] == kind).cloned())
    };
    let class = c.api.get("GatewayClass", "", "portier").unwrap();
    assert_eq!(
        cond(&class, "Accepted").unwrap()["status"],
        "True",
        "{class}"
    );
    let gw = c.api.get("Gateway", "infra", "edge").unwrap();
    for kind in ["Accepted", "Programmed"] {
        let x = cond(&gw, kind).unwrap();
        assert_eq!(x["status"], "True", "{gw}");
        assert!(
            x["lastTransitionTime"].is_string() && x["observedGeneration"] == 1,
            "{gw}"
        );
    }
    let reloads_before = metric(
        &get(c.p.admin, "admin", "/metrics").await.unwrap().text(),
        "portier_config_reloads_total{result=\"ok\"}",
    );

    // A second ready endpoint: both serve (no reload).
    c.api
        .apply(slice("shop", "odoo-b", "odoo", "http", b.addr(), Ep::Ready));
    assert!(c.served_by("acme.test", "/web/login", "b").await);
    let st = status(c.p.admin).await;
    assert_eq!(
        st["pools"]["shop/odoo:8069"]["backends"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{st}"
    );
    // a terminating: no new request goes to it.
    c.api.apply(slice(
        "shop",
        "odoo-a",
        "odoo",
        "http",
        a.addr(),
        Ep::Terminating,
    ));
    assert!(
        eventually_async(WAIT, || async {
            status(c.p.admin).await["pools"]["shop/odoo:8069"]["backends"]
                .as_array()
                .is_some_and(|l| l.len() == 1)
        })
        .await
    );
    let before = a.hits();
    for _ in 0..20 {
        let r = get(c.p.http, "acme.test", "/web/login").await.unwrap();
        assert_eq!(r.worker(), Some("b"));
    }
    assert_eq!(a.hits(), before);
    let reloads_after = metric(
        &get(c.p.admin, "admin", "/metrics").await.unwrap().text(),
        "portier_config_reloads_total{result=\"ok\"}",
    );
    assert_eq!(
        reloads_before, reloads_after,
        "endpoint changes are not reloads"
    );

    // The route deleted: its host is no one's.
    assert!(c.api.delete("HTTPRoute", "shop", "acme"));
    assert!(eventually_async(WAIT, || async { c.status_of("acme.test").await == 404 }).await);
    let st = status(c.p.admin).await;
    assert_eq!(st["kubernetes"]["connected"], true, "{st}");
    assert!(st["kubernetes"]["objects"].as_u64().unwrap() >= 4, "{st}");
}

/// "Rules are routes and pools", annotations: the rule without path matches is the
/// tenant's pool, a `PathPrefix` rule a route to its Service's pool; the
/// `portier.dev/database` annotation and a tenant key (`maintenance`) apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_routes_and_annotations_are_tenant_keys() {
    // Maintenance answers every client outside `admin_cidrs` (loopback is inside by default).
    let c = start("[defaults]\nadmin_cidrs = [\"10.9.0.0/16\"]\n").await;
    let (a, b) = (sim("a").await, sim("b").await);
    c.base(&a);
    c.api.apply(service(
        "shop",
        "batch",
        json!({"portier.dev/workers": "2"}),
    ));
    c.api.apply(slice(
        "shop",
        "batch-1",
        "batch",
        "http",
        b.addr(),
        Ep::Ready,
    ));
    c.api.apply(route(
        "shop",
        "acme",
        "infra",
        &["acme.test", "*.acme-erp.test"],
        json!([rule(&[], "odoo"), rule(&["/jsonrpc", "/xmlrpc/"], "batch")]),
        json!({"portier.dev/database": "acme", "portier.dev/tenant": "acme"}),
    ));
    assert!(
        c.served_by("acme.test", "/web/login", "a").await,
        "{}",
        c.p.stderr().join("\n")
    );
    assert_eq!(
        c.worker("acme.test", "/jsonrpc").await.as_deref(),
        Some("b")
    );
    assert_eq!(
        c.worker("acme.test", "/xmlrpc/2/object").await.as_deref(),
        Some("b")
    );
    assert_eq!(
        c.worker("acme.test", "/jsonrpc2").await.as_deref(),
        Some("a")
    );
    // The wildcard hostname is a template; the database header is the annotation's.
    let r = get(c.p.http, "x.acme-erp.test", "/web/login")
        .await
        .unwrap();
    assert_eq!(r.worker(), Some("a"));
    let rec = a.requests().into_iter().last().unwrap();
    assert_eq!(rec.header("x-odoo-dbfilter"), Some("^acme$"));
    let log = c.p.wait_access_log(|v| v["path"] == "/jsonrpc").await;
    assert_eq!(log["tenant"], "acme");
    // The Service's annotation is the pool's `workers`.
    let st = status(c.p.admin).await;
    assert_eq!(
        st["pools"]["shop/batch:8069"]["backends"][0]["slots"], 2,
        "{st}"
    );

    // A tenant key as an annotation, written as in TOML.
    let mut r = c.api.get("HTTPRoute", "shop", "acme").unwrap();
    r["metadata"]["annotations"]["portier.dev/maintenance"] = json!("true");
    c.api.apply(r);
    assert!(eventually_async(WAIT, || async { c.status_of("acme.test").await == 503 }).await);
}

/// "an invalid annotation likewise", "Matches on headers … are not supported", "One bad
/// object never takes down the others": `Accepted=False`, `UnsupportedValue`, the
/// message naming what; the route is not served, the others are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_routes_and_invalid_annotations_are_not_accepted() {
    let c = start("").await;
    let a = sim("a").await;
    c.base(&a);
    c.api.apply(route(
        "shop",
        "good",
        "infra",
        &["good.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
    c.api.apply(route(
        "shop",
        "bad-annotation",
        "infra",
        &["bad1.test"],
        json!([rule(&[], "odoo")]),
        json!({"portier.dev/integration": "{ rate = \"fast\" }"}),
    ));
    let mut headers = rule(&[], "odoo");
    headers["matches"] = json!([{"path": {"type": "PathPrefix", "value": "/"}, "headers": [{"name": "x", "value": "y"}]}]);
    c.api.apply(route(
        "shop",
        "bad-match",
        "infra",
        &["bad2.test"],
        json!([headers]),
        json!({}),
    ));
    let mut weights = rule(&[], "odoo");
    weights["backendRefs"] = json!([{"name": "odoo", "port": 8069, "weight": 50}, {"name": "odoo", "port": 8069, "weight": 50}]);
    c.api.apply(route(
        "shop",
        "bad-weights",
        "infra",
        &["bad3.test"],
        json!([weights]),
        json!({}),
    ));
    assert!(c.served_by("good.test", "/web/login", "a").await);
    for (name, host, words) in [
        ("bad-annotation", "bad1.test", "portier.dev/integration"),
        ("bad-match", "bad2.test", "headers"),
        ("bad-weights", "bad3.test", "several backendRefs"),
    ] {
        assert!(
            eventually_async(WAIT, || async {
                let r = c.api.get("HTTPRoute", "shop", name).unwrap();
                route_condition(&r, "Accepted").is_some_and(|x| {
                    x["status"] == "False"
                        && x["reason"] == "UnsupportedValue"
                        && x["message"].as_str().unwrap_or("").contains(words)
                })
            })
            .await,
            "{name}: {}",
            c.api.get("HTTPRoute", "shop", name).unwrap()
        );
        assert_eq!(c.status_of(host).await, 404, "{name} is not served");
    }
    let st = status(c.p.admin).await;
    assert!(
        st["kubernetes"]["problems"].as_array().unwrap().len() >= 3,
        "{st}"
    );
}

/// "ReferenceGrants (v1beta1) are required for a backendRef … into another namespace":
/// without one, `ResolvedRefs=False` `RefNotPermitted` and nothing reaches the Service;
/// with one, served. A missing Service is `BackendNotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_in_another_namespace_needs_a_reference_grant() {
    let c = start("").await;
    let a = sim("a").await;
    c.base(&a);
    let mut r = rule(&[], "odoo");
    r["backendRefs"][0]["namespace"] = json!("shop");
    c.api.apply(route(
        "tenants",
        "acme",
        "infra",
        &["acme.test"],
        json!([r]),
        json!({}),
    ));
    c.api.apply(route(
        "tenants",
        "lost",
        "infra",
        &["lost.test"],
        json!([rule(&[], "nothing")]),
        json!({}),
    ));
    let resolved = |name: &'static str, want: &'static str| {
        let api = &c.api;
        async move {
            let r = api.get("HTTPRoute", "tenants", name).unwrap();
            route_condition(&r, "ResolvedRefs").is_some_and(|x| x["reason"] == want)
        }
    };
    assert!(eventually_async(WAIT, || resolved("acme", "RefNotPermitted")).await);
    assert!(eventually_async(WAIT, || resolved("lost", "BackendNotFound")).await);
    let before = a.hits();
    assert!(c.status_of("acme.test").await >= 500);
    assert_eq!(a.hits(), before, "nothing reaches a Service not granted");
    c.api.apply(json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "from-tenants", "namespace": "shop"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "tenants"}],
                 "to": [{"group": "", "kind": "Service"}]}}));
    assert!(c.served_by("acme.test", "/web/login", "a").await);
    assert!(eventually_async(WAIT, || resolved("acme", "ResolvedRefs")).await);
}

/// "a host claimed both in the file and in an object is served as the file says; the
/// object gets a `Conflicted` condition" (its other hosts are served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_of_the_file_stays_the_files() {
    let f = sim("file").await;
    let extra = format!(
        "[pools.local]\nhttp = [\"{}\"]\n[tenants.mine]\nhosts = [\"acme.test\"]\npool = \"local\"\n",
        f.addr()
    );
    let c = start(&extra).await;
    let a = sim("a").await;
    c.base(&a);
    c.api.apply(route(
        "shop",
        "acme",
        "infra",
        &["acme.test", "other.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
    assert!(c.served_by("other.test", "/web/login", "a").await);
    assert_eq!(
        c.worker("acme.test", "/web/login").await.as_deref(),
        Some("file")
    );
    assert!(
        eventually_async(WAIT, || async {
            let r = c.api.get("HTTPRoute", "shop", "acme").unwrap();
            route_condition(&r, "Conflicted").is_some_and(|x| {
                x["status"] == "True" && x["message"].as_str().unwrap_or("").contains("acme.test")
            })
        })
        .await
    );
}

/// "Ingress (networking.k8s.io/v1) of class `ingress_class`": rule hosts, `Prefix`
/// and `Exact` paths, a port by number or by name; the status's `loadBalancer` from
/// `status_address`; an Ingress of another class is not portier's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_of_portiers_class_is_a_tenant() {
    let c = start("").await;
    let (a, b) = (sim("a").await, sim("b").await);
    c.base(&a);
    c.api.apply(service("shop", "batch", json!({})));
    c.api.apply(slice(
        "shop",
        "batch-1",
        "batch",
        "http",
        b.addr(),
        Ep::Ready,
    ));
    let ingress = |name: &str, class: &str, host: &str| {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": "shop", "annotations": {"portier.dev/database": "shop"}},
            "spec": {"ingressClassName": class, "rules": [{"host": host, "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "odoo", "port": {"number": 8069}}}},
                {"path": "/jsonrpc", "pathType": "Exact", "backend": {"service": {"name": "batch", "port": {"name": "http"}}}}]}}]}})
    };
    c.api.apply(ingress("shop", "portier", "shop.test"));
    c.api.apply(ingress("theirs", "nginx", "theirs.test"));
    assert!(
        c.served_by("shop.test", "/web/login", "a").await,
        "{}",
        c.p.stderr().join("\n")
    );
    assert_eq!(
        c.worker("shop.test", "/jsonrpc").await.as_deref(),
        Some("b")
    );
    assert_eq!(
        c.worker("shop.test", "/jsonrpc/x").await.as_deref(),
        Some("a"),
        "Exact"
    );
    assert_eq!(c.status_of("theirs.test").await, 404);
    assert!(
        eventually_async(WAIT, || async {
            c.api.get("Ingress", "shop", "shop").unwrap()["status"]["loadBalancer"]["ingress"][0]
                ["ip"]
                == "203.0.113.7"
        })
        .await
    );
    assert!(c.api.get("Ingress", "shop", "theirs").unwrap()["status"].is_null());
}

/// "Certificates from Secrets are served like pairs in `certs` (live, a bad pair keeps
/// the previous one) and appear in `/status` `certificates`"; `[tls]` needs no `certs`
/// with `[kubernetes]`. HTTPS listeners of the Gateway take the `kubernetes.io/tls`
/// Secrets of their `certificateRefs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_secrets_are_served_over_sni() {
    let ports_https = free_port();
    let c = start_with(
        &format!("https = \"127.0.0.1:{ports_https}\"\n"),
        "[tls]\nredirect_http = false\n",
        &[],
    )
    .await;
    let a = sim("a").await;
    let pki = TestPki::new();
    let (crt, key) = pki.issue(&["shop.test"], 30);
    c.api.apply(gateway_class());
    c.api.apply(gateway("infra", &["shop-tls"]));
    c.api.apply(tls_secret("infra", "shop-tls", &crt, &key));
    c.api.apply(service("shop", "odoo", json!({})));
    c.api
        .apply(slice("shop", "odoo-a", "odoo", "http", a.addr(), Ep::Ready));
    c.api.apply(route(
        "shop",
        "acme",
        "infra",
        &["shop.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
    let https = local(ports_https);
    let client = pki.client(&[b"http/1.1"], &[&rustls::version::TLS13]);
    let handshake = || async { tls_connect(https, "shop.test", client.clone()).await.ok() };
    assert!(
        eventually_async(WAIT, || async { handshake().await.is_some() }).await,
        "{}",
        c.p.stderr().join("\n")
    );
    // The Secret can be served before the Service's endpoints arrive: wait for both.
    assert!(
        eventually_async(WAIT, || async {
            match handshake().await {
                Some(s) => h1_over(s, "shop.test", "/web/login")
                    .await
                    .is_ok_and(|r| r.worker() == Some("a")),
                None => false,
            }
        })
        .await
    );
    let s = handshake().await.unwrap();
    assert_eq!(presented_names(&s), vec!["shop.test".to_string()]);
    let first = presented_der(&s);
    let r = h1_over(s, "shop.test", "/web/login").await.unwrap();
    assert_eq!(r.worker(), Some("a"));
    let st = status(c.p.admin).await;
    assert_eq!(st["certificates"], 1, "{st}");
    assert!(
        st["certificate_list"]
            .to_string()
            .contains("infra/shop-tls"),
        "{st}"
    );
    let m = get(c.p.admin, "admin", "/metrics").await.unwrap().text();
    assert!(
        m.contains("portier_cert_expiry_seconds{name=\"infra/shop-tls\"}"),
        "{m}"
    );

    // A bad pair keeps the previous certificate; a good one replaces it (live).
    c.api.apply(tls_secret(
        "infra",
        "shop-tls",
        &crt,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ));
    assert!(
        eventually_async(WAIT, || async {
            c.p.stderr()
                .iter()
                .any(|l| l.contains("certificate of a Secret rejected"))
        })
        .await
    );
    let s = handshake().await.unwrap();
    assert_eq!(presented_der(&s), first, "the previous certificate stays");
    let (crt2, key2) = pki.issue(&["shop.test"], 60);
    c.api.apply(tls_secret("infra", "shop-tls", &crt2, &key2));
    assert!(
        eventually_async(WAIT, || async {
            handshake()
                .await
                .is_some_and(|s| presented_der(&s) != first)
        })
        .await
    );
}
