//! Pure helpers for "What goes upstream": forwarding headers, request ids and the
//! request-smuggling checks that need the raw header block. Unit-tested here; wired
//! into pingora in `upstream.rs` and `request.rs`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderName, HeaderValue};
use portier_config::Settings;

/// Request header blocks above this size get `431` (pingora's own hard limit is 1 MiB).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Request ids a client may send are kept when they look like ids.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 200
        && v.iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'=')
        })
}

/// The headers portier sets or reads on every request or response, parsed once: a
/// `HeaderMap` takes them straight, where a `&str` name is parsed on each lookup and
/// pingora's `insert_header` turns a name into text and parses it back.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_ODOO_DBFILTER: HeaderName = HeaderName::from_static("x-odoo-dbfilter");
pub const X_ODOO_DATABASE: HeaderName = HeaderName::from_static("x-odoo-database");
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// An address as a header value; IPv4 (nearly every client) without the formatting
/// machinery, which cost more than the rest of the forwarding headers together.
pub fn ip_header_value(ip: IpAddr) -> HeaderValue {
    let text = match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if octet >= 100 {
                    s.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    s.push(char::from(b'0' + octet / 10 % 10));
                }
                s.push(char::from(b'0' + octet % 10));
            }
            s
        }
        IpAddr::V6(_) => ip.to_string(),
    };
    // Digits, dots, colons and hex letters only: always a valid header value.
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

static SEQ: AtomicU64 = AtomicU64::new(0);
static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// A new request id: 32 hex digits, unique per process run (random prefix + counter).
pub fn new_request_id() -> HeaderValue {
    // hex digits are always a valid header value
    HeaderValue::from_bytes(&new_request_id_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// [`new_request_id`] as bytes, written without a `String` on the request path (each
/// digit pushed as a `char` cost ~500 instructions per request).
pub fn new_request_id_bytes() -> [u8; 32] {
    let prefix = *PREFIX.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        fastrand::u64(..) ^ t.rotate_left(17) ^ u64::from(std::process::id())
    });
    hex_id(prefix, SEQ.fetch_add(1, Ordering::Relaxed))
}

/// `prefix` and `n` as 16 lowercase hex digits each.
fn hex_id(prefix: u64, n: u64) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (half, v) in id.chunks_exact_mut(16).zip([prefix, n]) {
        for (i, digit) in half.iter_mut().enumerate() {
            *digit = HEX[((v >> (60 - 4 * i)) & 0xf) as usize];
        }
    }
    id
}

