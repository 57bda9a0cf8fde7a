//! Live operations end to end: reload (SIGHUP, POST /reload, file watch), invalid
//! files, reload under load, WebSockets across reloads, drain on SIGTERM, systemd
//! notifications, admin endpoints and metrics.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use portier_sim::{Odoo, OdooVersion, Server, SimConfig};
use portier_tests::*;

fn config(ports: &Ports, w: &SimWorker, tenants: &[&str]) -> String {
    let mut cfg = format!("{}\n[pools.p]\nhttp = [\"{}\"]\n", ports.listen(), w.addr());
    for t in tenants {
        cfg.push_str(&format!(
            "[tenants.{t}]\nhosts = [\"{t}.test\"]\npool = \"p\"\n"
        ));
    }
    cfg
}

async fn routes(p: &Portier, host: &str) -> bool {
    get(p.http, host, "/web/dataset/call_kw")
        .await
        .map(|r| r.status == 200)
        .unwrap_or(false)
}

async fn wait_routes(p: &Portier, host: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if routes(p, host).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn reload(p: &Portier) -> Resp {
    request(p.admin, "POST", "admin", "/reload", &[], Bytes::new())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_post_reload_add_tenants() {
    let w = sim("w").await;
    let ports = Ports::new();
    let p = Portier::start(&ports, &config(&ports, &w, &["a"])).await;
    assert!(!routes(&p, "b.test").await);
    let v1 = status(p.admin).await["version"]
        .as_str()
        .unwrap()
        .to_string();

    std::fs::write(p.config_path(), config(&ports, &w, &["a", "b"])).unwrap();
    p.signal("HUP");
    assert!(
        wait_routes(&p, "b.test", Duration::from_secs(5)).await,
        "SIGHUP did not apply"
    );
    assert!(routes(&p, "a.test").await);

    std::fs::write(p.config_path(), config(&ports, &w, &["a", "b", "c"])).unwrap();
    let r = reload(&p).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v3 = r.json()["version"].as_str().unwrap().to_string();
    assert_eq!(v3.len(), 64);
    assert_ne!(v3, v1);
    // Applied by the time the answer came.
    assert!(routes(&p, "c.test").await);
    let st = status(p.admin).await;
    assert_eq!(st["version"], v3.as_str());
    assert_eq!(st["tenants"], 3);
    assert_eq!(st["last_error"], serde_json::Value::Null);
    let metrics = get(p.admin, "admin", "/metrics").await.unwrap().text();
    assert!(
        metrics.contains("portier_config_reloads_total{result=\"ok\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_leaves_the_old_config_serving_and_shows_the_error() {
    let w = sim("w").await;
    let ports = Ports::new();
    let p = Portier::start(&ports, &config(&ports, &w, &["a"])).await;
    let good = status(p.admin).await["version"].clone();
    std::fs::write(
        p.config_path(),
        format!(
            "{}[tenants.b]\nhosts = [\"b.test\"]\npool = \"nope\"\n",
            config(&ports, &w, &["a"])
        ),
    )
    .unwrap();
    let r = reload(&p).await;
    assert_eq!(r.status, 400);
    let errors = r.json()["errors"].clone();
    let first = errors[0].as_str().unwrap();
    let file = p.config_path().display().to_string();
    assert!(
        first.starts_with(&file) && first.contains("unknown pool \"nope\""),
        "{errors}"
    );
    assert!(routes(&p, "a.test").await);
    assert!(!routes(&p, "b.test").await);
    let st = status(p.admin).await;
    assert_eq!(st["version"], good);
    assert!(st["last_error"].as_str().unwrap().contains("unknown pool"));
    let metrics = get(p.admin, "admin", "/metrics").await.unwrap().text();
    assert!(metrics.contains("portier_config_reloads_total{result=\"error\"} 1"));
    assert!(p
        .stderr()
        .iter()
        .any(|l| l.contains("configuration reload failed")));
    // SIGHUP with the same bad file: still serving.
    p.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(routes(&p, "a.test").await);
    // Fixed: the error clears.
    std::fs::write(p.config_path(), config(&ports, &w, &["a", "b"])).unwrap();
    assert_eq!(reload(&p).await.status, 200);
    assert_eq!(status(p.admin).await["last_error"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_applied_without_a_signal() {
    let w = sim("w").await;
    let ports = Ports::new();
    let p = Portier::start(&ports, &config(&ports, &w, &["a"])).await;
    // An editor's way: write a temporary file, rename it over the original.
    let tmp = p.dir.path().join(".portier.toml.swp");
    std::fs::write(&tmp, config(&ports, &w, &["a", "b"])).unwrap();
    std::fs::rename(&tmp, p.config_path()).unwrap();
    assert!(
        wait_routes(&p, "b.test", Duration::from_secs(5)).await,
        "rename not picked up"
    );
    // In place.
    std::fs::write(p.config_path(), config(&ports, &w, &["a", "b", "c"])).unwrap();
    assert!(
        wait_routes(&p, "c.test", Duration::from_secs(5)).await,
        "write not picked up"
    );
    // Touching the file without changing it does not reload.
    let reloads = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("portier_config_reloads_total{result=\"ok\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = reloads(&get(p.admin, "admin", "/metrics").await.unwrap().text());
    std::fs::write(p.config_path(), config(&ports, &w, &["a", "b", "c"])).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = reloads(&get(p.admin, "admin", "/metrics").await.unwrap().text());
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_opened_before_reloads_still_echoes_after() {
    let w = sim("w").await;
    let ports = Ports::new();
    let p = Portier::start(&ports, &config(&ports, &w, &["a"])).await;
    let (mut ws, _) = websocket(p.http, "a.test", "/websocket", &[])
        .await
        .unwrap();
    assert_eq!(ws_roundtrip(&mut ws, "before").await.unwrap(), "before");
    for i in 0..3 {
        let tenants: Vec<String> = (0..=i)
            .map(|n| format!("t{n}"))
            .chain(["a".to_string()])
            .collect();
        let names: Vec<&str> = tenants.iter().map(|s| s.as_str()).collect();
        std::fs::write(p.config_path(), config(&ports, &w, &names)).unwrap();
        assert_eq!(reload(&p).await.status, 200);
        assert_eq!(
            ws_roundtrip(&mut ws, &format!("after {i}")).await.unwrap(),
            format!("after {i}")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_while_20_reloads_happen() {
    let w = sim("w").await;
    w.set_recording(false);
    let ports = Ports::new();
    let p = Portier::start(&ports, &config(&ports, &w, &["a"])).await;
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (d, s, f, addr) = (done.clone(), sent.clone(), failed.clone(), p.http);
    let client = tokio::spawn(async move {
        let mut conn = connect(addr).await;
        let mut failures = Vec::new();
        while !d.load(Ordering::Relaxed) || s.load(Ordering::Relaxed) < 1000 {
            let r = send(
                &mut conn,
                "GET",
                "a.test",
                "/web/dataset/call_kw",
                &[],
                Bytes::new(),
            )
            .await;
            s.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(r) if r.status == 200 => {}
                other => {
                    f.fetch_add(1, Ordering::Relaxed);
                    failures.push(format!("{other:?}").chars().take(200).collect::<String>());
                    conn = connect(addr).await;
                }
            }
            if s.load(Ordering::Relaxed) > 200_000 {
                break;
            }
        }
        failures
    });
    for i in 0..20 {
        let tenants: Vec<String> = std::iter::once("a".to_string())
            .chain((0..i % 5).map(|n| format!("x{n}")))
            .collect();
        let names: Vec<&str> = tenants.iter().map(|s| s.as_str()).collect();
        std::fs::write(p.config_path(), config(&ports, &w, &names)).unwrap();
        if i % 2 == 0 {
            assert_eq!(reload(&p).await.status, 200);
        } else {
            p.signal("HUP");
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    done.store(true, Ordering::Relaxed);
    let failures = client.await.unwrap();
    let total = sent.load(Ordering::Relaxed);
    assert!(total >= 1000, "only {total} requests");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} of {total} failed: {failures:?}",
        failures.len()
    );
    let metrics = get(p.admin, "admin", "/metrics").await.unwrap().text();
    assert!(
        metrics.contains("portier_config_reloads_total{result=\"ok\"} 20"),
        "not 20 reloads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_finish_then_exits_0() {
    let w = sim("w").await;
    let ports = Ports::new();
    let mut p = Portier::start(&ports, &config(&ports, &w, &["a"])).await;
    assert_eq!(get(p.admin, "admin", "/readyz").await.unwrap().status, 200);
    let addr = p.http;
    let slow =
        tokio::spawn(
            async move { get(addr, "a.test", "/web/dataset/call_kw?sleep_ms=1500").await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    p.signal("TERM");
    // readyz turns 503 at once (the admin listener stays up while draining).
    let mut not_ready = false;
    while t0.elapsed() < Duration::from_millis(500) {
        if let Ok(r) = get(p.admin, "admin", "/readyz").await {
            if r.status == 503 {
                not_ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready, "readyz did not turn 503");
    assert_eq!(get(p.admin, "admin", "/healthz").await.unwrap().status, 200);
    // The listener stops accepting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        get(p.http, "a.test", "/web/dataset/call_kw").await.is_err(),
        "still accepting after SIGTERM"
    );
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status, 200, "the in-flight request was cut");
    let status = p
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the drain");
    assert_eq!(status.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "waited for the whole drain budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_int_and_quit_when_idle_exit_0_at_once() {
    let w = sim("w").await;
    for sig in ["TERM", "INT", "QUIT"] {
        let ports = Ports::new();
        let mut p = Portier::start(&ports, &config(&ports, &w, &["a"])).await;
        get(p.http, "a.test", "/web/dataset/call_kw").await.unwrap();
        let t0 = Instant::now();
        p.signal(sig);
        let status = p.wait_exit(Duration::from_secs(10)).expect("exits");
        assert_eq!(status.code(), Some(0), "SIG{sig}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "SIG{sig} took {:?}",
            t0.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_are_sent() {
    let w = sim("w").await;
    let ports = Ports::new();
    let sockdir = tempfile::tempdir().unwrap();
    let sock_path = sockdir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut p = Portier::start_with(
        &ports,
        &config(&ports, &w, &["a"]),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    )
    .await;
    let mut buf = [0u8; 512];
    let mut read = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(read().trim(), "READY=1");
    assert_eq!(reload(&p).await.status, 200);
    let reloading = read();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(read().trim(), "READY=1");
    p.signal("TERM");
    assert_eq!(read().trim(), "STOPPING=1");
    assert_eq!(
        p.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_what_the_contract_lists() {
    let pki = TestPki::new();
    let certs = tempfile::tempdir().unwrap();
    pki.write_pair(certs.path(), "acme", &["a.test"], 60);
    let w = sim("w").await;
    let ports = Ports::new();
    let cfg = format!(
        "[listen]\nhttp = \"127.0.0.1:{}\"\nhttps = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\nthreads = 1\n[tls]\ncerts = \"{}\"\n[pools.p]\nhttp = [\"{}\"]\nlongpolling = [\"{}\"]\nworkers = 4\n[pools.q]\nhttp = [\"{}\"]\n[tenants.a]\nhosts = [\"a.test\"]\npool = \"p\"\nintegration = {{ rate = \"1/h\", burst = 1 }}\n",
        ports.http, ports.https, ports.admin, certs.path().display(), w.addr(), w.addr(), w.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    let _held = connect(p.http).await;
    get(p.http, "a.test", "/web/dataset/call_kw").await.unwrap();
    request(
        p.http,
        "POST",
        "a.test",
        "/jsonrpc",
        &[],
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    let r = request(
        p.http,
        "POST",
        "a.test",
        "/jsonrpc",
        &[],
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(reload(&p).await.status, 200);
    let metrics = get(p.admin, "admin", "/metrics").await.unwrap();
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let m = metrics.text();
    for name in [
        "portier_requests_total{class=\"interactive\",code=\"200\",tenant=\"a\"} 1",
        "portier_request_duration_seconds_bucket{class=\"interactive\",tenant=\"a\",le=",
        "portier_request_duration_seconds_count{class=\"integration\",tenant=\"a\"} 2",
        "portier_rate_limited_total{class=\"integration\",tenant=\"a\"} 1",
        "portier_backend_up{backend=",
        "portier_breaker_open{backend=",
        "portier_upstream_inflight{backend=",
        "portier_connections_open{listener=\"http\"}",
        "portier_connections_open{listener=\"https\"} 0",
        "portier_config_reloads_total{result=\"ok\"} 1",
        "portier_cert_expiry_seconds{name=\"acme\"}",
        "portier_upstream_retries_total{pool=\"p\",reason=\"closed\"} 0",
        "portier_queue_depth{class=\"integration\",pool=\"p\"} 0",
        "portier_queue_wait_seconds_count{class=\"interactive\",pool=\"p\"} 0",
        "portier_queue_refused_total{pool=\"p\",reason=\"queue_full\"} 0",
        "portier_backend_busy{backend=",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
    // A pool without worker slots never queues: no queue series (they cost memory per pool).
    assert!(m.contains("portier_upstream_retries_total{pool=\"q\",reason=\"closed\"} 0"));
    assert!(
        !m.contains("portier_queue_depth{class=\"interactive\",pool=\"q\"}"),
        "{m}"
    );
    let open: i64 = m
        .lines()
        .find(|l| l.starts_with("portier_connections_open{listener=\"http\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(open >= 1, "a held connection is not counted");
    let st = status(p.admin).await;
    assert_eq!(st["version"].as_str().unwrap().len(), 64);
    assert!(st["loaded_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(st["tenants"], 1);
    assert_eq!(st["certificates"], 1);
    let backends = st["pools"]["p"]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    for b in backends {
        for k in ["address", "role", "up", "breaker", "inflight"] {
            assert!(b.get(k).is_some(), "{k} missing in {b}");
        }
    }
    let roles: Vec<&str> = backends
        .iter()
        .map(|b| b["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, vec!["http", "longpolling"]);
    // Unknown admin paths and methods.
    assert_eq!(get(p.admin, "admin", "/nope").await.unwrap().status, 404);
    assert_eq!(get(p.admin, "admin", "/reload").await.unwrap().status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_not_served_on_the_public_listener() {
    let w = sim("w").await;
    let ports = Ports::new();
    let p = Portier::start(&ports, &config(&ports, &w, &["a"])).await;
    for path in ["/metrics", "/status", "/readyz", "/healthz"] {
        let r = get(p.http, "a.test", path).await.unwrap();
        assert_eq!(r.worker(), Some("w"), "{path} answered by portier itself");
        let r = get(p.http, "127.0.0.1", path).await.unwrap();
        assert_eq!(r.status, 404, "{path}");
        assert!(!r.text().contains("portier_"), "{path}");
    }
    let r = request(p.http, "POST", "127.0.0.1", "/reload", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_labels_stop_at_1000() {
    let w = sim("w").await;
    w.set_recording(false);
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[log]\naccess = false\n[pools.p]\nhttp = [\"{}\"]\n[tenants.t]\nhosts = [\"{{tenant}}.t.test\"]\npool = \"p\"\n",
        ports.listen(),
        w.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    let mut conn = connect(p.http).await;
    for i in 0..1010 {
        let r = send(
            &mut conn,
            "GET",
            &format!("n{i}.t.test"),
            "/web/dataset/call_kw",
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    let last = "portier_requests_total{class=\"interactive\",code=\"200\",tenant=\"_other\"} 10";
    let m = p.metrics_with(last).await;
    let tenants: std::collections::HashSet<&str> = m
        .lines()
        .filter(|l| l.starts_with("portier_requests_total{"))
        .filter_map(|l| l.split("tenant=\"").nth(1))
        .filter_map(|r| r.split('"').next())
        .collect();
    assert!(tenants.contains("_other"));
    assert_eq!(tenants.len(), 1001, "{} tenant labels", tenants.len());
    assert!(m.contains(last), "{m}");
}

/// Resident memory of a process, from /proc (statm's second field, in pages).
fn resident_mib(pid: u32) -> f64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// A burst of held longpolls takes memory; once it ends, portier hands at least half
/// of it back within a few seconds (proxy/src/ops/memory.rs: the control plane trims
/// the allocator when 256 requests ended since the peak). Without the trim, glibc's
/// malloc keeps all of it (51.2 MiB resident after the burst, 51.1 at its peak) and
/// the test fails; the mimalloc build gives the pages back by itself as well here.
///
/// The gevent worker here closes each connection after its answer (Odoo's gevent port
/// keeps them alive; its prefork port closes them): with keep-alive, up to 1 024 of the
/// burst's worker connections stay in portier's upstream pool for a minute, in use
/// rather than freed, and what they hold (~5 MiB, about half of what the burst leaves
/// behind) would put the measure at the border of "half" (seen failing in CI at 47 %
/// given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_of_a_burst_is_given_back_when_it_ends() {
    let http = sim("h").await;
    let odoo = Arc::new(Odoo::new(OdooVersion::V17, None));
    let mut gevent = SimConfig::new(Server::Gevent, odoo);
    gevent.close_each = true;
    let gevent = SimWorker::start_with("g", local(0), gevent).await.unwrap();
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = [\"{}\"]\nlongpolling = [\"{}\"]\n[tenants.t]\nhosts = [\"t.test\"]\npool = \"p\"\n",
        ports.listen(),
        http.addr(),
        gevent.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    assert!(routes(&p, "t.test").await);
    let before = resident_mib(p.pid());
    let n = 1500;
    let held: Vec<_> = (0..n)
        .map(|_| tokio::spawn(get(p.http, "t.test", "/longpolling/poll?sleep_ms=3000")))
        .collect();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let peak = resident_mib(p.pid());
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
    assert!(
        peak - before >= 8.0,
        "{n} held longpolls took only {:.1} MiB ({before:.1} -> {peak:.1}): nothing to give back",
        peak - before
    );
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut now = resident_mib(p.pid());
    while now > before + (peak - before) / 2.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        now = resident_mib(p.pid());
    }
    assert!(
        now <= before + (peak - before) / 2.0,
        "resident {before:.1} MiB before the burst, {peak:.1} MiB with it, {now:.1} MiB 6 s after it ended"
    );
}
