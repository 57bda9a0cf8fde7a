//! Minimal HTTP/1.1 and WebSocket clients, shared by the demo's self-test, the
//! end-to-end tests and the benches.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens an HTTP/1.1 connection for several requests.
pub async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request on `sender` and reads the whole response (30 s at most).
pub async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<http::Response<Bytes>, String> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
    // HTTP/1: the previous exchange must be finished before the next request.
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(http::Response::from_parts(parts, body))
}

/// One request on a new connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<http::Response<Bytes>, String> {
    let mut sender = connect(addr).await?;
    send(&mut sender, method, host, path, headers, body).await
}

/// Opens a WebSocket (`GET path` with an HTTP/1.1 upgrade) on `addr` for `host`.
pub async fn websocket(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, http::Response<Option<Vec<u8>>>), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    websocket_over(stream, host, path, headers).await
}

/// The WebSocket upgrade of [`websocket`] over a stream already open (a TLS one, say).
pub async fn websocket_over<S>(
    stream: S,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<S>,
        http::Response<Option<Vec<u8>>>,
    ),
    String,
>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut b = http::Request::get(format!("ws://{host}{path}"))
        .header("host", host)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        );
    // A browser always sends `Origin` (Odoo 17+ refuses a handshake without it).
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("origin"))
    {
        b = b.header("origin", format!("http://{host}"));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(()).map_err(|e| e.to_string())?;
    tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| e.to_string())
}
