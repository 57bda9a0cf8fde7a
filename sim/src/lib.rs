//! A simulated Odoo 17 worker, for portier's tests, demo and benches.
//!
//! It answers the way an Odoo worker does where a proxy can tell the difference:
//! `GET /web/health` -> `{"status":"pass"}`, `/web/login` sets a `session_id` cookie,
//! `/longpolling/poll` is held, `/websocket` upgrades and echoes, `/xmlrpc/2/*` and
//! `/jsonrpc` answer in their formats. Every answer names the worker (`x-sim-worker`
//! header and `"worker"` field) and, for ordinary paths, echoes the request headers it
//! received, so tests can assert what went upstream.
//!
//! Failure injection: [`Mode`] for the whole worker (500s, refused connections, reset
//! connections, slow answers), and per request the `x-sim-status: CODE` header and the
//! `sleep_ms=N` query parameter (or `x-sim-sleep-ms` header).

pub mod client;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

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
}

/// One request as the worker received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body_len: usize,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// All values of a header (for checking that a client copy was dropped).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    }
}

const MAX_RECORDED: usize = 4096;

struct Shared {
    name: String,
    mode_tx: watch::Sender<Mode>,
    longpoll_hold: Mutex<Duration>,
    recording: AtomicBool,
    hits: AtomicU64,
    accepted: AtomicU64,
    open: AtomicU64,
    session_seq: AtomicU64,
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
    /// Binds `addr` (port 0 picks a free port) and starts answering.
    pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<SimWorker> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (mode_tx, _) = watch::channel(Mode::Normal);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            mode_tx,
            longpoll_hold: Mutex::new(Duration::from_secs(50)),
            recording: AtomicBool::new(true),
            hits: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            session_seq: AtomicU64::new(0),
            recorded: Mutex::new(VecDeque::new()),
            capacity: Mutex::new(None),
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

