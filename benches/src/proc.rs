//! Running the proxy under test: spawn pinned to a CPU, wait until ready, read its
//! CPU time and memory from /proc, stop it by PID.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A proxy process started by the bench.
pub struct Proxy {
    child: Child,
}

impl Proxy {
    /// Starts `portier run -c config`, pinned to `cpus` (a taskset list) when given.
    pub fn portier(
        bin: &Path,
        config: &Path,
        cpus: Option<&str>,
        log: &Path,
    ) -> std::io::Result<Proxy> {
        let mut cmd = match cpus {
            Some(c) if which("taskset") => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(c).arg(bin);
                cmd
            }
            _ => Command::new(bin),
        };
        cmd.arg("run").arg("-c").arg(config);
        let log = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Proxy { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) the process has used.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM")
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A portier started by a scenario.
pub struct Started {
    pub proxy: Proxy,
    pub http: SocketAddr,
    pub admin: u16,
    pub config: PathBuf,
}

/// Writes the config `make(http_port, admin_port)` into `dir`, starts portier on it
/// and waits (up to `ready`) for `/readyz`.
pub async fn start_portier(
    bin: &Path,
    dir: &Path,
    cpus: Option<&str>,
    ready: Duration,
    make: impl FnOnce(u16, u16) -> String,
) -> std::io::Result<Started> {
    let (port, admin) = (free_port(), free_port());
    let cfg = dir.join("portier.toml");
    std::fs::write(&cfg, make(port, admin))?;
    let proxy = Proxy::portier(bin, &cfg, cpus, &dir.join("portier.log"))?;
    if !wait_ok(([127, 0, 0, 1], admin).into(), "/readyz", ready).await {
        return Err(std::io::Error::other(format!(
            "portier did not start; see {}",
            dir.join("portier.log").display()
        )));
    }
    Ok(Started {
        proxy,
        http: ([127, 0, 0, 1], port).into(),
        admin,
        config: cfg,
    })
}

/// `n` simulated Odoo workers on loopback (`odoo0`, `odoo1`, ...), not recording
/// requests, each working on at most `capacity` requests at once when given.
pub async fn workers(
    n: usize,
    capacity: Option<usize>,
) -> std::io::Result<Vec<portier_sim::SimWorker>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let w =
            portier_sim::SimWorker::start(&format!("odoo{i}"), ([127, 0, 0, 1], 0).into()).await?;
        w.set_recording(false);
        w.set_capacity(capacity);
        out.push(w);
    }
    Ok(out)
}

pub fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Waits until `url`'s host:port answers `GET path` with 200.
pub async fn wait_ok(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(r) =
            portier_sim::client::request(addr, "GET", "bench", path, &[], bytes::Bytes::new()).await
        {
            if r.status() == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat (11 and 12 after the name).
    (ticks(11) + ticks(12)) / 100.0
}

pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A scratch directory for one bench run.
pub fn workdir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("portier-bench.").tempdir()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

pub fn default_portier() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/portier");
    std::env::var_os("PORTIER_BIN")
        .map(PathBuf::from)
        .unwrap_or(here)
}
