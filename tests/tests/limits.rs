//! Per-tenant limits on integration traffic, end to end.

use std::time::Duration;

use bytes::Bytes;
use portier_tests::*;

const RPC: &[u8] = br#"{"jsonrpc":"2.0","method":"call","params":{},"id":1}"#;

async fn rpc(p: &Portier, host: &str, path: &str) -> Resp {
    request(
        p.http,
        "POST",
        host,
        path,
        &[("content-type", "application/json")],
        Bytes::from_static(RPC),
    )
    .await
    .unwrap()
}

async fn setup(limits: &str) -> (Portier, SimWorker) {
    let w = sim("w").await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = [\"{}\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n{limits}\n[tenants.other]\nhosts = [\"other.test\"]\npool = \"p\"\n{limits}\n[tenants.saas]\nhosts = [\"{{tenant}}.saas.test\"]\npool = \"p\"\n{limits}\n",
        ports.listen(),
        w.addr()
    );
    (Portier::start(&ports, &cfg).await, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_rate_gets_429_with_retry_after_and_json() {
    let (p, w) = setup("integration = { rate = \"2/s\", burst = 5 }").await;
    let mut ok = 0;
    let mut limited = Vec::new();
    for _ in 0..15 {
        let r = rpc(&p, "acme.test", "/jsonrpc").await;
        match r.status {
            200 => ok += 1,
            429 => limited.push(r),
            s => panic!("unexpected {s}"),
        }
    }
    assert!((5..=7).contains(&ok), "{ok} passed");
    assert!(limited.len() >= 8);
    let r = &limited[0];
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let body = r.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["class"], "integration");
    assert_eq!(body["retry_after"].as_u64(), Some(retry));
    assert_eq!(w.hits(), ok, "a refused request reached the worker");
    let log = p.wait_access_log(|v| v["refused"] == "rate_limited").await;
    assert_eq!(log["status"], 429);
    assert_eq!(log["tenant"], "acme");
    assert_eq!(log["backend"], serde_json::Value::Null);
    let metrics = get(p.admin, "admin", "/metrics").await.unwrap().text();
    let line = format!(
        "portier_rate_limited_total{{class=\"integration\",tenant=\"acme\"}} {}",
        limited.len()
    );
    assert!(metrics.contains(&line), "{line}");
    // XML-RPC is integration traffic too.
    let r = rpc(&p, "acme.test", "/xmlrpc/2/object").await;
    assert_eq!(r.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_tenants_and_interactive_traffic_are_not_limited() {
    let (p, _w) = setup("integration = { rate = \"1/h\", burst = 3 }").await;
    for _ in 0..3 {
        assert_eq!(rpc(&p, "acme.test", "/jsonrpc").await.status, 200);
    }
    assert_eq!(rpc(&p, "acme.test", "/jsonrpc").await.status, 429);
    // The same tenant's interactive and static traffic.
    for path in [
        "/web/dataset/call_kw",
        "/web/dataset/call_kw/res.partner/read",
        "/web/static/x.js",
    ] {
        for _ in 0..10 {
            assert_eq!(
                get(p.http, "acme.test", path).await.unwrap().status,
                200,
                "{path}"
            );
        }
    }
    // Another tenant with the same limits has its own budget.
    for _ in 0..3 {
        assert_eq!(rpc(&p, "other.test", "/jsonrpc").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_holds_with_slow_requests() {
    let (p, w) = setup("integration = { concurrency = 2 }").await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let addr = p.http;
        tasks.push(tokio::spawn(async move {
            request(
                addr,
                "POST",
                "acme.test",
                "/jsonrpc?sleep_ms=1000",
                &[],
                Bytes::from_static(RPC),
            )
            .await
            .unwrap()
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.json()["error"], "concurrency_limited");
                assert_eq!(r.header("retry-after"), Some("1"));
                limited += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, limited), (2, 4));
    assert_eq!(w.hits(), 2);
    // Slots are released when the requests finish.
    for _ in 0..3 {
        assert_eq!(rpc(&p, "acme.test", "/jsonrpc").await.status, 200);
    }
    p.wait_access_log(|v| v["refused"] == "concurrency_limited")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_template_tenant_has_its_own_budget() {
    let (p, _w) = setup("integration = { rate = \"1/h\", burst = 2 }").await;
    for host in ["x.saas.test", "y.saas.test"] {
        assert_eq!(rpc(&p, host, "/jsonrpc").await.status, 200, "{host}");
        assert_eq!(rpc(&p, host, "/jsonrpc").await.status, 200, "{host}");
        let r = rpc(&p, host, "/jsonrpc").await;
        assert_eq!(r.status, 429, "{host}");
        assert_eq!(r.json()["tenant"], host.split('.').next().unwrap());
    }
    let metrics = get(p.admin, "admin", "/metrics").await.unwrap().text();
    assert!(metrics.contains("portier_rate_limited_total{class=\"integration\",tenant=\"x\"} 1"));
    assert!(metrics.contains("portier_rate_limited_total{class=\"integration\",tenant=\"y\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_state_survives_a_reload_and_changed_limits_apply_at_once() {
    let w = sim("w").await;
    let ports = Ports::new();
    let base = format!("{}\n[pools.p]\nhttp = [\"{}\"]\n", ports.listen(), w.addr());
    let tenant = |burst: u32| {
        format!("[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\nintegration = {{ rate = \"1/h\", burst = {burst} }}\n")
    };
    let p = Portier::start(&ports, &format!("{base}{}", tenant(2))).await;
    for _ in 0..2 {
        assert_eq!(rpc(&p, "acme.test", "/jsonrpc").await.status, 200);
    }
    assert_eq!(rpc(&p, "acme.test", "/jsonrpc").await.status, 429);
    // Reload with the same limits (and a new tenant): still exhausted.
    std::fs::write(
        p.config_path(),
        format!(
            "{base}{}[tenants.new]\nhosts = [\"new.test\"]\npool = \"p\"\n",
            tenant(2)
        ),
    )
    .unwrap();
    let r = request(p.admin, "POST", "admin", "/reload", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        get(p.http, "new.test", "/web/dataset/call_kw")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(rpc(&p, "acme.test", "/jsonrpc").await.status, 429);
    // Raise the burst: applies at once.
    std::fs::write(p.config_path(), format!("{base}{}", tenant(5))).unwrap();
    let r = request(p.admin, "POST", "admin", "/reload", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(rpc(&p, "acme.test", "/jsonrpc").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_keeps_its_connection() {
    let (p, w) = setup("integration = { rate = \"1/h\", burst = 1 }").await;
    let mut conn = connect(p.http).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = send(
            &mut conn,
            "POST",
            "acme.test",
            "/jsonrpc",
            &[],
            Bytes::from_static(RPC),
        )
        .await
        .unwrap();
        assert_ne!(r.header("connection"), Some("close"));
        statuses.push(r.status);
    }
    assert_eq!(statuses, vec![200, 429, 429, 429]);
    // Interactive requests still flow on the same connection, body intact.
    let r = send(
        &mut conn,
        "POST",
        "acme.test",
        "/web/dataset/call_kw",
        &[],
        Bytes::from_static(RPC),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], RPC.len());
    assert_eq!(w.hits(), 2);
}
