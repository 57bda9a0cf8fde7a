//! `portier demo`: the proxy on 127.0.0.1 with an embedded config in front of two
//! simulated Odoo workers (each with an HTTP port and a gevent port), a self-test
//! that shows two tenants and a WebSocket routed and an attachment sent by portier from
//! the filestore (the workers run with `--x-sendfile`), and `curl` lines to try.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use portier_sim::{client, Odoo, OdooVersion, Server, SimConfig, SimWorker};
use tokio_tungstenite::tungstenite::Message;

use crate::state::Shared;

/// The databases on the demo's PostgreSQL: the tenants' own, and `acme2`, which an
/// unanchored filter for `acme` would also admit.
const DATABASES: &[&str] = &["acme", "acme2", "beta", "gamma", "zeta"];

struct Workers {
    http: Vec<SocketAddr>,
    gevent: Vec<SocketAddr>,
    /// The servers' `data_dir/filestore`, and acme's attachment in it (id, size).
    filestore: std::path::PathBuf,
    attachment: (u64, u64),
}

/// acme's attachment: a small PDF-looking file of 64 KiB.
fn invoice() -> Vec<u8> {
    let mut v = b"%PDF-1.4\n% portier demo invoice\n".to_vec();
    v.resize(64 << 10, b'.');
    v
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
                // Two Odoo 17 servers, each a prefork HTTP port (2 workers) and a gevent
                // port, on one PostgreSQL and one sessions directory (the filestore
                // volume multi-server Odoo deployments share): a session rotated at
                // login may land on the other server.
                let odoo = Arc::new(Odoo::new(OdooVersion::V17, Some(DATABASES)));
                // Their data_dir, whose filestore portier sends attachments from.
                let data_dir =
                    std::env::temp_dir().join(format!("portier-demo-{}", std::process::id()));
                let attachment = odoo
                    .set_data_dir(&data_dir)
                    .and_then(|fs| fs.add("acme", "invoice.pdf", "application/pdf", &invoice()));
                let (filestore, attachment) = match attachment {
                    Ok(a) => (data_dir.join("filestore"), (a.id, a.size)),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                for server in ["w1", "w2"] {
                    let odoo = odoo.clone();
                    let mut http = SimConfig::new(Server::Http, odoo.clone());
                    http.workers = Some(2);
                    http.x_sendfile = true;
                    let gevent = SimConfig::new(Server::Gevent, odoo);
                    for (name, cfg) in [
                        (server.to_string(), http),
                        (format!("{server}-gevent"), gevent),
                    ] {
                        match SimWorker::start_with(&name, local, cfg).await {
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
                }
                let addrs = Workers {
                    http: vec![workers[0].addr(), workers[2].addr()],
                    gevent: vec![workers[1].addr(), workers[3].addr()],
                    filestore,
                    attachment,
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

fn config_text(port: u16, admin_port: u16, workers: &Workers) -> String {
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
filestore = "{filestore}"

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
        http = list(&workers.http),
        gevent = list(&workers.gevent),
        filestore = workers.filestore.display(),
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
    let text = config_text(port, admin_port, &workers);
    let (config, _) = match portier_config::load_str(&text, Path::new("<demo>")) {
        Ok(c) => c,
        Err(diags) => {
            eprintln!("{}", portier_config::render(&diags));
            return 1;
        }
    };
    let hook: crate::ops::control::ReadyHook = Box::new(move |shared: Arc<Shared>| {
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
    crate::ops::server::serve(config, None, Some(hook))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Answer {
    status: u16,
    body: String,
    cookie: String,
    /// `X-Cache` and `Content-Encoding`, for the asset-cache check.
    cache: String,
    encoding: String,
    /// `X-Accel-Redirect`, which the client must never see.
    accel: String,
}

async fn call(
    port: u16,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Result<Answer, String> {
    let resp = client::request(
        local(port),
        method,
        host,
        path,
        headers,
        Bytes::from_static(body.as_bytes()),
    )
    .await?;
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .to_string();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    Ok(Answer {
        status: resp.status().as_u16(),
        cache: header("x-cache"),
        encoding: header("content-encoding"),
        accel: header("x-accel-redirect"),
        body: String::from_utf8_lossy(resp.body()).into_owned(),
        cookie,
    })
}

async fn get(port: u16, host: &str, path: &str, cookie: &str) -> Result<Answer, String> {
    let headers: &[(&str, &str)] = if cookie.is_empty() {
        &[]
    } else {
        &[("cookie", cookie)]
    };
    call(port, "GET", host, path, headers, "").await
}

async fn websocket(
    port: u16,
    host: &str,
    cookie: &str,
) -> Result<(String, String, String), String> {
    let (mut ws, _) =
        client::websocket(local(port), host, "/websocket", &[("cookie", cookie)]).await?;
    let mut ask = async |text: &str| -> Result<String, String> {
        ws.send(Message::text(text))
            .await
            .map_err(|e| e.to_string())?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => Ok(t.to_string()),
            other => Err(format!("unexpected {other:?}")),
        }
    };
    let echo = ask("hello through portier").await?;
    let who = ask("whoami").await?;
    let session = ask("session").await?;
    let _ = ws.close(None).await;
    Ok((echo, who, session))
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
    // A browser's login through portier: the login page, the form, the home page,
    // then the bus WebSocket with the same session.
    let host = "acme.localhost";
    let mut cookie = String::new();
    match get(port, host, "/web/login", "").await {
        Ok(a) => {
            line(
                a.status == 200 && a.cookie.starts_with("session_id="),
                format!(
                    "{host} GET /web/login -> {} from worker {} (database {}), cookie {}",
                    a.status,
                    field(&a.body, "/worker"),
                    field(&a.body, "/db"),
                    a.cookie
                ),
            );
            cookie = a.cookie;
        }
        Err(e) => line(false, format!("{host}: {e}")),
    }
    let form = [
        ("cookie", cookie.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    match call(
        port,
        "POST",
        host,
        "/web/login",
        &form,
        "login=admin&password=admin",
    )
    .await
    {
        Ok(a) => {
            line(
                a.status == 303 && a.cookie.starts_with("session_id="),
                format!(
                    "{host} POST /web/login -> {} (logged in, session rotated)",
                    a.status
                ),
            );
            if !a.cookie.is_empty() {
                cookie = a.cookie;
            }
        }
        Err(e) => line(false, format!("{host} login: {e}")),
    }
    match get(port, host, "/web", &cookie).await {
        Ok(a) => line(
            a.status == 200 && field(&a.body, "/user") == "admin",
            format!(
                "{host} GET /web -> {} as {} on database {} (sticky worker {})",
                a.status,
                field(&a.body, "/user"),
                field(&a.body, "/db"),
                field(&a.body, "/worker")
            ),
        ),
        Err(e) => line(false, format!("{host} home: {e}")),
    }
    match websocket(port, host, &cookie).await {
        Ok((echo, who, session)) => line(
            echo == "hello through portier"
                && who.ends_with("-gevent")
                && session.contains("\"admin\""),
            format!("{host} /websocket -> echoed via gevent worker {who}, session {session}"),
        ),
        Err(e) => line(false, format!("websocket: {e}")),
    }
    for host in ["beta.saas.localhost", "gamma.saas.localhost"] {
        match get(port, host, "/web/login", "").await {
            Ok(a) => line(
                a.status == 200,
                format!(
                    "{host} /web/login -> {} from worker {} (tenant template, database {})",
                    a.status,
                    field(&a.body, "/worker"),
                    field(&a.body, "/db")
                ),
            ),
            Err(e) => line(false, format!("{host}: {e}")),
        }
    }
    match get(port, "nobody.example", "/", "").await {
        Ok(a) => line(
            a.status == 404,
            format!("nobody.example / -> {} (unknown host)", a.status),
        ),
        Err(e) => line(false, format!("unknown host: {e}")),
    }
    match get(port, "beta.saas.localhost", "/web/database/manager", "").await {
        Ok(a) => line(
            a.status == 403,
            format!(
                "beta.saas.localhost /web/database/manager -> {} (database manager blocked)",
                a.status
            ),
        ),
        Err(e) => line(false, format!("database manager: {e}")),
    }
    // An asset bundle: from the worker once, then from portier's cache, compressed.
    let bundle = "/web/assets/1a2b3c/web.assets_web.min.js";
    let accept = [("accept-encoding", "gzip, br, zstd")];
    let first = call(port, "GET", "acme.localhost", bundle, &accept, "").await;
    let second = call(port, "GET", "acme.localhost", bundle, &accept, "").await;
    match (first, second) {
        (Ok(a), Ok(b)) => line(
            a.cache == "miss" && b.cache == "hit" && b.encoding == "zstd",
            format!(
                "acme.localhost GET {bundle} -> X-Cache {} then {} ({} compressed)",
                a.cache, b.cache, b.encoding
            ),
        ),
        (Err(e), _) | (_, Err(e)) => line(false, format!("asset cache: {e}")),
    }
    let (ok, text) = attachment(port, workers.attachment).await;
    line(ok, text);
    let attachment_id = workers.attachment.0;
    let http: Vec<String> = workers.http.iter().map(|a| a.to_string()).collect();
    let gevent: Vec<String> = workers.gevent.iter().map(|a| a.to_string()).collect();
    println!(
        r#"
portier demo: proxy on http://127.0.0.1:{port}, admin on http://127.0.0.1:{admin_port}
dashboard: http://127.0.0.1:{admin_port}/
simulated Odoo workers: w1, w2 (http {http}), w1-gevent, w2-gevent (gevent {gevent})
tenants: acme.localhost (database acme) and {{tenant}}.saas.localhost (database = the tenant);
databases on the simulated Odoo 17 servers: acme, acme2, beta, gamma, zeta

self-test:
{out}
try it (*.localhost resolves to 127.0.0.1; the workers answer with what reached them):
  curl -i http://acme.localhost:{port}/web/login
  curl -s http://beta.saas.localhost:{port}/web/login
  curl -s http://acme.localhost:{port}/jsonrpc -H 'Content-Type: application/json' -d '{{"jsonrpc":"2.0","method":"call","params":{{}},"id":1}}'
  curl -s http://acme.localhost:{port}/web/login -H 'X-Odoo-Database: acme2' # dropped: the worker sees ^acme$ and picks acme
  curl -i http://127.0.0.1:{port}/ -H 'Host: nobody.example'                  # 404 unknown host
  curl -i http://beta.saas.localhost:{port}/web/database/manager              # 403
  curl -sI http://acme.localhost:{port}/web/assets/1a2b3c/web.assets_web.min.js -H 'Accept-Encoding: br' # X-Cache, Age, br
  curl -i -N --max-time 2 http://acme.localhost:{port}/websocket -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' -H 'Origin: http://acme.localhost:{port}'
  curl -sI http://acme.localhost:{port}/web/content/{attachment_id}                          # sent by portier from the filestore
  curl -s http://127.0.0.1:{admin_port}/status
  curl -s http://127.0.0.1:{admin_port}/metrics | grep portier_requests_total
press Ctrl-C to stop."#,
        http = http.join(", "),
        gevent = gevent.join(", "),
    );
}

/// acme's attachment: the worker answers `X-Accel-Redirect` (Odoo's `--x-sendfile`) and
/// portier sends the file from the filestore.
async fn attachment(port: u16, (id, size): (u64, u64)) -> (bool, String) {
    let path = format!("/web/content/{id}");
    match get(port, "acme.localhost", &path, "").await {
        Ok(a) => (
            a.status == 200 && a.body.len() as u64 == size && a.accel.is_empty(),
            format!(
                "acme.localhost GET {path} -> {}, {} bytes sent by portier from the filestore (the worker answered X-Accel-Redirect)",
                a.status,
                a.body.len()
            ),
        ),
        Err(e) => (false, format!("attachment: {e}")),
    }
}
