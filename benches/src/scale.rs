//! How cost grows: portier's memory at rest and its reload time with 1 000, 10 000 and
//! 100 000 tenants; memory per held connection with 1 000, 5 000 and 20 000 open
//! WebSockets; requests per second with 10 and with 10 000 tenants active. Each figure
//! should grow linearly (memory, reload time) or not at all (per connection, requests
//! per second); the table shows the curve and each step's factor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{self, Req, Stats};
use crate::proc;

pub struct Opts {
    pub portier: std::path::PathBuf,
    pub proxy_cpus: Option<String>,
    pub args: Args,
}

/// The scenario's command-line options.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub tenants: Vec<usize>,
    /// SIGHUP reloads per tenant count.
    #[arg(long, default_value_t = 5)]
    pub reloads: usize,
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000")]
    pub websockets: Vec<usize>,
    /// Active tenant counts, out of as many tenants as the largest.
    #[arg(long, value_delimiter = ',', default_value = "10,10000")]
    pub active: Vec<usize>,
    /// Seconds per requests/s run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Runs of each active tenant count, alternated.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

pub struct TenantsRow {
    pub tenants: usize,
    pub rss_at_rest_kib: u64,
    pub start_ms: f64,
    pub reload_ms: Vec<f64>,
}

pub struct SocketsRow {
    /// Asked for, and opened: fewer when the descriptor limit stops it (each WebSocket
    /// is two descriptors in portier and two in this process).
    pub asked: usize,
    pub open: usize,
    pub rss_before_kib: u64,
    pub rss_open_kib: u64,
}

pub struct ActiveRow {
    pub active: usize,
    /// One closed-loop run per round, and portier's CPU use in it (% of a core).
    pub runs: Vec<(Stats, f64)>,
}

pub struct Report {
    pub tenants: Vec<TenantsRow>,
    pub sockets: Vec<SocketsRow>,
    pub active: Vec<ActiveRow>,
    pub active_of: usize,
}

/// A configuration of `tenants` tenants (`t{i}.test`, each its database) on one pool,
/// plus `extra` tenants `new{j}.test` (what a reload adds).
pub(crate) fn config(port: u16, admin: u16, pool: &str, tenants: usize, extra: usize) -> String {
    let mut s = format!(
        "[listen]\nhttp = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\nthreads = 1\n\
         [log]\naccess = false\n[pools.odoo]\n{pool}\n"
    );
    s.reserve((tenants + extra) * 80);
    for i in 0..tenants {
        s.push_str(&format!(
            "[tenants.t{i}]\nhosts = [\"t{i}.test\"]\npool = \"odoo\"\ndatabase = \"db{i}\"\n"
        ));
    }
    for j in 0..extra {
        s.push_str(&format!(
            "[tenants.new{j}]\nhosts = [\"new{j}.test\"]\npool = \"odoo\"\n"
        ));
    }
    s
}

fn pool_of(http: &[SocketAddr], longpolling: &[SocketAddr]) -> String {
    let list = |v: &[SocketAddr]| {
        v.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "http = [{}]\nlongpolling = [{}]",
        list(http),
        list(longpolling)
    )
}

