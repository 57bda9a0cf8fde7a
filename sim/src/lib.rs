//! A simulated Odoo server port (16, 17, 18 or 19), for portier's tests, demo and benches.
//!
//! It behaves like Odoo where a proxy can tell the difference, each behaviour modelled
//! on Odoo's source (cited where it is implemented) and switchable so a test can pick
//! an Odoo version and a kind of port ([`Server`]):
//!
//! - database selection and sessions ([`odoo`]): `odoo/http.py`
//!   `_get_session_and_dbname` / `_save_session`, OCA `dbfilter_from_header`;
//! - `/web/login` (GET sets `session_id` when the session may be saved, POST logs in
//!   and rotates it), `/web` and `/odoo` answer as the logged-in user or redirect to
//!   the login page, `/json/2/...` (Odoo 19) works on the selected database;
//! - prefork HTTP workers (`odoo/service/server.py`, `WorkerHTTP`): a client silent for
//!   `ODOO_HTTP_SOCKET_TIMEOUT` (2 s) loses its request, `workers` processes serve one
//!   request each at a time (the rest wait), a process is recycled after
//!   `limit_request` requests (its connection closes without an answer), and a
//!   WebSocket upgrade fails (the prefork handler has no socket for the bus);
//! - the bus WebSocket (`addons/bus/websocket.py`): the handshake checks of Odoo 17+,
//!   no extensions negotiated, served on the gevent port (and in threaded mode);
//! - `/web/health` and `?db_server_status=1` (`addons/web/controllers/webclient.py`);
//! - attachments in `data_dir/filestore` and `--x-sendfile` ([`filestore`]):
//!   `odoo/http.py` `Stream.get_response`, `addons/web/controllers/binary.py`.
//!
//! Every answer names the worker (`x-sim-worker` header and `"worker"` field) and,
//! for ordinary paths, echoes the request headers it received, so tests can assert
//! what went upstream. Failure injection: [`Mode`] for the whole worker (500s, refused
//! connections, reset connections, slow answers), and per request the
//! `x-sim-status: CODE` header and the `sleep_ms=N` query parameter (or
//! `x-sim-sleep-ms` header).

pub mod apiserver;
pub mod client;
pub mod filestore;
pub mod odoo;
mod process;
mod record;
mod routes;
mod ws;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use odoo::{Odoo, OdooVersion};
pub use process::Held;
use process::{held, read_body, Busy, Dropped};
pub use record::{body_fnv, Recorded};
use record::{record, record_full};
use routes::{json_response, query_param, route, selects_database};

/// How the whole worker behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answers normally.
    Normal,
    /// Answers every request (health checks included) with this status.
    Status(u16),
    /// Closes its listening socket: connections are refused. Open connections are closed.
    Refuse,
    /// Accepts connections and resets them (TCP RST) without answering.
    Reset,
    /// Waits this long before every answer.
    Slow(Duration),
    /// Reads each request and closes its connection without an answer, as a worker
    /// killed mid-request does (`limit_time_real`, `limit_memory_hard`, OOM killer).
    Drop,
    /// Answers, but dies after writing half of the response body: the connection is
    /// aborted mid-response (a worker killed while writing a large report).
    Truncate,
}

/// Which Odoo port this worker is (`odoo/service/server.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// `workers = 0`: one threaded server on one port serves everything, the bus
    /// WebSocket included (`ThreadedServer`, its `RequestHandler` hands the socket over).
    Threaded,
    /// The HTTP port of a prefork server (`workers = N`, `PreforkServer`/`WorkerHTTP`).
    Http,
    /// The gevent (longpolling) port (`GeventServer`): the bus and longpolling, many at once.
    Gevent,
}

