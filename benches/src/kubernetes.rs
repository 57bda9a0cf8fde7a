//! The `kubernetes` scenario, against the API server stand-in (portier_sim::apiserver):
//! N HTTPRoutes, each with its own Service and EndpointSlice. Measures
//! - the time from portier's start to serving all N (every route's host answered by a
//!   worker),
//! - the status writes (one per object) and when the last was done,
//! - memory at rest (after the status writes), beside the same N tenants from TOML
//!   (N pools, and one pool),
//! - the time from an EndpointSlice change to the first request answered by the new
//!   endpoint (p50/p99 over `changes` changes, no reload),
//! - the requests portier sends the API server at rest (10 s).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use portier_sim::apiserver::ApiServer;
use serde_json::{json, Value};

use crate::proc;
use crate::reload::quantile;

pub struct Opts {
    pub portier: std::path::PathBuf,
    pub routes: usize,
    pub changes: usize,
    pub proxy_cpus: Option<String>,
}

pub struct Report {
    pub routes: usize,
    pub start_to_serving_s: f64,
    pub rss_kube_kib: u64,
    pub rss_toml_pools_kib: u64,
    pub rss_toml_one_pool_kib: u64,
    pub change_ms: Vec<f64>,
    pub at_rest: serde_json::Map<String, Value>,
    pub at_rest_seconds: u64,
    pub status_writes: u64,
    pub status_written_s: f64,
}

fn slice(i: usize, addr: SocketAddr) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("odoo-{i}"), "namespace": "t", "labels": {"kubernetes.io/service-name": format!("odoo-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": addr.port()}],
        "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": true}}]})
}

fn objects(api: &ApiServer, n: usize, addr: SocketAddr) {
    let gw = "gateway.networking.k8s.io/v1";
    api.apply(
        json!({"apiVersion": gw, "kind": "GatewayClass", "metadata": {"name": "portier"},
        "spec": {"controllerName": "portier.dev/gateway-controller"}}),
    );
    api.apply(json!({"apiVersion": gw, "kind": "Gateway", "metadata": {"name": "edge", "namespace": "t"},
        "spec": {"gatewayClassName": "portier", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}));
    for i in 0..n {
        api.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("odoo-{i}"), "namespace": "t"},
            "spec": {"ports": [{"name": "http", "port": 8069}]}}));
        api.apply(slice(i, addr));
        api.apply(json!({"apiVersion": gw, "kind": "HTTPRoute",
            "metadata": {"name": format!("t{i}"), "namespace": "t", "annotations": {"portier.dev/database": format!("db{i}")}},
            "spec": {"parentRefs": [{"name": "edge"}], "hostnames": [format!("t{i}.test")],
                     "rules": [{"backendRefs": [{"name": format!("odoo-{i}"), "port": 8069}]}]}}));
    }
}

