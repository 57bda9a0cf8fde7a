//! The filestore offload, end to end: a simulated Odoo 17 started with `--x-sendfile`
//! (portier-sim `filestore.rs`, as `odoo/http.py` `Stream.get_response` answers) behind
//! a real portier whose pool has `filestore`. Each test is a sentence of the
//! configuration reference's `filestore` (docs/configuration.md) and the README's
//! "Attachments sent by portier".

use std::sync::Arc;
use std::time::{Duration, Instant};

use portier_sim::filestore::Attachment;
use portier_sim::{Odoo, OdooVersion, Server, SimConfig};
use portier_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    p: Portier,
    http: SimWorker,
    plain: SimWorker,
    odoo: Arc<Odoo>,
    data: tempfile::TempDir,
    https: std::net::SocketAddr,
    pki: TestPki,
    _certs: tempfile::TempDir,
}

impl Setup {
    fn add(&self, db: &str, name: &str, mimetype: &str, content: &[u8]) -> Attachment {
        self.odoo
            .filestore()
            .unwrap()
            .add(db, name, mimetype, content)
            .unwrap()
    }

    fn root(&self) -> std::path::PathBuf {
        self.data.path().join("filestore")
    }

    async fn metrics(&self) -> String {
        get(self.p.admin, "admin", "/metrics").await.unwrap().text()
    }
}

/// Content that differs at every offset, so a wrong range shows.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Tenants `acme` and `beta` (their own databases) and the template `{tenant}.saas.test`
/// on a pool with `filestore` and one worker slot; `plain` on a pool without it.
async fn setup(extra_defaults: &str) -> Setup {
    let data = tempfile::tempdir().unwrap();
    let odoo = Arc::new(Odoo::new(
        OdooVersion::V17,
        Some(&["acme", "beta", "x", "y"]),
    ));
    odoo.set_data_dir(data.path()).unwrap();
    let mut cfg = SimConfig::new(Server::Http, odoo.clone());
    cfg.x_sendfile = true;
    cfg.socket_timeout = None;
    let http = SimWorker::start_with("h", local(0), cfg.clone())
        .await
        .unwrap();
    let plain = SimWorker::start_with("plain", local(0), cfg).await.unwrap();
    let pki = TestPki::new();
    let certs = tempfile::tempdir().unwrap();
    pki.write_pair(certs.path(), "t", &["acme.test", "*.saas.test"], 30);
    let ports = Ports::new();
    let config = format!(
        r#"{listen}https = "127.0.0.1:{https}"
[tls]
certs = "{certs}"
[defaults]
{extra_defaults}
[pools.p]
http = ["{h}"]
workers = 1
queue = {{ max = 10, timeout = "2s" }}
filestore = "{fs}"
[pools.nofs]
http = ["{plain}"]
[tenants.acme]
hosts = ["acme.test"]
pool = "p"
database = "acme"
[tenants.beta]
hosts = ["beta.test"]
pool = "p"
database = "beta"
[tenants.saas]
hosts = ["{{tenant}}.saas.test"]
pool = "p"
database = "{{tenant}}"
[tenants.plain]
hosts = ["plain.test"]
pool = "nofs"
database = "acme"
"#,
        listen = ports.listen(),
        https = ports.https,
        certs = certs.path().display(),
        h = http.addr(),
        plain = plain.addr(),
        fs = data.path().join("filestore").display(),
    );
    let p = Portier::start(&ports, &config).await;
    let https = local(ports.https);
    Setup {
        p,
        http,
        plain,
        odoo,
        data,
        https,
        pki,
        _certs: certs,
    }
}

fn url(a: &Attachment) -> String {
    format!("/web/content/{}", a.id)
}