/// True when the raw HTTP/1 header block has a `Content-Length` field (pingora drops
/// it from the parsed header when `Transfer-Encoding` is present, per RFC 9112; a
/// request carrying both is a smuggling attempt and gets 400).
pub fn raw_has_content_length(raw: &[u8]) -> bool {
    raw.split(|&b| b == b'\n')
        .skip(1)
        .any(|line| line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
}

/// The values for `X-Forwarded-For` and `X-Real-IP`.
///
/// A client-sent `X-Forwarded-For` is kept (and the peer appended) only when the peer
/// is a trusted proxy; then the real client is the right-most address that is not a
/// trusted proxy. Otherwise both are the peer.
pub fn forwarded_for(peer: IpAddr, sent: Option<&str>, settings: &Settings) -> (String, IpAddr) {
    let peer = canonical(peer);
    if settings.is_trusted_proxy(peer) {
        if let Some(sent) = sent.map(str::trim).filter(|s| !s.is_empty()) {
            let mut real = peer;
            for part in sent.rsplit(',') {
                match part.trim().parse::<IpAddr>() {
                    Ok(ip) => {
                        real = canonical(ip);
                        if !settings.is_trusted_proxy(real) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            return (format!("{sent}, {peer}"), real);
        }
    }
    (peer.to_string(), peer)
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) as plain IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The `Location` of an http -> https redirect: same host, path and query; the port
/// is named only when it is not 443.
pub fn https_location(host: &str, https_port: u16, target: &str) -> String {
    if https_port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{https_port}{target}")
    }
}

/// Headers portier sets on every upstream request; copies a client sends are dropped.
pub fn is_own_header(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-odoo-dbfilter"
            | "x-odoo-database"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-real-ip"
            | "x-request-id"
    )
}

/// The `X-Odoo-dbfilter` value that admits exactly `db`: `^NAME$` with NAME escaped
/// as Python's `re.escape` does (Python 3.7+: the characters `()[]{}?*+-|^$\\.&~#`
/// and whitespace). OCA's `dbfilter_from_header` applies the value with `re.match`,
/// which anchors only the start: unanchored, `acme` would admit `acme2` too.
pub fn dbfilter_for(db: &str) -> String {
    let mut out = String::with_capacity(db.len() + 8);
    out.push('^');
    for c in db.chars() {
        if "()[]{}?*+-|^$\\.&~# \t\n\r\x0b\x0c".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('$');
    out
}

/// The request's declared `Content-Length`, if any.
pub fn content_length(req: &pingora::http::RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse().ok())
}

/// True when the `Expect` header asks for `100-continue`.
pub fn expects_continue(v: Option<&[u8]>) -> bool {
    v.is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(trusted: &[&str]) -> Settings {
        Settings {
            trusted_proxies: trusted.iter().map(|s| s.parse().unwrap()).collect(),
            ..Settings::default()
        }
    }

    #[test]
    fn dbfilter_is_anchored_and_escaped_like_python() {
        assert_eq!(dbfilter_for("acme"), "^acme$");
        assert_eq!(dbfilter_for("acme-prod.v2_x"), "^acme\\-prod\\.v2_x$");
        assert_eq!(dbfilter_for("a b#c"), "^a\\ b\\#c$");
    }

    #[test]
    fn xff_from_untrusted_peer_is_replaced() {
        let s = settings(&[]);
        let (xff, real) = forwarded_for("203.0.113.9".parse().unwrap(), Some("1.2.3.4"), &s);
        assert_eq!(xff, "203.0.113.9");
        assert_eq!(real.to_string(), "203.0.113.9");
    }

    #[test]
    fn xff_from_trusted_proxy_is_kept_and_appended() {
        let s = settings(&["10.0.0.0/8"]);
        let (xff, real) = forwarded_for(
            "10.1.1.1".parse().unwrap(),
            Some("198.51.100.7, 10.2.2.2"),
            &s,
        );
        assert_eq!(xff, "198.51.100.7, 10.2.2.2, 10.1.1.1");
        assert_eq!(real.to_string(), "198.51.100.7");
        let (xff, real) = forwarded_for("10.1.1.1".parse().unwrap(), None, &s);
        assert_eq!(xff, "10.1.1.1");
        assert_eq!(real.to_string(), "10.1.1.1");
    }

    #[test]
    fn mapped_addresses_are_canonical() {
        let s = settings(&["127.0.0.0/8"]);
        let (xff, _) = forwarded_for("::ffff:127.0.0.1".parse().unwrap(), Some("9.9.9.9"), &s);
        assert_eq!(xff, "9.9.9.9, 127.0.0.1");
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123_X"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"has space"));
        assert!(!valid_request_id(b"quote\""));
        assert!(!valid_request_id(&[b'a'; 201]));
        let (a, b) = (new_request_id(), new_request_id());
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        // the same prefix, the counter one further
        let (na, nb) = (
            u64::from_str_radix(&a[16..], 16).unwrap(),
            u64::from_str_radix(&b[16..], 16).unwrap(),
        );
        assert_eq!(&a[..16], &b[..16]);
        assert!(nb > na);
        let c = new_request_id_bytes();
        assert_eq!(&c[..16], &a.as_bytes()[..16]);
        assert!(u64::from_str_radix(std::str::from_utf8(&c[16..]).unwrap(), 16).unwrap() > nb);
        assert_eq!(
            &hex_id(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
            b"0123456789abcdeffedcba9876543210"
        );
        assert_eq!(&hex_id(0, 1), b"00000000000000000000000000000001");
    }

    #[test]
    fn ip_header_values_match_the_standard_formatting() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "192.168.100.9",
            "255.255.255.255",
            "1.10.100.200",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header_value(ip).to_str().unwrap(), ip.to_string());
        }
    }

    #[test]
    fn redirect_locations() {
        assert_eq!(
            https_location("acme.test", 443, "/web?a=1"),
            "https://acme.test/web?a=1"
        );
        assert_eq!(
            https_location("acme.test", 8443, "/"),
            "https://acme.test:8443/"
        );
    }

    #[test]
    fn raw_content_length() {
        assert!(raw_has_content_length(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(raw_has_content_length(
            b"POST / HTTP/1.1\r\ncontent-LENGTH:3\r\n\r\n"
        ));
        assert!(!raw_has_content_length(
            b"POST /content-length: HTTP/1.1\r\nX-Content-Length: 3\r\n\r\n"
        ));
    }
}

/// Property tests of the framing check and the header rewrite's pieces (the stable-Rust
/// stand-in for fuzzing; `scripts/fuzz.sh` runs them longer).
#[cfg(test)]
pub(crate) mod props {
    use super::*;
    use proptest::prelude::*;

    /// Cases per property: `PORTIER_FUZZ_CASES` (`scripts/fuzz.sh`), else `default`.
    pub fn fuzz_cases(default: u32) -> u32 {
        std::env::var("PORTIER_FUZZ_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    }

    fn cases() -> u32 {
        fuzz_cases(1000)
    }

    fn header_line() -> impl Strategy<Value = (String, bool)> {
        let name = prop::sample::select(vec![
            "Content-Length",
            "content-length",
            "CONTENT-LENGTH",
            "Content-Lengthy",
            "X-Content-Length",
            "Transfer-Encoding",
            "Host",
            "content-length ",
            " content-length",
        ]);
        (name, "[ -~]{0,12}").prop_map(|(n, v)| {
            let is_cl = n.eq_ignore_ascii_case("content-length");
            (format!("{n}:{v}"), is_cl)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        #[test]
        fn content_length_is_found_in_any_header_block(
            lines in prop::collection::vec(header_line(), 0..8),
            crlf in any::<bool>(),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut raw = format!("POST /x HTTP/1.1{eol}");
            for (l, _) in &lines {
                raw.push_str(l);
                raw.push_str(eol);
            }
            raw.push_str(eol);
            let want = lines.iter().any(|(_, cl)| *cl);
            prop_assert_eq!(raw_has_content_length(raw.as_bytes()), want, "{:?}", raw);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_framing_checks(raw in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = raw_has_content_length(&raw);
            let _ = valid_request_id(&raw);
            let _ = expects_continue(Some(&raw));
        }

        #[test]
        fn dbfilter_admits_exactly_the_database(db in "[ -~]{0,30}") {
            let f = dbfilter_for(&db);
            prop_assert!(f.starts_with('^') && f.ends_with('$'));
            // Unescaped, it is the name; every special character is escaped.
            let inner = &f[1..f.len() - 1];
            let mut plain = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    let next = chars.next();
                    prop_assert!(next.is_some(), "a dangling escape in {}", f);
                    plain.extend(next);
                } else {
                    prop_assert!(!"()[]{}?*+-|^$\\.&~# ".contains(c), "{} unescaped in {}", c, f);
                    plain.push(c);
                }
            }
            prop_assert_eq!(plain, db);
        }

        #[test]
        fn the_real_client_is_never_a_trusted_proxy_unless_all_are(
            chain in prop::collection::vec((0u8..4, 1u8..255), 0..6),
            peer_trusted in any::<bool>(),
        ) {
            // 10.0.0.0/8 is trusted; 203.0.113.0/24 is not.
            let settings = Settings {
                trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
                ..Settings::default()
            };
            let ip = |(kind, n): (u8, u8)| -> String {
                if kind == 0 { format!("203.0.113.{n}") } else { format!("10.0.0.{n}") }
            };
            let sent: Vec<String> = chain.iter().copied().map(ip).collect();
            let sent = sent.join(", ");
            let peer: IpAddr = if peer_trusted { "10.9.9.9".parse().unwrap() } else { "198.51.100.7".parse().unwrap() };
            let (xff, real) = forwarded_for(peer, Some(&sent), &settings);
            if !peer_trusted {
                prop_assert_eq!(real, peer);
                prop_assert_eq!(xff, peer.to_string());
            } else {
                prop_assert!(xff.ends_with(&peer.to_string()));
                let untrusted_in_chain = chain.iter().any(|(k, _)| *k == 0);
                if untrusted_in_chain {
                    prop_assert!(!settings.is_trusted_proxy(real), "{} from {}", real, sent);
                    // The right-most untrusted one.
                    let last = chain.iter().rev().find(|(k, _)| *k == 0).copied().map(ip).unwrap();
                    prop_assert_eq!(real.to_string(), last);
                }
            }
        }
    }
}
