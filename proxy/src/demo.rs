//! `portier demo`: the proxy on 127.0.0.1 with an embedded config in front of two
//! simulated Odoo workers (each with an HTTP port and a gevent port), a self-test
//! that shows two tenants and a WebSocket routed, and `curl` lines to try.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use portier_sim::{client, SimWorker};
use tokio_tungstenite::tungstenite::Message;

use crate::state::Shared;

struct Workers {
    http: Vec<SocketAddr>,
    gevent: Vec<SocketAddr>,
}

fn start_workers() -> std::io::Result<Workers> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("demo-workers".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let local: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
                let mut workers = Vec::new();
                for name in ["w1", "w1-gevent", "w2", "w2-gevent"] {
                    match SimWorker::start(name, local).await {
                        Ok(w) => {
                            w.set_longpoll_hold(Duration::from_secs(10));
                            w.set_recording(false);
                            workers.push(w)
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                let addrs = Workers {
                    http: vec![workers[0].addr(), workers[2].addr()],
                    gevent: vec![workers[1].addr(), workers[3].addr()],
                };
                let _ = tx.send(Ok(addrs));
                // Keep the workers alive for the life of the process.
                std::future::pending::<()>().await;
                drop(workers);
            });
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("demo workers did not start"))?
}

fn list(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", items.join(", "))
}

pub fn config_text(
    port: u16,
    admin_port: u16,
    http: &[SocketAddr],
    gevent: &[SocketAddr],
) -> String {
    format!(
        r#"# portier demo configuration (embedded)
[listen]
http = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin_port}"
drain = "5s"

[pools.demo]
http = {http}
longpolling = {gevent}
health = {{ path = "/web/health", every = "2s" }}

[tenants.acme]
hosts = ["acme.localhost"]
pool = "demo"
database = "acme"
integration = {{ rate = "5/s", burst = 10, concurrency = 4 }}

[tenants.saas]
hosts = ["{{tenant}}.saas.localhost"]
pool = "demo"
database = "{{tenant}}"
admin_cidrs = []
"#,
        http = list(http),
        gevent = list(gevent),
    )
}

pub fn run(port: u16, admin_port: u16) -> i32 {
    let workers = match start_workers() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("portier demo: cannot start the simulated workers: {e}");
            return 1;
        }
    };
    let text = config_text(port, admin_port, &workers.http, &workers.gevent);
    let (config, _) = match portier_config::load_str(&text, Path::new("<demo>")) {
        Ok(c) => c,
        Err(diags) => {
            eprintln!("{}", portier_config::render(&diags));
            return 1;
        }
    };
    let hook: crate::control::ReadyHook = Box::new(move |shared: Arc<Shared>| {
        let _ = std::thread::Builder::new()
            .name("demo-selftest".into())
            .spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(self_test(port, admin_port, workers));
                }
                drop(shared);
            });
    });
    crate::server::serve(config, None, Some(hook))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn get(port: u16, host: &str, path: &str) -> Result<(u16, String, String), String> {
    let resp = client::request(local(port), "GET", host, path, &[], Bytes::new()).await?;
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let status = resp.status().as_u16();
    Ok((
        status,
        String::from_utf8_lossy(resp.body()).into_owned(),
        cookie,
    ))
}

async fn websocket(port: u16, host: &str) -> Result<(String, String), String> {
    let (mut ws, _) = client::websocket(local(port), host, "/websocket", &[]).await?;
    ws.send(Message::text("hello through portier"))
        .await
        .map_err(|e| e.to_string())?;
    let echo = match ws.next().await {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => return Err(format!("unexpected {other:?}")),
    };
    ws.send(Message::text("whoami"))
        .await
        .map_err(|e| e.to_string())?;
    let who = match ws.next().await {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => return Err(format!("unexpected {other:?}")),
    };
    let _ = ws.close(None).await;
    Ok((echo, who))
}

fn field(body: &str, pointer: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer(pointer).cloned())
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
        .unwrap_or_else(|| "?".into())
}

async fn self_test(port: u16, admin_port: u16, workers: Workers) {
    let mut out = String::new();
    let mut line = |ok: bool, text: String| {
        out.push_str(if ok { "  ok   " } else { "  FAIL " });
        out.push_str(&text);
        out.push('\n');
    };
    match get(port, "acme.localhost", "/web/login").await {
        Ok((s, body, cookie)) => line(
            s == 200 && cookie.starts_with("session_id="),
            format!(
                "acme.localhost /web/login -> {s} from worker {} (database {}), cookie {}",
                field(&body, "/worker"),
                field(&body, "/headers/x-odoo-database"),
                cookie.split(';').next().unwrap_or("")
            ),
        ),
        Err(e) => line(false, format!("acme.localhost: {e}")),
    }
    for host in ["beta.saas.localhost", "gamma.saas.localhost"] {
        match get(port, host, "/web").await {
            Ok((s, body, _)) => line(
                s == 200,
                format!(
                    "{host} /web -> {s} from worker {} (tenant template, database {})",
                    field(&body, "/worker"),
                    field(&body, "/headers/x-odoo-database")
                ),
            ),
            Err(e) => line(false, format!("{host}: {e}")),
        }
    }
    match websocket(port, "acme.localhost").await {
        Ok((echo, who)) => line(
            echo == "hello through portier" && who.ends_with("-gevent"),
            format!("acme.localhost /websocket -> echoed {echo:?} via gevent worker {who}"),
        ),
        Err(e) => line(false, format!("websocket: {e}")),
    }
    match get(port, "nobody.example", "/").await {
        Ok((s, _, _)) => line(s == 404, format!("nobody.example / -> {s} (unknown host)")),
        Err(e) => line(false, format!("unknown host: {e}")),
    }
    match get(port, "beta.saas.localhost", "/web/database/manager").await {
        Ok((s, _, _)) => line(
            s == 403,
            format!("beta.saas.localhost /web/database/manager -> {s} (database manager blocked)"),
        ),
        Err(e) => line(false, format!("database manager: {e}")),
    }
    let http: Vec<String> = workers.http.iter().map(|a| a.to_string()).collect();
    let gevent: Vec<String> = workers.gevent.iter().map(|a| a.to_string()).collect();
    println!(
        r#"
portier demo: proxy on http://127.0.0.1:{port}, admin on http://127.0.0.1:{admin_port}
simulated Odoo workers: w1, w2 (http {http}), w1-gevent, w2-gevent (gevent {gevent})
tenants: acme.localhost (database acme) and {{tenant}}.saas.localhost (database = the tenant)

self-test:
{out}
try it (*.localhost resolves to 127.0.0.1; the workers answer with what reached them):
  curl -i http://acme.localhost:{port}/web/login
  curl -s http://beta.saas.localhost:{port}/web
  curl -s http://acme.localhost:{port}/jsonrpc -H 'Content-Type: application/json' -d '{{"jsonrpc":"2.0","method":"call","params":{{}},"id":1}}'
  curl -s http://acme.localhost:{port}/web -H 'X-Odoo-Database: other'       # ignored: the worker sees database acme
  curl -i http://127.0.0.1:{port}/ -H 'Host: nobody.example'                  # 404 unknown host
  curl -i http://beta.saas.localhost:{port}/web/database/manager              # 403
  curl -i -N --max-time 2 http://acme.localhost:{port}/websocket -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=='
  curl -s http://127.0.0.1:{admin_port}/status
  curl -s http://127.0.0.1:{admin_port}/metrics | grep portier_requests_total
press Ctrl-C to stop."#,
        http = http.join(", "),
        gevent = gevent.join(", "),
    );
}
