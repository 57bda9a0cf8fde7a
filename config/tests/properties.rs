//! Property tests (stable-Rust stand-in for fuzzing): arbitrary input never panics the
//! loader, diagnostics point inside the text, and the routing functions keep their
//! invariants.

use std::path::Path;

use portier_config::class::{is_database_manager, normalize_path};
use portier_config::{load_str, normalize_host, Class, HostIndex, HostPattern};
use proptest::prelude::*;

fn check_positions(text: &str, diags: &[portier_config::Diagnostic]) {
    let lines = text.split('\n').count().max(1);
    for d in diags {
        assert!(
            d.pos.line >= 1 && d.pos.line <= lines,
            "{d} outside {lines} lines"
        );
        assert!(d.pos.col >= 1, "{d}");
        assert!(!d.message.is_empty());
    }
}

/// TOML-shaped noise: sections, keys and values from the schema, mixed with junk.
fn tomlish() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "http",
        "https",
        "admin",
        "drain",
        "threads",
        "access",
        "certs",
        "default",
        "redirect_http",
        "hsts",
        "connect_timeout",
        "request_timeout",
        "max_body",
        "buffer_body",
        "admin_cidrs",
        "hosts",
        "pool",
        "database",
        "integration",
        "spread",
        "health",
        "breaker",
        "retries",
        "discover",
        "rate",
        "burst",
        "bogus",
    ]);
    let value = prop::sample::select(vec![
        "\"127.0.0.1:80\"",
        "\"5s\"",
        "\"5 parsecs\"",
        "\"128MiB\"",
        "\"20/s\"",
        "3",
        "-1",
        "true",
        "[\"a.test\"]",
        "[\"{tenant}.x.test\"]",
        "{ rate = \"1/s\" }",
        "[1, 2]",
        "\"p\"",
        "\"\"",
        "\"::\"",
        "99999999999999999999",
        "{ every = \"1s\" }",
    ]);
    let section = prop::sample::select(vec![
        "[listen]",
        "[log]",
        "[tls]",
        "[defaults]",
        "[pools.p]",
        "[pools.q]",
        "[tenants.a]",
        "[tenants.b]",
        "[[x]]",
        "[",
        "",
    ]);
    let line = prop_oneof![
        (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        section.prop_map(String::from),
        ".*".prop_map(|s: String| s.chars().take(40).collect()),
    ];
    prop::collection::vec(line, 0..25).prop_map(|l| l.join("\n"))
}

