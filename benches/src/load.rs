//! The load generator: closed loop (a fixed number of connections sending back to
//! back) and open loop (a fixed arrival rate; latency is measured from each
//! request's scheduled start, so a slow server cannot hide its queueing —
//! no coordinated omission). HTTP/1.1 keep-alive over plain TCP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use tokio::sync::mpsc;

use crate::pace::{next_start, Pacer};

/// The request a load sends, over and over.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: http::Method,
    pub host: String,
    /// When set, requests cycle through these hosts instead of `host`.
    pub hosts: Vec<String>,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Req {
    pub fn get(host: &str, path: &str) -> Req {
        Req {
            method: http::Method::GET,
            host: host.into(),
            hosts: Vec::new(),
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn post(host: &str, path: &str, body: Bytes) -> Req {
        Req {
            method: http::Method::POST,
            host: host.into(),
            hosts: Vec::new(),
            path: path.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body,
        }
    }

    pub fn build(&self, n: u64) -> http::Request<Full<Bytes>> {
        let host = if self.hosts.is_empty() {
            self.host.as_str()
        } else {
            self.hosts[(n % self.hosts.len() as u64) as usize].as_str()
        };
        let mut b = http::Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str())
            .header("host", host);
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        b.body(Full::new(self.body.clone()))
            .unwrap_or_else(|_| http::Request::new(Full::new(Bytes::new())))
    }
}

/// What a load run measured.
pub struct Stats {
    /// Latency in microseconds of every answered request.
    pub hist: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
    /// Transport errors (connect, reset, timeout).
    pub errors: u64,
    pub elapsed: Duration,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds"),
            statuses: BTreeMap::new(),
            errors: 0,
            elapsed: Duration::ZERO,
        }
    }
}

impl Stats {
    pub fn record(&mut self, latency: Duration, status: Option<u16>) {
        match status {
            Some(s) => {
                let _ = self.hist.record((latency.as_micros() as u64).max(1));
                *self.statuses.entry(s).or_default() += 1;
            }
            None => self.errors += 1,
        }
    }

    /// Adds another run's figures (a task's local stats) to these.
    fn merge(&mut self, other: Stats) {
        self.hist.add(&other.hist).ok();
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.errors += other.errors;
    }

    /// The shared stats once every task is done, with the elapsed time set.
    fn finish(shared: Arc<Mutex<Stats>>, start: Instant) -> Stats {
        let mut out = match Arc::try_unwrap(shared) {
            Ok(m) => m.into_inner().unwrap_or_default(),
            Err(_) => Stats::default(),
        };
        out.elapsed = start.elapsed();
        out
    }

    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// Requests that failed: transport errors and 5xx answers.
    pub fn failures(&self) -> u64 {
        self.errors
            + self
                .statuses
                .iter()
                .filter(|(s, _)| **s >= 500)
                .map(|(_, n)| n)
                .sum::<u64>()
    }

