//! The tests' HTTP/1, raw-TCP and WebSocket clients, and the response they see
//! (`Resp`): thin wrappers over `portier_sim::client` (hyper, tokio-tungstenite).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use portier_sim::client;
pub use portier_sim::client::{websocket, Ws};

/// A response as the test sees it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The worker that answered (simulated workers set `x-sim-worker`).
    pub fn worker(&self) -> Option<&str> {
        self.header("x-sim-worker")
    }

    /// A header as the worker received it (from the sim's echo).
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()
            .pointer(&format!("/headers/{name}"))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    }
}

fn to_resp(r: http::Response<Bytes>) -> Resp {
    let (parts, body) = r.into_parts();
    Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// Sends one request on a new connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Resp, String> {
    client::request(addr, method, host, path, headers, body)
        .await
        .map(to_resp)
}

/// Sends a request on an existing HTTP/1 connection.
pub async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Resp, String> {
    client::send(sender, method, host, path, headers, body)
        .await
        .map(to_resp)
}

/// A keep-alive HTTP/1 connection for several requests.
pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    client::connect(addr).await.expect("connect")
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Resp, String> {
    request(addr, "GET", host, path, &[], Bytes::new()).await
}

/// A GET with extra request headers, on a new connection.
pub async fn get_with(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Resp, String> {
    request(addr, "GET", host, path, headers, Bytes::new()).await
}

/// Writes raw bytes and reads until the server closes (or `wait` passes).
/// Returns what was read and whether the server closed the connection.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Sends a text message and waits for the next text reply.
pub async fn ws_roundtrip(ws: &mut Ws, text: &str) -> Result<String, String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.to_string()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("closed".into()),
            Err(_) => return Err("timed out".into()),
        }
    }
}
