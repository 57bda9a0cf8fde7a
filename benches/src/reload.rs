//! The reload scenario: a configuration with 10 000 tenants, a steady open-loop load
//! spread over them, and 20 reloads by SIGHUP. Measures the time from each SIGHUP to
//! the new configuration serving (a tenant added by that reload answering 200), the
//! latency of the requests in flight with and without reloads, the errors (must be
//! zero) and portier's memory at rest with 10 000 tenants.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::load::{self, Req, Stats};
use crate::proc;

pub struct Opts {
    pub portier: std::path::PathBuf,
    pub tenants: usize,
    pub reloads: usize,
    pub rate: f64,
    pub proxy_cpus: Option<String>,
}

pub struct Report {
    pub tenants: usize,
    pub rss_at_rest_kib: u64,
    pub baseline: Stats,
    pub during: Stats,
    /// Milliseconds from SIGHUP to the new tenant answering, per reload.
    pub reload_ms: Vec<f64>,
}

fn config(port: u16, admin: u16, workers: &[SocketAddr], tenants: usize, extra: usize) -> String {
    let list: Vec<String> = workers.iter().map(|a| format!("\"{a}\"")).collect();
    let pool = format!("http = [{}]", list.join(", "));
    crate::scale::config(port, admin, &pool, tenants, extra)
}

async fn answers(addr: SocketAddr, host: &str) -> bool {
    portier_sim::client::request(addr, "GET", host, "/web/dataset/call_kw", &[], Bytes::new())
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

pub async fn run(opts: &Opts) -> std::io::Result<Report> {
    let dir = proc::workdir()?;
    let workers = proc::workers(2, None).await?;
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr()).collect();
    let tenants = opts.tenants;
    let started = proc::start_portier(
        &opts.portier,
        dir.path(),
        opts.proxy_cpus.as_deref(),
        Duration::from_secs(30),
        |port, admin| config(port, admin, &addrs, tenants, 0),
    )
    .await?;
    let (proxy, addr, cfg_path) = (started.proxy, started.http, started.config);
    let (port, admin) = (addr.port(), started.admin);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_at_rest_kib = proc::status_kib(proxy.pid(), "VmRSS");

    let mut req = Req::get("t0.test", "/web/dataset/call_kw?size=1024");
    req.hosts = (0..opts.tenants.min(1000))
        .map(|i| format!("t{}.test", i * (opts.tenants / opts.tenants.min(1000))))
        .collect();
    let req = Arc::new(req);
    let phase = Duration::from_secs(5);
    load::open(addr, req.clone(), opts.rate, 64, Duration::from_secs(1)).await;
    eprintln!(
        "reload: baseline ({}s at {} req/s)",
        phase.as_secs(),
        opts.rate
    );
    let baseline = load::open(addr, req.clone(), opts.rate, 256, phase).await;

    eprintln!("reload: {} reloads under load", opts.reloads);
    let during_len = Duration::from_millis(300) * opts.reloads as u32 + Duration::from_secs(2);
    let during = tokio::spawn(load::open(addr, req.clone(), opts.rate, 256, during_len));
    let mut reload_ms = Vec::new();
    for j in 0..opts.reloads {
        std::fs::write(&cfg_path, config(port, admin, &addrs, opts.tenants, j + 1))?;
        let host = format!("new{j}.test");
        let t0 = Instant::now();
        let _ = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(proxy.pid().to_string())
            .status();
        let mut served = false;
        while t0.elapsed() < Duration::from_secs(10) {
            if answers(addr, &host).await {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if !served {
            return Err(std::io::Error::other(format!(
                "reload {j} did not apply within 10 s"
            )));
        }
        reload_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = during.await.map_err(std::io::Error::other)?;
    proxy.stop();
    Ok(Report {
        tenants: opts.tenants,
        rss_at_rest_kib,
        baseline,
        during,
        reload_ms,
    })
}

/// The `q` quantile of `v` (nearest rank); 0 when empty.
pub(crate) fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return 0.0;
    }
    s[((s.len() - 1) as f64 * q).round() as usize]
}

pub fn table(r: &Report) -> String {
    format!(
        "| tenants | RSS at rest MiB | SIGHUP -> serving p50 ms | max ms | requests p50 / p99 ms, no reloads | p50 / p99 ms during {} reloads | errors during reloads |\n|---|---|---|---|---|---|---|\n| {} | {:.1} | {:.1} | {:.1} | {:.2} / {:.2} | {:.2} / {:.2} | {} of {} |\n",
        r.reload_ms.len(),
        r.tenants,
        r.rss_at_rest_kib as f64 / 1024.0,
        quantile(&r.reload_ms, 0.5),
        quantile(&r.reload_ms, 1.0),
        r.baseline.ms(0.5),
        r.baseline.ms(0.99),
        r.during.ms(0.5),
        r.during.ms(0.99),
        r.during.failures(),
        r.during.answered() + r.during.errors,
    )
}

pub fn json(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "scenario": "reload",
        "tenants": r.tenants,
        "rss_at_rest_kib": r.rss_at_rest_kib,
        "reload_ms": r.reload_ms,
        "reload_ms_p50": quantile(&r.reload_ms, 0.5),
        "reload_ms_max": quantile(&r.reload_ms, 1.0),
        "baseline": r.baseline.json(),
        "during_reloads": r.during.json(),
    })
}