    pub fn rps(&self) -> f64 {
        self.answered() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn json(&self) -> serde_json::Value {
        let statuses: serde_json::Map<String, serde_json::Value> = self
            .statuses
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        serde_json::json!({
            "requests": self.answered(),
            "rps": (self.rps() * 10.0).round() / 10.0,
            "p50_ms": self.ms(0.5),
            "p90_ms": self.ms(0.9),
            "p99_ms": self.ms(0.99),
            "p999_ms": self.ms(0.999),
            "max_ms": self.hist.max() as f64 / 1000.0,
            "errors": self.errors,
            "failures": self.failures(),
            "statuses": statuses,
            "seconds": self.elapsed.as_secs_f64(),
        })
    }
}

async fn connect(addr: SocketAddr) -> Option<SendRequest<Full<Bytes>>> {
    portier_sim::client::connect(addr).await.ok()
}

/// Sends one request; returns the status once the whole body has arrived.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    req: &Req,
    n: u64,
    timeout: Duration,
) -> Option<u16> {
    let fut = async {
        sender.ready().await.ok()?;
        let resp = sender.send_request(req.build(n)).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// Closed loop: `conns` connections each sending `req` back to back for `duration`.
pub async fn closed(
    addr: SocketAddr,
    req: Arc<Req>,
    conns: usize,
    duration: Duration,
    progress: Option<&Progress>,
) -> Stats {
    keepalive(addr, req, conns, None, duration, progress).await
}

/// Constant rate over keep-alive connections, as wrk2 does: `rate` requests per second
/// shared by `conns` connections, each sending its next request when it is due (or at
/// once when it is already late); latency counts from when a request was due.
pub async fn paced(
    addr: SocketAddr,
    req: Arc<Req>,
    conns: usize,
    rate: f64,
    duration: Duration,
) -> Stats {
    keepalive(addr, req, conns, Some(rate), duration, None).await
}

async fn keepalive(
    addr: SocketAddr,
    req: Arc<Req>,
    conns: usize,
    rate: Option<f64>,
    duration: Duration,
    progress: Option<&Progress>,
) -> Stats {
    let stats = Arc::new(Mutex::new(Stats::default()));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for i in 0..conns {
        let req = req.clone();
        let stats = stats.clone();
        let counters = progress.map(|p| (p.done.clone(), p.errors.clone()));
        let mut pacer = rate.map(|r| Pacer::new(r, i, conns));
        tasks.push(tokio::spawn(async move {
            let mut local = Stats::default();
            let mut sender = None;
            while Instant::now() < deadline {
                if sender.is_none() {
                    sender = connect(addr).await;
                    if sender.is_none() {
                        local.errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
                let t0 = next_start(&mut pacer).await;
                if t0 >= deadline {
                    break;
                }
                let n = local.answered() + local.errors;
                let status = match sender.as_mut() {
                    Some(s) => exchange(s, &req, n, Duration::from_secs(30)).await,
                    None => None,
                };
                if status.is_none() {
                    sender = None;
                }
                if let Some((d, e)) = &counters {
                    match status {
                        Some(_) => d.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                        None => e.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    };
                }
                local.record(t0.elapsed(), status);
            }
            if let Ok(mut s) = stats.lock() {
                s.merge(local);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Stats::finish(stats, start)
}

/// Open loop: `rate` requests per second for `duration`, on up to `max_conns`
/// keep-alive connections. Latency counts from each request's scheduled time.
pub async fn open(
    addr: SocketAddr,
    req: Arc<Req>,
    rate: f64,
    max_conns: usize,
    duration: Duration,
) -> Stats {
    let stats = Arc::new(Mutex::new(Stats::default()));
    let (idle_tx, idle_rx) = mpsc::unbounded_channel::<SendRequest<Full<Bytes>>>();
    let idle_rx = Arc::new(tokio::sync::Mutex::new(idle_rx));
    let open_conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(max_conns));
    let start = tokio::time::Instant::now();
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (req, stats, idle_tx, idle_rx, slots, open_conns) = (
            req.clone(),
            stats.clone(),
            idle_tx.clone(),
            idle_rx.clone(),
            slots.clone(),
            open_conns.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Waiting for a free connection counts in the latency: it is queueing.
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            // Connections the server closed (e.g. `Connection: close`) are not reused.
            let mut reused = None;
            while let Ok(s) = idle_rx.lock().await.try_recv() {
                if !s.is_closed() {
                    reused = Some(s);
                    break;
                }
            }
            let mut sender = match reused {
                Some(s) => Some(s),
                None => {
                    let s = connect(addr).await;
                    if s.is_some() {
                        open_conns.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    s
                }
            };
            let status = match sender.as_mut() {
                Some(s) => exchange(s, &req, i, Duration::from_secs(30)).await,
                None => None,
            };
            let latency = scheduled.elapsed();
            if let (Some(s), Some(_)) = (sender, status) {
                if !s.is_closed() {
                    let _ = idle_tx.send(s);
                }
            }
            if let Ok(mut st) = stats.lock() {
                st.record(latency, status);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Stats::finish(stats, start.into_std())
}

/// A once-a-second progress line on stderr while a load runs.
pub struct Progress {
    pub done: Arc<std::sync::atomic::AtomicU64>,
    pub errors: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(label: String) -> Progress {
        use std::sync::atomic::{AtomicU64, Ordering};
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (d, e) = (done.clone(), errors.clone());
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = d.load(Ordering::Relaxed);
                eprintln!(
                    "{label}: {:>4.0}s {now} requests, {} req/s, {} errors",
                    start.elapsed().as_secs_f64(),
                    now - last,
                    e.load(Ordering::Relaxed)
                );
                last = now;
            }
        });
        Progress { done, errors, task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS client configuration for load against a test certificate (not verified:
/// the server's cost, which is what is measured, is the same), offering `alpn`.
pub fn tls_client(alpn: &[&[u8]], resumption: bool) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::peers::AcceptAny(provider)))
        .with_no_client_auth();
    if !resumption {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// Closed loop over HTTP/2 and TLS: `conns` connections, each with `streams`
/// requests in flight, for `duration`.
pub async fn closed_h2(
    addr: SocketAddr,
    sni: &str,
    req: Arc<Req>,
    conns: usize,
    streams: usize,
    duration: Duration,
    progress: Option<&Progress>,
) -> Stats {
    h2_streams(addr, sni, req, (conns, streams), None, duration, progress).await
}

/// [`paced`] over HTTP/2 and TLS: `rate` requests per second shared by every stream of
/// `conns` connections with `streams` each.
pub async fn paced_h2(
    addr: SocketAddr,
    sni: &str,
    req: Arc<Req>,
    (conns, streams): (usize, usize),
    rate: f64,
    duration: Duration,
) -> Stats {
    h2_streams(addr, sni, req, (conns, streams), Some(rate), duration, None).await
}

async fn h2_streams(
    addr: SocketAddr,
    sni: &str,
    req: Arc<Req>,
    (conns, streams): (usize, usize),
    rate: Option<f64>,
    duration: Duration,
    progress: Option<&Progress>,
) -> Stats {
    use std::sync::atomic::Ordering;
    let cfg = tls_client(&[b"h2"], true);
    let stats = Arc::new(Mutex::new(Stats::default()));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let connector = tokio_rustls::TlsConnector::from(cfg.clone());
        let Ok(name) = rustls::pki_types::ServerName::try_from(sni.to_string()) else {
            break;
        };
        let sender = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            let _ = tcp.set_nodelay(true);
            let tls = connector.connect(name, tcp).await.ok()?;
            let (sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tls),
            )
            .await
            .ok()?;
            tokio::spawn(conn);
            Some(sender)
        }
        .await;
        let Some(sender) = sender else {
            if let Ok(mut s) = stats.lock() {
                s.errors += 1;
            }
            continue;
        };
        for _ in 0..streams {
            let mut sender = sender.clone();
            let (req, stats) = (req.clone(), stats.clone());
            let counters = progress.map(|p| (p.done.clone(), p.errors.clone()));
            let mut pacer = rate.map(|r| Pacer::new(r, tasks.len(), conns * streams));
            tasks.push(tokio::spawn(async move {
                let mut local = Stats::default();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t0 = next_start(&mut pacer).await;
                    if t0 >= deadline {
                        break;
                    }
                    let mut r = req.build(n);
                    n += 1;
                    *r.version_mut() = http::Version::HTTP_2;
                    let host = r.headers_mut().remove("host");
                    if let Some(h) = host.and_then(|h| h.to_str().ok().map(str::to_string)) {
                        if let Ok(uri) = format!("https://{h}{}", req.path).parse() {
                            *r.uri_mut() = uri;
                        }
                    }
                    let status = async {
                        sender.ready().await.ok()?;
                        let resp = sender.send_request(r).await.ok()?;
                        let s = resp.status().as_u16();
                        resp.into_body().collect().await.ok()?;
                        Some(s)
                    }
                    .await;
                    if let Some((d, e)) = &counters {
                        match status {
                            Some(_) => d.fetch_add(1, Ordering::Relaxed),
                            None => e.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    local.record(t0.elapsed(), status);
                    if status.is_none() {
                        break;
                    }
                }
                if let Ok(mut s) = stats.lock() {
                    s.merge(local);
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    Stats::finish(stats, start)
}

/// A one-row markdown table of a load's results.
pub fn table(label: &str, s: &Stats) -> String {
    format!(
        "| load | requests | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |\n|---|---|---|---|---|---|---|---|\n| {label} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
        s.answered() + s.errors,
        s.rps(),
        s.ms(0.5),
        s.ms(0.9),
        s.ms(0.99),
        s.ms(0.999),
        s.failures()
    )
}

/// A slow client: one `GET` of `path` on a new connection (a 16 KiB receive buffer),
/// read at `rate` bytes per second until the server closes; whether `expect` bytes or
/// more arrived before `deadline`, and how many did.
pub async fn slow_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    expect: u64,
    rate: usize,
    deadline: Instant,
) -> (bool, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
        return (false, 0);
    };
    let _ = socket.set_recv_buffer_size(16 * 1024);
    let Ok(mut conn) = socket.connect(addr).await else {
        return (false, 0);
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if conn.write_all(req.as_bytes()).await.is_err() {
        return (false, 0);
    }
    let step = 16 * 1024;
    let pause = Duration::from_secs_f64(step as f64 / rate as f64);
    let mut buf = vec![0u8; step];
    let mut got = 0u64;
    let mut next = Instant::now();
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
            Ok(Ok(0)) => return (got >= expect, got),
            Ok(Ok(n)) => got += n as u64,
            Ok(Err(_)) => return (false, got),
            Err(_) => continue,
        }
        next += pause;
        tokio::time::sleep_until(next.into()).await;
    }
    (false, got)
}