    pub fn reset_counters(&self) {
        self.shared.hits.store(0, Ordering::Relaxed);
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
    let svc_shared = shared.clone();
    let service = service_fn(move |req| handle(req, svc_shared.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
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

type Resp = Response<Full<Bytes>>;

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

fn json_response(status: StatusCode, worker: &str, body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(worker) {
        h.insert("x-sim-worker", v);
    }
    resp
}

fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        map.insert(
            name.as_str().to_string(),
            serde_json::Value::from(values.join(", ")),
        );
    }
    serde_json::Value::Object(map)
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Resp, Infallible> {
    let worker = shared.name.clone();
    let mode = shared.mode();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let method = req.method().clone();

    let sleep_ms = query_param(&query, "sleep_ms")
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| {
            req.headers()
                .get("x-sim-sleep-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        });
    let forced_status = req
        .headers()
        .get("x-sim-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok());

    if path == "/websocket" && is_websocket_upgrade(req.headers()) {
        shared.hits.fetch_add(1, Ordering::Relaxed);
        record(&shared, &method, &target, req.headers(), 0);
        return Ok(websocket(req, worker));
    }

    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    shared.hits.fetch_add(1, Ordering::Relaxed);
    record(&shared, &method, &target, &headers, body.len());

    let semaphore = if path.starts_with("/longpolling/") {
        None
    } else {
        shared.capacity.lock().ok().and_then(|c| c.clone())
    };
    let _slot = match &semaphore {
        Some(s) => s.clone().acquire_owned().await.ok(),
        None => None,
    };
    if let Mode::Slow(d) = mode {
        tokio::time::sleep(d).await;
    }
    if let Some(ms) = sleep_ms {
        tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
    }
    if let Mode::Status(code) = mode {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(json_response(
            status,
            &worker,
            serde_json::json!({"worker": worker, "error": "simulated failure"}).to_string(),
        ));
    }
    if let Some(status) = forced_status {
        return Ok(json_response(
            status,
            &worker,
            serde_json::json!({"worker": worker, "forced_status": status.as_u16()}).to_string(),
        ));
    }

    let resp = match path.as_str() {
        "/web/health" => {
            json_response(StatusCode::OK, &worker, r#"{"status": "pass"}"#.to_string())
        }
        "/web/login" => {
            let mut r = json_response(
                StatusCode::OK,
                &worker,
                serde_json::json!({"worker": worker, "page": "login", "headers": headers_json(&headers)}).to_string(),
            );
            let has_session = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|c| c.split(';').any(|p| p.trim().starts_with("session_id=")));
            if !has_session {
                let n = shared.session_seq.fetch_add(1, Ordering::Relaxed);
                let sid = format!("{:016x}{:024x}", fastrand_u64(), n);
                let cookie = format!(
                    "session_id={sid}; Expires=Thu, 01 Jan 2099 00:00:00 GMT; Max-Age=604800; HttpOnly; Path=/; SameSite=Lax"
                );
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
            }
            r
        }
        "/longpolling/poll" => {
            if sleep_ms.is_none() {
                let hold = shared
                    .longpoll_hold
                    .lock()
                    .map(|h| *h)
                    .unwrap_or(Duration::from_secs(50));
                tokio::time::sleep(hold).await;
            }
            json_response(StatusCode::OK, &worker, "[]".to_string())
        }
        "/jsonrpc" => {
            let id = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("id").cloned())
                .unwrap_or(serde_json::Value::Null);
            json_response(
                StatusCode::OK,
                &worker,
                serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {"worker": worker, "headers": headers_json(&headers)}})
                    .to_string(),
            )
        }
        p if p.starts_with("/xmlrpc/") => {
            let xml = format!(
                "<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><string>{worker}</string></value>\n</param>\n</params>\n</methodResponse>\n"
            );
            let mut r = Response::new(Full::new(Bytes::from(xml)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/xml; charset=utf-8"),
            );
            if let Ok(v) = HeaderValue::from_str(&worker) {
                r.headers_mut().insert("x-sim-worker", v);
            }
            r
        }
        _ => {
            let mut v = serde_json::json!({
                "worker": worker,
                "method": method.as_str(),
                "target": target,
                "headers": headers_json(&headers),
                "body_len": body.len(),
            });
            if let Some(size) = query_param(&query, "size").and_then(|s| s.parse::<usize>().ok()) {
                let base = v.to_string().len() + 12;
                let pad = size.saturating_sub(base).min(16 << 20);
                v["pad"] = serde_json::Value::from("x".repeat(pad));
            }
            json_response(StatusCode::OK, &worker, v.to_string())
        }
    };
    Ok(resp)
}

fn record(shared: &Shared, method: &Method, target: &str, headers: &HeaderMap, body_len: usize) {
    if !shared.recording.load(Ordering::Relaxed) {
        return;
    }
    if let Ok(mut r) = shared.recorded.lock() {
        if r.len() >= MAX_RECORDED {
            r.pop_front();
        }
        r.push_back(Recorded {
            method: method.as_str().to_string(),
            target: target.to_string(),
            headers: headers.clone(),
            body_len,
        });
    }
}

fn fastrand_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    upgrade && connection && headers.contains_key(header::SEC_WEBSOCKET_KEY)
}

/// Answers the upgrade with 101 and echoes every message; `whoami` gets the worker name.
fn websocket(req: Request<Incoming>, worker: String) -> Resp {
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Ok(v) = HeaderValue::from_str(&worker) {
        h.insert("x-sim-worker", v);
    }
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) if t.as_str() == "whoami" => Message::text(worker.clone()),
                Message::Text(t) => Message::Text(t),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
        let _ = ws.close(None).await;
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn raw(addr: SocketAddr, req: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[tokio::test]
    async fn health_login_and_echo() {
        let w = SimWorker::start("w1", local()).await.unwrap();
        let r = raw(
            w.addr(),
            "GET /web/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains(r#"{"status": "pass"}"#), "{r}");
        let r = raw(
            w.addr(),
            "GET /web/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(
            r.to_ascii_lowercase().contains("set-cookie: session_id="),
            "{r}"
        );
        let r = raw(
            w.addr(),
            "POST /web/dataset HTTP/1.1\r\nHost: x\r\nX-Test: 1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await
        .unwrap();
        assert!(r.contains(r#""x-test":"1""#), "{r}");
        assert!(r.contains(r#""body_len":3"#), "{r}");
        assert_eq!(w.hits(), 3);
        assert_eq!(w.requests()[2].header("x-test"), Some("1"));
    }

    #[tokio::test]
    async fn failure_modes() {
        let w = SimWorker::start("w1", local()).await.unwrap();
        let addr = w.addr();
        w.set_mode(Mode::Status(503));
        let r = raw(
            addr,
            "GET /web/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        w.set_mode(Mode::Refuse);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
        w.set_mode(Mode::Reset);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = raw(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            r.is_err() || r.as_ref().is_ok_and(|s| s.is_empty()),
            "{r:?}"
        );
        w.set_mode(Mode::Normal);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = raw(addr, "GET /x?sleep_ms=10 HTTP/1.1\r\nHost: x\r\nx-sim-status: 502\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    }
}
