//! Exhaustion, end to end (contract `[listen]` `max_connections`,
//! `max_connections_per_ip`, `header_timeout`, `idle_timeout`): real portier, raw
//! sockets on 127.0.0.1, a simulated worker that records what reached it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portier_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn setup(listen_extra: &str) -> (Portier, SimWorker) {
    let w = sim("w").await;
    let ports = Ports::new();
    let cfg = format!(
        "{}{listen_extra}\n[pools.p]\nhttp = [\"{}\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        w.addr()
    );
    (Portier::start(&ports, &cfg).await, w)
}

/// Reads until the peer closes or `limit` passes: the bytes, and whether it closed.
async fn read_until_close(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

async fn metrics(p: &Portier) -> String {
    get(p.admin, "admin", "/metrics").await.unwrap().text()
}

const GET: &[u8] = b"GET /web/login HTTP/1.1\r\nHost: acme.test\r\n\r\n";

/// A client trickling its header gets 408 once `header_timeout` has passed since the
/// connection opened (a byte every 200 ms does not extend it), the worker never sees it,
/// and normal clients are served meanwhile; on a reused connection the deadline counts
/// from the header's first byte; a connection that sends nothing is closed silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_header_gets_408_after_header_timeout() {
    let (p, w) = setup("header_timeout = \"1s\"\nidle_timeout = \"5s\"\n").await;
    let mut slow = TcpStream::connect(p.http).await.unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        slow.write_all(b"GET /web/login HTTP/1.1\r\nHost: acme.test\r\n")
            .await
            .unwrap();
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow
                .write_all(format!("X-Slow-{i}: x\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        let (head, closed) = read_until_close(&mut slow, Duration::from_secs(2)).await;
        (head, closed)
    });
    // Meanwhile a normal client is served.
    for _ in 0..5 {
        let r = get(p.http, "acme.test", "/web/login").await.unwrap();
        assert_eq!(r.status, 200);
    }
    let (head, closed) = trickle.await.unwrap();
    let took = started.elapsed();
    assert!(head.starts_with("HTTP/1.1 408"), "{head:?}");
    assert!(closed, "the connection is closed after the 408");
    assert!(
        took < Duration::from_secs(9),
        "{took:?}: well before the 40 x 200 ms trickle ends"
    );
    assert!(
        w.requests().iter().all(|r| r.header("x-slow-0").is_none()),
        "the trickled request never reached the worker"
    );
    let log = p
        .wait_access_log(|l| l["refused"] == "header_timeout")
        .await;
    assert_eq!(log["status"], 408);
    assert_eq!(
        metric(
            &metrics(&p).await,
            "portier_connections_refused_total{reason=\"header_timeout\"}"
        ),
        1.0
    );

    // A reused connection: a request, a pause longer than header_timeout (the idle
    // wait is idle_timeout's), then a trickled header: 408 a second after its first byte.
    let mut s = TcpStream::connect(p.http).await.unwrap();
    s.write_all(GET).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b"GET /web/login HTTP/1.1\r\n").await.unwrap();
    let first_byte = Instant::now();
    let (head, closed) = read_until_close(&mut s, Duration::from_secs(4)).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head:?}");
    assert!(closed);
    let after = first_byte.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "{after:?}"
    );

    // Not a byte: closed without an answer once header_timeout has passed.
    let mut quiet = TcpStream::connect(p.http).await.unwrap();
    let (head, closed) = read_until_close(&mut quiet, Duration::from_secs(4)).await;
    assert!(closed && head.is_empty(), "{head:?}");
}

/// 300 trickling connections at once: all get their 408; a normal client keeps being
/// answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_trickling_connections_do_not_stop_normal_clients() {
    let (p, _w) = setup("header_timeout = \"2s\"\n").await;
    let addr = p.http;
    let tricklers: Vec<_> = (0..300)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.ok()?;
                s.write_all(b"GET / HTTP/1.1\r\n").await.ok()?;
                for _ in 0..30 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if s.write_all(b"X: y\r\n").await.is_err() {
                        break;
                    }
                }
                let (head, _) = read_until_close(&mut s, Duration::from_secs(3)).await;
                Some(head.starts_with("HTTP/1.1 408"))
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let r = get(p.http, "acme.test", "/web/login").await.unwrap();
        assert_eq!(r.status, 200);
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        worst < Duration::from_secs(1),
        "a normal request took {worst:?}"
    );
    let mut refused = 0;
    for t in tricklers {
        if t.await.unwrap() == Some(true) {
            refused += 1;
        }
    }
    assert_eq!(refused, 300);
}

/// Connects from `local` (any 127.0.0.0/8 address) to `to`.
async fn connect_from(local: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{local}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// Whether the connection is closed without a byte (refused), within a second.
async fn refused(s: &mut TcpStream) -> bool {
    let (head, closed) = read_until_close(s, Duration::from_secs(1)).await;
    closed && head.is_empty()
}

/// `max_connections`: the connection beyond it is closed at once, without an answer,
/// and counted; when one closes, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed() {
    let (p, _w) = setup("max_connections = 4\n").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(p.http).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(p.http).await.unwrap();
    assert!(refused(&mut extra).await, "the fifth connection is closed");
    // The held ones still work.
    held[0].write_all(GET).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = held[0].read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = get(p.http, "acme.test", "/web/login").await.unwrap();
    assert_eq!(r.status, 200, "a place came back");
    let m = metrics(&p).await;
    assert!(
        metric(
            &m,
            "portier_connections_refused_total{reason=\"max_connections\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "portier_connections_refused_total{reason=\"per_ip\"}"),
        0.0
    );
}

/// `max_connections_per_ip`: the fourth connection from one address is closed at once;
/// another address is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_address_cap_are_closed() {
    let (p, _w) = setup("max_connections_per_ip = 3\n").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.1", p.http).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = connect_from("127.0.0.1", p.http).await;
    assert!(refused(&mut fourth).await);
    let mut other = connect_from("127.0.0.2", p.http).await;
    other.write_all(GET).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = other.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "another address is served"
    );
    let m = metrics(&p).await;
    assert!(
        metric(&m, "portier_connections_refused_total{reason=\"per_ip\"}") >= 1.0,
        "{m}"
    );
}

