//! The command line of the contract: `check`, `run`, `demo`, `--version`.

use std::time::Duration;

use portier_tests::*;

#[test]
fn version_prints_name_and_semver() {
    let (code, out, _) = run_cli(&["--version"]);
    assert_eq!(code, 0);
    let out = out.trim();
    let (name, ver) = out.split_once(' ').expect("two words");
    assert_eq!(name, "portier");
    let parts: Vec<&str> = ver.split('.').collect();
    assert_eq!(parts.len(), 3, "{out}");
    assert!(parts.iter().all(|p| p.parse::<u32>().is_ok()), "{out}");
}

#[test]
fn check_accepts_a_valid_file_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.toml");
    std::fs::write(
        &path,
        r#"[listen]
http = "127.0.0.1:18080"
[pools.a]
http = ["127.0.0.1:8069"]
[pools.b]
discover = { dns = "odoo.svc.cluster.local", http_port = 8069, longpolling_port = 8072 }
[tenants.x]
hosts = ["x.test"]
pool = "a"
[tenants.y]
hosts = ["{tenant}.y.test"]
pool = "b"
database = "{tenant}"
integration = { rate = "10/s", burst = 20, concurrency = 4 }
"#,
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "ok: 2 pools, 2 tenants, 0 certificates");
    // PORTIER_CONFIG is the default file.
    let out = std::process::Command::new(portier_bin())
        .arg("check")
        .env("PORTIER_CONFIG", &path)
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn check_reports_every_error_with_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[listen]
http = "127.0.0.1:18080"
colour = "blue"

[pools.p]
http = ["10.0.0.1:8069", "nowhere"]

[pools.empty]
spread = 2

[tenants.a]
hosts = ["a.test"]
pool = "missing"
request_timeout = "soon"

[tenants.b]
hosts = ["a.test"]
pool = "p"
integration = { rate = "20/fortnight" }
max_body = "12 parsecs"

[pools.listless]
http = []
"#,
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    let file = path.display().to_string();
    let expected = [
        (3, 1, "unknown key `colour`"),
        (6, 26, "\"nowhere\" is not an IP:PORT address"),
        (8, 8, "pool \"empty\" has no backends"),
        (13, 8, "unknown pool \"missing\""),
        (14, 19, "invalid duration \"soon\""),
        (17, 10, "already claimed by tenant \"a\""),
        (19, 24, "unknown unit \"fortnight\""),
        (20, 12, "invalid size \"12 parsecs\""),
        (23, 8, "pool \"listless\" has no backends: `http` is empty"),
    ];
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with(&file)).collect();
    for (line, col, text) in expected {
        let prefix = format!("{file}:{line}:{col}: ");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains(text)),
            "missing {prefix}...{text} in:\n{err}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "{err}");
}

/// A missing required key is reported at the header of the table that lacks it (contract
/// r3, "Configuration": `[tls]` for a missing `certs`, `[pools.NAME]` for a pool without
/// backends), never at 1:1: each file puts that table below other sections, and the
/// error must name the header's line and the table's name in it.
#[test]
fn check_reports_a_missing_key_at_the_header_of_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let listen = "[listen]\nhttp = \"127.0.0.1:18080\"\nhttps = \"127.0.0.1:18443\"\n";
    let pool = "[pools.p]\nhttp = [\"127.0.0.1:8069\"]\n";
    let tenant = "[tenants.t]\nhosts = [\"t.test\"]\npool = \"p\"\n";
    let certs_line = format!("certs = \"{}\"\n", certs.display());
    // (file text, the header holding the error, the table's name in it, message)
    let cases = [
        (
            format!("{listen}\n{pool}\n[tls]\nredirect_http = true\n\n[tls.acme]\nemail = \"a@b.test\"\n\n{tenant}"),
            "[tls]",
            "tls",
            "[tls] needs `certs`",
        ),
        (
            format!("{listen}\n[tls]\n{certs_line}\n{pool}\n{tenant}\n[cluster]\nkey_prefix = \"x:\"\n"),
            "[cluster]",
            "cluster",
            "[cluster] needs `redis`",
        ),
        (
            format!("{pool}\n{tenant}\n[listen]\nadmin = \"127.0.0.1:19900\"\n"),
            "[listen]",
            "listen",
            "[listen] needs at least one of `http` or `https`",
        ),
        (
            format!("{pool}\n[listen]\nhttp = \"127.0.0.1:18080\"\n\n[tls]\n{certs_line}\n[tls.acme]\nemail = \"a@b.test\"\n\n{tenant}"),
            "[listen]",
            "listen",
            "needs an `https` listener",
        ),
        (
            format!("{listen}\n[tls]\n{certs_line}\n{pool}\n[pools.empty]\nspread = 2\n\n{tenant}"),
            "[pools.empty]",
            "empty",
            "pool \"empty\" has no backends",
        ),
        (
            format!("{listen}\n[tls]\n{certs_line}\n{pool}\n[pools.half]\nlongpolling = [\"127.0.0.1:8072\"]\n\n{tenant}"),
            "[pools.half]",
            "half",
            "pool \"half\" has no `http` backends",
        ),
        (
            format!("{listen}\n[tls]\n{certs_line}\n{pool}\n[tenants.nopool]\nhosts = [\"n.test\"]\n"),
            "[tenants.nopool]",
            "nopool",
            "tenant \"nopool\" needs `pool`",
        ),
        (
            format!("{listen}\n[tls]\n{certs_line}\n{pool}\n[tenants.nohosts]\npool = \"p\"\n"),
            "[tenants.nohosts]",
            "nohosts",
            "tenant \"nohosts\" needs `hosts`",
        ),
    ];
    for (i, (text, header, name, message)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("missing-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{message}: {err}");
        let (line, header_text) = text
            .lines()
            .enumerate()
            .find(|(_, l)| l.trim() == *header)
            .map(|(n, l)| (n + 1, l))
            .unwrap();
        assert!(line > 1, "case {i}: the header must not be on line 1");
        let col = header_text.find(name).unwrap() + 1;
        let want = format!("{}:{line}:{col}: ", path.display());
        assert!(
            err.lines()
                .any(|l| l.starts_with(&want) && l.contains(message)),
            "case {i}: no {want}...{message} in:\n{err}"
        );
    }
}

