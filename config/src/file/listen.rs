//! `[listen]`, `[log]`, `[cluster]` and `[tls]`.

use super::*;

pub(super) fn read_listen(cx: &mut Cx<'_>, t: &DeTable<'_>) -> Option<Listen> {
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
        spool_dir: default_spool_dir(),
        max_connections: 100_000,
        max_connections_per_ip: 0,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(75),
    };
    if let Some(v) = tbl.get("max_connections") {
        match want_uint(cx, "max_connections", v, 1, 10_000_000) {
            Some(n) => listen.max_connections = n as usize,
            None => ok = false,
        }
    }
    if let Some(v) = tbl.get("max_connections_per_ip") {
        match want_uint(cx, "max_connections_per_ip", v, 0, 10_000_000) {
            Some(n) => listen.max_connections_per_ip = n as usize,
            None => ok = false,
        }
    }
    for (key, field) in [
        ("header_timeout", &mut listen.header_timeout),
        ("idle_timeout", &mut listen.idle_timeout),
    ] {
        if let Some(v) = tbl.get(key) {
            match want_positive_duration(cx, key, v) {
                Some(d) => *field = d,
                None => ok = false,
            }
        }
    }
    if let Some(v) = tbl.get("spool_dir") {
        if let Some(s) = want_str(cx, "spool_dir", v) {
            listen.spool_dir = PathBuf::from(s);
        }
        if let Err(e) = check_writable_dir(&listen.spool_dir) {
            cx.error(
                &v.span(),
                format!(
                    "`spool_dir` \"{}\" cannot be written: {e}",
                    listen.spool_dir.display()
                ),
            );
            ok = false;
        }
    }
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

pub(super) fn read_log(cx: &mut Cx<'_>, t: &DeTable<'_>) -> LogSettings {
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

/// `[cluster]`: `redis` must be a `redis://` or `rediss://` URL with a host; Redis is
/// not contacted (`check` works without it).
/// `header`: the span of the table's name in its header, where a missing key is reported.
pub(super) fn read_cluster(
    cx: &mut Cx<'_>,
    t: &DeTable<'_>,
    header: &Range<usize>,
) -> Option<Cluster> {
    let mut tbl = Tbl::new(t, "[cluster]", CLUSTER_KEYS);
    let mut ok = true;
    let redis = match tbl.get("redis") {
        Some(v) => match want_str(cx, "redis", v) {
            Some(s) => match check_redis_url(s) {
                Ok(()) => Some(s.to_string()),
                Err(why) => {
                    cx.error(&v.span(), format!("`redis` {why}"));
                    None
                }
            },
            None => None,
        },
        None => {
            cx.error(
                header,
                "[cluster] needs `redis`, e.g. redis = \"redis://10.0.2.5:6379/0\"",
            );
            None
        }
    };
    let mut key_prefix = "portier:".to_string();
    if let Some(v) = tbl.get("key_prefix") {
        match want_str(cx, "key_prefix", v) {
            Some(s) => key_prefix = s.to_string(),
            None => ok = false,
        }
    }
    let mut timeout = Duration::from_millis(50);
    if let Some(v) = tbl.get("timeout") {
        match want_positive_duration(cx, "timeout", v) {
            Some(d) => timeout = d,
            None => ok = false,
        }
    }
    tbl.finish(cx);
    let redis = redis?;
    ok.then_some(Cluster {
        redis,
        key_prefix,
        timeout,
    })
}

/// A `redis://` or `rediss://` URL with a host (`redis://[user:pass@]host[:port][/db]`).
fn check_redis_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("redis://")
        .or_else(|| s.strip_prefix("rediss://"))
        .ok_or_else(|| format!("must be a redis:// or rediss:// URL, not {s:?}"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, after)) => (h, after.strip_prefix(':')),
            None => ("", None),
        },
        None => match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err(format!("has no host: {s:?}"));
    }
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(format!("has a bad port: {s:?}"));
    }
    if let Some(db) = rest
        .split_once('/')
        .map(|(_, d)| d.split('?').next().unwrap_or(""))
    {
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(format!("has a bad database number {db:?}: {s:?}"));
        }
    }
    Ok(())
}

/// `header`: the span of the table's name in its header, where a missing key is reported.
pub(super) fn read_tls(
    cx: &mut Cx<'_>,
    t: &DeTable<'_>,
    header: &Range<usize>,
    base_dir: &Path,
    kubernetes: bool,
) -> Option<Tls> {
    let mut tbl = Tbl::new(t, "[tls]", TLS_KEYS);
    let has_acme = t.get("acme").is_some();
    let certs = match tbl.get("certs") {
        Some(v) => want_str(cx, "certs", v).map(|s| {
            let p = PathBuf::from(s);
            let p = if p.is_absolute() { p } else { base_dir.join(p) };
            (Some(p), cx.pos(v.span().start))
        }),
        // (r3) Kubernetes Secrets may supply every certificate; ACME writes into `certs`.
        None if kubernetes && !has_acme => Some((None, cx.pos(header.start))),
        None => {
            cx.error(
                header,
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
    let mut acme = None;
    let mut acme_ok = true;
    if let Some(v) = tbl.get("acme") {
        acme = want_table(cx, "tls.acme", v).and_then(|t| super::acme::read_acme(cx, t, base_dir));
        acme_ok = acme.is_some();
    }
    tbl.finish(cx);
    let (certs, certs_pos) = certs?;
    acme_ok.then_some(Tls {
        certs,
        certs_pos,
        default,
        default_pos,
        redirect_http,
        hsts,
        acme,
    })
}

/// A directory portier can create files in (it is created if missing).
fn check_writable_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".portier-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}
