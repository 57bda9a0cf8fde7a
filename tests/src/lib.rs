//! Harness for portier's end-to-end tests: starts the real `portier` binary on
//! 127.0.0.1 with a config file written by the test, captures its stderr (logs and
//! access log), and offers small HTTP/WebSocket/raw-TCP clients. Simulated Odoo
//! workers come from `portier-sim` and run inside the test process.
//!
//! The binary is `$PORTIER_BIN`, else `target/{debug,release}/portier` of this
//! workspace (matching the test build's profile); build it first
//! (`cargo build -p portier`), as the README's test command does.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::TcpStream;

pub mod browser;
mod clients;
mod dns;
pub mod k8s;
mod tls;
pub use clients::*;
pub use dns::*;
pub use tls::*;
pub mod h2raw;

pub use portier_sim::{apiserver, client, Mode, SimWorker};

/// The portier binary under test.
pub fn portier_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTIER_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let bin = target.join(profile).join("portier");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build {}-p portier) or set PORTIER_BIN",
        bin.display(),
        if cfg!(debug_assertions) {
            ""
        } else {
            "--release "
        }
    );
    bin
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough on a test machine).
/// Never the same port twice in one test process: the kernel may hand a released port
/// out again, and two tests running at once would then start two processes on it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let Ok(mut given) = GIVEN.lock() else {
            return port;
        };
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts a simulated worker on a free loopback port.
pub async fn sim(name: &str) -> SimWorker {
    SimWorker::start(name, local(0))
        .await
        .expect("sim worker starts")
}

/// Starts a simulated Odoo 17 prefork HTTP worker (`odoo/service/server.py`,
/// `WorkerHTTP`: a 2 s socket timeout, so a client silent for 2 s is dropped and a kept
/// connection idle for 2 s is closed) on a free loopback port.
pub async fn prefork_sim(name: &str) -> SimWorker {
    let cfg = portier_sim::SimConfig::new(
        portier_sim::Server::Http,
        std::sync::Arc::new(portier_sim::Odoo::new(portier_sim::OdooVersion::V17, None)),
    );
    SimWorker::start_with(name, local(0), cfg)
        .await
        .expect("sim worker starts")
}

/// `["127.0.0.1:1", ...]` for a config file.
pub fn toml_list(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", items.join(", "))
}

/// A running portier process; killed (by its PID) when dropped.
pub struct Portier {
    child: Option<Child>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
}

/// The `[listen]` section for a test: http and admin on free ports, one thread.
pub struct Ports {
    pub http: u16,
    pub https: u16,
    pub admin: u16,
}

impl Ports {
    pub fn new() -> Ports {
        Ports {
            http: free_port(),
            https: free_port(),
            admin: free_port(),
        }
    }

    pub fn listen(&self) -> String {
        format!(
            "[listen]\nhttp = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\nthreads = 1\ndrain = \"10s\"\n",
            self.http, self.admin
        )
    }
}

impl Default for Ports {
    fn default() -> Self {
        Self::new()
    }
}

fn capture(stream: impl std::io::Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>, echo: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("[portier] {line}");
            }
            if let Ok(mut s) = sink.lock() {
                s.push(line);
            }
        }
    });
}

impl Portier {
    /// Writes `config` to a fresh directory and runs `portier run -c` on it, waiting
    /// until `/readyz` answers 200.
    pub async fn start(ports: &Ports, config: &str) -> Portier {
        Self::start_with(ports, config, &[]).await
    }

    pub async fn start_with(ports: &Ports, config: &str, env: &[(&str, &str)]) -> Portier {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("portier.toml");
        std::fs::write(&path, config).expect("write config");
        let p = Self::spawn(
            ports,
            dir,
            &["run", "-c", path.to_str().unwrap_or_default()],
            env,
        );
        p.wait_ready().await;
        p
    }

