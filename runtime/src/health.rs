//! Backend health: active checks (up after `rise` passes, down after `fall` failures)
//! and the passive circuit breaker (open after `failures` consecutive failed proxied
//! requests, one half-open trial after `open_for`). Both are lock-free state kept in
//! each long-lived [`Backend`], so they survive reloads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use portier_config::Health;
use tokio::task::AbortHandle;

use crate::backend::{Backend, BackendKey, Members};

/// One health check: `GET path` must answer 200 within `timeout`.
pub async fn check_once(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "portier-health-check")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        Some(resp.status() == http::StatusCode::OK)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Runs the active checks of every backend of every pool with `health`, following
/// reloads and discovery: started, stopped and re-configured by [`reconcile`].
#[derive(Default)]
pub struct Checkers {
    running: HashMap<BackendKey, (AbortHandle, Health)>,
}

impl Checkers {
    /// Makes the running checks match the pools of the configuration in force: each
    /// pool's members and its `health` (none: no active checks, its backends up).
    pub fn reconcile<'a>(
        &mut self,
        pools: impl IntoIterator<Item = (Arc<Members>, Option<&'a Health>)>,
    ) {
        let mut desired: HashMap<BackendKey, (Arc<Backend>, Health)> = HashMap::new();
        let mut unchecked: Vec<Arc<Backend>> = Vec::new();
        for (members, health) in pools {
            for b in members.http.iter().chain(members.longpolling.iter()) {
                match health {
                    Some(h) => {
                        desired.insert(b.key.clone(), (b.clone(), h.clone()));
                    }
                    None => unchecked.push(b.clone()),
                }
            }
        }
        self.running.retain(|key, (handle, cfg)| {
            let keep = desired.get(key).is_some_and(|(_, h)| h == cfg);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (key, (backend, cfg)) in desired {
            if self.running.contains_key(&key) {
                continue;
            }
            let handle = tokio::spawn(check_loop(backend, cfg.clone())).abort_handle();
            self.running.insert(key, (handle, cfg));
        }
        for b in unchecked {
            if b.health.reset_up() {
                b.health_changed(true);
            }
        }
    }
}

async fn check_loop(backend: Arc<Backend>, cfg: Health) {
    // Spread the first checks of many backends over the interval.
    let jitter = Duration::from_millis(fastrand::u64(0..=cfg.every.as_millis().min(1000) as u64));
    tokio::time::sleep(jitter / 4).await;
    loop {
        let pass = check_once(backend.addr(), &cfg.path, cfg.timeout).await;
        if let Some(up) = backend.health.record(pass, cfg.rise, cfg.fall) {
            backend.health_changed(up);
        }
        tokio::time::sleep(cfg.every).await;
    }
}
