//! The TOML front end: a configuration file in, the validated [`Config`] model out,
//! every problem collected as a [`Diagnostic`] with the line and column of the offending
//! key or value (a missing key at the header of the table that lacks it).
//!
//! `cx` holds the diagnostics and the typed readers of single values; each section of
//! the file has a module of its own: `listen` (`[listen]`, `[log]`, `[tls]`), `pool`
//! (`[pools.*]`), `tenant` (`[defaults]` and `[tenants.*]`).

mod acme;
mod cx;
mod kubernetes;
mod listen;
mod pool;
mod tenant;
mod values;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

use crate::hosts::{HostIndex, HostPattern};
use crate::model::*;
use crate::units::{parse_duration, parse_rate, parse_size};
use crate::{Diagnostic, Pos};

use cx::*;
use listen::{read_cluster, read_listen, read_log, read_tls};

use kubernetes::read_kubernetes;
use pool::read_pool;
use tenant::{read_settings, read_tenant};
pub use values::{pool_from_values, tenant_from_values, KeyError, TenantValues};

/// Reads and validates a configuration file.
pub fn load_file(path: &Path) -> Result<(Config, Vec<Diagnostic>), Vec<Diagnostic>> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        vec![Diagnostic::error(
            &file,
            Pos { line: 1, col: 1 },
            format!("cannot read the configuration file: {e}"),
        )]
    })?;
    let text = String::from_utf8(bytes.clone()).map_err(|e| {
        let pos = Pos::of_offset(
            &String::from_utf8_lossy(&bytes[..e.utf8_error().valid_up_to()]),
            e.utf8_error().valid_up_to(),
        );
        vec![Diagnostic::error(&file, pos, "the file is not valid UTF-8")]
    })?;
    load_str(&text, path)
}

/// Parses and validates configuration text; `path` names it in diagnostics and is the
/// base for relative paths in it.
pub fn load_str(text: &str, path: &Path) -> Result<(Config, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut cx = Cx::new(path.display().to_string(), text);
    let (doc, syntax_errors) = DeTable::parse_recoverable(text);
    for e in syntax_errors {
        let span = e.span().unwrap_or(0..0);
        cx.error(&span, e.message().trim().to_string());
    }
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let config = read_document(&mut cx, doc.get_ref(), path, &base_dir, text);
    if cx.has_errors() {
        return Err(cx.diags);
    }
    match config {
        Some(c) => Ok((c, cx.diags)),
        None => Err(cx.diags),
    }
}

pub(super) const ROOT_KEYS: &[&str] = &[
    "listen",
    "log",
    "tls",
    "cluster",
    "kubernetes",
    "defaults",
    "pools",
    "tenants",
];
pub(super) const KUBERNETES_KEYS: &[&str] = &[
    "kubeconfig",
    "namespaces",
    "gateway_class",
    "ingress_class",
    "status",
    "lease",
    "status_address",
];
pub(super) const LISTEN_KEYS: &[&str] = &[
    "http",
    "https",
    "admin",
    "drain",
    "threads",
    "spool_dir",
    "max_connections",
    "max_connections_per_ip",
    "header_timeout",
    "idle_timeout",
];
pub(super) const LOG_KEYS: &[&str] = &["access"];
pub(super) const CLUSTER_KEYS: &[&str] = &["redis", "key_prefix", "timeout"];
pub(super) const TLS_KEYS: &[&str] = &["certs", "default", "redirect_http", "hsts", "acme"];
pub(super) const ACME_KEYS: &[&str] = &[
    "email",
    "directory",
    "challenge",
    "ca",
    "renew_before",
    "on_demand",
    "on_demand_rate",
];
pub(super) const SETTINGS_KEYS: &[&str] = &[
    "connect_timeout",
    "request_timeout",
    "longpolling_timeout",
    "websocket_idle",
    "max_body",
    "buffer_body",
    "buffer_response",
    "max_response_spool",
    "block_database_manager",
    "admin_cidrs",
    "trusted_proxies",
    "integration",
    "interactive",
    "login",
    "compress",
    "cache_assets",
    "secure_cookies",
];
/// A tenant's own keys; every `[defaults]` key may be set per tenant too.
pub(super) const TENANT_OWN_KEYS: &[&str] = &["hosts", "pool", "database", "maintenance", "routes"];
/// What a `[tenants.NAME]` table may hold: its own keys, then the settings.
pub(super) static TENANT_KEYS: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| [TENANT_OWN_KEYS, SETTINGS_KEYS].concat());
pub(super) const POOL_KEYS: &[&str] = &[
    "http",
    "longpolling",
    "discover",
    "spread",
    "health",
    "breaker",
    "retries",
    "workers",
    "queue",
    "filestore",
];
pub(super) const ROUTE_KEYS: &[&str] = &["path", "pool", "exact"];
pub(super) const QUEUE_KEYS: &[&str] = &["max", "timeout", "reserve"];
pub(super) const LIMIT_KEYS: &[&str] = &["rate", "burst", "concurrency"];
pub(super) const LOGIN_KEYS: &[&str] = &["rate", "burst"];
pub(super) const HEALTH_KEYS: &[&str] = &["path", "every", "timeout", "rise", "fall"];
pub(super) const BREAKER_KEYS: &[&str] = &["failures", "open_for"];
pub(super) const DISCOVER_KEYS: &[&str] =
    &["dns", "http_port", "longpolling_port", "every", "resolver"];

