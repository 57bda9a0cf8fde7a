//! Cluster mode, end to end (contract "Cluster", `[cluster]`): two real portier
//! processes share their tenants' rate limits and login budgets through a real
//! `redis-server` on 127.0.0.1, fall back to local shares when it goes, and come back
//! when it returns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use portier_tests::*;

#[path = "support/redis.rs"]
mod support;

use support::Redis;

const RPC: &[u8] = br#"{"jsonrpc":"2.0","method":"call","params":{},"id":1}"#;

/// Two tenants with the same integration limit (`acme` also as its interactive limit),
/// a third (`slow`) with only a concurrency limit of 1, and `[cluster]` on `redis` (URL,
/// key prefix) if given; no `admin_cidrs` (the default, loopback, would exempt the tests'
/// login attempts).
fn config(ports: &Ports, worker: SocketAddr, limit: &str, redis: Option<(&str, &str)>) -> String {
    let cluster = redis
        .map(|(url, prefix)| {
            format!("[cluster]\nredis = \"{url}\"\nkey_prefix = \"{prefix}\"\ntimeout = \"50ms\"\n")
        })
        .unwrap_or_default();
    format!(
        "{}\n{cluster}[defaults]\nadmin_cidrs = []\n[pools.p]\nhttp = [\"{worker}\"]\n\
         [tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\nintegration = {limit}\ninteractive = {limit}\n\
         [tenants.other]\nhosts = [\"other.test\"]\npool = \"p\"\nintegration = {limit}\n\
         [tenants.slow]\nhosts = [\"slow.test\"]\npool = \"p\"\nintegration = {{ concurrency = 1 }}\n",
        ports.listen()
    )
}

async fn replicas(redis_url: &str, limit: &str, prefix: &str) -> (Portier, Portier, SimWorker) {
    replicas_with(redis_url, limit, prefix, &[]).await
}

/// Two replicas on one Redis, each started with `env`; waits until both see each other.
async fn replicas_with(
    redis_url: &str,
    limit: &str,
    prefix: &str,
    env: &[(&str, &str)],
) -> (Portier, Portier, SimWorker) {
    let w = sim("w").await;
    let (pa, pb) = (Ports::new(), Ports::new());
    let cluster = Some((redis_url, prefix));
    let a = Portier::start_with(&pa, &config(&pa, w.addr(), limit, cluster), env).await;
    let b = Portier::start_with(&pb, &config(&pb, w.addr(), limit, cluster), env).await;
    for p in [&a, &b] {
        wait_status(p, Duration::from_secs(10), |s| {
            s["cluster"]["redis"] == "up" && s["cluster"]["replicas"] == 2
        })
        .await;
    }
    (a, b, w)
}

async fn wait_status(
    p: &Portier,
    within: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let s = status(p.admin).await;
        if pred(&s) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "status never matched; last: {s}\nstderr:\n{}",
            p.stderr().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    limited: AtomicU64,
    /// Anything but 200 and 429: a failed request.
    failed: AtomicU64,
    /// The slowest answer (ms).
    slowest_ms: AtomicU64,
}

/// JSON-RPC of the web client (interactive) and of an integration.
const INTERACTIVE: &str = "/web/dataset/call_kw/res.partner/read";
const INTEGRATION: &str = "/jsonrpc";

/// Keep-alive clients per replica in a flood: enough that the flood offers well over
/// the rate even when answers are slow (a flood that offers too little admits less
/// than the limit and makes the test measure the clients, not portier).
const CLIENTS_PER_REPLICA: usize = 8;

