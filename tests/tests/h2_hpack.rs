//! HPACK as portier encodes it, read from raw HTTP/2 header blocks over real TLS.

use std::time::Duration;

use portier_tests::h2raw::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `X-Request-Id` differs on every response, so portier sends it over HTTP/2 as a
/// never-indexed literal (proxy/src/service.rs): inserted into the connection's HPACK
/// dynamic table, as h2's encoder does with any value it is not told otherwise, each
/// new id would evict the entries that do repeat. A client-sent id (kept, see
/// `upstream_headers.rs`) of 31 zeros and a one: its Huffman code (RFC 7541 Appendix B:
/// '0' is 00000, '1' 00001) is 19 zero bytes and 0x01.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_is_never_indexed_over_http2() {
    let e = setup().await;
    let id = format!("{}1", "0".repeat(31));
    let mut block = request_block();
    block.extend_from_slice(&literal("x-request-id", &id));
    let mut s = h2_stream(&e).await;
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    frame(&mut out, HEADERS, END_HEADERS | END_STREAM, 1, &block);
    s.write_all(&out).await.unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut pending = Vec::new();
    let response = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "the connection closed before a response");
        pending.extend_from_slice(&buf[..n]);
        let mut found = None;
        while pending.len() >= 9 {
            let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
            if pending.len() < 9 + len {
                break;
            }
            let stream =
                u32::from_be_bytes([pending[5], pending[6], pending[7], pending[8]]) & 0x7fff_ffff;
            if pending[3] == HEADERS && stream == 1 {
                assert_ne!(pending[4] & END_HEADERS, 0, "one HEADERS frame");
                found = Some(pending[9..9 + len].to_vec());
            }
            pending.drain(..9 + len);
        }
        if let Some(block) = found {
            break block;
        }
    };
    let mut huffman = vec![0u8; 19];
    huffman.push(0x01);
    let literals = hpack_literals(&response);
    let kinds: Vec<u8> = literals
        .iter()
        .filter(|(_, v)| *v == huffman || *v == id.as_bytes())
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(
        kinds,
        vec![0x10],
        "the x-request-id field's representation (0x10 never indexed, 0x40 indexed); literals: {literals:?}"
    );
}
