//! Automatic certificates, end to end (contract "ACME", `[tls.acme]`): a real portier
//! obtains certificates from a real ACME server (Let's Encrypt's `pebble`) that
//! validates them against portier's own listeners on 127.0.0.1.

use std::path::Path;
use std::time::{Duration, Instant};

use portier_tests::*;

#[path = "support/pebble.rs"]
mod support;

use support::Pebble;

struct Setup {
    ports: Ports,
    worker: SimWorker,
}

impl Setup {
    async fn new() -> Setup {
        Setup {
            ports: Ports::new(),
            worker: sim("w").await,
        }
    }

    /// portier with `[tls.acme]` on `pebble`, its certificates in `certs`.
    fn config(&self, pebble: &Pebble, certs: &Path, acme_extra: &str) -> String {
        let p = &self.ports;
        format!(
            "[listen]\nhttp = \"127.0.0.1:{}\"\nhttps = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\nthreads = 1\n\
             [tls]\ncerts = \"{}\"\nredirect_http = true\n\
             [tls.acme]\ndirectory = \"{}\"\nca = \"{}\"\nemail = \"ops@example.com\"\n{acme_extra}\n\
             [pools.p]\nhttp = [\"{}\"]\n\
             [tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n\
             [tenants.covered]\nhosts = [\"covered.test\"]\npool = \"p\"\n\
             [tenants.saas]\nhosts = [\"{{tenant}}.saas.test\"]\npool = \"p\"\n",
            p.http,
            p.https,
            p.admin,
            certs.display(),
            pebble.directory(),
            pebble.ca_file().display(),
            self.worker.addr()
        )
    }
}

/// Waits until `/status` says `host` is in `state`; returns its entry.
async fn wait_host(p: &Portier, host: &str, state: &str, within: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = status(p.admin).await;
        let entry = s["acme"]["hosts"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["host"] == host).cloned());
        if let Some(e) = entry.as_ref().filter(|e| e["state"] == state) {
            return e.clone();
        }
        assert!(
            start.elapsed() < within,
            "{host} never {state}: {s}\nstderr:\n{}",
            p.stderr().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn orders(p: &Portier, result: &str) -> u64 {
    let text = get(p.admin, "admin", "/metrics").await.unwrap().text();
    let line = format!("portier_acme_orders_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line} in metrics"))
}

/// The https listener presents a certificate for `host` that a client trusting only
/// pebble's root accepts; returns its DER.
async fn served(p: &Portier, pebble: &Pebble, https: u16, host: &str) -> Vec<u8> {
    let cfg = pebble.client().await;
    let s = tls_connect(local(https), host, cfg)
        .await
        .unwrap_or_else(|e| panic!("{host}: {e}\n{}", p.stderr().join("\n")));
    assert!(presented_names(&s).contains(&host.to_string()));
    presented_der(&s)
}

/// HTTP-01: an exact host without a pair gets a certificate that a client trusting
/// pebble's root accepts, written as `certs/HOST.crt` + `.key`; a host an operator's
/// pair covers and a template tenant's host get no order; `/status` and the metric say
/// so. A restart reuses the account and the certificate (no new order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_certificate_for_an_exact_host_and_a_restart_reuses_it() {
    let setup = Setup::new().await;
    let pebble = Pebble::start(setup.ports.http, setup.ports.https, None).await;
    let certs = tempfile::tempdir().unwrap();
    let operator = TestPki::new();
    operator.write_pair(certs.path(), "covered", &["covered.test"], 30);
    let operator_crt = std::fs::read(certs.path().join("covered.crt")).unwrap();
    let cfg = setup.config(&pebble, certs.path(), "challenge = \"http-01\"");
    let p = Portier::start(&setup.ports, &cfg).await;

    let entry = wait_host(&p, "acme.test", "valid", Duration::from_secs(60)).await;
    assert!(
        entry["not_after"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{entry}"
    );
    assert_eq!(entry["last_error"], serde_json::Value::Null);
    let der = served(&p, &pebble, setup.ports.https, "acme.test").await;
    assert!(certs.path().join("acme.test.crt").is_file());
    assert!(certs.path().join("acme.test.key").is_file());
    let account = std::fs::read(certs.path().join("acme/account.json")).unwrap();
    assert_eq!(orders(&p, "ok").await, 1);
    assert_eq!(orders(&p, "error").await, 0);
    let s = status(p.admin).await;
    let hosts: Vec<&str> = s["acme"]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["host"].as_str())
        .collect();
    assert_eq!(hosts, ["acme.test"], "only hosts no pair covers: {s}");
    assert_eq!(
        std::fs::read(certs.path().join("covered.crt")).unwrap(),
        operator_crt
    );
    let log = p.stderr().join("\n");
    assert!(
        log.contains("acme: ordering a certificate") && log.contains("acme: certificate issued")
    );
    // The certificate's expiry is exported like any pair's.
    let metrics = get(p.admin, "admin", "/metrics").await.unwrap().text();
    assert!(metrics.contains("portier_cert_expiry_seconds{name=\"acme.test\"}"));
    // The worker is reached through it.
    let stream = tls_connect(local(setup.ports.https), "acme.test", pebble.client().await)
        .await
        .unwrap();
    assert_eq!(
        h1_over(stream, "acme.test", "/web/login")
            .await
            .unwrap()
            .status,
        200
    );

    // HTTP-01 answers come before the redirect (acme.test is covered now) and before
    // the tenant lookup (any host); tokens ACME did not publish go on to the tenant.
    std::fs::write(
        certs.path().join("acme/http-01/tok_EN-1"),
        "tok_EN-1.thumbprint",
    )
    .unwrap();
    for host in ["acme.test", "nobody.example"] {
        let r = get(p.http, host, "/.well-known/acme-challenge/tok_EN-1")
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.text()),
            (200, "tok_EN-1.thumbprint".to_string()),
            "{host}"
        );
    }
    let r = get(p.http, "acme.test", "/web/login").await.unwrap();
    assert_eq!(r.status, 308, "redirect_http for the covered host");
    let r = get(p.http, "acme.test", "/.well-known/acme-challenge/other")
        .await
        .unwrap();
    assert_eq!(
        r.worker(),
        Some("w"),
        "an unknown token reaches the tenant's worker"
    );
    let r = get(
        p.http,
        "nobody.example",
        "/.well-known/acme-challenge/other",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404);

    // Restart: the same account, the same certificate, no order.
    drop(p);
    let p = Portier::start(&setup.ports, &cfg).await;
    wait_host(&p, "acme.test", "valid", Duration::from_secs(10)).await;
    assert_eq!(
        served(&p, &pebble, setup.ports.https, "acme.test").await,
        der
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(orders(&p, "ok").await, 0);
    assert_eq!(
        std::fs::read(certs.path().join("acme/account.json")).unwrap(),
        account
    );
}

