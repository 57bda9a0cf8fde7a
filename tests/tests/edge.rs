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
    defaults: String,
}

fn edge_config(
    ports: &Ports,
    http: &SimWorker,
    gevent: &SimWorker,
    certs: &std::path::Path,
    defaults: &str,
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
{defaults}[pools.main]
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
    edge_with("", tenants).await
}

/// [`edge`] with more `[defaults]` keys.
async fn edge_with(defaults: &str, tenants: &str) -> Edge {
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
    let cfg = edge_config(&ports, &http, &gevent, dir.path(), defaults, tenants);
    let p = Portier::start(&ports, &cfg).await;
    Edge {
        https: local(ports.https),
        p,
        http,
        _gevent: gevent,
        pki,
        _certs: dir,
        ports,
        defaults: defaults.to_string(),
    }
}

impl Edge {
    async fn reload_with(&self, tenants: &str) {
        let cfg = edge_config(
            &self.ports,
            &self.http,
            &self._gevent,
            self._certs.path(),
            &self.defaults,
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
    // The default limit: 10/min, burst 5.
    let tenants = format!("{}{}", tenant("acme", ""), tenant("beta", ""));
    let e = edge(&tenants).await;
    let form = "login=alice&password=wrong";
    for i in 0..5 {
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
    assert!((1..=6).contains(&retry), "{retry}");
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
    for _ in 0..5 {
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

/// Decodes a body by its `Content-Encoding`.
fn decode(r: &Resp) -> Vec<u8> {
    use std::io::Read;
    let body = &r.body[..];
    match r.header("content-encoding") {
        None => body.to_vec(),
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
            out
        }
        Some("br") => {
            let mut out = Vec::new();
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
            out
        }
        Some("zstd") => zstd::decode_all(body).unwrap(),
        Some(other) => panic!("unexpected encoding {other}"),
    }
}

async fn get_ae(e: &Edge, host: &str, path: &str, accept: &str) -> Resp {
    get_with(e.p.http, host, path, &[("accept-encoding", accept)])
        .await
        .unwrap()
}

fn varies_by_encoding(r: &Resp) -> bool {
    r.headers
        .get_all("vary")
        .iter()
        .any(|v| v.to_str().unwrap_or("").contains("Accept-Encoding"))
}

/// Compression: the client's preferred encoding among zstd, br, gzip, with `Vary`; the
/// decoded body is what the worker sent; not for small bodies, images, `HEAD`, `206`,
/// or pages and RPC answers unless `compress = "all"`; never with `compress = "off"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_compressed_as_the_client_and_the_class_allow() {
    let e = edge(&format!(
        "{}{}{}",
        tenant("acme", "cache_assets = \"0\""),
        tenant("beta", "compress = \"all\"\ncache_assets = \"0\""),
        tenant("gamma", "compress = \"off\"")
    ))
    .await;
    let bundle = "/web/assets/abc123/web.assets_web.min.js?size=200000";
    let plain = get(e.p.http, "acme.test", bundle).await.unwrap();
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None, "no Accept-Encoding");
    assert!(varies_by_encoding(&plain), "{:?}", plain.headers);
    assert_eq!(plain.body.len(), 200_000);
    for (accept, want) in [
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip, deflate, br", "br"),
        ("gzip", "gzip"),
        ("br;q=0.5, gzip;q=1", "gzip"),
    ] {
        let r = get_ae(&e, "acme.test", bundle, accept).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some(want), "{accept}");
        assert!(varies_by_encoding(&r));
        assert!(
            r.body.len() < plain.body.len() / 2,
            "{accept}: {} bytes",
            r.body.len()
        );
        assert_eq!(
            decode(&r),
            plain.body,
            "{accept}: the decoded body is the worker's"
        );
    }
    // Not compressed: a body under 1 KiB, an image, HEAD, a range, a body the worker
    // already encoded.
    for size in [500, 1023] {
        let path = format!("/web/static/src/small.js?size={size}");
        let small = get_ae(&e, "acme.test", &path, "gzip").await;
        assert_eq!(
            (small.status, small.header("content-encoding")),
            (200, None)
        );
        assert_eq!(small.body.len(), size);
    }
    let r = get_ae(&e, "acme.test", "/web/static/src/x.js?size=1024", "gzip").await;
    assert_eq!(
        r.header("content-encoding"),
        Some("gzip"),
        "1 KiB is enough"
    );
    let path = "/web/static/src/pre.js?size=5000&encoding=br";
    let pre = get_ae(&e, "acme.test", path, "gzip, br").await;
    assert_eq!(pre.headers.get_all("content-encoding").iter().count(), 1);
    assert_eq!(pre.header("content-encoding"), Some("br"));
    assert_eq!(pre.body.len(), 5000, "passed through as the worker sent it");
    let png = get_ae(
        &e,
        "acme.test",
        "/web/static/img/logo.png?size=5000",
        "gzip",
    )
    .await;
    assert_eq!(png.header("content-encoding"), None);
    let head = request(
        e.p.http,
        "HEAD",
        "acme.test",
        bundle,
        &[("accept-encoding", "gzip")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!((head.status, head.header("content-encoding")), (200, None));
    let part = get_with(
        e.p.http,
        "acme.test",
        bundle,
        &[("accept-encoding", "gzip"), ("range", "bytes=0-4999")],
    )
    .await
    .unwrap();
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-encoding"), None);
    assert_eq!(part.body, plain.body.slice(0..5000));

    // Pages and RPC answers: only with compress = "all".
    let page = "/web/dataset/call_kw?size=5000";
    let r = get_ae(&e, "acme.test", page, "gzip").await;
    assert_eq!(
        (r.status, r.header("content-encoding")),
        (200, None),
        "static only by default"
    );
    let r = get_ae(&e, "beta.test", page, "gzip").await;
    assert_eq!(
        r.header("content-encoding"),
        Some("gzip"),
        "compress = \"all\""
    );
    let page: serde_json::Value = serde_json::from_slice(&decode(&r)).unwrap();
    assert_eq!(page["target"], "/web/dataset/call_kw?size=5000");
    let r = get_ae(&e, "gamma.test", bundle, "gzip, br, zstd").await;
    assert_eq!(r.header("content-encoding"), None, "compress = \"off\"");
    assert_eq!(r.body.len(), 200_000);
}

fn metric(m: &str, name: &str) -> f64 {
    m.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The asset cache: a bundle is fetched from the worker once, then served with `Age`
/// and `X-Cache: hit`; per tenant and per encoding; answers that are private, set a
/// cookie, vary by more than the encoding or are not `200` are not kept; concurrent
/// misses are collapsed into one worker request; entries survive a reload but not
/// their tenant's removal; `cache_assets` bounds them (least recently used go).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asset_bundles_are_served_from_the_cache() {
    let tenants = format!("{}{}", tenant("acme", ""), tenant("beta", ""));
    let e = edge_with("cache_assets = \"2MiB\"\n", &tenants).await;
    let bundle = "/web/assets/abc123/web.assets_web.min.js?size=100000";
    let first = get(e.p.http, "acme.test", bundle).await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("miss"));
    assert_eq!(e.seen("/web/assets/abc123/web.assets_web.min.js"), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = get(e.p.http, "acme.test", bundle).await.unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-cache"), Some("hit"));
    let age: u64 = second.header("age").unwrap().parse().unwrap();
    assert!(age >= 1, "{age}");
    assert_eq!(second.body, first.body);
    assert_eq!(
        second.header("cache-control"),
        first.header("cache-control")
    );
    assert!(second.header("x-request-id").is_some());
    assert_ne!(second.header("x-request-id"), first.header("x-request-id"));
    assert_eq!(
        e.seen("/web/assets/abc123/web.assets_web.min.js"),
        1,
        "the worker did not see the hit"
    );
    let log = e.p.wait_access_log(|l| l["cache"] == "hit").await;
    assert_eq!(log["backend"], serde_json::Value::Null);
    assert_eq!(log["status"], 200);
    e.p.wait_access_log(|l| l["cache"] == "miss").await;

    // Another tenant has its own entries; another encoding is another entry, kept
    // compressed.
    let r = get(e.p.http, "beta.test", bundle).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("miss"));
    let gz = get_ae(&e, "acme.test", bundle, "gzip").await;
    assert_eq!(
        (gz.header("x-cache"), gz.header("content-encoding")),
        (Some("miss"), Some("gzip"))
    );
    let gz2 = get_ae(&e, "acme.test", bundle, "gzip").await;
    assert_eq!(
        (gz2.header("x-cache"), gz2.header("content-encoding")),
        (Some("hit"), Some("gzip"))
    );
    assert_eq!(gz2.body, gz.body);
    assert_eq!(decode(&gz2), first.body);
    assert_eq!(e.seen("/web/assets/abc123/web.assets_web.min.js"), 3);

    // Not kept: each of these reaches the worker twice.
    for q in [
        "cc=private",
        "cc=no-store",
        "cc=public",
        "cc=no-cache%2C%20max-age%3D600",
        "cookie=1",
        "vary=Cookie",
    ] {
        let path = format!("/web/static/src/x.js?{q}");
        for _ in 0..2 {
            let r = get(e.p.http, "acme.test", &path).await.unwrap();
            assert_eq!((r.status, r.header("x-cache")), (200, Some("miss")), "{q}");
        }
    }
    assert_eq!(e.seen("/web/static/src/x.js"), 12);
    // A module's static file (`/*/static/*`) is kept like the web client's.
    for want in ["miss", "hit"] {
        let r = get(e.p.http, "acme.test", "/mail/static/src/core.js")
            .await
            .unwrap();
        assert_eq!(r.header("x-cache"), Some(want));
    }
    assert_eq!(e.seen("/mail/static/src/core.js"), 1);
    // Not a GET of the static class: no cache at all.
    let r = get(e.p.http, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.header("x-cache"), None);

    // Ten concurrent misses of a slow bundle: one worker request.
    let slow = "/web/assets/slow/web.assets_web.min.js?sleep_ms=400";
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let addr = e.p.http;
        tasks.push(tokio::spawn(async move {
            get(addr, "acme.test", slow).await.unwrap()
        }));
    }
    let mut hits = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        hits += usize::from(r.header("x-cache") == Some("hit"));
    }
    assert_eq!(
        e.seen("/web/assets/slow/web.assets_web.min.js"),
        1,
        "collapsed"
    );
    assert_eq!(hits, 49);