/// How a simulated worker behaves; [`SimConfig::default`] is a threaded Odoo 17 that
/// holds whichever database portier names.
#[derive(Clone)]
pub struct SimConfig {
    pub server: Server,
    /// The server behind this port: version, databases, session store. Ports of one
    /// Odoo server (its HTTP and gevent ports) share it.
    pub odoo: Arc<Odoo>,
    /// `ODOO_HTTP_SOCKET_TIMEOUT` (`WorkerHTTP.__init__`, default 2 s): a connection
    /// silent this long, mid-body or between requests, is dropped. `None`: never.
    pub socket_timeout: Option<Duration>,
    /// `limit_request`: requests a worker process serves before it is recycled.
    pub limit_request: Option<u64>,
    /// `workers`: requests worked on at once (longpolls and WebSockets excepted).
    pub workers: Option<usize>,
    /// werkzeug's prefork handler (`BaseWSGIServerNoBind` with `CommonRequestHandler`,
    /// neither threaded nor forking for werkzeug) speaks HTTP/1.0: every response
    /// closes its connection.
    pub close_each: bool,
    /// `--x-sendfile`: attachments are handed to the web server (`filestore.rs`).
    pub x_sendfile: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig::new(
            Server::Threaded,
            Arc::new(Odoo::new(OdooVersion::V17, None)),
        )
    }
}

impl SimConfig {
    /// The defaults of an Odoo port of this kind for `odoo`.
    pub fn new(server: Server, odoo: Arc<Odoo>) -> SimConfig {
        SimConfig {
            server,
            odoo,
            socket_timeout: (server == Server::Http).then_some(Duration::from_secs(2)),
            limit_request: None,
            workers: None,
            close_each: false,
            x_sendfile: false,
        }
    }
}

struct Shared {
    name: String,
    cfg: SimConfig,
    mode_tx: watch::Sender<Mode>,
    longpoll_hold: Mutex<Duration>,
    recording: AtomicBool,
    hits: AtomicU64,
    accepted: AtomicU64,
    open: AtomicU64,
    recycled: AtomicU64,
    stalled: AtomicU64,
    /// Requests for `/web/filestore/...` that reached the worker with `x_sendfile` on
    /// (Odoo logs an error for each: the web server should have served them).
    filestore_errors: AtomicU64,
    busy: AtomicU64,
    peak_busy: AtomicU64,
    busy_micros: AtomicU64,
    recorded: Mutex<VecDeque<Recorded>>,
    /// Like an Odoo prefork pool: at most this many requests are worked on at once;
    /// the others wait their turn. `None`: unlimited.
    capacity: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode_tx.borrow()
    }
}

/// A running simulated worker. Stops when dropped or with [`SimWorker::stop`].
pub struct SimWorker {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl SimWorker {
    /// Binds `addr` (port 0 picks a free port) as a threaded Odoo 17 and starts answering.
    pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<SimWorker> {
        SimWorker::start_with(name, addr, SimConfig::default()).await
    }

