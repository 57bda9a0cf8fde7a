//! portier side by side with the peers, in rounds: every phase runs each target once
//! per round, in an order that rotates from round to round (so that drift of this
//! VM's speed spreads over every target alike), and the table gives each figure's
//! median over the rounds with its min-max spread.
//!
//! A round: the shared harness (../shared/peers/bench.sh: HTTP/1.1 keep-alive and
//! HTTP/2 over TLS; conns.sh: memory per held longpolling request) with portier as one
//! more target; this harness's new TLS handshakes; memory per open WebSocket, plain and
//! over TLS (`wss`); and latency at equal offered load — every target at half of the
//! capacity nginx showed in the same round, at a constant rate, percentiles corrected
//! for coordinated omission (`load::paced`, `load::paced_h2`).

mod table;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use portier_sim::SimWorker;

use crate::load::{self, Req, Stats};
use crate::peers::{self, Env, Handshakes, Sockets};

pub use table::{json, table};

pub struct Opts {
    pub portier: PathBuf,
    pub peers_dir: PathBuf,
    pub targets: Vec<String>,
    pub seconds: u64,
    pub rounds: usize,
    pub held: usize,
    pub websockets: usize,
    pub handshake_conns: usize,
    /// Fraction of nginx's capacity offered to every target in the latency phase.
    pub load_fraction: f64,
    pub out_dir: PathBuf,
}

/// One target's latency at the offered rates.
pub struct Latency {
    pub target: String,
    pub h1_rate: f64,
    pub h1: Stats,
    pub h1_cpu_pct: f64,
    pub h2_rate: f64,
    pub h2: Stats,
    pub h2_cpu_pct: f64,
}

/// Everything one round measured.
pub struct Round {
    pub order: Vec<String>,
    pub bench: serde_json::Value,
    pub conns: serde_json::Value,
    pub handshakes: Vec<Handshakes>,
    pub ws: Vec<Sockets>,
    pub wss: Vec<Sockets>,
    pub latency: Vec<Latency>,
}

pub struct Report {
    pub rounds: Vec<Round>,
    pub versions: Vec<(String, String)>,
    pub targets: Vec<String>,
}

fn shell(opts: &Opts, script: &str, args: &[String]) -> std::io::Result<()> {
    eprintln!("compare: {script} {}", args.join(" "));
    let status = Command::new("bash")
        .arg(opts.peers_dir.join(script))
        .args(args)
        .env("PORTIER_BIN", &opts.portier)
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!("{script} failed ({status})")));
    }
    Ok(())
}

fn read_json(p: &Path) -> serde_json::Value {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}

pub async fn run(opts: &Opts) -> std::io::Result<Report> {
    std::fs::create_dir_all(&opts.out_dir)?;
    let env = Env::new(&opts.peers_dir, &opts.portier)?;
    let versions = opts
        .targets
        .iter()
        .map(|t| (t.clone(), peers::target_version(&env, t)))
        .collect();
    let mut rounds = Vec::new();
    for r in 0..opts.rounds.max(1) {
        let mut order = opts.targets.clone();
        let turn = r % order.len().max(1);
        order.rotate_left(turn);
        eprintln!(
            "compare: round {}/{}: {}",
            r + 1,
            opts.rounds,
            order.join(", ")
        );
        rounds.push(round(opts, &env, r, order).await?);
    }
    Ok(Report {
        rounds,
        versions,
        targets: opts.targets.clone(),
    })
}

async fn round(opts: &Opts, env: &Env, r: usize, order: Vec<String>) -> std::io::Result<Round> {
    let bench_out = opts
        .out_dir
        .join(format!("peers-bench-round{}.json", r + 1));
    let conns_out = opts
        .out_dir
        .join(format!("peers-conns-round{}.json", r + 1));
    let mut args = vec![
        "--duration".to_string(),
        opts.seconds.to_string(),
        "--out".into(),
        bench_out.display().to_string(),
        "direct".into(),
    ];
    args.extend(order.iter().cloned());
    shell(opts, "bench.sh", &args)?;
    let mut args = vec![
        "--n".to_string(),
        opts.held.to_string(),
        "--out".into(),
        conns_out.display().to_string(),
    ];
    args.extend(order.iter().cloned());
    shell(opts, "conns.sh", &args)?;
    let bench = read_json(&bench_out);

    let upstream = peers::start_upstream(env).await?;
    let mut handshakes = Vec::new();
    for t in &order {
        eprintln!("compare: {t}: new TLS handshakes for {} s", opts.seconds);
        let g = peers::start_target(env, t, None).await?;
        handshakes.push(peers::handshakes(&g, opts.handshake_conns, opts.seconds).await);
        g.stop();
    }
    let latency = equal_load(opts, env, &order, &bench).await?;
    upstream.stop();

    let (ws, wss) = sockets(opts, env, &order).await?;
    Ok(Round {
        order,
        bench,
        conns: read_json(&conns_out),
        handshakes,
        ws,
        wss,
        latency,
    })
}

