//! Login storm (issue "The Odoo edge"): on a Monday morning `browsers` browsers open
//! an Odoo page within `spread` seconds, each then loading the page's four asset
//! bundles (in parallel, as a browser does), through two pods of 4 workers
//! (`workers = 4`). A bundle costs its worker `asset_ms` (Odoo builds or streams it).
//! Measured with the asset cache on and off, and with compression off: the asset
//! requests that reached a worker, the page latency (interactive p50/p99), and the
//! bytes the browsers received.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::load::Stats;
use crate::proc;

pub struct Opts {
    pub portier: std::path::PathBuf,
    pub browsers: usize,
    /// Seconds over which the browsers arrive.
    pub spread: f64,
    /// Worker time per bundle, milliseconds.
    pub asset_ms: u64,
    pub proxy_cpus: Option<String>,
}

pub struct Phase {
    pub name: &'static str,
    pub pages: Stats,
    pub assets: Stats,
    pub asset_requests_at_workers: u64,
    pub bytes_received: u64,
    pub elapsed: f64,
}

/// The four bundles of an Odoo 17 backend page (sizes of a typical database, minified).
const BUNDLES: [(&str, usize); 4] = [
    ("/web/assets/1a2b3c4/web.assets_web.min.js", 2_400_000),
    ("/web/assets/5d6e7f8/web.assets_web.min.css", 600_000),
    ("/web/assets/9a8b7c6/web.assets_web_print.min.css", 80_000),
    ("/web/assets/5e4d3c2/web.assets_web_dark.min.css", 300_000),
];

fn config(port: u16, admin: u16, pods: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = pods.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"[listen]
http = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
threads = 1
[log]
access = false
[defaults]
request_timeout = "600s"
{extra}
[pools.odoo]
http = [{list}]
retries = 0
workers = 4
queue = {{ max = 10000, timeout = "600s" }}
[tenants.acme]
hosts = ["acme.test"]
pool = "odoo"
"#,
        list = list.join(", ")
    )
}

/// One GET on a new connection: status and body bytes as received (encoded).
async fn fetch(addr: SocketAddr, path: &str) -> Option<(u16, u64)> {
    let mut sender = portier_sim::client::connect(addr).await.ok()?;
    let req = http::Request::builder()
        .uri(path)
        .header("host", "acme.test")
        .header("accept-encoding", "gzip, deflate, br, zstd")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body.len() as u64))
}

async fn timed(addr: SocketAddr, path: String, stats: Arc<Mutex<Stats>>, bytes: Arc<AtomicU64>) {
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(120), fetch(addr, &path))
        .await
        .ok()
        .flatten();
    if let Some((_, n)) = r {
        bytes.fetch_add(n, Ordering::Relaxed);
    }
    if let Ok(mut s) = stats.lock() {
        s.record(t.elapsed(), r.map(|(s, _)| s));
    }
}

/// One browser: the page, then its four bundles at once.
async fn browser(
    addr: SocketAddr,
    asset_ms: u64,
    pages: Arc<Mutex<Stats>>,
    assets: Arc<Mutex<Stats>>,
    bytes: Arc<AtomicU64>,
) {
    timed(
        addr,
        "/web/action/menu?size=30000&sleep_ms=20".into(),
        pages,
        bytes.clone(),
    )
    .await;
    let tasks: Vec<_> = BUNDLES
        .iter()
        .map(|(path, size)| {
            tokio::spawn(timed(
                addr,
                format!("{path}?size={size}&sleep_ms={asset_ms}"),
                assets.clone(),
                bytes.clone(),
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

pub async fn run(opts: &Opts) -> std::io::Result<Vec<Phase>> {
    let dir = proc::workdir()?;
    let pods = proc::workers(2, Some(4)).await?;
    let addrs: Vec<_> = pods.iter().map(|w| w.addr()).collect();
    let mut phases = Vec::new();
    for (name, extra) in [
        ("cache on, compression on (defaults)", ""),
        ("cache off", "cache_assets = \"0\""),
        ("cache on, compression off", "compress = \"off\""),
    ] {
        let phase_dir = dir.path().join(format!("phase{}", phases.len()));
        std::fs::create_dir_all(&phase_dir)?;
        let started = proc::start_portier(
            &opts.portier,
            &phase_dir,
            opts.proxy_cpus.as_deref(),
            Duration::from_secs(15),
            |port, admin| config(port, admin, &addrs, extra),
        )
        .await?;
        let (proxy, addr) = (started.proxy, started.http);
        eprintln!(
            "login-storm: {name}: {} browsers over {} s",
            opts.browsers, opts.spread
        );
        let hits0: u64 = pods.iter().map(|w| w.hits()).sum();
        let pages = Arc::new(Mutex::new(Stats::default()));
        let assets = Arc::new(Mutex::new(Stats::default()));
        let bytes = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let gap = Duration::from_secs_f64(opts.spread / opts.browsers.max(1) as f64);
        let mut tasks = Vec::with_capacity(opts.browsers);
        for i in 0..opts.browsers {
            tokio::time::sleep_until((start + gap * i as u32).into()).await;
            tasks.push(tokio::spawn(browser(
                addr,
                opts.asset_ms,
                pages.clone(),
                assets.clone(),
                bytes.clone(),
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let hits1: u64 = pods.iter().map(|w| w.hits()).sum();
        proxy.stop();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let take = |s: Arc<Mutex<Stats>>| {
            Arc::try_unwrap(s)
                .ok()
                .and_then(|m| m.into_inner().ok())
                .unwrap_or_default()
        };
        let pages = take(pages);
        let assets = take(assets);
        // Every page request reaches a worker; the rest were bundles.
        let at_workers = (hits1 - hits0).saturating_sub(pages.answered());
        phases.push(Phase {
            name,
            pages,
            assets,
            asset_requests_at_workers: at_workers,
            bytes_received: bytes.load(Ordering::Relaxed),
            elapsed,
        });
    }
    Ok(phases)
}

pub fn table(phases: &[Phase]) -> String {
    let mut out = String::from(
        "| phase | browsers | asset requests | reaching workers | page p50 ms | page p99 ms | asset p99 ms | MB received | errors | s |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in phases {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} |\n",
            p.name,
            p.pages.answered(),
            p.assets.answered(),
            p.asset_requests_at_workers,
            p.pages.ms(0.5),
            p.pages.ms(0.99),
            p.assets.ms(0.99),
            p.bytes_received as f64 / 1e6,
            p.pages.failures() + p.assets.failures(),
            p.elapsed,
        ));
    }
    out
}

pub fn json(phases: &[Phase], opts: &Opts) -> serde_json::Value {
    serde_json::json!({
        "scenario": "login-storm",
        "browsers": opts.browsers,
        "spread_s": opts.spread,
        "asset_ms": opts.asset_ms,
        "bundles": BUNDLES.iter().map(|(p, s)| serde_json::json!({"path": p, "bytes": s})).collect::<Vec<_>>(),
        "phases": phases.iter().map(|p| serde_json::json!({
            "name": p.name,
            "pages": p.pages.json(),
            "assets": p.assets.json(),
            "asset_requests_at_workers": p.asset_requests_at_workers,
            "bytes_received": p.bytes_received,
            "seconds": p.elapsed,
        })).collect::<Vec<_>>(),
    })
}
