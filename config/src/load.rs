//! Reading a TOML file into the validated [`Config`], collecting every problem as a
//! [`Diagnostic`] with the line and column of the offending key or value.

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

type Val<'i> = Spanned<DeValue<'i>>;

/// Collects diagnostics and turns byte offsets into line and column.
pub(crate) struct Cx<'s> {
    file: String,
    src: &'s str,
    pub(crate) diags: Vec<Diagnostic>,
}

impl<'s> Cx<'s> {
    fn new(file: String, src: &'s str) -> Self {
        Cx {
            file,
            src,
            diags: Vec::new(),
        }
    }

    fn pos(&self, offset: usize) -> Pos {
        Pos::of_offset(self.src, offset)
    }

    fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        let pos = self.pos(span.start);
        self.diags
            .push(Diagnostic::error(&self.file, pos, message.into()));
    }

    fn warn(&mut self, span: &Range<usize>, message: impl Into<String>) {
        let pos = self.pos(span.start);
        self.diags
            .push(Diagnostic::warning(&self.file, pos, message.into()));
    }

    fn has_errors(&self) -> bool {
        self.diags.iter().any(|d| d.is_error())
    }
}

/// A table being read: remembers which keys were used so the rest can be reported.
struct Tbl<'t, 'i> {
    entries: Vec<(&'t Spanned<DeString<'i>>, &'t Val<'i>, bool)>,
    what: String,
    known: &'static [&'static str],
}

impl<'t, 'i> Tbl<'t, 'i> {
    fn new(
        table: &'t DeTable<'i>,
        what: impl Into<String>,
        known: &'static [&'static str],
    ) -> Self {
        Tbl {
            entries: table.iter().map(|(k, v)| (k, v, false)).collect(),
            what: what.into(),
            known,
        }
    }

    fn get(&mut self, key: &str) -> Option<&'t Val<'i>> {
        for e in self.entries.iter_mut() {
            if e.0.get_ref().as_ref() == key {
                e.2 = true;
                return Some(e.1);
            }
        }
        None
    }

    fn finish(self, cx: &mut Cx<'_>) {
        for (k, _, used) in self.entries {
            if !used {
                let name = k.get_ref().as_ref();
                let hint = suggest(name, self.known)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                cx.error(
                    &k.span(),
                    format!(
                        "unknown key `{name}` in {}{hint}; expected one of: {}",
                        self.what,
                        self.known.join(", ")
                    ),
                );
            }
        }
    }
}

/// The closest known key, when one is close enough to be a typo.
fn suggest(name: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn want_str<'t>(cx: &mut Cx<'_>, key: &str, v: &'t Val<'_>) -> Option<&'t str> {
    match v.get_ref() {
        DeValue::String(s) => Some(s.as_ref()),
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be a string, found {}", type_name(other)),
            );
            None
        }
    }
}

fn want_bool(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<bool> {
    match v.get_ref() {
        DeValue::Boolean(b) => Some(*b),
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be true or false, found {}", type_name(other)),
            );
            None
        }
    }
}

fn want_uint(cx: &mut Cx<'_>, key: &str, v: &Val<'_>, min: u64, max: u64) -> Option<u64> {
    match v.get_ref() {
        DeValue::Integer(i) => {
            let parsed = i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok();
            match parsed {
                Some(n) if n >= 0 && (n as u64) >= min && (n as u64) <= max => Some(n as u64),
                _ => {
                    cx.error(
                        &v.span(),
                        format!("`{key}` must be a whole number from {min} to {max}"),
                    );
                    None
                }
            }
        }
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be a whole number, found {}", type_name(other)),
            );
            None
        }
    }
}

