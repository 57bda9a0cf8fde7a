//! "What goes upstream", end to end: the forwarding headers, the tenant's database
//! headers, request ids and hop-by-hop headers the simulated workers receive.

use std::time::Duration;

use bytes::Bytes;
use portier_tests::routing_setup as setup;
use portier_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gets_forwarding_headers_and_never_a_client_database() {
    let s = setup("").await;
    let r = get_with(
        s.p.http,
        "acme.test:8080",
        "/web/dataset/call_kw",
        &[
            ("x-odoo-database", "other_tenant"),
            ("x-odoo-dbfilter", "other_tenant"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let rec = s
        .http
        .iter()
        .flat_map(|w| w.requests())
        .last()
        .expect("a worker saw it");
    // Interactive: only the filter, anchored; the client's copies are gone.
    assert!(rec.header_all("x-odoo-database").is_empty());
    assert_eq!(rec.header_all("x-odoo-dbfilter"), vec!["^acme_db$"]);
    assert_eq!(rec.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(rec.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
    assert_eq!(rec.header("x-forwarded-host"), Some("acme.test:8080"));
    let id = rec
        .header("x-request-id")
        .expect("request id upstream")
        .to_string();
    assert_eq!(r.header("x-request-id"), Some(id.as_str()));
    assert!(id.len() >= 16);
}

/// Contract r2, "What goes upstream": `X-Odoo-Database` only on integration requests
/// without a `session_id` cookie; the filter, anchored, on every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_odoo_database_only_on_integration_without_a_session() {
    let s = setup("").await;
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: [Case; 6] = [
        ("POST", "/jsonrpc", &[], Some("acme_db")),
        ("POST", "/json/2/res.partner/search", &[], Some("acme_db")),
        (
            "POST",
            "/xmlrpc/2/object",
            &[("x-odoo-database", "other")],
            Some("acme_db"),
        ),
        ("POST", "/jsonrpc", &[("cookie", "session_id=abc")], None),
        ("GET", "/web/login", &[], None),
        ("GET", "/web/assets/1/web.assets_web.min.js", &[], None),
    ];
    for (method, path, headers, want) in cases {
        let r = request(
            s.p.http,
            method,
            "acme.test",
            path,
            headers,
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        let rec = s
            .http
            .iter()
            .flat_map(|w| w.requests())
            .filter(|r| r.target == path)
            .last()
            .expect("a worker saw it");
        assert_eq!(
            rec.header("x-odoo-database"),
            want,
            "{method} {path} {headers:?}"
        );
        assert_eq!(
            rec.header_all("x-odoo-dbfilter"),
            vec!["^acme_db$"],
            "{path}"
        );
        drop(r);
        for w in &s.http {
            w.reset_counters();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_headers_are_dropped_for_a_tenant_without_database() {
    let s = setup("[tenants.nodb]\nhosts = [\"nodb.test\"]\npool = \"main\"\n").await;
    let r = get_with(
        s.p.http,
        "nodb.test",
        "/web/dataset/call_kw",
        &[
            ("x-odoo-database", "acme_db"),
            ("x-odoo-dbfilter", "acme_db"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_header("x-odoo-database"), None);
    assert_eq!(r.upstream_header("x-odoo-dbfilter"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_keep_the_client_chain() {
    let s = setup(
        "[tenants.behindlb]\nhosts = [\"lb.test\"]\npool = \"main\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    )
    .await;
    let r = get_with(
        s.p.http,
        "lb.test",
        "/web/dataset/call_kw",
        &[
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        r.upstream_header("x-forwarded-for").as_deref(),
        Some("198.51.100.7, 127.0.0.1")
    );
    assert_eq!(
        r.upstream_header("x-real-ip").as_deref(),
        Some("198.51.100.7")
    );
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_kept_when_sent() {
    let s = setup("").await;
    let r = get_with(
        s.p.http,
        "acme.test",
        "/web/dataset/call_kw",
        &[("x-request-id", "trace-42")],
    )
    .await
    .unwrap();
    assert_eq!(r.header("x-request-id"), Some("trace-42"));
    assert_eq!(
        r.upstream_header("x-request-id").as_deref(),
        Some("trace-42")
    );
    let log = s.p.wait_access_log(|v| v["request_id"] == "trace-42").await;
    assert_eq!(log["tenant"], "acme");
    // A value that is not an id is replaced.
    let r = get_with(
        s.p.http,
        "acme.test",
        "/web/dataset/call_kw",
        &[("x-request-id", "a b\"c")],
    )
    .await
    .unwrap();
    assert_ne!(r.header("x-request-id"), Some("a b\"c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed() {
    let s = setup("").await;
    let req = "GET /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nX-Kept: yes\r\nProxy-Authorization: Basic eDp5\r\nTrailer: X-Checksum\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Also-Kept: 2\r\n\r\n";
    let (_, rec) = raw_answered(&s, req).await;
    for h in [
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "proxy-authorization",
        "trailer",
        "http2-settings",
    ] {
        assert!(rec.header(h).is_none(), "{h} reached the worker");
    }
    assert_eq!(rec.header("x-kept"), Some("yes"));
    assert_eq!(rec.header("x-also-kept"), Some("2"));
    // None of them: nothing is removed but portier's own.
    let req = "GET /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nX-Kept: yes\r\nAccept: */*\r\n\r\n";
    let (_, rec) = raw_answered(&s, req).await;
    assert_eq!(rec.header("x-kept"), Some("yes"));
    assert_eq!(rec.header("accept"), Some("*/*"));
}

/// Sends `req` as it is, expects a 200, and returns the answer with the request the
/// workers saw last.
async fn raw_answered(s: &RoutingSetup, req: &str) -> (String, portier_sim::Recorded) {
    let (resp, _) = raw(s.p.http, req.as_bytes(), Duration::from_millis(500)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let rec = s
        .http
        .iter()
        .flat_map(|w| w.requests())
        .last()
        .expect("a worker saw it");
    (resp, rec)
}

/// portier does not keep header names' case (vendor patch 31: pingora parses them as
/// HTTP/2 does): names that differ only in case are one header, whose values all reach
/// the worker in the client's order; the answer reaches the client with each name once,
/// standard names in their usual capitals and the others lowercase (as before the
/// patch: portier rebuilds the headers it forwards without their case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_differing_in_case_are_one_header_with_every_value() {
    let s = setup("").await;
    let req = "GET /web/webclient/version_info HTTP/1.1\r\nHost: acme.test\r\nX-Multi: a\r\nx-MULTI: b\r\nUser-Agent: t\r\nX-multi: c\r\nConnection: close\r\n\r\n";
    let (resp, rec) = raw_answered(&s, req).await;
    assert_eq!(rec.header_all("x-multi"), vec!["a", "b", "c"]);
    assert_eq!(rec.header("user-agent"), Some("t"));
    let head = resp.split("\r\n\r\n").next().unwrap_or_default();
    let names: Vec<&str> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n))
        .collect();
    for want in [
        "Content-Type",
        "Content-Length",
        "x-request-id",
        "x-sim-worker",
    ] {
        let n = names
            .iter()
            .filter(|n| n.eq_ignore_ascii_case(want))
            .count();
        assert_eq!(n, 1, "{want} once: {head}");
        assert!(names.contains(&want), "{want} as written: {head}");
    }
}

/// The response carries the request's id, once, whatever the worker sent: a worker's own
/// `X-Request-Id` values (any case) are replaced, and its other headers, repeated ones
/// included, reach the client as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_carries_the_requests_id_not_the_workers() {
    // A worker speaking raw HTTP/1.1, so that its answer can carry what Odoo's never does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: worker-7\r\n\
                          x-request-id: worker-8\r\nX-Trace: one\r\nX-Trace: two\r\n\
                          Connection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let ports = Ports::new();
    let cfg = format!(
        "{}[pools.p]\nhttp = [\"{worker}\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen()
    );
    let p = Portier::start(&ports, &cfg).await;
    let (resp, _) = raw(
        p.http,
        b"GET /web/login HTTP/1.1\r\nHost: acme.test\r\nX-Request-Id: trace-42\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let lines: Vec<String> = resp.lines().map(str::to_ascii_lowercase).collect();
    let ids: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("x-request-id:"))
        .collect();
    assert_eq!(ids, ["x-request-id: trace-42"], "{resp}");
    let traces: Vec<&String> = lines.iter().filter(|l| l.starts_with("x-trace:")).collect();
    assert_eq!(traces, ["x-trace: one", "x-trace: two"], "{resp}");
}
