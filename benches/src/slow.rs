//! Slow clients (issue "Protect Odoo workers"): clients download 5 MiB reports at
//! 256 KiB/s each while interactive traffic runs, through a pool of two pods of 4 Odoo
//! workers (`workers = 4`). A prefork worker writes its response itself, so a slow
//! reader holds it (the simulated workers do too); portier reads the response ahead of
//! the client (memory, then a spool file) and frees the worker. Measured with response
//! buffering on (the defaults) and off: worker-seconds per download, downloads done,
//! and the interactive latency.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{self, Req, Stats};
use crate::peers;
use crate::proc;

pub struct Opts {
    pub portier: std::path::PathBuf,
    pub clients: usize,
    pub size: usize,
    /// Each client's reading speed, bytes per second.
    pub rate: usize,
    /// The longest a phase may last.
    pub seconds: u64,
    pub b_rate: f64,
    pub proxy_cpus: Option<String>,
    /// The shared peers harness: nginx runs beside portier when it is installed.
    pub peers: Option<std::path::PathBuf>,
}

pub struct Phase {
    pub name: &'static str,
    pub downloads: usize,
    pub complete: usize,
    pub worker_seconds: f64,
    pub elapsed: f64,
    pub b: Stats,
}

fn config(port: u16, admin: u16, pods: &[SocketAddr], buffering: bool, spool: &str) -> String {
    let list: Vec<String> = pods.iter().map(|a| format!("\"{a}\"")).collect();
    let off = if buffering {
        String::new()
    } else {
        "buffer_response = \"0B\"\nmax_response_spool = \"0B\"\n".to_string()
    };
    format!(
        r#"[listen]
http = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
threads = 1
spool_dir = "{spool}"
[log]
access = false
[defaults]
request_timeout = "600s"
{off}
[pools.odoo]
http = [{list}]
retries = 0
workers = 4
[tenants.a]
hosts = ["a.test"]
pool = "odoo"
[tenants.b]
hosts = ["b.test"]
pool = "odoo"
"#,
        list = list.join(", ")
    )
}

pub async fn run(opts: &Opts) -> std::io::Result<Vec<Phase>> {
    let dir = proc::workdir()?;
    let pods = proc::workers(2, Some(4)).await?;
    let addrs: Vec<_> = pods.iter().map(|w| w.addr()).collect();
    let b_req = Arc::new(Req::get(
        "b.test",
        "/web/dataset/call_kw/res.partner/read?sleep_ms=5&size=2048",
    ));
    let mut phases = Vec::new();
    for (name, buffering) in [("buffering on", true), ("buffering off", false)] {
        let phase_dir = dir.path().join(format!("phase{}", phases.len()));
        let spool = phase_dir.join("spool");
        std::fs::create_dir_all(&spool)?;
        let spool_str = spool.display().to_string();
        let started = proc::start_portier(
            &opts.portier,
            &phase_dir,
            opts.proxy_cpus.as_deref(),
            Duration::from_secs(15),
            |port, admin| config(port, admin, &addrs, buffering, &spool_str),
        )
        .await?;
        let (proxy, addr) = (started.proxy, started.http);
        eprintln!(
            "slow-clients: {name}: {} downloads of {} bytes at {} B/s",
            opts.clients, opts.size, opts.rate
        );
        let phase = measure(name, addr, &pods, opts, &b_req).await;
        proxy.stop();
        tokio::time::sleep(Duration::from_secs(2)).await;
        phases.push(phase);
    }
    // nginx beside it, through the shared harness's target (its defaults:
    // proxy_buffering on, responses beyond its buffers in temp files up to 1 GiB).
    if let Some(peers_dir) = opts.peers.as_deref() {
        if proc::which("nginx") {
            let env = peers::Env::new(peers_dir, &opts.portier)?;
            let g = peers::start_target_with(&env, "nginx", None, Some(&addrs)).await?;
            eprintln!("slow-clients: nginx (proxy_buffering on)");
            let addr: SocketAddr = ([127, 0, 0, 1], peers::LISTEN_PORT).into();
            let phase = measure("nginx (proxy_buffering on)", addr, &pods, opts, &b_req).await;
            g.stop();
            phases.push(phase);
        } else {
            eprintln!(
                "slow-clients: nginx is not installed ({}/install.sh): not run",
                peers_dir.display()
            );
        }
    }
    Ok(phases)
}

/// The downloads and the clicks through the proxy at `addr`.
async fn measure(
    name: &'static str,
    addr: SocketAddr,
    pods: &[portier_sim::SimWorker],
    opts: &Opts,
    b_req: &Arc<Req>,
) -> Phase {
    let busy0: f64 = pods.iter().map(|w| w.busy_seconds()).sum();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(opts.seconds);
    let tasks: Vec<_> = (0..opts.clients)
        .map(|_| {
            let path = format!("/web/content/report?size={}", opts.size);
            let (size, rate) = (opts.size as u64, opts.rate);
            tokio::spawn(async move {
                load::slow_get(addr, "a.test", &path, size, rate, deadline)
                    .await
                    .0
            })
        })
        .collect();
    // Interactive load while the downloads run (as long as the slowest may take).
    let window = Duration::from_secs_f64(
        (opts.size as f64 / opts.rate as f64 + 2.0).min(opts.seconds as f64),
    );
    let b = load::open(addr, b_req.clone(), opts.b_rate, 64, window).await;
    let mut complete = 0;
    for t in tasks {
        if t.await.unwrap_or(false) {
            complete += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let busy1: f64 = pods.iter().map(|w| w.busy_seconds()).sum();
    Phase {
        name,
        downloads: opts.clients,
        complete,
        worker_seconds: busy1 - busy0,
        elapsed,
        b,
    }
}

pub fn table(phases: &[Phase]) -> String {
    let mut out = String::from(
        "| phase | downloads | complete | phase s | worker-s | worker-s per complete download | B req/s | B p50 ms | B p99 ms | B errors |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in phases {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.3} | {:.1} | {:.2} | {:.2} | {} |\n",
            p.name,
            p.downloads,
            p.complete,
            p.elapsed,
            p.worker_seconds,
            p.worker_seconds / p.complete.max(1) as f64,
            p.b.rps(),
            p.b.ms(0.5),
            p.b.ms(0.99),
            p.b.failures(),
        ));
    }
    out
}

pub fn json(phases: &[Phase], opts: &Opts) -> serde_json::Value {
    serde_json::json!({
        "scenario": "slow-clients",
        "clients": opts.clients,
        "size": opts.size,
        "rate": opts.rate,
        "b_rate": opts.b_rate,
        "phases": phases.iter().map(|p| serde_json::json!({
            "name": p.name,
            "downloads": p.downloads,
            "complete": p.complete,
            "seconds": p.elapsed,
            "worker_seconds": p.worker_seconds,
            "b": p.b.json(),
        })).collect::<Vec<_>>(),
    })
}
