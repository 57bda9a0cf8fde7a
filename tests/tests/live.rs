//! `GET /status/tenants` on the admin listener: each tenant's live figures over the last
//! 60 s — requests, errors (5xx not of portier's refusals), refusals, and the p99 of the
//! requests that reached a worker (null without any) — with `?q=` search and
//! `?limit=&offset=` paging.

use bytes::Bytes;
use portier_tests::*;
use serde_json::Value;

async fn tenants(p: &Portier, query: &str) -> Value {
    let r = get(p.admin, "admin", &format!("/status/tenants{query}"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

fn row<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tenant {name} in {v}"))
}

/// Rates over the window: every request, the errors (a worker's 500, not portier's
/// refusals), the refusals (429), and the p99 of the answered requests, which took
/// 150 ms at the worker; a tenant without requests has zeros and no p99.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_has_its_figures_over_the_last_minute() {
    let s = routing_setup(
        "[defaults]\nintegration = { rate = \"1/min\", burst = 1 }\n[tenants.quiet]\nhosts = [\"quiet.test\"]\npool = \"main\"\n",
    )
    .await;
    // acme: 6 answered (one slow), 2 errors from the worker, then 1 + 3 integration
    // calls of which 3 are refused (429).
    for i in 0..5 {
        assert_eq!(
            get(s.p.http, "acme.test", &format!("/web/x?i={i}"))
                .await
                .unwrap()
                .status,
            200
        );
    }
    let slow = get(s.p.http, "acme.test", "/web/slow?sleep_ms=150")
        .await
        .unwrap();
    assert_eq!(slow.status, 200);
    for _ in 0..2 {
        let r = get_with(
            s.p.http,
            "acme.test",
            "/web/fail",
            &[("x-sim-status", "500")],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 500);
    }
    let mut refused = 0;
    for _ in 0..4 {
        let r = request(
            s.p.http,
            "POST",
            "acme.test",
            "/jsonrpc",
            &[],
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        refused += usize::from(r.status == 429);
    }
    assert_eq!(refused, 3);
    let rate = |n: f64| ((n / 60.0) * 1000.0).round() / 1000.0;
    // A request is counted when its log line is written, just after its answer went
    // out: the last one may still be on its way when the client has its answer.
    k8s::eventually_async(std::time::Duration::from_secs(2), || async {
        row(&tenants(&s.p, "").await, "acme")["rps"] == rate(12.0)
    })
    .await;
    let v = tenants(&s.p, "").await;
    assert_eq!(v["window_s"], 60);
    let acme = row(&v, "acme");
    assert_eq!(
        acme["hosts"],
        serde_json::json!(["acme.test", "erp.acme.test"])
    );
    assert_eq!(acme["pool"], "main");
    assert_eq!(acme["maintenance"], false);
    assert_eq!(acme["rps"], rate(12.0), "{acme}");
    assert_eq!(acme["errors_per_s"], rate(2.0), "{acme}");
    assert_eq!(acme["refused_per_s"], rate(3.0), "{acme}");
    // 9 reached a worker; the p99 is the slow one's (150 ms, in a bucket of +50 %).
    let p99 = acme["p99_ms"].as_f64().unwrap();
    assert!((150.0..=230.0).contains(&p99), "p99 {p99}");
    let quiet = row(&v, "quiet");
    assert_eq!(quiet["rps"], 0.0);
    assert_eq!(quiet["p99_ms"], Value::Null);
}

/// A template's captured names are tenants of their own; `q` narrows by name or host;
/// `limit` and `offset` page (default limit 100).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_pages() {
    let mut extra = String::new();
    for i in 0..150 {
        extra.push_str(&format!(
            "[tenants.t{i:03}]\nhosts = [\"t{i:03}.example\"]\npool = \"main\"\n"
        ));
    }
    let s = routing_setup(&extra).await;
    for label in ["alpha", "beta"] {
        let host = format!("{label}.erp.test");
        assert_eq!(get(s.p.http, &host, "/web/x").await.unwrap().status, 200);
    }
    let v = tenants(&s.p, "").await;
    assert_eq!(v["total"], 2 + 150 + 2, "acme, saas, 150, alpha and beta");
    assert_eq!(v["tenants"].as_array().unwrap().len(), 100, "default limit");
    let alpha = row(&tenants(&s.p, "?q=alpha").await, "alpha").clone();
    assert_eq!(alpha["hosts"], serde_json::json!(["alpha.erp.test"]));
    assert_eq!(alpha["rps"], ((1.0 / 60.0) * 1000.0f64).round() / 1000.0);
    // q matches names and hosts, without regard to case.
    let v = tenants(&s.p, "?q=ERP.ACME").await;
    let names: Vec<&str> = v["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme"]);
    let v = tenants(&s.p, "?q=t14").await;
    assert_eq!(v["total"], 10, "t140..t149");
    // Pages: 150 of the t-tenants, 60 at a time.
    let mut seen = Vec::new();
    for offset in [0, 60, 120] {
        let v = tenants(&s.p, &format!("?q=.example&limit=60&offset={offset}")).await;
        assert_eq!(v["total"], 150);
        seen.extend(
            v["tenants"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_string()),
        );
    }
    assert_eq!(seen.len(), 150);
    seen.dedup();
    assert_eq!(seen.len(), 150, "pages overlap");
    // Only GET.
    let r = request(
        s.p.admin,
        "POST",
        "admin",
        "/status/tenants",
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 405);
}
