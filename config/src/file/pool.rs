//! `[pools.*]`: backends, discovery, health checks, breaker, retries.

use super::tenant::valid_name;
use super::*;

pub(super) fn read_pool(
    cx: &mut Cx<'_>,
    name: &str,
    name_span: &Range<usize>,
    t: &DeTable<'_>,
    base_dir: &Path,
    provided: bool,
) -> Option<Pool> {
    let mut tbl = Tbl::new(t, format!("[pools.{name}]"), POOL_KEYS);
    let errors_before = cx.diags.iter().filter(|d| d.is_error()).count();
    let mut pool = placeholder_pool(name);
    // A provided pool's name is its source's (`NAMESPACE/SERVICE:PORT`).
    if !provided && !valid_name(name) {
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
    if let Some(v) = tbl.get("workers") {
        pool.workers = want_uint(cx, "workers", v, 0, 100_000).unwrap_or(0) as u32;
    }
    if let Some(v) = tbl.get("queue") {
        if let Some(qt) = want_table(cx, "queue", v) {
            let mut q = Tbl::new(qt, "`queue`", QUEUE_KEYS);
            if let Some(mv) = q.get("max") {
                if let Some(n) = want_uint(cx, "max", mv, 0, 10_000_000) {
                    pool.queue.max = n as usize;
                }
            }
            if let Some(tv) = q.get("timeout") {
                if let Some(d) = want_positive_duration(cx, "timeout", tv) {
                    pool.queue.timeout = d;
                }
            }
            if let Some(rv) = q.get("reserve") {
                if let Some(n) = want_uint(cx, "reserve", rv, 0, 100_000) {
                    pool.queue.reserve = n as u32;
                    let slots = u64::from(pool.workers) * pool.http.len() as u64;
                    if n > 0 && pool.discover.is_none() && slots > 0 && n >= slots {
                        cx.error(
                            &rv.span(),
                            format!("`queue.reserve` ({n}) must leave slots to static and integration requests: the pool has {slots} (`workers` x `http` backends)"),
                        );
                    }
                }
            }
            q.finish(cx);
        }
    }
    if let Some(v) = tbl.get("retries") {
        pool.retries = want_uint(cx, "retries", v, 0, 10).unwrap_or(1) as u32;
    }
    if let Some(v) = tbl.get("filestore") {
        pool.filestore = read_filestore(cx, v, base_dir);
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
        (None, false) if discover_v.is_none() && !provided => {
            cx.error(
                name_span,
                format!("pool \"{name}\" has no backends: give `http` (and `longpolling`) addresses or `discover`"),
            );
        }
        (None, true) => match http_v {
            None => cx.error(name_span, format!("pool \"{name}\" has no `http` backends")),
            // `http = []`: a pool with no backends (the contract's validation errors).
            Some(v) if matches!(v.get_ref(), DeValue::Array(a) if a.is_empty()) => cx.error(
                &v.span(),
                format!("pool \"{name}\" has no backends: `http` is empty; give addresses or `discover`"),
            ),
            Some(_) => {}
        },
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

pub(super) fn read_health(cx: &mut Cx<'_>, v: &Val<'_>) -> Option<Health> {
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

pub(super) fn read_discover(cx: &mut Cx<'_>, v: &Val<'_>) -> Option<Discover> {
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

/// `filestore = "/mnt/odoo/filestore"`: a directory portier can read (relative to the
/// configuration file's directory).
fn read_filestore(cx: &mut Cx<'_>, v: &Val<'_>, base_dir: &Path) -> Option<PathBuf> {
    let s = want_str(cx, "filestore", v)?;
    let p = PathBuf::from(s);
    let p = if p.is_absolute() { p } else { base_dir.join(p) };
    match std::fs::read_dir(&p) {
        Ok(_) => Some(p),
        Err(e) => {
            cx.error(
                &v.span(),
                format!(
                    "`filestore` \"{}\" is not a readable directory: {e}",
                    p.display()
                ),
            );
            None
        }
    }
}
