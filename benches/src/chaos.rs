//! Chaos (issue "Hardening"): an open-loop load of idempotent GETs and non-idempotent
//! POSTs through three workers while faults are injected one after another: a worker
//! killed (connections refused), hung (accepts, never answers), resetting connections,
//! dying after reading a request, dying in the middle of writing its response. Every
//! request is accounted for: answered 2xx, answered with another status (by code),
//! failed in transport (a response cut off), or lost (no answer within 30 s).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use portier_sim::Mode;

use crate::proc;

pub struct Opts {
    pub portier: std::path::PathBuf,
    /// Requests per second (a fifth of them POSTs).
    pub rate: f64,
    /// Seconds per phase.
    pub phase: u64,
    pub proxy_cpus: Option<String>,
}

/// What happened to the requests of one kind.
#[derive(Default, Clone)]
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub transport: u64,
    pub lost: u64,
    pub slowest_ms: f64,
}

impl Tally {
    fn failed(&self) -> u64 {
        self.by_status.values().sum::<u64>() + self.transport + self.lost
    }
}

pub struct Report {
    pub phases: Vec<(String, Tally, Tally)>,
}

enum Outcome {
    Status(u16),
    Transport,
    Lost,
}

async fn one(addr: SocketAddr, post: bool) -> Outcome {
    let fut = async {
        let mut sender = portier_sim::client::connect(addr).await.ok()?;
        let req = if post {
            http::Request::post("/web/dataset/call_kw?size=20000")
                .header("host", "a.test")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{\"params\":{}}")))
        } else {
            http::Request::get("/web/dataset/search_read?size=20000")
                .header("host", "a.test")
                .body(Full::new(Bytes::new()))
        }
        .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    };
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(Some(status)) => Outcome::Status(status),
        Ok(None) => Outcome::Transport,
        Err(_) => Outcome::Lost,
    }
}

/// Open-loop load for `dur`: `(GET tally, POST tally)`.
async fn load(addr: SocketAddr, rate: f64, dur: Duration) -> (Tally, Tally) {
    let tallies = Arc::new(Mutex::new((Tally::default(), Tally::default())));
    let gap = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut i: u64 = 0;
    while start.elapsed() < dur {
        tokio::time::sleep_until((start + gap * i as u32).into()).await;
        let post = i % 5 == 4;
        let tallies = tallies.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let outcome = one(addr, post).await;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if let Ok(mut g) = tallies.lock() {
                let tally = if post { &mut g.1 } else { &mut g.0 };
                tally.sent += 1;
                tally.slowest_ms = tally.slowest_ms.max(ms);
                match outcome {
                    Outcome::Status(s) if (200..300).contains(&s) => tally.ok += 1,
                    Outcome::Status(s) => *tally.by_status.entry(s).or_default() += 1,
                    Outcome::Transport => tally.transport += 1,
                    Outcome::Lost => tally.lost += 1,
                }
            }
        }));
        i += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
    let g = tallies.lock().map(|g| g.clone()).unwrap_or_default();
    g
}

pub async fn run(opts: &Opts) -> std::io::Result<Report> {
    let dir = proc::workdir()?;
    let workers = proc::workers(3, None).await?;
    let list: Vec<String> = workers
        .iter()
        .map(|w| format!("\"{}\"", w.addr()))
        .collect();
    let started = proc::start_portier(
        &opts.portier,
        dir.path(),
        opts.proxy_cpus.as_deref(),
        Duration::from_secs(15),
        |port, admin| {
            format!(
                "[listen]\nhttp = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\nthreads = 1\n[log]\naccess = false\n[defaults]\nrequest_timeout = \"2s\"\nconnect_timeout = \"1s\"\n[pools.odoo]\nhttp = [{}]\nhealth = {{ every = \"1s\", timeout = \"500ms\", rise = 2, fall = 2 }}\nbreaker = {{ failures = 3, open_for = \"2s\" }}\nretries = 1\n[tenants.a]\nhosts = [\"a.test\"]\npool = \"odoo\"\n",
                list.join(", ")
            )
        },
    )
    .await?;
    let (proxy, addr) = (started.proxy, started.http);
    let dur = Duration::from_secs(opts.phase);
    let faults: [(&str, usize, Mode); 5] = [
        ("worker killed (refuses connections)", 0, Mode::Refuse),
        (
            "worker hung (accepts, never answers)",
            1,
            Mode::Slow(Duration::from_secs(60)),
        ),
        ("worker resets connections", 2, Mode::Reset),
        ("worker dies after reading the request", 0, Mode::Drop),
        ("worker dies mid-response", 1, Mode::Truncate),
    ];
    let mut phases = Vec::new();
    eprintln!("chaos: baseline");
    let (g, p) = load(addr, opts.rate, dur).await;
    phases.push(("baseline".to_string(), g, p));
    for (name, w, mode) in faults {
        eprintln!("chaos: {name}");
        workers[w].set_mode(mode);
        let (g, p) = load(addr, opts.rate, dur).await;
        phases.push((name.to_string(), g, p));
        workers[w].set_mode(Mode::Normal);
        eprintln!("chaos: recovery");
        let (g, p) = load(addr, opts.rate, Duration::from_secs(3)).await;
        phases.push((format!("recovery after: {name}"), g, p));
    }
    proxy.stop();
    Ok(Report { phases })
}

fn statuses(t: &Tally) -> String {
    if t.by_status.is_empty() {
        return "-".into();
    }
    t.by_status
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn table(r: &Report) -> String {
    let mut out = String::from(
        "| phase | GET sent | GET ok | GET failed (status) | GET cut off | GET lost | POST sent | POST ok | POST failed (status) | POST cut off | POST lost | slowest ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut total = (Tally::default(), Tally::default());
    for (name, g, p) in &r.phases {
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            g.sent,
            g.ok,
            statuses(g),
            g.transport,
            g.lost,
            p.sent,
            p.ok,
            statuses(p),
            p.transport,
            p.lost,
            g.slowest_ms.max(p.slowest_ms)
        ));
        for (acc, t) in [(&mut total.0, g), (&mut total.1, p)] {
            acc.sent += t.sent;
            acc.ok += t.ok;
            acc.transport += t.transport;
            acc.lost += t.lost;
            acc.slowest_ms = acc.slowest_ms.max(t.slowest_ms);
            for (s, n) in &t.by_status {
                *acc.by_status.entry(*s).or_default() += n;
            }
        }
    }
    out.push_str(&format!(
        "| **all** | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
        total.0.sent,
        total.0.ok,
        statuses(&total.0),
        total.0.transport,
        total.0.lost,
        total.1.sent,
        total.1.ok,
        statuses(&total.1),
        total.1.transport,
        total.1.lost,
        total.0.slowest_ms.max(total.1.slowest_ms)
    ));
    out.push_str(&format!(
        "\nlost: {} of {} requests; failed idempotent: {}\n",
        total.0.lost + total.1.lost,
        total.0.sent + total.1.sent,
        total.0.failed()
    ));
    out
}

pub fn json(r: &Report) -> serde_json::Value {
    let t = |t: &Tally| {
        serde_json::json!({
            "sent": t.sent, "ok": t.ok, "by_status": t.by_status, "cut_off": t.transport,
            "lost": t.lost, "slowest_ms": t.slowest_ms,
        })
    };
    serde_json::json!({
        "scenario": "chaos",
        "phases": r.phases.iter().map(|(n, g, p)| serde_json::json!({"name": n, "get": t(g), "post": t(p)})).collect::<Vec<_>>(),
    })
}
