//! Odoo fidelity, end to end: real portier in front of simulated Odoo servers that
//! behave like Odoo 16-19 (portier-sim: database selection, sessions, prefork HTTP
//! workers, the bus). Each test is a case the simulator's faithful behaviour exposed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use portier_sim::{Odoo, OdooVersion, Server, SimConfig};
use portier_tests::*;
use tokio_tungstenite::tungstenite::Message;

/// Three tenants whose databases share a prefix, on one PostgreSQL.
const DATABASES: &[&str] = &["acme", "acme2", "acmecorp"];

struct Setup {
    p: Portier,
    http: Vec<SimWorker>,
    gevent: Vec<SimWorker>,
    version: OdooVersion,
    _certs: Option<(TestPki, tempfile::TempDir, SocketAddr)>,
}

impl Setup {
    fn https(&self) -> (SocketAddr, &TestPki) {
        let (pki, _, addr) = self._certs.as_ref().expect("a TLS setup");
        (*addr, pki)
    }

    fn recorded(&self) -> Vec<portier_sim::Recorded> {
        self.http
            .iter()
            .chain(self.gevent.iter())
            .flat_map(|w| w.requests())
            .collect()
    }
}

/// `servers` Odoo servers of `version` (a prefork HTTP port and a gevent port each, one
/// PostgreSQL with [`DATABASES`] and one sessions directory) behind portier, tenant
/// per database. `tweak` adjusts the HTTP ports; `tls` adds an https listener.
async fn setup(
    version: OdooVersion,
    servers: usize,
    tweak: impl Fn(&mut SimConfig),
    tls: bool,
    pool_extra: &str,
) -> Setup {
    let odoo = Arc::new(Odoo::new(version, Some(DATABASES)));
    let mut http = Vec::new();
    let mut gevent = Vec::new();
    for i in 0..servers {
        let mut cfg = SimConfig::new(Server::Http, odoo.clone());
        tweak(&mut cfg);
        http.push(
            SimWorker::start_with(&format!("h{i}"), local(0), cfg)
                .await
                .unwrap(),
        );
        let cfg = SimConfig::new(Server::Gevent, odoo.clone());
        let g = SimWorker::start_with(&format!("g{i}"), local(0), cfg)
            .await
            .unwrap();
        g.set_longpoll_hold(Duration::from_millis(50));
        gevent.push(g);
    }
    let ports = Ports::new();
    let mut listen = ports.listen();
    let mut certs = None;
    if tls {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        pki.write_pair(
            dir.path(),
            "tenants",
            &["acme.test", "acme2.test", "acmecorp.test"],
            90,
        );
        listen.push_str(&format!(
            "https = \"127.0.0.1:{}\"\n[tls]\ncerts = \"{}\"\nredirect_http = false\n",
            ports.https,
            dir.path().display()
        ));
        certs = Some((pki, dir, local(ports.https)));
    }
    let addrs = |ws: &[SimWorker]| toml_list(&ws.iter().map(|w| w.addr()).collect::<Vec<_>>());
    let mut cfg = format!(
        "{listen}\n[pools.main]\nhttp = {}\nlongpolling = {}\n{pool_extra}\n",
        addrs(&http),
        addrs(&gevent)
    );
    for db in DATABASES {
        cfg.push_str(&format!(
            "[tenants.{db}]\nhosts = [\"{db}.test\"]\npool = \"main\"\ndatabase = \"{db}\"\n"
        ));
    }
    let p = Portier::start(&ports, &cfg).await;
    Setup {
        p,
        http,
        gevent,
        version,
        _certs: certs,
    }
}

fn cookie_of(r: &Resp) -> Option<String> {
    r.header("set-cookie")
        .and_then(|c| c.split(';').next())
        .filter(|c| c.starts_with("session_id="))
        .map(str::to_string)
}

