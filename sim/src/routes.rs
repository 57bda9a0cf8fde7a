//! The controllers of the simulated Odoo: health, login and home pages, JSON-2, longpolls,
//! JSON-RPC and XML-RPC, and an echo of everything else.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;

use crate::{odoo, Shared};

pub(crate) type Resp = Response<Full<Bytes>>;

pub(crate) fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

pub(crate) fn json_response(status: StatusCode, worker: &str, body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(worker) {
        h.insert("x-sim-worker", v);
    }
    resp
}

fn redirect(worker: &str, location: &str) -> Resp {
    let mut r = json_response(
        StatusCode::SEE_OTHER,
        worker,
        serde_json::json!({"worker": worker, "location": location}).to_string(),
    );
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        map.insert(
            name.as_str().to_string(),
            serde_json::Value::from(values.join(", ")),
        );
    }
    serde_json::Value::Object(map)
}

/// The paths whose controller needs a database (and so runs Odoo's selection).
pub(crate) fn selects_database(path: &str) -> bool {
    matches!(path, "/web/login" | "/web" | "/odoo") || path.starts_with("/json/2/")
}

/// The controllers.
pub(crate) async fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Resp {
    let worker = shared.name.as_str();
    let odoo = &shared.cfg.odoo;
    match path {
        // addons/web/controllers/webclient.py, `health` (auth="none", save_session=False).
        "/web/health" => {
            if query_param(query, "db_server_status").is_some_and(|v| !v.is_empty() && v != "0") {
                let up = odoo.db_server_up.load(Ordering::Relaxed);
                let (status, text) = if up {
                    (StatusCode::OK, "pass")
                } else {
                    (StatusCode::INTERNAL_SERVER_ERROR, "fail")
                };
                json_response(
                    status,
                    worker,
                    serde_json::json!({"status": text, "db_server_status": up}).to_string(),
                )
            } else {
                json_response(StatusCode::OK, worker, r#"{"status": "pass"}"#.to_string())
            }
        }
        "/web/login" | "/web" | "/odoo" => login_and_home(shared, method, path, headers, body),
        p if p.starts_with("/web/filestore/") => {
            // binary.py `content_filestore`: the web server should have served it.
            if shared.cfg.x_sendfile {
                shared.filestore_errors.fetch_add(1, Ordering::Relaxed);
            }
            json_response(StatusCode::NOT_FOUND, worker, "{}".to_string())
        }
        p if (p.starts_with("/web/content/") || p.starts_with("/web/image/"))
            && odoo.filestore().is_some() =>
        {
            match (odoo.resolve(headers), odoo.filestore()) {
                (Ok(r), Some(store)) => match r.db {
                    Some(db) => crate::filestore::content(
                        worker,
                        store,
                        &db,
                        p,
                        headers,
                        shared.cfg.x_sendfile,
                    ),
                    None => json_response(StatusCode::NOT_FOUND, worker, "{}".to_string()),
                },
                _ => forbidden(worker),
            }
        }
        p if is_static(p) => static_file(worker, p, query, headers),
        p if p.starts_with("/json/2/") => {
            if !odoo.version.has_json2() {
                return json_response(StatusCode::NOT_FOUND, worker, "{}".to_string());
            }
            match odoo.resolve(headers) {
                Err(_) => forbidden(worker),
                Ok(r) => match r.db {
                    Some(db) => json_response(
                        StatusCode::OK,
                        worker,
                        serde_json::json!({"worker": worker, "db": db}).to_string(),
                    ),
                    None => json_response(StatusCode::NOT_FOUND, worker, "{}".to_string()),
                },
            }
        }
        "/longpolling/poll" => {
            if query_param(query, "sleep_ms").is_none() && !headers.contains_key("x-sim-sleep-ms") {
                let hold = shared
                    .longpoll_hold
                    .lock()
                    .map(|h| *h)
                    .unwrap_or(Duration::from_secs(50));
                tokio::time::sleep(hold).await;
            }
            json_response(StatusCode::OK, worker, "[]".to_string())
        }
        "/jsonrpc" => {
            let id = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("id").cloned())
                .unwrap_or(serde_json::Value::Null);
            json_response(
                StatusCode::OK,
                worker,
                serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {"worker": worker, "headers": headers_json(headers)}})
                    .to_string(),
            )
        }
        p if p.starts_with("/xmlrpc/") => {
            let xml = format!(
                "<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><string>{worker}</string></value>\n</param>\n</params>\n</methodResponse>\n"
            );
            let mut r = Response::new(Full::new(Bytes::from(xml)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/xml; charset=utf-8"),
            );
            if let Ok(v) = HeaderValue::from_str(worker) {
                r.headers_mut().insert("x-sim-worker", v);
            }
            r
        }
        _ => {
            let mut v = serde_json::json!({
                "worker": worker,
                "method": method.as_str(),
                "target": if query.is_empty() { path.to_string() } else { format!("{path}?{query}") },
                "headers": headers_json(headers),
                "body_len": body.len(),
                "body_fnv": crate::body_fnv(body),
            });
            if let Some(size) = query_param(query, "size").and_then(|s| s.parse::<usize>().ok()) {
                let base = v.to_string().len() + 12;
                let pad = size.saturating_sub(base).min(32 << 20);
                v["pad"] = serde_json::Value::from("x".repeat(pad));
            }
            json_response(StatusCode::OK, worker, v.to_string())
        }
    }
}

