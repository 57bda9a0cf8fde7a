//! The validated configuration model. The proxy never sees raw TOML: it gets these
//! types, built and checked by [`crate::load`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::hosts::{HostIndex, HostPattern};
use crate::units::Rate;
use crate::Pos;

/// A whole, validated configuration file.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from (as given).
    pub path: PathBuf,
    /// Hex SHA-256 of the file's bytes: the "version" of `/status`.
    pub version: String,
    pub listen: Listen,
    pub log: LogSettings,
    pub tls: Option<Tls>,
    /// `[cluster]` (r2): replicas share `rate` limits through Redis.
    pub cluster: Option<Cluster>,
    pub pools: Vec<Pool>,
    pub tenants: Vec<Tenant>,
    pub hosts: HostIndex,
    /// `[defaults]`: the settings a tenant inherits (and the process-wide ones, such
    /// as the asset cache's total size).
    pub defaults: Arc<Settings>,
    /// `[kubernetes]` (r3): objects of the API server as a second source of pools,
    /// tenants and certificates.
    pub kubernetes: Option<Kubernetes>,
}

impl Config {
    /// `[tls.acme]`, if set.
    pub fn acme(&self) -> Option<&Acme> {
        self.tls.as_ref().and_then(|t| t.acme.as_ref())
    }

    pub fn pool_by_name(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    /// This configuration with another front end's pools and tenants added (their pool
    /// indices count from 0 in `pools`). A host that an earlier tenant (the file's
    /// first) claims stays that tenant's: it is taken out of the later one, which is
    /// left out when none remains; each such tenant is reported as its index in
    /// `tenants` with the hosts it lost.
    pub fn merged(
        mut self,
        pools: Vec<Pool>,
        tenants: Vec<Tenant>,
        version: &str,
    ) -> (Config, Vec<(usize, Vec<String>)>) {
        let offset = self.pools.len();
        self.pools.extend(pools);
        let mut conflicts = Vec::new();
        for (i, mut t) in tenants.into_iter().enumerate() {
            let id = self.tenants.len();
            let (free, taken): (Vec<_>, Vec<_>) = t
                .hosts
                .into_iter()
                .partition(|h| self.hosts.claimed_by(h).is_none());
            if !taken.is_empty() {
                conflicts.push((i, taken.iter().map(|h| h.to_string()).collect()));
            }
            if free.is_empty() {
                continue;
            }
            for h in &free {
                let _ = self.hosts.insert(h, id);
            }
            t.hosts = free;
            t.pool += offset;
            for r in &mut t.routes {
                r.pool += offset;
            }
            self.tenants.push(t);
        }
        self.version = format!("{}+{version}", self.version);
        (self, conflicts)
    }
}

/// `[kubernetes]` (r3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kubernetes {
    /// A kubeconfig file; `None`: the pod's service account, then `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces watched; empty: all.
    pub namespaces: Vec<String>,
    pub gateway_class: String,
    pub ingress_class: String,
    /// Write status back (only the replica holding the lease does).
    pub status: bool,
    /// The Lease's namespace and name.
    pub lease: (String, String),
    /// What Ingress status and Gateway addresses report; empty: nothing.
    pub status_address: String,
}

