//! `[kubernetes]` end to end, around the API server: status and the lease, the server
//! away and back, requests at rest, `kubectl` through the stand-in, `check --objects`.

use std::time::Duration;

use portier_tests::apiserver::ApiServer;
use portier_tests::k8s::*;
use portier_tests::*;
use serde_json::json;

/// "When the API server is away, portier keeps serving the last objects it saw, and
/// says so", "Objects applied meanwhile are served once it is back", and a watch
/// resumed from a compacted version (410 Gone) is listed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_away_and_back() {
    let mut c = start("").await;
    let a = sim("a").await;
    c.base(&a);
    c.api.apply(route(
        "shop",
        "one",
        "infra",
        &["one.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
    assert!(c.served_by("one.test", "/web/login", "a").await);
    let metrics = |p: std::net::SocketAddr| async move {
        metric(
            &get(p, "admin", "/metrics").await.unwrap().text(),
            "portier_kubernetes_connected",
        )
    };
    let m = get(c.p.admin, "admin", "/metrics").await.unwrap().text();
    assert_eq!(
        metrics(c.p.admin).await,
        1.0,
        "{} {}",
        status(c.p.admin).await["kubernetes"],
        m.lines()
            .filter(|l| l.contains("kubernetes"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    c.api.stop();
    assert!(
        eventually_async(Duration::from_secs(20), || async {
            status(c.p.admin).await["kubernetes"]["connected"] == false
        })
        .await
    );
    let st = status(c.p.admin).await;
    assert!(st["kubernetes"]["last_error"].is_string(), "{st}");
    assert!(st["kubernetes"]["last_sync"].is_string(), "{st}");
    assert_eq!(metrics(c.p.admin).await, 0.0);
    assert_eq!(
        c.worker("one.test", "/web/login").await.as_deref(),
        Some("a"),
        "still served"
    );
    assert!(
        eventually(WAIT, || c
            .p
            .stderr()
            .iter()
            .any(|l| l.contains("lost the Kubernetes API server")))
        .await
    );

    // Applied while it is away: served once it is back.
    c.api.apply(route(
        "shop",
        "two",
        "infra",
        &["two.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
    c.api.resume().await;
    assert!(
        c.served_by("two.test", "/web/login", "a").await,
        "{}",
        c.p.stderr().join("\n")
    );
    assert!(
        eventually_async(WAIT, || async {
            status(c.p.admin).await["kubernetes"]["connected"] == true
        })
        .await
    );
    assert!(
        eventually(WAIT, || c
            .p
            .stderr()
            .iter()
            .any(|l| l.contains("the Kubernetes API server is back")))
        .await
    );

    // A change portier missed, then the history compacted: resuming from the last
    // version it saw gets 410 Gone; it lists again and serves the change.
    let lists = c.api.requests().get("list").copied().unwrap_or(0);
    c.api.stop();
    c.api.apply(route(
        "shop",
        "three",
        "infra",
        &["three.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
    c.api.compact().await;
    assert!(
        c.served_by("three.test", "/web/login", "a").await,
        "{}",
        c.p.stderr().join("\n")
    );
    assert!(
        c.api.requests().get("list").copied().unwrap_or(0) > lists,
        "listed again"
    );
}

/// "zero API requests per second at rest beyond the open watches and the lease
/// renewals": once synced, no list and no status write while nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_rest_only_watches_and_lease_renewals() {
    let c = start("").await;
    let a = sim("a").await;
    c.base(&a);
    c.api.apply(route(
        "shop",
        "one",
        "infra",
        &["one.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
    assert!(c.served_by("one.test", "/web/login", "a").await);
    assert!(
        eventually_async(WAIT, || async {
            route_condition(&c.api.get("HTTPRoute", "shop", "one").unwrap(), "Accepted").is_some()
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = c.api.requests();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = c.api.requests();
    let delta =
        |verb: &str| after.get(verb).copied().unwrap_or(0) - before.get(verb).copied().unwrap_or(0);
    assert_eq!(delta("list"), 0, "{before:?} -> {after:?}");
    assert_eq!(delta("watch"), 0, "{before:?} -> {after:?}");
    assert_eq!(delta("patch"), 0, "no status write when nothing changed");
    // An event that changes no status (an endpoint more): nothing written.
    let b = sim("b").await;
    c.api
        .apply(slice("shop", "odoo-b", "odoo", "http", b.addr(), Ep::Ready));
    assert!(c.served_by("one.test", "/web/login", "b").await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        c.api.requests().get("patch").copied().unwrap_or(0),
        before.get("patch").copied().unwrap_or(0),
        "a watch event that changes no status writes nothing"
    );
    // The lease: one read and one renewal every 5 s.
    assert!(
        delta("get") <= 2 && delta("update") <= 2 && delta("update") >= 1,
        "{before:?} -> {after:?}"
    );
}

/// "the replica holding the Lease … writes", "another replica takes over within 20 s of
/// a holder's death", "It writes only what changed": two replicas, one writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_status_writer_and_a_takeover() {
    let mut c = start_with("", "", &[("POD_NAME", "replica-1")]).await;
    let a = sim("a").await;
    c.base(&a);
    c.api.apply(acme_route());
    assert!(c.served_by("acme.test", "/web/login", "a").await);
    let holder = |api: &ApiServer| {
        api.get("Lease", "portier", "portier-status")
            .map(|l| l["spec"]["holderIdentity"].clone())
    };
    assert_eq!(holder(&c.api), Some(json!("replica-1")));
    let lease = c.api.get("Lease", "portier", "portier-status").unwrap();
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    let ports2 = Ports::new();
    let p2 = replica(&c.api, &ports2, "", "", &[("POD_NAME", "replica-2")]).await;
    assert!(
        eventually_async(WAIT, || async {
            get(p2.http, "acme.test", "/web/login")
                .await
                .is_ok_and(|r| r.worker() == Some("a"))
        })
        .await
    );
    let accepted = |api: &ApiServer| {
        route_condition(&api.get("HTTPRoute", "shop", "acme").unwrap(), "Accepted").is_some()
    };
    assert!(eventually_async(WAIT, || async { accepted(&c.api) }).await);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The status wiped: written again, once (one writer).
    let patches = |api: &ApiServer| api.requests().get("patch").copied().unwrap_or(0);
    let before = patches(&c.api);
    let mut r = c.api.get("HTTPRoute", "shop", "acme").unwrap();
    r["status"] = json!(null);
    c.api.apply(r);
    assert!(eventually_async(WAIT, || async { accepted(&c.api) }).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        patches(&c.api) - before,
        1,
        "only the lease holder writes, once"
    );
    assert_eq!(holder(&c.api), Some(json!("replica-1")));

    // The holder dies: the other replica takes the lease and writes.
    let died = std::time::Instant::now();
    drop(std::mem::replace(&mut c.p, p2));
    assert!(
        eventually_async(Duration::from_secs(25), || async {
            holder(&c.api) == Some(json!("replica-2"))
        })
        .await
    );
    let took = died.elapsed();
    assert!(took <= Duration::from_secs(20), "taken over after {took:?}");
    let mut r = c.api.get("HTTPRoute", "shop", "acme").unwrap();
    r["status"] = json!(null);
    c.api.apply(r);
    assert!(
        eventually_async(WAIT, || async { accepted(&c.api) }).await,
        "the new holder writes"
    );
}

/// The stand-in is the real protocol: Debian's `kubectl` gets and watches through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_gets_and_watches_through_the_stand_in() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        panic!("kubectl is not installed: scripts/setup.sh installs Debian's kubernetes-client");
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = api.kubeconfig(dir.path());
    api.apply(acme_route());
    let kubectl = |args: &[&str]| {
        let kc = kc.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&kc)
                    .args(&args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = kubectl(&[
        "get",
        "httproutes.gateway.networking.k8s.io",
        "-n",
        "shop",
        "-o",
        "json",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["items"][0]["metadata"]["name"], "acme");
    let out = kubectl(&[
        "get",
        "httproute",
        "acme",
        "-n",
        "shop",
        "-o",
        "jsonpath={.spec.hostnames[0]}",
    ])
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "acme.test",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Watch: a route created after the watch starts is printed.
    let mut child = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kc)
        .args([
            "get",
            "httproutes",
            "-n",
            "shop",
            "--watch",
            "-o",
            "name",
            "--request-timeout=20s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.ends_with("/acme"), "{first}");
    api.apply(route(
        "shop",
        "later",
        "infra",
        &["later.test"],
        json!([rule(&[], "odoo")]),
        json!({}),
    ));
    let next = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(next.ends_with("/later"), "{next}");
    child.kill().await.unwrap();
    assert!(api.requests().get("watch").copied().unwrap_or(0) >= 1);
}

/// `portier check --objects PATH…`: the same translation without an API server; each
/// problem as `FILE:LINE:COL` pointing into the YAML (an unsupported match, an invalid
/// annotation, a backend that does not resolve, a YAML error, a kind portier does not
/// read), exit 1; the summary with what the objects add, exit 0.
#[test]
fn check_objects_points_into_the_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portier.toml");
    std::fs::write(&cfg, "[listen]\nhttp = \"127.0.0.1:8080\"\n[kubernetes]\n").unwrap();
    let good = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: portier
spec:
  controllerName: portier.dev/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: edge
  namespace: infra
spec:
  gatewayClassName: portier
  listeners:
  - name: http
    protocol: HTTP
    port: 80
    allowedRoutes:
      namespaces:
        from: All
---
apiVersion: v1
kind: Service
metadata:
  name: odoo
  namespace: shop
spec:
  ports:
  - name: http
    port: 8069
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: acme
  namespace: shop
spec:
  parentRefs:
  - name: edge
    namespace: infra
  hostnames: [acme.test]
  rules:
  - backendRefs:
    - name: odoo
      port: 8069
"#;
    let objects = dir.path().join("objects");
    std::fs::create_dir(&objects).unwrap();
    std::fs::write(objects.join("good.yaml"), good).unwrap();
    let (code, out, err) = run_cli(&[
        "check",
        "-c",
        cfg.to_str().unwrap(),
        "--objects",
        objects.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "ok: 1 pools, 1 tenants, 0 certificates; objects: 4 read, 1 routes, 1 services"
        ),
        "{out}"
    );

    let bad = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: headers
  namespace: shop
spec:
  parentRefs:
  - name: edge
    namespace: infra
  hostnames: [h.test]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /}
      headers:
      - name: x
        value: y
    backendRefs:
    - name: odoo
      port: 8069
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: annotated
  namespace: shop
  annotations:
    portier.dev/maintenance: "yes"
spec:
  parentRefs:
  - name: edge
    namespace: infra
  hostnames: [a.test]
  rules:
  - backendRefs:
    - name: odoo
      port: 8069
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: lost
  namespace: shop
spec:
  parentRefs:
  - name: edge
    namespace: infra
  hostnames: [l.test]
  rules:
  - backendRefs:
    - name: nothing
      port: 8069
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: not-portiers
---
metadata:
  name: no-kind
"#;
    let bad_path = objects.join("zbad.yaml");
    std::fs::write(&bad_path, bad).unwrap();
    std::fs::write(objects.join("zsyntax.yaml"), "kind: [unclosed\n").unwrap();
    let (code, _, err) = run_cli(&[
        "check",
        "-c",
        cfg.to_str().unwrap(),
        "--objects",
        objects.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    // The position of `needle` in the n-th line holding it.
    let at = |needle: &str, nth: usize| {
        let (i, line) = bad
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .nth(nth)
            .unwrap();
        format!(
            "{}:{}:{}",
            bad_path.display(),
            i + 1,
            line.find(needle).unwrap() + 1
        )
    };
    let want = [
        (
            at("headers:", 0),
            "HTTPRoute shop/headers: matches on headers are not supported",
        ),
        (
            at("portier.dev/maintenance", 0),
            "HTTPRoute shop/annotated: annotation portier.dev/maintenance",
        ),
        (
            at("name: nothing", 0),
            "HTTPRoute shop/lost: Service shop/nothing does not exist",
        ),
        (
            at("metadata:", 4),
            "not a Kubernetes object: `apiVersion` and `kind` are needed",
        ),
    ];
    for (pos, msg) in want {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("{pos}: ")) && l.contains(msg)),
            "want {pos}: {msg}\n{err}"
        );
    }
    assert!(err.contains("zsyntax.yaml:"), "{err}");
}

/// `[kubernetes]` is read at start: a reload that changes it is applied otherwise, and
/// says the table waits for a restart (docs/configuration.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_kubernetes_table_says_it_waits_for_a_restart() {
    let ports = Ports::new();
    let p = Portier::start(&ports, &ports.listen()).await;
    let with = format!(
        "{}[kubernetes]\nkubeconfig = \"/nonexistent/kubeconfig\"\n",
        ports.listen()
    );
    std::fs::write(p.config_path(), with).unwrap();
    let r = request(
        p.admin,
        "POST",
        "admin",
        "/reload",
        &[],
        bytes::Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // The log is read by another thread: wait for the line.
    assert!(
        eventually(WAIT, || p
            .stderr()
            .iter()
            .any(|l| l.contains("[kubernetes] changed")))
        .await,
        "{}",
        p.stderr().join("\n")
    );
    // The provider did not start: no `kubernetes` in /status before a restart.
    assert!(status(p.admin).await["kubernetes"].is_null());
}
