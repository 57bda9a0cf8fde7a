//! portier's TLS crypto policy: the rustls provider (aws-lc-rs, the cipher suites) the
//! listeners use, installed as the process default, and its random generator seeded
//! before the first handshake.

/// portier's TLS policy: aws-lc-rs (its RSA and ECDSA signing is what a new handshake
/// spends most of its time in, and it is 1.7x faster than ring's for RSA-2048 on
/// this machine's AVX-512 CPU), TLS 1.3 AEAD suites, and for TLS 1.2 one ECDHE
/// AES-128-GCM suite per key type (ECDSA, RSA). With a single TLS 1.2 suite per
/// certificate type the client's preference order cannot select a weaker one
/// (pingora builds the rustls config itself, so `ignore_client_order` is out of
/// reach); every TLS 1.2 client of the last decade supports it.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    p
}

/// Installs [`crypto_provider`] as the process default (before pingora builds its
/// TLS listeners, which use the default). Returns false if one was already installed.
pub fn install_crypto_provider() -> bool {
    crypto_provider().install_default().is_ok()
}

/// Draws once from the TLS provider's random generator, so that it is seeded before
/// the first handshake. aws-lc seeds its process-wide DRBG lazily, from CPU jitter
/// entropy (`crypto/fipsmodule/rand/entropy/tree_drbg_jitter_entropy.c`), at the
/// first draw: ~420 million instructions (~75 ms here) that the first TLS handshake
/// after start-up would otherwise spend on a proxy thread, stalling every other
/// connection of that thread. Returns false if the generator failed.
pub fn seed_random() -> bool {
    let mut bytes = [0u8; 32];
    crypto_provider().secure_random.fill(&mut bytes).is_ok()
}
