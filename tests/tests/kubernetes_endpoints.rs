//! `[kubernetes]` end to end, endpoints: a terminating endpoint keeps its open
//! WebSockets, an endpoint going moves only its own sessions, and only the watched
//! namespaces are read. portier's kube-rs client against the API server stand-in.

use std::time::Duration;

use portier_tests::k8s::*;
use portier_tests::*;
use serde_json::json;

/// "One that is `terminating` gets no new requests, and its open WebSockets and
/// longpolls carry on until they end": the bus WebSocket on an endpoint that starts
/// terminating stays open and keeps working; new ones go to the ready endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_on_a_terminating_endpoint_stays_open() {
    let c = start("").await;
    let (a, b) = (sim("a").await, sim("b").await);
    let (ga, gb) = (sim("ga").await, sim("gb").await);
    c.base(&a);
    c.api.apply(slice(
        "shop",
        "odoo-lp-a",
        "odoo",
        "longpolling",
        ga.addr(),
        Ep::Ready,
    ));
    c.api.apply(acme_route());
    assert!(c.served_by("acme.test", "/web/login", "a").await);
    let (mut ws, resp) = websocket(c.p.http, "acme.test", "/websocket", &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert!(ws_roundtrip(&mut ws, "before").await.is_ok());
    assert_eq!(ga.hits(), 1);
    // ga terminates, gb is ready: the open WebSocket carries on.
    c.api.apply(slice(
        "shop",
        "odoo-lp-a",
        "odoo",
        "longpolling",
        ga.addr(),
        Ep::Terminating,
    ));
    c.api.apply(slice(
        "shop",
        "odoo-lp-b",
        "odoo",
        "longpolling",
        gb.addr(),
        Ep::Ready,
    ));
    c.api
        .apply(slice("shop", "odoo-b", "odoo", "http", b.addr(), Ep::Ready));
    assert!(
        eventually_async(WAIT, || async {
            let st = status(c.p.admin).await;
            st["pools"]["shop/odoo:8069"]["backends"]
                .as_array()
                .is_some_and(|l| {
                    l.iter().any(|x| x["address"] == gb.addr().to_string())
                        && !l.iter().any(|x| x["address"] == ga.addr().to_string())
                })
        })
        .await
    );
    for i in 0..3 {
        assert_eq!(
            ws_roundtrip(&mut ws, &format!("after {i}")).await.unwrap(),
            format!("after {i}"),
            "the open WebSocket carries on"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut ws2, _) = websocket(c.p.http, "acme.test", "/websocket", &[])
        .await
        .unwrap();
    assert!(ws_roundtrip(&mut ws2, "new").await.is_ok());
    assert_eq!(gb.hits(), 1, "a new WebSocket goes to the ready endpoint");
    assert_eq!(ga.hits(), 1);
}

/// "Changes apply … without a reload, moving only the tenants and sessions that hashed
/// to the endpoints that changed": sessions on endpoints that stay keep them when one
/// goes; only that one's sessions move. With `namespaces`, only those are watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_going_moves_only_its_sessions() {
    let c = start("namespaces = [\"infra\", \"shop\"]\n").await;
    let (a, b, d) = (sim("a").await, sim("b").await, sim("d").await);
    c.base(&a);
    c.api
        .apply(slice("shop", "odoo-b", "odoo", "http", b.addr(), Ep::Ready));
    c.api
        .apply(slice("shop", "odoo-d", "odoo", "http", d.addr(), Ep::Ready));
    c.api.apply(acme_route());
    // Not a watched namespace: never served.
    c.api.apply(service("elsewhere", "odoo", json!({})));
    c.api.apply(route(
        "elsewhere",
        "x",
        "infra",
        &["x.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
    assert!(
        eventually_async(WAIT, || async {
            status(c.p.admin).await["pools"]["shop/odoo:8069"]["backends"]
                .as_array()
                .is_some_and(|l| l.len() == 3)
        })
        .await
    );
    let placement = || async {
        let mut m = std::collections::BTreeMap::new();
        for s in 0..40 {
            let cookie = format!("session_id=s{s}0123456789abcdef");
            let r = get_with(
                c.p.http,
                "acme.test",
                "/web/dataset/call_kw",
                &[("cookie", &cookie)],
            )
            .await
            .unwrap();
            m.insert(s, r.worker().unwrap_or("-").to_string());
        }
        m
    };
    let before = placement().await;
    let on = |w: &str| before.values().filter(|x| *x == w).count();
    assert!(on("a") > 0 && on("b") > 0 && on("d") > 0, "{before:?}");
    c.api.delete("EndpointSlice", "shop", "odoo-d");
    assert!(
        eventually_async(WAIT, || async {
            status(c.p.admin).await["pools"]["shop/odoo:8069"]["backends"]
                .as_array()
                .is_some_and(|l| l.len() == 2)
        })
        .await
    );
    let after = placement().await;
    for (s, w) in &before {
        if w != "d" {
            assert_eq!(
                &after[s], w,
                "session {s} moved from {w} though its endpoint stayed"
            );
        } else {
            assert_ne!(after[s], "d");
        }
    }
    assert_eq!(c.status_of("x.test").await, 404);
    assert!(
        c.api.requests().get("watch").copied().unwrap_or(0) >= 17,
        "one watch per kind and namespace"
    );
}
