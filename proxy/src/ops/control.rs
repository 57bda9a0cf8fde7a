//! The control plane: one thread with its own runtime, apart from the data plane. It
//! serves the admin API, performs reloads (SIGHUP, `POST /reload`), and tells systemd
//! and `/readyz` when the listeners are up.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::ops::discover::Discoverers;
use crate::ops::reload::{reload, ReloadResult};
use crate::ops::watch::{self, Change};
use crate::state::Shared;
use portier_runtime::backend::Role;
use portier_runtime::health::Checkers;

/// Something to run on the control plane once the listeners are ready (the demo's
/// self-test uses it).
pub type ReadyHook = Box<dyn FnOnce(Arc<Shared>) + Send + 'static>;

/// Quiet time after a file event before acting (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(300);

pub enum ControlMsg {
    /// Reload now; the result goes to the sender if there is one.
    Reload(Option<oneshot::Sender<ReloadResult>>),
    /// SIGTERM/SIGINT arrived.
    Draining,
}

pub async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<ControlMsg>,
    admin: Option<std::net::TcpListener>,
    probe: Vec<SocketAddr>,
    on_ready: Option<ReadyHook>,
) {
    // Installed first: SIGHUP's default action would kill the process.
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGHUP; reload with POST /reload");
            None
        }
    };
    // The admin API sends its reload requests here.
    let (self_tx, mut self_rx) = mpsc::unbounded_channel::<ControlMsg>();

    if let Some(listener) = admin {
        let listener = listener
            .set_nonblocking(true)
            .and_then(|_| tokio::net::TcpListener::from_std(listener));
        match listener {
            Ok(l) => {
                tokio::spawn(serve_admin(l, shared.clone(), self_tx.clone()));
            }
            Err(e) => tracing::error!(error = %e, "cannot serve the admin listener"),
        }
    }

    tokio::spawn(wait_ready(shared.clone(), probe, on_ready));
    tokio::spawn(crate::ops::supervise::cluster(shared.clone()));
    tokio::spawn(crate::acme::run(shared.clone()));
    tokio::spawn(crate::ops::kubernetes::run(shared.clone()));

    // File watching: changes arrive here and are debounced.
    let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<Change>();
    let certs_dir = |shared: &Shared| {
        shared
            .snapshot
            .load()
            .config
            .tls
            .as_ref()
            .and_then(|t| t.certs.clone())
    };
    let mut watched_certs = certs_dir(&shared);
    let mut _watcher = shared
        .config_path
        .as_deref()
        .and_then(|p| watch::start(p, watched_certs.as_deref(), watch_tx.clone()));
    let mut config_due: Option<tokio::time::Instant> = None;
    let mut certs_due: Option<tokio::time::Instant> = None;
    // The content of the config file last tried by a file-triggered reload.
    let mut last_tried: Option<String> = None;

    let mut discoverers = Discoverers::default();
    discoverers.reconcile(&shared);
    let mut checkers = Checkers::default();
    checkers.reconcile(shared.snapshot.load().health_targets());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    let mut trimmer = crate::ops::memory::Trimmer::default();
    // Snapshots swapped outside a reload (Kubernetes objects applied) trim too.
    let mut applied = shared.reloaded.subscribe();

    loop {
        let due = [config_due, certs_due].into_iter().flatten().min();
        let msg = tokio::select! {
            Some(change) = watch_rx.recv() => {
                let at = tokio::time::Instant::now() + DEBOUNCE;
                match change {
                    Change::Config => config_due = Some(at),
                    Change::Certs => certs_due = Some(at),
                }
                continue;
            }
            _ = async { match due { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                let now = tokio::time::Instant::now();
                if certs_due.is_some_and(|d| d <= now) {
                    certs_due = None;
                    crate::ops::tls::reload_certs(&shared);
                }
                if config_due.is_some_and(|d| d <= now) {
                    config_due = None;
                    let current = shared.snapshot.load().config.version.clone();
                    let on_disk = shared.config_path.as_deref().and_then(watch::file_version);
                    match on_disk {
                        Some(v) if v != current && last_tried.as_ref() != Some(&v) => {
                            tracing::info!("configuration file changed; reloading");
                            last_tried = Some(v);
                            ControlMsg::Reload(None)
                        }
                        _ => continue,
                    }
                } else {
                    continue;
                }
            }
            Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading");
                ControlMsg::Reload(None)
            }
            Some(m) = rx.recv() => m,
            Some(m) = self_rx.recv() => m,
            _ = tick.tick() => {
                // Follow membership changes (discovery) between reloads.
                checkers.reconcile(shared.snapshot.load().health_targets());
                if applied.has_changed().unwrap_or(false) {
                    applied.mark_unchanged();
                    trimmer.config_loaded();
                }
                trimmer.tick(shared.inflight.load(Ordering::Relaxed));
                ticks += 1;
                if ticks.is_multiple_of(2) {
                    crate::ops::tls::reload_if_changed(&shared);
                }
                if ticks.is_multiple_of(10) {
                    // Addresses whose login budget has refilled are forgotten.
                    shared.login.evict_idle();
                    // Tenants with nothing in the last minute give their figures back.
                    shared.live.evict_idle(portier_runtime::live::now_s());
                }
                if ticks.is_multiple_of(60) {
                    crate::ops::tls::update_expiry(&shared);
                    // Limiters idle for an hour have refilled: a fresh one is the same.
                    shared.limits.evict_idle(Duration::from_secs(3600));
                }
                continue;
            }
        };
        match msg {
            ControlMsg::Reload(reply) => {
                let result = reload(&shared);
                trimmer.config_loaded();
                if result.is_ok() {
                    crate::ops::tls::reload_certs(&shared);
                    let now_certs = certs_dir(&shared);
                    if now_certs != watched_certs {
                        watched_certs = now_certs;
                        _watcher = shared.config_path.as_deref().and_then(|p| {
                            watch::start(p, watched_certs.as_deref(), watch_tx.clone())
                        });
                    }
                }
                discoverers.reconcile(&shared);
                checkers.reconcile(shared.snapshot.load().health_targets());
                if let Some(r) = reply {
                    let _ = r.send(result);
                }
            }
            ControlMsg::Draining => {
                shared.ready.store(false, Ordering::SeqCst);
            }
        }
    }
}

