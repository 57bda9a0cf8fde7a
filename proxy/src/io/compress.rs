//! Response compression (contract, "Assets, compression, cookies"): zstd, br or gzip,
//! the client's preference among them (ties: zstd, br, gzip), for compressible types
//! of at least 1 KiB that the worker sent uncompressed; with `compress = "static"` only
//! the `static` class, with `"all"` every class but `longpolling`. Never WebSockets,
//! longpolls, `206`, `HEAD`. Streaming: each chunk is compressed as it comes, with
//! pingora's encoders (`pingora::protocols::http::compression`).

use http::{header, HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::compression::{Algorithm, Encode};
use portier_config::{Class, Compress};

/// Smaller bodies are not worth a compressor.
pub const MIN_LENGTH: u64 = 1024;

/// A streaming encoder of one response.
pub type Encoder = Box<dyn Encode + Send + Sync>;

/// Levels: fast enough to stream (zstd 3 and br 5 compress better than gzip 6 and
/// faster than br's default 11, which takes seconds on a 3 MiB bundle).
fn level(a: Algorithm) -> u32 {
    match a {
        Algorithm::Zstd => 3,
        Algorithm::Brotli => 5,
        _ => 6,
    }
}

/// Whether `compress` lets this request's response be compressed.
pub fn applies(setting: Compress, class: Class, req: &RequestHeader, websocket: bool) -> bool {
    let class_ok = match setting {
        Compress::Off => false,
        Compress::Static => class == Class::Static,
        Compress::All => class != Class::Longpolling,
    };
    class_ok && !websocket && req.method != Method::HEAD
}

/// The encoding to use for a client's `Accept-Encoding` values: the highest `q` among
/// zstd, br and gzip (`*` stands for any of them); ties go to zstd, then br, then gzip.
pub fn negotiate<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Option<Algorithm> {
    const OURS: [(Algorithm, &str); 3] = [
        (Algorithm::Zstd, "zstd"),
        (Algorithm::Brotli, "br"),
        (Algorithm::Gzip, "gzip"),
    ];
    let mut q = [None::<f32>; 3];
    let mut star = None::<f32>;
    for v in values {
        let Ok(s) = v.to_str() else { continue };
        for item in s.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let mut weight = 1.0f32;
            for p in parts {
                if let Some(w) = p
                    .trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
                {
                    weight = w.trim().parse().unwrap_or(0.0);
                }
            }
            if name == "*" {
                star = Some(weight);
            } else if let Some(i) = OURS.iter().position(|(_, n)| name.eq_ignore_ascii_case(n)) {
                q[i] = Some(weight);
            }
        }
    }
    let mut best: Option<(Algorithm, f32)> = None;
    for (i, (alg, _)) in OURS.iter().enumerate() {
        let w = q[i].or(star).unwrap_or(0.0);
        if w > 0.0 && best.is_none_or(|(_, bw)| w > bw) {
            best = Some((*alg, w));
        }
    }
    best.map(|(a, _)| a)
}

/// True for the contract's compressible types: text/*, JSON, JavaScript, XML, SVG.
fn compressible_type(resp: &ResponseHeader) -> bool {
    let Some(ct) = resp
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime.starts_with("text/")
        || mime.ends_with("/json")
        || mime.ends_with("+json")
        || mime.ends_with("/javascript")
        || mime.ends_with("/ecmascript")
        || mime.ends_with("/xml")
        || mime.ends_with("+xml")
}

/// Whether this response (as the worker sent it) is one to compress, whatever the
/// client accepts: it then varies by `Accept-Encoding`.
pub fn eligible(resp: &ResponseHeader) -> bool {
    let status = resp.status.as_u16();
    if status < 200 || matches!(status, 204 | 206 | 304) {
        return false;
    }
    let encoded = resp
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let no_transform = resp
        .headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("no-transform"));
    let small = resp
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n < MIN_LENGTH);
    !encoded && !no_transform && !small && compressible_type(resp)
}

/// Adds `Accept-Encoding` to the response's `Vary` (once).
fn add_vary(resp: &mut ResponseHeader) -> pingora::Result<()> {
    let existing: Vec<String> = resp
        .headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect();
    if existing
        .iter()
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding") || t.trim() == "*")
    {
        return Ok(());
    }
    let value = if existing.is_empty() {
        "Accept-Encoding".to_string()
    } else {
        format!("{}, Accept-Encoding", existing.join(", "))
    };
    resp.insert_header(header::VARY, value)
}

/// The response-header step: for an eligible response adds `Vary`, and when the client
/// accepts an encoding, sets `Content-Encoding`, drops `Content-Length` (the length
/// changes), weakens a strong `ETag` and returns the encoder for the body.
pub fn response_headers(
    encoding: Option<Algorithm>,
    resp: &mut ResponseHeader,
) -> pingora::Result<Option<Encoder>> {
    if !eligible(resp) {
        return Ok(None);
    }
    add_vary(resp)?;
    let Some(alg) = encoding else { return Ok(None) };
    let Some(encoder) = alg.compressor(level(alg)) else {
        return Ok(None);
    };
    resp.insert_header(header::CONTENT_ENCODING, alg.as_str())?;
    // Streamed: the length is not known ahead (HTTP/2 drops the chunked framing), and
    // byte ranges of the identity body no longer apply.
    resp.remove_header(&header::CONTENT_LENGTH);
    resp.remove_header(&header::ACCEPT_RANGES);
    resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    if let Some(etag) = resp.headers.get(header::ETAG).and_then(|v| v.to_str().ok()) {
        if !etag.starts_with("W/") {
            let weak = format!("W/{etag}");
            resp.insert_header(header::ETAG, weak)?;
        }
    }
    Ok(Some(encoder))
}