/// TLS-ALPN-01, with certificates shorter-lived than `renew_before` allows to keep:
/// issued, then renewed (a new certificate served) without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_certificate_and_its_renewal() {
    let setup = Setup::new().await;
    let pebble = Pebble::start(setup.ports.http, setup.ports.https, Some(30)).await;
    let certs = tempfile::tempdir().unwrap();
    let cfg = setup.config(
        &pebble,
        certs.path(),
        "challenge = \"tls-alpn-01\"\nrenew_before = \"20s\"",
    );
    let p = Portier::start(&setup.ports, &cfg).await;
    wait_host(&p, "acme.test", "valid", Duration::from_secs(60)).await;
    let first = served(&p, &pebble, setup.ports.https, "acme.test").await;
    // Valid 30 s, renewed when less than 20 s are left: about 10 s later.
    let renewed = eventually(Duration::from_secs(40), || {
        std::fs::read(certs.path().join("acme.test.crt"))
            .map(|pem| !pem.is_empty())
            .unwrap_or(false)
            && p.stderr()
                .iter()
                .filter(|l| l.contains("acme: certificate issued"))
                .count()
                >= 2
    })
    .await;
    assert!(renewed, "{}", p.stderr().join("\n"));
    let second = eventually_served_differs(&p, &pebble, setup.ports.https, &first).await;
    assert_ne!(first, second);
    assert!(orders(&p, "ok").await >= 2);
    assert_eq!(orders(&p, "error").await, 0);
}