/// Cases per property: 2 000 in the test suite, more from `scripts/fuzz.sh`
/// (`PORTIER_FUZZ_CASES`).
fn cases() -> u32 {
    std::env::var("PORTIER_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000)
}

/// The contract's class rules, written out segment by segment (a model to check
/// `Class::of` against).
fn model_class(path: &str) -> Class {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let first = segs.first().copied().unwrap_or("");
    let has_more = segs.len() > 1;
    match first {
        "websocket" => Class::Longpolling,
        "longpolling" if has_more => Class::Longpolling,
        "xmlrpc" | "jsonrpc" => Class::Integration,
        "json" | "api" if has_more => Class::Integration,
        _ if first == "web"
            && has_more
            && matches!(segs[1], "static" | "assets")
            && segs.len() > 2 =>
        {
            Class::Static
        }
        _ if !first.is_empty() && segs.len() > 2 && segs[1] == "static" => Class::Static,
        _ => Class::Interactive,
    }
}

fn segments() -> impl Strategy<Value = String> {
    let seg = prop::sample::select(vec![
        "web",
        "static",
        "assets",
        "websocket",
        "longpolling",
        "poll",
        "xmlrpc",
        "2",
        "jsonrpc",
        "json",
        "api",
        "mail",
        "login",
        "database",
        "x",
        "",
    ]);
    (prop::collection::vec(seg, 1..5), any::<bool>()).prop_map(|(segs, slash)| {
        let mut p = format!("/{}", segs.join("/"));
        if slash {
            p.push('/');
        }
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn class_rules_follow_the_contract(path in segments()) {
        let n = normalize_path(&path).into_owned();
        prop_assert_eq!(Class::of(&n), model_class(&n), "{} -> {}", path, n);
    }

    #[test]
    fn database_manager_spellings_normalise_to_it(
        pre in prop::sample::select(vec!["", "/", "/./", "/static/../", "//"]),
        sep in prop::sample::select(vec!["/", "%2F", "%2f", "//", "/./"]),
        d in prop::sample::select(vec!["database", "%64atabase", "d%61tabase", "databas%65"]),
        tail in prop::sample::select(vec!["/manager", "/selector", "/list", "", "/"]),
    ) {
        let p = format!("/web{pre}{sep}{d}{tail}").replace("/web/", "/web/").replace("//web", "/web");
        let n = normalize_path(&p);
        prop_assert!(is_database_manager(&n), "{} -> {}", p, n);
    }

    #[test]
    fn arbitrary_text_never_panics_the_loader(text in ".{0,400}") {
        match load_str(&text, Path::new("fuzz.toml")) {
            Ok((_, warnings)) => check_positions(&text, &warnings),
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                check_positions(&text, &errors);
            }
        }
    }

    #[test]
    fn toml_shaped_noise_never_panics_the_loader(text in tomlish()) {
        match load_str(&text, Path::new("fuzz.toml")) {
            Ok((c, warnings)) => {
                check_positions(&text, &warnings);
                // A valid config is internally consistent.
                for t in &c.tenants {
                    prop_assert!(t.pool < c.pools.len());
                }
            }
            Err(errors) => {
                prop_assert!(errors.iter().any(|d| d.is_error()));
                check_positions(&text, &errors);
            }
        }
    }

    #[test]
    fn path_normalisation_is_idempotent_and_clean(path in "[/a-z%.0-9A-F]{0,40}") {
        let once = normalize_path(&path).into_owned();
        let twice = normalize_path(&once).into_owned();
        prop_assert!(once.starts_with('/'));
        prop_assert!(!once.contains("//"), "{once}");
        prop_assert!(!once.split('/').any(|s| s == ".." || s == "."), "{once}");
        // Decoding is applied once, as the worker does: only re-decoding can differ.
        if !once.contains('%') {
            prop_assert_eq!(&once, &twice);
        }
    }

    #[test]
    fn encoded_database_manager_paths_are_caught(dots in 0usize..3) {
        // /web/database reached through dot segments and escapes is still the manager.
        let mut p = String::from("/web");
        for _ in 0..dots {
            p.push_str("/static/..");
        }
        p.push_str("/%64atabase/manager");
        let n = normalize_path(&p);
        prop_assert!(is_database_manager(&n), "{p} -> {n}");
        prop_assert_eq!(Class::of(&n), Class::Interactive);
    }

    #[test]
    fn hosts_match_whatever_the_case_and_port(label in "[a-z][a-z0-9-]{0,15}", port in 1u16.., upper in any::<bool>()) {
        let mut idx = HostIndex::default();
        idx.insert(&HostPattern::parse("{tenant}.erp.example.com").unwrap(), 0).unwrap();
        idx.insert(&HostPattern::parse("exact.example.com").unwrap(), 1).unwrap();
        let mut host = format!("{label}.erp.example.com:{port}");
        if upper {
            host = host.to_ascii_uppercase();
        }
        let n = normalize_host(&host);
        let m = idx.lookup(&n);
        prop_assert!(m.is_some(), "{host}");
        let m = m.unwrap();
        prop_assert_eq!(m.tenant, 0);
        prop_assert_eq!(m.captured, Some(label.as_str()));
        let e = normalize_host(&format!("EXACT.example.com:{port}")).into_owned();
        prop_assert_eq!(idx.lookup(&e).map(|m| m.tenant), Some(1));
    }
}
