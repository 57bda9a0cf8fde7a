//! Request-framing fuzz, bounded and seeded: mutated Content-Length /
//! Transfer-Encoding headers and request lines sent raw to a live portier. An
//! ambiguous framing must be refused (4xx) without reaching a worker; anything that
//! reaches a worker arrives with the body the framing declares; portier keeps serving.

use std::time::Duration;

use portier_tests::*;

const TE: &[&str] = &[
    "chunked",
    "Chunked",
    " chunked",
    "chunked ",
    "gzip, chunked",
    "chunked, gzip",
    "identity",
    "x",
    "chunked, chunked",
];
const CL: &[&str] = &[
    "5",
    "05",
    "+5",
    "-1",
    "5, 5",
    "5, 6",
    "abc",
    "",
    "99999999999999999999",
    "5 5",
];

#[derive(Debug)]
struct Case {
    raw: Vec<u8>,
    /// The framing is ambiguous or invalid: must not reach a worker.
    must_refuse: bool,
    /// The body the framing declares (none without Content-Length or Transfer-Encoding).
    body_len: usize,
    marker: String,
}

fn case(rng: &mut fastrand::Rng, i: usize) -> Case {
    let marker = format!("/fuzz/{i}");
    let mut head = format!("POST {marker} HTTP/1.1\r\nHost: acme.test\r\nConnection: close\r\n");
    let mut must_refuse = false;
    let te = rng.bool().then(|| TE[rng.usize(..TE.len())]);
    let cl = rng.bool().then(|| CL[rng.usize(..CL.len())]);
    let body = b"hello";
    if let Some(te) = te {
        head.push_str(&format!("Transfer-Encoding: {te}\r\n"));
        // Only a final "chunked" frames a request body (RFC 9112 6.1).
        if te
            .trim()
            .to_ascii_lowercase()
            .rsplit(',')
            .next()
            .map(str::trim)
            != Some("chunked")
        {
            must_refuse = true;
        }
    }
    if let Some(cl) = cl {
        head.push_str(&format!("Content-Length: {cl}\r\n"));
        if te.is_some() {
            must_refuse = true; // both: a smuggling attempt
        }
        let valid = cl == "5" || cl == "05" || cl == "5, 5";
        if !valid && te.is_none() {
            must_refuse = true;
        }
    }
    match rng.usize(..4) {
        0 if cl.is_some() => {
            head.push_str(&format!(
                "Content-Length: {}\r\n",
                if rng.bool() { "5" } else { "6" }
            ));
            must_refuse |= !matches!(cl, Some("5") | Some("05") | Some("5, 5"));
        }
        1 => head.push_str("X-Folded: a\r\n b\r\n"),
        _ => {}
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    if te.is_some() {
        raw.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
    } else {
        raw.extend_from_slice(body);
    }
    Case {
        body_len: if te.is_some() || cl.is_some() { 5 } else { 0 },
        raw,
        must_refuse,
        marker,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_framings_are_refused_or_forwarded_whole() {
    let w = sim("w").await;
    let ports = Ports::new();
    let cfg = format!(
        "{}\n[log]\naccess = false\n[pools.p]\nhttp = [\"{}\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        w.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    let mut rng = fastrand::Rng::with_seed(0x5eed_f00d);
    let mut refused = 0;
    let mut forwarded = 0;
    // 300 cases in the suite; `scripts/fuzz.sh` runs many more (PORTIER_FUZZ_CASES).
    let n: usize = std::env::var("PORTIER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for i in 0..n {
        let c = case(&mut rng, i);
        let (resp, _) = raw(p.http, &c.raw, Duration::from_millis(800)).await;
        let status: u16 = resp
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let seen: Vec<_> = w
            .requests()
            .into_iter()
            .filter(|r| r.target == c.marker)
            .collect();
        if c.must_refuse {
            assert!(
                (400..500).contains(&status),
                "case {i}: {c:?} answered {resp:?}"
            );
            assert!(
                seen.is_empty(),
                "case {i}: an ambiguous framing reached the worker: {c:?}"
            );
            refused += 1;
        } else if !seen.is_empty() {
            assert_eq!(status, 200, "case {i}: {resp}");
            assert_eq!(seen[0].body_len, c.body_len, "case {i}: {c:?}");
            forwarded += 1;
        } else {
            // Refusing a framing that could be valid is allowed (strictness), never a 5xx.
            assert!(
                (400..500).contains(&status),
                "case {i}: {c:?} answered {resp:?}"
            );
        }
    }
    assert!(
        refused > 50 && forwarded > 20,
        "refused {refused}, forwarded {forwarded}"
    );
    // Still serving.
    let r = get(p.http, "acme.test", "/web/dataset/call_kw")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}