/// The worker's answer is replaced by the file: the worker's status and headers, the
/// real `Content-Length`, never `X-Accel-Redirect` or `X-Sendfile`; `GET` and `HEAD`;
/// counted in the metrics and logged as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_is_sent_by_portier_with_the_workers_headers() {
    let s = setup("").await;
    let body = content(300_000);
    let a = s.add("acme", "report.pdf", "application/pdf", &body);
    let r = get(s.p.http, "acme.test", &url(&a)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "the bytes differ");
    assert_eq!(r.header("content-length"), Some("300000"));
    assert_eq!(r.header("content-type"), Some("application/pdf"));
    assert_eq!(
        r.header("content-disposition"),
        Some("inline; filename=\"report.pdf\"")
    );
    assert_eq!(r.header("etag"), Some(format!("\"{}\"", a.sha).as_str()));
    assert!(r.header("last-modified").is_some());
    assert_eq!(r.header("cache-control"), Some("no-cache, private"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r.header("x-request-id").is_some());
    assert_eq!(r.header("x-accel-redirect"), None);
    assert_eq!(r.header("x-sendfile"), None);
    assert_eq!(r.worker(), Some("h"), "the worker's own headers");
    // The worker answered with an empty body: the bytes came from the filestore.
    let rec = s.http.requests();
    assert_eq!(rec.last().unwrap().target, url(&a));
    let log = s.p.wait_access_log(|v| v["path"] == url(&a)).await;
    assert_eq!(log["status"], 200);
    assert_eq!(log["refused"], serde_json::Value::Null);
    assert_eq!(log["bytes"], 300_000);
    assert_eq!(log["backend"], s.http.addr().to_string());

    let head = request(
        s.p.http,
        "HEAD",
        "acme.test",
        &url(&a),
        &[],
        bytes::Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("300000"));
    assert!(head.body.is_empty());

    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "portier_filestore_requests_total{result=\"sent\"}"),
        2.0,
        "{m}"
    );
    assert!(
        metric(&m, "portier_filestore_bytes_total") >= 300_000.0,
        "{m}"
    );
}

/// A single `Range`: the worker's own 206 (werkzeug answers it) sent exactly; a worker
/// that ignores ranges gets portier's 206, `If-Range` against the `ETag` and
/// `Last-Modified`; several ranges 200 whole; an unsatisfiable one 416 with
/// `Content-Range: bytes */SIZE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_sent_as_asked() {
    let s = setup("").await;
    let body = content(10_000);
    let a = s.add("acme", "a.bin", "application/octet-stream", &body);
    let etag = format!("\"{}\"", a.sha);
    let ask = |h: Vec<(&'static str, String)>| {
        let (addr, u) = (s.p.http, url(&a));
        async move {
            let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            get_with(addr, "acme.test", &u, &hs).await.unwrap()
        }
    };
    for no_range in [false, true] {
        let mut h = vec![("range", "bytes=100-199".to_string())];
        if no_range {
            h.push(("x-sim-no-range", "1".to_string()));
        }
        let r = ask(h).await;
        assert_eq!(r.status, 206, "no_range={no_range}: {}", r.text());
        assert_eq!(r.header("content-range"), Some("bytes 100-199/10000"));
        assert_eq!(r.header("content-length"), Some("100"));
        assert!(r.body == body[100..200], "no_range={no_range}: wrong bytes");
    }
    // Suffix and open ranges, by portier.
    let r = ask(vec![
        ("range", "bytes=-10".into()),
        ("x-sim-no-range", "1".into()),
    ])
    .await;
    assert_eq!(
        (r.status, r.header("content-range")),
        (206, Some("bytes 9990-9999/10000"))
    );
    assert!(r.body == body[9990..]);
    // If-Range: the current ETag or date honours the range, another one gets it whole.
    let r = ask(vec![
        ("range", "bytes=0-9".into()),
        ("if-range", etag.clone()),
        ("x-sim-no-range", "1".into()),
    ])
    .await;
    assert_eq!(r.status, 206);
    let lm = get(s.p.http, "acme.test", &url(&a))
        .await
        .unwrap()
        .header("last-modified")
        .unwrap()
        .to_string();
    let r = ask(vec![
        ("range", "bytes=0-9".into()),
        ("if-range", lm),
        ("x-sim-no-range", "1".into()),
    ])
    .await;
    assert_eq!(r.status, 206);
    let r = ask(vec![
        ("range", "bytes=0-9".into()),
        ("if-range", "\"old\"".into()),
        ("x-sim-no-range", "1".into()),
    ])
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 10_000);
    // Several ranges: whole.
    let r = ask(vec![
        ("range", "bytes=0-1,5-6".into()),
        ("x-sim-no-range", "1".into()),
    ])
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body == body);
    // Unsatisfiable: 416 with the size, from portier and from the worker alike.
    for no_range in [true, false] {
        let mut h = vec![("range", "bytes=20000-".to_string())];
        if no_range {
            h.push(("x-sim-no-range", "1".to_string()));
        }
        let r = ask(h).await;
        assert_eq!(r.status, 416, "no_range={no_range}");
        assert_eq!(r.header("content-range"), Some("bytes */10000"));
        assert!(r.body.is_empty());
    }
}

