//! The asset cache and compression, end to end (contract, "Assets, compression,
//! cookies"): real portier in front of a simulated Odoo 17 server serving bundles and
//! static files as Odoo does.

use bytes::Bytes;
use portier_tests::*;

#[path = "support/edge.rs"]
mod support;

use support::*;

/// Decodes a body by its `Content-Encoding`.
fn decode(r: &Resp) -> Vec<u8> {
    use std::io::Read;
    let body = &r.body[..];
    match r.header("content-encoding") {
        None => body.to_vec(),
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
            out
        }
        Some("br") => {
            let mut out = Vec::new();
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
            out
        }
        Some("zstd") => zstd::decode_all(body).unwrap(),
        Some(other) => panic!("unexpected encoding {other}"),
    }
}

async fn get_ae(e: &Edge, host: &str, path: &str, accept: &str) -> Resp {
    get_with(e.p.http, host, path, &[("accept-encoding", accept)])
        .await
        .unwrap()
}

fn varies_by_encoding(r: &Resp) -> bool {
    r.headers
        .get_all("vary")
        .iter()
        .any(|v| v.to_str().unwrap_or("").contains("Accept-Encoding"))
}

/// Compression: the client's preferred encoding among zstd, br, gzip, with `Vary`; the
/// decoded body is what the worker sent; not for small bodies, images, `HEAD`, `206`,
/// or pages and RPC answers unless `compress = "all"`; never with `compress = "off"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_compressed_as_the_client_and_the_class_allow() {
    let e = edge(&format!(
        "{}{}{}",
        tenant("acme", "cache_assets = \"0\""),
        tenant("beta", "compress = \"all\"\ncache_assets = \"0\""),
        tenant("gamma", "compress = \"off\"")
    ))
    .await;
    let bundle = "/web/assets/abc123/web.assets_web.min.js?size=200000";
    let plain = get(e.p.http, "acme.test", bundle).await.unwrap();
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None, "no Accept-Encoding");
    assert!(varies_by_encoding(&plain), "{:?}", plain.headers);
    assert_eq!(plain.body.len(), 200_000);
    for (accept, want) in [
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip, deflate, br", "br"),
        ("gzip", "gzip"),
        ("br;q=0.5, gzip;q=1", "gzip"),
    ] {
        let r = get_ae(&e, "acme.test", bundle, accept).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some(want), "{accept}");
        assert!(varies_by_encoding(&r));
        assert!(
            r.body.len() < plain.body.len() / 2,
            "{accept}: {} bytes",
            r.body.len()
        );
        assert_eq!(
            decode(&r),
            plain.body,
            "{accept}: the decoded body is the worker's"
        );
    }
    // Not compressed: a body under 1 KiB, an image, HEAD, a range, a body the worker
    // already encoded.
    for size in [500, 1023] {
        let path = format!("/web/static/src/small.js?size={size}");
        let small = get_ae(&e, "acme.test", &path, "gzip").await;
        assert_eq!(
            (small.status, small.header("content-encoding")),
            (200, None)
        );
        assert_eq!(small.body.len(), size);
    }
    let r = get_ae(&e, "acme.test", "/web/static/src/x.js?size=1024", "gzip").await;
    assert_eq!(
        r.header("content-encoding"),
        Some("gzip"),
        "1 KiB is enough"
    );
    let path = "/web/static/src/pre.js?size=5000&encoding=br";
    let pre = get_ae(&e, "acme.test", path, "gzip, br").await;
    assert_eq!(pre.headers.get_all("content-encoding").iter().count(), 1);
    assert_eq!(pre.header("content-encoding"), Some("br"));
    assert_eq!(pre.body.len(), 5000, "passed through as the worker sent it");
    let png = get_ae(
        &e,
        "acme.test",
        "/web/static/img/logo.png?size=5000",
        "gzip",
    )
    .await;
    assert_eq!(png.header("content-encoding"), None);
    let head = request(
        e.p.http,
        "HEAD",
        "acme.test",
        bundle,
        &[("accept-encoding", "gzip")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!((head.status, head.header("content-encoding")), (200, None));
    let part = get_with(
        e.p.http,
        "acme.test",
        bundle,
        &[("accept-encoding", "gzip"), ("range", "bytes=0-4999")],
    )
    .await
    .unwrap();
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-encoding"), None);
    assert_eq!(part.body, plain.body.slice(0..5000));

    // Pages and RPC answers: only with compress = "all".
    let page = "/web/dataset/call_kw?size=5000";
    let r = get_ae(&e, "acme.test", page, "gzip").await;
    assert_eq!(
        (r.status, r.header("content-encoding")),
        (200, None),
        "static only by default"
    );
    let r = get_ae(&e, "beta.test", page, "gzip").await;
    assert_eq!(
        r.header("content-encoding"),
        Some("gzip"),
        "compress = \"all\""
    );
    let page: serde_json::Value = serde_json::from_slice(&decode(&r)).unwrap();
    assert_eq!(page["target"], "/web/dataset/call_kw?size=5000");
    let r = get_ae(&e, "gamma.test", bundle, "gzip, br, zstd").await;
    assert_eq!(r.header("content-encoding"), None, "compress = \"off\"");
    assert_eq!(r.body.len(), 200_000);
}

/// The asset cache: a bundle is fetched from the worker once, then served with `Age`
/// and `X-Cache: hit`; per tenant and per encoding; answers that are private, set a
/// cookie, vary by more than the encoding or are not `200` are not kept; concurrent
/// misses are collapsed into one worker request; entries survive a reload but not
/// their tenant's removal; `cache_assets` bounds them (least recently used go).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asset_bundles_are_served_from_the_cache() {
    let tenants = format!("{}{}", tenant("acme", ""), tenant("beta", ""));
    let e = edge_with("cache_assets = \"2MiB\"\n", &tenants).await;
    let bundle = "/web/assets/abc123/web.assets_web.min.js?size=100000";
    let first = get(e.p.http, "acme.test", bundle).await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("miss"));
    assert_eq!(e.seen("/web/assets/abc123/web.assets_web.min.js"), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = get(e.p.http, "acme.test", bundle).await.unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-cache"), Some("hit"));
    let age: u64 = second.header("age").unwrap().parse().unwrap();
    assert!(age >= 1, "{age}");
    assert_eq!(second.body, first.body);
    assert_eq!(
        second.header("cache-control"),
        first.header("cache-control")
    );
    assert!(second.header("x-request-id").is_some());
    assert_ne!(second.header("x-request-id"), first.header("x-request-id"));
    assert_eq!(
        e.seen("/web/assets/abc123/web.assets_web.min.js"),
        1,
        "the worker did not see the hit"
    );
    let log = e.p.wait_access_log(|l| l["cache"] == "hit").await;
    assert_eq!(log["backend"], serde_json::Value::Null);
    assert_eq!(log["status"], 200);
    e.p.wait_access_log(|l| l["cache"] == "miss").await;

    // Another tenant has its own entries; another encoding is another entry, kept
    // compressed.
    let r = get(e.p.http, "beta.test", bundle).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("miss"));
    let gz = get_ae(&e, "acme.test", bundle, "gzip").await;
    assert_eq!(
        (gz.header("x-cache"), gz.header("content-encoding")),
        (Some("miss"), Some("gzip"))
    );
    let gz2 = get_ae(&e, "acme.test", bundle, "gzip").await;
    assert_eq!(
        (gz2.header("x-cache"), gz2.header("content-encoding")),
        (Some("hit"), Some("gzip"))
    );
    assert_eq!(gz2.body, gz.body);
    assert_eq!(decode(&gz2), first.body);
    assert_eq!(e.seen("/web/assets/abc123/web.assets_web.min.js"), 3);

    // Not kept: each of these reaches the worker twice.
    for q in [
        "cc=private",
        "cc=no-store",
        "cc=public",
        "cc=no-cache%2C%20max-age%3D600",
        "cookie=1",
        "vary=Cookie",
    ] {
        let path = format!("/web/static/src/x.js?{q}");
        for _ in 0..2 {
            let r = get(e.p.http, "acme.test", &path).await.unwrap();
            assert_eq!((r.status, r.header("x-cache")), (200, Some("miss")), "{q}");
        }
    }
    assert_eq!(e.seen("/web/static/src/x.js"), 12);
    // A module's static file (`/*/static/*`) is kept like the web client's.
    for want in ["miss", "hit"] {
        let r = get(e.p.http, "acme.test", "/mail/static/src/core.js")
            .await
            .unwrap();
        assert_eq!(r.header("x-cache"), Some(want));
    }
    assert_eq!(e.seen("/mail/static/src/core.js"), 1);
    // Not a GET of the static class: no cache at all.
    let r = get(e.p.http, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.header("x-cache"), None);

    // Ten concurrent misses of a slow bundle: one worker request.
    let slow = "/web/assets/slow/web.assets_web.min.js?sleep_ms=400";
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let addr = e.p.http;
        tasks.push(tokio::spawn(async move {
            get(addr, "acme.test", slow).await.unwrap()
        }));
    }
    let mut hits = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        hits += usize::from(r.header("x-cache") == Some("hit"));
    }
    assert_eq!(
        e.seen("/web/assets/slow/web.assets_web.min.js"),
        1,
        "collapsed"
    );
    assert_eq!(hits, 49);

    // The worker's `Age` counts: max-age 2 with Age 1 is stale a second later.
    let aged = "/web/static/src/aged.js?cc=max-age%3D2&age=1";
    let r = get(e.p.http, "acme.test", aged).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("miss"));
    let r = get(e.p.http, "acme.test", aged).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("hit"));
    assert!(r.header("age").unwrap().parse::<u64>().unwrap() >= 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = get(e.p.http, "acme.test", aged).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("miss"), "expired by its age");

    // A reload keeps the entries; removing a tenant drops its entries.
    e.reload_with(&format!("{tenants}# reloaded\n")).await;
    let r = get(e.p.http, "acme.test", bundle).await.unwrap();
    assert_eq!(r.header("x-cache"), Some("hit"), "survives a reload");
    e.reload_with(&tenant("acme", "")).await;
    e.reload_with(&tenants).await;
    let r = get(e.p.http, "beta.test", bundle).await.unwrap();
    assert_eq!(
        r.header("x-cache"),
        Some("miss"),
        "beta was removed and came back"
    );

    // 2 MiB in all: 30 bundles of 100 KB push the oldest out.
    for i in 0..30 {
        let r = get(
            e.p.http,
            "acme.test",
            &format!("/web/assets/n{i}/b.js?size=100000"),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    let r = get(e.p.http, "acme.test", "/web/assets/n0/b.js?size=100000")
        .await
        .unwrap();
    assert_eq!(r.header("x-cache"), Some("miss"), "evicted");
    let r = get(e.p.http, "acme.test", "/web/assets/n29/b.js?size=100000")
        .await
        .unwrap();
    assert_eq!(r.header("x-cache"), Some("hit"), "recent");

    let m = e.metrics().await;
    assert!(
        metric(&m, "portier_cache_requests_total{result=\"hit\"}") >= 12.0,
        "{m}"
    );
    assert!(
        metric(&m, "portier_cache_requests_total{result=\"miss\"}") >= 5.0,
        "{m}"
    );
}

/// One cached asset takes at most an eighth of `cache_assets` (contract r3, "Assets"): a
/// larger answer is served whole every time and never kept (the worker sees every
/// request), one just under the eighth is kept; and eviction stays least recently used:
/// an old entry read again survives entries added after it, the ones not read go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_asset_takes_at_most_an_eighth_of_the_cache_and_the_least_recently_used_go() {
    // 1 MiB in all: an eighth is 131 072 bytes.
    let e = edge_with("cache_assets = \"1MiB\"\n", &tenant("acme", "")).await;
    let big = "/web/assets/big/web.assets_web.min.js";
    for i in 0..3 {
        let r = get(e.p.http, "acme.test", &format!("{big}?size=140000"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 140_000, "request {i}: not whole");
        assert_eq!(r.header("x-cache"), Some("miss"), "request {i}: kept");
    }
    assert_eq!(e.seen(big), 3, "an answer over an eighth was kept");
    let under = "/web/assets/under/web.assets_web.min.js";
    for _ in 0..2 {
        let r = get(e.p.http, "acme.test", &format!("{under}?size=120000"))
            .await
            .unwrap();
        assert_eq!(r.body.len(), 120_000);
    }
    assert_eq!(e.seen(under), 1, "an answer under an eighth was not kept");

    // Least recently used: ten entries of 100 KB (with `under`, more than 1 MiB: it and
    // the oldest go first), then a0 read again, then two more entries.
    let path = |i: usize| format!("/web/assets/lru{i}/b.js");
    let fetch = |i: usize| {
        let url = format!("{}?size=100000", path(i));
        let addr = e.p.http;
        async move {
            let r = get(addr, "acme.test", &url).await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.body.len(), 100_000);
            r.header("x-cache").map(str::to_string)
        }
    };
    for i in 0..10 {
        assert_eq!(fetch(i).await.as_deref(), Some("miss"), "lru{i}");
    }
    assert_eq!(fetch(0).await.as_deref(), Some("hit"), "lru0 read again");
    for i in 10..12 {
        assert_eq!(fetch(i).await.as_deref(), Some("miss"), "lru{i}");
    }
    // lru0 was read after lru1 and lru2 were added: they went, it stayed.
    assert_eq!(fetch(0).await.as_deref(), Some("hit"), "lru0 was evicted");
    assert_eq!(fetch(11).await.as_deref(), Some("hit"), "lru11 was evicted");
    assert_eq!(fetch(4).await.as_deref(), Some("hit"), "lru4 was evicted");
    assert_eq!(fetch(1).await.as_deref(), Some("miss"), "lru1 was kept");
    assert_eq!(e.seen(&path(0)), 1);
    assert_eq!(e.seen(&path(1)), 2);
}

/// Over HTTP/2 (TLS, ALPN h2): a bundle compressed and then served from the cache, with
/// no HTTP/1 framing headers leaking into the HTTP/2 response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_and_the_cache_work_over_http2() {
    let e = edge(&tenant("acme", "")).await;
    let bundle = "/web/assets/h2/web.assets_web.min.js?size=100000";
    let mut bodies = Vec::new();
    for want in ["miss", "hit"] {
        let stream = tls_connect(
            e.https,
            "acme.test",
            e.pki.client(&[b"h2"], &[&rustls::version::TLS13]),
        )
        .await
        .unwrap();
        let r = h2_over_with(stream, "acme.test", bundle, &[("accept-encoding", "br")])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some(want));
        assert_eq!(r.header("content-encoding"), Some("br"));
        assert!(r.header("transfer-encoding").is_none());
        bodies.push(decode(&r));
    }
    assert_eq!(bodies[0].len(), 100_000);
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(e.seen("/web/assets/h2/web.assets_web.min.js"), 1);
}