#[test]
fn check_reports_a_missing_file() {
    let (code, _, err) = run_cli(&["check", "-c", "/nonexistent/portier.toml"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("/nonexistent/portier.toml:1:1: cannot read"),
        "{err}"
    );
}

#[test]
fn run_refuses_to_start_with_an_invalid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[listen]\nhttp = \"127.0.0.1:1\"\n[tenants.a]\nhosts=[\"a\"]\npool=\"nope\"\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["run", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(":5:6: tenant \"a\" names unknown pool \"nope\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reports_a_taken_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!("[listen]\nhttp = \"127.0.0.1:{port}\"\n[pools.p]\nhttp=[\"127.0.0.1:9\"]\n[tenants.a]\nhosts=[\"a.test\"]\npool=\"p\"\n"),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["run", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("cannot listen on http address 127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_routes_two_tenants_and_a_websocket() {
    let ports = Ports::new();
    let dir = tempfile::tempdir().unwrap();
    let mut p = Portier::spawn(
        &ports,
        dir,
        &[
            "demo",
            "--port",
            &ports.http.to_string(),
            "--admin-port",
            &ports.admin.to_string(),
        ],
        &[],
    );
    p.wait_ready().await;
    assert!(
        eventually(Duration::from_secs(10), || p
            .stdout()
            .iter()
            .any(|l| l.starts_with("press Ctrl-C")))
        .await,
        "demo printed: {:?}",
        p.stdout()
    );
    let out = p.stdout().join("\n");
    let checks: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("  ok ") || l.starts_with("  FAIL "))
        .collect();
    assert_eq!(checks.len(), 10, "{out}");
    assert!(checks.iter().all(|l| l.starts_with("  ok ")), "{out}");
    assert!(out.contains(&format!(
        "curl -i http://acme.localhost:{}/web/login",
        ports.http
    )));
    assert!(
        out.contains("bytes sent by portier from the filestore"),
        "{out}"
    );
    assert!(
        out.contains(&format!("dashboard: http://127.0.0.1:{}/", ports.admin)),
        "{out}"
    );
    // What it prints is text for a person: no escape left unexpanded.
    assert!(!out.contains("\\n"), "a literal \\n in:\n{out}");
    assert!(out
        .lines()
        .any(|l| l.starts_with("databases on the simulated Odoo 17 servers:")));
    // And it really serves those tenants.
    let r = get(p.http, "acme.localhost", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.upstream_header("x-odoo-dbfilter").as_deref(),
        Some("^acme$")
    );
    let (mut ws, _) = websocket(p.http, "zeta.saas.localhost", "/websocket", &[])
        .await
        .unwrap();
    assert_eq!(ws_roundtrip(&mut ws, "hi").await.unwrap(), "hi");
    drop(ws);
    p.signal("TERM");
    let status = p
        .wait_exit(Duration::from_secs(10))
        .expect("demo exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn check_refuses_a_spool_dir_that_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.toml");
    std::fs::write(
        &path,
        "[listen]\nhttp = \"127.0.0.1:18080\"\nspool_dir = \"/proc/portier-spool\"\n[pools.p]\nhttp = [\"127.0.0.1:8069\"]\nworkers = 4\nqueue = { max = 10, timeout = \"5s\" }\n[tenants.a]\nhosts = [\"a.test\"]\npool = \"p\"\nbuffer_response = \"8MiB\"\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    let file = path.display().to_string();
    assert!(
        err.contains(&format!(
            "{file}:3:13: `spool_dir` \"/proc/portier-spool\" cannot be written"
        )),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with(&file)).count(),
        1,
        "{err}"
    );
}