/// The worker's slot is free before a byte of the file is sent: with one slot, a slow
/// download does not hold the worker, other requests of the pool go through at once,
/// and the file is read as the client takes it (not spooled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_download_holds_no_worker() {
    let s = setup("").await;
    let a = s.add(
        "acme",
        "big.bin",
        "application/octet-stream",
        &content(16 << 20),
    );
    let mut slow = tokio::net::TcpStream::connect(s.p.http).await.unwrap();
    slow.write_all(format!("GET {} HTTP/1.1\r\nHost: acme.test\r\n\r\n", url(&a)).as_bytes())
        .await
        .unwrap();
    let mut first = vec![0u8; 4096];
    let n = slow.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    // The client reads nothing more for now: the rest of 16 MiB waits on it.
    for i in 0..5 {
        let t = Instant::now();
        let r = get(
            s.p.http,
            "acme.test",
            &format!("/web/dataset/call_kw?i={i}"),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "request {i} behind a download: {}", r.text());
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "request {i} waited {:?}",
            t.elapsed()
        );
    }
    assert_eq!(s.http.busy(), 0);
    let m = s.metrics().await;
    assert!(
        metric(&m, "portier_filestore_bytes_total") < (12 << 20) as f64,
        "the file was read ahead of the client: {m}"
    );
    assert_eq!(
        metric(&m, "portier_spooled_bytes_total{direction=\"response\"}"),
        0.0
    );
    // The download completes when the client reads.
    let mut total = n;
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(k)) => total += k,
            Ok(Err(_)) => break,
        }
        if total >= (16 << 20) {
            break;
        }
    }
    assert!(total >= 16 << 20, "only {total} bytes arrived");
}

/// Only the tenant's own database, nothing outside `filestore/DB`: another database,
/// `..`, `.` or empty segments, a symlink leaving the directory: `502`
/// `filestore_denied`; a missing file `404` `filestore_missing`. A template tenant's
/// database is its captured name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_tenants_own_files_are_sent() {
    let s = setup("").await;
    let a = s.add("acme", "a.txt", "text/plain", b"acme's");
    let b = s.add("beta", "b.txt", "text/plain", b"beta's secret");
    let x = s.add("x", "x.txt", "text/plain", b"x's file");
    let acme_dir = s.root().join("acme").join(&a.sha[..2]);
    std::os::unix::fs::symlink(s.root().join(b.store_fname()), acme_dir.join("escape")).unwrap();
    let redirect = |p: String| vec![("x-sim-accel-redirect", p)];
    let cases = [
        (
            format!("/web/filestore/{}", b.store_fname()),
            502,
            "filestore_denied",
        ),
        (
            format!("/web/filestore/acme/../{}", b.store_fname()),
            502,
            "filestore_denied",
        ),
        (
            format!("/web/filestore/acme/./{}/{}", &a.sha[..2], a.sha),
            502,
            "filestore_denied",
        ),
        (
            format!("/web/filestore/acme//{}", a.sha),
            502,
            "filestore_denied",
        ),
        (
            format!("/web/filestore/acme/{}/escape", &a.sha[..2]),
            502,
            "filestore_denied",
        ),
        (
            format!("/web/filestore/acme/{}/{}0", &a.sha[..2], a.sha),
            404,
            "filestore_missing",
        ),
    ];
    for (i, (target, status, why)) in cases.into_iter().enumerate() {
        let h = redirect(target.clone());
        let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let path = format!("{}?case={i}", url(&a));
        let r = get_with(s.p.http, "acme.test", &path, &hs).await.unwrap();
        assert_eq!(r.status, status, "{target}: {}", r.text());
        assert!(!r.text().contains("secret"), "{target}: beta's file leaked");
        let log =
            s.p.wait_access_log(|v| v["path"] == url(&a) && v["status"] == status)
                .await;
        assert_eq!(log["refused"], why, "{target}");
    }
    // A template tenant: its database is the captured label.
    let r = get(s.p.http, "x.saas.test", &url(&x)).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "x's file"));
    let h = redirect(format!("/web/filestore/{}", a.store_fname()));
    let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = get_with(s.p.http, "x.saas.test", &url(&x), &hs)
        .await
        .unwrap();
    assert_eq!(r.status, 502, "x.saas.test got acme's file");
    let m = s.metrics().await;
    assert!(
        metric(&m, "portier_filestore_requests_total{result=\"denied\"}") >= 6.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "portier_filestore_requests_total{result=\"missing\"}"),
        1.0,
        "{m}"
    );
}

