//! The set-up shared by the Odoo-edge tests (`edge.rs`, `edge_assets.rs`): a simulated
//! Odoo 17 server behind portier with TLS; clients told apart by `X-Forwarded-For`
//! (127.0.0.1 is a trusted proxy, `admin_cidrs` is 10.9.0.0/16).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use portier_sim::{Odoo, OdooVersion, Server, SimConfig};
use portier_tests::*;

pub const DATABASES: &[&str] = &["acme", "beta", "gamma"];
pub const ADMIN: &str = "10.9.0.1";

pub struct Edge {
    pub p: Portier,
    pub http: SimWorker,
    pub _gevent: SimWorker,
    pub https: SocketAddr,
    pub pki: TestPki,
    pub _certs: tempfile::TempDir,
    pub ports: Ports,
    pub defaults: String,
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

pub fn tenant(name: &str, extra: &str) -> String {
    format!("[tenants.{name}]\nhosts = [\"{name}.test\"]\npool = \"main\"\ndatabase = \"{name}\"\n{extra}\n")
}

pub async fn edge(tenants: &str) -> Edge {
    edge_with("", tenants).await
}

/// [`edge`] with more `[defaults]` keys.
pub async fn edge_with(defaults: &str, tenants: &str) -> Edge {
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
    pub async fn reload_with(&self, tenants: &str) {
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
    pub fn seen(&self, path: &str) -> usize {
        self.http
            .requests()
            .iter()
            .filter(|r| r.target.split('?').next() == Some(path))
            .count()
    }

    pub async fn get_from(&self, client: &str, host: &str, path: &str) -> Resp {
        get_with(self.p.http, host, path, &[("x-forwarded-for", client)])
            .await
            .unwrap()
    }

    pub async fn post_from(&self, client: &str, host: &str, path: &str, body: &str) -> Resp {
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

    pub async fn metrics(&self) -> String {
        get(self.p.admin, "admin", "/metrics").await.unwrap().text()
    }
}