impl Default for Kubernetes {
    fn default() -> Self {
        Kubernetes {
            kubeconfig: None,
            namespaces: Vec::new(),
            gateway_class: "portier".into(),
            ingress_class: "portier".into(),
            status: true,
            lease: ("portier".into(), "portier-status".into()),
            status_address: String::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub drain: Duration,
    /// Worker threads for the listeners; 0 = one per CPU.
    pub threads: usize,
    /// Where bodies and responses beyond memory are buffered (r2).
    pub spool_dir: PathBuf,
    /// Client connections open at once; beyond it new ones are closed at once (r2).
    pub max_connections: usize,
    /// Per peer address; 0 = no cap (r2).
    pub max_connections_per_ip: usize,
    /// A request's header block must arrive within this, else 408 (r2).
    pub header_timeout: Duration,
    /// Keep-alive connections idle longer than this are closed (r2).
    pub idle_timeout: Duration,
}

/// The default `spool_dir`: `$PORTIER_SPOOL_DIR`, then the system temp dir.
pub fn default_spool_dir() -> PathBuf {
    std::env::var_os("PORTIER_SPOOL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    pub access: bool,
}

/// `[cluster]` (r2): the Redis that replicas share their rate limits through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// A `redis://` or `rediss://` URL (checked for its scheme and host, never contacted
    /// by the loader).
    pub redis: String,
    /// Prepended to every key, so several clusters can share one Redis.
    pub key_prefix: String,
    /// A Redis answer slower than this counts as Redis unavailable.
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    /// Directory of `NAME.crt` + `NAME.key` pairs (resolved against the config's
    /// directory); `None` only with `[kubernetes]`
    /// (r3), whose Secrets supply the certificates.
    pub certs: Option<PathBuf>,
    /// Where `certs` is written in the file, for certificate diagnostics.
    pub certs_pos: Pos,
    pub default: Option<String>,
    pub default_pos: Option<Pos>,
    pub redirect_http: bool,
    pub hsts: Option<String>,
    /// `[tls.acme]` (r2): certificates obtained and renewed automatically.
    pub acme: Option<Acme>,
}

/// `[tls.acme]`: the ACME account and what to order (RFC 8555).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acme {
    /// The account's contact (`mailto:`), if any.
    pub email: Option<String>,
    pub directory: String,
    pub challenge: AcmeChallenge,
    /// An extra root trusted for the directory's TLS (private ACME servers, tests).
    pub ca: Option<PathBuf>,
    /// Renew when a certificate has less than this left.
    pub renew_before: Duration,
    /// Template tenants: order a host's certificate at its first handshake.
    pub on_demand: bool,
    pub on_demand_rate: Rate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcmeChallenge {
    Http01,
    TlsAlpn01,
}

/// Per-tenant settings: `[defaults]`, overridden key by key in a tenant.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub longpolling_timeout: Duration,
    pub websocket_idle: Duration,
    pub max_body: u64,
    pub buffer_body: u64,
    /// Worker responses read ahead of the client, in memory (r2).
    pub buffer_response: u64,
    /// Beyond this much spooled, a response streams at the client's pace (r2).
    pub max_response_spool: u64,
    pub block_database_manager: bool,
    pub admin_cidrs: Vec<IpNet>,
    pub trusted_proxies: Vec<IpNet>,
    pub integration: Option<Limit>,
    pub interactive: Option<Limit>,
    /// Per client address and tenant on the login paths (r2); `None` is "off".
    pub login: Option<LoginLimit>,
    /// Which responses portier compresses (r2).
    pub compress: Compress,
    /// Memory for cached asset bundles, in bytes; 0 turns caching off (r2).
    pub cache_assets: u64,
    /// Over TLS, `Secure` and `SameSite=Lax` on Odoo's `session_id` cookie (r2).
    pub secure_cookies: bool,
}

/// The login limit: a GCRA of `rate` with `burst` attempts at once.
#[derive(Clone, Debug, PartialEq)]
pub struct LoginLimit {
    pub rate: Rate,
    pub burst: u32,
}

/// `compress`: which classes get compressed responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compress {
    Off,
    /// Only the `static` class (assets and static files carry no secrets).
    Static,
    /// Every class but `longpolling`.
    All,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(120),
            longpolling_timeout: Duration::from_secs(75),
            websocket_idle: Duration::from_secs(3600),
            max_body: 128 << 20,
            buffer_body: 1 << 20,
            buffer_response: 1 << 20,
            max_response_spool: 1 << 30,
            block_database_manager: true,
            admin_cidrs: vec![
                IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
                IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
            ],
            trusted_proxies: Vec::new(),
            integration: None,
            interactive: None,
            login: Some(LoginLimit {
                rate: Rate {
                    count: 10,
                    per: Duration::from_secs(60),
                },
                burst: 5,
            }),
            compress: Compress::Static,
            cache_assets: 256 << 20,
            secure_cookies: true,
        }
    }
}

impl Settings {
    pub fn is_admin(&self, ip: IpAddr) -> bool {
        contains(&self.admin_cidrs, ip)
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        contains(&self.trusted_proxies, ip)
    }
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    nets.iter().any(|n| n.contains(&ip))
}