/// A client's own `/web/filestore/...` never reaches a worker: `404`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filestore_location_is_internal() {
    let s = setup("").await;
    let a = s.add("acme", "a.txt", "text/plain", b"acme's");
    let before = s.http.requests().len();
    for path in [
        format!("/web/filestore/{}", a.store_fname()),
        "/web/filestore/".to_string(),
        format!("/web/%66ilestore/{}", a.store_fname()),
        format!("/web/static/../filestore/{}", a.store_fname()),
    ] {
        let r = get(s.p.http, "acme.test", &path).await.unwrap();
        assert_eq!(r.status, 404, "{path}");
        assert_ne!(r.text(), "acme's");
    }
    assert_eq!(s.http.requests().len(), before, "a worker saw it");
    assert_eq!(s.http.filestore_errors(), 0);
}

/// Never compressed, never cached: with `compress = "all"` a text attachment the client
/// would take gzip for is sent as stored, and twice from the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_is_never_compressed_or_cached() {
    let s = setup("compress = \"all\"\n").await;
    let text = "a line of text that compresses well\n".repeat(200);
    let a = s.add("acme", "notes.txt", "text/plain", text.as_bytes());
    for _ in 0..2 {
        let r = get_with(
            s.p.http,
            "acme.test",
            &url(&a),
            &[("accept-encoding", "gzip, br, zstd")],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), None);
        assert_eq!(r.header("x-cache"), None);
        assert_eq!(r.text(), text);
    }
    let seen = s
        .http
        .requests()
        .iter()
        .filter(|r| r.target == url(&a))
        .count();
    assert_eq!(seen, 2);
}

/// A pool without `filestore`: a handover is `502` (`filestore_unset`), never Odoo's
/// empty body as if it were the file; logged once a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_filestore_a_handover_is_502() {
    let s = setup("").await;
    let a = s.add("acme", "a.txt", "text/plain", b"acme's");
    for _ in 0..3 {
        let r = get(s.p.http, "plain.test", &url(&a)).await.unwrap();
        assert_eq!(r.status, 502);
        assert_ne!(r.text(), "");
    }
    assert_eq!(s.plain.requests().len(), 3);
    let log = s.p.wait_access_log(|v| v["tenant"] == "plain").await;
    assert_eq!(log["refused"], "filestore_unset");
    let lines =
        s.p.stderr()
            .iter()
            .filter(|l| l.contains("has no `filestore`"))
            .count();
    assert_eq!(lines, 1, "logged once a minute");
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "portier_filestore_requests_total{result=\"unset\"}"),
        3.0,
        "{m}"
    );
}

/// Over HTTP/2 with TLS, whole and ranged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_over_http2() {
    let s = setup("").await;
    let body = content(200_000);
    let a = s.add("acme", "a.bin", "application/octet-stream", &body);
    let cfg = s.pki.client(&[b"h2"], &[&rustls::version::TLS13]);
    let conn = tls_connect(s.https, "acme.test", cfg.clone())
        .await
        .unwrap();
    let r = h2_over(conn, "acme.test", &url(&a)).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == body);
    assert_eq!(r.header("content-length"), Some("200000"));
    assert_eq!(r.header("x-accel-redirect"), None);
    let conn = tls_connect(s.https, "acme.test", cfg).await.unwrap();
    let r = h2_over_with(
        conn,
        "acme.test",
        &url(&a),
        &[("range", "bytes=1000-1999"), ("x-sim-no-range", "1")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 206);
    assert!(r.body == body[1000..2000]);
}

/// `check`: `filestore` must be a readable directory, reported at its value.
#[test]
fn check_refuses_a_filestore_that_is_not_a_readable_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs.toml");
    std::fs::write(
        &path,
        "[listen]\nhttp = \"127.0.0.1:18080\"\n[pools.p]\nhttp = [\"127.0.0.1:8069\"]\nfilestore = \"/nonexistent/filestore\"\n[tenants.t]\nhosts = [\"t.test\"]\npool = \"p\"\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "{}:5:13: `filestore` \"/nonexistent/filestore\" is not a readable directory",
            path.display()
        )),
        "{err}"
    );
}