/// Waits until every proxy listener accepts connections, then reports ready.
async fn wait_ready(shared: Arc<Shared>, probe: Vec<SocketAddr>, on_ready: Option<ReadyHook>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for addr in probe {
        let target = match addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
            }
            a => a,
        };
        loop {
            if tokio::net::TcpStream::connect(target).await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                tracing::error!(%addr, "listener did not come up; exiting");
                std::process::exit(1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    shared.ready.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!("ready");
    if let Some(hook) = on_ready {
        hook(shared);
    }
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    ctl: mpsc::UnboundedSender<ControlMsg>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| admin(req, shared.clone(), ctl.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

async fn admin(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    ctl: mpsc::UnboundedSender<ControlMsg>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    const JSON: &str = "application/json";
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => reply(StatusCode::OK, TEXT, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if shared.ready.load(Ordering::SeqCst) && !shared.draining.load(Ordering::SeqCst) {
                reply(StatusCode::OK, TEXT, "ready\n")
            } else if shared.draining.load(Ordering::SeqCst) {
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "draining\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n")
            }
        }
        (&Method::GET, "/" | "/ui/app.js" | "/ui/app.css") => {
            match crate::ops::dashboard::file(req.uri().path()) {
                Some(r) => r,
                None => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
            }
        }
        (&Method::GET, "/status") => reply(StatusCode::OK, JSON, status_json(&shared).to_string()),
        (&Method::GET, "/status/tenants") => {
            let body = crate::ops::tenants::json(&shared, req.uri().query().unwrap_or(""));
            reply(StatusCode::OK, JSON, body.to_string())
        }
        (&Method::GET, "/metrics") => {
            update_connections(&shared);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                shared.metrics.render(),
            )
        }
        (&Method::POST, "/reload") => {
            let (tx, rx) = oneshot::channel();
            if ctl.send(ControlMsg::Reload(Some(tx))).is_err() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "control plane stopped\n",
                )
            } else {
                match rx.await {
                    Ok(Ok(version)) => reply(
                        StatusCode::OK,
                        JSON,
                        serde_json::json!({"version": version}).to_string(),
                    ),
                    Ok(Err(errors)) => reply(
                        StatusCode::BAD_REQUEST,
                        JSON,
                        serde_json::json!({"errors": errors.lines().collect::<Vec<_>>()})
                            .to_string(),
                    ),
                    Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "reload aborted\n"),
                }
            }
        }
        (_, "/healthz" | "/readyz" | "/status" | "/status/tenants" | "/metrics" | "/reload") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n")
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    };
    Ok(resp)
}

