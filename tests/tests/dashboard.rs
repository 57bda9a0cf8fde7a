//! The dashboard (`GET /` on the admin listener) in a real browser (Debian's Chromium,
//! headless, over the DevTools protocol): it loads with nothing from anywhere but the
//! admin listener, shows the pools' backends and the tenants with their figures, follows
//! a backend going down without a reload (within 3 s), its search narrows the tenant
//! list, every control sends only GETs; a screenshot goes to `target/dashboard.png`.

use std::time::Duration;

use portier_tests::browser::Browser;
use portier_tests::*;

// Shared with cluster.rs, which uses all of it.
#[allow(dead_code)]
#[path = "support/redis.rs"]
mod redis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_browser() {
    let mut extra = String::from(
        "[pools.main.health]\npath = \"/web/health\"\nevery = \"300ms\"\nfall = 1\nrise = 1\n",
    );
    let batch = sim("batch").await;
    extra.push_str(&format!(
        "[pools.batch]\nhttp = [\"{}\"]\nworkers = 2\n",
        batch.addr()
    ));
    for i in 0..120 {
        extra.push_str(&format!(
            "[tenants.shop{i:03}]\nhosts = [\"shop{i:03}.test\"]\npool = \"main\"\n"
        ));
    }
    let s = routing_setup(&extra).await;
    for _ in 0..3 {
        assert_eq!(
            get(s.p.http, "acme.test", "/web/x").await.unwrap().status,
            200
        );
    }
    // The page and its files carry a policy limiting them to this listener.
    let page = get(s.p.admin, "admin", "/").await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let csp = page.header("content-security-policy").unwrap().to_string();
    assert!(
        csp.starts_with("default-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );

    let admin = format!("http://127.0.0.1:{}/", s.p.admin.port());
    let mut b = Browser::start().await;
    b.navigate(&admin).await;
    let shown = b
        .wait_for(
            "document.querySelectorAll('#pools td.backend').length === 5",
            Duration::from_secs(10),
        )
        .await;
    assert!(shown.is_some(), "the backends never showed");
    let backends = b
        .eval(
            "[...document.querySelectorAll('#pools td.backend')].map(e => e.textContent).join(' ')",
        )
        .await;
    for w in s.http.iter().chain(s.gevent.iter()) {
        assert!(
            backends.as_str().unwrap().contains(&w.addr().to_string()),
            "{backends}"
        );
    }
    let acme = b
        .eval("[...document.querySelectorAll('#tenants tbody tr')].find(r => r.querySelector('td.tenant').textContent === 'acme')?.textContent")
        .await;
    assert!(acme.as_str().unwrap().contains("acme.test"), "{acme}");
    assert_eq!(
        b.eval("document.querySelectorAll('#tenants tbody tr').length")
            .await,
        100,
        "paged: 100 a page"
    );
    assert_eq!(
        b.eval("document.getElementById('last-error').textContent")
            .await,
        "none"
    );
    // The configuration's version (a prefix of its SHA-256) and when it was loaded.
    let version = b
        .eval("document.getElementById('version').textContent")
        .await;
    let hex12 = |v: &str| v.len() == 12 && v.bytes().all(|c| c.is_ascii_hexdigit());
    assert!(version.as_str().is_some_and(hex12), "{version}");
    let loaded = b
        .eval("document.getElementById('loaded').textContent")
        .await;
    assert!(
        loaded
            .as_str()
            .is_some_and(|v| v.starts_with("20") && v.ends_with('Z')),
        "{loaded}"
    );
    // A pool with worker slots shows them busy of N, and every pool its queue per class.
    let pools = b.eval("document.getElementById('pools').textContent").await;
    let pools = pools.as_str().unwrap_or("");
    assert!(pools.contains("0 of 2"), "{pools}");
    // Each backend's row: address, role, state, breaker, in flight.
    let first = format!(
        "[...document.querySelectorAll('#pools tr')].find(r => r.textContent.includes('{}')).textContent",
        s.gevent[0].addr()
    );
    let first = b.eval(&first).await;
    let first = first.as_str().unwrap_or("");
    for part in ["longpolling", "up", "closed", "0"] {
        assert!(first.contains(part), "{part} not in {first}");
    }
    assert!(
        pools.contains("queue: 0 interactive, 0 static, 0 integration"),
        "{pools}"
    );

    // A backend going down shows without a reload, within 3 s.
    s.http[0].set_mode(Mode::Status(503));
    let down = format!(
        "[...document.querySelectorAll('#pools tr')].some(r => r.textContent.includes('{}') && r.querySelector('td.down'))",
        s.http[0].addr()
    );
    let took = b.wait_for(&down, Duration::from_secs(6)).await;
    assert!(
        took.is_some_and(|t| t <= Duration::from_secs(3)),
        "the backend showed down after {took:?}"
    );
    assert_eq!(
        b.eval("performance.getEntriesByType('navigation').length")
            .await,
        1,
        "the page was reloaded"
    );

    // The search narrows the list (by name or host).
    b.eval("(() => { const q = document.getElementById('q'); q.value = 'shop11'; q.dispatchEvent(new Event('input')); return true; })()").await;
    let narrowed = b
        .wait_for(
            "document.querySelectorAll('#tenants tbody tr').length === 10",
            Duration::from_secs(5),
        )
        .await;
    assert!(
        narrowed.is_some(),
        "search did not narrow to shop110-shop119"
    );
    b.eval("(() => { const q = document.getElementById('q'); q.value = 'erp.acme'; q.dispatchEvent(new Event('input')); return true; })()").await;
    assert!(b
        .wait_for(
            "document.querySelectorAll('#tenants tbody tr').length === 1",
            Duration::from_secs(5)
        )
        .await
        .is_some());

    // Every control, clicked: only GETs, only to the admin listener.
    b.eval("(() => { const q = document.getElementById('q'); q.value = ''; q.dispatchEvent(new Event('input')); return true; })()").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.eval("(() => { for (const c of document.querySelectorAll('button, input, a')) c.click(); return true; })()").await;
    // Then the pages, one click at a time, each waited for.
    let page_is =
        |start: &str| format!("document.getElementById('page').textContent.startsWith('{start}')");
    for (button, start) in [
        ("prev", "1-"),
        ("prev", "1-"),
        ("next", "101-"),
        ("prev", "1-"),
    ] {
        // A click before the page settled may be ahead of it: go back to the first page.
        b.eval(&format!(
            "(() => {{ document.getElementById('{button}').click(); return true; }})()"
        ))
        .await;
        let settled = b.wait_for(&page_is(start), Duration::from_secs(5)).await;
        if settled.is_none() {
            let now = b.eval("document.getElementById('page').textContent + ' | q=' + document.getElementById('q').value + ' | rows=' + document.querySelectorAll('#tenants tbody tr').length + ' | prev ' + document.getElementById('prev').disabled + ' next ' + document.getElementById('next').disabled").await;
            panic!("{button}: not on the page starting at {start}: {now}");
        }
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let _ = b.eval("1").await;
    assert!(b.requests.len() >= 6, "{:?}", b.requests);
    for r in &b.requests {
        assert_eq!(r.method, "GET", "{r:?}");
        assert!(
            r.url.starts_with(&admin),
            "a request left the admin listener: {r:?}"
        );
    }

    let shot = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard.png");
    b.screenshot(&shot).await;
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "an empty screenshot"
    );
}

/// Certificates with their days left, and cluster mode's Redis, on the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_certificates_and_the_cluster() {
    let redis = redis::Redis::start().await;
    let pki = TestPki::new();
    let certs = tempfile::tempdir().unwrap();
    pki.write_pair(certs.path(), "acme", &["acme.test"], 30);
    pki.write_pair(certs.path(), "soon", &["soon.test"], 5);
    let w = sim("w").await;
    let ports = Ports::new();
    let cfg = format!(
        "{}https = \"127.0.0.1:{}\"\n[tls]\ncerts = \"{}\"\n[cluster]\nredis = \"{}\"\n[pools.p]\nhttp = [\"{}\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        ports.https,
        certs.path().display(),
        redis.url(),
        w.addr(),
    );
    let p = Portier::start(&ports, &cfg).await;
    let mut b = Browser::start().await;
    b.navigate(&format!("http://127.0.0.1:{}/", p.admin.port()))
        .await;
    let rows =
        "[...document.querySelectorAll('#certs tbody tr')].map(r => r.textContent).join(' | ')";
    let shown = b
        .wait_for(
            &format!("{rows}.includes('acme') && {rows}.includes('soon')"),
            Duration::from_secs(10),
        )
        .await;
    let text = b.eval(rows).await;
    assert!(shown.is_some(), "certificates not shown: {text}");
    let text = text.as_str().unwrap_or("");
    assert!(
        text.contains("acme") && text.contains("29"),
        "acme's days left: {text}"
    );
    assert!(
        text.contains("soon") && text.contains("4"),
        "soon's days left: {text}"
    );
    // A certificate with less than 14 days left is marked.
    assert_eq!(
        b.eval("[...document.querySelectorAll('#certs tbody tr')].filter(r => r.querySelector('td.failed')).length").await,
        1
    );
    let cluster = b
        .wait_for(
            "!document.getElementById('cluster-section').hidden && document.getElementById('cluster').textContent.startsWith('Redis up')",
            Duration::from_secs(10),
        )
        .await;
    let text = b
        .eval("document.getElementById('cluster').textContent")
        .await;
    assert!(cluster.is_some(), "cluster not shown: {text}");
}
