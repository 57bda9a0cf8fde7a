//! HTTP/2 abuse, end to end (issue "Hardening"): raw HTTP/2 frames over real TLS to a
//! real portier. Rapid Reset (CVE-2023-44487: open a stream, reset it, again, fast)
//! and a CONTINUATION flood (CVE-2024-27316: a header block that never ends) must be
//! stopped — the connection throttled or closed — while other clients are served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use portier_tests::h2raw::*;
use portier_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

/// A literal header `x-flood-N: 100 bytes`, new name, without indexing.
fn filler(n: usize) -> Vec<u8> {
    let name = format!("x-flood-{n}");
    let mut b = vec![0x00, name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    b.push(100);
    b.extend_from_slice(&[b'v'; 100]);
    b
}

/// Reads frames until EOF or `limit`: whether a GOAWAY came, whether the connection
/// closed.
async fn drain_frames(s: &mut TlsStream, limit: Duration) -> (bool, bool) {
    let mut buf = vec![0u8; 1 << 16];
    let mut pending = Vec::new();
    let mut goaway = false;
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (goaway, true),
            Ok(Ok(n)) => {
                pending.extend_from_slice(&buf[..n]);
                while pending.len() >= 9 {
                    let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
                    if pending.len() < 9 + len {
                        break;
                    }
                    goaway |= pending[3] == GOAWAY;
                    pending.drain(..9 + len);
                }
            }
            Err(_) => return (goaway, false),
        }
    }
}

/// A normal HTTP/2 client's worst latency over `n` requests.
async fn normal_client(e: &Edge, n: usize) -> Duration {
    let mut worst = Duration::ZERO;
    for _ in 0..n {
        let stream = h2_stream(e).await;
        let t = Instant::now();
        let r = h2_over(stream, "acme.test", "/web/login").await.unwrap();
        assert_eq!(r.status, 200);
        worst = worst.max(t.elapsed());
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_stopped_and_others_are_served() {
    let e = Arc::new(setup().await);
    let attacker = {
        let e = e.clone();
        tokio::spawn(async move {
            let mut s = h2_stream(&e).await;
            let mut out = PREFACE.to_vec();
            frame(&mut out, SETTINGS, 0, 0, &[]);
            s.write_all(&out).await.unwrap();
            let block = request_block();
            let mut sent = 0u32;
            let mut stream = 1u32;
            let started = Instant::now();
            // Up to 20 000 open-and-reset streams in batches of 100.
            'outer: for _ in 0..200 {
                let mut batch = Vec::new();
                for _ in 0..100 {
                    frame(
                        &mut batch,
                        HEADERS,
                        END_HEADERS | END_STREAM,
                        stream,
                        &block,
                    );
                    frame(&mut batch, RST_STREAM, 0, stream, &8u32.to_be_bytes());
                    stream += 2;
                }
                if s.write_all(&batch).await.is_err() {
                    break 'outer;
                }
                sent += 100;
            }
            let (goaway, closed) = drain_frames(&mut s, Duration::from_secs(5)).await;
            (sent, goaway, closed, started.elapsed())
        })
    };
    let worst = normal_client(&e, 10).await;
    let (sent, goaway, closed, took) = attacker.await.unwrap();
    let reached = e.w.hits();
    eprintln!("rapid reset: {sent} streams sent in {took:?}, goaway {goaway}, closed {closed}, {reached} requests at the worker, normal client worst {worst:?}");
    assert!(
        goaway || closed,
        "the attacking connection was told to go away or closed"
    );
    assert!(
        reached < 2_000,
        "{reached} of the {sent} reset streams reached the worker"
    );
    assert!(
        worst < Duration::from_secs(2),
        "a normal client waited {worst:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_stopped_and_others_are_served() {
    let e = Arc::new(setup().await);
    let attacker = {
        let e = e.clone();
        tokio::spawn(async move {
            let mut s = h2_stream(&e).await;
            let mut out = PREFACE.to_vec();
            frame(&mut out, SETTINGS, 0, 0, &[]);
            frame(&mut out, HEADERS, END_STREAM, 1, &request_block());
            s.write_all(&out).await.unwrap();
            // CONTINUATION frames of ~10 KiB each, never END_HEADERS: up to 64 MiB.
            let mut sent = 0usize;
            let mut n = 0usize;
            for _ in 0..6_400 {
                let mut payload = Vec::new();
                while payload.len() < 10_000 {
                    payload.extend(filler(n));
                    n += 1;
                }
                let mut f = Vec::new();
                frame(&mut f, CONTINUATION, 0, 1, &payload);
                if s.write_all(&f).await.is_err() {
                    break;
                }
                sent += f.len();
            }
            let (goaway, closed) = drain_frames(&mut s, Duration::from_secs(5)).await;
            (sent, goaway, closed)
        })
    };
    let worst = normal_client(&e, 10).await;
    let (sent, goaway, closed) = attacker.await.unwrap();
    eprintln!("continuation flood: {sent} bytes sent, goaway {goaway}, closed {closed}, normal client worst {worst:?}");
    assert!(
        goaway || closed,
        "the flooding connection was told to go away or closed"
    );
    assert!(
        sent < 64 << 20,
        "the server stopped reading long before 64 MiB ({sent})"
    );
    assert_eq!(
        e.w.requests()
            .iter()
            .filter(|r| r.header("x-flood-0").is_some())
            .count(),
        0
    );
    assert!(
        worst < Duration::from_secs(2),
        "a normal client waited {worst:?}"
    );
    // Still serving.
    assert_eq!(
        get(e.p.http, "acme.test", "/web/login")
            .await
            .unwrap()
            .status,
        200
    );
}

const DATA: u8 = 0x0;

/// `POST https://acme.test/h2/<marker>` with `extra` header-block bytes appended.
fn post_block(marker: &str, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![0x83, 0x87];
    let path = format!("/h2/{marker}");
    b.push(0x04);
    b.push(path.len() as u8);
    b.extend_from_slice(path.as_bytes());
    b.push(0x01);
    b.push(9);
    b.extend_from_slice(b"acme.test");
    b.extend_from_slice(extra);
    b
}

/// Sends one stream (HEADERS, then DATA with END_STREAM when given) and reads what
/// comes back for a second: whether the stream or the connection was ended (RST_STREAM
/// or GOAWAY) and whether a response HEADERS came.
async fn one_stream(e: &Edge, block: &[u8], data: Option<&[u8]>) -> (bool, bool) {
    let mut s = h2_stream(e).await;
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    match data {
        Some(d) => {
            frame(&mut out, HEADERS, END_HEADERS, 1, block);
            frame(&mut out, DATA, END_STREAM, 1, d);
        }
        None => frame(&mut out, HEADERS, END_HEADERS | END_STREAM, 1, block),
    }
    let _ = s.write_all(&out).await;
    let mut buf = vec![0u8; 1 << 16];
    let mut pending = Vec::new();
    let (mut ended, mut answered) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, answered),
            Ok(Ok(n)) => {
                pending.extend_from_slice(&buf[..n]);
                while pending.len() >= 9 {
                    let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
                    if pending.len() < 9 + len {
                        break;
                    }
                    let stream =
                        u32::from_be_bytes([pending[5], pending[6], pending[7], pending[8]])
                            & 0x7fff_ffff;
                    match pending[3] {
                        RST_STREAM if stream == 1 => ended = true,
                        GOAWAY => ended = true,
                        HEADERS if stream == 1 => answered = true,
                        _ => {}
                    }
                    pending.drain(..9 + len);
                }
            }
            Err(_) => return (ended, answered),
        }
    }
}