/// Odoo's asset bundles (`/web/assets/<unique>/<name>`: the URL carries a hash of the
/// content) and static files of modules (`/<module>/static/...`).
fn is_static(path: &str) -> bool {
    path.starts_with("/web/assets/")
        || path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .is_some_and(|(_, rest)| rest.starts_with("static/"))
}

/// One year: `STATIC_CACHE_LONG` of `odoo/http.py`, for URLs that change with their
/// content (asset bundles).
const STATIC_CACHE_LONG: u32 = 60 * 60 * 24 * 365;
/// One week: `STATIC_CACHE` of `odoo/http.py`, for module static files.
const STATIC_CACHE: u32 = 60 * 60 * 24 * 7;

/// An asset bundle or static file as Odoo serves it: bundles through `ir.binary` /
/// `Stream.get_response(immutable=True)` (`addons/web/controllers/binary.py`
/// `content_assets`, `odoo/http.py` `Stream`: werkzeug's `send_file` with `max_age`
/// gives `Cache-Control: public, max-age=N`, and `immutable` is appended), static files
/// by `Application.static` (`odoo/http.py`) with `max_age=STATIC_CACHE`; never
/// compressed by Odoo (werkzeug does not compress). The body is the same on every
/// worker for a URL, as a bundle is for its hash.
///
/// Test knobs in the query (not Odoo's): `size` (bytes of body, default 64 KiB), `cc`
/// (the `Cache-Control` value instead), `cookie=1` (adds a `Set-Cookie`), `vary=NAME`
/// (adds `Vary: NAME`), `type` (the `Content-Type`), `age=N` (adds `Age: N`, as an
/// upstream cache would), `encoding=E` (labels the body `Content-Encoding: E`). A `Range: bytes=A-B` gets `206`
/// with that slice (werkzeug's `send_file` is conditional and honours ranges).
fn static_file(worker: &str, path: &str, query: &str, headers: &HeaderMap) -> Resp {
    let size = query_param(query, "size")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(64 << 10)
        .min(64 << 20);
    // Lines of JavaScript with a token of pseudo-random letters each, so that the body
    // compresses about as well as a real minified bundle (gzip ~4x), not 40x.
    let mut body = Vec::with_capacity(size + 128);
    let mut i = 0u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ path.len() as u64;
    const LETTERS: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$";
    while body.len() < size {
        let mut token = String::with_capacity(40);
        for _ in 0..40 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            token.push(LETTERS[(state % 64) as usize] as char);
        }
        body.extend_from_slice(
            format!(
                "odoo.define(\"{path}/{i}\",function(r){{return {{id:{i},k:\"{token}\"}};}});\n"
            )
            .as_bytes(),
        );
        i += 1;
    }
    body.truncate(size);
    let bundle = path.starts_with("/web/assets/");
    let content_type = query_param(query, "type")
        .map(|t| t.replace("%2F", "/"))
        .unwrap_or_else(|| {
            if path.ends_with(".css") {
                "text/css; charset=utf-8".into()
            } else if path.ends_with(".png") {
                "image/png".into()
            } else {
                "application/javascript; charset=utf-8".into()
            }
        });
    let cache_control = match query_param(query, "cc") {
        Some(cc) => cc
            .replace("%20", " ")
            .replace("%2C", ",")
            .replace("%3D", "="),
        None if bundle => format!("public, max-age={STATIC_CACHE_LONG}, immutable"),
        None => format!("public, max-age={STATIC_CACHE}"),
    };
    let total = body.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .filter(|(a, b)| a <= b && *b < total);
    let body = match range {
        Some((a, b)) => body[a..=b].to_vec(),
        None => body,
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    if range.is_some() {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    let h = r.headers_mut();
    let mut set = |name: header::HeaderName, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.append(name, v);
        }
    };
    set(header::CONTENT_TYPE, &content_type);
    set(header::ACCEPT_RANGES, "bytes");
    if let Some((a, b)) = range {
        set(header::CONTENT_RANGE, &format!("bytes {a}-{b}/{total}"));
    }
    set(header::CACHE_CONTROL, &cache_control);
    set(header::HeaderName::from_static("x-sim-worker"), worker);
    if query_param(query, "cookie").is_some() {
        set(header::SET_COOKIE, "frontend_lang=en_US; Path=/");
    }
    if let Some(v) = query_param(query, "vary") {
        set(header::VARY, v);
    }
    if let Some(v) = query_param(query, "age") {
        set(header::AGE, v);
    }
    if let Some(v) = query_param(query, "encoding") {
        // The body is sent as is, labelled as already encoded.
        set(header::CONTENT_ENCODING, v);
    }
    r
}

