//! Running the peers of ../shared/peers (nginx, HAProxy, Traefik, Caddy) and portier
//! through the shared `targets/*.sh` interface, for the scenarios the shared harness
//! does not have: new TLS handshakes per second and memory per open WebSocket.
//!
//! Topology as in the shared harness: the upstream (the shared nginx stand-in, or a
//! simulated Odoo worker for WebSockets) and the load generator on CPU 0, the proxy
//! alone on CPU 1. Every process is started in its own session and ended by its
//! process group, by PID.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proc;

pub const LISTEN_PORT: u16 = 18080;
pub const TLS_PORT: u16 = 18443;
const UP_A: u16 = 18069;
const UP_B: u16 = 18070;
const UP_LP: u16 = 18072;

/// Where the shared harness lives and what a run needs.
pub struct Env {
    pub peers_dir: PathBuf,
    pub tools: PathBuf,
    pub portier: PathBuf,
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Env {
    pub fn new(peers_dir: &Path, portier: &Path) -> std::io::Result<Env> {
        let dir = proc::workdir()?;
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        // The same certificate the shared harness generates: RSA-2048, a.test/b.test.
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=a.test",
            ])
            .args([
                "-addext",
                "subjectAltName=DNS:a.test,DNS:b.test,DNS:localhost,IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if !ok {
            return Err(std::io::Error::other(
                "openssl could not make the test certificate",
            ));
        }
        Ok(Env {
            peers_dir: peers_dir.to_path_buf(),
            tools: std::env::var_os("PEERS_TOOLS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp/peers-tools")),
            portier: portier.to_path_buf(),
            dir,
            cert,
            key,
        })
    }
}

/// A process group started in its own session.
pub struct Group {
    child: Child,
    pub name: String,
}

impl Group {
    pub(crate) fn spawn(
        name: &str,
        cpus: &str,
        log: &Path,
        cmd: &mut Command,
    ) -> std::io::Result<Group> {
        let log = std::fs::File::create(log)?;
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut outer = Command::new("setsid");
        outer
            .arg("taskset")
            .arg("-c")
            .arg(cpus)
            .arg(program)
            .args(args);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => outer.env(k, v),
                None => outer.env_remove(k),
            };
        }
        let child = outer
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Group {
            child,
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the whole process tree (nginx has workers), KiB.
    pub fn tree_rss_kib(&self) -> u64 {
        tree_pids(self.pid())
            .into_iter()
            .map(|p| proc::status_kib(p, "VmRSS"))
            .sum()
    }

    pub fn tree_cpu_seconds(&self) -> f64 {
        tree_pids(self.pid())
            .into_iter()
            .map(proc::cpu_seconds)
            .sum()
    }

    pub fn stop(mut self) {
        let pgid = format!("-{}", self.pid());
        let _ = Command::new("kill").args(["-TERM", "--", &pgid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &pgid])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

fn tree_pids(root: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                if let Some(ppid) = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok())
                {
                    parent.insert(pid, ppid);
                }
            }
        }
    }
    let mut set = vec![root];
    let mut changed = true;
    while changed {
        changed = false;
        for (p, pp) in &parent {
            if !set.contains(p) && set.contains(pp) {
                set.push(*p);
                changed = true;
            }
        }
    }
    set
}

