//! Exhaustion (issue "Hardening"): a normal client's latency alone and while 2 000
//! connections trickle their request headers (slowloris; `header_timeout` answers them
//! 408), and portier's memory while 20 000 connections are opened and dropped in a
//! loop (RSS before, at the peak, and after).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::load::{self, Req, Stats};
use crate::proc;

pub struct Opts {
    pub portier: std::path::PathBuf,
    pub tricklers: usize,
    pub churn: usize,
    pub proxy_cpus: Option<String>,
}

pub struct Report {
    pub idle: Stats,
    pub under_slowloris: Stats,
    pub tricklers: usize,
    pub got_408: usize,
    pub churned: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_peak_kib: u64,
}

/// This process's descriptor limit (soft).
pub(crate) fn nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit on this process.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0 {
        l.rlim_cur
    } else {
        0
    }
}

/// Raises this process's descriptor limit (portier inherits it): to `want` when this
/// process may raise its hard limit (root; 0: do not try), else to its hard limit.
pub(crate) fn raise_nofile(want: u64) {
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let raised = libc::rlimit {
            rlim_cur: want as libc::rlim_t,
            rlim_max: want as libc::rlim_t,
        };
        if want > 0 && libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return;
        }
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

async fn trickle(addr: SocketAddr, until: Instant) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"GET /web/login HTTP/1.1\r\nHost: a.test\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => {
                return matches!(r, Ok(n) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 408"));
            }
            _ = tokio::time::sleep(Duration::from_millis(900)) => {
                if Instant::now() > until || s.write_all(b"X: y\r\n").await.is_err() {
                    return false;
                }
            }
        }
    }
}

pub async fn run(opts: &Opts) -> std::io::Result<Report> {
    raise_nofile(0);
    let dir = proc::workdir()?;
    let workers = proc::workers(1, None).await?;
    let up = workers[0].addr();
    let started = proc::start_portier(
        &opts.portier,
        dir.path(),
        opts.proxy_cpus.as_deref(),
        Duration::from_secs(15),
        |port, admin| {
            format!(
                "[listen]\nhttp = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\nthreads = 1\nheader_timeout = \"10s\"\n[log]\naccess = false\n[pools.odoo]\nhttp = [\"{up}\"]\n[tenants.a]\nhosts = [\"a.test\"]\npool = \"odoo\"\n"
            )
        },
    )
    .await?;
    let (proxy, addr) = (started.proxy, started.http);
    let req = Arc::new(Req::get("a.test", "/web/login"));
    eprintln!("exhaustion: a normal client alone");
    let idle = load::open(addr, req.clone(), 50.0, 8, Duration::from_secs(4)).await;

    eprintln!(
        "exhaustion: the same with {} trickling connections",
        opts.tricklers
    );
    let until = Instant::now() + Duration::from_secs(30);
    let mut tricklers = Vec::with_capacity(opts.tricklers);
    for _ in 0..opts.tricklers {
        tricklers.push(tokio::spawn(trickle(addr, until)));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let under = load::open(addr, req.clone(), 50.0, 8, Duration::from_secs(6)).await;
    let mut got_408 = 0;
    for t in tricklers {
        if t.await.unwrap_or(false) {
            got_408 += 1;
        }
    }

    eprintln!("exhaustion: {} connections opened and dropped", opts.churn);
    let pid = proxy.pid();
    let rss_before = proc::status_kib(pid, "VmRSS");
    let mut churned = 0;
    let mut peak = rss_before;
    let batch = 200;
    for _ in 0..opts.churn.div_ceil(batch) {
        let conns: Vec<_> = (0..batch)
            .map(|i| {
                tokio::spawn(async move {
                    let s = tokio::net::TcpStream::connect(addr).await.ok()?;
                    if i % 2 == 0 {
                        // Half send a partial header first.
                        let mut s = s;
                        s.write_all(b"GET / HTTP/1.1\r\n").await.ok()?;
                        Some(s)
                    } else {
                        Some(s)
                    }
                })
            })
            .collect();
        let mut held = Vec::new();
        for c in conns {
            if let Ok(Some(s)) = c.await {
                held.push(s);
                churned += 1;
            }
        }
        peak = peak.max(proc::status_kib(pid, "VmRSS"));
        drop(held);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = proc::status_kib(pid, "VmRSS");
    proxy.stop();
    Ok(Report {
        idle,
        under_slowloris: under,
        tricklers: opts.tricklers,
        got_408,
        churned,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_peak_kib: peak,
    })
}

pub fn table(r: &Report) -> String {
    format!(
        "| phase | req/s | p50 ms | p99 ms | max ms | errors |\n|---|---|---|---|---|---|\n| normal client alone | {:.1} | {:.2} | {:.2} | {:.2} | {} |\n| with {} trickling connections | {:.1} | {:.2} | {:.2} | {:.2} | {} |\n\ntricklers answered 408: {} of {}\n\n| connections opened and dropped | RSS before KiB | RSS peak KiB | RSS after KiB |\n|---|---|---|---|\n| {} | {} | {} | {} |\n",
        r.idle.rps(),
        r.idle.ms(0.5),
        r.idle.ms(0.99),
        r.idle.ms(1.0),
        r.idle.failures(),
        r.tricklers,
        r.under_slowloris.rps(),
        r.under_slowloris.ms(0.5),
        r.under_slowloris.ms(0.99),
        r.under_slowloris.ms(1.0),
        r.under_slowloris.failures(),
        r.got_408,
        r.tricklers,
        r.churned,
        r.rss_before_kib,
        r.rss_peak_kib,
        r.rss_after_kib,
    )
}

pub fn json(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "scenario": "exhaustion",
        "idle": r.idle.json(),
        "under_slowloris": r.under_slowloris.json(),
        "tricklers": r.tricklers,
        "got_408": r.got_408,
        "churned": r.churned,
        "rss_before_kib": r.rss_before_kib,
        "rss_peak_kib": r.rss_peak_kib,
        "rss_after_kib": r.rss_after_kib,
    })
}
