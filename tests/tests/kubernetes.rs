//! `[kubernetes]` end to end: portier's real kube-rs client against the API server
//! stand-in (`portier_tests::apiserver`), simulated Odoo workers as the endpoints.
//! Each test names the contract's sentence ("Kubernetes") it checks.

use std::time::Duration;

use portier_tests::apiserver::ApiServer;
use portier_tests::k8s::*;
use portier_tests::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

struct Cluster {
    api: ApiServer,
    p: Portier,
    ports: Ports,
}

fn config(ports: &Ports, kubeconfig: &std::path::Path, extra: &str) -> String {
    format!(
        "{}\n[kubernetes]\nkubeconfig = \"{}\"\nstatus_address = \"203.0.113.7\"\n{extra}",
        ports.listen(),
        kubeconfig.display()
    )
}

async fn start(extra_file: &str) -> Cluster {
    let api = ApiServer::start().await;
    let ports = Ports::new();
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    let kc_path = std::env::temp_dir().join(format!("portier-kc-{}", api.addr.port()));
    std::fs::copy(&kc, &kc_path).unwrap();
    let p = Portier::start(&ports, &config(&ports, &kc_path, extra_file)).await;
    Cluster { api, p, ports }
}

impl Cluster {
    /// Waits until `host`'s `path` is answered by worker `name`.
    async fn served_by(&self, host: &str, path: &str, name: &str) -> bool {
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

    async fn status_of(&self, host: &str) -> u16 {
        get(self.p.http, host, "/web/login")
            .await
            .map(|r| r.status)
            .unwrap_or(0)
    }

    /// The basic set: class, Gateway, Service `odoo` in `shop` with worker `w`.
    fn base(&self, w: &SimWorker) {
        self.api.apply(gateway_class());
        self.api.apply(gateway("infra", &[]));
        self.api.apply(service("shop", "odoo", json!({})));
        self.api
            .apply(slice("shop", "odoo-a", "odoo", "http", w.addr(), Ep::Ready));
    }
}

async fn eventually_async<F, Fut>(timeout: Duration, mut f: F) -> bool
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

/// "A route is a tenant", "Rules are routes and pools", "Endpoints", "Status":
/// an HTTPRoute is served from its Service's ready endpoints; endpoints added and
/// removed apply without a reload; the route's status is written; deleting it stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_is_served_from_its_services_ready_endpoints() {
    let c = start("").await;
    let (a, b) = (sim("a").await, sim("b").await);
    c.base(&a);
    c.api.apply(route(
        "shop",
        "acme",
        "infra",
        &["acme.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
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
    drop(c.ports);
}
