//! A dropped keep-alive connection (contract r3, "Health and circuit breaking"): when the
//! connection that failed before any response byte was a reused keep-alive connection,
//! an idempotent request is sent again on a fresh connection, using up no retry — to its
//! session's backend when it has one, else to any usable backend — at most twice, and
//! `attempts` in the access log counts every backend attempt.
//!
//! The workers are prefork Odoo HTTP workers recycled after one request
//! (`limit_request = 1`, `odoo/service/server.py` `Worker.check_limits`): the next request
//! on a kept-alive connection gets no answer, its connection closed, as from Odoo.

use bytes::Bytes;
use portier_sim::{Mode, Odoo, OdooVersion, Server, SimConfig};
use portier_tests::*;

async fn recycled_worker(name: &str, limit: u64) -> SimWorker {
    let mut cfg = SimConfig::new(
        Server::Http,
        std::sync::Arc::new(Odoo::new(OdooVersion::V17, None)),
    );
    cfg.limit_request = Some(limit);
    cfg.socket_timeout = None;
    SimWorker::start_with(name, local(0), cfg).await.unwrap()
}

async fn start(http: &[&SimWorker], pool_extra: &str) -> Portier {
    let ports = Ports::new();
    let addrs: Vec<_> = http.iter().map(|w| w.addr()).collect();
    let cfg = format!(
        "{}\n[pools.p]\nhttp = {}\n{pool_extra}\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        toml_list(&addrs),
    );
    Portier::start(&ports, &cfg).await
}

/// The access-log record of the request whose path is `path` (unique per request).
async fn record(p: &Portier, path: &str) -> serde_json::Value {
    p.wait_access_log(|v| v["path"] == path).await
}

fn attempts(v: &serde_json::Value) -> u64 {
    v["attempts"].as_u64().unwrap_or(0)
}

/// `retries = 0`, one backend: a GET meeting a stale pooled connection is still
/// answered (a fresh connection, no retry used), and its record counts two attempts; a
/// POST is never sent again (502, one attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_on_a_dropped_keep_alive_connection_is_sent_again_without_a_retry() {
    let w = recycled_worker("h0", 1).await;
    let p = start(&[&w], "retries = 0").await;
    let mut resent = 0;
    for i in 0..12 {
        let path = format!("/web/dataset/call_kw/get{i}");
        let r = get(p.http, "acme.test", &path).await.unwrap();
        assert_eq!(r.status, 200, "GET {i}: {}", r.text());
        let v = record(&p, &path).await;
        assert_eq!(v["status"], 200);
        let n = attempts(&v);
        assert!((1..=2).contains(&n), "GET {i}: {v}");
        if n == 2 {
            resent += 1;
        }
    }
    // Every other request meets the connection the recycled process dropped.
    assert!(resent >= 5, "only {resent} of 12 GETs were sent again");
    assert!(w.recycled() >= 5, "{} recycles", w.recycled());

    // A POST on the pooled connection the worker will drop: never sent again.
    let first = get(p.http, "acme.test", "/web/dataset/call_kw/prime")
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    let before = w.requests().len();
    let r = request(
        p.http,
        "POST",
        "acme.test",
        "/web/dataset/call_kw/post",
        &[],
        Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let v = record(&p, "/web/dataset/call_kw/post").await;
    assert_eq!(attempts(&v), 1, "{v}");
    let posts = w.requests()[before..]
        .iter()
        .filter(|r| r.target == "/web/dataset/call_kw/post")
        .count();
    assert!(posts <= 1, "the POST reached a worker {posts} times");
}

/// With a session, the request sent again goes to the session's backend, not to another
/// one (two backends, `retries = 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_request_is_sent_again_to_its_own_backend() {
    let a = recycled_worker("h0", 1).await;
    let b = recycled_worker("h1", 1).await;
    let p = start(&[&a, &b], "retries = 0").await;
    for sid in ["s-one", "s-two", "s-three"] {
        let cookie = format!("session_id={sid}");
        let mut backends = std::collections::HashSet::new();
        let mut resent = 0;
        for i in 0..8 {
            let path = format!("/web/dataset/call_kw/{sid}/{i}");
            let r = get_with(p.http, "acme.test", &path, &[("cookie", cookie.as_str())])
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{sid} {i}: {}", r.text());
            let v = record(&p, &path).await;
            backends.insert(v["backend"].as_str().unwrap_or("").to_string());
            if attempts(&v) == 2 {
                resent += 1;
            }
        }
        assert_eq!(
            backends.len(),
            1,
            "{sid} moved between backends: {backends:?}"
        );
        assert!(resent >= 1, "{sid}: nothing was sent again");
    }
}

/// At most twice: three backends whose pooled connections are all dropped and whose
/// fresh connections are dropped too (workers killed mid-request), `retries = 2`. Each
/// stale pooled connection met costs no retry, but only two of them; so the request is
/// tried at most 1 + 2 retries + 2 = 5 times, and more than 3 (at least one was free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_again_on_a_fresh_connection_happens_at_most_twice() {
    let ws = [
        recycled_worker("h0", 1000).await,
        recycled_worker("h1", 1000).await,
        recycled_worker("h2", 1000).await,
    ];
    let p = start(&[&ws[0], &ws[1], &ws[2]], "retries = 2").await;
    // Concurrent requests leave a pooled connection to every backend.
    let mut tasks = Vec::new();
    for i in 0..9 {
        let addr = p.http;
        tasks.push(tokio::spawn(async move {
            get(
                addr,
                "acme.test",
                &format!("/web/dataset/call_kw/warm{i}?sleep_ms=100"),
            )
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    assert!(ws.iter().all(|w| w.hits() > 0), "a backend got no request");
    for w in &ws {
        w.set_mode(Mode::Drop);
    }
    let r = get(p.http, "acme.test", "/web/dataset/call_kw/doomed")
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let v = record(&p, "/web/dataset/call_kw/doomed").await;
    let n = attempts(&v);
    assert!((4..=5).contains(&n), "attempts {n}: {v}");
    let reached: usize = ws
        .iter()
        .map(|w| {
            w.requests()
                .iter()
                .filter(|r| r.target == "/web/dataset/call_kw/doomed")
                .count()
        })
        .sum();
    assert_eq!(
        reached as u64, n,
        "the workers saw {reached}, the log says {n}"
    );
}