async fn answers(addr: SocketAddr, host: &str, path: &str) -> bool {
    portier_sim::client::request(addr, "GET", host, path, &[], bytes::Bytes::new())
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

/// The shared stand-in upstream (nginx on :18069/:18070, held requests on :18072).
pub async fn start_upstream(env: &Env) -> std::io::Result<Group> {
    let wd = env.dir.path().join("upstream");
    std::fs::create_dir_all(&wd)?;
    let mut cmd = Command::new("bash");
    cmd.arg(env.peers_dir.join("upstream/run.sh"))
        .env("WORKDIR", &wd)
        .env("CERT", &env.cert)
        .env("KEY", &env.key);
    let g = Group::spawn("upstream", "0", &wd.join("log"), &mut cmd)?;
    let a: SocketAddr = ([127, 0, 0, 1], UP_A).into();
    for _ in 0..100 {
        if answers(a, "a.test", "/").await {
            return Ok(g);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    g.stop();
    Err(std::io::Error::other("the shared upstream did not start"))
}

/// Starts `targets/NAME.sh` on CPU 1 with the shared harness's variables;
/// `lp_upstream` overrides where /longpolling and /websocket go.
pub async fn start_target(
    env: &Env,
    name: &str,
    lp_upstream: Option<SocketAddr>,
) -> std::io::Result<Group> {
    start_target_with(env, name, lp_upstream, None).await
}

/// [`start_target`], with `app` (when given) as the HTTP upstreams instead of the
/// shared harness's.
pub async fn start_target_with(
    env: &Env,
    name: &str,
    lp_upstream: Option<SocketAddr>,
    app: Option<&[SocketAddr]>,
) -> std::io::Result<Group> {
    let wd = env.dir.path().join(name);
    let _ = std::fs::remove_dir_all(&wd);
    std::fs::create_dir_all(&wd)?;
    let lp = lp_upstream
        .map(|a| a.to_string())
        .unwrap_or_else(|| format!("127.0.0.1:{UP_LP}"));
    let mut cmd = Command::new("bash");
    cmd.arg(env.peers_dir.join(format!("targets/{name}.sh")))
        .env("WORKDIR", &wd)
        .env("WORKERS", "1")
        .env("GOMAXPROCS", "1")
        .env("CERT", &env.cert)
        .env("KEY", &env.key)
        .env("LISTEN_PORT", LISTEN_PORT.to_string())
        .env("TLS_PORT", TLS_PORT.to_string())
        .env(
            "UPSTREAM_APP",
            match app {
                Some(list) => list
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                None => format!("127.0.0.1:{UP_A} 127.0.0.1:{UP_B}"),
            },
        )
        .env("UPSTREAM_LP", lp)
        .env("PEERS_TOOLS", &env.tools)
        .env("PORTIER_BIN", &env.portier);
    let g = Group::spawn(name, "1", &wd.join("proxy.log"), &mut cmd)?;
    let addr: SocketAddr = ([127, 0, 0, 1], LISTEN_PORT).into();
    for _ in 0..200 {
        if answers(addr, "a.test", "/").await {
            return Ok(g);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(wd.join("proxy.log")).unwrap_or_default();
    g.stop();
    Err(std::io::Error::other(format!(
        "{name} did not start: {}",
        log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
    )))
}

pub fn target_version(env: &Env, name: &str) -> String {
    Command::new("bash")
        .arg(env.peers_dir.join(format!("targets/{name}.sh")))
        .arg("version")
        .env("PEERS_TOOLS", &env.tools)
        .env("PORTIER_BIN", &env.portier)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Result of the handshake scenario for one target.
pub struct Handshakes {
    pub target: String,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub cpu_pct: f64,
}

/// New TLS connections per second, each carrying one HTTP/1.1 request
/// (`Connection: close`), with session resumption off: every one is a full
/// handshake. `conns` handshakes are in flight at once for `seconds`.
pub async fn handshakes(target: &Group, conns: usize, seconds: u64) -> Handshakes {
    let cfg = crate::load::tls_client(&[b"http/1.1"], false);
    let addr: SocketAddr = ([127, 0, 0, 1], TLS_PORT).into();
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    ));
    let cpu0 = target.tree_cpu_seconds();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (cfg, done, errors, lat) = (cfg.clone(), done.clone(), errors.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(cfg);
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let ok = async {
                    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
                    let _ = tcp.set_nodelay(true);
                    let name = rustls::pki_types::ServerName::try_from("a.test").ok()?;
                    let mut tls = connector.connect(name, tcp).await.ok()?;
                    tls.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                        .await
                        .ok()?;
                    let mut buf = Vec::with_capacity(2048);
                    let _ = tls.read_to_end(&mut buf).await;
                    buf.starts_with(b"HTTP/1.1 200").then_some(())
                };
                match tokio::time::timeout(Duration::from_secs(10), ok).await {
                    Ok(Some(())) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut h) = lat.lock() {
                            let _ = h.record((t0.elapsed().as_micros() as u64).max(1));
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = target.tree_cpu_seconds() - cpu0;
    let h = lat.lock().map(|h| h.clone()).ok();
    Handshakes {
        target: target.name.clone(),
        per_second: done.load(Ordering::Relaxed) as f64 / secs,
        p50_ms: h
            .as_ref()
            .map(|h| h.value_at_quantile(0.5) as f64 / 1000.0)
            .unwrap_or(0.0),
        p99_ms: h
            .as_ref()
            .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0)
            .unwrap_or(0.0),
        errors: errors.load(Ordering::Relaxed),
        cpu_pct: cpu / secs * 100.0,
    }
}

/// Accepts any server certificate (load against self-signed test certificates).
#[derive(Debug)]
pub struct AcceptAny(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Result of the WebSocket scenario for one target.
pub struct Sockets {
    pub target: String,
    pub opened: usize,
    pub echoed: usize,
    pub rss_before_kib: u64,
    pub rss_open_kib: u64,
}

impl Sockets {
    pub fn kib_per_conn(&self) -> f64 {
        if self.opened == 0 {
            return 0.0;
        }
        (self.rss_open_kib.saturating_sub(self.rss_before_kib)) as f64 / self.opened as f64
    }
}

/// Opens `n` WebSockets through the target (to a simulated gevent worker) — plain, or
/// over TLS to its HTTPS port (`wss`, ALPN http/1.1: what a browser tab holds) — echoes
/// one message on each, and reads the proxy tree's RSS before and with all open.
pub async fn websockets(target: &Group, n: usize, tls: bool) -> Sockets {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kib = target.tree_rss_kib();
    let (opened, echoed, rss_open_kib) = if tls {
        let cfg = crate::load::tls_client(&[b"http/1.1"], false);
        hold(target, n, move || wss(cfg.clone())).await
    } else {
        hold(target, n, || async {
            let addr: SocketAddr = ([127, 0, 0, 1], LISTEN_PORT).into();
            let ws = portier_sim::client::websocket(addr, "a.test", "/websocket", &[]).await;
            ws.ok().map(|(ws, _)| ws)
        })
        .await
    };
    Sockets {
        target: target.name.clone(),
        opened,
        echoed,
        rss_before_kib,
        rss_open_kib,
    }
}

async fn wss(
    cfg: Arc<rustls::ClientConfig>,
) -> Option<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], TLS_PORT)))
        .await
        .ok()?;
    let name = rustls::pki_types::ServerName::try_from("a.test").ok()?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .ok()?;
    let ws = portier_sim::client::websocket_over(tls, "a.test", "/websocket", &[]).await;
    ws.ok().map(|(ws, _)| ws)
}

/// Opens `n` sockets with `open` (100 at a time), one echo on each (so that the
/// buffers a real one would have exist), and reads the target's RSS 2 s later:
/// (opened, echoed, RSS KiB).
async fn hold<S, F, Fut>(target: &Group, n: usize, open: F) -> (usize, usize, u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<tokio_tungstenite::WebSocketStream<S>>>
        + Send
        + 'static,
{
    use futures_util::{SinkExt, StreamExt};
    let mut sockets = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(100) {
        let opening: Vec<_> = (0..100.min(n - chunk * 100))
            .map(|_| tokio::spawn(open()))
            .collect();
        for o in opening {
            if let Ok(Some(ws)) = o.await {
                sockets.push(ws);
            }
        }
    }
    let mut echoed = 0;
    for ws in sockets.iter_mut() {
        let msg = tokio_tungstenite::tungstenite::Message::text("ping from the bench");
        if ws.send(msg).await.is_ok() {
            if let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                echoed += 1;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    (sockets.len(), echoed, target.tree_rss_kib())
}