/// Open WebSockets, plain and over TLS, relayed to a simulated gevent worker that
/// echoes; each measured in a target started afresh (memory freed by the first would
/// otherwise be reused by the second and hide its cost).
async fn sockets(
    opts: &Opts,
    env: &Env,
    order: &[String],
) -> std::io::Result<(Vec<Sockets>, Vec<Sockets>)> {
    let gevent = SimWorker::start("gevent", ([127, 0, 0, 1], 0).into()).await?;
    gevent.set_recording(false);
    let upstream = peers::start_upstream(env).await?;
    let (mut ws, mut wss) = (Vec::new(), Vec::new());
    for t in order {
        for tls in [false, true] {
            let kind = if tls { "wss" } else { "ws" };
            eprintln!("compare: {t}: {} open WebSockets ({kind})", opts.websockets);
            let g = peers::start_target(env, t, Some(gevent.addr())).await?;
            let s = peers::websockets(&g, opts.websockets, tls).await;
            g.stop();
            if tls { &mut wss } else { &mut ws }.push(s);
        }
    }
    upstream.stop();
    Ok((ws, wss))
}

/// A target's capacity as the shared harness measured it this round (req/s).
fn capacity(bench: &serde_json::Value, target: &str, phase: &str) -> Option<f64> {
    table::row(bench, target)?[phase]["rps"].as_f64()
}

/// Every target at `load_fraction` of nginx's HTTP/1.1 and HTTP/2 capacity (of the
/// first target when nginx is not compared), at a constant rate: 64 keep-alive
/// connections for HTTP/1.1, 64 TLS connections of 10 streams for HTTP/2 (the shared
/// harness's shapes), after a 2 s warm-up at the same rate.
async fn equal_load(
    opts: &Opts,
    env: &Env,
    order: &[String],
    bench: &serde_json::Value,
) -> std::io::Result<Vec<Latency>> {
    let yardstick = if order.iter().any(|t| t == "nginx") {
        "nginx"
    } else {
        order.first().map(String::as_str).unwrap_or("nginx")
    };
    let (Some(h1_cap), Some(h2_cap)) = (
        capacity(bench, yardstick, "h1"),
        capacity(bench, yardstick, "h2"),
    ) else {
        eprintln!("compare: no capacity of {yardstick} this round: latency phase skipped");
        return Ok(Vec::new());
    };
    let (h1_rate, h2_rate) = (h1_cap * opts.load_fraction, h2_cap * opts.load_fraction);
    let req = std::sync::Arc::new(Req::get("a.test", "/"));
    let (h1_addr, tls_addr) = (
        ([127, 0, 0, 1], peers::LISTEN_PORT).into(),
        ([127, 0, 0, 1], peers::TLS_PORT).into(),
    );
    let secs = Duration::from_secs(opts.seconds);
    let mut out = Vec::new();
    for t in order {
        eprintln!("compare: {t}: HTTP/1.1 at {h1_rate:.0} req/s, HTTP/2 at {h2_rate:.0} req/s");
        let g = peers::start_target(env, t, None).await?;
        load::paced(h1_addr, req.clone(), 64, h1_rate, Duration::from_secs(2)).await;
        let cpu0 = g.tree_cpu_seconds();
        let h1 = load::paced(h1_addr, req.clone(), 64, h1_rate, secs).await;
        let h1_cpu_pct = (g.tree_cpu_seconds() - cpu0) / h1.elapsed.as_secs_f64() * 100.0;
        let shape = (64, 10);
        load::paced_h2(
            tls_addr,
            "a.test",
            req.clone(),
            shape,
            h2_rate,
            Duration::from_secs(2),
        )
        .await;
        let cpu0 = g.tree_cpu_seconds();
        let h2 = load::paced_h2(tls_addr, "a.test", req.clone(), shape, h2_rate, secs).await;
        let h2_cpu_pct = (g.tree_cpu_seconds() - cpu0) / h2.elapsed.as_secs_f64() * 100.0;
        g.stop();
        out.push(Latency {
            target: t.clone(),
            h1_rate,
            h1,
            h1_cpu_pct,
            h2_rate,
            h2,
            h2_cpu_pct,
        });
    }
    Ok(out)
}
