//! The Odoo edge, end to end (contract, "Maintenance", "Login protection", and the
//! cookies of "Assets, compression, cookies"; the asset cache and compression are in
//! `edge_assets.rs`): real portier in front of a simulated Odoo 17 server.
//!
//! Clients are told apart by `X-Forwarded-For`: the tests' connections come from
//! 127.0.0.1, which is a trusted proxy here, so the right-most untrusted address is
//! the client; `admin_cidrs` is 10.9.0.0/16.

use portier_tests::*;

#[path = "support/edge.rs"]
mod support;

use support::*;

/// A tenant in maintenance: everyone outside `admin_cidrs` gets 503 + `Retry-After: 60`
/// + the maintenance page and the worker sees nothing; `/web/health` and admins still
/// reach it; `/status` lists it; a reload turns it on and off; other tenants go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_answers_everyone_but_admins_and_health() {
    let e = edge(&format!(
        "{}{}",
        tenant("acme", ""),
        tenant("beta", "maintenance = true")
    ))
    .await;
    let before = e.http.hits();
    for path in [
        "/web",
        "/web/login",
        "/jsonrpc",
        "/web/assets/app.js",
        "/websocket",
    ] {
        let r = e.get_from("203.0.113.5", "beta.test", path).await;
        assert_eq!(r.status, 503, "{path}: {}", r.text());
        assert_eq!(r.header("retry-after"), Some("60"), "{path}");
        assert!(
            r.text().contains("Down for maintenance"),
            "{path}: {}",
            r.text()
        );
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
    }
    assert_eq!(
        e.http.hits(),
        before,
        "no request of a tenant in maintenance reached the worker"
    );
    let log =
        e.p.wait_access_log(|l| l["tenant"] == "beta" && l["status"] == 503)
            .await;
    assert_eq!(log["refused"], "maintenance");

    // Odoo's health route and an admin still reach the worker.
    let r = e.get_from("203.0.113.5", "beta.test", "/web/health").await;
    assert_eq!((r.status, r.worker()), (200, Some("h0")), "{}", r.text());
    let r = e.get_from(ADMIN, "beta.test", "/web/login").await;
    assert_eq!((r.status, r.worker()), (200, Some("h0")), "{}", r.text());
    // Another tenant is untouched.
    let r = e.get_from("203.0.113.5", "acme.test", "/web/login").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        status(e.p.admin).await["maintenance"],
        serde_json::json!(["beta"])
    );

    // A reload ends beta's maintenance and starts acme's.
    e.reload_with(&format!(
        "{}{}",
        tenant("acme", "maintenance = true"),
        tenant("beta", "")
    ))
    .await;
    let r = e.get_from("203.0.113.5", "beta.test", "/web/login").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = e.get_from("203.0.113.5", "acme.test", "/web/login").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        status(e.p.admin).await["maintenance"],
        serde_json::json!(["acme"])
    );
}

