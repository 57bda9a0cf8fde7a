//! The Odoo edge, end to end (contract, "Maintenance", "Login protection", "Assets,
//! compression, cookies"): real portier in front of a simulated Odoo 17 server.
//!
//! Clients are told apart by `X-Forwarded-For`: the tests' connections come from
//! 127.0.0.1, which is a trusted proxy here, so the right-most untrusted address is
//! the client; `admin_cidrs` is 10.9.0.0/16.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use portier_sim::{Odoo, OdooVersion, Server, SimConfig};
use portier_tests::*;

const DATABASES: &[&str] = &["acme", "beta", "gamma"];
const ADMIN: &str = "10.9.0.1";

struct Edge {
    p: Portier,
    http: SimWorker,
    _gevent: SimWorker,
    https: SocketAddr,
    pki: TestPki,
    _certs: tempfile::TempDir,
    ports: Ports,
}

fn edge_config(
    ports: &Ports,
    http: &SimWorker,
    gevent: &SimWorker,
    certs: &std::path::Path,
    tenants: &str,
) -> String {
    format!(
        r#"{listen}https = "127.0.0.1:{https}"
[tls]
certs = "{certs}"
redirect_http = false
[defaults]
trusted_proxies = ["127.0.0.0/8"]
admin_cidrs = ["10.9.0.0/16"]
[pools.main]
http = ["{h}"]
longpolling = ["{g}"]
{tenants}
"#,
        listen = ports.listen(),
        https = ports.https,
        certs = certs.display(),
        h = http.addr(),
        g = gevent.addr(),
    )
}

fn tenant(name: &str, extra: &str) -> String {
    format!("[tenants.{name}]\nhosts = [\"{name}.test\"]\npool = \"main\"\ndatabase = \"{name}\"\n{extra}\n")
}