async fn worker_of(addr: SocketAddr, host: &str) -> Option<String> {
    let r =
        portier_sim::client::request(addr, "GET", host, "/web/dataset/call_kw", &[], Bytes::new())
            .await
            .ok()?;
    r.headers()
        .get("x-sim-worker")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn toml(port: u16, admin: u16, worker: SocketAddr, n: usize, pools: bool) -> String {
    let mut s = format!(
        "[listen]\nhttp = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\nthreads = 1\n[log]\naccess = false\n"
    );
    s.reserve(n * 160);
    if !pools {
        s.push_str(&format!("[pools.odoo]\nhttp = [\"{worker}\"]\n"));
    }
    for i in 0..n {
        let pool = if pools {
            s.push_str(&format!("[pools.p{i}]\nhttp = [\"{worker}\"]\n"));
            format!("p{i}")
        } else {
            "odoo".to_string()
        };
        s.push_str(&format!(
            "[tenants.t{i}]\nhosts = [\"t{i}.test\"]\npool = \"{pool}\"\ndatabase = \"db{i}\"\n"
        ));
    }
    s
}

/// RSS at rest of portier on a TOML file with the same tenants.
async fn toml_rss(opts: &Opts, worker: SocketAddr, pools: bool) -> std::io::Result<u64> {
    let dir = proc::workdir()?;
    let n = opts.routes;
    let started = proc::start_portier(
        &opts.portier,
        dir.path(),
        opts.proxy_cpus.as_deref(),
        Duration::from_secs(60),
        |p, a| toml(p, a, worker, n, pools),
    )
    .await?;
    for i in (0..n).step_by((n / 100).max(1)) {
        worker_of(started.http, &format!("t{i}.test")).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = proc::status_kib(started.proxy.pid(), "VmRSS");
    started.proxy.stop();
    Ok(rss)
}

pub async fn run(opts: &Opts) -> std::io::Result<Report> {
    let workers = proc::workers(2, None).await?;
    let a = workers[0].addr();
    let api = ApiServer::start().await;
    eprintln!(
        "kubernetes: {} routes, Services and EndpointSlices in the stand-in",
        opts.routes
    );
    objects(&api, opts.routes, a);
    let dir = proc::workdir()?;
    let kc = api.kubeconfig(dir.path());
    let t0 = Instant::now();
    let started = proc::start_portier(&opts.portier, dir.path(), opts.proxy_cpus.as_deref(), Duration::from_secs(60), |p, adm| {
        format!(
            "[listen]\nhttp = \"127.0.0.1:{p}\"\nadmin = \"127.0.0.1:{adm}\"\nthreads = 1\n[log]\naccess = false\n[kubernetes]\nkubeconfig = \"{}\"\n",
            kc.display()
        )
    })
    .await?;
    let addr = started.http;
    all_served(addr, opts.routes).await?;
    let start_to_serving_s = t0.elapsed().as_secs_f64();
    eprintln!("kubernetes: all served {start_to_serving_s:.2} s after start (including the check of every host)");
    let status_writes = statuses_written(&api).await;
    let status_written_s = t0.elapsed().as_secs_f64() - 2.0;
    eprintln!(
        "kubernetes: {status_writes} status writes, the last {status_written_s:.1} s after start"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_kube_kib = proc::status_kib(started.proxy.pid(), "VmRSS");
    let at_rest_seconds = 10;
    let at_rest = requests_during(&api, Duration::from_secs(at_rest_seconds)).await;
    eprintln!("kubernetes: {} endpoint changes", opts.changes);
    let change_ms = endpoint_changes(&api, addr, &workers, opts).await?;
    started.proxy.stop();
    let rss_toml_pools_kib = toml_rss(opts, a, true).await?;
    let rss_toml_one_pool_kib = toml_rss(opts, a, false).await?;
    Ok(Report {
        routes: opts.routes,
        start_to_serving_s,
        rss_kube_kib,
        rss_toml_pools_kib,
        rss_toml_one_pool_kib,
        change_ms,
        at_rest,
        at_rest_seconds,
        status_writes,
        status_written_s,
    })
}

/// Waits until every route's host is answered by a worker: the last one first (it is
/// translated with all the others), then each.
async fn all_served(addr: SocketAddr, routes: usize) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = format!("t{}.test", routes - 1);
    while worker_of(addr, &last).await.is_none() {
        if Instant::now() > deadline {
            return Err(std::io::Error::other("not serving after 120 s"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut missing = 0;
    for i in 0..routes {
        if worker_of(addr, &format!("t{i}.test")).await.is_none() {
            missing += 1;
        }
    }
    if missing > 0 {
        return Err(std::io::Error::other(format!(
            "{missing} routes not served"
        )));
    }
    Ok(())
}

/// Waits until the status writes stopped for 2 s (at most 120 s); how many there were.
async fn statuses_written(api: &ApiServer) -> u64 {
    let patches = || api.requests().get("patch").copied().unwrap_or(0);
    let mut last = (patches(), Instant::now());
    let settle = Instant::now();
    while last.1.elapsed() < Duration::from_secs(2) && settle.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = patches();
        if n != last.0 {
            last = (n, Instant::now());
        }
    }
    last.0
}

/// The requests the API server got during `d`, by verb (those with none left out).
async fn requests_during(api: &ApiServer, d: Duration) -> serde_json::Map<String, Value> {
    let before = api.requests();
    tokio::time::sleep(d).await;
    api.requests()
        .iter()
        .map(|(k, v)| (k.clone(), json!(v - before.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| v.as_u64() != Some(0))
        .collect()
}

/// `opts.changes` times: a route's EndpointSlice moved to the other worker, and the
/// milliseconds until its host is answered there.
async fn endpoint_changes(
    api: &ApiServer,
    addr: SocketAddr,
    workers: &[portier_sim::SimWorker],
    opts: &Opts,
) -> std::io::Result<Vec<f64>> {
    let mut change_ms = Vec::with_capacity(opts.changes);
    let step = (opts.routes / opts.changes.max(1)).max(1);
    for k in 0..opts.changes {
        let i = (k * step) % opts.routes;
        let host = format!("t{i}.test");
        let to = if worker_of(addr, &host).await.as_deref() == Some(workers[0].name()) {
            &workers[1]
        } else {
            &workers[0]
        };
        let t = Instant::now();
        api.apply(slice(i, to.addr()));
        while worker_of(addr, &host).await.as_deref() != Some(to.name()) {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(std::io::Error::other(format!(
                    "change {k} not applied in 10 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        change_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(change_ms)
}

pub fn table(r: &Report) -> String {
    let mib = |k: u64| k as f64 / 1024.0;
    format!(
        "| routes | start -> all served s | RSS MiB (objects) | RSS MiB (TOML, a pool each) | RSS MiB (TOML, one pool) | endpoint change -> traffic p50 / p99 ms | API requests at rest ({} s) |\n|---|---|---|---|---|---|---|\n| {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} | {} |\n",
        r.at_rest_seconds,
        r.routes,
        r.start_to_serving_s,
        mib(r.rss_kube_kib),
        mib(r.rss_toml_pools_kib),
        mib(r.rss_toml_one_pool_kib),
        quantile(&r.change_ms, 0.5),
        quantile(&r.change_ms, 0.99),
        if r.at_rest.is_empty() { "none".to_string() } else { Value::Object(r.at_rest.clone()).to_string() },
    )
}

pub fn json(r: &Report) -> Value {
    json!({
        "scenario": "kubernetes",
        "routes": r.routes,
        "start_to_serving_s": r.start_to_serving_s,
        "rss_kube_kib": r.rss_kube_kib,
        "rss_toml_pools_kib": r.rss_toml_pools_kib,
        "rss_toml_one_pool_kib": r.rss_toml_one_pool_kib,
        "change_ms_p50": quantile(&r.change_ms, 0.5),
        "change_ms_p99": quantile(&r.change_ms, 0.99),
        "change_ms": r.change_ms,
        "at_rest_requests": r.at_rest,
        "at_rest_seconds": r.at_rest_seconds,
        "status_writes": r.status_writes,
        "status_written_s": r.status_written_s,
    })
}
