//! Routing and "what goes upstream", end to end: real portier, real sockets,
//! simulated Odoo workers.

use std::time::Duration;

use bytes::Bytes;
use portier_tests::routing_setup as setup;
use portier_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_hosts_and_templates_route_port_and_case_ignored() {
    let s = setup("").await;
    let r = get(s.p.http, "ACME.test:8069", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.upstream_header("x-odoo-dbfilter").as_deref(),
        Some("^acme_db$")
    );
    let r = get(s.p.http, "erp.acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(
        r.upstream_header("x-odoo-dbfilter").as_deref(),
        Some("^acme_db$")
    );
    // Template: the captured label is the tenant and its database.
    let r = get(s.p.http, "Beta.ERP.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.upstream_header("x-odoo-dbfilter").as_deref(),
        Some("^beta$")
    );
    let log = s.p.wait_access_log(|v| v["tenant"] == "beta").await;
    assert_eq!(log["class"], "interactive");
    // Two labels do not match a one-label template.
    let r = get(s.p.http, "a.b.erp.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_gets_404_and_no_worker_sees_it() {
    let s = setup("").await;
    for host in ["nobody.example", "erp.test", "acme.test.evil.example"] {
        let r = get(s.p.http, host, "/web/login").await.unwrap();
        assert_eq!(r.status, 404, "{host}");
        assert!(r.text().contains("unknown host"));
        assert!(r.header("x-request-id").is_some());
    }
    let log =
        s.p.wait_access_log(|v| v["refused"] == "unknown_host")
            .await;
    assert_eq!(log["tenant"], serde_json::Value::Null);
    assert_eq!(log["backend"], serde_json::Value::Null);
    assert_eq!(log["status"], 404);
    assert_eq!(hits(&s.http) + hits(&s.gevent), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classes_choose_the_backend_list() {
    let s = setup("").await;
    for w in &s.gevent {
        w.set_longpoll_hold(Duration::from_millis(50));
    }
    let cases = [
        ("/longpolling/poll", "g"),
        ("/websocket", "g"),
        ("/web/dataset/call_kw", "h"),
        ("/web/login", "h"),
        ("/jsonrpc", "h"),
        ("/xmlrpc/2/common", "h"),
        ("/web/static/src/img/logo.png", "h"),
        ("/web/assets/1/web.assets.js", "h"),
    ];
    for (path, kind) in cases {
        let r = get(s.p.http, "acme.test", path).await.unwrap();
        let worker = r.worker().unwrap_or("").to_string();
        assert!(
            worker.starts_with(kind),
            "{path} answered by {worker:?} ({})",
            r.status
        );
    }
    for (path, class) in [
        ("/longpolling/poll", "longpolling"),
        ("/jsonrpc", "integration"),
        ("/xmlrpc/2/common", "integration"),
        ("/web/static/src/img/logo.png", "static"),
        ("/web/login", "interactive"),
    ] {
        let log = s.p.wait_access_log(|v| v["path"] == path).await;
        assert_eq!(log["class"], class, "{path}");
        assert!(log["backend"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_relayed_both_ways_to_a_gevent_worker() {
    let s = setup("").await;
    let (mut ws, resp) = websocket(s.p.http, "acme.test", "/websocket", &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().get("x-request-id").is_some());
    for i in 0..20 {
        let msg = format!("message {i}");
        assert_eq!(ws_roundtrip(&mut ws, &msg).await.unwrap(), msg);
    }
    let who = ws_roundtrip(&mut ws, "whoami").await.unwrap();
    assert!(who.starts_with('g'), "websocket reached {who}");
    // The worker saw the tenant's database on the upgrade request too.
    let rec = s
        .gevent
        .iter()
        .flat_map(|w| w.requests())
        .find(|r| r.target == "/websocket")
        .expect("gevent worker saw the upgrade");
    assert_eq!(rec.header("x-odoo-dbfilter"), Some("^acme_db$"));
    assert_eq!(rec.header("x-odoo-database"), None, "never on the bus");
    assert_eq!(rec.header("upgrade"), Some("websocket"));
    drop(ws);
    // One line when the socket closes, from what the session keeps of the upgraded
    // request and its 101 (vendor patch 52: method, target, version, Host; the status).
    let log = s.p.wait_access_log(|v| v["status"] == 101).await;
    assert_eq!(log["class"], "longpolling");
    assert_eq!(log["method"], "GET");
    assert_eq!(log["path"], "/websocket");
    assert_eq!(log["tenant"], "acme");
    assert!(log["bytes"].as_u64().unwrap() > 0, "{log}");
    let backend = log["backend"].as_str().unwrap();
    assert!(s.gevent.iter().any(|w| w.addr().to_string() == backend));
}

/// An upgraded connection waits with a small read buffer that grows while reads fill it
/// and shrinks again after (vendor patch 15): messages across those sizes, in both
/// directions and in either order, arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_of_every_size_are_relayed_whole() {
    let s = setup("").await;
    let (mut ws, resp) = websocket(s.p.http, "acme.test", "/websocket", &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let sizes = [
        10,
        2_000,
        2_048,
        5_000,
        70_000,
        1 << 20,
        100,
        300_000,
        1,
        4_097,
    ];
    for (i, n) in sizes.into_iter().enumerate() {
        let body: String = (0..n)
            .map(|j| (b'a' + ((i + j) % 26) as u8) as char)
            .collect();
        let msg = format!("{i}:{body}");
        let back = ws_roundtrip(&mut ws, &msg).await.unwrap();
        assert!(
            back == msg,
            "message {i} of {n} bytes came back as {} bytes",
            back.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let s = setup("").await;
    let mut conn = connect(s.p.http).await;
    for _ in 0..40 {
        let r = send(
            &mut conn,
            "GET",
            "acme.test",
            "/web/dataset/call_kw",
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    let accepted: u64 = s.http.iter().map(|w| w.accepted_connections()).sum();
    assert_eq!(hits(&s.http), 40);
    assert!(
        accepted <= 4,
        "40 requests opened {accepted} worker connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_manager_is_blocked_unless_admin_cidr() {
    let s = setup(
        "[tenants.locked]\nhosts = [\"locked.test\"]\npool = \"main\"\nadmin_cidrs = [\"10.0.0.0/8\"]\n",
    )
    .await;
    for path in [
        "/web/database/manager",
        "/web/database/drop",
        "/web/%64atabase/manager",
        "/web/static/../database/selector",
    ] {
        let r = get(s.p.http, "locked.test", path).await.unwrap();
        assert_eq!(r.status, 403, "{path}");
    }
    assert_eq!(hits(&s.http), 0);
    let log =
        s.p.wait_access_log(|v| v["refused"] == "database_manager")
            .await;
    assert_eq!(log["status"], 403);
    // acme keeps the default admin_cidrs (127.0.0.0/8): allowed from here.
    let r = get(s.p.http, "acme.test", "/web/database/manager")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_is_retried_on_another() {
    let live = sim("live").await;
    let dead = free_port();
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = [\"127.0.0.1:{dead}\", \"{}\"]\n[tenants.t]\nhosts = [\"t.test\"]\npool = \"p\"\n",
        ports.listen(),
        live.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    for _ in 0..10 {
        let r = request(
            p.http,
            "POST",
            "t.test",
            "/web/dataset/call_kw",
            &[],
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.worker(), Some("live"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_apply_per_class() {
    let http = sim("h").await;
    let gevent = sim("g").await;
    gevent.set_longpoll_hold(Duration::from_secs(5));
    let ports = Ports::new();
    let cfg = format!(
        r#"{}
[defaults]
request_timeout = "1s"
longpolling_timeout = "2s"
websocket_idle = "1s"
[pools.p]
http = ["{}"]
longpolling = ["{}"]
retries = 0
[tenants.t]
hosts = ["t.test"]
pool = "p"
"#,
        ports.listen(),
        http.addr(),
        gevent.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    // An interactive request slower than request_timeout: 504.
    let start = std::time::Instant::now();
    let r = get(p.http, "t.test", "/web/dataset/call_kw?sleep_ms=4000")
        .await
        .unwrap();
    assert_eq!(r.status, 504);
    assert!(start.elapsed() < Duration::from_secs(3));
    // A longpoll held 1.5 s is fine under longpolling_timeout (2 s) though over request_timeout.
    let r = get(p.http, "t.test", "/longpolling/poll?sleep_ms=1500")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // Held longer than longpolling_timeout: 504.
    let r = get(p.http, "t.test", "/longpolling/poll").await.unwrap();
    assert_eq!(r.status, 504);
    // An idle websocket is closed after websocket_idle.
    let (mut ws, _) = websocket(p.http, "t.test", "/websocket", &[])
        .await
        .unwrap();
    assert_eq!(ws_roundtrip(&mut ws, "ping").await.unwrap(), "ping");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        ws_roundtrip(&mut ws, "late").await.is_err(),
        "idle websocket still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_gives_504() {
    // A listener whose accept queue is full: connects hang, as to a dead host.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(local(0)).unwrap();
    let addr = sock.local_addr().unwrap();
    let listener = sock.listen(0).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[defaults]\nconnect_timeout = \"500ms\"\n[pools.p]\nhttp = [\"{addr}\"]\nretries = 0\n[tenants.t]\nhosts = [\"t.test\"]\npool = \"p\"\n",
        ports.listen()
    );
    let p = Portier::start(&ports, &cfg).await;
    let start = std::time::Instant::now();
    let r = get(p.http, "t.test", "/web/dataset/call_kw").await.unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(start.elapsed() < Duration::from_secs(3));
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_json_line_per_request() {
    let s = setup("").await;
    let r = request(
        s.p.http,
        "POST",
        "acme.test",
        "/jsonrpc",
        &[("x-request-id", "log-1")],
        Bytes::from_static(b"{\"id\":1}"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let v = s.p.wait_access_log(|v| v["request_id"] == "log-1").await;
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    for k in [
        "ts",
        "request_id",
        "tenant",
        "class",
        "method",
        "path",
        "status",
        "bytes",
        "duration_ms",
        "backend",
        "refused",
    ] {
        assert!(keys.contains(&k), "missing {k} in {v}");
    }
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["class"], "integration");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/jsonrpc");
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes"].as_u64(), Some(r.body.len() as u64));
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0);
    let backend = v["backend"].as_str().unwrap();
    assert!(s.http.iter().any(|w| w.addr().to_string() == backend));
    assert_eq!(v["refused"], serde_json::Value::Null);
    assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        s.p.access_log()
            .iter()
            .filter(|v| v["request_id"] == "log-1")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_can_be_turned_off() {
    let s = setup("[log]\naccess = false\n").await;
    get(s.p.http, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.p.access_log().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_http10_and_expect_continue_behave() {
    let s = setup("").await;
    // HEAD: headers, no body.
    let (resp, _) = raw(
        s.p.http,
        b"HEAD /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.ends_with("\r\n\r\n"),
        "HEAD answered with a body: {resp:?}"
    );
    let (resp, _) = raw(
        s.p.http,
        b"HEAD / HTTP/1.1\r\nHost: nobody.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 404") && resp.ends_with("\r\n\r\n"),
        "{resp:?}"
    );
    // HTTP/1.0 without keep-alive: answered, then closed.
    let (resp, closed) = raw(
        s.p.http,
        b"GET /web/dataset/call_kw HTTP/1.0\r\nHost: acme.test\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    assert!(closed);
    // Expect: 100-continue with a small body: portier says 100, reads the body, and the
    // worker gets it without the Expect header.
    let mut stream = tokio::net::TcpStream::connect(s.p.http).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"POST /jsonrpc HTTP/1.1\r\nHost: acme.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    stream.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let mut b = [0u8; 4096];
        while let Ok(n) = stream.read(&mut b).await {
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&b[..n]);
            if rest.windows(4).any(|w| w == b"\r\n\r\n") && rest.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    let rec = s
        .http
        .iter()
        .flat_map(|w| w.requests())
        .find(|r| r.target == "/jsonrpc")
        .expect("the POST reached a worker");
    assert_eq!(rec.body_len, 5);
    assert!(rec.header("expect").is_none());
}
