//! Backend selection end to end: tenant spread, sticky sessions, health checks,
//! circuit breakers, retries, the 503 page, DNS discovery.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use portier_tests::*;

async fn sims(prefix: &str, n: usize) -> Vec<SimWorker> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(sim(&format!("{prefix}{i}")).await);
    }
    v
}

fn addrs(ws: &[SimWorker]) -> Vec<std::net::SocketAddr> {
    ws.iter().map(|w| w.addr()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_bounds_the_workers_a_tenant_touches() {
    let http = sims("w", 5).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\nspread = 2\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n[tenants.saas]\nhosts = [\"{{tenant}}.saas.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http))
    );
    let p = Portier::start(&ports, &cfg).await;
    let mut all = HashSet::new();
    for host in [
        "acme.test",
        "a.saas.test",
        "b.saas.test",
        "c.saas.test",
        "d.saas.test",
        "e.saas.test",
    ] {
        let mut conn = connect(p.http).await;
        let mut used = HashSet::new();
        for _i in 0..40 {
            let r = send(
                &mut conn,
                "GET",
                host,
                "/web/dataset/call_kw",
                &[],
                Bytes::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{host} #{_i}: {e}"));
            assert_eq!(r.status, 200);
            used.insert(r.worker().unwrap().to_string());
        }
        assert_eq!(used.len(), 2, "{host} used {used:?}");
        all.extend(used);
    }
    // Different tenants land on different pairs.
    assert!(all.len() >= 3, "all tenants on {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_sticks_to_one_worker() {
    let http = sims("w", 4).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http))
    );
    let p = Portier::start(&ports, &cfg).await;
    let mut owners = HashSet::new();
    for _ in 0..12 {
        let login = get(p.http, "acme.test", "/web/login").await.unwrap();
        let cookie = login
            .header("set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let mut seen = HashSet::new();
        for _ in 0..15 {
            let r = get_with(p.http, "acme.test", "/web/dataset", &[("cookie", &cookie)])
                .await
                .unwrap();
            seen.insert(r.worker().unwrap().to_string());
        }
        assert_eq!(seen.len(), 1, "{cookie} went to {seen:?}");
        owners.extend(seen);
    }
    assert!(owners.len() >= 2, "12 sessions all on {owners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longpolling_session_stays_on_its_gevent_worker() {
    let http = sims("h", 1).await;
    let gevent = sims("g", 3).await;
    for g in &gevent {
        g.set_longpoll_hold(Duration::from_millis(20));
    }
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\nlongpolling = {}\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http)),
        toml_list(&addrs(&gevent))
    );
    let p = Portier::start(&ports, &cfg).await;
    let mut owners = HashSet::new();
    for s in 0..8 {
        let cookie = format!("session_id=lp{s}abcdef");
        let mut seen = HashSet::new();
        for _ in 0..6 {
            let r = get_with(
                p.http,
                "acme.test",
                "/longpolling/poll",
                &[("cookie", &cookie)],
            )
            .await
            .unwrap();
            seen.insert(r.worker().unwrap().to_string());
        }
        let (mut ws, _) = websocket(p.http, "acme.test", "/websocket", &[("cookie", &cookie)])
            .await
            .unwrap();
        seen.insert(ws_roundtrip(&mut ws, "whoami").await.unwrap());
        assert_eq!(seen.len(), 1, "{cookie}: {seen:?}");
        owners.extend(seen);
    }
    assert!(owners.len() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_worker_is_ejected_while_gets_keep_succeeding() {
    let http = sims("w", 3).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\nbreaker = {{ failures = 3, open_for = \"60s\" }}\nretries = 1\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http))
    );
    let p = Portier::start(&ports, &cfg).await;
    http[1].set_mode(Mode::Status(502));
    for i in 0..60 {
        let r = get(p.http, "acme.test", "/web/dataset/call_kw")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "request {i}");
        assert_ne!(r.worker(), Some("w1"));
    }
    assert_eq!(
        http[1].hits(),
        3,
        "the failing worker got {} requests",
        http[1].hits()
    );
    let st = status(p.admin).await;
    let b = backend_status(&st, "p", &http[1].addr()).unwrap();
    assert_eq!(b["breaker"], "open");
    assert_eq!(
        backend_status(&st, "p", &http[0].addr()).unwrap()["breaker"],
        "closed"
    );
    let metrics = get(p.admin, "admin", "/metrics").await.unwrap().text();
    let line = format!(
        "portier_breaker_open{{backend=\"{}\",pool=\"p\"}} 1",
        http[1].addr()
    );
    assert!(metrics.contains(&line), "{line} not in metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_reset_connections_open_the_breaker_too() {
    let http = sims("w", 2).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\nbreaker = {{ failures = 2, open_for = \"60s\" }}\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http))
    );
    let p = Portier::start(&ports, &cfg).await;
    http[0].set_mode(Mode::Reset);
    for _ in 0..20 {
        // A reset after the request was sent fails that attempt (502) unless it was retried.
        let r = get(p.http, "acme.test", "/web/dataset/call_kw")
            .await
            .unwrap();
        assert!(r.status == 200 || r.status == 502, "{}", r.status);
    }
    let st = status(p.admin).await;
    assert_eq!(
        backend_status(&st, "p", &http[0].addr()).unwrap()["breaker"],
        "open"
    );
    for _ in 0..10 {
        let r = get(p.http, "acme.test", "/web/dataset/call_kw")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.worker(), Some("w1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_method_safety() {
    let http = sims("w", 2).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\nbreaker = {{ failures = 100, open_for = \"60s\" }}\nretries = 1\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http))
    );
    let p = Portier::start(&ports, &cfg).await;
    // GET answered 502 by a worker: retried once on the other one.
    let r = get_with(
        p.http,
        "acme.test",
        "/web/dataset/call_kw",
        &[("x-sim-status", "502")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(http[0].hits() + http[1].hits(), 2);
    // POST that reached a worker: never retried.
    let r = request(
        p.http,
        "POST",
        "acme.test",
        "/web/dataset/call_kw",
        &[("x-sim-status", "503")],
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(http[0].hits() + http[1].hits(), 3);
    // A GET whose first worker answers 504 and the second 200: the client gets 200.
    http[0].set_mode(Mode::Status(504));
    for _ in 0..6 {
        let r = get(p.http, "acme.test", "/web/dataset/call_kw")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_gives_the_503_maintenance_page() {
    let http = sims("w", 2).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\nhealth = {{ every = \"200ms\", timeout = \"200ms\", rise = 1, fall = 1 }}\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http))
    );
    let p = Portier::start(&ports, &cfg).await;
    assert_eq!(
        get(p.http, "acme.test", "/web/dataset/call_kw")
            .await
            .unwrap()
            .status,
        200
    );
    for w in &http {
        w.set_mode(Mode::Status(500));
    }
    let admin = p.admin;
    let mut down = false;
    for _ in 0..50 {
        let st = status(admin).await;
        if http
            .iter()
            .all(|w| backend_status(&st, "p", &w.addr()).unwrap()["up"] == false)
        {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(down, "health checks did not mark the workers down");
    let before: u64 = http.iter().map(|w| w.hits()).sum();
    let r = get(p.http, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.text().contains("<html"));
    // Only health checks reached the workers, not the request.
    let after_hits: Vec<_> = http
        .iter()
        .flat_map(|w| w.requests())
        .filter(|r| r.target == "/web/dataset/call_kw")
        .collect();
    assert_eq!(after_hits.len(), 1, "{before}");
    let log = p.wait_access_log(|v| v["status"] == 503).await;
    assert_eq!(log["refused"], "no_backend");
    let metrics = get(p.admin, "admin", "/metrics").await.unwrap().text();
    assert!(metrics.contains(&format!(
        "portier_backend_up{{backend=\"{}\",pool=\"p\"}} 0",
        http[0].addr()
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_worker_gets_traffic_back() {
    let http = sims("w", 2).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\nhealth = {{ every = \"300ms\", timeout = \"200ms\", rise = 1, fall = 2 }}\nbreaker = {{ failures = 2, open_for = \"1s\" }}\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http))
    );
    let p = Portier::start(&ports, &cfg).await;
    http[0].set_mode(Mode::Refuse);
    // Traffic keeps flowing on w1 while w0 is dead.
    for _ in 0..20 {
        let r = get(p.http, "acme.test", "/web/dataset/call_kw")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.worker(), Some("w1"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    http[0].set_mode(Mode::Normal);
    let back = Instant::now();
    let mut recovered = None;
    while back.elapsed() < Duration::from_secs(6) {
        let r = get(p.http, "acme.test", "/web/dataset/call_kw")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        if r.worker() == Some("w0") {
            recovered = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let took = recovered.expect("w0 never got traffic back");
    // open_for (1 s) + health.every (0.3 s), with slack for a loaded machine.
    assert!(took < Duration::from_millis(3300), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_failing_worker_out_and_back() {
    let http = sims("w", 2).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\nhealth = {{ path = \"/web/health\", every = \"150ms\", timeout = \"500ms\", rise = 2, fall = 2 }}\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http))
    );
    let p = Portier::start(&ports, &cfg).await;
    http[1].set_mode(Mode::Slow(Duration::from_secs(2)));
    let admin = p.admin;
    let a1 = http[1].addr();
    let mut down = false;
    for _ in 0..40 {
        if backend_status(&status(admin).await, "p", &a1).unwrap()["up"] == false {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(down, "a worker whose health check times out stays up");
    http[1].set_mode(Mode::Normal);
    http[1].reset_counters();
    for _ in 0..20 {
        let r = get(p.http, "acme.test", "/web/dataset/call_kw")
            .await
            .unwrap();
        assert_eq!(r.worker(), Some("w0"));
    }
    let mut up = false;
    for _ in 0..40 {
        if backend_status(&status(admin).await, "p", &a1).unwrap()["up"] == true {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up);
    let mut served = HashSet::new();
    for _ in 0..20 {
        served.insert(
            get(p.http, "acme.test", "/web/dataset/call_kw")
                .await
                .unwrap()
                .worker()
                .unwrap()
                .to_string(),
        );
    }
    assert!(served.contains("w1"));
    let checks: Vec<_> = http[1]
        .requests()
        .into_iter()
        .filter(|r| r.target == "/web/health")
        .collect();
    assert!(!checks.is_empty());
    assert_eq!(checks[0].header("user-agent"), Some("portier-health-check"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_spills_to_the_pool_when_the_tenants_workers_are_out() {
    let http = sims("w", 4).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\nspread = 2\nretries = 2\nbreaker = {{ failures = 1, open_for = \"60s\" }}\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs(&http))
    );
    let p = Portier::start(&ports, &cfg).await;
    let mut own = HashSet::new();
    for _ in 0..30 {
        own.insert(
            get(p.http, "acme.test", "/web/dataset/call_kw")
                .await
                .unwrap()
                .worker()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(own.len(), 2);
    for w in &http {
        if own.contains(w.name()) {
            w.set_mode(Mode::Refuse);
        }
    }
    let mut spill = HashSet::new();
    for _ in 0..30 {
        let r = get(p.http, "acme.test", "/web/dataset/call_kw")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        spill.insert(r.worker().unwrap().to_string());
    }
    // The first request tried both of the tenant's workers, then spilled (retries = 2).
    assert!(spill.is_disjoint(&own), "{spill:?} vs {own:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_the_record_set() {
    // Workers on 127.0.0.2, .3 and .4, all on one port, found through DNS.
    let port = free_port();
    let ip = |n: u8| Ipv4Addr::new(127, 0, 0, n);
    let mut workers = Vec::new();
    for n in [2u8, 3, 4] {
        workers.push(
            SimWorker::start(
                &format!("pod{n}"),
                std::net::SocketAddr::from((ip(n), port)),
            )
            .await
            .unwrap(),
        );
    }
    let dns = TestDns::start("odoo.erp.svc.cluster.local", &[ip(2), ip(3)]).await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.k8s]\ndiscover = {{ dns = \"odoo.erp.svc.cluster.local\", http_port = {port}, every = \"200ms\", resolver = \"{}\" }}\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"k8s\"\n",
        ports.listen(),
        dns.addr
    );
    let p = Portier::start(&ports, &cfg).await;

    async fn served(p: &Portier, n: usize) -> HashSet<String> {
        let mut s = HashSet::new();
        for _ in 0..n {
            if let Ok(r) = get(p.http, "acme.test", "/web/dataset/call_kw").await {
                if let Some(w) = r.worker() {
                    s.insert(w.to_string());
                }
            }
        }
        s
    }
    async fn wait_for(p: &Portier, want: &[&str]) -> bool {
        let want: HashSet<String> = want.iter().map(|s| s.to_string()).collect();
        for _ in 0..40 {
            if served(p, 20).await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
    assert!(
        wait_for(&p, &["pod2", "pod3"]).await,
        "initial set not discovered"
    );
    // A pod leaves.
    dns.set(&[ip(3)]);
    assert!(wait_for(&p, &["pod3"]).await, "pod2 still served");
    // The resolver breaks: the last known set is kept.
    dns.fail();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(served(&p, 10).await, HashSet::from(["pod3".to_string()]));
    assert!(p
        .stderr()
        .iter()
        .any(|l| l.contains("DNS discovery failed")));
    // Pods join.
    dns.set(&[ip(3), ip(4), ip(2)]);
    assert!(
        wait_for(&p, &["pod2", "pod3", "pod4"]).await,
        "new pods not discovered"
    );
    let st = status(p.admin).await;
    assert_eq!(st["pools"]["k8s"]["backends"].as_array().unwrap().len(), 3);
}
