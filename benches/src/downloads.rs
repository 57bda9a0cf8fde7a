//! Downloads (the filestore offload): clients download 5-20 MiB attachments at 1 MiB/s
//! each while clicks go on, through a pool of 4 Odoo workers (one server, `workers = 4`),
//! three ways — the worker streams the file (response buffering off), response
//! buffering (portier's defaults), the filestore offload (Odoo's `--x-sendfile`, the
//! pool's `filestore`) — and nginx with the same `internal` location beside them.
//! Reported per phase: worker-seconds per download (at the simulated workers, which hold
//! a process until their response is written out), downloads completed, bytes per
//! second, click p50/p99 (and with no download going on), and the proxy's CPU and
//! memory per download.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portier_sim::filestore::Attachment;
use portier_sim::{Odoo, OdooVersion, Server, SimConfig, SimWorker};

use crate::load::{self, Req, Stats};
use crate::peers;
use crate::proc;

pub struct Opts {
    pub portier: PathBuf,
    pub clients: usize,
    /// The attachments' sizes, spread evenly between these (bytes).
    pub min_size: usize,
    pub max_size: usize,
    /// Distinct attachments in the filestore (client i downloads file i mod this).
    pub files: usize,
    /// Each client's reading speed, bytes per second.
    pub rate: usize,
    /// The longest a phase may last.
    pub seconds: u64,
    /// Clicks per second during each phase.
    pub b_rate: f64,
    pub proxy_cpus: Option<String>,
    /// nginx runs beside portier when it is installed (`../shared/peers/install.sh`).
    pub nginx: bool,
}

pub struct Phase {
    pub name: &'static str,
    pub downloads: usize,
    pub complete: usize,
    pub bytes: u64,
    pub worker_seconds: f64,
    pub elapsed: f64,
    /// The proxy's CPU seconds and peak resident KiB during the phase.
    pub cpu: f64,
    pub rss_kib: u64,
    pub b: Stats,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Stream,
    Buffer,
    Offload,
}

fn config(
    port: u16,
    admin: u16,
    worker: SocketAddr,
    way: Way,
    spool: &Path,
    filestore: &Path,
) -> String {
    let extra = match way {
        Way::Stream => "buffer_response = \"0B\"\nmax_response_spool = \"0B\"\n".to_string(),
        _ => String::new(),
    };
    let fs = match way {
        Way::Offload => format!("filestore = \"{}\"\n", filestore.display()),
        _ => String::new(),
    };
    format!(
        r#"[listen]
http = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
threads = 1
spool_dir = "{spool}"
[log]
access = false
[defaults]
request_timeout = "600s"
{extra}
[pools.odoo]
http = ["{worker}"]
retries = 0
workers = 4
queue = {{ max = 1000, timeout = "600s" }}
{fs}
[tenants.a]
hosts = ["a.test"]
pool = "odoo"
database = "a"
"#,
        spool = spool.display()
    )
}

/// One Odoo server of 4 workers (`x_sendfile` or not) on the shared filestore.
async fn server(odoo: &Arc<Odoo>, name: &str, x_sendfile: bool) -> std::io::Result<SimWorker> {
    let mut cfg = SimConfig::new(Server::Threaded, odoo.clone());
    cfg.x_sendfile = x_sendfile;
    let w = SimWorker::start_with(name, ([127, 0, 0, 1], 0).into(), cfg).await?;
    w.set_recording(false);
    w.set_capacity(Some(4));
    Ok(w)
}

/// The attachments, `files` of them from `min_size` to `max_size` bytes.
fn attachments(odoo: &Odoo, dir: &Path, opts: &Opts) -> std::io::Result<Vec<Attachment>> {
    let store = odoo.set_data_dir(dir)?;
    let n = opts.files.max(1);
    (0..n)
        .map(|i| {
            let size = opts.min_size + (opts.max_size - opts.min_size) * i / (n - 1).max(1);
            let mut content = format!("%PDF-1.4 attachment {i}\n").into_bytes();
            content.resize(size, b'0' + (i % 10) as u8);
            store.add(
                "a",
                &format!("attachment-{i}.pdf"),
                "application/pdf",
                &content,
            )
        })
        .collect()
}