/// Sets `portier_connections_open{listener}` from the kernel's socket tables.
fn update_connections(shared: &Shared) {
    let listen = &shared.snapshot.load().config.listen;
    let listeners: Vec<(&str, u16)> = [("http", listen.http), ("https", listen.https)]
        .into_iter()
        .filter_map(|(name, a)| a.map(|a| (name, a.port())))
        .collect();
    let ports: Vec<u16> = listeners.iter().map(|(_, p)| *p).collect();
    let counts = portier_runtime::telemetry::established_on(&ports);
    for ((name, _), n) in listeners.iter().zip(counts) {
        shared
            .metrics
            .connections_open
            .with_label_values(&[name])
            .set(n as i64);
    }
}

/// The `/status` document of the contract.
pub fn status_json(shared: &Shared) -> serde_json::Value {
    let snap = shared.snapshot.load();
    let last_error = shared
        .reload_status
        .lock()
        .ok()
        .and_then(|s| s.last_error.clone());
    let mut pools = serde_json::Map::new();
    for p in &snap.pools {
        let m = p.members.load();
        let mut backends = Vec::new();
        for list in [&m.http, &m.longpolling] {
            for b in list.iter() {
                let mut entry = serde_json::json!({
                    "address": &*b.addr_str,
                    "role": b.key.role.as_str(),
                    "up": b.health.is_up(),
                    "breaker": b.breaker.state().as_str(),
                    "inflight": b.inflight.load(Ordering::Relaxed),
                });
                if p.cfg.workers > 0 && b.key.role == Role::Http {
                    entry["slots"] = p.cfg.workers.into();
                    entry["busy"] = b.busy.load(Ordering::Relaxed).into();
                }
                backends.push(entry);
            }
        }
        let [interactive, statics, integration] = p.queue.depth();
        pools.insert(
            p.name.to_string(),
            serde_json::json!({
                "backends": backends,
                "queue": {"interactive": interactive, "static": statics, "integration": integration},
            }),
        );
    }
    let mut status = serde_json::json!({
        "version": snap.config.version,
        "loaded_at": humantime::format_rfc3339_seconds(snap.loaded_at).to_string(),
        "last_error": last_error,
        "tenants": snap.config.tenants.len(),
        "maintenance": snap.config.tenants.iter().filter(|t| t.maintenance).map(|t| t.name.as_str()).collect::<Vec<_>>(),
        "limiters": shared.limits.len(),
        "certificates": shared.certs.len(),
        "certificate_list": certificate_list(&shared.certs),
        "pools": pools,
    });
    if shared.kubernetes.started.load(Ordering::Relaxed) {
        status["kubernetes"] = crate::ops::kubernetes::status_json(shared);
    }
    if snap.config.acme().is_some() {
        status["acme"] = shared.acme.status_json();
    }
    if snap.config.cluster.is_some() {
        let cluster = shared.cluster.load();
        let (up, replicas) = match &*cluster {
            Some(c) => (c.is_up(), c.replicas()),
            None => (false, 1),
        };
        status["cluster"] = serde_json::json!({
            "redis": if up { "up" } else { "down" },
            "replicas": replicas,
        });
    }
    status
}

/// Each certificate pair with its expiry and days left (an extension of `/status`, for
/// the dashboard).
fn certificate_list(certs: &portier_certs::CertStore) -> serde_json::Value {
    let now = std::time::SystemTime::now();
    let index = certs.index();
    let mut list: Vec<serde_json::Value> = index
        .pairs()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "not_after": humantime::format_rfc3339_seconds(p.not_after).to_string(),
                "days_left": (p.seconds_left(now) / 86_400.0).floor(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    serde_json::Value::Array(list)
}