fn forbidden(worker: &str) -> Resp {
    json_response(
        StatusCode::FORBIDDEN,
        worker,
        serde_json::json!({"error": "Cannot use both the session_id cookie and the x-odoo-database header."})
            .to_string(),
    )
}

/// `/web/login` (addons/web/controllers/home.py `web_login`) and the home page.
fn login_and_home(
    shared: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Resp {
    let worker = shared.name.as_str();
    let odoo = &shared.cfg.odoo;
    let mut r = match odoo.resolve(headers) {
        Ok(r) => r,
        Err(_) => return forbidden(worker),
    };
    let Some(db) = r.db.clone() else {
        // No database: Odoo sends the browser to the database selector.
        return redirect(worker, "/web/database/selector");
    };
    let mut cookie = None;
    let resp = if path == "/web/login" && method == Method::POST {
        let form = String::from_utf8_lossy(body);
        let login = odoo::form_field(&form, "login").unwrap_or("");
        let password = odoo::form_field(&form, "password").unwrap_or("");
        if login.is_empty() || password != "admin" {
            json_response(
                StatusCode::OK,
                worker,
                serde_json::json!({"worker": worker, "page": "login", "db": db, "error": "Wrong login/password"}).to_string(),
            )
        } else {
            // `session.authenticate` then `_save_session`: the session id rotates.
            r.session.login = Some(login.to_string());
            cookie = odoo.save(&r, true);
            redirect(worker, odoo.version.home())
        }
    } else if path == "/web/login" {
        // The login form stores its CSRF secret in the session: saved, if it may be.
        cookie = odoo.save(&r, false);
        json_response(
            StatusCode::OK,
            worker,
            serde_json::json!({"worker": worker, "page": "login", "db": db, "user": r.session.login, "headers": headers_json(headers)}).to_string(),
        )
    } else {
        match r.session.login.clone() {
            Some(user) => json_response(
                StatusCode::OK,
                worker,
                serde_json::json!({"worker": worker, "page": "home", "db": db, "user": user, "headers": headers_json(headers)}).to_string(),
            ),
            None => redirect(worker, "/web/login"),
        }
    };
    let mut resp = resp;
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}
