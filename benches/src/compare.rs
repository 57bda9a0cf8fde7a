//! One run, portier side by side with the peers: the shared harness
//! (../shared/peers/bench.sh: HTTP/1.1 keep-alive and HTTP/2 over TLS; conns.sh:
//! memory per held longpolling request) with portier as one more target, plus this
//! harness's handshake and WebSocket scenarios against the same targets. Prints one
//! table with portier's ratio to each peer and to the direct ceiling.

use std::path::{Path, PathBuf};
use std::process::Command;

use portier_sim::SimWorker;

use crate::peers::{self, Env, Handshakes, Sockets};

pub struct Opts {
    pub portier: PathBuf,
    pub peers_dir: PathBuf,
    pub targets: Vec<String>,
    pub seconds: u64,
    pub held: usize,
    pub websockets: usize,
    pub handshake_conns: usize,
    pub out_dir: PathBuf,
}

pub struct Report {
    pub bench: serde_json::Value,
    pub conns: serde_json::Value,
    pub handshakes: Vec<Handshakes>,
    pub sockets: Vec<Sockets>,
    pub versions: Vec<(String, String)>,
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
    let bench_out = opts.out_dir.join("peers-bench.json");
    let conns_out = opts.out_dir.join("peers-conns.json");
    let mut args = vec![
        "--duration".to_string(),
        opts.seconds.to_string(),
        "--out".into(),
        bench_out.display().to_string(),
        "direct".into(),
    ];
    args.extend(opts.targets.iter().cloned());
    shell(opts, "bench.sh", &args)?;
    let mut args = vec![
        "--n".to_string(),
        opts.held.to_string(),
        "--out".into(),
        conns_out.display().to_string(),
    ];
    args.extend(opts.targets.iter().cloned());
    shell(opts, "conns.sh", &args)?;

    let env = Env::new(&opts.peers_dir, &opts.portier)?;
    let versions = opts
        .targets
        .iter()
        .map(|t| (t.clone(), peers::target_version(&env, t)))
        .collect();

    // New TLS handshakes per second.
    let upstream = peers::start_upstream(&env).await?;
    let mut handshakes = Vec::new();
    for t in &opts.targets {
        eprintln!("compare: {t}: new TLS handshakes for {} s", opts.seconds);
        let g = peers::start_target(&env, t, None).await?;
        handshakes.push(peers::handshakes(&g, opts.handshake_conns, opts.seconds).await);
        g.stop();
    }
    upstream.stop();

    // Open WebSockets, relayed to a simulated gevent worker that echoes.
    let gevent = SimWorker::start("gevent", ([127, 0, 0, 1], 0).into()).await?;
    gevent.set_recording(false);
    let upstream = peers::start_upstream(&env).await?;
    let mut sockets = Vec::new();
    for t in &opts.targets {
        eprintln!("compare: {t}: {} open WebSockets", opts.websockets);
        let g = peers::start_target(&env, t, Some(gevent.addr())).await?;
        sockets.push(peers::websockets(&g, opts.websockets).await);
        g.stop();
    }
    upstream.stop();

    Ok(Report {
        bench: read_json(&bench_out),
        conns: read_json(&conns_out),
        handshakes,
        sockets,
        versions,
    })
}

fn row<'a>(bench: &'a serde_json::Value, target: &str) -> Option<&'a serde_json::Value> {
    bench["rows"]
        .as_array()?
        .iter()
        .find(|r| r["target"] == target)
}

fn held_kib(conns: &serde_json::Value, target: &str) -> Option<f64> {
    row(conns, target)?["result"]["rss_kb_per_conn"].as_f64()
}

/// The metrics of every target, and portier's ratio to each (higher is better for
/// throughput; for latency and memory, lower is better: the ratio is still
/// portier / peer).
pub fn table(r: &Report, targets: &[String]) -> String {
    type Metric<'a> = (&'a str, Box<dyn Fn(&str) -> Option<f64> + 'a>);
    let metrics: Vec<Metric<'_>> = vec![
        (
            "HTTP/1.1 req/s",
            Box::new(|t: &str| row(&r.bench, t)?["h1"]["rps"].as_f64()),
        ),
        (
            "HTTP/1.1 p99 ms",
            Box::new(|t: &str| row(&r.bench, t)?["h1"]["p99_ms"].as_f64()),
        ),
        (
            "HTTP/2+TLS req/s",
            Box::new(|t: &str| row(&r.bench, t)?["h2"]["rps"].as_f64()),
        ),
        (
            "HTTP/2+TLS p99 ms",
            Box::new(|t: &str| row(&r.bench, t)?["h2"]["p99_ms"].as_f64()),
        ),
        (
            "new TLS handshakes/s",
            Box::new(|t: &str| {
                r.handshakes
                    .iter()
                    .find(|h| h.target == t)
                    .map(|h| h.per_second)
            }),
        ),
        (
            "KiB per held longpoll",
            Box::new(|t: &str| held_kib(&r.conns, t)),
        ),
        (
            "KiB per open WebSocket",
            Box::new(|t: &str| {
                r.sockets
                    .iter()
                    .find(|s| s.target == t && s.echoed == s.opened && s.opened > 0)
                    .map(|s| s.kib_per_conn())
            }),
        ),
        (
            "peak RSS MiB (h1+h2 run)",
            Box::new(|t: &str| row(&r.bench, t)?["peak_rss_mib"].as_f64()),
        ),
    ];
    let peers: Vec<&String> = targets.iter().filter(|t| t.as_str() != "portier").collect();
    let mut out = String::from("| metric | direct |");
    for t in targets {
        out.push_str(&format!(" {t} |"));
    }
    for p in &peers {
        out.push_str(&format!(" portier / {p} |"));
    }
    out.push_str(" portier / direct |\n|---|---|");
    for _ in 0..targets.len() + peers.len() + 1 {
        out.push_str("---|");
    }
    out.push('\n');
    let fmt = |v: Option<f64>| {
        v.map(|v| {
            if v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .unwrap_or_else(|| "-".into())
    };
    for (name, f) in &metrics {
        out.push_str(&format!("| {name} | {} |", fmt(f("direct"))));
        for t in targets {
            out.push_str(&format!(" {} |", fmt(f(t))));
        }
        let mine = f("portier");
        // portier / other, two decimals; "-" when either is missing.
        let ratio = |other: Option<f64>| match (mine, other) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        for p in &peers {
            out.push_str(&format!(" {} |", ratio(f(p))));
        }
        out.push_str(&format!(" {} |\n", ratio(f("direct"))));
    }
    out.push_str("\nversions: ");
    out.push_str(
        &r.versions
            .iter()
            .map(|(t, v)| format!("{t} = {v}"))
            .collect::<Vec<_>>()
            .join("; "),
    );
    out.push('\n');
    out
}

pub fn json(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "shared_bench": r.bench,
        "shared_conns": r.conns,
        "handshakes": r.handshakes.iter().map(|h| serde_json::json!({
            "target": h.target, "per_second": h.per_second, "p50_ms": h.p50_ms,
            "p99_ms": h.p99_ms, "errors": h.errors, "proxy_cpu_pct": h.cpu_pct,
        })).collect::<Vec<_>>(),
        "websockets": r.sockets.iter().map(|s| serde_json::json!({
            "target": s.target, "opened": s.opened, "echoed": s.echoed,
            "rss_before_kib": s.rss_before_kib, "rss_open_kib": s.rss_open_kib,
            "kib_per_conn": s.kib_per_conn(),
        })).collect::<Vec<_>>(),
        "versions": r.versions,
    })
}