/// `idle_timeout`: a keep-alive connection idle longer is closed, and so is a new
/// connection that sends nothing for that long (header_timeout being longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout() {
    let (p, _w) = setup("idle_timeout = \"1s\"\nheader_timeout = \"10s\"\n").await;
    let mut s = TcpStream::connect(p.http).await.unwrap();
    s.write_all(GET).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t = Instant::now();
    let (rest, closed) = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed && rest.is_empty(), "{rest:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    let mut quiet = TcpStream::connect(p.http).await.unwrap();
    let t = Instant::now();
    let (head, closed) = read_until_close(&mut quiet, Duration::from_secs(5)).await;
    assert!(closed && head.is_empty());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// A worker that dies while writing its response: the client never gets a response
/// passed off as whole (a cut-off body with its `Content-Length`, or an error status),
/// and a POST is never sent to a worker twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_mid_response_is_never_passed_off_as_whole() {
    let w1 = sim("w1").await;
    let w2 = sim("w2").await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = [\"{}\", \"{}\"]\nretries = 1\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        w1.addr(),
        w2.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    w1.set_mode(portier_sim::Mode::Truncate);
    w2.set_mode(portier_sim::Mode::Truncate);
    for method in ["GET", "POST"] {
        let before = w1.hits() + w2.hits();
        let req = format!(
            "{method} /web/dataset/call_kw?size=200000 HTTP/1.1\r\nHost: acme.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        let (resp, closed) = raw_resp(p.http, req.as_bytes()).await;
        assert!(closed);
        let head_end = resp.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(end) = head_end {
            let head = String::from_utf8_lossy(&resp[..end]).to_string();
            let body = resp.len() - end - 4;
            let declared: Option<usize> = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            });
            if head.starts_with("HTTP/1.1 200") {
                assert!(
                    declared.is_some_and(|d| d > body),
                    "{method}: a cut-off response must look cut off: {head} with {body} bytes"
                );
            } else {
                assert!(head.starts_with("HTTP/1.1 502"), "{method}: {head}");
            }
        }
        let reached = w1.hits() + w2.hits() - before;
        if method == "POST" {
            assert_eq!(reached, 1, "a POST reached a worker once");
        } else {
            assert!(reached <= 2, "{reached}");
        }
    }
}

async fn raw_resp(addr: SocketAddr, req: &[u8]) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// A worker that accepts connections and resets them (found by `portier-bench chaos`):
/// the reset can come while the request head is still being written on a fresh
/// connection — nothing of a response arrived, so an idempotent request goes to
/// another backend. 600 GETs while one of three workers resets: every one succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_resetting_worker_are_retried_elsewhere() {
    let ws = [sim("w0").await, sim("w1").await, sim("w2").await];
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[log]\naccess = false\n[pools.p]\nhttp = {}\nbreaker = {{ failures = 3, open_for = \"1s\" }}\nretries = 1\n[tenants.a]\nhosts = [\"a.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&ws.iter().map(|w| w.addr()).collect::<Vec<_>>())
    );
    let p = Portier::start(&ports, &cfg).await;
    ws[2].set_mode(portier_sim::Mode::Reset);
    let mut tasks = Vec::new();
    for _ in 0..600 {
        let a = p.http;
        tasks.push(tokio::spawn(async move {
            get(a, "a.test", "/web/dataset/search_read?size=20000")
                .await
                .map(|r| r.status)
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut failed = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(200) => {}
            other => failed.push(other),
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// The certificate directory disappears (an unmounted volume, a botched deploy): the
/// loaded certificates keep being served, and the log says why nothing was reloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_certificate_directory_keeps_the_loaded_certificates() {
    let w = sim("w").await;
    let pki = TestPki::new();
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    pki.write_pair(&certs, "acme", &["acme.test"], 90);
    let ports = Ports::new();
    let cfg = format!(
        "{}https = \"127.0.0.1:{}\"\n[tls]\ncerts = \"{}\"\nredirect_http = false\n[pools.p]\nhttp = [\"{}\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        ports.https,
        certs.display(),
        w.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    let https = local(ports.https);
    let client = || pki.client(&[b"http/1.1"], &[&rustls::version::TLS13]);
    let s = tls_connect(https, "acme.test", client()).await.unwrap();
    assert_eq!(
        h1_over(s, "acme.test", "/web/login").await.unwrap().status,
        200
    );
    std::fs::rename(&certs, root.path().join("gone")).unwrap();
    assert!(
        eventually(Duration::from_secs(6), || p
            .stderr()
            .iter()
            .any(|l| l.contains("cannot read the certificate directory")))
        .await,
        "{:?}",
        p.stderr()
    );
    let s = tls_connect(https, "acme.test", client()).await.unwrap();
    assert_eq!(presented_names(&s), vec!["acme.test".to_string()]);
    assert_eq!(
        h1_over(s, "acme.test", "/web/login").await.unwrap().status,
        200
    );
    assert_eq!(status(p.admin).await["certificates"], 1);
}