    /// Binds `addr` and answers as `cfg` says.
    pub async fn start_with(
        name: &str,
        addr: SocketAddr,
        cfg: SimConfig,
    ) -> std::io::Result<SimWorker> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (mode_tx, _) = watch::channel(Mode::Normal);
        let capacity = cfg
            .workers
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1))));
        let shared = Arc::new(Shared {
            name: name.to_string(),
            cfg,
            mode_tx,
            longpoll_hold: Mutex::new(Duration::from_secs(50)),
            recording: AtomicBool::new(true),
            hits: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
            filestore_errors: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            peak_busy: AtomicU64::new(0),
            busy_micros: AtomicU64::new(0),
            recorded: Mutex::new(VecDeque::new()),
            capacity: Mutex::new(capacity),
        });
        let task = tokio::spawn(accept_loop(listener, addr, shared.clone()));
        Ok(SimWorker { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The Odoo server behind this port.
    pub fn odoo(&self) -> &Arc<Odoo> {
        &self.shared.cfg.odoo
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode_tx.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// How long `/longpolling/poll` is held before it answers `[]` (default 50 s, as Odoo).
    pub fn set_longpoll_hold(&self, hold: Duration) {
        if let Ok(mut h) = self.shared.longpoll_hold.lock() {
            *h = hold;
        }
    }

    /// Limits how many requests are worked on at once (as an Odoo worker count
    /// does); longpolling and WebSockets are not counted (gevent). `None`: unlimited.
    pub fn set_capacity(&self, workers: Option<usize>) {
        if let Ok(mut c) = self.shared.capacity.lock() {
            *c = workers.map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1))));
        }
    }

    /// Turns recording of requests on or off (on by default; benches turn it off).
    pub fn set_recording(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
    }

    /// Requests answered (or failed on purpose) since start or the last reset.
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Ordering::Relaxed)
    }

    /// TCP connections accepted so far.
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// TCP connections open now.
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Requests dropped unanswered because their worker process was recycled.
    pub fn recycled(&self) -> u64 {
        self.shared.recycled.load(Ordering::Relaxed)
    }

    /// `/web/filestore/...` requests that reached this worker with `x_sendfile` on.
    pub fn filestore_errors(&self) -> u64 {
        self.shared.filestore_errors.load(Ordering::Relaxed)
    }

    /// Connections dropped because the client stalled past the socket timeout.
    pub fn stalled(&self) -> u64 {
        self.shared.stalled.load(Ordering::Relaxed)
    }

    /// Requests being worked on now, and the most seen at once.
    pub fn busy(&self) -> u64 {
        self.shared.busy.load(Ordering::Relaxed)
    }

    pub fn peak_busy(&self) -> u64 {
        self.shared.peak_busy.load(Ordering::Relaxed)
    }

    /// Worker-seconds spent on requests so far: from taking a worker process to the
    /// last byte of the response written out.
    pub fn busy_seconds(&self) -> f64 {
        self.shared.busy_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    pub fn reset_counters(&self) {
        self.shared.hits.store(0, Ordering::Relaxed);
        self.shared.peak_busy.store(0, Ordering::Relaxed);
        if let Ok(mut r) = self.shared.recorded.lock() {
            r.clear();
        }
    }

    /// The requests recorded so far (the last 4096), oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared
            .recorded
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Stops accepting and closes every connection.
    pub fn stop(self) {
        self.task.abort();
        self.shared.mode_tx.send_replace(Mode::Refuse);
    }
}

impl Drop for SimWorker {
    fn drop(&mut self) {
        self.task.abort();
        // Tell connection tasks to close too.
        self.shared.mode_tx.send_replace(Mode::Refuse);
    }
}

async fn accept_loop(listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    let mut listener = Some(listener);
    let mut mode_rx = shared.mode_tx.subscribe();
    loop {
        let mode = *mode_rx.borrow_and_update();
        if mode == Mode::Refuse {
            listener = None; // closes the socket: connects are refused
            if mode_rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        if listener.is_none() {
            match bind_retrying(addr).await {
                Some(l) => listener = Some(l),
                None => return,
            }
        }
        let Some(l) = listener.as_ref() else { continue };
        tokio::select! {
            accepted = l.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                if mode == Mode::Reset {
                    let _ = stream.set_zero_linger();
                    drop(stream);
                    shared.hits.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, shared.clone()));
            }
            changed = mode_rx.changed() => {
                if changed.is_err() { return; }
            }
        }
    }
}