/// The downloads and the clicks through the proxy at `addr`; `usage` reads the proxy's
/// CPU seconds and resident KiB.
async fn measure(
    name: &'static str,
    addr: SocketAddr,
    worker: &SimWorker,
    files: &[Attachment],
    opts: &Opts,
    usage: &(dyn Fn() -> (f64, u64) + Sync),
) -> Phase {
    let busy0 = worker.busy_seconds();
    let (cpu0, _) = usage();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(opts.seconds);
    let tasks: Vec<_> = (0..opts.clients)
        .map(|i| {
            let a = &files[i % files.len()];
            let path = format!("/web/content/{}", a.id);
            let (size, rate) = (a.size, opts.rate);
            tokio::spawn(async move {
                load::slow_get(addr, "a.test", &path, size, rate, deadline).await
            })
        })
        .collect();
    // Memory while the downloads are under way, then the clicks beside them.
    let mut rss = 0;
    let clicks = {
        let b = Arc::new(Req::get(
            "a.test",
            "/web/dataset/call_kw/res.partner/read?sleep_ms=5&size=2048",
        ));
        let window = Duration::from_secs_f64(
            (opts.max_size as f64 / opts.rate as f64).min(opts.seconds as f64),
        );
        let sampler = async {
            while Instant::now() < start + window {
                rss = rss.max(usage().1);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        let (b, ()) = tokio::join!(load::open(addr, b, opts.b_rate, 64, window), sampler);
        b
    };
    let (mut complete, mut bytes) = (0, 0);
    for t in tasks {
        if let Ok((done, got)) = t.await {
            complete += usize::from(done);
            bytes += got;
        }
    }
    let (cpu1, _) = usage();
    Phase {
        name,
        downloads: opts.clients,
        complete,
        bytes,
        worker_seconds: worker.busy_seconds() - busy0,
        elapsed: start.elapsed().as_secs_f64(),
        cpu: cpu1 - cpu0,
        rss_kib: rss,
        b: clicks,
    }
}

pub async fn run(opts: &Opts) -> std::io::Result<Vec<Phase>> {
    let dir = proc::workdir()?;
    let odoo = Arc::new(Odoo::new(OdooVersion::V17, Some(&["a"])));
    let files = attachments(&odoo, &dir.path().join("odoo"), opts)?;
    let filestore = dir.path().join("odoo").join("filestore");
    let plain = server(&odoo, "odoo", false).await?;
    let sendfile = server(&odoo, "odoo-x-sendfile", true).await?;
    let mut phases = Vec::new();
    let ways = [
        ("clicks alone", Way::Buffer),
        ("worker streams", Way::Stream),
        ("response buffering", Way::Buffer),
        ("filestore offload", Way::Offload),
    ];
    for (i, (name, way)) in ways.into_iter().enumerate() {
        let worker = if way == Way::Offload {
            &sendfile
        } else {
            &plain
        };
        let phase_dir = dir.path().join(format!("phase{i}"));
        let spool = phase_dir.join("spool");
        std::fs::create_dir_all(&spool)?;
        let started = proc::start_portier(
            &opts.portier,
            &phase_dir,
            opts.proxy_cpus.as_deref(),
            Duration::from_secs(15),
            |port, admin| config(port, admin, worker.addr(), way, &spool, &filestore),
        )
        .await?;
        let proxy = started.proxy;
        let usage = || (proxy.cpu_seconds(), proc::status_kib(proxy.pid(), "VmRSS"));
        eprintln!("downloads: portier, {name}");
        let phase = if i == 0 {
            // The baseline: clicks with no download going on.
            let o = Opts {
                clients: 0,
                ..clone_opts(opts)
            };
            measure(name, started.http, worker, &files, &o, &usage).await
        } else {
            measure(name, started.http, worker, &files, opts, &usage).await
        };
        proxy.stop();
        tokio::time::sleep(Duration::from_secs(2)).await;
        phases.push(phase);
    }
    if opts.nginx {
        if proc::which("nginx") {
            let g = nginx(
                dir.path(),
                sendfile.addr(),
                &filestore,
                opts.proxy_cpus.as_deref(),
            )?;
            let addr: SocketAddr = ([127, 0, 0, 1], g.1).into();
            if proc::wait_ok(addr, "/web/health", Duration::from_secs(10)).await {
                eprintln!("downloads: nginx, X-Accel-Redirect to an internal location");
                let usage = || (g.0.tree_cpu_seconds(), g.0.tree_rss_kib());
                phases.push(
                    measure(
                        "nginx internal location",
                        addr,
                        &sendfile,
                        &files,
                        opts,
                        &usage,
                    )
                    .await,
                );
            }
            g.0.stop();
        } else {
            eprintln!("downloads: nginx is not installed (../shared/peers/install.sh): not run");
        }
    }
    Ok(phases)
}

fn clone_opts(o: &Opts) -> Opts {
    Opts {
        portier: o.portier.clone(),
        proxy_cpus: o.proxy_cpus.clone(),
        ..*o
    }
}

/// nginx in front of the `--x-sendfile` server, with Odoo's documented `internal`
/// location for the filestore, on a free port; one worker process, pinned as portier is.
fn nginx(
    dir: &Path,
    worker: SocketAddr,
    filestore: &Path,
    cpus: Option<&str>,
) -> std::io::Result<(peers::Group, u16)> {
    let port = proc::free_port();
    let d = dir.join("nginx");
    std::fs::create_dir_all(d.join("tmp"))?;
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  upstream odoo {{ server {worker}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    location /web/filestore/ {{ internal; alias {fs}/; }}
    location / {{
      proxy_pass http://odoo;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_read_timeout 600s;
    }}
  }}
}}
"#,
        d = d.display(),
        fs = filestore.display(),
    );
    std::fs::write(d.join("nginx.conf"), conf)?;
    let mut cmd = std::process::Command::new("nginx");
    cmd.arg("-p").arg(&d).arg("-c").arg(d.join("nginx.conf"));
    let g = peers::Group::spawn("nginx", cpus.unwrap_or("0-1"), &d.join("log"), &mut cmd)?;
    Ok((g, port))
}