/// A browser's login: the login page, the form, then the home page with the session.
/// Returns the session cookie and the home page's JSON.
async fn browser_login(s: &Setup, host: &str) -> (String, serde_json::Value) {
    let addr = s.p.http;
    let page = request(addr, "GET", host, "/web/login", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(page.status, 200, "{host} login page: {}", page.text());
    let cookie = cookie_of(&page)
        .unwrap_or_else(|| panic!("{host}: the login page set no session cookie: {page:?}"));
    let form = [
        ("cookie", cookie.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let posted = request(
        addr,
        "POST",
        host,
        "/web/login",
        &form,
        Bytes::from_static(b"login=alice&password=admin"),
    )
    .await
    .unwrap();
    assert_eq!(posted.status, 303, "{host} login: {}", posted.text());
    let cookie = cookie_of(&posted).expect("the login rotates the session cookie");
    let home = request(
        addr,
        "GET",
        host,
        s.version.home(),
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(home.status, 200, "{host} home: {}", home.text());
    (cookie, home.json())
}

async fn ask<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("no answer to {text:?}: {other:?}"),
    }
}

/// The whole browser flow for one Odoo version: logged in, staying logged in, and
/// the bus WebSocket authenticated by the same session.
async fn browser_stays_logged_in(version: OdooVersion) {
    let s = setup(version, 2, |_| {}, false, "").await;
    let (cookie, home) = browser_login(&s, "acme.test").await;
    assert_eq!(home["user"], "alice");
    assert_eq!(home["db"], "acme");
    for _ in 0..5 {
        let r = request(
            s.p.http,
            "GET",
            "acme.test",
            version.home(),
            &[("cookie", &cookie)],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["user"], "alice", "still logged in");
    }
    let (mut ws, resp) = websocket(s.p.http, "acme.test", "/websocket", &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert!(ask(&mut ws, "whoami").await.starts_with('g'));
    let session: serde_json::Value = serde_json::from_str(&ask(&mut ws, "session").await).unwrap();
    assert_eq!(session["login"], "alice");
    assert_eq!(session["db"], "acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo17_browser_login_stays_logged_in_and_opens_the_bus() {
    browser_stays_logged_in(OdooVersion::V17).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo19_browser_login_stays_logged_in_and_opens_the_bus() {
    browser_stays_logged_in(OdooVersion::V19).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo19_json2_call_without_a_cookie_reaches_the_tenant_database() {
    let s = setup(OdooVersion::V19, 1, |_| {}, false, "").await;
    for db in DATABASES {
        let r = request(
            s.p.http,
            "POST",
            &format!("{db}.test"),
            "/json/2/res.partner/search_read",
            &[
                ("authorization", "bearer key"),
                ("content-type", "application/json"),
            ],
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{db}: {}", r.text());
        assert_eq!(r.json()["db"], *db);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_sharing_a_prefix_each_see_exactly_their_own_database() {
    for version in [OdooVersion::V17, OdooVersion::V19] {
        let s = setup(version, 1, |_| {}, false, "").await;
        for db in DATABASES {
            let r = request(
                s.p.http,
                "GET",
                &format!("{db}.test"),
                "/web/login",
                &[],
                Bytes::new(),
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200, "{version:?} {db}: {}", r.text());
            assert_eq!(r.json()["db"], *db, "{version:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_of_one_tenant_never_reaches_its_database_on_another_host() {
    for version in [OdooVersion::V17, OdooVersion::V19] {
        let s = setup(version, 1, |_| {}, false, "").await;
        // Logged in at acme2; the cookie is then sent to acme's and acmecorp's hosts
        // (an unanchored filter `acme` admits the session's database `acme2`).
        let (cookie, _) = browser_login(&s, "acme2.test").await;
        for w in s.http.iter().chain(s.gevent.iter()) {
            w.reset_counters();
        }
        for host in ["acme.test", "acmecorp.test"] {
            let r = request(
                s.p.http,
                "GET",
                host,
                s.version.home(),
                &[("cookie", &cookie)],
                Bytes::new(),
            )
            .await
            .unwrap();
            assert_ne!(
                r.status,
                200,
                "{version:?} {host}: served as the acme2 user: {}",
                r.text()
            );
        }
        let leaked: Vec<_> = s
            .recorded()
            .into_iter()
            .filter(|r| r.db.as_deref() == Some("acme2"))
            .collect();
        assert!(
            leaked.is_empty(),
            "{version:?}: acme2 reached through another host: {leaked:?}"
        );
    }
}

/// An Odoo worker process recycled after `limit_request` drops the next request of its
/// kept-alive connection without an answer; idempotent requests are sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_recycled_mid_keep_alive_costs_no_get() {
    for servers in [2, 1] {
        let s = setup(
            OdooVersion::V17,
            servers,
            |c| c.limit_request = Some(3),
            false,
            "",
        )
        .await;
        let mut conn = connect(s.p.http).await;
        for i in 0..40 {
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
            assert_eq!(
                r.status,
                200,
                "{servers} servers, request {i}: {}",
                r.text()
            );
        }
        let recycled: u64 = s.http.iter().map(|w| w.recycled()).sum();
        assert!(recycled >= 5, "{servers} servers: only {recycled} recycles");
    }
}

/// A worker killed mid-request (`limit_time_real`) closes the connection before any byte
/// of its response: a GET is retried on another backend, a POST is not (502), and each
/// such failure counts toward the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_gets_its_gets_retried_and_its_breaker_opened() {
    let s = setup(
        OdooVersion::V17,
        2,
        |_| {},
        false,
        "retries = 1\nbreaker = { failures = 3, open_for = \"30s\" }\n",
    )
    .await;
    s.http[1].set_mode(Mode::Drop);
    for i in 0..20 {
        let r = get(
            s.p.http,
            "acme.test",
            &format!("/web/dataset/call_kw?i={i}"),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "GET {i}: {}", r.text());
        assert_eq!(r.worker(), Some("h0"));
    }
    let m = get(s.p.admin, "admin", "/metrics").await.unwrap().text();
    let retried = m
        .lines()
        .find(|l| l.starts_with("portier_upstream_retries_total{pool=\"main\",reason=\"closed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        (1..=3).contains(&retried),
        "retries counted: {retried}\n{m}"
    );
    let st = status(s.p.admin).await;
    let b = backend_status(&st, "main", &s.http[1].addr()).expect("listed");
    assert_eq!(b["breaker"], "open", "{st}");
    // A POST that reached the dying worker is never sent again.
    s.http[1].set_mode(Mode::Normal);
    s.http[0].set_mode(Mode::Drop);
    let r = request(
        s.p.http,
        "POST",
        "acme.test",
        "/web/dataset/call_kw",
        &[],
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let posts = |w: &SimWorker| w.requests().iter().filter(|r| r.method == "POST").count();
    assert_eq!(
        posts(&s.http[0]),
        1,
        "the POST reached the dying worker once"
    );
    assert_eq!(posts(&s.http[1]), 0, "and was never sent again");
}

/// Seen with real browsers: after an HTTP request to a gevent worker, the next
/// WebSocket of the same session to that worker got its 101 and was closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_after_http_requests_to_the_same_gevent_worker_is_relayed() {
    let s = setup(OdooVersion::V17, 1, |_| {}, false, "").await;
    let addr = s.p.http;
    let mut tasks = Vec::new();
    for t in 0..4 {
        tasks.push(tokio::spawn(async move {
            let cookie = format!("session_id=s{t}");
            let headers = [("cookie", cookie.as_str())];
            let mut fails = 0;
            for i in 0..60 {
                let r = request(
                    addr,
                    "POST",
                    "acme.test",
                    "/websocket/peek_notifications",
                    &headers,
                    Bytes::from_static(b"{}"),
                )
                .await
                .unwrap();
                assert_eq!(r.status, 200);
                let (mut ws, resp) = websocket(addr, "acme.test", "/websocket", &headers)
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 101);
                let got = tokio::time::timeout(Duration::from_secs(5), async {
                    ws.send(Message::text(format!("{t} {i}"))).await?;
                    ws.next().await.transpose()
                })
                .await;
                match got {
                    Ok(Ok(Some(Message::Text(x)))) if x.as_str() == format!("{t} {i}") => {}
                    _ => fails += 1,
                }
            }
            fails
        }));
    }
    let mut fails = 0;
    for t in tasks {
        fails += t.await.unwrap();
    }
    eprintln!(
        "FAILS {fails} accepted {}",
        s.gevent[0].accepted_connections()
    );
    assert_eq!(fails, 0);
}

/// The same, with the upgrade sent on the client connection that carried the HTTP
/// request (HTTP/1.1 lets a client upgrade a kept-alive connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrading_a_kept_alive_client_connection_is_relayed() {
    let s = setup(OdooVersion::V17, 1, |_| {}, false, "").await;
    let (cookie, _) = browser_login(&s, "acme.test").await;
    for i in 0..50 {
        let path = if i % 2 == 0 {
            "/longpolling/poll"
        } else {
            "/websocket/peek_notifications"
        };
        let stream = tokio::net::TcpStream::connect(s.p.http).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn.with_upgrades());
        let r = send(
            &mut sender,
            "POST",
            "acme.test",
            path,
            &[("cookie", &cookie)],
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{i} {path}");
        let req = http::Request::get("/websocket")
            .header("host", "acme.test")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("origin", "http://acme.test")
            .header("cookie", &cookie)
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 101, "round {i}");
        let upgraded = hyper::upgrade::on(resp).await.unwrap();
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            ws.send(Message::text(format!("round {i}"))).await?;
            ws.next().await.transpose()
        })
        .await;
        match got {
            Ok(Ok(Some(Message::Text(t)))) => assert_eq!(t.as_str(), format!("round {i}")),
            other => panic!("round {i} after {path}: the WebSocket relayed nothing: {other:?}"),
        }
    }
}

/// Browsers send `Origin` (Odoo 17+ refuses the handshake without it) and may spell
/// `Upgrade` differently; the bus works over the plain and the TLS listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_websocket_reaches_the_bus_over_plain_and_tls() {
    let s = setup(OdooVersion::V17, 1, |_| {}, true, "").await;
    let (cookie, _) = browser_login(&s, "acme.test").await;
    let headers = [
        ("cookie", cookie.as_str()),
        ("origin", "https://acme.test"),
        ("user-agent", "Mozilla/5.0"),
    ];
    let (mut ws, _) = websocket(s.p.http, "acme.test", "/websocket", &headers)
        .await
        .unwrap();
    assert!(ask(&mut ws, "session").await.contains("\"alice\""));
    let (addr, pki) = s.https();
    let stream = tls_connect(
        addr,
        "acme.test",
        pki.client(&[b"http/1.1"], &[&rustls::version::TLS13]),
    )
    .await
    .unwrap();
    let (mut ws, resp) =
        portier_sim::client::websocket_over(stream, "acme.test", "/websocket", &headers)
            .await
            .unwrap();
    assert_eq!(resp.status(), 101);
    assert!(ask(&mut ws, "session").await.contains("\"alice\""));
    let rec = s
        .gevent
        .iter()
        .flat_map(|w| w.requests())
        .filter(|r| r.target == "/websocket")
        .last()
        .expect("the gevent worker saw the upgrade");
    assert_eq!(rec.header("origin"), Some("https://acme.test"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
    // `Upgrade: WebSocket` from a client reaches Odoo as the exact token it needs.
    let raw_upgrade = format!(
        "GET /websocket HTTP/1.1\r\nHost: acme.test\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://acme.test\r\nCookie: {cookie}\r\n\r\n"
    );
    let (head, _) = raw(s.p.http, raw_upgrade.as_bytes(), Duration::from_millis(500)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// An upgrade without `Origin` is Odoo's to refuse (17+), and an upgrade sent to an
/// HTTP worker's port fails there as in Odoo; portier passes both answers through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_of_odoo_pass_through() {
    let s = setup(OdooVersion::V17, 1, |_| {}, false, "").await;
    let no_origin = "GET /websocket HTTP/1.1\r\nHost: acme.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (head, _) = raw(s.p.http, no_origin.as_bytes(), Duration::from_millis(500)).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_use_odoos_health_route() {
    let s = setup(
        OdooVersion::V17,
        2,
        |_| {},
        false,
        "health = { path = \"/web/health?db_server_status=1\", every = \"200ms\", timeout = \"1s\", rise = 1, fall = 1 }\n",
    )
    .await;
    // The PostgreSQL server goes away: /web/health?db_server_status=1 answers 500 and
    // every HTTP backend goes down (503 page); it comes back and so do they.
    s.http[0]
        .odoo()
        .db_server_up
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let addr = s.http[0].addr();
    let mut down = false;
    for _ in 0..50 {
        let st = status(s.p.admin).await;
        if backend_status(&st, "main", &addr).is_some_and(|b| b["up"] == false) {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(down, "the backend stayed up with its database server gone");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(s.p.http, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    s.http[0]
        .odoo()
        .db_server_up
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = get(s.p.http, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// Odoo 16-18's prefork workers close the connection after every response (werkzeug's
/// handler there speaks HTTP/1.0): nothing is pooled, and every request still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_close_after_each_response_are_served() {
    let s = setup(OdooVersion::V16, 2, |c| c.close_each = true, false, "").await;
    let mut conn = connect(s.p.http).await;
    for i in 0..20 {
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
        assert_eq!(r.status, 200, "request {i}");
    }
    let accepted: u64 = s.http.iter().map(|w| w.accepted_connections()).sum();
    assert_eq!(
        accepted, 20,
        "a closed connection was reused, or a request retried"
    );
}
