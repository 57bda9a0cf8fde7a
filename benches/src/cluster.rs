//! Cluster mode (issue "Cluster mode"): what sharing limits through Redis costs, and
//! how closely two replicas hold a flooding tenant to its configured rate.
//!
//! Cost: interactive requests of a tenant with an interactive limit well above the
//! load (so every request goes through the limiter and none is refused), closed loop,
//! `[cluster]` off and on: requests/s, p50, p99, portier's CPU, and Redis calls per
//! thousand requests (`INFO commandstats`).
//!
//! Accuracy: a tenant flooding `/jsonrpc` through two replicas (closed loop on each)
//! with an integration limit of `limit`/s: the admitted rate against the configured
//! one, without `[cluster]` (each replica admits the whole rate), with it, and with it
//! after Redis is stopped (each replica at rate ÷ 2).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::load::{self, Req, Stats};
use crate::proc;

pub struct Opts {
    pub portier: std::path::PathBuf,
    pub seconds: u64,
    /// The flooding tenant's integration limit, requests per second.
    pub limit: u32,
    pub proxy_cpus: Option<String>,
}

/// Rounds of the cost phases (off, on, off, on, ...).
const ROUNDS: usize = 3;

pub struct CostPhase {
    pub name: &'static str,
    pub stats: Stats,
    pub cpu_seconds: f64,
    /// Redis script calls per 1000 requests (with `[cluster]`).
    pub redis_calls_per_1000: Option<f64>,
}

pub struct FloodPhase {
    pub name: &'static str,
    pub admitted: u64,
    pub refused: u64,
    pub failed: u64,
    /// What the limit allows in the phase's time: burst + rate × seconds.
    pub allowed: f64,
}

pub struct Report {
    pub cost: Vec<CostPhase>,
    pub flood: Vec<FloodPhase>,
}

/// A `redis-server` on a free loopback port, stopped by PID.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    async fn start(dir: &Path) -> std::io::Result<Redis> {
        let port = proc::free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::other(format!("redis-server: {e} (scripts/setup.sh installs it)"))
            })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(Redis { port, child });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(std::io::Error::other("redis-server did not listen"))
    }

    /// Script calls (`EVALSHA` + `EVAL`) so far.
    fn script_calls(&self) -> u64 {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "info", "commandstats"])
            .output();
        let Ok(out) = out else { return 0 };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split([':', ','])
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `cluster`: Redis' port and the key prefix (one per phase, so no phase sees the
/// state or the replicas of another).
fn config(
    port: u16,
    admin: u16,
    worker: SocketAddr,
    cluster: Option<(u16, &str)>,
    limit: u32,
) -> String {
    let cluster = cluster
        .map(|(p, prefix)| {
            format!("[cluster]\nredis = \"redis://127.0.0.1:{p}/0\"\nkey_prefix = \"{prefix}:\"\n")
        })
        .unwrap_or_default();
    format!(
        r#"[listen]
http = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
threads = 1
[log]
access = false
{cluster}
[pools.odoo]
http = ["{worker}"]
retries = 0
[tenants.acme]
hosts = ["acme.test"]
pool = "odoo"
interactive = {{ rate = "100000/s", burst = 10000 }}
[tenants.flood]
hosts = ["flood.test"]
pool = "odoo"
integration = {{ rate = "{limit}/s", burst = {burst} }}
"#,
        burst = (limit / 5).max(1)
    )
}

async fn start(
    opts: &Opts,
    dir: &Path,
    name: &str,
    worker: SocketAddr,
    redis: Option<u16>,
) -> std::io::Result<proc::Started> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    let phase = name.trim_end_matches(['a', 'b']);
    proc::start_portier(
        &opts.portier,
        &d,
        opts.proxy_cpus.as_deref(),
        Duration::from_secs(15),
        |port, admin| config(port, admin, worker, redis.map(|p| (p, phase)), opts.limit),
    )
    .await
}