async fn answers(addr: SocketAddr, host: &str) -> bool {
    portier_sim::client::request(addr, "GET", host, "/web/login", &[], bytes::Bytes::new())
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

async fn start(
    opts: &Opts,
    dir: &std::path::Path,
    make: impl FnOnce(u16, u16) -> String,
) -> std::io::Result<proc::Started> {
    proc::start_portier(
        &opts.portier,
        dir,
        opts.proxy_cpus.as_deref(),
        Duration::from_secs(120),
        make,
    )
    .await
}

/// Memory at rest and reload time (SIGHUP to the added tenant answering) with `n` tenants.
async fn tenants(opts: &Opts, pool: &str, n: usize) -> std::io::Result<TenantsRow> {
    let dir = proc::workdir()?;
    let t0 = Instant::now();
    let s = start(opts, dir.path(), |port, admin| {
        config(port, admin, pool, n, 0)
    })
    .await?;
    let start_ms = t0.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_at_rest_kib = proc::status_kib(s.proxy.pid(), "VmRSS");
    let port = s.http.port();
    let mut reload_ms = Vec::new();
    for j in 0..opts.args.reloads {
        std::fs::write(&s.config, config(port, s.admin, pool, n, j + 1))?;
        let host = format!("new{j}.test");
        let t0 = Instant::now();
        let _ = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(s.proxy.pid().to_string())
            .status();
        while !answers(s.http, &host).await {
            if t0.elapsed() > Duration::from_secs(60) {
                s.proxy.stop();
                return Err(std::io::Error::other(format!(
                    "{n} tenants: reload {j} did not apply within 60 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        reload_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.proxy.stop();
    Ok(TenantsRow {
        tenants: n,
        rss_at_rest_kib,
        start_ms,
        reload_ms,
    })
}

/// The source address of the `i`-th client connection: 127.0.0.1 to 127.0.0.8 in turn,
/// so that the ephemeral port range (28 000 here) is never what stops the count.
fn source(i: usize) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % 8) as u8).into()
}

async fn websocket_from(
    i: usize,
    addr: SocketAddr,
) -> Option<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(source(i), 0)).ok()?;
    let open = async {
        let tcp = socket.connect(addr).await.ok()?;
        let ws = portier_sim::client::websocket_over(tcp, "t0.test", "/websocket", &[]).await;
        ws.ok().map(|(ws, _)| ws)
    };
    tokio::time::timeout(Duration::from_secs(10), open)
        .await
        .ok()
        .flatten()
}

/// RSS per open WebSocket with `n` open (each echoed once), portier started afresh.
async fn sockets(opts: &Opts, pool: &str, n: usize) -> std::io::Result<SocketsRow> {
    use futures_util::{SinkExt, StreamExt};
    let dir = proc::workdir()?;
    let s = start(opts, dir.path(), |port, admin| {
        config(port, admin, pool, 1, 0)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before_kib = proc::status_kib(s.proxy.pid(), "VmRSS");
    let mut open = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(200) {
        let batch: Vec<_> = (chunk * 200..(chunk * 200 + 200).min(n))
            .map(|i| tokio::spawn(websocket_from(i, s.http)))
            .collect();
        for b in batch {
            if let Ok(Some(ws)) = b.await {
                open.push(ws);
            }
        }
    }
    for ws in open.iter_mut() {
        let _ = ws
            .send(tokio_tungstenite::tungstenite::Message::text("ping"))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open_kib = proc::status_kib(s.proxy.pid(), "VmRSS");
    let opened = open.len();
    drop(open);
    s.proxy.stop();
    if opened < n {
        return Err(std::io::Error::other(format!(
            "only {opened} of {n} WebSockets opened"
        )));
    }
    Ok(SocketsRow {
        asked: n,
        open: n,
        rss_before_kib,
        rss_open_kib,
    })
}

/// Requests per second over 64 keep-alive connections, the hosts cycling over the first
/// `k` of `of` tenants, for each `k` of `active`, alternated over the rounds.
async fn active(opts: &Opts, pool: &str, of: usize) -> std::io::Result<Vec<ActiveRow>> {
    let dir = proc::workdir()?;
    let s = start(opts, dir.path(), |port, admin| {
        config(port, admin, pool, of, 0)
    })
    .await?;
    let mut rows: Vec<ActiveRow> = opts
        .args
        .active
        .iter()
        .map(|&k| ActiveRow {
            active: k.min(of),
            runs: Vec::new(),
        })
        .collect();
    for round in 0..opts.args.rounds.max(1) {
        for row in rows.iter_mut() {
            let mut req = Req::get("t0.test", "/web/login");
            req.hosts = (0..row.active).map(|i| format!("t{i}.test")).collect();
            let req = Arc::new(req);
            // Warm-up: every active tenant seen once before the measured run.
            load::closed(s.http, req.clone(), 64, Duration::from_secs(2), None).await;
            eprintln!("scale: round {}: {} active tenants", round + 1, row.active);
            let secs = Duration::from_secs(opts.args.seconds);
            let cpu0 = s.proxy.cpu_seconds();
            let stats = load::closed(s.http, req, 64, secs, None).await;
            let cpu = (s.proxy.cpu_seconds() - cpu0) / stats.elapsed.as_secs_f64() * 100.0;
            row.runs.push((stats, cpu));
        }
    }
    s.proxy.stop();
    Ok(rows)
}

pub async fn run(opts: &Opts) -> std::io::Result<Report> {
    // 20 000 WebSockets are 40 000 descriptors here (client and worker ends) and in portier.
    crate::exhaustion::raise_nofile(200_000);
    let workers = proc::workers(2, None).await?;
    let gevent = portier_sim::SimWorker::start("gevent", ([127, 0, 0, 1], 0).into()).await?;
    gevent.set_recording(false);
    let http: Vec<SocketAddr> = workers.iter().map(|w| w.addr()).collect();
    let pool = pool_of(&http, &[gevent.addr()]);
    let mut out = Report {
        tenants: Vec::new(),
        sockets: Vec::new(),
        active: Vec::new(),
        active_of: opts.args.active.iter().copied().max().unwrap_or(0),
    };
    for &n in &opts.args.tenants {
        eprintln!(
            "scale: {n} tenants: memory at rest, {} reloads",
            opts.args.reloads
        );
        out.tenants.push(tenants(opts, &pool, n).await?);
    }
    // Each WebSocket takes two descriptors in portier (client, worker) and two here.
    let most = (crate::exhaustion::nofile() as usize).saturating_sub(256) / 2;
    for &asked in &opts.args.websockets {
        let n = asked.min(most);
        eprintln!("scale: {n} open WebSockets ({asked} asked; the descriptor limit allows {most})");
        let mut row = sockets(opts, &pool, n).await?;
        row.asked = asked;
        out.sockets.push(row);
    }
    if out.active_of > 0 {
        out.active = active(opts, &pool, out.active_of).await?;
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl SocketsRow {
    fn kib_per_conn(&self) -> f64 {
        self.rss_open_kib.saturating_sub(self.rss_before_kib) as f64 / self.open.max(1) as f64
    }
}

impl ActiveRow {
    fn rps(&self) -> f64 {
        median(self.runs.iter().map(|(s, _)| s.rps()).collect())
    }
}

/// "x{factor}" of a figure against the row before (growth per step).
fn step(prev: Option<f64>, now: f64) -> String {
    match prev {
        Some(p) if p > 0.0 => format!("x{:.2}", now / p),
        _ => "-".into(),
    }
}

pub fn table(r: &Report) -> String {
    let mut out = String::from(
        "| tenants | start → ready ms | RSS at rest MiB | step | reload p50 ms (min–max) | step |\n|---|---|---|---|---|---|\n",
    );
    let (mut rss, mut rl) = (None, None);
    for t in &r.tenants {
        let (m, lo, hi) = (
            median(t.reload_ms.clone()),
            t.reload_ms.iter().copied().fold(f64::MAX, f64::min),
            t.reload_ms.iter().copied().fold(0.0, f64::max),
        );
        let mib = t.rss_at_rest_kib as f64 / 1024.0;
        out.push_str(&format!(
            "| {} | {:.0} | {mib:.1} | {} | {m:.0} ({lo:.0}–{hi:.0}) | {} |\n",
            t.tenants,
            t.start_ms,
            step(rss, mib),
            step(rl, m)
        ));
        (rss, rl) = (Some(mib), Some(m));
    }
    out.push_str("\n| open WebSockets (asked) | RSS before MiB | RSS open MiB | KiB per WebSocket |\n|---|---|---|---|\n");
    for s in &r.sockets {
        out.push_str(&format!(
            "| {} ({}) | {:.1} | {:.1} | {:.2} |\n",
            s.open,
            s.asked,
            s.rss_before_kib as f64 / 1024.0,
            s.rss_open_kib as f64 / 1024.0,
            s.kib_per_conn()
        ));
    }
    out.push_str(&format!(
        "\n| active tenants (of {}) | req/s median | runs | portier CPU % | CPU µs per request | p99 ms |\n|---|---|---|---|---|---|\n",
        r.active_of
    ));
    for a in &r.active {
        let runs: Vec<String> = a
            .runs
            .iter()
            .map(|(s, _)| format!("{:.0}", s.rps()))
            .collect();
        out.push_str(&format!(
            "| {} | {:.0} | {} | {:.0} | {:.1} | {:.2} |\n",
            a.active,
            a.rps(),
            runs.join(", "),
            median(a.runs.iter().map(|(_, c)| *c).collect()),
            median(
                a.runs
                    .iter()
                    .map(|(s, c)| c / 100.0 / s.rps().max(1e-9) * 1e6)
                    .collect()
            ),
            median(a.runs.iter().map(|(s, _)| s.ms(0.99)).collect()),
        ));
    }
    out
}

pub fn json(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "scenario": "scale",
        "tenants": r.tenants.iter().map(|t| serde_json::json!({
            "tenants": t.tenants, "rss_at_rest_kib": t.rss_at_rest_kib,
            "start_ms": t.start_ms, "reload_ms": t.reload_ms,
            "reload_ms_median": median(t.reload_ms.clone()),
        })).collect::<Vec<_>>(),
        "websockets": r.sockets.iter().map(|s| serde_json::json!({
            "asked": s.asked, "open": s.open, "rss_before_kib": s.rss_before_kib,
            "rss_open_kib": s.rss_open_kib, "kib_per_conn": s.kib_per_conn(),
        })).collect::<Vec<_>>(),
        "active_of": r.active_of,
        "active": r.active.iter().map(|a| serde_json::json!({
            "active": a.active, "rps_median": a.rps(),
            "runs": a.runs.iter().map(|(s, cpu)| serde_json::json!({
                "stats": s.json(), "proxy_cpu_pct": cpu,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
