//! TLS termination end to end: SNI from a directory, live reload, HTTP/2, TLS
//! versions, redirect and HSTS. Certificates are generated in the test (rcgen).

use std::time::Duration;

use portier_tests::*;

const V12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
const ALL: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

struct Setup {
    p: Portier,
    pki: TestPki,
    certs: tempfile::TempDir,
    https: std::net::SocketAddr,
    w: SimWorker,
}

async fn setup(default: Option<&str>, extra_tls: &str) -> Setup {
    let pki = TestPki::new();
    let certs = tempfile::tempdir().unwrap();
    pki.write_pair(certs.path(), "acme", &["acme.test", "erp.acme.test"], 90);
    pki.write_pair(certs.path(), "wild", &["*.saas.test"], 90);
    pki.write_pair(certs.path(), "fallback", &["fallback.test"], 90);
    let w = sim("w").await;
    let ports = Ports::new();
    let default = default
        .map(|d| format!("default = \"{d}\"\n"))
        .unwrap_or_default();
    let cfg = format!(
        r#"[listen]
http = "127.0.0.1:{http}"
https = "127.0.0.1:{https}"
admin = "127.0.0.1:{admin}"
threads = 1
[tls]
certs = "{dir}"
{default}{extra_tls}
[pools.p]
http = ["{w}"]
[tenants.acme]
hosts = ["acme.test", "erp.acme.test"]
pool = "p"
[tenants.saas]
hosts = ["{{tenant}}.saas.test"]
pool = "p"
[tenants.plain]
hosts = ["plain.test"]
pool = "p"
[tenants.fb]
hosts = ["fallback.test"]
pool = "p"
"#,
        http = ports.http,
        https = ports.https,
        admin = ports.admin,
        dir = certs.path().display(),
        w = w.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    Setup {
        https: local(ports.https),
        p,
        pki,
        certs,
        w,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_exact_then_wildcard_then_default() {
    let s = setup(Some("fallback"), "").await;
    let cfg = s.pki.client(&[b"http/1.1"], ALL);
    for (sni, expect) in [
        ("acme.test", "acme.test"),
        ("erp.acme.test", "acme.test"),
        ("beta.saas.test", "*.saas.test"),
        ("nobody.test", "fallback.test"),
    ] {
        // The client does not check the name against the presented certificate here:
        // connect with a name the certificate has, then compare what SNI selected.
        let stream = match tls_connect(s.https, sni, cfg.clone()).await {
            Ok(st) => st,
            Err(e) => {
                // nobody.test gets the fallback certificate, which does not name it.
                assert_eq!(sni, "nobody.test", "{sni}: {e}");
                assert!(
                    e.contains("NotValidForName") || e.contains("not valid for"),
                    "{e}"
                );
                continue;
            }
        };
        let names = presented_names(&stream);
        assert!(names.iter().any(|n| n == expect), "{sni} got {names:?}");
    }
    // The default really is presented for an unknown name (checked without name verification).
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &s.https.to_string(),
            "-servername",
            "nobody.test",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CN = fallback.test") || text.contains("CN=fallback.test"),
        "{text}"
    );
    // HTTPS requests route like plain ones, and say https upstream.
    let stream = tls_connect(s.https, "acme.test", cfg.clone())
        .await
        .unwrap();
    let r = h1_over(stream, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    let st = status(s.p.admin).await;
    assert_eq!(st["certificates"], 3);
    // The dashboard's certificate list: each pair with its expiry and days left.
    let list = st["certificate_list"].as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme", "fallback", "wild"]);
    assert_eq!(list[0]["days_left"], 89.0, "{}", list[0]);
    assert!(list[0]["not_after"].as_str().unwrap().ends_with('Z'));
    let metrics = get(s.p.admin, "admin", "/metrics").await.unwrap().text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("portier_cert_expiry_seconds{name=\"acme\"}"))
        .expect("expiry metric");
    let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(secs > 89.0 * 86400.0 && secs <= 90.0 * 86400.0, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_an_unknown_name_fails_the_handshake() {
    let s = setup(None, "").await;
    let cfg = s.pki.client(&[b"http/1.1"], ALL);
    let Err(err) = tls_connect(s.https, "nobody.test", cfg.clone()).await else {
        panic!("the handshake for an unknown name succeeded without a default");
    };
    assert!(
        err.to_lowercase().contains("alert")
            || err.contains("HandshakeFailure")
            || err.contains("unrecognised"),
        "{err}"
    );
    // Known names still work.
    assert!(tls_connect(s.https, "acme.test", cfg).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_certificate_changes_new_handshakes_without_a_restart() {
    let s = setup(Some("fallback"), "").await;
    let cfg = s.pki.client(&[b"http/1.1"], ALL);
    let old_conn = tls_connect(s.https, "acme.test", cfg.clone())
        .await
        .unwrap();
    let before = presented_der(&old_conn);
    s.pki
        .write_pair(s.certs.path(), "acme", &["acme.test", "erp.acme.test"], 30);
    let mut changed = false;
    for _ in 0..60 {
        let c = tls_connect(s.https, "acme.test", cfg.clone())
            .await
            .unwrap();
        if presented_der(&c) != before {
            changed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(changed, "new handshakes still present the old certificate");
    // The connection opened before keeps working.
    let r = h1_over(old_conn, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // A new pair appears: served without a restart.
    s.pki
        .write_pair(s.certs.path(), "newco", &["newco.test"], 90);
    let mut served = false;
    for _ in 0..60 {
        if let Ok(c) = tls_connect(s.https, "newco.test", cfg.clone()).await {
            served = presented_names(&c).contains(&"newco.test".to_string());
            if served {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served);
    // A removed pair is no longer served (the default is).
    std::fs::remove_file(s.certs.path().join("newco.crt")).unwrap();
    std::fs::remove_file(s.certs.path().join("newco.key")).unwrap();
    let mut gone = false;
    for _ in 0..60 {
        if tls_connect(s.https, "newco.test", cfg.clone())
            .await
            .is_err()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_pair_is_rejected_and_the_old_certificate_stays() {
    let s = setup(Some("fallback"), "").await;
    let cfg = s.pki.client(&[b"http/1.1"], ALL);
    let before = presented_der(
        &tls_connect(s.https, "acme.test", cfg.clone())
            .await
            .unwrap(),
    );
    // A new certificate with the key of another pair.
    let (crt, _) = s.pki.issue(&["acme.test"], 90);
    std::fs::write(s.certs.path().join("acme.crt"), crt).unwrap();
    std::fs::copy(
        s.certs.path().join("wild.key"),
        s.certs.path().join("acme.key"),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(8), || s.p.stderr().iter().any(|l| l
            .contains("certificate pair rejected")
            && l.contains("acme")))
        .await,
        "no rejection logged"
    );
    let after = presented_der(
        &tls_connect(s.https, "acme.test", cfg.clone())
            .await
            .unwrap(),
    );
    assert_eq!(before, after);
    // `check` reports it, at the `certs` key.
    let (code, _, err) = run_cli(&["check", "-c", s.p.config_path().to_str().unwrap()]);
    assert_eq!(code, 1);
    let file = s.p.config_path().display().to_string();
    assert!(
        err.contains(&format!("{file}:7:9: certificate pair `acme`:"))
            && err.contains("does not match"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_negotiated_with_alpn() {
    let s = setup(Some("fallback"), "").await;
    let stream = tls_connect(
        s.https,
        "acme.test",
        s.pki.client(&[b"h2", b"http/1.1"], ALL),
    )
    .await
    .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let r = h2_over(stream, "acme.test:8443", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.upstream_header("x-forwarded-host").as_deref(),
        Some("acme.test:8443")
    );
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    // The worker is spoken to over HTTP/1.1 regardless.
    let rec = s.w.requests().into_iter().last().unwrap();
    assert_eq!(rec.header("host"), Some("acme.test:8443"));
    // A client offering only http/1.1 gets it.
    let stream = tls_connect(s.https, "acme.test", s.pki.client(&[b"http/1.1"], ALL))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_is_accepted_and_tls11_refused() {
    let s = setup(Some("fallback"), "").await;
    let c = tls_connect(s.https, "acme.test", s.pki.client(&[b"http/1.1"], V12))
        .await
        .unwrap();
    assert_eq!(
        c.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    // A hand-made TLS 1.1 ClientHello (no client library here still speaks 1.1).
    let hello = tls11_client_hello("acme.test");
    let (resp, _) = raw(s.https, &hello, Duration::from_secs(2)).await;
    let bytes = resp.as_bytes();
    assert!(!bytes.is_empty(), "no answer");
    // A fatal alert record (21, level 2: rustls sends handshake_failure 40 or
    // protocol_version 70), never a ServerHello (22).
    assert_eq!(bytes[0], 21, "{bytes:?}");
    assert_eq!(bytes.get(5), Some(&2), "{bytes:?}");
    assert!(matches!(bytes.get(6), Some(40) | Some(70)), "{bytes:?}");
}

/// A minimal TLS 1.1 ClientHello with SNI.
fn tls11_client_hello(sni: &str) -> Vec<u8> {
    let mut ext = Vec::new();
    let name = sni.as_bytes();
    let mut sni_ext = Vec::new();
    sni_ext.extend(((name.len() + 3) as u16).to_be_bytes());
    sni_ext.push(0);
    sni_ext.extend((name.len() as u16).to_be_bytes());
    sni_ext.extend(name);
    ext.extend(0u16.to_be_bytes());
    ext.extend((sni_ext.len() as u16).to_be_bytes());
    ext.extend(sni_ext);
    let mut body = Vec::new();
    body.extend([0x03, 0x02]); // TLS 1.1
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    let suites: [u16; 4] = [0xc013, 0xc014, 0x002f, 0x0035];
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend(s.to_be_bytes());
    }
    body.extend([1, 0]); // compression: null
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1u8]; // ClientHello
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![22u8, 0x03, 0x02];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_for_covered_hosts_and_hsts_is_sent() {
    let s = setup(
        Some("fallback"),
        "redirect_http = true\nhsts = \"max-age=31536000; includeSubDomains\"\n",
    )
    .await;
    let port = s.https.port();
    let r = get(s.p.http, "Acme.test:80", "/web/login?redirect=%2Fodoo&x=1")
        .await
        .unwrap();
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("https://acme.test:{port}/web/login?redirect=%2Fodoo&x=1").as_str())
    );
    assert!(r.header("strict-transport-security").is_none());
    let r = get(s.p.http, "beta.saas.test", "/").await.unwrap();
    assert_eq!(r.status, 308);
    // The ACME challenge is proxied as-is.
    let r = get(
        s.p.http,
        "acme.test",
        "/.well-known/acme-challenge/token123",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.worker(), Some("w"));
    // A host no certificate names (only the default would answer): proxied.
    let r = get(s.p.http, "plain.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // A host that only the default pair names: the default does not count either.
    let r = get(s.p.http, "fallback.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "redirected: {:?}", r.header("location"));
    // HSTS on TLS responses, proxied and portier's own.
    let cfg = s.pki.client(&[b"http/1.1"], ALL);
    let r = h1_over(
        tls_connect(s.https, "acme.test", cfg.clone())
            .await
            .unwrap(),
        "acme.test",
        "/web/dataset/call_kw",
    )
    .await
    .unwrap();
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=31536000; includeSubDomains")
    );
    let r = h1_over(
        tls_connect(s.https, "acme.test", cfg).await.unwrap(),
        "unknown.test",
        "/",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404);
    assert!(r.header("strict-transport-security").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redirect_http_plain_http_is_proxied() {
    let s = setup(Some("fallback"), "redirect_http = false\n").await;
    let r = get(s.p.http, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("http")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_validates_pairs_and_warns_about_expiry() {
    let pki = TestPki::new();
    let certs = tempfile::tempdir().unwrap();
    pki.write_pair(certs.path(), "good", &["good.test"], 90);
    pki.write_pair(certs.path(), "soon", &["soon.test"], 5);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let cfg = |default: &str| {
        format!(
            "[listen]\nhttps = \"127.0.0.1:18443\"\n[tls]\ncerts = \"{}\"\ndefault = \"{default}\"\n[pools.p]\nhttp = [\"127.0.0.1:8069\"]\n[tenants.t]\nhosts = [\"good.test\"]\npool = \"p\"\n",
            certs.path().display()
        )
    };
    std::fs::write(&path, cfg("good")).unwrap();
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "ok: 1 pools, 1 tenants, 2 certificates");
    let file = path.display().to_string();
    assert!(
        err.contains(&format!("{file}:4:9: warning: certificate `soon`")),
        "{err}"
    );
    let days: f64 = err
        .split("expires in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|d| d.parse().ok())
        .expect("days");
    assert!((4.9..=5.0).contains(&days), "{err}");
    assert!(!err.contains("`good`"), "{err}");
    // A default that does not exist, and a key that does not parse.
    std::fs::write(&path, cfg("missing")).unwrap();
    std::fs::write(certs.path().join("bad.crt"), pki.issue(&["bad.test"], 90).0).unwrap();
    std::fs::write(
        certs.path().join("bad.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{file}:5:11: `default` names `missing`")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:4:9: certificate pair `bad`:")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_work_over_tls() {
    let s = setup(Some("fallback"), "").await;
    // Browsers open wss:// on an HTTP/1.1 connection (no WebSocket over HTTP/2).
    let stream = tls_connect(s.https, "acme.test", s.pki.client(&[b"http/1.1"], ALL))
        .await
        .unwrap();
    let (mut ws, resp) =
        portier_sim::client::websocket_over(stream, "acme.test", "/websocket", &[])
            .await
            .unwrap();
    assert_eq!(resp.status(), 101);
    use futures_util::{SinkExt, StreamExt};
    // Sizes around the buffers a read takes (2 KiB, growing) and TLS records (16 KiB),
    // so that a message arrives in pieces and rustls holds decrypted bytes between reads.
    // Between two messages the connection is quiet: rustls gives its read buffer back and
    // takes one again for the next (vendor patch 51).
    let sizes = [10, 2_000, 5_000, 17_000, 70_000, 300_000, 1, 4_097];
    for (i, n) in sizes.into_iter().enumerate() {
        let body: String = (0..n)
            .map(|j| (b'a' + ((i + j) % 26) as u8) as char)
            .collect();
        let msg = format!("over tls {i}:{body}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                assert!(
                    t.as_str() == msg,
                    "message {i} of {n} bytes came back as {}",
                    t.len()
                )
            }
            other => panic!("{other:?}"),
        }
    }
    let rec =
        s.w.requests()
            .into_iter()
            .find(|r| r.target == "/websocket")
            .unwrap();
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
}

/// Large request bodies over TLS arrive whole and in order, request after request on one
/// connection: the client's 16 KiB records are read from the socket in one go and handed
/// to rustls 4 KiB at a time, the rest kept until read (vendor patch 48's read buffer,
/// taken only while it holds bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_over_tls_arrive_whole_on_one_connection() {
    let s = setup(None, "").await;
    let cfg = s.pki.client(&[b"http/1.1"], ALL);
    let stream = tls_connect(s.https, "acme.test", cfg).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let sizes = [300_000usize, 17_000, 65_536, 1, 250_001];
    for (i, n) in sizes.iter().enumerate() {
        let body: Vec<u8> = (0..*n).map(|k| (k * 31 + i) as u8).collect();
        let fnv = portier_sim::body_fnv(&body);
        let path = format!("/upload/{i}");
        let r = send(&mut sender, "POST", "acme.test", &path, &[], body.into())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}");
        let echo: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(echo["body_fnv"], fnv, "{path}: the body arrived changed");
    }
    let got: Vec<(String, usize)> =
        s.w.requests()
            .into_iter()
            .filter(|r| r.target.starts_with("/upload/"))
            .map(|r| (r.target, r.body_len))
            .collect();
    let want: Vec<(String, usize)> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("/upload/{i}"), *n))
        .collect();
    assert_eq!(got, want);
}
