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