    // The worker's `Age` counts: max-age 2 with Age 1 is stale a second later.
    let aged = "/web/static/src/aged.js?cc=max-age%3D2&age=1";
    let r = get(e.p.http, "acme.test", aged).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("miss"));
    let r = get(e.p.http, "acme.test", aged).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("hit"));
    assert!(r.header("age").unwrap().parse::<u64>().unwrap() >= 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = get(e.p.http, "acme.test", aged).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("miss"), "expired by its age");

    // A reload keeps the entries; removing a tenant drops its entries.
    e.reload_with(&format!("{tenants}# reloaded\n")).await;
    let r = get(e.p.http, "acme.test", bundle).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("hit"), "survives a reload");
    e.reload_with(&tenant("acme", "")).await;
    e.reload_with(&tenants).await;
    let r = get(e.p.http, "beta.test", bundle).await.unwrap();
    assert_eq!(
        r.header("x-cache"),
        Some("miss"),
        "beta was removed and came back"
    );

    // 2 MiB in all: 30 bundles of 100 KB push the oldest out.
    for i in 0..30 {
        let r = get(
            e.p.http,
            "acme.test",
            &format!("/web/assets/n{i}/b.js?size=100000"),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    let r = get(e.p.http, "acme.test", "/web/assets/n0/b.js?size=100000")
        .await
        .unwrap();
    assert_eq!(r.header("x-cache"), Some("miss"), "evicted");
    let r = get(e.p.http, "acme.test", "/web/assets/n29/b.js?size=100000")
        .await
        .unwrap();
    assert_eq!(r.header("x-cache"), Some("hit"), "recent");

    let m = e.metrics().await;
    assert!(
        metric(&m, "portier_cache_requests_total{result=\"hit\"}") >= 12.0,
        "{m}"
    );
    assert!(
        metric(&m, "portier_cache_requests_total{result=\"miss\"}") >= 5.0,
        "{m}"
    );
}

/// The reload that puts a tenant into maintenance closes its open WebSockets with
/// 1001 ("going away"); other tenants' WebSockets go on, and a new one of the tenant
/// in maintenance gets the 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_closes_the_tenants_websockets() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let e = edge(&format!("{}{}", tenant("acme", ""), tenant("beta", ""))).await;
    let client = [("x-forwarded-for", "203.0.113.5")];
    let (mut acme, resp) = websocket(e.p.http, "acme.test", "/websocket", &client)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let (mut beta, _) = websocket(e.p.http, "beta.test", "/websocket", &client)
        .await
        .unwrap();
    for ws in [&mut acme, &mut beta] {
        assert!(ws_roundtrip(ws, "whoami").await.unwrap().starts_with('g'));
    }
    e.reload_with(&format!(
        "{}{}",
        tenant("acme", "maintenance = true"),
        tenant("beta", "")
    ))
    .await;
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match acme.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the tenant's WebSocket is closed when the reload applies");
    assert_eq!(closed, Some(1001));
    // The other tenant's bus goes on.
    assert_eq!(
        ws_roundtrip(&mut beta, "still here").await.unwrap(),
        "still here"
    );
    // A new WebSocket of the tenant in maintenance is refused.
    let err = websocket(e.p.http, "acme.test", "/websocket", &client).await;
    assert!(err.is_err(), "a new upgrade gets the 503");
    let log =
        e.p.wait_access_log(|l| l["tenant"] == "acme" && l["status"] == 503)
            .await;
    assert_eq!(log["refused"], "maintenance");
}

/// Over HTTP/2 (TLS, ALPN h2): a bundle compressed and then served from the cache, with
/// no HTTP/1 framing headers leaking into the HTTP/2 response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_and_the_cache_work_over_http2() {
    let e = edge(&tenant("acme", "")).await;
    let bundle = "/web/assets/h2/web.assets_web.min.js?size=100000";
    let mut bodies = Vec::new();
    for want in ["miss", "hit"] {
        let stream = tls_connect(
            e.https,
            "acme.test",
            e.pki.client(&[b"h2"], &[&rustls::version::TLS13]),
        )
        .await
        .unwrap();
        let r = h2_over_with(stream, "acme.test", bundle, &[("accept-encoding", "br")])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some(want));
        assert_eq!(r.header("content-encoding"), Some("br"));
        assert!(r.header("transfer-encoding").is_none());
        bodies.push(decode(&r));
    }
    assert_eq!(bodies[0].len(), 100_000);
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(e.seen("/web/assets/h2/web.assets_web.min.js"), 1);
}
