//! Hostile input, end to end (issue "Hardening"): raw requests a scanner, a bot or a
//! smuggling attempt sends, each asserting what portier answered and what the
//! simulated worker received. None may let a second request reach a worker, and none
//! may reach another tenant or the database manager.

use std::time::Duration;

use portier_tests::*;

/// What a case must get.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// A 4xx and nothing at the worker.
    Refused,
    /// Either refused, or exactly one request at the worker with this body length.
    RefusedOrWhole(usize),
}

struct Case {
    name: &'static str,
    raw: Vec<u8>,
    want: Want,
}

fn case(name: &'static str, raw: &str, want: Want) -> Case {
    Case {
        name,
        raw: raw.as_bytes().to_vec(),
        want,
    }
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn setup() -> RoutingSetup {
    // 127.0.0.1 is no admin here: the database manager is blocked for the tests.
    routing_setup("[defaults]\nadmin_cidrs = [\"10.99.0.0/16\"]\n").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_framing_tricks_never_reach_a_worker_twice() {
    let s = setup().await;
    let p = "POST /hostile HTTP/1.1\r\nHost: acme.test\r\n";
    let cases = vec![
        case(
            "TE xchunked",
            &format!("{p}Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            Want::Refused,
        ),
        case(
            "TE with a leading space",
            &format!("{p}Transfer-Encoding:  chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            Want::RefusedOrWhole(5),
        ),
        case(
            "TE chunked, identity",
            &format!("{p}Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            Want::Refused,
        ),
        case(
            "TE twice",
            &format!("{p}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            Want::RefusedOrWhole(5),
        ),
        case(
            "TE in HTTP/1.0",
            "POST /hostile HTTP/1.0\r\nHost: acme.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: acme.test\r\n\r\n",
            Want::RefusedOrWhole(5),
        ),
        case(
            "TE then CL",
            &format!("{p}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            Want::Refused,
        ),
        case(
            "CL 5 and CL 6",
            &format!("{p}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
            Want::Refused,
        ),
        case(
            "CL list differing",
            &format!("{p}Content-Length: 5, 6\r\n\r\nhello!"),
            Want::Refused,
        ),
        case(
            "CL with a sign",
            &format!("{p}Content-Length: +5\r\n\r\nhello"),
            Want::Refused,
        ),
        case(
            "bare LF in chunk framing",
            &format!("{p}Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n"),
            Want::Refused,
        ),
        case(
            "chunk extension with a smuggled request",
            &format!("{p}Transfer-Encoding: chunked\r\n\r\n5;a=\"\r\nGET /smuggled HTTP/1.1\r\n\"\r\nhello\r\n0\r\n\r\n"),
            Want::Refused,
        ),
        case(
            "obs-fold line",
            &format!("{p}Content-Length: 5\r\nX-Folded: a\r\n b\r\n\r\nhello"),
            Want::RefusedOrWhole(5),
        ),
        case(
            "NUL in a header value",
            &format!("{p}Content-Length: 5\r\nX-Nul: a\0b\r\n\r\nhello"),
            Want::Refused,
        ),
        case(
            "CR alone in a header value",
            &format!("{p}Content-Length: 5\r\nX-Cr: a\rb\r\n\r\nhello"),
            Want::Refused,
        ),
        case(
            "space before the colon",
            &format!("{p}Content-Length : 5\r\n\r\nhello"),
            Want::Refused,
        ),
        case(
            "bare LF line endings",
            "POST /hostile HTTP/1.1\nHost: acme.test\nContent-Length: 5\n\nhello",
            Want::RefusedOrWhole(5),
        ),
        case(
            "LF inside a header value",
            &format!("{p}Content-Length: 5\r\nX-Lf: a\nGET /smuggled HTTP/1.1\r\n\r\nhello"),
            Want::Refused,
        ),
        case(
            "CONNECT",
            "CONNECT acme.test:443 HTTP/1.1\r\nHost: acme.test:443\r\n\r\n",
            Want::Refused,
        ),
        case(
            "a 64 KiB request line",
            &format!("GET /{} HTTP/1.1\r\nHost: acme.test\r\n\r\n", "a".repeat(64 << 10)),
            Want::Refused,
        ),
        case(
            "a request line without a version",
            "GET /hostile\r\nHost: acme.test\r\n\r\n",
            Want::Refused,
        ),
        case(
            "HTTP/2 preface on the HTTP/1 listener",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            Want::Refused,
        ),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        let before = s.http.iter().flat_map(|w| w.requests()).count();
        let (resp, _) = raw(s.p.http, &c.raw, Duration::from_millis(1500)).await;
        let status = status_of(&resp);
        let got: Vec<_> = s.http.iter().flat_map(|w| w.requests()).collect();
        let new: Vec<_> = got.iter().skip(before).collect();
        assert!(
            new.iter().all(|r| r.target != "/smuggled"),
            "{i} {}: a smuggled request reached a worker",
            c.name
        );
        match c.want {
            Want::Refused => {
                assert!((400..500).contains(&status), "{i} {}: {resp:?}", c.name);
                assert!(new.is_empty(), "{i} {}: reached a worker", c.name);
            }
            Want::RefusedOrWhole(len) => {
                if (400..500).contains(&status) {
                    assert!(
                        new.is_empty(),
                        "{i} {}: refused but reached a worker",
                        c.name
                    );
                } else {
                    assert_eq!(status, 200, "{i} {}: {resp:?}", c.name);
                    assert_eq!(new.len(), 1, "{i} {}: {} requests", c.name, new.len());
                    assert_eq!(new[0].body_len, len, "{i} {}", c.name);
                }
            }
        }
    }
    // Still serving.
    assert_eq!(
        get(s.p.http, "acme.test", "/web/login")
            .await
            .unwrap()
            .status,
        200
    );
}

/// A bare LF anywhere in chunked framing is bad chunking (contract r3, "What the client
/// gets when things go wrong"; RFC 9112 allows a bare LF only in the start line and the
/// header fields): the chunk-size line, a chunk extension, the CRLF after the data, the
/// last-chunk line, a trailer field and the end of the trailers. Each gets `400`, its
/// connection is closed (a keep-alive request, so the close is portier's choice), and
/// nothing reaches a worker. The same request with CRLFs is forwarded: the cases differ
/// only in that LF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_lf_anywhere_in_chunked_framing_is_bad_chunking() {
    let s = setup().await;
    let head = "POST /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    // (where, with the bare LF, the same framing with CRLF or without the LF)
    let cases = [
        (
            "the chunk-size line",
            "5\nhello\r\n0\r\n\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "a chunk extension",
            "5;ext\nx\r\nhello\r\n0\r\n\r\n",
            "5;ext;x\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "a quoted extension value",
            "5;e=\"a\nb\"\r\nhello\r\n0\r\n\r\n",
            "5;e=\"a\tb\"\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "after the chunk data",
            "5\r\nhello\n0\r\n\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "the last-chunk line",
            "5\r\nhello\r\n0\n\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "the last chunk's extension",
            "5\r\nhello\r\n0;x\ny\r\n\r\n",
            "5\r\nhello\r\n0;x;y\r\n\r\n",
        ),
        (
            "a trailer field",
            "5\r\nhello\r\n0\r\nX-T: a\nb\r\n\r\n",
            "5\r\nhello\r\n0\r\nX-T: a\r\nX-U: b\r\n\r\n",
        ),
        (
            "the end of the trailers",
            "5\r\nhello\r\n0\r\nX-T: a\r\n\n",
            "5\r\nhello\r\n0\r\nX-T: a\r\n\r\n",
        ),
    ];
    let close = head.replace("HTTP/1.1\r\n", "HTTP/1.1\r\nConnection: close\r\n");
    for (name, bad, good) in cases {
        let before = hits(&s.http);
        let (resp, closed) = raw(
            s.p.http,
            format!("{head}{bad}").as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(status_of(&resp), 400, "bare LF in {name}: {resp:?}");
        assert!(closed, "bare LF in {name}: the connection stayed open");
        assert_eq!(hits(&s.http), before, "bare LF in {name} reached a worker");
        let (resp, _) = raw(
            s.p.http,
            format!("{close}{good}").as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(status_of(&resp), 200, "{name} without the LF: {resp:?}");
        assert_eq!(
            hits(&s.http),
            before + 1,
            "{name} without the LF: not forwarded"
        );
    }
}

/// Host confusion: an absolute URI's authority wins over `Host` (RFC 9112 3.2.2) and
/// is what the worker is told; IP literals, unknown and over-long hosts get 404; a
/// trailing dot is the same host. Never another tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_confusion_has_one_answer() {
    let s = setup().await;
    let ask = |raw: String| {
        let addr = s.p.http;
        async move { raw_status(addr, raw).await }
    };
    // Absolute form: the authority and Host agree: routed, origin-form upstream.
    let (st, _) = ask(
        "GET http://acme.test/hostile/abs HTTP/1.1\r\nHost: acme.test\r\nConnection: close\r\n\r\n"
            .into(),
    )
    .await;
    assert_eq!(st, 200);
    let rec = s
        .http
        .iter()
        .flat_map(|w| w.requests())
        .find(|r| r.target.ends_with("/hostile/abs"))
        .expect("the worker saw it");
    assert_eq!(rec.target, "/hostile/abs", "origin-form upstream");
    assert_eq!(
        rec.header("x-odoo-dbfilter"),
        Some("^acme_db$"),
        "acme's database, not beta's"
    );
    assert_eq!(rec.header("x-forwarded-host"), Some("acme.test"));
    // They disagree: refused, whichever is a tenant (no guessing which one is meant).
    for (authority, host) in [
        ("acme.test", "beta.erp.test"),
        ("beta.erp.test", "acme.test"),
        ("unknown.test", "acme.test"),
    ] {
        let (st, resp) = ask(format!(
            "GET http://{authority}/hostile/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(
            st == 400 || (authority == "unknown.test" && st == 404),
            "{authority} vs {host}: {resp}"
        );
    }
    assert!(
        s.http
            .iter()
            .flat_map(|w| w.requests())
            .all(|r| !r.target.ends_with("/hostile/x")),
        "no disagreeing request reached a worker"
    );
    for host in [
        "127.0.0.1",
        "[::1]",
        "acme.test.evil",
        "evil.acme.test",
        &format!("{}.acme.test", "a".repeat(300)),
        &"x".repeat(5000),
    ] {
        let (st, _) = ask(format!(
            "GET /hostile/h HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(
            st == 404 || st == 400,
            "{}: {st}",
            &host[..host.len().min(40)]
        );
    }
    let (st, _) =
        ask("GET /hostile/dot HTTP/1.1\r\nHost: acme.test.\r\nConnection: close\r\n\r\n".into())
            .await;
    let (st2, _) =
        ask("GET /hostile/dot HTTP/1.1\r\nHost: ACME.test:80\r\nConnection: close\r\n\r\n".into())
            .await;
    assert_eq!(st2, 200);
    assert!(st == 200 || st == 404, "{st}");
    for r in s.http.iter().flat_map(|w| w.requests()) {
        if r.target.starts_with("/hostile/") {
            assert_eq!(
                r.header("x-odoo-dbfilter"),
                Some("^acme_db$"),
                "{}",
                r.target
            );
        }
    }
}

async fn raw_status(addr: std::net::SocketAddr, raw_req: String) -> (u16, String) {
    let (resp, _) = raw(addr, raw_req.as_bytes(), Duration::from_millis(1500)).await;
    (status_of(&resp), resp)
}

/// The database manager stays blocked however its path is spelled, as long as Odoo
/// (werkzeug, which decodes the path before routing) would route it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_manager_spellings_are_blocked() {
    let s = setup().await;
    for path in [
        "/web/database/manager",
        "//web/database/manager",
        "/web//database/manager",
        "/web/./database/selector",
        "/web/static/../database/list",
        "/web/%64atabase/manager",
        "/web%2Fdatabase/manager",
        "/web%2fdatabase%2fmanager",
        "/%2e/web/database/manager",
        "/web/%2e%2e/web/database/manager",
        "/web/database/manager;x",
        "/web/database;x/manager",
        "/web/database/manager?x=1",
        "/web/database/manager#frag",
        "/web/database/../database/backup",
        "/WEB/database/manager",
        "/web/DataBase/manager",
    ] {
        let (st, resp) = raw_status(
            s.p.http,
            format!("GET {path} HTTP/1.1\r\nHost: acme.test\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(st == 403 || st == 400, "{path}: {resp}");
    }
    assert_eq!(
        s.http
            .iter()
            .flat_map(|w| w.requests())
            .filter(|r| r.target.contains("database"))
            .count(),
        0,
        "no spelling of the database manager reached a worker"
    );
}
