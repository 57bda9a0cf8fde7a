//! The noisy-neighbour scenario extended to saturation (issue "Protect Odoo workers"):
//! two pods of 4 Odoo workers each (simulated workers that work on 4 requests at once
//! and keep the rest waiting, like a prefork pool's listen backlog); tenant A runs an
//! import — integration calls of 200 ms, 16 at a time, within its rate limit but enough
//! to take every worker — while tenant B browses (interactive, 20 req/s). B's latency
//! with A idle, with A importing and no worker slots, with `workers = 4`, and with one
//! slot of the pool reserved for clicks (`queue.reserve = 1`); and A's import throughput
//! against what the workers can do (8 workers / 200 ms = 40 calls/s).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::load::{self, Req, Stats};
use crate::proc;

pub struct Opts {
    pub portier: std::path::PathBuf,
    pub seconds: u64,
    /// B's interactive requests per second.
    pub b_rate: f64,
    /// A's import: calls in flight at once, and each call's time at the worker.
    pub a_parallel: usize,
    pub a_call_ms: u64,
    /// How much each call's time varies (uniformly, ±).
    pub a_jitter_ms: u64,
    pub pods: usize,
    pub workers_per_pod: usize,
    pub proxy_cpus: Option<String>,
}

pub struct Phase {
    pub name: &'static str,
    pub b: Stats,
    pub a: Option<Stats>,
}

fn config(
    port: u16,
    admin: u16,
    pods: &[std::net::SocketAddr],
    workers: usize,
    reserve: usize,
) -> String {
    let list: Vec<String> = pods.iter().map(|a| format!("\"{a}\"")).collect();
    let slots = match (workers, reserve) {
        (0, _) => String::new(),
        (w, 0) => format!("workers = {w}\n"),
        (w, r) => format!("workers = {w}\nqueue = {{ reserve = {r} }}\n"),
    };
    format!(
        r#"[listen]
http = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
threads = 1
[log]
access = false
[pools.odoo]
http = [{list}]
retries = 0
{slots}
[tenants.a]
hosts = ["a.test"]
pool = "odoo"
integration = {{ rate = "1000/s", burst = 1000, concurrency = 64 }}
[tenants.b]
hosts = ["b.test"]
pool = "odoo"
"#,
        list = list.join(", ")
    )
}

pub async fn run(opts: &Opts) -> std::io::Result<Vec<Phase>> {
    let dir = proc::workdir()?;
    let pods = proc::workers(opts.pods, Some(opts.workers_per_pod)).await?;
    let addrs: Vec<_> = pods.iter().map(|w| w.addr()).collect();
    let b_req = Arc::new(Req::get(
        "b.test",
        "/web/dataset/call_kw/res.partner/read?sleep_ms=5&size=2048",
    ));
    let a_req = Arc::new(Req::post(
        "a.test",
        &format!(
            "/jsonrpc?sleep_ms={}&jitter_ms={}",
            opts.a_call_ms, opts.a_jitter_ms
        ),
        Bytes::from_static(br#"{"jsonrpc":"2.0","method":"call","params":{},"id":1}"#),
    ));
    let duration = Duration::from_secs(opts.seconds);
    let mut phases = Vec::new();
    for (name, import, workers, reserve) in [
        ("A idle", false, opts.workers_per_pod, 0),
        ("A importing, workers off", true, 0, 0),
        ("A importing, workers = 4", true, opts.workers_per_pod, 0),
        (
            "A importing, workers = 4, reserve = 1",
            true,
            opts.workers_per_pod,
            1,
        ),
    ] {
        let phase_dir = dir.path().join(format!("phase{}", phases.len()));
        std::fs::create_dir_all(&phase_dir)?;
        let started = proc::start_portier(
            &opts.portier,
            &phase_dir,
            opts.proxy_cpus.as_deref(),
            Duration::from_secs(15),
            |port, admin| config(port, admin, &addrs, workers, reserve),
        )
        .await?;
        let (proxy, addr) = (started.proxy, started.http);
        load::open(addr, b_req.clone(), opts.b_rate, 64, Duration::from_secs(1)).await;
        eprintln!("saturation: {name} ({}s)", opts.seconds);
        let b = tokio::spawn(load::open(addr, b_req.clone(), opts.b_rate, 64, duration));
        let a = import.then(|| {
            tokio::spawn(load::closed(
                addr,
                a_req.clone(),
                opts.a_parallel,
                duration,
                None,
            ))
        });
        let b = b.await.map_err(std::io::Error::other)?;
        let a = match a {
            Some(t) => Some(t.await.map_err(std::io::Error::other)?),
            None => None,
        };
        proxy.stop();
        tokio::time::sleep(Duration::from_secs(2)).await;
        phases.push(Phase { name, b, a });
    }
    Ok(phases)
}

/// What the workers can do for A: every worker busy with A's calls.
fn capacity(opts: &Opts) -> f64 {
    (opts.pods * opts.workers_per_pod) as f64 * 1000.0 / opts.a_call_ms as f64
}

pub fn table(phases: &[Phase], opts: &Opts) -> String {
    let mut out = String::from(
        "| phase | B req/s | B p50 ms | B p99 ms | B p99 / idle | B errors | A calls/s | A / capacity | A errors |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let idle_p99 = phases.first().map(|p| p.b.ms(0.99)).unwrap_or(1.0);
    for p in phases {
        let (a_rps, a_share, a_err) = match &p.a {
            Some(a) => (
                format!("{:.1}", a.rps()),
                format!("{:.2}", a.rps() / capacity(opts)),
                a.failures().to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |\n",
            p.name,
            p.b.rps(),
            p.b.ms(0.5),
            p.b.ms(0.99),
            p.b.ms(0.99) / idle_p99.max(1e-9),
            p.b.failures(),
            a_rps,
            a_share,
            a_err,
        ));
    }
    out
}

pub fn json(phases: &[Phase], opts: &Opts) -> serde_json::Value {
    serde_json::json!({
        "scenario": "saturation",
        "seconds": opts.seconds,
        "b_rate": opts.b_rate,
        "a_parallel": opts.a_parallel,
        "a_call_ms": opts.a_call_ms,
        "a_jitter_ms": opts.a_jitter_ms,
        "pods": opts.pods,
        "workers_per_pod": opts.workers_per_pod,
        "a_capacity_per_s": capacity(opts),
        "phases": phases.iter().map(|p| serde_json::json!({
            "name": p.name,
            "b": p.b.json(),
            "a": p.a.as_ref().map(|a| a.json()),
        })).collect::<Vec<_>>(),
    })
}
