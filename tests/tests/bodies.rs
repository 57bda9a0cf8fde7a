//! Request bodies and framing, end to end: the `max_body` limit, bodies of every size
//! and framing arriving whole, bad chunking and smuggling attempts refused before any
//! worker sees them, and buffered bodies sent again on a retry.

use std::time::Duration;

use bytes::Bytes;
use portier_tests::routing_setup as setup;
use portier_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_body_gives_413_before_any_byte_reaches_a_worker() {
    let s =
        setup("[tenants.small]\nhosts = [\"small.test\"]\npool = \"main\"\nmax_body = \"1KiB\"\n")
            .await;
    // Declared length over the limit.
    let r = request(
        s.p.http,
        "POST",
        "small.test",
        "/jsonrpc",
        &[],
        Bytes::from(vec![b'x'; 2048]),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413);
    // Chunked body over the limit.
    let mut req =
        b"POST /jsonrpc HTTP/1.1\r\nHost: small.test\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n"
            .to_vec();
    req.extend(vec![b'y'; 0x800]);
    req.extend(b"\r\n0\r\n\r\n");
    let (resp, closed) = raw(s.p.http, &req, Duration::from_secs(3)).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(closed);
    assert_eq!(hits(&s.http), 0);
    let log =
        s.p.wait_access_log(|v| v["refused"] == "body_too_large")
            .await;
    assert_eq!(log["tenant"], "small");
    // Within the limit it passes, body intact.
    let r = request(
        s.p.http,
        "POST",
        "small.test",
        "/jsonrpc",
        &[],
        Bytes::from(vec![b'x'; 1000]),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        s.http
            .iter()
            .flat_map(|w| w.requests())
            .last()
            .unwrap()
            .body_len,
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_every_size_arrive_intact() {
    let s = setup("").await;
    for size in [
        0usize,
        1,
        1000,
        64 * 1024,
        64 * 1024 + 1,
        300 * 1024,
        3 << 20,
    ] {
        let r = request(
            s.p.http,
            "POST",
            "acme.test",
            "/web/binary/upload",
            &[],
            Bytes::from(vec![b'z'; size]),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "size {size}");
        assert_eq!(r.json()["body_len"], size, "size {size}");
    }
    // Chunked, small and large.
    for size in [10usize, 200 * 1024] {
        let mut req = b"POST /web/x HTTP/1.1\r\nHost: acme.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        req.extend(format!("{size:x}\r\n").as_bytes());
        req.extend(vec![b'c'; size]);
        req.extend(b"\r\n0\r\n\r\n");
        let (resp, _) = raw(s.p.http, &req, Duration::from_secs(5)).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains(&format!("\"body_len\":{size}")), "{resp}");
    }
}

/// A body is validated whole before a worker is picked: bad
/// chunking after good chunks (small, past pingora's own 64 KiB replay buffer, and past
/// `buffer_body`, in a spool file) is a
/// 400 and nothing reaches a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunk_after_good_ones_reaches_no_worker() {
    let s = setup("").await;
    for good in [5usize, 150 * 1024, 900 * 1024, 2 << 20] {
        let mut req = b"POST /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut left = good;
        while left > 0 {
            let n = left.min(16 * 1024);
            req.extend(format!("{n:x}\r\n").as_bytes());
            req.extend(vec![b'g'; n]);
            req.extend(b"\r\n");
            left -= n;
        }
        req.extend(b"zz\r\nbad\r\n0\r\n\r\n");
        let (resp, closed) = raw(s.p.http, &req, Duration::from_secs(5)).await;
        assert!(
            resp.starts_with("HTTP/1.1 400"),
            "{good} good bytes: {resp}"
        );
        assert!(closed, "{good}: connection left open");
    }
    assert_eq!(hits(&s.http), 0, "a worker saw a badly chunked body");
}

/// A buffered body can be sent again: a PUT of 200 KiB (Content-Length and chunked)
/// whose first worker answers 502, or refuses the connection, is sent to the other one,
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_200_kib_put_is_retried_whole() {
    let s = setup("").await;
    s.http[1].set_mode(Mode::Status(502));
    let size = 200 * 1024;
    for i in 0..6 {
        let r = request(
            s.p.http,
            "PUT",
            "acme.test",
            &format!("/web/dataset/call_kw?i={i}"),
            &[],
            Bytes::from(vec![b'p'; size]),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "PUT {i}: {}", r.text());
        assert_eq!(r.json()["body_len"], size);
        let mut req = format!("PUT /web/dataset/call_kw?c={i} HTTP/1.1\r\nHost: acme.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{size:x}\r\n").into_bytes();
        req.extend(vec![b'q'; size]);
        req.extend(b"\r\n0\r\n\r\n");
        let (resp, _) = raw(s.p.http, &req, Duration::from_secs(5)).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "chunked PUT {i}: {resp}");
        assert!(resp.contains(&format!("\"body_len\":{size}")), "{resp}");
    }
    assert!(
        s.http[1].hits() >= 2,
        "the failing worker was never tried first ({} hits)",
        s.http[1].hits()
    );
    // A worker that refuses connections: the PUT goes whole to the other one.
    s.http[1].set_mode(Mode::Refuse);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..4 {
        let r = request(
            s.p.http,
            "PUT",
            "acme.test",
            &format!("/web/dataset/call_kw?r={i}"),
            &[],
            Bytes::from(vec![b'r'; size]),
        )
        .await
        .unwrap();
        assert_eq!(
            r.status,
            200,
            "PUT {i} after a refused connect: {}",
            r.text()
        );
        assert_eq!(r.json()["body_len"], size);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_or_431_close_and_reach_no_worker() {
    let s = setup("").await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "CL and TE",
            b"POST /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "differing duplicate CL",
            b"POST /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(),
            "400",
        ),
        (
            "bad chunk size",
            b"POST /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "non-chunked final TE",
            b"POST /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nTransfer-Encoding: gzip\r\n\r\nabc".to_vec(),
            "400",
        ),
        (
            "garbage request line",
            b"GARBAGE\x01\x02 / HTTP/1.1\r\nHost: acme.test\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "two hosts",
            b"GET /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\nHost: erp.acme.test\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "oversized header block",
            {
                let mut r = b"GET /web/dataset/call_kw HTTP/1.1\r\nHost: acme.test\r\n".to_vec();
                for i in 0..20 {
                    r.extend(format!("X-Big-{i}: {}\r\n", "a".repeat(4000)).as_bytes());
                }
                r.extend(b"\r\n");
                r
            },
            "431",
        ),
    ];
    for (name, req, code) in cases {
        let (resp, closed) = raw(s.p.http, &req, Duration::from_secs(3)).await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {code}")),
            "{name}: {resp}"
        );
        assert!(closed, "{name}: connection left open");
    }
    assert_eq!(hits(&s.http) + hits(&s.gevent), 0);
}
