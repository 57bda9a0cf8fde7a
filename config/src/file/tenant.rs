//! `[defaults]` and `[tenants.*]`: the settings every tenant inherits, limits, hosts.

use super::*;

/// Reads the per-tenant settings keys present in `tbl` over `base`.
pub(super) fn read_settings(cx: &mut Cx<'_>, tbl: &mut Tbl<'_, '_>, base: &Settings) -> Settings {
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
    field!("buffer_response", want_size, buffer_response);
    field!("max_response_spool", want_size, max_response_spool);
    field!("block_database_manager", want_bool, block_database_manager);
    field!("admin_cidrs", want_cidrs, admin_cidrs);
    field!("trusted_proxies", want_cidrs, trusted_proxies);
    if let Some(v) = tbl.get("integration") {
        s.integration = read_limit(cx, "integration", v);
    }
    if let Some(v) = tbl.get("interactive") {
        s.interactive = read_limit(cx, "interactive", v);
    }
    if let Some(v) = tbl.get("login") {
        if let Some(l) = read_login(cx, v) {
            s.login = l;
        }
    }
    if let Some(v) = tbl.get("compress") {
        match want_str(cx, "compress", v) {
            Some("static") => s.compress = Compress::Static,
            Some("all") => s.compress = Compress::All,
            Some("off") => s.compress = Compress::Off,
            Some(other) => cx.error(
                &v.span(),
                format!("`compress` must be \"static\", \"all\" or \"off\", found \"{other}\""),
            ),
            None => {}
        }
    }
    field!("cache_assets", want_size, cache_assets);
    field!("secure_cookies", want_bool, secure_cookies);
    s
}

/// `login`: `"off"` or `{ rate, burst }` (no concurrency: a login is one request).
fn read_login(cx: &mut Cx<'_>, v: &Val<'_>) -> Option<Option<LoginLimit>> {
    if let DeValue::String(s) = v.get_ref() {
        if s == "off" {
            return Some(None);
        }
        cx.error(
            &v.span(),
            format!("`login` must be \"off\" or a table such as {{ rate = \"10/min\", burst = 5 }}, found \"{s}\""),
        );
        return None;
    }
    let t = want_table(cx, "login", v)?;
    let mut tbl = Tbl::new(t, "`login`".to_string(), LOGIN_KEYS);
    let rate = match tbl.get("rate") {
        Some(rv) => want_str(cx, "rate", rv).and_then(|s| {
            parse_rate(s)
                .map_err(|e| cx.error(&rv.span(), format!("`login.rate`: {e}")))
                .ok()
        }),
        None => {
            cx.error(&v.span(), "`login` needs a `rate`".to_string());
            None
        }
    };
    let burst = tbl
        .get("burst")
        .map(|bv| want_uint(cx, "burst", bv, 1, 1_000_000));
    tbl.finish(cx);
    let rate = rate?;
    let burst = match burst {
        Some(b) => b? as u32,
        None => (rate.per_second().ceil() as u32).max(1),
    };
    Some(Some(LoginLimit { rate, burst }))
}

pub(super) fn read_limit(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Limit> {
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

pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) fn valid_database(db: &str) -> bool {
    let plain = db.replace("{tenant}", "x");
    !plain.is_empty()
        && plain.len() <= 63
        && plain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn read_tenant(
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
    let mut tbl = Tbl::new(t, format!("[tenants.{name}]"), &TENANT_KEYS);
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
    let maintenance = tbl
        .get("maintenance")
        .and_then(|v| want_bool(cx, "maintenance", v))
        .unwrap_or(false);
    let routes = tbl
        .get("routes")
        .map(|v| read_routes(cx, name, v, pool_names))
        .unwrap_or_default();
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
        maintenance,
        routes,
    })
}

/// `routes = [{ path = "/jsonrpc", pool = "batch" }, { path = "/web/login", pool = "x", exact = true }]`:
/// each path starts with `/`, each pool exists, no path is given twice; sorted so that
/// the first match is the longest.
fn read_routes(cx: &mut Cx<'_>, tenant: &str, v: &Val<'_>, pool_names: &[String]) -> Vec<Route> {
    let Some(items) = want_array(cx, "routes", v) else {
        return Vec::new();
    };
    let mut routes: Vec<Route> = Vec::new();
    for item in items {
        let Some(t) = want_table(cx, "routes", item) else {
            continue;
        };
        let mut tbl = Tbl::new(t, format!("a route of tenant \"{tenant}\""), ROUTE_KEYS);
        let path = match tbl.get("path") {
            Some(pv) => want_str(cx, "path", pv).and_then(|p| {
                if !p.starts_with('/') {
                    cx.error(
                        &pv.span(),
                        format!("route `path` \"{p}\" must start with `/`"),
                    );
                    return None;
                }
                Some((p.to_string(), pv.span()))
            }),
            None => {
                cx.error(
                    &item.span(),
                    "a route needs `path`, e.g. path = \"/jsonrpc\"",
                );
                None
            }
        };
        let pool = match tbl.get("pool") {
            Some(pv) => want_str(cx, "pool", pv).and_then(|p| {
                let idx = pool_names.iter().position(|n| n == p);
                if idx.is_none() {
                    cx.error(
                        &pv.span(),
                        format!(
                            "route names unknown pool \"{p}\" (known pools: {})",
                            pool_names.join(", ")
                        ),
                    );
                }
                idx
            }),
            None => {
                cx.error(
                    &item.span(),
                    "a route needs `pool`, the pool its requests go to",
                );
                None
            }
        };
        let exact = tbl
            .get("exact")
            .and_then(|ev| want_bool(cx, "exact", ev))
            .unwrap_or(false);
        tbl.finish(cx);
        let (Some((path, span)), Some(pool)) = (path, pool) else {
            continue;
        };
        // Matched against the request's normalised path, so normalised the same way; as
        // a prefix, `/xmlrpc/` is `/xmlrpc` (a trailing `/` is ignored, as Gateway API does).
        let path = crate::class::normalize_path(&path).into_owned();
        let path = match path.trim_end_matches('/') {
            _ if exact => path,
            "" => "/".to_string(),
            trimmed => trimmed.to_string(),
        };
        if routes.iter().any(|r| r.path == path && r.exact == exact) {
            cx.error(&span, format!("route `path` \"{path}\" is given twice"));
            continue;
        }
        routes.push(Route { path, exact, pool });
    }
    routes.sort_by(Route::precedence);
    routes
}
