//! The bus WebSocket, as `addons/bus/websocket.py` (`WebsocketConnectionHandler`)
//! opens it: the handshake checks, then a connection that echoes messages.
//!
//! - `_assert_handshake_validity`: the headers `connection`, `host`,
//!   `sec-websocket-key`, `sec-websocket-version`, `upgrade` (and `origin` from Odoo
//!   17) must be present, else 400; `upgrade` must be `websocket` and `connection`
//!   must name `upgrade`, else 400; the version must be 13, else 426; the key must be
//!   16 bytes of base64, else 400.
//! - `odoo/service/server.py`, `RequestHandler.make_environ`: only an `Upgrade` header
//!   exactly `websocket` switches the handler to HTTP/1.1; any other spelling gets its
//!   101 as HTTP/1.0, which browsers refuse. The simulation answers such an upgrade 400.
//! - `open_connection`: on a prefork HTTP worker the request has no socket to hand to
//!   the bus (`CommonRequestHandler`), so the upgrade fails with 500 ("Couldn't bind
//!   the websocket. Is the connection opened on the evented port (8072)?").
//! - No extension is ever negotiated (no `permessage-deflate`): the 101 carries no
//!   `Sec-WebSocket-Extensions`, and a compressed frame is a protocol error.
//!
//! Messages: `whoami` gets the worker's name, `session` the session the socket was
//! opened with (`{"db": ..., "login": ...}` from the session store), anything else
//! is echoed.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::routes::{json_response, Resp};
use crate::{odoo, Server, SimConfig};

/// Why a handshake is refused.
fn handshake_error(headers: &HeaderMap, cfg: &SimConfig) -> Option<(StatusCode, &'static str)> {
    let mut required = vec![
        "connection",
        "host",
        "sec-websocket-key",
        "sec-websocket-version",
        "upgrade",
    ];
    if cfg.odoo.version.websocket_needs_origin() {
        required.push("origin");
    }
    if required.iter().any(|h| !headers.contains_key(*h)) {
        return Some((StatusCode::BAD_REQUEST, "Empty or missing header(s)"));
    }
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if !get("upgrade").eq_ignore_ascii_case("websocket") {
        return Some((StatusCode::BAD_REQUEST, "Invalid upgrade header"));
    }
    if get("upgrade") != "websocket" {
        return Some((
            StatusCode::BAD_REQUEST,
            "Upgrade is not exactly `websocket`: the 101 would go out as HTTP/1.0",
        ));
    }
    if !get("connection").to_ascii_lowercase().contains("upgrade") {
        return Some((StatusCode::BAD_REQUEST, "Invalid connection header"));
    }
    if get("sec-websocket-version") != "13" {
        return Some((StatusCode::UPGRADE_REQUIRED, "Upgrade Required"));
    }
    if !is_16_byte_base64(get("sec-websocket-key")) {
        return Some((
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key should be of length 16 once decoded",
        ));
    }
    None
}

/// 16 bytes in base64: 22 alphabet characters and `==`.
fn is_16_byte_base64(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// Answers an upgrade request: an error, or 101 and a task serving the socket.
pub(crate) fn open(req: Request<Incoming>, worker: &str, cfg: &SimConfig) -> Resp {
    if let Some((status, why)) = handshake_error(req.headers(), cfg) {
        return json_response(
            status,
            worker,
            serde_json::json!({"worker": worker, "error": why}).to_string(),
        );
    }
    if cfg.server == Server::Http {
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            worker,
            serde_json::json!({"worker": worker, "error": "Couldn't bind the websocket. Is the connection opened on the evented port (8072)?"}).to_string(),
        );
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let sid = odoo::session_cookie(req.headers());
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Ok(v) = HeaderValue::from_str(worker) {
        h.insert("x-sim-worker", v);
    }
    let worker = worker.to_string();
    let odoo = cfg.odoo.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) if t.as_str() == "whoami" => Message::text(worker.clone()),
                Message::Text(t) if t.as_str() == "session" => {
                    let s = sid.as_deref().and_then(|s| odoo.session(s));
                    Message::text(
                        serde_json::json!({
                            "db": s.as_ref().and_then(|s| s.db.clone()),
                            "login": s.as_ref().and_then(|s| s.login.clone()),
                        })
                        .to_string(),
                    )
                }
                Message::Text(t) => Message::Text(t),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
        let _ = ws.close(None).await;
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_sixteen_bytes() {
        assert!(is_16_byte_base64("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_16_byte_base64("dGhlIHNhbXBsZQ=="));
        assert!(!is_16_byte_base64("dGhlIHNhbXBsZSBub25jZQ"));
    }
}