    /// Spawns portier with arbitrary arguments (no readiness wait).
    pub fn spawn(
        ports: &Ports,
        dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Portier {
        let mut cmd = Command::new(portier_bin());
        cmd.args(args);
        Self::spawn_cmd(ports, dir, cmd, env)
    }

    /// `portier run -c CONFIG` (written to a fresh directory) started as systemd's
    /// socket activation starts it: the listening socket `fd` (held by the caller, as
    /// the `.socket` unit holds it) passed as descriptor 3, with `LISTEN_FDS=1` and
    /// `LISTEN_PID` the process's own PID. Waits until ready.
    pub async fn start_activated(
        ports: &Ports,
        config: &str,
        fd: std::os::unix::io::RawFd,
    ) -> Portier {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("portier.toml");
        std::fs::write(&path, config).expect("write config");
        // `sh` sets LISTEN_PID to its own PID, which `exec` hands to portier.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(portier_bin())
            .args(["run", "-c", path.to_str().unwrap_or_default()])
            .env("LISTEN_FDS", "1");
        // SAFETY: between fork and exec only dup2 runs (async-signal-safe); it places
        // the socket at descriptor 3, without close-on-exec, as systemd does.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    // dup2 onto itself keeps close-on-exec: clear it instead.
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let p = Self::spawn_cmd(ports, dir, cmd, &[]);
        p.wait_ready().await;
        p
    }

    fn spawn_cmd(
        ports: &Ports,
        dir: tempfile::TempDir,
        mut cmd: Command,
        env: &[(&str, &str)],
    ) -> Portier {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("portier starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let echo = std::env::var_os("PORTIER_TEST_ECHO").is_some();
        if let Some(e) = child.stderr.take() {
            capture(e, stderr.clone(), echo);
        }
        if let Some(o) = child.stdout.take() {
            capture(o, stdout.clone(), echo);
        }
        Portier {
            child: Some(child),
            http: local(ports.http),
            admin: local(ports.admin),
            dir,
            stderr,
            stdout,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portier.toml")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The admin listener's `/metrics` once it has `line`, or as it is after 2 s. A
    /// request is counted when its log line is written, just after its answer went out:
    /// a client holding the last answer may ask before that request is counted.
    pub async fn metrics_with(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let m = clients::get(self.admin, "admin", "/metrics")
                .await
                .map(|r| r.text())
                .unwrap_or_default();
            if m.contains(line) || Instant::now() >= deadline {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = get(self.admin, "admin", "/readyz").await {
                if r.status == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "portier did not become ready; stderr:\n{}",
                    self.stderr().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends a signal (by PID) with `kill`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything portier wrote on stderr so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The access-log records written so far (JSON lines with a `request_id`).
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.stderr()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("request_id").is_some() && v.get("status").is_some())
            .collect()
    }

    /// Waits until an access-log record satisfies `pred` (the log is written asynchronously).
    pub async fn wait_access_log(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = self.access_log().into_iter().find(|v| pred(v)) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "no matching access-log line; stderr:\n{}",
                    self.stderr().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Portier {
    fn drop(&mut self) {
        // A failing test shows what portier said (its log lines, not the access log),
        // the last 40 of them.
        if std::thread::panicking() {
            let lines: Vec<String> = self
                .stderr()
                .into_iter()
                .filter(|l| !l.contains("\"request_id\""))
                .collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("portier {}: {l}", self.http);
            }
        }
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// The value of the first line of a `/metrics` text that starts with `name` (labels
/// included, e.g. `portier_spooled_bytes_total{direction="response"}`); 0 if none.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Runs `portier` with arguments to completion (for `check` and `--version`).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(portier_bin())
        .args(args)
        .output()
        .expect("portier runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `/status` document.
pub async fn status(admin: SocketAddr) -> serde_json::Value {
    get(admin, "admin", "/status").await.expect("status").json()
}

/// The `/status` entry of one backend.
pub fn backend_status<'a>(
    status: &'a serde_json::Value,
    pool: &str,
    addr: &SocketAddr,
) -> Option<&'a serde_json::Value> {
    status["pools"][pool]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr.to_string())
}

/// The routing suites' portier and workers (see [`routing_setup`]).
pub struct RoutingSetup {
    pub p: Portier,
    pub http: Vec<SimWorker>,
    pub gevent: Vec<SimWorker>,
}

/// Two http workers, two gevent workers, tenants `acme` (exact hosts) and `saas`
/// (`{tenant}.erp.test` template), plus `extra` appended to the config.
pub async fn routing_setup(extra: &str) -> RoutingSetup {
    let http = vec![sim("h1").await, sim("h2").await];
    let gevent = vec![sim("g1").await, sim("g2").await];
    let ports = Ports::new();
    let cfg = format!(
        r#"{listen}
[pools.main]
http = {h}
longpolling = {g}

[tenants.acme]
hosts = ["acme.test", "erp.acme.test"]
pool = "main"
database = "acme_db"

[tenants.saas]
hosts = ["{{tenant}}.erp.test"]
pool = "main"
database = "{{tenant}}"
{extra}
"#,
        listen = ports.listen(),
        h = toml_list(&[http[0].addr(), http[1].addr()]),
        g = toml_list(&[gevent[0].addr(), gevent[1].addr()]),
    );
    let p = Portier::start(&ports, &cfg).await;
    RoutingSetup { p, http, gevent }
}

/// Requests the workers answered.
pub fn hits(ws: &[SimWorker]) -> u64 {
    ws.iter().map(|w| w.hits()).sum()
}
