//! Restarts that refuse nothing (contract, "Command line", r2): a launcher holds the
//! listening socket as systemd's `portier.socket` does and passes it to each portier
//! process (`LISTEN_FDS`, descriptor 3). The old process drains; meanwhile new
//! connections wait in the socket's backlog and the new process serves them.
//! (systemd itself is not available on the test machine: this is what it does.)

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use portier_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_load_refuses_no_connection_and_fails_no_request() {
    let w = sim("w").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ports = Ports::new();
    ports.http = listener.local_addr().unwrap().port();
    let cfg = format!(
        "{}\n[log]\naccess = false\n[pools.p]\nhttp = [\"{}\"]\nlongpolling = [\"{}\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        w.addr(),
        w.addr()
    );
    let fd = listener.as_raw_fd();
    let mut old = Portier::start_activated(&ports, &cfg, fd).await;
    assert!(
        old.stderr().iter().any(|l| l.contains("inherited socket")),
        "{:?}",
        old.stderr()
    );

    // Load: a new connection every 10 ms, each one request, for the whole restart.
    let addr = old.http;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (stop, sent, ok, failures) = (stop.clone(), sent.clone(), ok.clone(), failures.clone());
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (sent, ok, failures) = (sent.clone(), ok.clone(), failures.clone());
                sent.fetch_add(1, Ordering::Relaxed);
                tasks.push(tokio::spawn(async move {
                    match tokio::time::timeout(
                        Duration::from_secs(20),
                        get(addr, "acme.test", "/web/login"),
                    )
                    .await
                    {
                        Ok(Ok(r)) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures.lock().unwrap().push(format!("{other:?}")),
                    }
                }));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A request in flight when the restart begins finishes on the old process.
    let slow = tokio::spawn(async move {
        request(
            addr,
            "GET",
            "acme.test",
            "/web/report?sleep_ms=1500",
            &[],
            Bytes::new(),
        )
        .await
    });
    // A WebSocket open on the old process.
    let (mut ws, _) = websocket(addr, "acme.test", "/websocket", &[])
        .await
        .unwrap();
    assert_eq!(ws_roundtrip(&mut ws, "before").await.unwrap(), "before");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let t = Instant::now();
    old.signal("TERM");
    // The old process drains: its WebSocket goes on until the client is done with it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ws_roundtrip(&mut ws, "while draining").await.unwrap(),
        "while draining",
        "an open WebSocket keeps working while the old process drains"
    );
    drop(ws);
    let exited = tokio::task::spawn_blocking(move || {
        let s = old.wait_exit(Duration::from_secs(15));
        (old, s)
    })
    .await
    .unwrap();
    let (_old, status) = exited;
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process drained and exited 0"
    );
    let new = Portier::start_activated(&ports, &cfg, fd).await;
    let gap = t.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let slow = slow
        .await
        .unwrap()
        .expect("the in-flight request was answered");
    assert_eq!(
        slow.status, 200,
        "the in-flight request finished on the old process"
    );
    let failures = failures.lock().unwrap().clone();
    let (sent, ok) = (sent.load(Ordering::Relaxed), ok.load(Ordering::Relaxed));
    assert!(sent > 150, "{sent} requests sent");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed across a restart taking {gap:?}: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(ok, sent);
    // The new process serves on the same socket.
    assert_eq!(
        get(new.http, "acme.test", "/web/login")
            .await
            .unwrap()
            .status,
        200
    );
    drop(listener);
}