/// HTTP/2 to HTTP/1.1 downgrade: a request whose `content-length` disagrees with its
/// DATA, one carrying `transfer-encoding` or `connection` (connection-specific, forbidden
/// in HTTP/2), and pseudo-header abuse (a duplicate, a missing `:path`, one after a
/// regular header, an upper-case name) are malformed: the stream is refused and none of
/// them reaches the HTTP/1.1 worker, where they could frame a second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http2_requests_never_reach_the_http1_worker() {
    let e = setup().await;
    // A well-formed POST first: it does reach the worker, with its body.
    let (_, answered) = one_stream(
        &e,
        &post_block("ok", &literal("content-length", "5")),
        Some(b"hello"),
    )
    .await;
    assert!(answered, "a well-formed POST is answered");
    type Case<'a> = (&'a str, Vec<u8>, Option<&'a [u8]>);
    let cases: Vec<Case> = vec![
        (
            "cl-longer",
            post_block("cl-longer", &literal("content-length", "5")),
            Some(&b"hello, world"[..]),
        ),
        (
            "cl-shorter",
            post_block("cl-shorter", &literal("content-length", "50")),
            Some(&b"hello"[..]),
        ),
        (
            "te",
            post_block("te", &literal("transfer-encoding", "chunked")),
            Some(&b"5\r\nhello\r\n0\r\n\r\n"[..]),
        ),
        (
            "connection",
            post_block("connection", &literal("connection", "keep-alive")),
            Some(&b"hi"[..]),
        ),
        (
            "dup-path",
            {
                let mut b = post_block("dup-path", &[]);
                b.push(0x04);
                b.push(10);
                b.extend_from_slice(b"/h2/second");
                b
            },
            None,
        ),
        (
            "no-path",
            vec![
                0x83, 0x87, 0x01, 9, b'a', b'c', b'm', b'e', b'.', b't', b'e', b's', b't',
            ],
            None,
        ),
        (
            "late-pseudo",
            {
                let mut b = vec![0x83, 0x87];
                b.extend(literal("x-first", "1"));
                b.push(0x04);
                b.push(16);
                b.extend_from_slice(b"/h2/late-pseudo!");
                b.push(0x01);
                b.push(9);
                b.extend_from_slice(b"acme.test");
                b
            },
            None,
        ),
        (
            "uppercase",
            post_block("uppercase", &literal("X-Upper", "1")),
            None,
        ),
    ];
    for (name, block, data) in cases {
        let (ended, answered) = one_stream(&e, &block, data).await;
        assert!(ended || answered, "{name}: neither refused nor answered");
        let seen: Vec<_> =
            e.w.requests()
                .into_iter()
                .filter(|r| r.target.contains(name))
                .collect();
        assert!(
            seen.is_empty(),
            "{name}: reached the worker: {:?}",
            seen.iter()
                .map(|r| (&r.target, r.body_len))
                .collect::<Vec<_>>()
        );
    }
    assert!(e
        .w
        .requests()
        .iter()
        .any(|r| r.target == "/h2/ok" && r.body_len == 5));
    assert!(e.w.requests().iter().all(|r| r.target != "/h2/second"));
}