async fn eventually_served_differs(
    p: &Portier,
    pebble: &Pebble,
    https: u16,
    old: &[u8],
) -> Vec<u8> {
    let start = Instant::now();
    loop {
        let der = served(p, pebble, https, "acme.test").await;
        if der != old || start.elapsed() > Duration::from_secs(10) {
            return der;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The directory unreachable: the order fails, `/status` says `failed` with the
/// error, retries back off (1, 2, 4 s with a base of 1 s), and once pebble is up the
/// certificate is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_directory_is_retried_with_backoff_until_it_answers() {
    let setup = Setup::new().await;
    let mut pebble = Pebble::start(setup.ports.http, setup.ports.https, None).await;
    pebble.stop();
    let certs = tempfile::tempdir().unwrap();
    let cfg = setup.config(&pebble, certs.path(), "");
    let p = Portier::start_with(&setup.ports, &cfg, &[("PORTIER_ACME_RETRY_SECONDS", "1")]).await;
    let entry = wait_host(&p, "acme.test", "failed", Duration::from_secs(20)).await;
    assert!(
        entry["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{entry}"
    );
    let waited = eventually(Duration::from_secs(15), || {
        p.stderr()
            .iter()
            .filter(|l| l.contains("acme: order failed") && l.contains("\"acme.test\""))
            .count()
            >= 3
    })
    .await;
    assert!(waited, "{}", p.stderr().join("\n"));
    let retries: Vec<String> = p
        .stderr()
        .iter()
        .filter(|l| l.contains("acme: order failed") && l.contains("\"acme.test\""))
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["retry_in"].as_str().map(str::to_string))
        })
        .collect();
    assert_eq!(&retries[..3], ["1s", "2s", "4s"], "{retries:?}");
    assert!(orders(&p, "error").await >= 3);
    // Meanwhile, without a `default`, the handshake fails as it would without ACME.
    let meanwhile = tls_connect(
        local(setup.ports.https),
        "acme.test",
        pebble
            .pki
            .client(&[b"http/1.1"], &[&rustls::version::TLS13]),
    )
    .await;
    assert!(
        meanwhile.is_err(),
        "a handshake succeeded without a certificate"
    );
    // `check` validates [tls.acme] without reaching the directory.
    let (code, out, err) = run_cli(&["check", "-c", p.config_path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");

    pebble.restart().await;
    wait_host(&p, "acme.test", "valid", Duration::from_secs(40)).await;
    served(&p, &pebble, setup.ports.https, "acme.test").await;
}

/// Two replicas sharing one certificate directory: one order in all, both serve the
/// certificate (pebble validates on the first replica's ports; the challenge is a file
/// in the shared directory, whichever replica published it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_the_directory_order_once() {
    let setup = Setup::new().await;
    let pebble = Pebble::start(setup.ports.http, setup.ports.https, None).await;
    let certs = tempfile::tempdir().unwrap();
    let other = Setup::new().await;
    let cfg_a = setup.config(&pebble, certs.path(), "");
    let cfg_b = other.config(&pebble, certs.path(), "");
    let (a, b) = tokio::join!(
        Portier::start(&setup.ports, &cfg_a),
        Portier::start(&other.ports, &cfg_b)
    );
    wait_host(&a, "acme.test", "valid", Duration::from_secs(60)).await;
    wait_host(&b, "acme.test", "valid", Duration::from_secs(30)).await;
    let da = served(&a, &pebble, setup.ports.https, "acme.test").await;
    let db = served(&b, &pebble, other.ports.https, "acme.test").await;
    assert_eq!(da, db, "both serve the one certificate");
    // One order per host across both (acme.test, and covered.test: no pair here).
    let issued = |p: &Portier| {
        p.stderr()
            .iter()
            .filter(|l| l.contains("acme: certificate issued") && l.contains("\"acme.test\""))
            .count()
    };
    assert_eq!(issued(&a) + issued(&b), 1, "acme.test ordered once");
    assert_eq!(orders(&a, "ok").await + orders(&b, "ok").await, 2);
}

/// `on_demand`: a template tenant's host gets a certificate ordered at its first
/// handshake, which is answered with the `default` certificate; later handshakes get
/// the new one. A host no tenant matches gets no order; beyond `on_demand_rate` new
/// hosts get none either (until the rate allows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_certificates_for_template_hosts_within_the_rate() {
    let setup = Setup::new().await;
    let pebble = Pebble::start(setup.ports.http, setup.ports.https, None).await;
    let certs = tempfile::tempdir().unwrap();
    let operator = TestPki::new();
    operator.write_pair(certs.path(), "default", &["default.test"], 30);
    operator.write_pair(certs.path(), "covered", &["covered.test"], 30);
    let cfg = setup
        .config(
            &pebble,
            certs.path(),
            "on_demand = true\non_demand_rate = \"2/min\"",
        )
        .replace("[tls.acme]", "default = \"default\"\n[tls.acme]");
    let p = Portier::start(&setup.ports, &cfg).await;
    wait_host(&p, "acme.test", "valid", Duration::from_secs(60)).await;

    // A client trusting the operator's CA (which issued `default`) checks the name, so
    // the default certificate shows as a name mismatch naming default.test.
    let operator_client = operator.client(&[b"http/1.1"], &[&rustls::version::TLS13]);
    let presented = |host: &'static str| {
        let cfg = operator_client.clone();
        async move {
            match tls_connect(local(setup.ports.https), host, cfg).await {
                Ok(s) => presented_names(&s).join(","),
                Err(e) => e,
            }
        }
    };
    let first = presented("one.saas.test").await;
    assert!(
        first.contains("default.test"),
        "the first handshake gets the default: {first}"
    );
    wait_host(&p, "one.saas.test", "valid", Duration::from_secs(60)).await;
    served(&p, &pebble, setup.ports.https, "one.saas.test").await;

    // No tenant matches: the default, and no order.
    let stranger = presented("stranger.example").await;
    assert!(stranger.contains("default.test"), "{stranger}");
    // The rate (2 a minute) allows one more new host now, not two.
    for h in ["two.saas.test", "three.saas.test"] {
        presented(h).await;
    }
    wait_host(&p, "two.saas.test", "valid", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status(p.admin).await;
    let hosts: Vec<&str> = s["acme"]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["host"].as_str())
        .collect();
    assert_eq!(
        hosts,
        ["acme.test", "one.saas.test", "two.saas.test"],
        "{s}"
    );
    assert!(p
        .stderr()
        .iter()
        .any(|l| l.contains("on_demand_rate spent") && l.contains("three.saas.test")));
    assert!(!certs.path().join("stranger.example.crt").exists());

    // After a restart, the on-demand certificates are served and kept (renewed).
    drop(p);
    let p = Portier::start(&setup.ports, &cfg).await;
    wait_host(&p, "one.saas.test", "valid", Duration::from_secs(10)).await;
    served(&p, &pebble, setup.ports.https, "one.saas.test").await;
}