pub fn table(phases: &[Phase]) -> String {
    let mut out = String::from(
        "| phase | downloads | complete | MiB/s | worker-s per download | click p50 ms | click p99 ms | click errors | proxy CPU ms per download | proxy CPU ns per byte | proxy peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in phases {
        let per = p.complete.max(1) as f64;
        let per_download = |v: f64, digits: usize| {
            if p.complete == 0 {
                "-".to_string()
            } else {
                format!("{v:.digits$}")
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {:.2} | {:.2} | {} | {} | {} | {:.1} |\n",
            p.name,
            p.downloads,
            p.complete,
            p.bytes as f64 / p.elapsed / (1 << 20) as f64,
            per_download(p.worker_seconds / per, 4),
            p.b.ms(0.5),
            p.b.ms(0.99),
            p.b.failures(),
            per_download(p.cpu * 1000.0 / per, 2),
            per_download(p.cpu * 1e9 / (p.bytes.max(1) as f64), 2),
            p.rss_kib as f64 / 1024.0,
        ));
    }
    out
}

pub fn json(phases: &[Phase], opts: &Opts) -> serde_json::Value {
    serde_json::json!({
        "scenario": "downloads",
        "clients": opts.clients,
        "min_size": opts.min_size,
        "max_size": opts.max_size,
        "rate": opts.rate,
        "b_rate": opts.b_rate,
        "phases": phases.iter().map(|p| serde_json::json!({
            "name": p.name,
            "downloads": p.downloads,
            "complete": p.complete,
            "bytes": p.bytes,
            "seconds": p.elapsed,
            "worker_seconds": p.worker_seconds,
            "proxy_cpu_seconds": p.cpu,
            "proxy_peak_rss_kib": p.rss_kib,
            "b": p.b.json(),
        })).collect::<Vec<_>>(),
    })
}