/// On HTTP/2 the host is `:authority`; a `host` header that disagrees never routes the
/// request to its tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_wins_over_a_disagreeing_host_header() {
    let e = setup().await;
    let block = |authority: &str, host: &str, marker: &str| {
        let mut b = vec![0x82, 0x87];
        let path = format!("/h2/{marker}");
        b.push(0x04);
        b.push(path.len() as u8);
        b.extend_from_slice(path.as_bytes());
        b.push(0x01);
        b.push(authority.len() as u8);
        b.extend_from_slice(authority.as_bytes());
        b.extend(literal("host", host));
        b
    };
    // The authority is an unknown host: whatever `host` says, nothing reaches acme.
    let (ended, answered) = one_stream(
        &e,
        &block("other.test", "acme.test", "unknown-authority"),
        None,
    )
    .await;
    assert!(ended || answered);
    // The authority is acme: refused or routed to acme, never elsewhere.
    let _ = one_stream(
        &e,
        &block("acme.test", "other.test", "acme-authority"),
        None,
    )
    .await;
    for r in e.w.requests() {
        assert_ne!(
            r.target, "/h2/unknown-authority",
            "routed by the host header"
        );
        if r.target == "/h2/acme-authority" {
            assert_eq!(r.header("x-forwarded-host"), Some("acme.test"));
        }
    }
}

/// Bounded HTTP/2: the server announces 100 concurrent streams and a 64 KiB header
/// list, and holds to them: of 150 streams opened at once to a slow page, at most 100
/// reach the worker, the others are refused; a 100 KiB header block is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_and_header_lists_are_bounded() {
    let e = setup().await;
    let mut s = h2_stream(&e).await;
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    s.write_all(&out).await.unwrap();
    // The server's SETTINGS come first.
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], SETTINGS);
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        settings.contains(&(0x3, 100)),
        "MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert!(
        settings.contains(&(0x6, 65536)),
        "MAX_HEADER_LIST_SIZE: {settings:?}"
    );
    // 150 streams at once to a page the worker takes 2 s to answer.
    let mut block = vec![0x82, 0x87];
    let path = b"/h2/slow?sleep_ms=2000";
    block.push(0x04);
    block.push(path.len() as u8);
    block.extend_from_slice(path);
    block.push(0x01);
    block.push(9);
    block.extend_from_slice(b"acme.test");
    let mut out = Vec::new();
    frame(&mut out, SETTINGS, 0x1, 0, &[]); // ACK theirs
    for i in 0..150u32 {
        frame(
            &mut out,
            HEADERS,
            END_HEADERS | END_STREAM,
            1 + 2 * i,
            &block,
        );
    }
    s.write_all(&out).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let at_worker =
        e.w.requests()
            .iter()
            .filter(|r| r.target.starts_with("/h2/slow"))
            .count();
    assert!(
        at_worker <= 100,
        "{at_worker} streams reached the worker at once"
    );
    assert!(at_worker >= 50, "only {at_worker} reached the worker");
    drop(s);

    // A header block over the announced list size.
    let mut big = request_block();
    for n in 0..900 {
        big.extend(filler(n));
    }
    let mut s = h2_stream(&e).await;
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    let mut rest = &big[..];
    let mut first = true;
    while !rest.is_empty() {
        let n = rest.len().min(16_000);
        let end = n == rest.len();
        let flags = if end { END_HEADERS } else { 0 } | if first { END_STREAM } else { 0 };
        frame(
            &mut out,
            if first { HEADERS } else { CONTINUATION },
            flags,
            1,
            &rest[..n],
        );
        rest = &rest[n..];
        first = false;
    }
    let _ = s.write_all(&out).await;
    // Whatever the server answers (a refused stream, 431, GOAWAY), the block goes nowhere.
    let _ = drain_frames(&mut s, Duration::from_secs(2)).await;
    assert_eq!(
        e.w.requests()
            .iter()
            .filter(|r| r.header("x-flood-0").is_some())
            .count(),
        0,
        "the oversized header block reached the worker"
    );
}