/// POSTs to `host` `path` through every replica in `targets` (`CLIENTS_PER_REPLICA`
/// keep-alive clients each) for `secs`; returns the tally and the time it took.
async fn flood(
    targets: &[SocketAddr],
    host: &'static str,
    path: &'static str,
    secs: f64,
) -> (Arc<Tally>, Duration) {
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for &addr in targets {
        for _ in 0..CLIENTS_PER_REPLICA {
            let tally = tally.clone();
            tasks.push(tokio::spawn(async move {
                let mut conn = connect(addr).await;
                while Instant::now() < until {
                    let sent = Instant::now();
                    let r = send(
                        &mut conn,
                        "POST",
                        host,
                        path,
                        &[("content-type", "application/json")],
                        Bytes::from_static(RPC),
                    )
                    .await;
                    let took = sent.elapsed().as_millis() as u64;
                    tally.slowest_ms.fetch_max(took, Ordering::Relaxed);
                    match r.map(|r| r.status) {
                        Ok(200) => tally.ok.fetch_add(1, Ordering::Relaxed),
                        Ok(429) => tally.limited.fetch_add(1, Ordering::Relaxed),
                        _ => {
                            conn = connect(addr).await;
                            tally.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("client task");
    }
    (tally, start.elapsed())
}

/// What a limit of `rate`/s and `burst` admits in `elapsed`, and the admitted count
/// within 10 % of it.
fn assert_within_10pct(admitted: u64, rate: f64, burst: f64, elapsed: Duration, what: &str) {
    let expected = burst + rate * elapsed.as_secs_f64();
    let ratio = admitted as f64 / expected;
    eprintln!("{what}: admitted {admitted} of {expected:.0} allowed in {elapsed:?} ({ratio:.3}x)");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: admitted {admitted}, the limit allows {expected:.0} ({ratio:.2}x)"
    );
}

/// Floods `host` through `targets` for `secs`: no request fails, the flood is
/// refused often enough to test the limit, and the admitted count is within 10 % of
/// what `rate`/s and `burst` allow.
async fn flood_within_limit(
    targets: &[SocketAddr],
    host: &'static str,
    path: &'static str,
    secs: f64,
    rate: f64,
    burst: f64,
    what: &str,
) -> Arc<Tally> {
    let (t, elapsed) = flood(targets, host, path, secs).await;
    assert_eq!(
        t.failed.load(Ordering::Relaxed),
        0,
        "{what}: failed requests"
    );
    assert!(
        t.limited.load(Ordering::Relaxed) > 50,
        "{what}: the flood was too small"
    );
    let what = format!(
        "{what} ({} refused, slowest answer {} ms)",
        t.limited.load(Ordering::Relaxed),
        t.slowest_ms.load(Ordering::Relaxed)
    );
    assert_within_10pct(t.ok.load(Ordering::Relaxed), rate, burst, elapsed, &what);
    t
}

/// The tests of this file measure admitted rates with floods of two replicas each;
/// run side by side on a small machine they starve each other (slow answers, Redis
/// calls past `timeout`), so each holds this for its whole run.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn metric(p: &Portier, name: &str) -> Option<String> {
    let text = get(p.admin, "admin", "/metrics").await.ok()?.text();
    text.lines()
        .find(|l| l.starts_with(name))
        .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
}

/// Two replicas together admit the configured rate (within 10 %), not twice it; one
/// tenant's budget is shared, another tenant's is its own. A rate of 20/s takes one
/// token per Redis call; 200/s takes leases of 10. Login budgets are shared too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_each_tenants_rate() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = Redis::start().await;
    let (a, b, w) = replicas(&redis.url(), "{ rate = \"20/s\", burst = 5 }", "t1:").await;
    assert_eq!(
        metric(&a, "portier_cluster_redis_up").await.as_deref(),
        Some("1")
    );
    let both = [a.http, b.http];
    let (acme, other, clicks) = tokio::join!(
        flood_within_limit(&both, "acme.test", INTEGRATION, 3.0, 20.0, 5.0, "acme"),
        flood_within_limit(&both, "other.test", INTEGRATION, 3.0, 20.0, 5.0, "other"),
        flood_within_limit(
            &both,
            "acme.test",
            INTERACTIVE,
            3.0,
            20.0,
            5.0,
            "acme interactive"
        )
    );
    assert_eq!(
        w.hits(),
        [acme, other, clicks]
            .iter()
            .map(|t| t.ok.load(Ordering::Relaxed))
            .sum::<u64>(),
        "a refused request reached the worker"
    );

    // Concurrency stays per replica: one slow call at a time on each, so two at once
    // across two replicas, and a second one on the same replica is refused.
    let slow = |p: SocketAddr| async move {
        let r = request(
            p,
            "POST",
            "slow.test",
            "/jsonrpc?sleep_ms=600",
            &[],
            Bytes::from_static(RPC),
        );
        r.await.map(|r| r.status).unwrap_or(0)
    };
    let (sa, sb, sa2) = tokio::join!(slow(a.http), slow(b.http), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        slow(a.http).await
    });
    assert_eq!((sa, sb, sa2), (200, 200, 429), "per-replica concurrency");
    drop((a, b));

    // A rate high enough for leases of several tokens.
    let limit2 = "{ rate = \"200/s\", burst = 20 }";
    let (a, b, w2) = replicas(&redis.url(), limit2, "t2:").await;
    let calls0 = redis.script_calls();
    let t = flood_within_limit(
        &[a.http, b.http],
        "acme.test",
        INTEGRATION,
        2.0,
        200.0,
        20.0,
        "leased",
    )
    .await;
    // Most requests do not reach Redis: leases of 10 tokens, refusals answered from the
    // lease state until 10 tokens are due again.
    let calls = redis.script_calls() - calls0;
    let (ok, refused) = (
        t.ok.load(Ordering::Relaxed),
        t.limited.load(Ordering::Relaxed),
    );
    eprintln!("leased: {calls} Redis calls for {ok} admitted and {refused} refused");
    assert!(calls * 3 < ok, "{calls} Redis calls for {ok} admitted");
    assert!(
        calls * 10 < ok + refused,
        "{calls} Redis calls for {} requests",
        ok + refused
    );

    // Login attempts from one address: the default budget (burst 5) across both.
    let mut passed = 0;
    for i in 0..10 {
        let p = if i % 2 == 0 { &a } else { &b };
        let r = request(
            p.http,
            "POST",
            "acme.test",
            "/web/login",
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from_static(b"login=admin&password=guess"),
        )
        .await
        .unwrap();
        match r.status {
            429 => assert_eq!(r.json()["error"], "login_limited"),
            _ => passed += 1,
        }
    }
    assert_eq!(passed, 5, "login attempts admitted across two replicas");

    // A replica with another key_prefix is another cluster: not counted.
    let px = Ports::new();
    let cfg = config(&px, w2.addr(), limit2, Some((&redis.url(), "elsewhere:")));
    let x = Portier::start(&px, &cfg).await;
    wait_status(&x, Duration::from_secs(5), |s| {
        s["cluster"]["replicas"] == 1
    })
    .await;
    assert_eq!(status(a.admin).await["cluster"]["replicas"], 2);
    drop(x);

    // A third replica is counted; stopped (SIGTERM), it takes its announcement back at
    // once instead of being counted until it lapses (10 s).
    let pc = Ports::new();
    let cfg = config(&pc, w2.addr(), limit2, Some((&redis.url(), "t2:")));
    let mut c = Portier::start(&pc, &cfg).await;
    wait_status(&a, Duration::from_secs(5), |s| {
        s["cluster"]["replicas"] == 3
    })
    .await;
    c.signal("TERM");
    assert!(
        c.wait_exit(Duration::from_secs(10)).is_some(),
        "the third replica did not exit"
    );
    let took = wait_status(&a, Duration::from_secs(8), |s| {
        s["cluster"]["replicas"] == 2
    })
    .await;
    assert!(
        took < Duration::from_secs(4),
        "counted {took:?} after it left"
    );
}

/// Redis too slow (`DEBUG SLEEP` blocks it for 2 s) mid-flood: no request waits on it
/// (none takes a second) or fails, the replicas say "down", and take Redis back when
/// it answers again. Redis killed mid-flood: no request fails, both replicas switch to
/// local limits at half the rate each within `timeout` + a second, say so in `/status`
/// and the metric, log it once, and together still admit about the configured rate.
/// Redis restarted: shared limits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_means_local_shares_and_no_failed_request() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut redis = Redis::start().await;
    let (a, b, _w) = replicas(&redis.url(), "{ rate = \"20/s\", burst = 4 }", "t3:").await;
    let both = [a.http, b.http];

    let flooding = tokio::spawn(async move { flood(&both, "other.test", INTEGRATION, 3.0).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sleeping = redis.debug_sleep(2.0);
    wait_status(&a, Duration::from_secs(2), |s| {
        s["cluster"]["redis"] == "down"
    })
    .await;
    let (t, _) = flooding.await.unwrap();
    assert_eq!(
        t.failed.load(Ordering::Relaxed),
        0,
        "a request failed while Redis slept"
    );
    let slowest = t.slowest_ms.load(Ordering::Relaxed);
    assert!(
        slowest < 1000,
        "a request waited {slowest} ms on a sleeping Redis"
    );
    sleeping.join().expect("DEBUG SLEEP answered");
    for p in [&a, &b] {
        wait_status(p, Duration::from_secs(5), |s| s["cluster"]["redis"] == "up").await;
    }

    let flooding = tokio::spawn(async move { flood(&both, "acme.test", INTEGRATION, 4.0).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    redis.stop();
    let took = wait_status(&a, Duration::from_secs(5), |s| {
        s["cluster"]["redis"] == "down"
    })
    .await;
    assert!(
        took <= Duration::from_millis(1050) + Duration::from_millis(300),
        "{took:?}"
    );
    wait_status(&b, Duration::from_secs(5), |s| {
        s["cluster"]["redis"] == "down"
    })
    .await;
    let (t, _) = flooding.await.unwrap();
    assert_eq!(
        t.failed.load(Ordering::Relaxed),
        0,
        "a request failed while Redis went"
    );
    for p in [&a, &b] {
        assert_eq!(
            metric(p, "portier_cluster_redis_up").await.as_deref(),
            Some("0")
        );
        let said: Vec<String> = p
            .stderr()
            .into_iter()
            .filter(|l| l.contains("Redis unavailable"))
            .collect();
        // Once for the sleep, once for the kill: one line per outage, not per request.
        assert_eq!(said.len(), 2, "logged once per outage: {said:?}");
        assert!(
            said[0].contains("replicas=2") || said[0].contains("\"replicas\":2"),
            "{said:?}"
        );
    }
    // Local shares: 10/s and a burst of 2 each, so about the configured rate together.
    flood_within_limit(
        &both,
        "acme.test",
        INTEGRATION,
        2.0,
        20.0,
        4.0,
        "local shares",
    )
    .await;

    redis.restart().await;
    for p in [&a, &b] {
        wait_status(p, Duration::from_secs(5), |s| s["cluster"]["redis"] == "up").await;
        assert_eq!(
            metric(p, "portier_cluster_redis_up").await.as_deref(),
            Some("1")
        );
        assert!(p.stderr().iter().any(|l| l.contains("Redis reached")));
    }
    flood_within_limit(
        &both,
        "other.test",
        INTEGRATION,
        2.0,
        20.0,
        4.0,
        "shared again",
    )
    .await;
}

/// `rediss://`: the same sharing over TLS (rustls), the server's certificate checked
/// against the roots in `SSL_CERT_FILE` (here the test CA; by default the system's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_through_redis_over_tls() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let pki = TestPki::new();
    let redis = Redis::start_tls(&pki).await;
    assert!(redis.url().starts_with("rediss://"));
    let ca = tempfile::tempdir().unwrap();
    let ca_file = ca.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let env = [("SSL_CERT_FILE", ca_file.to_str().unwrap())];
    let limit = "{ rate = \"20/s\", burst = 5 }";
    let (a, b, _w) = replicas_with(&redis.url(), limit, "t5:", &env).await;
    flood_within_limit(
        &[a.http, b.http],
        "acme.test",
        INTEGRATION,
        2.0,
        20.0,
        5.0,
        "over TLS",
    )
    .await;

    // A replica that does not trust the server's certificate does not share: down.
    let w = sim("w").await;
    let ports = Ports::new();
    let cfg = config(&ports, w.addr(), limit, Some((&redis.url(), "t5:")));
    let untrusting = Portier::start(&ports, &cfg).await;
    let said = eventually(Duration::from_secs(5), || {
        untrusting
            .stderr()
            .iter()
            .any(|l| l.contains("Redis unavailable"))
    })
    .await;
    assert!(said, "{}", untrusting.stderr().join("\n"));
    let s = status(untrusting.admin).await;
    assert_eq!(s["cluster"]["redis"], "down", "{s}");
}

/// A "Redis" that accepts connections and never answers is down, not waited on: every
/// request is answered at once under the local limit; `check` accepts the file without
/// reaching Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_never_answers_is_down_not_waited_on() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = mute.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        // Accept and hold every connection, reading nothing and writing nothing.
        let mut conns = Vec::new();
        for c in mute.incoming().take(64) {
            match c {
                Ok(c) => conns.push(c),
                Err(_) => break,
            }
        }
        conns
    });
    let w = sim("w").await;
    let ports = Ports::new();
    let url = format!("redis://127.0.0.1:{port}/0");
    let limit = "{ rate = \"5/s\", burst = 3 }";
    let cfg = config(&ports, w.addr(), limit, Some((&url, "t4:")));
    let p = Portier::start(&ports, &cfg).await;
    wait_status(&p, Duration::from_secs(5), |s| {
        s["cluster"]["redis"] == "down"
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let start = Instant::now();
        let r = request(
            p.http,
            "POST",
            "acme.test",
            "/jsonrpc",
            &[("content-type", "application/json")],
            Bytes::from_static(RPC),
        )
        .await
        .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "waited {:?}",
            start.elapsed()
        );
        statuses.push(r.status);
    }
    // One replica seen (none announced): the whole burst locally, then refusals.
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        metric(&p, "portier_cluster_redis_up").await.as_deref(),
        Some("0")
    );
    let said = eventually(Duration::from_secs(3), || {
        p.stderr().iter().any(|l| l.contains("Redis unavailable"))
    })
    .await;
    assert!(said, "{}", p.stderr().join("\n"));

    let (code, out, err) = run_cli(&["check", "-c", p.config_path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");

    // A reload that removes [cluster]: limits per replica, no cluster in /status.
    let cfg = config(&ports, w.addr(), limit, None);
    std::fs::write(p.config_path(), cfg).unwrap();
    let r = request(p.admin, "POST", "admin", "/reload", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let s = status(p.admin).await;
    assert!(s.get("cluster").is_none(), "{s}");
    drop(p);
    drop(held);
}