/// Waits until the replica's `/status` says `cluster.redis` is `want` with `replicas`.
async fn wait_cluster(admin: u16, want: &str, replicas: u64) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    for _ in 0..200 {
        if let Ok(r) =
            portier_sim::client::request(addr, "GET", "admin", "/status", &[], Bytes::new()).await
        {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(r.body()) {
                if v["cluster"]["redis"] == want && v["cluster"]["replicas"] == replicas {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub async fn run(opts: &Opts) -> std::io::Result<Report> {
    let dir = proc::workdir()?;
    let workers = proc::workers(1, None).await?;
    let worker = workers[0].addr();
    let duration = Duration::from_secs(opts.seconds);
    let mut redis = Redis::start(dir.path()).await?;

    let interactive = Arc::new(Req::get(
        "acme.test",
        "/web/dataset/call_kw/res.partner/read?size=2048",
    ));
    let mut cost = Vec::new();
    // Off and on alternate, `ROUNDS` times each: this machine's throughput drifts by
    // ±10 % between runs, more than what is measured.
    let configs = [("[cluster] off", None), ("[cluster] on", Some(redis.port))];
    for (name, cluster) in (0..ROUNDS).flat_map(|_| configs) {
        let started = start(
            opts,
            dir.path(),
            &format!("cost{}", cost.len()),
            worker,
            cluster,
        )
        .await?;
        if cluster.is_some() && !wait_cluster(started.admin, "up", 1).await {
            return Err(std::io::Error::other("portier did not reach Redis"));
        }
        load::closed(
            started.http,
            interactive.clone(),
            64,
            Duration::from_secs(1),
            None,
        )
        .await;
        eprintln!("cluster: cost, {name} ({}s)", opts.seconds);
        let calls0 = redis.script_calls();
        let cpu0 = started.proxy.cpu_seconds();
        let stats = load::closed(started.http, interactive.clone(), 64, duration, None).await;
        let cpu_seconds = started.proxy.cpu_seconds() - cpu0;
        let calls = redis.script_calls() - calls0;
        started.proxy.stop();
        cost.push(CostPhase {
            name,
            redis_calls_per_1000: cluster
                .map(|_| calls as f64 * 1000.0 / stats.answered().max(1) as f64),
            stats,
            cpu_seconds,
        });
    }

    let body = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"call","params":{},"id":1}"#);
    let rpc = Arc::new(Req::post("flood.test", "/jsonrpc", body));
    let mut flood = Vec::new();
    for (name, cluster, stop_redis) in [
        ("two replicas, no [cluster]", false, false),
        ("two replicas, [cluster], Redis up", true, false),
        ("two replicas, [cluster], Redis stopped", true, true),
    ] {
        let port = cluster.then_some(redis.port);
        let a = start(
            opts,
            dir.path(),
            &format!("flood{}a", flood.len()),
            worker,
            port,
        )
        .await?;
        let b = start(
            opts,
            dir.path(),
            &format!("flood{}b", flood.len()),
            worker,
            port,
        )
        .await?;
        if cluster
            && !(wait_cluster(a.admin, "up", 2).await && wait_cluster(b.admin, "up", 2).await)
        {
            return Err(std::io::Error::other("replicas did not see each other"));
        }
        if stop_redis {
            redis.stop();
            let down =
                wait_cluster(a.admin, "down", 2).await && wait_cluster(b.admin, "down", 2).await;
            if !down {
                return Err(std::io::Error::other(
                    "replicas did not notice Redis stopped",
                ));
            }
        }
        eprintln!("cluster: flood, {name} ({}s)", opts.seconds);
        let (sa, sb) = tokio::join!(
            load::closed(a.http, rpc.clone(), 16, duration, None),
            load::closed(b.http, rpc.clone(), 16, duration, None)
        );
        let elapsed = sa.elapsed.max(sb.elapsed).as_secs_f64();
        a.proxy.stop();
        b.proxy.stop();
        let burst = f64::from((opts.limit / 5).max(1));
        flood.push(FloodPhase {
            name,
            admitted: sa.count(200) + sb.count(200),
            refused: sa.count(429) + sb.count(429),
            failed: sa.failures() + sb.failures(),
            allowed: burst + f64::from(opts.limit) * elapsed,
        });
    }
    Ok(Report { cost, flood })
}

pub fn table(r: &Report) -> String {
    let mut out = String::from(
        "| interactive, limit not reached | req/s | p50 ms | p99 ms | req/s vs off | p99 vs off | portier CPU s | Redis calls / 1000 req | errors |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let (rps0, p990) = r
        .cost
        .first()
        .map(|p| (p.stats.rps(), p.stats.ms(0.99)))
        .unwrap_or((1.0, 1.0));
    for p in &r.cost {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.3} | {:.3} | {:.2} | {} | {} |\n",
            p.name,
            p.stats.rps(),
            p.stats.ms(0.5),
            p.stats.ms(0.99),
            p.stats.rps() / rps0.max(1e-9),
            p.stats.ms(0.99) / p990.max(1e-9),
            p.cpu_seconds,
            p.redis_calls_per_1000
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
            p.stats.failures(),
        ));
    }
    let median = |name: &str, f: &dyn Fn(&CostPhase) -> f64| {
        let mut v: Vec<f64> = r.cost.iter().filter(|p| p.name == name).map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let rps = |p: &CostPhase| p.stats.rps();
    let p99 = |p: &CostPhase| p.stats.ms(0.99);
    let cpu_us = |p: &CostPhase| p.cpu_seconds * 1e6 / p.stats.answered().max(1) as f64;
    out.push_str(&format!(
        "\nMedians of {ROUNDS} rounds, on / off: req/s {:.3}x, p99 {:.3}x, portier CPU per request {:.1} µs / {:.1} µs ({:.3}x).\n",
        median("[cluster] on", &rps) / median("[cluster] off", &rps).max(1e-9),
        median("[cluster] on", &p99) / median("[cluster] off", &p99).max(1e-9),
        median("[cluster] on", &cpu_us),
        median("[cluster] off", &cpu_us),
        median("[cluster] on", &cpu_us) / median("[cluster] off", &cpu_us).max(1e-9),
    ));
    out.push_str(
        "\n| flooding tenant | admitted | allowed by the limit | admitted / allowed | refused (429) | failed |\n|---|---|---|---|---|---|\n",
    );
    for p in &r.flood {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.3} | {} | {} |\n",
            p.name,
            p.admitted,
            p.allowed,
            p.admitted as f64 / p.allowed.max(1e-9),
            p.refused,
            p.failed
        ));
    }
    out
}

pub fn json(r: &Report, opts: &Opts) -> serde_json::Value {
    serde_json::json!({
        "scenario": "cluster",
        "seconds": opts.seconds,
        "flood_limit_per_s": opts.limit,
        "cost": r.cost.iter().map(|p| serde_json::json!({
            "name": p.name,
            "stats": p.stats.json(),
            "portier_cpu_seconds": p.cpu_seconds,
            "redis_calls_per_1000_requests": p.redis_calls_per_1000,
        })).collect::<Vec<_>>(),
        "flood": r.flood.iter().map(|p| serde_json::json!({
            "name": p.name,
            "admitted": p.admitted,
            "allowed": p.allowed,
            "ratio": p.admitted as f64 / p.allowed.max(1e-9),
            "refused": p.refused,
            "failed": p.failed,
        })).collect::<Vec<_>>(),
    })
}
