//! The noisy-neighbour scenario: tenant A floods `/jsonrpc` at 10x its limit while
//! tenant B sends steady interactive requests to the same pool of simulated Odoo
//! workers (each working on a bounded number of requests at once, like a prefork
//! pool). B's latency and errors are measured with A idle, with A flooding and no
//! limits, and with A flooding under its limits.

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
    /// A's integration limit (requests per second); A floods at 10x it.
    pub a_limit: u32,
    pub a_concurrency: u32,
    /// Workers, and requests each works on at once.
    pub workers: usize,
    pub capacity: usize,
    pub proxy_cpus: Option<String>,
}

pub struct Phase {
    pub name: &'static str,
    pub b: Stats,
    pub a: Option<Stats>,
    /// portier's CPU seconds during the phase and its peak RSS.
    pub cpu_seconds: f64,
    pub peak_rss_kib: u64,
}

fn config(
    port: u16,
    admin: u16,
    workers: &[std::net::SocketAddr],
    limits: Option<(u32, u32)>,
) -> String {
    let list: Vec<String> = workers.iter().map(|a| format!("\"{a}\"")).collect();
    let limit = match limits {
        Some((rate, conc)) => format!(
            "integration = {{ rate = \"{rate}/s\", burst = {rate}, concurrency = {conc} }}\n"
        ),
        None => String::new(),
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
[tenants.a]
hosts = ["a.test"]
pool = "odoo"
{limit}
[tenants.b]
hosts = ["b.test"]
pool = "odoo"
"#,
        list = list.join(", ")
    )
}

pub async fn run(opts: &Opts) -> std::io::Result<Vec<Phase>> {
    let dir = proc::workdir()?;
    let workers = proc::workers(opts.workers, Some(opts.capacity)).await?;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr()).collect();
    let b_req = Arc::new(Req::get(
        "b.test",
        "/web/dataset/call_kw/res.partner/read?sleep_ms=5&size=2048",
    ));
    let body = Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","method":"call","params":{{"service":"object","method":"execute_kw","args":["a",2,"x","product.product","create",[{{"name":"{}"}}]]}},"id":1}}"#,
        "x".repeat(600)
    ));
    let a_req = Arc::new(Req::post("a.test", "/jsonrpc?sleep_ms=50", body));
    let a_rate = f64::from(opts.a_limit) * 10.0;
    let duration = Duration::from_secs(opts.seconds);

    let mut phases = Vec::new();
    for (name, flood, limits) in [
        ("A idle", false, true),
        ("A flooding, limits off", true, false),
        ("A flooding, limits on", true, true),
    ] {
        let phase_dir = dir.path().join(format!("phase{}", phases.len()));
        std::fs::create_dir_all(&phase_dir)?;
        let limit = limits.then_some((opts.a_limit, opts.a_concurrency));
        let started = proc::start_portier(
            &opts.portier,
            &phase_dir,
            opts.proxy_cpus.as_deref(),
            Duration::from_secs(15),
            |port, admin| config(port, admin, &addrs, limit),
        )
        .await?;
        let (proxy, addr) = (started.proxy, started.http);
        // Warm-up: connections and caches.
        load::open(addr, b_req.clone(), opts.b_rate, 64, Duration::from_secs(1)).await;
        eprintln!("noisy-neighbour: {name} ({}s)", opts.seconds);
        let cpu0 = proxy.cpu_seconds();
        let b = tokio::spawn(load::open(addr, b_req.clone(), opts.b_rate, 256, duration));
        let a =
            flood.then(|| tokio::spawn(load::open(addr, a_req.clone(), a_rate, 1024, duration)));
        let b = b.await.map_err(std::io::Error::other)?;
        let a = match a {
            Some(t) => Some(t.await.map_err(std::io::Error::other)?),
            None => None,
        };
        let cpu_seconds = proxy.cpu_seconds() - cpu0;
        let peak_rss_kib = proxy.peak_rss_kib();
        proxy.stop();
        // Let the workers' queues drain before the next phase.
        tokio::time::sleep(Duration::from_secs(2)).await;
        phases.push(Phase {
            name,
            b,
            a,
            cpu_seconds,
            peak_rss_kib,
        });
    }
    Ok(phases)
}

pub fn table(phases: &[Phase]) -> String {
    let mut out = String::from(
        "| phase | B req/s | B p50 ms | B p99 ms | B p99 / idle | B errors | A sent | A 200 | A 429 | portier CPU s | portier peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let idle_p99 = phases.first().map(|p| p.b.ms(0.99)).unwrap_or(1.0);
    for p in phases {
        let (sent, ok, limited) = match &p.a {
            Some(a) => (
                (a.answered() + a.errors).to_string(),
                a.count(200).to_string(),
                a.count(429).to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {:.2} | {:.1} |\n",
            p.name,
            p.b.rps(),
            p.b.ms(0.5),
            p.b.ms(0.99),
            p.b.ms(0.99) / idle_p99.max(1e-9),
            p.b.failures(),
            sent,
            ok,
            limited,
            p.cpu_seconds,
            p.peak_rss_kib as f64 / 1024.0
        ));
    }
    out
}

pub fn json(phases: &[Phase], opts: &Opts) -> serde_json::Value {
    serde_json::json!({
        "scenario": "noisy-neighbour",
        "seconds": opts.seconds,
        "b_rate": opts.b_rate,
        "a_limit_per_s": opts.a_limit,
        "a_concurrency": opts.a_concurrency,
        "a_rate": opts.a_limit * 10,
        "workers": opts.workers,
        "capacity_per_worker": opts.capacity,
        "phases": phases.iter().map(|p| serde_json::json!({
            "name": p.name,
            "b": p.b.json(),
            "a": p.a.as_ref().map(|a| a.json()),
            "portier_cpu_seconds": p.cpu_seconds,
            "portier_peak_rss_kib": p.peak_rss_kib,
        })).collect::<Vec<_>>(),
    })
}
