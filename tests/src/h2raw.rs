//! Raw HTTP/2 over real TLS to a real portier: frames, HPACK blocks written by hand and
//! header blocks read back, for the tests that need what a well-behaved client (hyper,
//! h2) would never send or never show: `h2abuse.rs`, `h2_hpack.rs`.

use crate::{local, sim, tls_connect, Portier, Ports, SimWorker, TestPki, TlsStream};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADERS: u8 = 0x1;
pub const SETTINGS: u8 = 0x4;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// HPACK for `GET https://acme.test/web/login`: indexed :method GET (2), :scheme https
/// (7), a literal :path, a literal :authority (name index 1), without indexing.
pub fn request_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87];
    let path = b"/web/login";
    b.push(0x04); // literal without indexing, name = static 4 (:path)
    b.push(path.len() as u8);
    b.extend_from_slice(path);
    let host = b"acme.test";
    b.push(0x01); // name = static 1 (:authority)
    b.push(host.len() as u8);
    b.extend_from_slice(host);
    b
}

/// A literal header with a new name, without indexing.
pub fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x00, name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
    b
}

/// A portier with one tenant, `acme.test`, on HTTPS (HTTP/2 by ALPN) before a sim worker.
pub struct Edge {
    pub p: Portier,
    pub w: SimWorker,
    pub pki: TestPki,
    _dir: tempfile::TempDir,
    pub https: std::net::SocketAddr,
}

pub async fn setup() -> Edge {
    let w = sim("w").await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_pair(dir.path(), "acme", &["acme.test"], 90);
    let ports = Ports::new();
    let cfg = format!(
        "{}https = \"127.0.0.1:{}\"\n[log]\naccess = false\n[tls]\ncerts = \"{}\"\nredirect_http = false\n[pools.p]\nhttp = [\"{}\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\n",
        ports.listen(),
        ports.https,
        dir.path().display(),
        w.addr()
    );
    let p = Portier::start(&ports, &cfg).await;
    Edge {
        p,
        w,
        pki,
        _dir: dir,
        https: local(ports.https),
    }
}

pub async fn h2_stream(e: &Edge) -> TlsStream {
    let s = tls_connect(
        e.https,
        "acme.test",
        e.pki.client(&[b"h2"], &[&rustls::version::TLS13]),
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    s
}

/// An HPACK integer with an `n`-bit prefix at `b[*i]` (RFC 7541 section 5.1).
pub fn hpack_int(b: &[u8], i: &mut usize, n: u32) -> usize {
    let max = (1usize << n) - 1;
    let mut v = usize::from(b[*i]) & max;
    *i += 1;
    if v == max {
        let mut shift = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    v
}

/// An HPACK string literal's bytes as sent (Huffman-coded or not; section 5.2).
pub fn hpack_str(b: &[u8], i: &mut usize) -> Vec<u8> {
    let len = hpack_int(b, i, 7);
    let s = b[*i..*i + len].to_vec();
    *i += len;
    s
}

/// The literal fields of a header block: their representation (0x40 with incremental
/// indexing, 0x00 without indexing, 0x10 never indexed; RFC 7541 section 6.2) and their
/// value as sent.
pub fn hpack_literals(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let first = b[i];
        let (kind, prefix) = if first & 0x80 != 0 {
            hpack_int(b, &mut i, 7); // indexed field: no literal
            continue;
        } else if first & 0x40 != 0 {
            (0x40, 6)
        } else if first & 0x20 != 0 {
            hpack_int(b, &mut i, 5); // dynamic table size update
            continue;
        } else {
            (first & 0x10, 4)
        };
        if hpack_int(b, &mut i, prefix) == 0 {
            hpack_str(b, &mut i); // a new name
        }
        out.push((kind, hpack_str(b, &mut i)));
    }
    out
}