fn read_document(
    cx: &mut Cx<'_>,
    doc: &DeTable<'_>,
    path: &Path,
    base_dir: &Path,
    text: &str,
) -> Option<Config> {
    let mut root = Tbl::new(doc, "the top level", ROOT_KEYS);

    let listen_entry = root.get_keyed("listen");
    let listen = match listen_entry {
        Some((_, v)) => want_table(cx, "listen", v).and_then(|t| read_listen(cx, t)),
        None => {
            cx.error(
                &(0..0),
                "missing [listen] section: at least `http` or `https` is needed",
            );
            None
        }
    };
    let log = match root.get("log") {
        Some(v) => want_table(cx, "log", v).map(|t| read_log(cx, t)),
        None => Some(LogSettings { access: true }),
    };
    let cluster = root.get_keyed("cluster").and_then(|(header, v)| {
        want_table(cx, "cluster", v).and_then(|t| read_cluster(cx, t, &header))
    });
    let kubernetes = root.get("kubernetes").and_then(|v| {
        want_table(cx, "kubernetes", v).and_then(|t| read_kubernetes(cx, t, base_dir))
    });
    let tls_entry = root.get_keyed("tls");
    let tls_val = tls_entry.as_ref().map(|(_, v)| *v);
    let tls = tls_entry.as_ref().and_then(|(header, v)| {
        want_table(cx, "tls", v)
            .and_then(|t| read_tls(cx, t, header, base_dir, kubernetes.is_some()))
    });
    let defaults = match root.get("defaults") {
        Some(v) => want_table(cx, "defaults", v)
            .map(|t| {
                let mut tbl = Tbl::new(t, "[defaults]", SETTINGS_KEYS);
                let s = read_settings(cx, &mut tbl, &Settings::default());
                tbl.finish(cx);
                s
            })
            .unwrap_or_default(),
        None => Settings::default(),
    };
    let defaults = Arc::new(defaults);

    // Pools.
    let mut pools: Vec<Pool> = Vec::new();
    let mut pool_names: Vec<String> = Vec::new();
    if let Some(v) = root.get("pools") {
        if let Some(t) = want_table(cx, "pools", v) {
            for (name, pv) in t.iter() {
                let name_str = name.get_ref().to_string();
                pool_names.push(name_str.clone());
                if let Some(pt) = want_table(cx, &format!("pools.{name_str}"), pv) {
                    if let Some(p) = read_pool(cx, &name_str, &name.span(), pt, base_dir, false) {
                        pools.push(p);
                    } else {
                        // Keep indices aligned with names even when a pool is invalid.
                        pools.push(placeholder_pool(&name_str));
                    }
                } else {
                    pools.push(placeholder_pool(&name_str));
                }
            }
        }
    }

    // Tenants.
    let mut tenants: Vec<Tenant> = Vec::new();
    let mut tenant_names: Vec<String> = Vec::new();
    let mut hosts = HostIndex::default();
    let tenants_val = root.get("tenants");
    if let Some(v) = tenants_val {
        if let Some(t) = want_table(cx, "tenants", v) {
            for (name, tv) in t.iter() {
                let name_str = name.get_ref().to_string();
                // Ids are attempt positions: equal to positions in `tenants` whenever the
                // whole file is valid (any failed tenant rejects the file).
                tenant_names.push(name_str.clone());
                let Some(tt) = want_table(cx, &format!("tenants.{name_str}"), tv) else {
                    continue;
                };
                if let Some(tenant) = read_tenant(
                    cx,
                    &name_str,
                    &name.span(),
                    tt,
                    &pool_names,
                    &defaults,
                    &mut hosts,
                    tenant_names.len() - 1,
                    &tenant_names,
                ) {
                    tenants.push(tenant);
                }
            }
        }
    }
    root.finish(cx);

    if tenants.is_empty() && tenants_val.is_none() && kubernetes.is_none() {
        cx.warn(
            &(0..0),
            "no [tenants.*] configured: every request will get 404",
        );
    }

    // Cross-section checks.
    // A missing key is reported at the header of the table that lacks it (`[listen]`).
    if let (Some(l), Some((listen_header, listen_v))) = (&listen, &listen_entry) {
        if l.https.is_some() && tls.is_none() && tls_val.is_none() {
            let at = key_span(listen_v, "https").unwrap_or_else(|| listen_header.clone());
            cx.error(&at, "`listen.https` is set but there is no [tls] section");
        }
        if l.https.is_none() && tls.as_ref().is_some_and(|t| t.acme.is_some()) {
            cx.error(
                listen_header,
                "[tls.acme] needs an `https` listener in [listen] (certificates are for it; TLS-ALPN-01 is answered on it)",
            );
        }
        if l.http.is_none() && l.https.is_none() {
            cx.error(
                listen_header,
                "[listen] needs at least one of `http` or `https`",
            );
        }
    }

    let version = sha256_hex(text.as_bytes());
    Some(Config {
        path: path.to_path_buf(),
        version,
        listen: listen?,
        log: log?,
        tls,
        cluster,
        pools,
        tenants,
        hosts,
        defaults,
        kubernetes,
    })
}

fn placeholder_pool(name: &str) -> Pool {
    Pool::empty(name)
}

/// Hex SHA-256 of bytes: the version of a configuration file.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(suggest("htpp", LISTEN_KEYS), Some("http"));
        assert_eq!(suggest("spred", POOL_KEYS), Some("spread"));
        assert_eq!(suggest("completely_else", POOL_KEYS), None);
    }
}
