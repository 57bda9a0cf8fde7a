//! portier's configuration: one validated model, several front ends.
//!
//! - The **model** ([`model`], with the compiled routing pieces [`hosts`], [`class`],
//!   [`units`]) is what the proxy runs on: a [`Config`] of listeners, pools, tenants
//!   and their settings, with every default applied and every cross-reference checked
//!   (a tenant's pool exists, no host is claimed twice). The proxy never sees a file
//!   format and does not know which front end produced the model.
//! - A **front end** turns a source into that model, with diagnostics that point into
//!   the source: [`file`] reads the TOML file of the contract (`FILE:LINE:COL` for every
//!   problem, all of them, not just the first). Another source (Kubernetes objects)
//!   is another front end producing the same [`Config`].
//!
//! No networking happens here.

pub mod class;
pub mod file;
pub mod hosts;
pub mod model;
pub mod units;

pub use class::Class;
pub use file::{
    load_file, load_str, pool_from_values, sha256_hex, tenant_from_values, KeyError, TenantValues,
};
pub use hosts::{normalize_host, HostIndex, HostMatch, HostPattern, TenantId};
pub use model::*;
pub use units::{parse_duration, parse_rate, parse_size, Rate};

/// A 1-based line and column in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    /// The position of byte `offset` in `src` (columns count characters).
    pub fn of_offset(src: &str, offset: usize) -> Pos {
        let offset = offset.min(src.len());
        let before = src.get(..offset).unwrap_or(src);
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before[line_start..].chars().count() + 1;
        Pos { line, col }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a configuration, printed as `FILE:LINE:COL: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub pos: Pos,
    pub severity: Severity,
    pub message: String,
}

impl Diagnostic {
    pub fn error(file: &str, pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_string(),
            pos,
            severity: Severity::Error,
            message: message.into(),
        }
    }

    pub fn warning(file: &str, pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_string(),
            pos,
            severity: Severity::Warning,
            message: message.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        write!(
            f,
            "{}:{}:{}: {sev}{}",
            self.file, self.pos.line, self.pos.col, self.message
        )
    }
}

/// Formats a list of diagnostics, one per line.
pub fn render(diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    const FULL: &str = r#"
[listen]
http  = "0.0.0.0:80"
https = "0.0.0.0:443"
admin = "127.0.0.1:9900"
drain = "30s"
threads = 0

[log]
access = true

[tls]
certs = "/etc/portier/certs"
default = "fallback"
redirect_http = true
hsts = "max-age=31536000"

[defaults]
connect_timeout = "3s"
request_timeout = "120s"
longpolling_timeout = "75s"
websocket_idle = "1h"
max_body = "128MiB"
buffer_body = "1MiB"
block_database_manager = true
admin_cidrs = ["127.0.0.0/8"]
trusted_proxies = []

[pools.eu-shared]
http        = ["10.0.1.11:8069", "10.0.1.12:8069"]
longpolling = ["10.0.1.11:8072", "10.0.1.12:8072"]
spread = 2
health  = { path = "/web/health", every = "5s", timeout = "2s", rise = 2, fall = 3 }
breaker = { failures = 5, open_for = "15s" }
retries = 1

[pools.k8s]
discover = { dns = "odoo.erp.svc.cluster.local", http_port = 8069, longpolling_port = 8072, every = "10s", resolver = "10.96.0.10:53" }

[tenants.acme]
hosts    = ["acme.example.com", "erp.acme.com"]
pool     = "eu-shared"
database = "acme"
integration = { rate = "20/s", burst = 40, concurrency = 8 }

[tenants.saas]
hosts    = ["{tenant}.erp.example.com"]
pool     = "k8s"
database = "{tenant}"
integration = { rate = "5/s", burst = 10, concurrency = 2 }
request_timeout = "30s"
"#;

    fn load(text: &str) -> Result<(Config, Vec<Diagnostic>), Vec<Diagnostic>> {
        load_str(text, Path::new("/etc/portier/portier.toml"))
    }

    #[test]
    fn the_contract_example_loads() {
        let (c, warnings) = load(FULL).unwrap_or_else(|e| panic!("{}", render(&e)));
        assert!(warnings.is_empty(), "{}", render(&warnings));
        assert_eq!(c.listen.http, Some("0.0.0.0:80".parse().unwrap()));
        assert_eq!(c.listen.drain, Duration::from_secs(30));
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.pools[0].spread, 2);
        assert_eq!(c.pools[0].health.as_ref().unwrap().fall, 3);
        let d = c.pools[1].discover.as_ref().unwrap();
        assert_eq!(d.longpolling_port, Some(8072));
        assert_eq!(c.tenants.len(), 2);
        let acme = &c.tenants[0];
        assert_eq!(acme.settings.integration.unwrap().burst, 40);
        assert_eq!(acme.settings.integration.unwrap().concurrency, Some(8));
        let saas = &c.tenants[1];
        assert_eq!(saas.pool, 1);
        assert_eq!(saas.settings.request_timeout, Duration::from_secs(30));
        assert_eq!(saas.settings.connect_timeout, Duration::from_secs(3));
        assert_eq!(saas.database_for("beta").unwrap(), "beta");
        let m = c.hosts.lookup("beta.erp.example.com").unwrap();
        assert_eq!((m.tenant, m.captured), (1, Some("beta")));
        assert_eq!(c.hosts.lookup("erp.acme.com").unwrap().tenant, 0);
        let tls = c.tls.unwrap();
        assert_eq!(tls.default.as_deref(), Some("fallback"));
        assert_eq!(tls.certs_pos, Pos { line: 13, col: 9 });
        assert_eq!(c.version.len(), 64);
    }

    #[test]
    fn every_error_is_reported_with_its_position() {
        let text = r#"[listen]
http = "0.0.0.0:80"
htps = "0.0.0.0:443"

[pools.p]
http = ["10.0.0.1:8069", "not-an-address"]

[pools.empty]
spread = 1

[tenants.a]
hosts = ["a.example.com"]
pool = "nope"
request_timeout = "5 parsecs"

[tenants.b]
hosts = ["A.example.com"]
pool = "p"
integration = { rate = "fast" }
"#;
        let errs = load(text).unwrap_err();
        let lines: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
        let all = lines.join("\n");
        let expect = [
            "/etc/portier/portier.toml:3:1: unknown key `htps` in [listen] (did you mean `https`?)",
            "/etc/portier/portier.toml:6:26: `http`: \"not-an-address\" is not an IP:PORT",
            "/etc/portier/portier.toml:8:8: pool \"empty\" has no backends",
            "/etc/portier/portier.toml:13:8: tenant \"a\" names unknown pool \"nope\"",
            "/etc/portier/portier.toml:14:19: `request_timeout`: invalid duration",
            "/etc/portier/portier.toml:17:10: host \"a.example.com\" is already claimed by tenant \"a\"",
            "/etc/portier/portier.toml:19:24: `integration.rate`: invalid rate \"fast\"",
        ];
        for e in expect {
            assert!(
                lines.iter().any(|l| l.starts_with(e)),
                "missing {e:?} in:\n{all}"
            );
        }
        assert_eq!(lines.len(), expect.len(), "{all}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let errs = load("[listen]\nhttp = \"0.0.0.0:80\"\nthreads = \n").unwrap_err();
        assert!(errs[0].pos.line == 3, "{}", render(&errs));
        let errs = load("[listen]\nhttp = \"0.0.0.0:80\"\nhttp = \"0.0.0.0:81\"\n").unwrap_err();
        assert!(render(&errs).contains(":3:"), "{}", render(&errs));
    }

    #[test]
    fn unknown_keys_everywhere() {
        let text = r#"[listen]
http = "127.0.0.1:80"
[bogus]
x = 1
[pools.p]
http = ["127.0.0.1:8069"]
health = { path = "/web/health", evry = "5s" }
[tenants.t]
hosts = ["t.test"]
pool = "p"
integration = { rate = "1/s", concurency = 2 }
colour = "blue"
"#;
        let errs = load(text).unwrap_err();
        let all = render(&errs);
        assert!(
            all.contains(":3:2: unknown key `bogus` in the top level"),
            "{all}"
        );
        assert!(
            all.contains(":7:34: unknown key `evry` in `health` (did you mean `every`?)"),
            "{all}"
        );
        assert!(all.contains(":11:31: unknown key `concurency`"), "{all}");
        assert!(
            all.contains(":12:1: unknown key `colour` in [tenants.t]"),
            "{all}"
        );
        assert_eq!(errs.len(), 4, "{all}");
    }

    #[test]
    fn cross_section_rules() {
        let errs = load("[listen]\nhttps = \"127.0.0.1:443\"\n").unwrap_err();
        assert!(
            render(&errs).contains("no [tls] section"),
            "{}",
            render(&errs)
        );
        let errs = load("[listen]\nadmin = \"127.0.0.1:9900\"\n").unwrap_err();
        assert!(render(&errs).contains("at least one of `http` or `https`"));
        let errs = load(
            "[listen]\nhttp = \"127.0.0.1:80\"\n[pools.p]\nhttp=[\"127.0.0.1:1\"]\ndiscover = { dns = \"x.local\" }\n",
        )
        .unwrap_err();
        assert!(
            render(&errs).contains("either `discover` or static"),
            "{}",
            render(&errs)
        );
        let errs =
            load("[listen]\nhttp = \"127.0.0.1:80\"\nadmin = \"127.0.0.1:80\"\n").unwrap_err();
        assert!(render(&errs).contains("same address"), "{}", render(&errs));
    }

    #[test]
    fn limits_defaults_and_inheritance() {
        let text = r#"[listen]
http = "127.0.0.1:80"
[defaults]
integration = { rate = "600/min" }
max_body = 1024
[pools.p]
http = ["127.0.0.1:8069"]
[tenants.a]
hosts = ["a.test"]
pool = "p"
[tenants.b]
hosts = ["b.test"]
pool = "p"
integration = { concurrency = 3 }
interactive = { rate = "100/s", burst = 5 }
"#;
        let (c, _) = load(text).unwrap_or_else(|e| panic!("{}", render(&e)));
        let a = &c.tenants[0].settings;
        let lim = a.integration.unwrap();
        assert_eq!(lim.burst, 10);
        assert_eq!(lim.rate.unwrap().count, 600);
        assert_eq!(a.max_body, 1024);
        let b = &c.tenants[1].settings;
        assert_eq!(b.integration.unwrap().rate, None);
        assert_eq!(b.integration.unwrap().concurrency, Some(3));
        assert_eq!(b.interactive.unwrap().burst, 5);
        assert_eq!(b.max_body, 1024);
    }

    #[test]
    fn odoo_edge_keys_defaults_overrides_and_errors() {
        let text = r#"[listen]
http = "127.0.0.1:80"
[defaults]
compress = "all"
[pools.p]
http = ["127.0.0.1:8069"]
[tenants.a]
hosts = ["a.test"]
pool = "p"
[tenants.b]
hosts = ["b.test"]
pool = "p"
maintenance = true
login = "off"
compress = "off"
cache_assets = "0"
secure_cookies = false
[tenants.c]
hosts = ["c.test"]
pool = "p"
login = { rate = "3/min" }
"#;
        let (c, _) = load(text).unwrap_or_else(|e| panic!("{}", render(&e)));
        let a = &c.tenants[0];
        assert!(!a.maintenance);
        let login = a.settings.login.clone().unwrap();
        assert_eq!((login.rate.count, login.burst), (10, 5));
        assert_eq!(login.rate.per, Duration::from_secs(60));
        assert_eq!(a.settings.compress, Compress::All);
        assert_eq!(a.settings.cache_assets, 256 << 20);
        assert!(a.settings.secure_cookies);
        let b = &c.tenants[1];
        assert!(b.maintenance);
        assert_eq!(b.settings.login, None);
        assert_eq!(b.settings.compress, Compress::Off);
        assert_eq!(b.settings.cache_assets, 0);
        assert!(!b.settings.secure_cookies);
        let login = c.tenants[2].settings.login.clone().unwrap();
        assert_eq!((login.rate.count, login.burst), (3, 1));

        let bad = r#"[listen]
http = "127.0.0.1:80"
[defaults]
compress = "gzip"
login = { rate = "10/min", concurrency = 2 }
[pools.p]
http = ["127.0.0.1:8069"]
[tenants.a]
hosts = ["a.test"]
pool = "p"
maintenance = "yes"
login = "sometimes"
"#;
        let errs = load(bad).unwrap_err();
        let all = render(&errs);
        assert!(all.contains(":4:12: `compress` must be"), "{all}");
        assert!(
            all.contains(":5:28: unknown key `concurrency` in `login`"),
            "{all}"
        );
        assert!(all.contains(":11:15: `maintenance`"), "{all}");
        assert!(all.contains(":12:9: `login` must be \"off\""), "{all}");
        assert_eq!(errs.len(), 4, "{all}");
    }

    #[test]
    fn listen_hardening_keys() {
        let (c, _) = load("[listen]\nhttp = \"127.0.0.1:80\"\n")
            .unwrap_or_else(|e| panic!("{}", render(&e)));
        let l = &c.listen;
        assert_eq!((l.max_connections, l.max_connections_per_ip), (100_000, 0));
        assert_eq!(l.header_timeout, Duration::from_secs(10));
        assert_eq!(l.idle_timeout, Duration::from_secs(75));
        let (c, _) = load(
            "[listen]\nhttp = \"127.0.0.1:80\"\nmax_connections = 50\nmax_connections_per_ip = 5\nheader_timeout = \"2s\"\nidle_timeout = \"30s\"\n",
        )
        .unwrap_or_else(|e| panic!("{}", render(&e)));
        let l = &c.listen;
        assert_eq!((l.max_connections, l.max_connections_per_ip), (50, 5));
        assert_eq!(l.header_timeout, Duration::from_secs(2));
        assert_eq!(l.idle_timeout, Duration::from_secs(30));
        let errs = load(
            "[listen]\nhttp = \"127.0.0.1:80\"\nmax_connections = 0\nheader_timeout = \"0s\"\nidle_timeout = \"soon\"\n",
        )
        .unwrap_err();
        let all = render(&errs);
        assert!(all.contains(":3:19: `max_connections`"), "{all}");
        assert!(
            all.contains(":4:18: `header_timeout` must be longer than zero"),
            "{all}"
        );
        assert!(all.contains(":5:16: `idle_timeout`"), "{all}");
        assert_eq!(errs.iter().filter(|d| d.is_error()).count(), 3, "{all}");
    }

    #[test]
    fn cluster_section() {
        let base = "[listen]\nhttp = \"127.0.0.1:80\"\n";
        let (c, _) = load(base).unwrap_or_else(|e| panic!("{}", render(&e)));
        assert_eq!(c.cluster, None);
        let (c, _) = load(&format!(
            "{base}[cluster]\nredis = \"redis://10.0.2.5:6379/0\"\n"
        ))
        .unwrap_or_else(|e| panic!("{}", render(&e)));
        let cl = c.cluster.unwrap();
        assert_eq!(cl.redis, "redis://10.0.2.5:6379/0");
        assert_eq!(cl.key_prefix, "portier:");
        assert_eq!(cl.timeout, Duration::from_millis(50));
        for ok in [
            "rediss://user:pw@redis.internal:6380",
            "redis://[::1]:6379/2",
            "redis://localhost",
        ] {
            let text = format!(
                "{base}[cluster]\nredis = \"{ok}\"\nkey_prefix = \"eu:\"\ntimeout = \"20ms\"\n"
            );
            let (c, _) = load(&text).unwrap_or_else(|e| panic!("{ok}: {}", render(&e)));
            let cl = c.cluster.unwrap();
            assert_eq!(
                (cl.key_prefix.as_str(), cl.timeout),
                ("eu:", Duration::from_millis(20))
            );
        }
        // Every error of the section is reported, each with its position.
        let errs = load(&format!(
            "{base}[cluster]\nredis = \"http://10.0.2.5:6379\"\ntimeout = \"0ms\"\nprefix = \"x\"\n"
        ))
        .unwrap_err();
        let all = render(&errs);
        assert!(
            all.contains(":4:9: `redis` must be a redis:// or rediss:// URL"),
            "{all}"
        );
        assert!(
            all.contains(":5:11: `timeout` must be longer than zero"),
            "{all}"
        );
        assert!(
            all.contains(":6:1: unknown key `prefix` in [cluster]"),
            "{all}"
        );
        assert_eq!(errs.iter().filter(|d| d.is_error()).count(), 3, "{all}");
        for (bad, why) in [
            ("redis://", "has no host"),
            ("redis://:6379", "has no host"),
            ("redis://h:port", "has a bad port"),
            ("redis://h:6379/db", "has a bad database number"),
        ] {
            let all = render(&load(&format!("{base}[cluster]\nredis = \"{bad}\"\n")).unwrap_err());
            assert!(all.contains(why), "{bad}: {all}");
        }
        let all = render(&load(&format!("{base}[cluster]\nkey_prefix = \"x\"\n")).unwrap_err());
        assert!(all.contains("[cluster] needs `redis`"), "{all}");
    }

    #[test]
    fn routes_match_element_wise_longest_first() {
        let text = r#"[listen]
http = "0.0.0.0:80"
[pools.web]
http = ["10.0.0.1:8069"]
[pools.batch]
http = ["10.0.0.2:8069"]
[pools.login]
http = ["10.0.0.3:8069"]
[tenants.acme]
hosts = ["acme.test"]
pool = "web"
routes = [
  { path = "/xmlrpc/", pool = "batch" },
  { path = "/jsonrpc", pool = "batch" },
  { path = "/web", pool = "batch" },
  { path = "/web/dataset", pool = "web" },
  { path = "/web/login", pool = "login", exact = true },
]
"#;
        let (c, _) = load(text).unwrap_or_else(|e| panic!("{}", render(&e)));
        let t = &c.tenants[0];
        let (web, batch, login) = (0, 1, 2);
        for (path, want) in [
            ("/jsonrpc", batch),
            ("/jsonrpc/x", batch),
            ("/jsonrpc2", web),
            ("/xmlrpc", batch),
            ("/xmlrpc/2/object", batch),
            ("/xmlrpcx", web),
            ("/web", batch),
            ("/web/action", batch),
            // the longest match wins
            ("/web/dataset/call_kw", web),
            // exact: that path only
            ("/web/login", login),
            ("/web/login/x", batch),
            ("/odoo", web),
            ("/", web),
        ] {
            assert_eq!(t.pool_for(path), want, "{path}");
        }
        // Routes are optional.
        let plain = load(&text[..text.find("routes").unwrap()]).unwrap().0;
        assert!(plain.tenants[0].routes.is_empty());
        assert_eq!(plain.tenants[0].pool_for("/jsonrpc"), web);
    }

    #[test]
    fn bad_routes_are_reported_at_their_values() {
        let text = r#"[listen]
http = "0.0.0.0:80"
[pools.web]
http = ["10.0.0.1:8069"]
[tenants.acme]
hosts = ["acme.test"]
pool = "web"
routes = [
  { path = "jsonrpc", pool = "web" },
  { path = "/x", pool = "nope" },
  { path = "/y" },
  { path = "/z", pool = "web", colour = "blue" },
  { path = "/z/", pool = "web" },
]
"#;
        let errs = load(text).unwrap_err();
        let all = render(&errs);
        for want in [
            ":9:12: route `path` \"jsonrpc\" must start with `/`",
            ":10:25: route names unknown pool \"nope\"",
            ":11:3: a route needs `pool`",
            ":12:32: unknown key `colour` in a route of tenant \"acme\"",
            ":13:12: route `path` \"/z\" is given twice",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert_eq!(errs.iter().filter(|d| d.is_error()).count(), 5, "{all}");
    }

    #[test]
    fn positions() {
        assert_eq!(Pos::of_offset("ab\ncd", 0), Pos { line: 1, col: 1 });
        assert_eq!(Pos::of_offset("ab\ncd", 4), Pos { line: 2, col: 2 });
        assert_eq!(Pos::of_offset("é\nx", 3), Pos { line: 2, col: 1 });
    }
}
