//! Stable hashing for rendezvous (highest-random-weight) selection: the same on every
//! replica and version, so replicas agree on where a tenant or session goes.

use std::net::SocketAddr;

/// FNV-1a: stable across processes and versions, so every portier replica maps a
/// tenant or session to the same backend.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// [`hash_bytes`] of the concatenation of `parts`, without building it.
pub fn hash_parts(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The SplitMix64 finaliser: a strong 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rendezvous score of `key` on a backend.
pub fn score(key: u64, backend: u64) -> u64 {
    mix(key ^ backend.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The hash identifying a backend in rendezvous scores.
pub fn backend_hash(addr: &SocketAddr) -> u64 {
    hash_bytes(addr.to_string().as_bytes())
}