/// The body step: compresses one chunk (the last one flushes the encoder). An empty
/// output is no chunk at all.
pub fn body(
    encoder: &mut Encoder,
    body: &mut Option<bytes::Bytes>,
    end_of_stream: bool,
) -> pingora::Result<()> {
    let input = body.take().unwrap_or_default();
    let out = encoder.encode(&input, end_of_stream)?;
    if !out.is_empty() {
        *body = Some(out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(v: &str) -> Option<&'static str> {
        let v = HeaderValue::from_str(v).unwrap();
        negotiate(std::iter::once(&v)).map(|a| a.as_str())
    }

    #[test]
    fn the_clients_preference_then_zstd_br_gzip() {
        assert_eq!(neg("gzip, deflate, br, zstd"), Some("zstd"));
        assert_eq!(neg("gzip, deflate, br"), Some("br"));
        assert_eq!(neg("gzip"), Some("gzip"));
        assert_eq!(neg("gzip;q=1.0, br;q=0.5"), Some("gzip"));
        assert_eq!(neg("br;q=0, gzip;q=0.1"), Some("gzip"));
        assert_eq!(neg("*"), Some("zstd"));
        assert_eq!(neg("*;q=0.5, zstd;q=0"), Some("br"));
        assert_eq!(neg("identity"), None);
        assert_eq!(neg("deflate"), None);
        assert_eq!(neg(""), None);
    }

    #[test]
    fn which_requests_by_setting_class_method_and_upgrade() {
        let get = RequestHeader::build("GET", b"/", None).unwrap();
        let head = RequestHeader::build("HEAD", b"/", None).unwrap();
        use Class::*;
        for (setting, class, want) in [
            (Compress::Static, Static, true),
            (Compress::Static, Interactive, false),
            (Compress::Static, Integration, false),
            (Compress::All, Interactive, true),
            (Compress::All, Integration, true),
            (Compress::All, Static, true),
            (Compress::All, Longpolling, false),
            (Compress::Off, Static, false),
        ] {
            assert_eq!(
                applies(setting, class, &get, false),
                want,
                "{setting:?} {class:?}"
            );
        }
        assert!(!applies(Compress::All, Static, &head, false), "HEAD");
        assert!(
            !applies(Compress::All, Interactive, &get, true),
            "WebSocket"
        );
    }

    fn resp(ct: &str, len: Option<u64>) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.insert_header("content-type", ct).unwrap();
        if let Some(n) = len {
            r.insert_header("content-length", n.to_string()).unwrap();
        }
        r
    }

    #[test]
    fn eligible_types_and_sizes() {
        assert!(eligible(&resp(
            "application/javascript; charset=utf-8",
            Some(5000)
        )));
        assert!(eligible(&resp("text/css", None)));
        assert!(eligible(&resp("image/svg+xml", Some(2048))));
        assert!(eligible(&resp("application/json", Some(1024))));
        assert!(!eligible(&resp("application/json", Some(1023))));
        assert!(!eligible(&resp("image/png", Some(50_000))));
        assert!(!eligible(&resp("application/octet-stream", Some(50_000))));
        let mut gz = resp("text/html", Some(5000));
        gz.insert_header("content-encoding", "gzip").unwrap();
        assert!(!eligible(&gz));
        let mut partial = resp("text/html", Some(5000));
        partial.set_status(206).unwrap();
        assert!(!eligible(&partial));
    }

    #[test]
    fn headers_and_a_round_trip() {
        let mut r = resp("text/plain", Some(4096));
        r.insert_header("vary", "Cookie").unwrap();
        r.insert_header("etag", "\"abc\"").unwrap();
        let mut enc = response_headers(Some(Algorithm::Gzip), &mut r)
            .unwrap()
            .unwrap();
        assert_eq!(r.headers.get("content-encoding").unwrap(), "gzip");
        assert!(r.headers.get("content-length").is_none());
        assert_eq!(r.headers.get("vary").unwrap(), "Cookie, Accept-Encoding");
        assert_eq!(r.headers.get("etag").unwrap(), "W/\"abc\"");
        let text = "portier compresses this line. ".repeat(200);
        let mut out = Vec::new();
        for (i, chunk) in text.as_bytes().chunks(1000).enumerate() {
            let mut b = Some(bytes::Bytes::copy_from_slice(chunk));
            body(&mut enc, &mut b, false).unwrap();
            if let Some(b) = b {
                out.extend_from_slice(&b);
            }
            let _ = i;
        }
        let mut last = None;
        body(&mut enc, &mut last, true).unwrap();
        out.extend_from_slice(&last.unwrap());
        assert!(out.len() < text.len() / 10, "{}", out.len());
        let mut d = flate2_decode(&out);
        assert_eq!(std::mem::take(&mut d), text.as_bytes());
        // Not accepted: only Vary.
        let mut r = resp("text/plain", Some(4096));
        assert!(response_headers(None, &mut r).unwrap().is_none());
        assert_eq!(r.headers.get("vary").unwrap(), "Accept-Encoding");
        assert!(r.headers.get("content-encoding").is_none());
    }

    fn flate2_decode(data: &[u8]) -> Vec<u8> {
        let mut d = Algorithm::Gzip.decompressor(true).unwrap();
        d.encode(data, true).unwrap().to_vec()
    }
}