/// A rate and/or concurrency limit for one traffic class of a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub rate: Option<Rate>,
    /// Requests allowed at once above the rate; defaults to one second's worth (at least 1).
    pub burst: u32,
    pub concurrency: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub name: String,
    pub http: Vec<SocketAddr>,
    pub longpolling: Vec<SocketAddr>,
    pub discover: Option<Discover>,
    /// HTTP backends each tenant is pinned to; 0 = all.
    pub spread: usize,
    pub health: Option<Health>,
    pub breaker: Breaker,
    pub retries: u32,
    /// Requests in flight at once per HTTP backend (its Odoo `workers`); 0 = no cap (r2).
    pub workers: u32,
    pub queue: QueueCfg,
    /// Where this pool's Odoo `data_dir/filestore` is mounted (r3): answers handing a
    /// file over (`X-Accel-Redirect`) are sent from it. `None`: no offload.
    pub filestore: Option<PathBuf>,
    /// Members supplied at run time by a provider (Kubernetes EndpointSlices), not by
    /// `http`/`longpolling`: the snapshot takes them from the runtime's member map, as
    /// for `discover`.
    pub provided: bool,
}

impl Pool {
    /// A pool named `name` with no members and every key at its default.
    pub fn empty(name: &str) -> Pool {
        Pool {
            name: name.to_string(),
            http: Vec::new(),
            longpolling: Vec::new(),
            discover: None,
            spread: 0,
            health: None,
            breaker: Breaker::default(),
            retries: 1,
            workers: 0,
            queue: QueueCfg::default(),
            filestore: None,
            provided: false,
        }
    }
}

/// The pool's queue of requests waiting for a worker slot (r2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCfg {
    pub max: usize,
    pub timeout: Duration,
    /// Worker slots of the pool that only interactive requests may take (extension).
    pub reserve: u32,
}

impl Default for QueueCfg {
    fn default() -> Self {
        QueueCfg {
            max: 1000,
            timeout: Duration::from_secs(30),
            reserve: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discover {
    pub dns: String,
    pub http_port: u16,
    pub longpolling_port: Option<u16>,
    pub every: Duration,
    pub resolver: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub path: String,
    pub every: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            path: "/web/health".into(),
            every: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    pub failures: u32,
    pub open_for: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            failures: 5,
            open_for: Duration::from_secs(15),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tenant {
    /// The key of `[tenants.NAME]`.
    pub name: String,
    pub hosts: Vec<HostPattern>,
    /// Index into [`Config::pools`].
    pub pool: usize,
    /// The database; may contain `{tenant}`, replaced by the tenant's effective name.
    pub database: Option<String>,
    pub settings: Arc<Settings>,
    /// Answer every client outside `admin_cidrs` with the maintenance page (r2).
    pub maintenance: bool,
    /// Path prefixes sent to another pool's HTTP backends (r3), longest first: the
    /// first that matches is the longest match.
    pub routes: Vec<Route>,
}

/// A tenant's route: requests whose path matches `path` go to `pool`'s HTTP backends
/// instead of the tenant's pool; limits, login and maintenance stay the tenant's, and
/// longpolling always uses the tenant's pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Starts with `/`; as a prefix, without a trailing `/` (but `/` itself).
    pub path: String,
    /// Matches `path` only, not the paths under it.
    pub exact: bool,
    /// Index into [`Config::pools`].
    pub pool: usize,
}

impl Route {
    /// A prefix matches element by element, as Gateway API's `PathPrefix`: `/jsonrpc`
    /// matches `/jsonrpc` and `/jsonrpc/x`, not `/jsonrpc2`. `path` has no query string.
    pub fn matches(&self, path: &str) -> bool {
        if self.exact {
            return path == self.path;
        }
        if self.path == "/" {
            return true;
        }
        match path.strip_prefix(self.path.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// The order that makes the first match the longest: longer paths first, an exact
    /// route before a prefix of the same path.
    pub fn precedence(a: &Route, b: &Route) -> std::cmp::Ordering {
        b.path
            .len()
            .cmp(&a.path.len())
            .then_with(|| b.exact.cmp(&a.exact))
    }
}

impl Tenant {
    /// The pool of an HTTP request (not a longpoll) for the normalised `path`: the
    /// longest matching route's, else the tenant's.
    pub fn pool_for(&self, path: &str) -> usize {
        self.routes
            .iter()
            .find(|r| r.matches(path))
            .map_or(self.pool, |r| r.pool)
    }

    /// The database for a request whose effective tenant name is `name`.
    pub fn database_for<'a>(&'a self, name: &str) -> Option<std::borrow::Cow<'a, str>> {
        let db = self.database.as_deref()?;
        if db.contains("{tenant}") {
            Some(std::borrow::Cow::Owned(db.replace("{tenant}", name)))
        } else {
            Some(std::borrow::Cow::Borrowed(db))
        }
    }
}