fn want_duration(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Duration> {
    match v.get_ref() {
        DeValue::String(s) => match parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                cx.error(&v.span(), format!("`{key}`: {e}"));
                None
            }
        },
        other => {
            cx.error(
                &v.span(),
                format!(
                    "`{key}` must be a duration string such as \"5s\" or \"250ms\", found {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}

fn want_positive_duration(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Duration> {
    let d = want_duration(cx, key, v)?;
    if d.is_zero() {
        cx.error(&v.span(), format!("`{key}` must be longer than zero"));
        return None;
    }
    Some(d)
}

fn want_size(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<u64> {
    match v.get_ref() {
        DeValue::String(s) => match parse_size(s) {
            Ok(n) => Some(n),
            Err(e) => {
                cx.error(&v.span(), format!("`{key}`: {e}"));
                None
            }
        },
        DeValue::Integer(_) => want_uint(cx, key, v, 0, u64::MAX / 2),
        other => {
            cx.error(
                &v.span(),
                format!(
                    "`{key}` must be a size such as \"512KiB\" or \"128MiB\", found {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}

fn want_addr(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<SocketAddr> {
    let s = want_str(cx, key, v)?;
    parse_addr(s)
        .map_err(|e| cx.error(&v.span(), format!("`{key}`: {e}")))
        .ok()
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        format!("\"{s}\" is not an IP:PORT address (e.g. \"10.0.1.11:8069\" or \"[::1]:8069\"; use `discover` for DNS names)")
    })
}

fn want_array<'t, 'i>(cx: &mut Cx<'_>, key: &str, v: &'t Val<'i>) -> Option<Vec<&'t Val<'i>>> {
    match v.get_ref() {
        DeValue::Array(a) => Some(a.iter().collect()),
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be an array, found {}", type_name(other)),
            );
            None
        }
    }
}

fn want_table<'t, 'i>(cx: &mut Cx<'_>, key: &str, v: &'t Val<'i>) -> Option<&'t DeTable<'i>> {
    match v.get_ref() {
        DeValue::Table(t) => Some(t),
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be a table, found {}", type_name(other)),
            );
            None
        }
    }
}

fn want_addrs(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Vec<SocketAddr>> {
    let items = want_array(cx, key, v)?;
    let mut out = Vec::with_capacity(items.len());
    let mut seen = HashSet::new();
    let mut ok = true;
    for item in items {
        match want_addr(cx, key, item) {
            Some(a) => {
                if !seen.insert(a) {
                    cx.error(&item.span(), format!("`{key}`: {a} is listed twice"));
                    ok = false;
                }
                out.push(a)
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn want_cidrs(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Vec<IpNet>> {
    let items = want_array(cx, key, v)?;
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in items {
        let Some(s) = want_str(cx, key, item) else {
            ok = false;
            continue;
        };
        let parsed = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(n) => out.push(n.trunc()),
            Err(_) => {
                cx.error(
                    &item.span(),
                    format!(
                        "`{key}`: \"{s}\" is not a CIDR such as \"10.0.0.0/8\" or an IP address"
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

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

const ROOT_KEYS: &[&str] = &["listen", "log", "tls", "defaults", "pools", "tenants"];
const LISTEN_KEYS: &[&str] = &["http", "https", "admin", "drain", "threads"];
const LOG_KEYS: &[&str] = &["access"];
const TLS_KEYS: &[&str] = &["certs", "default", "redirect_http", "hsts"];
const SETTINGS_KEYS: &[&str] = &[
    "connect_timeout",
    "request_timeout",
    "longpolling_timeout",
    "websocket_idle",
    "max_body",
    "buffer_body",
    "block_database_manager",
    "admin_cidrs",
    "trusted_proxies",
    "integration",
    "interactive",
];
const TENANT_KEYS: &[&str] = &[
    "hosts",
    "pool",
    "database",
    "connect_timeout",
    "request_timeout",
    "longpolling_timeout",
    "websocket_idle",
    "max_body",
    "buffer_body",
    "block_database_manager",
    "admin_cidrs",
    "trusted_proxies",
    "integration",
    "interactive",
];
const POOL_KEYS: &[&str] = &[
    "http",
    "longpolling",
    "discover",
    "spread",
    "health",
    "breaker",
    "retries",
];
const LIMIT_KEYS: &[&str] = &["rate", "burst", "concurrency"];
const HEALTH_KEYS: &[&str] = &["path", "every", "timeout", "rise", "fall"];
const BREAKER_KEYS: &[&str] = &["failures", "open_for"];
const DISCOVER_KEYS: &[&str] = &["dns", "http_port", "longpolling_port", "every", "resolver"];

fn read_document(
    cx: &mut Cx<'_>,
    doc: &DeTable<'_>,
    path: &Path,
    base_dir: &Path,
    text: &str,
) -> Option<Config> {
    let mut root = Tbl::new(doc, "the top level", ROOT_KEYS);

    let listen = match root.get("listen") {
        Some(v) => want_table(cx, "listen", v).and_then(|t| read_listen(cx, t)),
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
    let tls_val = root.get("tls");
    let tls =
        tls_val.and_then(|v| want_table(cx, "tls", v).and_then(|t| read_tls(cx, t, base_dir)));
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
                    if let Some(p) = read_pool(cx, &name_str, &name.span(), pt) {
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

    if tenants.is_empty() && tenants_val.is_none() {
        cx.warn(
            &(0..0),
            "no [tenants.*] configured: every request will get 404",
        );
    }

    // Cross-section checks.
    if let Some(l) = &listen {
        if l.https.is_some() && tls.is_none() && tls_val.is_none() {
            cx.error(
                &(0..0),
                "`listen.https` is set but there is no [tls] section",
            );
        }
        if l.http.is_none() && l.https.is_none() {
            cx.error(&(0..0), "[listen] needs at least one of `http` or `https`");
        }
    }

    let version = sha256_hex(text.as_bytes());
    Some(Config {
        path: path.to_path_buf(),
        version,
        listen: listen?,
        log: log?,
        tls,
        pools,
        tenants,
        hosts,
    })
}

fn placeholder_pool(name: &str) -> Pool {
    Pool {
        name: name.to_string(),
        http: Vec::new(),
        longpolling: Vec::new(),
        discover: None,
        spread: 0,
        health: None,
        breaker: Breaker::default(),
        retries: 1,
    }
}

/// Hex SHA-256 of bytes: the version of a configuration file.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn read_listen(cx: &mut Cx<'_>, t: &DeTable<'_>) -> Option<Listen> {
    let mut tbl = Tbl::new(t, "[listen]", LISTEN_KEYS);
    let mut ok = true;
    let mut addr = |cx: &mut Cx<'_>, tbl: &mut Tbl<'_, '_>, key: &str| -> Option<SocketAddr> {
        let v = tbl.get(key)?;
        let a = want_addr(cx, key, v);
        if a.is_none() {
            ok = false;
        }
        a
    };
    let http = addr(cx, &mut tbl, "http");
    let https = addr(cx, &mut tbl, "https");
    let admin = addr(cx, &mut tbl, "admin");
    let mut listen = Listen {
        http,
        https,
        admin,
        drain: Duration::from_secs(30),
        threads: 0,
    };
    if let Some(v) = tbl.get("drain") {
        match want_duration(cx, "drain", v) {
            Some(d) => listen.drain = d,
            None => ok = false,
        }
    }
    if let Some(v) = tbl.get("threads") {
        match want_uint(cx, "threads", v, 0, 1024) {
            Some(n) => listen.threads = n as usize,
            None => ok = false,
        }
    }
    let addrs: Vec<(&str, Option<SocketAddr>)> = vec![
        ("http", listen.http),
        ("https", listen.https),
        ("admin", listen.admin),
    ];
    for (i, (a_name, a)) in addrs.iter().enumerate() {
        for (b_name, b) in addrs.iter().skip(i + 1) {
            if let (Some(a), Some(b)) = (a, b) {
                if a == b {
                    if let Some(v) = tbl.get(b_name) {
                        cx.error(
                            &v.span(),
                            format!("`{b_name}` uses the same address as `{a_name}` ({a})"),
                        );
                    }
                    ok = false;
                }
            }
        }
    }
    tbl.finish(cx);
    ok.then_some(listen)
}

fn read_log(cx: &mut Cx<'_>, t: &DeTable<'_>) -> LogSettings {
    let mut tbl = Tbl::new(t, "[log]", LOG_KEYS);
    let mut log = LogSettings { access: true };
    if let Some(v) = tbl.get("access") {
        if let Some(b) = want_bool(cx, "access", v) {
            log.access = b;
        }
    }
    tbl.finish(cx);
    log
}

fn read_tls(cx: &mut Cx<'_>, t: &DeTable<'_>, base_dir: &Path) -> Option<Tls> {
    let mut tbl = Tbl::new(t, "[tls]", TLS_KEYS);
    let certs = match tbl.get("certs") {
        Some(v) => want_str(cx, "certs", v).map(|s| {
            let p = PathBuf::from(s);
            let p = if p.is_absolute() { p } else { base_dir.join(p) };
            (p, cx.pos(v.span().start))
        }),
        None => {
            cx.error(
                &(0..0),
                "[tls] needs `certs`, the directory of NAME.crt + NAME.key pairs",
            );
            None
        }
    };
    let mut default = None;
    let mut default_pos = None;
    if let Some(v) = tbl.get("default") {
        if let Some(s) = want_str(cx, "default", v) {
            if s.is_empty() || s.contains('/') {
                cx.error(
                    &v.span(),
                    "`default` must be the NAME of a NAME.crt/NAME.key pair",
                );
            } else {
                default = Some(s.to_string());
                default_pos = Some(cx.pos(v.span().start));
            }
        }
    }
    let mut redirect_http = false;
    if let Some(v) = tbl.get("redirect_http") {
        redirect_http = want_bool(cx, "redirect_http", v).unwrap_or(false);
    }
    let mut hsts = None;
    if let Some(v) = tbl.get("hsts") {
        if let Some(s) = want_str(cx, "hsts", v) {
            if s.is_empty() || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                cx.error(
                    &v.span(),
                    "`hsts` must be a non-empty header value such as \"max-age=31536000\"",
                );
            } else if !s.to_ascii_lowercase().contains("max-age=") {
                cx.error(&v.span(), "`hsts` must contain max-age=SECONDS");
            } else {
                hsts = Some(s.to_string());
            }
        }
    }
    tbl.finish(cx);
    let (certs, certs_pos) = certs?;
    Some(Tls {
        certs,
        certs_pos,
        default,
        default_pos,
        redirect_http,
        hsts,
    })
}

/// Reads the per-tenant settings keys present in `tbl` over `base`.
fn read_settings(cx: &mut Cx<'_>, tbl: &mut Tbl<'_, '_>, base: &Settings) -> Settings {
    let mut s = base.clone();
    // Each key: read with its converter; a bad value is reported and the default kept.
    macro_rules! field {
        ($key:literal, $want:expr, $field:ident) => {
            if let Some(v) = tbl.get($key) {
                if let Some(x) = $want(cx, $key, v) {
                    s.$field = x;
                }
            }
        };
    }
    field!("connect_timeout", want_positive_duration, connect_timeout);
    field!("request_timeout", want_positive_duration, request_timeout);
    field!(
        "longpolling_timeout",
        want_positive_duration,
        longpolling_timeout
    );
    field!("websocket_idle", want_positive_duration, websocket_idle);
    field!("max_body", want_size, max_body);
    field!("buffer_body", want_size, buffer_body);
    field!("block_database_manager", want_bool, block_database_manager);
    field!("admin_cidrs", want_cidrs, admin_cidrs);
    field!("trusted_proxies", want_cidrs, trusted_proxies);
    if let Some(v) = tbl.get("integration") {
        s.integration = read_limit(cx, "integration", v);
    }
    if let Some(v) = tbl.get("interactive") {
        s.interactive = read_limit(cx, "interactive", v);
    }
    s
}

fn read_limit(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Limit> {
    let t = want_table(cx, key, v)?;
    let mut tbl = Tbl::new(t, format!("`{key}`"), LIMIT_KEYS);
    let mut rate = None;
    if let Some(rv) = tbl.get("rate") {
        if let Some(s) = want_str(cx, "rate", rv) {
            match parse_rate(s) {
                Ok(r) => rate = Some(r),
                Err(e) => cx.error(&rv.span(), format!("`{key}.rate`: {e}")),
            }
        }
    }
    let burst_v = tbl.get("burst");
    let burst = burst_v.and_then(|bv| want_uint(cx, "burst", bv, 1, 1_000_000));
    let concurrency = tbl
        .get("concurrency")
        .and_then(|cv| want_uint(cx, "concurrency", cv, 1, 1_000_000))
        .map(|n| n as u32);
    if let (Some(bv), None) = (burst_v, rate) {
        if tbl.entries.iter().all(|e| e.0.get_ref().as_ref() != "rate") {
            cx.error(&bv.span(), format!("`{key}.burst` needs a `rate`"));
        }
    }
    if rate.is_none()
        && concurrency.is_none()
        && !tbl
            .entries
            .iter()
            .any(|e| matches!(e.0.get_ref().as_ref(), "rate" | "concurrency"))
    {
        cx.error(
            &v.span(),
            format!("`{key}` needs a `rate`, a `concurrency` or both"),
        );
    }
    tbl.finish(cx);
    let burst = match (burst, rate) {
        (Some(b), _) => b as u32,
        (None, Some(r)) => (r.per_second().ceil() as u32).max(1),
        (None, None) => 1,
    };
    Some(Limit {
        rate,
        burst,
        concurrency,
    })
}

fn read_pool(
    cx: &mut Cx<'_>,
    name: &str,
    name_span: &Range<usize>,
    t: &DeTable<'_>,
) -> Option<Pool> {
    let mut tbl = Tbl::new(t, format!("[pools.{name}]"), POOL_KEYS);
    let errors_before = cx.diags.iter().filter(|d| d.is_error()).count();
    let mut pool = placeholder_pool(name);
    if !valid_name(name) {
        cx.error(
            name_span,
            format!("pool name \"{name}\" may only use letters, digits, '-', '_' and '.'"),
        );
    }
    let http_v = tbl.get("http");
    if let Some(v) = http_v {
        pool.http = want_addrs(cx, "http", v).unwrap_or_default();
    }
    let longpolling_v = tbl.get("longpolling");
    if let Some(v) = longpolling_v {
        pool.longpolling = want_addrs(cx, "longpolling", v).unwrap_or_default();
    }
    let discover_v = tbl.get("discover");
    if let Some(v) = discover_v {
        pool.discover = read_discover(cx, v);
    }
    if let Some(v) = tbl.get("spread") {
        pool.spread = want_uint(cx, "spread", v, 0, 10_000).unwrap_or(0) as usize;
    }
    if let Some(v) = tbl.get("health") {
        pool.health = read_health(cx, v);
    }
    if let Some(v) = tbl.get("breaker") {
        if let Some(bt) = want_table(cx, "breaker", v) {
            let mut b = Tbl::new(bt, "`breaker`", BREAKER_KEYS);
            if let Some(fv) = b.get("failures") {
                if let Some(n) = want_uint(cx, "failures", fv, 1, 10_000) {
                    pool.breaker.failures = n as u32;
                }
            }
            if let Some(ov) = b.get("open_for") {
                if let Some(d) = want_positive_duration(cx, "open_for", ov) {
                    pool.breaker.open_for = d;
                }
            }
            b.finish(cx);
        }
    }
    if let Some(v) = tbl.get("retries") {
        pool.retries = want_uint(cx, "retries", v, 0, 10).unwrap_or(1) as u32;
    }
    let has_static = http_v.is_some() || longpolling_v.is_some();
    match (&pool.discover, has_static) {
        (Some(_), true) => {
            if let Some(v) = discover_v {
                cx.error(
                    &v.span(),
                    format!("pool \"{name}\": use either `discover` or static `http`/`longpolling` lists, not both"),
                );
            }
        }
        (None, false) if discover_v.is_none() => {
            cx.error(
                name_span,
                format!("pool \"{name}\" has no backends: give `http` (and `longpolling`) addresses or `discover`"),
            );
        }
        (None, true) if http_v.is_none() => {
            cx.error(name_span, format!("pool \"{name}\" has no `http` backends"));
        }
        _ => {}
    }
    if pool.spread > 0 && !pool.http.is_empty() && pool.spread > pool.http.len() {
        if let Some(v) = tbl
            .entries
            .iter()
            .find(|e| e.0.get_ref().as_ref() == "spread")
        {
            cx.warn(
                &v.1.span(),
                format!(
                    "pool \"{name}\": spread {} is more than its {} http backends; every tenant uses all of them",
                    pool.spread,
                    pool.http.len()
                ),
            );
        }
    }
    tbl.finish(cx);
    let errors_after = cx.diags.iter().filter(|d| d.is_error()).count();
    (errors_after == errors_before).then_some(pool)
}

fn read_health(cx: &mut Cx<'_>, v: &Val<'_>) -> Option<Health> {
    let t = want_table(cx, "health", v)?;
    let mut tbl = Tbl::new(t, "`health`", HEALTH_KEYS);
    let mut h = Health::default();
    if let Some(pv) = tbl.get("path") {
        if let Some(p) = want_str(cx, "path", pv) {
            if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                cx.error(&pv.span(), "`health.path` must be a path starting with '/'");
            } else {
                h.path = p.to_string();
            }
        }
    }
    if let Some(ev) = tbl.get("every") {
        if let Some(d) = want_positive_duration(cx, "every", ev) {
            h.every = d;
        }
    }
    if let Some(tv) = tbl.get("timeout") {
        if let Some(d) = want_positive_duration(cx, "timeout", tv) {
            h.timeout = d;
        }
    }
    if let Some(rv) = tbl.get("rise") {
        if let Some(n) = want_uint(cx, "rise", rv, 1, 100) {
            h.rise = n as u32;
        }
    }
    if let Some(fv) = tbl.get("fall") {
        if let Some(n) = want_uint(cx, "fall", fv, 1, 100) {
            h.fall = n as u32;
        }
    }
    tbl.finish(cx);
    Some(h)
}

fn read_discover(cx: &mut Cx<'_>, v: &Val<'_>) -> Option<Discover> {
    let t = want_table(cx, "discover", v)?;
    let mut tbl = Tbl::new(t, "`discover`", DISCOVER_KEYS);
    let mut ok = true;
    let dns = match tbl.get("dns") {
        Some(dv) => match want_str(cx, "dns", dv) {
            Some(s) => {
                let s = s.trim().trim_end_matches('.');
                if s.is_empty() || s.contains(['/', ':', ' ']) {
                    cx.error(
                        &dv.span(),
                        format!("`discover.dns`: \"{s}\" is not a DNS name"),
                    );
                    ok = false;
                }
                s.to_string()
            }
            None => {
                ok = false;
                String::new()
            }
        },
        None => {
            cx.error(&v.span(), "`discover` needs `dns`, the name to resolve");
            ok = false;
            String::new()
        }
    };
    let http_port = match tbl.get("http_port") {
        Some(pv) => want_uint(cx, "http_port", pv, 1, 65535).map(|n| n as u16),
        None => Some(8069),
    };
    let longpolling_port = match tbl.get("longpolling_port") {
        Some(pv) => {
            let p = want_uint(cx, "longpolling_port", pv, 1, 65535).map(|n| n as u16);
            if p.is_none() {
                ok = false;
            }
            p
        }
        None => None,
    };
    let every = match tbl.get("every") {
        Some(ev) => want_positive_duration(cx, "every", ev),
        None => Some(Duration::from_secs(10)),
    };
    let resolver = match tbl.get("resolver") {
        Some(rv) => {
            let r = want_addr(cx, "resolver", rv);
            if r.is_none() {
                ok = false;
            }
            r
        }
        None => None,
    };
    tbl.finish(cx);
    if !ok {
        return None;
    }
    Some(Discover {
        dns,
        http_port: http_port?,
        longpolling_port,
        every: every?,
        resolver,
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_database(db: &str) -> bool {
    let plain = db.replace("{tenant}", "x");
    !plain.is_empty()
        && plain.len() <= 63
        && plain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[allow(clippy::too_many_arguments)]
fn read_tenant(
    cx: &mut Cx<'_>,
    name: &str,
    name_span: &Range<usize>,
    t: &DeTable<'_>,
    pool_names: &[String],
    defaults: &Arc<Settings>,
    hosts: &mut HostIndex,
    id: usize,
    names: &[String],
) -> Option<Tenant> {
    let mut tbl = Tbl::new(t, format!("[tenants.{name}]"), TENANT_KEYS);
    let errors_before = cx.diags.iter().filter(|d| d.is_error()).count();
    if !valid_name(name) {
        cx.error(
            name_span,
            format!("tenant name \"{name}\" may only use letters, digits, '-', '_' and '.'"),
        );
    }
    let mut patterns = Vec::new();
    match tbl.get("hosts") {
        Some(v) => {
            if let Some(items) = want_array(cx, "hosts", v) {
                if items.is_empty() {
                    cx.error(
                        &v.span(),
                        format!("tenant \"{name}\" has an empty `hosts` list"),
                    );
                }
                for item in items {
                    let Some(s) = want_str(cx, "hosts", item) else {
                        continue;
                    };
                    match HostPattern::parse(s) {
                        Ok(p) => {
                            if let Err(other) = hosts.insert(&p, id) {
                                let owner = if other == id {
                                    format!("tenant \"{name}\" itself")
                                } else {
                                    names
                                        .get(other)
                                        .map(|n| format!("tenant \"{n}\""))
                                        .unwrap_or_else(|| "another tenant".into())
                                };
                                cx.error(
                                    &item.span(),
                                    format!("host \"{p}\" is already claimed by {owner}"),
                                );
                            }
                            patterns.push(p);
                        }
                        Err(e) => cx.error(&item.span(), e),
                    }
                }
            }
        }
        None => cx.error(name_span, format!("tenant \"{name}\" needs `hosts`")),
    }
    let pool = match tbl.get("pool") {
        Some(v) => want_str(cx, "pool", v).and_then(|p| {
            let idx = pool_names.iter().position(|n| n == p);
            if idx.is_none() {
                let known = if pool_names.is_empty() {
                    "no pools are defined".to_string()
                } else {
                    format!("known pools: {}", pool_names.join(", "))
                };
                cx.error(
                    &v.span(),
                    format!("tenant \"{name}\" names unknown pool \"{p}\" ({known})"),
                );
            }
            idx
        }),
        None => {
            cx.error(name_span, format!("tenant \"{name}\" needs `pool`"));
            None
        }
    };
    let database = match tbl.get("database") {
        Some(v) => want_str(cx, "database", v).and_then(|d| {
            if valid_database(d) {
                Some(d.to_string())
            } else {
                cx.error(
                    &v.span(),
                    format!("`database` \"{d}\" may only use letters, digits, '-', '_', '.' and {{tenant}}"),
                );
                None
            }
        }),
        None => None,
    };
    let settings = read_settings(cx, &mut tbl, defaults);
    let settings = if settings == **defaults {
        defaults.clone()
    } else {
        Arc::new(settings)
    };
    tbl.finish(cx);
    let errors_after = cx.diags.iter().filter(|d| d.is_error()).count();
    if errors_after != errors_before {
        return None;
    }
    Some(Tenant {
        name: name.to_string(),
        hosts: patterns,
        pool: pool?,
        database,
        settings,
    })
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