async fn edge(tenants: &str) -> Edge {
    let odoo = Arc::new(Odoo::new(OdooVersion::V17, Some(DATABASES)));
    let http = SimWorker::start_with("h0", local(0), SimConfig::new(Server::Http, odoo.clone()))
        .await
        .unwrap();
    let gevent = SimWorker::start_with("g0", local(0), SimConfig::new(Server::Gevent, odoo))
        .await
        .unwrap();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = DATABASES.iter().map(|d| format!("{d}.test")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    pki.write_pair(dir.path(), "tenants", &names, 90);
    let ports = Ports::new();
    let cfg = edge_config(&ports, &http, &gevent, dir.path(), tenants);
    let p = Portier::start(&ports, &cfg).await;
    Edge {
        https: local(ports.https),
        p,
        http,
        _gevent: gevent,
        pki,
        _certs: dir,
        ports,
    }
}

impl Edge {
    async fn reload_with(&self, tenants: &str) {
        let cfg = edge_config(
            &self.ports,
            &self.http,
            &self._gevent,
            self._certs.path(),
            tenants,
        );
        std::fs::write(self.p.config_path(), cfg).unwrap();
        let r = request(self.p.admin, "POST", "admin", "/reload", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Requests the worker saw for `path`.
    fn seen(&self, path: &str) -> usize {
        self.http
            .requests()
            .iter()
            .filter(|r| r.target.split('?').next() == Some(path))
            .count()
    }

    async fn get_from(&self, client: &str, host: &str, path: &str) -> Resp {
        get_with(self.p.http, host, path, &[("x-forwarded-for", client)])
            .await
            .unwrap()
    }

    async fn post_from(&self, client: &str, host: &str, path: &str, body: &str) -> Resp {
        request(
            self.p.http,
            "POST",
            host,
            path,
            &[
                ("x-forwarded-for", client),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            Bytes::from(body.to_string()),
        )
        .await
        .unwrap()
    }

    async fn metrics(&self) -> String {
        get(self.p.admin, "admin", "/metrics").await.unwrap().text()
    }
}

/// A tenant in maintenance: everyone outside `admin_cidrs` gets 503 + `Retry-After: 60`
/// + the maintenance page and the worker sees nothing; `/web/health` and admins still
/// reach it; `/status` lists it; a reload turns it on and off; other tenants go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_answers_everyone_but_admins_and_health() {
    let e = edge(&format!(
        "{}{}",
        tenant("acme", ""),
        tenant("beta", "maintenance = true")
    ))
    .await;
    let before = e.http.hits();
    for path in [
        "/web",
        "/web/login",
        "/jsonrpc",
        "/web/assets/app.js",
        "/websocket",
    ] {
        let r = e.get_from("203.0.113.5", "beta.test", path).await;
        assert_eq!(r.status, 503, "{path}: {}", r.text());
        assert_eq!(r.header("retry-after"), Some("60"), "{path}");
        assert!(
            r.text().contains("Down for maintenance"),
            "{path}: {}",
            r.text()
        );
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
    }
    assert_eq!(
        e.http.hits(),
        before,
        "no request of a tenant in maintenance reached the worker"
    );
    let log =
        e.p.wait_access_log(|l| l["tenant"] == "beta" && l["status"] == 503)
            .await;
    assert_eq!(log["refused"], "maintenance");

    // Odoo's health route and an admin still reach the worker.
    let r = e.get_from("203.0.113.5", "beta.test", "/web/health").await;
    assert_eq!((r.status, r.worker()), (200, Some("h0")), "{}", r.text());
    let r = e.get_from(ADMIN, "beta.test", "/web/login").await;
    assert_eq!((r.status, r.worker()), (200, Some("h0")), "{}", r.text());
    // Another tenant is untouched.
    let r = e.get_from("203.0.113.5", "acme.test", "/web/login").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        status(e.p.admin).await["maintenance"],
        serde_json::json!(["beta"])
    );

    // A reload ends beta's maintenance and starts acme's.
    e.reload_with(&format!(
        "{}{}",
        tenant("acme", "maintenance = true"),
        tenant("beta", "")
    ))
    .await;
    let r = e.get_from("203.0.113.5", "beta.test", "/web/login").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = e.get_from("203.0.113.5", "acme.test", "/web/login").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        status(e.p.admin).await["maintenance"],
        serde_json::json!(["acme"])
    );
}

/// Login attempts are limited per client address and tenant: beyond the burst 429 with
/// `Retry-After` and the contract's JSON, not seen by the worker; another address,
/// another tenant, an admin, a GET of the login page and XML-RPC calls other than
/// `authenticate`/`login` are not limited; the budget survives a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_attempts_are_limited_per_address_and_tenant() {
    let tenants = format!(
        "{}{}",
        tenant("acme", "login = { rate = \"6/min\", burst = 3 }"),
        tenant("beta", "login = { rate = \"6/min\", burst = 3 }")
    );
    let e = edge(&tenants).await;
    let form = "login=alice&password=wrong";
    for i in 0..3 {
        let r = e
            .post_from("203.0.113.7", "acme.test", "/web/login", form)
            .await;
        assert_ne!(r.status, 429, "attempt {i} is within the burst");
    }
    let seen = e.seen("/web/login");
    let r = e
        .post_from("203.0.113.7", "acme.test", "/web/login", form)
        .await;
    assert_eq!(r.status, 429, "{}", r.text());
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    let body = r.json();
    assert_eq!(body["error"], "login_limited");
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["retry_after"], retry);
    assert_eq!(
        e.seen("/web/login"),
        seen,
        "the refused attempt never reached the worker"
    );
    // The other login paths share the budget.
    let r = e
        .post_from(
            "203.0.113.7",
            "acme.test",
            "/web/session/authenticate",
            "{}",
        )
        .await;
    assert_eq!(r.status, 429);
    let log =
        e.p.wait_access_log(|l| l["status"] == 429 && l["path"] == "/web/login")
            .await;
    assert_eq!(log["refused"], "login_limited");

    // Not limited: another address, another tenant, an admin, the login page itself.
    let r = e
        .post_from("203.0.113.8", "acme.test", "/web/login", form)
        .await;
    assert_ne!(r.status, 429);
    let r = e
        .post_from("203.0.113.7", "beta.test", "/web/login", form)
        .await;
    assert_ne!(r.status, 429);
    for _ in 0..6 {
        let r = e.post_from(ADMIN, "acme.test", "/web/login", form).await;
        assert_ne!(r.status, 429, "admins are not limited");
        let r = e.get_from("203.0.113.7", "acme.test", "/web/login").await;
        assert_eq!(r.status, 200, "showing the login page is not an attempt");
    }

    // XML-RPC: `version` is not a login, `authenticate` is.
    let call = |m: &str| {
        format!("<?xml version='1.0'?>\n<methodCall>\n<methodName>{m}</methodName>\n<params>\n</params>\n</methodCall>\n")
    };
    for _ in 0..5 {
        let r = e
            .post_from(
                "203.0.113.9",
                "acme.test",
                "/xmlrpc/2/common",
                &call("version"),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    for _ in 0..3 {
        let r = e
            .post_from(
                "203.0.113.9",
                "acme.test",
                "/xmlrpc/2/common",
                &call("authenticate"),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let r = e
        .post_from("203.0.113.9", "acme.test", "/xmlrpc/common", &call("login"))
        .await;
    assert_eq!(r.status, 429, "{}", r.text());

    // A reload keeps the spent budgets.
    e.reload_with(&format!("{tenants}# reloaded\n")).await;
    let r = e
        .post_from("203.0.113.7", "acme.test", "/web/login", form)
        .await;
    assert_eq!(r.status, 429, "the budget survives a reload");

    let m = e.metrics().await;
    let line = m
        .lines()
        .find(|l| l.starts_with("portier_login_limited_total{tenant=\"acme\"}"))
        .unwrap_or_else(|| panic!("{m}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(n, 4.0, "{line}");
}

/// One HTTP/1.1 GET over TLS.
async fn tls_get(e: &Edge, host: &str, path: &str) -> Resp {
    let stream = tls_connect(
        e.https,
        host,
        e.pki.client(&[b"http/1.1"], &[&rustls::version::TLS13]),
    )
    .await
    .unwrap();
    h1_over(stream, host, path).await.unwrap()
}

/// Over TLS Odoo's `session_id` cookie gets `Secure` and `SameSite=Lax`; over plain
/// HTTP, and for a tenant with `secure_cookies = false`, it stays as Odoo sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookies_are_secured_over_tls() {
    let e = edge(&format!(
        "{}{}",
        tenant("acme", ""),
        tenant("beta", "secure_cookies = false")
    ))
    .await;
    let odoo_cookie = |r: &Resp| {
        r.header("set-cookie")
            .unwrap_or_else(|| panic!("no cookie: {r:?}"))
            .to_string()
    };
    let r = tls_get(&e, "acme.test", "/web/login").await;
    let c = odoo_cookie(&r);
    assert!(c.starts_with("session_id="), "{c}");
    assert!(c.contains("; HttpOnly"), "Odoo's attributes stay: {c}");
    assert!(c.ends_with("; Secure; SameSite=Lax"), "{c}");

    let r = get(e.p.http, "acme.test", "/web/login").await.unwrap();
    let c = odoo_cookie(&r);
    assert!(
        !c.contains("Secure") && !c.contains("SameSite"),
        "plain HTTP: {c}"
    );

    let r = tls_get(&e, "beta.test", "/web/login").await;
    let c = odoo_cookie(&r);
    assert!(
        !c.contains("Secure") && !c.contains("SameSite"),
        "secure_cookies = false: {c}"
    );
}
