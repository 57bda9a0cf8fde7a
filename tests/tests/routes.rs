//! Tenant `routes` (configuration reference, `[tenants.NAME]` `routes`): a path prefix
//! sent to another pool — hosting companies send integrations (`/jsonrpc`, `/xmlrpc/`)
//! to a batch pool of their own workers. Element-wise prefixes (as Gateway API's
//! `PathPrefix`), the query string not part of the path, the longest match winning,
//! `exact = true`, longpolling and the bus always on the tenant's pool, and the tenant's
//! limits and maintenance unchanged; `check` refuses an unknown pool or a path not
//! starting with `/`.

use bytes::Bytes;
use portier_tests::*;

struct Setup {
    p: Portier,
    ports: Ports,
    web: SimWorker,
    batch: SimWorker,
    web_g: SimWorker,
    batch_g: SimWorker,
}

impl Setup {
    fn config(&self, tenant_extra: &str) -> String {
        config(
            &self.ports,
            [&self.web, &self.batch, &self.web_g, &self.batch_g],
            tenant_extra,
        )
    }

    /// Which pool's HTTP worker answered `path` (`web` or `batch`; Odoo may answer a
    /// redirect to its login page, still a worker's answer).
    async fn pool_of(&self, path: &str) -> String {
        let r = get(self.p.http, "acme.test", path).await.unwrap();
        assert!(r.status < 400, "{path}: {} {}", r.status, r.text());
        r.worker().unwrap_or("-").to_string()
    }

    async fn reload(&self, tenant_extra: &str) {
        std::fs::write(self.p.config_path(), self.config(tenant_extra)).unwrap();
        let r = request(self.p.admin, "POST", "admin", "/reload", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

const ROUTES: &str = r#"routes = [
  { path = "/jsonrpc", pool = "batch" },
  { path = "/xmlrpc/", pool = "batch" },
  { path = "/web", pool = "batch" },
  { path = "/web/dataset", pool = "web" },
  { path = "/api/ping", pool = "batch", exact = true },
  { path = "/longpolling", pool = "batch" },
  { path = "/websocket", pool = "batch" },
]
"#;

fn config(ports: &Ports, w: [&SimWorker; 4], tenant_extra: &str) -> String {
    format!(
        "{listen}\n[defaults]\nadmin_cidrs = [\"10.9.0.0/16\"]\n\
         [pools.web]\nhttp = [\"{}\"]\nlongpolling = [\"{}\"]\n\
         [pools.batch]\nhttp = [\"{}\"]\nlongpolling = [\"{}\"]\n\
         [tenants.acme]\nhosts = [\"acme.test\"]\npool = \"web\"\ndatabase = \"acme\"\n{ROUTES}{tenant_extra}",
        w[0].addr(),
        w[2].addr(),
        w[1].addr(),
        w[3].addr(),
        listen = ports.listen(),
    )
}

async fn setup(tenant_extra: &str) -> Setup {
    let (web, batch) = (sim("web").await, sim("batch").await);
    let (web_g, batch_g) = (sim("web-g").await, sim("batch-g").await);
    for g in [&web_g, &batch_g] {
        g.set_longpoll_hold(std::time::Duration::from_millis(50));
    }
    let ports = Ports::new();
    let cfg = config(&ports, [&web, &batch, &web_g, &batch_g], tenant_extra);
    let p = Portier::start(&ports, &cfg).await;
    Setup {
        p,
        ports,
        web,
        batch,
        web_g,
        batch_g,
    }
}

/// Element-wise prefixes, the query string left out, the longest match, `exact`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_prefix_goes_to_its_routes_pool() {
    let s = setup("").await;
    for (path, want) in [
        // `/jsonrpc` matches `/jsonrpc` and `/jsonrpc/x`, not `/jsonrpc2`
        ("/jsonrpc", "batch"),
        ("/jsonrpc/x", "batch"),
        ("/jsonrpc2", "web"),
        // a trailing `/` in the route is ignored
        ("/xmlrpc", "batch"),
        ("/xmlrpc/2/object", "batch"),
        ("/xmlrpcx", "web"),
        // the query string is not part of the path
        ("/jsonrpc?next=/odoo", "batch"),
        ("/odoo?next=/jsonrpc", "web"),
        // the longest match wins
        ("/web", "batch"),
        ("/web/action/load", "batch"),
        ("/web/dataset/call_kw", "web"),
        // exact = true: that path only
        ("/api/ping", "batch"),
        ("/api/ping/more", "web"),
        // no route: the tenant's pool
        ("/odoo/action-1", "web"),
        // decided on the normalised path, as the class is
        ("/odoo/../jsonrpc", "batch"),
        ("/%6Asonrpc", "batch"),
    ] {
        assert_eq!(s.pool_of(path).await, want, "{path}");
    }
    // The routed request is still the tenant's: its database and its access log.
    let rec = s
        .batch
        .requests()
        .into_iter()
        .find(|r| r.target == "/jsonrpc/x")
        .unwrap();
    assert_eq!(rec.header("x-odoo-dbfilter"), Some("^acme$"));
    let log = s.p.wait_access_log(|v| v["path"] == "/jsonrpc/x").await;
    assert_eq!(log["tenant"], "acme");
    assert_eq!(log["backend"], s.batch.addr().to_string());
}

/// Longpolling always uses the tenant's pool's longpolling list, whatever the routes
/// say: a longpoll and the bus WebSocket reach the web pool's gevent worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longpolling_and_the_bus_stay_on_the_tenants_pool() {
    let s = setup("").await;
    let r = get(s.p.http, "acme.test", "/longpolling/poll")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.worker(), Some("web-g"));
    let (mut ws, resp) = websocket(s.p.http, "acme.test", "/websocket", &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(ws_roundtrip(&mut ws, "whoami").await.unwrap(), "web-g");
    assert_eq!(s.batch_g.hits(), 0, "a longpoll reached the batch pool");
    assert_eq!(s.batch.hits(), 0);
    assert!(s.web_g.hits() >= 1);
    let _ = &s.web;
}

