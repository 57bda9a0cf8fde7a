use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw(addr: SocketAddr, req: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The first bytes of the answer (for answers on connections left open).
async fn first(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn health_login_and_echo() {
    let w = SimWorker::start("w1", local()).await.unwrap();
    let r = raw(
        w.addr(),
        "GET /web/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains(r#"{"status": "pass"}"#), "{r}");
    let r = raw(
        w.addr(),
        "GET /web/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(
        r.to_ascii_lowercase().contains("set-cookie: session_id="),
        "{r}"
    );
    let r = raw(
            w.addr(),
            "POST /web/dataset HTTP/1.1\r\nHost: x\r\nX-Test: 1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await
        .unwrap();
    assert!(r.contains(r#""x-test":"1""#), "{r}");
    assert!(r.contains(r#""body_len":3"#), "{r}");
    assert_eq!(w.hits(), 3);
    assert_eq!(w.requests()[2].header("x-test"), Some("1"));
}

#[tokio::test]
async fn failure_modes() {
    let w = SimWorker::start("w1", local()).await.unwrap();
    let addr = w.addr();
    w.set_mode(Mode::Status(503));
    let r = raw(
        addr,
        "GET /web/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    w.set_mode(Mode::Refuse);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
    w.set_mode(Mode::Reset);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = raw(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|s| s.is_empty()),
        "{r:?}"
    );
    w.set_mode(Mode::Normal);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = raw(
        addr,
        "GET /x?sleep_ms=10 HTTP/1.1\r\nHost: x\r\nx-sim-status: 502\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
}

fn cfg(server: Server, version: OdooVersion, dbs: Option<&[&str]>) -> SimConfig {
    SimConfig::new(server, Arc::new(Odoo::new(version, dbs)))
}

fn set_cookie(r: &str) -> Option<String> {
    r.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: "))
        .map(|l| l[12..].split(';').next().unwrap_or("").to_string())
}

#[tokio::test]
async fn login_flow_and_odoo19_stateless_header() {
    let w = SimWorker::start_with(
        "w",
        local(),
        cfg(Server::Http, OdooVersion::V19, Some(&["acme", "beta"])),
    )
    .await
    .unwrap();
    let a = w.addr();
    let r = raw(a, "GET /web/login HTTP/1.1\r\nHost: x\r\nX-Odoo-dbfilter: ^acme$\r\nConnection: close\r\n\r\n").await.unwrap();
    let c = set_cookie(&r).expect("a session cookie");
    let post = format!("POST /web/login HTTP/1.1\r\nHost: x\r\nX-Odoo-dbfilter: ^acme$\r\nCookie: {c}\r\nContent-Length: 26\r\nConnection: close\r\n\r\nlogin=bob&password=admin&x");
    let r = raw(a, &post).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    let c2 = set_cookie(&r).expect("the rotated session cookie");
    assert_ne!(c, c2);
    let r = raw(a, &format!("GET /odoo HTTP/1.1\r\nHost: x\r\nX-Odoo-dbfilter: ^acme$\r\nCookie: {c2}\r\nConnection: close\r\n\r\n")).await.unwrap();
    assert!(
        r.contains(r#""user":"bob""#) && r.contains(r#""db":"acme""#),
        "{r}"
    );
    // With X-Odoo-Database and no cookie: the session is never saved.
    let r = raw(
        a,
        "GET /web/login HTTP/1.1\r\nHost: x\r\nX-Odoo-Database: acme\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(
        r.starts_with("HTTP/1.1 200") && set_cookie(&r).is_none(),
        "{r}"
    );
    // With a session of acme and the header naming beta: 403.
    let r = raw(a, &format!("GET /odoo HTTP/1.1\r\nHost: x\r\nX-Odoo-Database: beta\r\nCookie: {c2}\r\nConnection: close\r\n\r\n")).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // Odoo 19's JSON-2 API on the header's database.
    let r = raw(a, "POST /json/2/res.partner/search HTTP/1.1\r\nHost: x\r\nX-Odoo-Database: beta\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").await.unwrap();
    assert!(r.contains(r#""db":"beta""#), "{r}");
}

#[tokio::test]
async fn unanchored_filter_admits_prefixed_databases() {
    let w = SimWorker::start_with(
        "w",
        local(),
        cfg(Server::Http, OdooVersion::V17, Some(&["acme", "acme2"])),
    )
    .await
    .unwrap();
    let r = raw(
        w.addr(),
        "GET /web/login HTTP/1.1\r\nHost: x\r\nX-Odoo-dbfilter: acme\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    // Two databases pass `re.match("acme", ...)`: no monodb, the selector.
    assert!(
        r.starts_with("HTTP/1.1 303") && r.contains("/web/database/selector"),
        "{r}"
    );
}

#[tokio::test]
async fn recycled_process_drops_the_next_request_unanswered() {
    let mut c = cfg(Server::Http, OdooVersion::V17, None);
    c.limit_request = Some(2);
    let w = SimWorker::start_with("w", local(), c).await.unwrap();
    let mut s = TcpStream::connect(w.addr()).await.unwrap();
    let req = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    assert_eq!(w.recycled(), 1);
}

#[tokio::test]
async fn a_body_stalled_past_the_socket_timeout_is_dropped() {
    let mut c = cfg(Server::Http, OdooVersion::V17, None);
    c.socket_timeout = Some(Duration::from_millis(200));
    let w = SimWorker::start_with("w", local(), c).await.unwrap();
    let mut s = TcpStream::connect(w.addr()).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _ = s.write_all(b"defghij").await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert_eq!(w.stalled(), 1);
    assert_eq!(w.hits(), 0);
}

#[tokio::test]
async fn websocket_handshake_checks() {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let hs = |extra: &str, upgrade: &str| {
        format!("GET /websocket HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n")
    };
    let gevent = SimWorker::start_with("g", local(), cfg(Server::Gevent, OdooVersion::V17, None))
        .await
        .unwrap();
    let r = first(gevent.addr(), &hs("", "websocket")).await;
    assert!(r.starts_with("HTTP/1.1 400"), "no Origin: {r}");
    let r = first(gevent.addr(), &hs("Origin: http://x\r\n", "WebSocket")).await;
    assert!(r.starts_with("HTTP/1.1 400"), "Upgrade spelling: {r}");
    let mut s = TcpStream::connect(gevent.addr()).await.unwrap();
    s.write_all(
        hs(
            "Origin: http://x\r\nSec-WebSocket-Extensions: permessage-deflate\r\n",
            "websocket",
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    // Odoo 16 does not require Origin; a prefork HTTP worker cannot serve the bus.
    let g16 = SimWorker::start_with("g", local(), cfg(Server::Gevent, OdooVersion::V16, None))
        .await
        .unwrap();
    let r = first(g16.addr(), &hs("", "websocket")).await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
    let http = SimWorker::start_with("h", local(), cfg(Server::Http, OdooVersion::V17, None))
        .await
        .unwrap();
    let r = first(http.addr(), &hs("Origin: http://x\r\n", "websocket")).await;
    assert!(
        r.starts_with("HTTP/1.1 500") && r.contains("evented port"),
        "{r}"
    );
}

#[tokio::test]
async fn health_with_db_server_status() {
    let w = SimWorker::start("w", local()).await.unwrap();
    let get = "GET /web/health?db_server_status=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let r = raw(w.addr(), get).await.unwrap();
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains(r#""db_server_status":true"#),
        "{r}"
    );
    w.odoo().db_server_up.store(false, Ordering::Relaxed);
    let r = raw(w.addr(), get).await.unwrap();
    assert!(
        r.starts_with("HTTP/1.1 500") && r.contains(r#""status":"fail""#),
        "{r}"
    );
}

#[tokio::test]
async fn prefork_workers_serve_one_request_each_at_a_time() {
    let mut c = cfg(Server::Http, OdooVersion::V17, None);
    c.workers = Some(2);
    let w = SimWorker::start_with("w", local(), c).await.unwrap();
    let a = w.addr();
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(async move {
                raw(
                    a,
                    "GET /x?sleep_ms=150 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap().starts_with("HTTP/1.1 200"));
    }
    assert_eq!(w.peak_busy(), 2);
}

#[tokio::test]
async fn a_slow_reader_holds_the_worker_until_the_response_is_written() {
    let mut c = cfg(Server::Http, OdooVersion::V17, None);
    c.workers = Some(1);
    let w = SimWorker::start_with("w", local(), c).await.unwrap();
    let mut s = TcpStream::connect(w.addr()).await.unwrap();
    s.write_all(b"GET /report?size=16777216 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        w.busy(),
        1,
        "the worker let go before its response was written"
    );
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(w.busy(), 0);
    assert!(w.busy_seconds() >= 0.4, "{}", w.busy_seconds());
}