async fn bind_retrying(addr: SocketAddr) -> Option<TcpListener> {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

struct OpenGuard(Arc<Shared>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    shared.open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(shared.clone());
    let mut mode_rx = shared.mode_tx.subscribe();
    // A keep-alive connection is served by one worker process, which counts the
    // requests it serves toward `limit_request`.
    let served = Arc::new(AtomicU64::new(0));
    let svc_shared = shared.clone();
    let service = service_fn(move |req| handle(req, svc_shared.clone(), served.clone()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(!shared.cfg.close_each);
    if let Some(t) = shared.cfg.socket_timeout {
        // Odoo's socket timeout also bounds the wait for a request head.
        builder.timer(TokioTimer::new()).header_read_timeout(t);
    }
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = mode_rx.changed() => {
                if changed.is_err() { return; }
                let m = *mode_rx.borrow_and_update();
                if matches!(m, Mode::Refuse | Mode::Reset) {
                    // A dead worker drops its connections.
                    return;
                }
            }
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    served: Arc<AtomicU64>,
) -> Result<Response<Held>, Dropped> {
    let head_at = Instant::now();
    let worker = shared.name.clone();
    let mode = shared.mode();
    let cfg = &shared.cfg;
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let method = req.method().clone();

    // `limit_request` (`Worker.check_limits`): the process has served its share and
    // exits; the request on its connection gets no answer, as from a killed worker.
    if let Some(limit) = cfg.limit_request {
        if served.load(Ordering::Relaxed) >= limit {
            shared.recycled.fetch_add(1, Ordering::Relaxed);
            return Err(Dropped::Recycled);
        }
    }
    served.fetch_add(1, Ordering::Relaxed);

    let sleep_ms = query_param(&query, "sleep_ms")
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| {
            req.headers()
                .get("x-sim-sleep-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        })
        .map(|ms| {
            // `jitter_ms=J`: the time varies uniformly within ±J, as real calls do.
            let j = query_param(&query, "jitter_ms")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                .min(ms);
            if j == 0 {
                ms
            } else {
                ms - j + odoo::random_u64() % (2 * j + 1)
            }
        });
    let forced_status = req
        .headers()
        .get("x-sim-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok());

    if path == "/websocket" && req.headers().contains_key(header::UPGRADE) {
        shared.hits.fetch_add(1, Ordering::Relaxed);
        record(&shared, &method, &target, req.headers(), 0, None, head_at);
        return Ok(held(ws::open(req, &worker, cfg), None, None));
    }

    // A prefork process works on one request at a time, from the moment it accepts
    // the connection: a slow upload holds it. Longpolls are gevent's.
    let semaphore = if path.starts_with("/longpolling/") {
        None
    } else {
        shared.capacity.lock().ok().and_then(|c| c.clone())
    };
    let slot = match &semaphore {
        Some(s) => s.clone().acquire_owned().await.ok(),
        None => None,
    };
    let busy = Busy::new(&shared);

    let headers = req.headers().clone();
    let body = match read_body(req.into_body(), cfg.socket_timeout).await {
        Ok(b) => b,
        Err(e) => {
            shared.stalled.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let body_at = Instant::now();
    shared.hits.fetch_add(1, Ordering::Relaxed);
    // Recorded on arrival (a held longpoll is visible while held), with the database
    // Odoo selects on the paths that select one.
    let db = selects_database(&path)
        .then(|| cfg.odoo.resolve(&headers).ok().and_then(|r| r.db))
        .flatten();
    record_full(
        &shared,
        Recorded {
            method: method.as_str().to_string(),
            target,
            headers: headers.clone(),
            body_len: body.len(),
            db,
            head_at,
            body_at,
        },
    );

    if mode == Mode::Drop {
        return Err(Dropped::Killed);
    }
    if let Mode::Slow(d) = mode {
        tokio::time::sleep(d).await;
    }
    if let Some(ms) = sleep_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
    }
    let resp = if let Mode::Status(code) = mode {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(
            status,
            &worker,
            serde_json::json!({"worker": worker, "error": "simulated failure"}).to_string(),
        )
    } else if let Some(status) = forced_status {
        json_response(
            status,
            &worker,
            serde_json::json!({"worker": worker, "forced_status": status.as_u16()}).to_string(),
        )
    } else {
        route(&shared, &method, &path, &query, &headers, &body).await
    };
    if mode == Mode::Truncate {
        return Ok(process::held_truncated(resp, slot, Some(busy)));
    }
    Ok(held(resp, slot, Some(busy)))
}

#[cfg(test)]
mod tests;