/// The tenant's limits and maintenance apply to routed requests as to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_maintenance_stay_the_tenants() {
    let s = setup("integration = { rate = \"1/min\", burst = 2 }\n").await;
    // Integration traffic to the batch pool counts against acme's budget.
    assert_eq!(s.pool_of("/jsonrpc").await, "batch");
    assert_eq!(s.pool_of("/xmlrpc/2/object").await, "batch");
    let r = get(s.p.http, "acme.test", "/jsonrpc").await.unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["tenant"], "acme");
    assert_eq!(r.json()["error"], "rate_limited");
    // Maintenance answers routed paths too; the health path still reaches a worker.
    s.reload("maintenance = true\n").await;
    let r = get(s.p.http, "acme.test", "/web/action/load")
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    let batch_before = s.batch.hits();
    let r = get(s.p.http, "acme.test", "/web/health").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.worker(), Some("batch"), "/web/health is under /web");
    assert_eq!(s.batch.hits(), batch_before + 1);
}

/// `check` refuses a route naming an unknown pool or a path not starting with `/`,
/// pointing at the value.
#[test]
fn check_refuses_bad_routes_with_their_positions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(
        &path,
        "[listen]\nhttp = \"127.0.0.1:18080\"\n[pools.web]\nhttp = [\"127.0.0.1:8069\"]\n\
         [tenants.acme]\nhosts = [\"acme.test\"]\npool = \"web\"\n\
         routes = [{ path = \"/jsonrpc\", pool = \"batch\" }, { path = \"xmlrpc\", pool = \"web\" }]\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let file = path.display().to_string();
    assert!(
        err.contains(&format!("{file}:8:39: route names unknown pool \"batch\"")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}:8:59: route `path` \"xmlrpc\" must start with `/`"
        )),
        "{err}"
    );
}