/// Login attempts are limited per client address and tenant: beyond the burst 429 with
/// `Retry-After` and the contract's JSON, not seen by the worker; another address,
/// another tenant, an admin, a GET of the login page and XML-RPC calls other than
/// `authenticate`/`login` are not limited; the budget survives a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_attempts_are_limited_per_address_and_tenant() {
    // The default limit: 10/min, burst 5.
    let tenants = format!("{}{}", tenant("acme", ""), tenant("beta", ""));
    let e = edge(&tenants).await;
    let form = "login=alice&password=wrong";
    for i in 0..5 {
        let r = e
            .post_from("203.0.113.7", "acme.test", "/web/login", form)
            .await;
        assert_ne!(r.status, 429, "attempt {i} is within the burst");
    }
    let seen = e.seen("/web/login");
    let r = e
        .post_from("203.0.113.7", "acme.test", "/web/login", form)
        .await;
    assert_eq!(r.status, 429, "{}", r.text());
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry), "{retry}");
    let body = r.json();
    assert_eq!(body["error"], "login_limited");
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["retry_after"], retry);
    assert_eq!(
        e.seen("/web/login"),
        seen,
        "the refused attempt never reached the worker"
    );
    // The other login paths share the budget.
    let r = e
        .post_from(
            "203.0.113.7",
            "acme.test",
            "/web/session/authenticate",
            "{}",
        )
        .await;
    assert_eq!(r.status, 429);
    let log =
        e.p.wait_access_log(|l| l["status"] == 429 && l["path"] == "/web/login")
            .await;
    assert_eq!(log["refused"], "login_limited");

    // Not limited: another address, another tenant, an admin, the login page itself.
    let r = e
        .post_from("203.0.113.8", "acme.test", "/web/login", form)
        .await;
    assert_ne!(r.status, 429);
    let r = e
        .post_from("203.0.113.7", "beta.test", "/web/login", form)
        .await;
    assert_ne!(r.status, 429);
    for _ in 0..6 {
        let r = e.post_from(ADMIN, "acme.test", "/web/login", form).await;
        assert_ne!(r.status, 429, "admins are not limited");
        let r = e.get_from("203.0.113.7", "acme.test", "/web/login").await;
        assert_eq!(r.status, 200, "showing the login page is not an attempt");
    }

    // XML-RPC: `version` is not a login, `authenticate` is.
    let call = |m: &str| {
        format!("<?xml version='1.0'?>\n<methodCall>\n<methodName>{m}</methodName>\n<params>\n</params>\n</methodCall>\n")
    };
    for _ in 0..5 {
        let r = e
            .post_from(
                "203.0.113.9",
                "acme.test",
                "/xmlrpc/2/common",
                &call("version"),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    for _ in 0..5 {
        let r = e
            .post_from(
                "203.0.113.9",
                "acme.test",
                "/xmlrpc/2/common",
                &call("authenticate"),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let r = e
        .post_from("203.0.113.9", "acme.test", "/xmlrpc/common", &call("login"))
        .await;
    assert_eq!(r.status, 429, "{}", r.text());

    // A reload keeps the spent budgets.
    e.reload_with(&format!("{tenants}# reloaded\n")).await;
    let r = e
        .post_from("203.0.113.7", "acme.test", "/web/login", form)
        .await;
    assert_eq!(r.status, 429, "the budget survives a reload");

    let m = e.metrics().await;
    let line = m
        .lines()
        .find(|l| l.starts_with("portier_login_limited_total{tenant=\"acme\"}"))
        .unwrap_or_else(|| panic!("{m}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(n, 4.0, "{line}");
}

/// One HTTP/1.1 GET over TLS.
async fn tls_get(e: &Edge, host: &str, path: &str) -> Resp {
    let stream = tls_connect(
        e.https,
        host,
        e.pki.client(&[b"http/1.1"], &[&rustls::version::TLS13]),
    )
    .await
    .unwrap();
    h1_over(stream, host, path).await.unwrap()
}

/// Over TLS Odoo's `session_id` cookie gets `Secure` and `SameSite=Lax`; over plain
/// HTTP, and for a tenant with `secure_cookies = false`, it stays as Odoo sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookies_are_secured_over_tls() {
    let e = edge(&format!(
        "{}{}",
        tenant("acme", ""),
        tenant("beta", "secure_cookies = false")
    ))
    .await;
    let odoo_cookie = |r: &Resp| {
        r.header("set-cookie")
            .unwrap_or_else(|| panic!("no cookie: {r:?}"))
            .to_string()
    };
    let r = tls_get(&e, "acme.test", "/web/login").await;
    let c = odoo_cookie(&r);
    assert!(c.starts_with("session_id="), "{c}");
    assert!(c.contains("; HttpOnly"), "Odoo's attributes stay: {c}");
    assert!(c.ends_with("; Secure; SameSite=Lax"), "{c}");

    let r = get(e.p.http, "acme.test", "/web/login").await.unwrap();
    let c = odoo_cookie(&r);
    assert!(
        !c.contains("Secure") && !c.contains("SameSite"),
        "plain HTTP: {c}"
    );

    let r = tls_get(&e, "beta.test", "/web/login").await;
    let c = odoo_cookie(&r);
    assert!(
        !c.contains("Secure") && !c.contains("SameSite"),
        "secure_cookies = false: {c}"
    );
}

/// The reload that puts a tenant into maintenance closes its open WebSockets with
/// 1001 ("going away"); other tenants' WebSockets go on, and a new one of the tenant
/// in maintenance gets the 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_closes_the_tenants_websockets() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let e = edge(&format!("{}{}", tenant("acme", ""), tenant("beta", ""))).await;
    let client = [("x-forwarded-for", "203.0.113.5")];
    let (mut acme, resp) = websocket(e.p.http, "acme.test", "/websocket", &client)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let (mut beta, _) = websocket(e.p.http, "beta.test", "/websocket", &client)
        .await
        .unwrap();
    for ws in [&mut acme, &mut beta] {
        assert!(ws_roundtrip(ws, "whoami").await.unwrap().starts_with('g'));
    }
    e.reload_with(&format!(
        "{}{}",
        tenant("acme", "maintenance = true"),
        tenant("beta", "")
    ))
    .await;
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match acme.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the tenant's WebSocket is closed when the reload applies");
    assert_eq!(closed, Some(1001));
    // The other tenant's bus goes on.
    assert_eq!(
        ws_roundtrip(&mut beta, "still here").await.unwrap(),
        "still here"
    );
    // A new WebSocket of the tenant in maintenance is refused.
    let err = websocket(e.p.http, "acme.test", "/websocket", &client).await;
    assert!(err.is_err(), "a new upgrade gets the 503");
    let log =
        e.p.wait_access_log(|l| l["tenant"] == "acme" && l["status"] == 503)
            .await;
    assert_eq!(log["refused"], "maintenance");
}
