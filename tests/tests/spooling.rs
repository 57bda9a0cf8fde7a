//! Request bodies spooled to `spool_dir` (contract r2, "Bodies and buffering"), end to
//! end: a slow upload reaches a prefork worker whole after its last byte, a spooled
//! body is replayed whole on a retry, and without room to spool, bodies and responses
//! stream instead. (Worker slots and response read-ahead: `workers.rs`.)

use std::time::{Duration, Instant};

use bytes::Bytes;
use portier_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// portier in front of prefork HTTP workers (Odoo drops a client silent for 2 s), with
/// its spool directory in `spool`.
async fn spool_setup(spool: &std::path::Path, n: usize) -> (Portier, Vec<SimWorker>) {
    let mut ws = Vec::new();
    for i in 0..n {
        ws.push(prefork_sim(&format!("h{i}")).await);
    }
    let ports = Ports::new();
    let list = toml_list(&ws.iter().map(|w| w.addr()).collect::<Vec<_>>());
    let cfg = format!(
        "{}spool_dir = \"{}\"\n[pools.p]\nhttp = {list}\n[tenants.a]\nhosts = [\"a.test\"]\npool = \"p\"\n",
        ports.listen(),
        spool.display()
    );
    (Portier::start(&ports, &cfg).await, ws)
}

fn spool_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().count())
        .unwrap_or(0)
}

/// A 3 MiB upload whose client pauses 3 s in the middle reaches a worker that drops
/// clients silent for 2 s: whole, once, and only after its last byte arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_reaches_the_worker_whole_after_its_last_byte() {
    let spool = tempfile::tempdir().unwrap();
    std::fs::write(
        spool.path().join("portier-spool-999999-1"),
        b"left by a crash",
    )
    .unwrap();
    let (p, ws) = spool_setup(spool.path(), 1).await;
    assert_eq!(
        spool_files(spool.path()),
        0,
        "a stale spool file survived the start"
    );
    let size = 3 << 20;
    let mut conn = tokio::net::TcpStream::connect(p.http).await.unwrap();
    conn.write_all(format!("POST /web/binary/upload_attachment HTTP/1.1\r\nHost: a.test\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    conn.write_all(&vec![b'u'; size / 2]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ws[0].hits() + ws[0].stalled(),
        0,
        "the worker saw the upload before it was whole"
    );
    assert_eq!(
        spool_files(spool.path()),
        1,
        "the body beyond buffer_body is not in a file"
    );
    conn.write_all(&vec![b'u'; size - size / 2]).await.unwrap();
    let last_byte = Instant::now();
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(&format!("\"body_len\":{size}")), "{resp}");
    let rec = ws[0].requests();
    assert_eq!(rec.len(), 1, "the worker got it once");
    assert!(
        rec[0].head_at >= last_byte,
        "the worker saw the request before its last byte"
    );
    assert_eq!(ws[0].stalled(), 0);
    assert_eq!(spool_files(spool.path()), 0, "a spool file was left");
    let m = get(p.admin, "admin", "/metrics").await.unwrap().text();
    let spooled: u64 = m
        .lines()
        .find(|l| l.starts_with("portier_spooled_bytes_total{direction=\"request\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert_eq!(spooled, size as u64, "{m}");
}

/// A spooled body is sent again whole when its first worker answers 502; chunked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_put_is_retried_whole() {
    let spool = tempfile::tempdir().unwrap();
    let (p, ws) = spool_setup(spool.path(), 2).await;
    ws[1].set_mode(Mode::Status(502));
    let size = 3 << 20;
    for i in 0..4 {
        let r = request(
            p.http,
            "PUT",
            "a.test",
            &format!("/web/dataset/call_kw?i={i}"),
            &[],
            Bytes::from(vec![b'p'; size]),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "PUT {i}");
        assert_eq!(r.json()["body_len"], size);
        let mut req = format!("PUT /web/dataset/call_kw?c={i} HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").into_bytes();
        for _ in 0..48 {
            req.extend(format!("{:x}\r\n", 64 * 1024).as_bytes());
            req.extend(vec![b'q'; 64 * 1024]);
            req.extend(b"\r\n");
        }
        req.extend(b"0\r\n\r\n");
        let (resp, _) = raw(p.http, &req, Duration::from_secs(10)).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "chunked PUT {i}: {resp}");
        assert!(resp.contains(&format!("\"body_len\":{size}")), "{resp}");
    }
    assert!(
        ws[1].hits() >= 2,
        "the failing worker was never tried first"
    );
    assert_eq!(spool_files(spool.path()), 0);
}

/// No room to spool (the directory is gone): the request streams instead, and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_room_to_spool_the_body_streams() {
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    let (p, _ws) = spool_setup(&dir, 1).await;
    std::fs::remove_dir(&dir).unwrap();
    let size = 3 << 20;
    let r = request(
        p.http,
        "POST",
        "a.test",
        "/web/binary/upload_attachment",
        &[],
        Bytes::from(vec![b's'; size]),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], size);
    assert!(
        p.stderr()
            .iter()
            .any(|l| l.contains("stream instead of being spooled")),
        "not logged"
    );
}

/// The spool directory gone (as a full disk: files cannot be written): bodies and
/// responses beyond memory stream instead, whole, never a client error; logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_room_to_spool_bodies_and_responses_stream_whole() {
    let spool = tempfile::tempdir().unwrap();
    let gone = spool.path().join("spool");
    std::fs::create_dir(&gone).unwrap();
    let w = sim("w").await;
    let ports = Ports::new();
    let cfg = format!(
        "{}spool_dir = \"{}\"\n[pools.p]\nhttp = [\"{}\"]\n[tenants.a]\nhosts = [\"a.test\"]\npool = \"p\"\n",
        ports.listen(),
        gone.display(),
        w.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    std::fs::remove_dir(&gone).unwrap();
    // A 3 MiB upload (beyond buffer_body's 1 MiB).
    let body = bytes::Bytes::from(vec![b'u'; 3 << 20]);
    let r = request(p.http, "POST", "a.test", "/web/binary/upload", &[], body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 3 << 20);
    // A 5 MiB response (beyond buffer_response's 1 MiB).
    let r = get(p.http, "a.test", "/web/content/report?size=5242880")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(v["pad"].as_str().unwrap().len() > 5_000_000);
    let warned = p
        .stderr()
        .iter()
        .filter(|l| l.contains("stream instead of being spooled"))
        .count();
    assert_eq!(warned, 1, "logged once: {:?}", p.stderr());
    assert_eq!(
        get(p.http, "a.test", "/web/login").await.unwrap().status,
        200
    );
}
