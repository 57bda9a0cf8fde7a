//! Backend failure under load: a steady open-loop load of idempotent requests while
//! one of two workers dies (refuses connections) and comes back. Reports errors
//! (the goal is zero: connect failures are retried on the other worker, the breaker
//! and health checks take the dead one out) and latency before, during and after.

use std::sync::Arc;
use std::time::Duration;

use portier_sim::Mode;

use crate::load::{self, Req, Stats};
use crate::proc;

pub struct Opts {
    pub portier: std::path::PathBuf,
    pub rate: f64,
    pub proxy_cpus: Option<String>,
}

pub struct Report {
    pub phases: Vec<(&'static str, Stats)>,
}

pub async fn run(opts: &Opts) -> std::io::Result<Report> {
    let dir = proc::workdir()?;
    let workers = proc::workers(2, None).await?;
    let (a0, a1) = (workers[0].addr(), workers[1].addr());
    let started = proc::start_portier(
        &opts.portier,
        dir.path(),
        opts.proxy_cpus.as_deref(),
        Duration::from_secs(15),
        |port, admin| {
            format!(
        "[listen]\nhttp = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\nthreads = 1\n[log]\naccess = false\n[pools.odoo]\nhttp = [\"{}\", \"{}\"]\nhealth = {{ every = \"1s\", timeout = \"500ms\", rise = 2, fall = 2 }}\nbreaker = {{ failures = 3, open_for = \"2s\" }}\nretries = 1\n[tenants.a]\nhosts = [\"a.test\"]\npool = \"odoo\"\n",
        a0,
        a1
    )
        },
    )
    .await?;
    let (proxy, addr) = (started.proxy, started.http);
    let req = Arc::new(Req::get("a.test", "/web/dataset?size=1024"));
    load::open(addr, req.clone(), opts.rate, 64, Duration::from_secs(1)).await;
    let mut phases = Vec::new();
    eprintln!("failure: both workers up");
    phases.push((
        "both workers up",
        load::open(addr, req.clone(), opts.rate, 256, Duration::from_secs(5)).await,
    ));
    eprintln!("failure: worker 1 dies (connections refused, open ones closed)");
    workers[1].set_mode(Mode::Refuse);
    phases.push((
        "worker 1 dead",
        load::open(addr, req.clone(), opts.rate, 256, Duration::from_secs(5)).await,
    ));
    eprintln!("failure: worker 1 back");
    workers[1].set_mode(Mode::Normal);
    phases.push((
        "worker 1 back",
        load::open(addr, req.clone(), opts.rate, 256, Duration::from_secs(5)).await,
    ));
    proxy.stop();
    Ok(Report { phases })
}

pub fn table(r: &Report) -> String {
    let mut out = String::from("| phase | requests | req/s | p50 ms | p99 ms | max ms | errors |\n|---|---|---|---|---|---|---|\n");
    for (name, s) in &r.phases {
        out.push_str(&format!(
            "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |\n",
            s.answered() + s.errors,
            s.rps(),
            s.ms(0.5),
            s.ms(0.99),
            s.hist.max() as f64 / 1000.0,
            s.failures()
        ));
    }
    out
}

pub fn json(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "scenario": "backend-failure",
        "phases": r.phases.iter().map(|(n, s)| serde_json::json!({"name": n, "stats": s.json()})).collect::<Vec<_>>(),
    })
}
