//! portier's certificate store: `NAME.crt` (leaf first, then chain) + `NAME.key` pairs
//! from a directory, indexed by the certificates' DNS names; an SNI resolver for
//! rustls (exact name, then wildcard, then the `default` pair); live reload that
//! keeps the previous certificate of any pair that is half-written or mismatched.
//! No networking happens here.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

mod crypto;
mod pair;

pub use crypto::{crypto_provider, install_crypto_provider, seed_random};
use pair::read;
pub use pair::{load_pair, pair_from_pem, Pair};

/// Why a pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no certificate found (expected PEM CERTIFICATE blocks, leaf first)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: invalid PEM: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: no private key found (expected a PKCS#8, RSA or EC PEM key)")]
    NoKey { path: PathBuf },
    #[error("{path}: unsupported private key: {message}")]
    Key { path: PathBuf, message: String },
    #[error("{key} does not match the certificate {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: cannot parse the certificate: {message}")]
    X509 { path: PathBuf, message: String },
    #[error("{path} has no matching {missing}")]
    Unpaired { path: PathBuf, missing: PathBuf },
}

/// The failures of a directory scan, by NAME.
pub type PairErrors = Vec<(String, CertError)>;

/// Loads every pair of a directory. Returns the pairs and, by NAME, the failures.
pub fn scan_dir(dir: &Path) -> std::io::Result<(Vec<Pair>, PairErrors)> {
    let mut crts = BTreeMap::new();
    let mut keys = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        if file.starts_with('.') || !path.is_file() {
            continue;
        }
        if let Some(name) = file.strip_suffix(".crt") {
            crts.insert(name.to_string(), path.clone());
        } else if let Some(name) = file.strip_suffix(".key") {
            keys.insert(name.to_string(), path.clone());
        }
    }
    let mut pairs = Vec::new();
    let mut errors = Vec::new();
    for (name, crt) in &crts {
        match keys.get(name) {
            Some(key) => match load_pair(name, crt, key) {
                Ok(p) => pairs.push(p),
                Err(e) => errors.push((name.clone(), e)),
            },
            None => errors.push((
                name.clone(),
                CertError::Unpaired {
                    path: crt.clone(),
                    missing: dir.join(format!("{name}.key")),
                },
            )),
        }
    }
    for (name, key) in &keys {
        if !crts.contains_key(name) {
            errors.push((
                name.clone(),
                CertError::Unpaired {
                    path: key.clone(),
                    missing: dir.join(format!("{name}.crt")),
                },
            ));
        }
    }
    Ok((pairs, errors))
}

/// The compiled SNI table.
#[derive(Default)]
pub struct Index {
    by_name: BTreeMap<String, Arc<Pair>>,
    exact: HashMap<String, Arc<Pair>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<Pair>>,
    default: Option<Arc<Pair>>,
}

impl Index {
    pub fn build(pairs: impl IntoIterator<Item = Arc<Pair>>, default: Option<&str>) -> Index {
        let mut idx = Index::default();
        for p in pairs {
            for n in &p.dns_names {
                if let Some(suffix) = n.strip_prefix("*.") {
                    idx.wildcard
                        .entry(suffix.to_string())
                        .or_insert_with(|| p.clone());
                } else {
                    idx.exact.entry(n.clone()).or_insert_with(|| p.clone());
                }
            }
            idx.by_name.insert(p.name.clone(), p);
        }
        idx.default = default.and_then(|d| idx.by_name.get(d).cloned());
        idx
    }

    /// The pair for a host by its names only (exact, then wildcard; not the default).
    pub fn covering(&self, host: &str) -> Option<&Arc<Pair>> {
        if let Some(p) = self.exact.get(host) {
            return Some(p);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// The pair to present for an SNI name (or for no SNI).
    pub fn lookup(&self, sni: Option<&str>) -> Option<&Arc<Pair>> {
        sni.and_then(|s| self.covering(s)).or(self.default.as_ref())
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn pairs(&self) -> impl Iterator<Item = &Arc<Pair>> {
        self.by_name.values()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pair>> {
        self.by_name.get(name)
    }

    pub fn has_default(&self) -> bool {
        self.default.is_some()
    }
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct ReloadReport {
    pub loaded: usize,
    /// Pairs that failed, with the reason; their previous certificate stays if there was one.
    pub errors: PairErrors,
    /// NAMEs whose previous certificate was kept because the new files failed.
    pub kept: Vec<String>,
}

/// A host name that is safe as a file name in the certificate directory (what host
/// patterns allow: letters, digits, dots, hyphens; no leading dot).
pub fn plain_host(host: &str) -> bool {
    !host.is_empty()
        && !host.starts_with('.')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// The ALPN protocol of ACME's TLS-ALPN-01 validation handshakes (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The live certificate set, swapped atomically on reload.
#[derive(Default)]
pub struct CertStore {
    index: ArcSwap<Index>,
    /// The directory's pairs, the provided ones (Kubernetes Secrets) and the default's
    /// NAME: the index is built from both lists.
    parts: std::sync::Mutex<Parts>,
    /// Where TLS-ALPN-01 challenge certificates are written (`HOST.crt` + `HOST.key`),
    /// by this replica or another sharing the directory; `None` without ACME.
    alpn_challenges: arc_swap::ArcSwapOption<PathBuf>,
    /// Called with a handshake's SNI name that no pair covers (ACME's on-demand
    /// certificates); must be cheap: it runs inside the handshake.
    on_miss: std::sync::OnceLock<MissHook>,
}

#[derive(Default)]
struct Parts {
    dir: Vec<Arc<Pair>>,
    provided: Vec<Arc<Pair>>,
    default: Option<String>,
}

/// See [`CertStore::set_on_miss`].
pub type MissHook = Box<dyn Fn(&str) + Send + Sync>;

impl CertStore {
    pub fn new() -> CertStore {
        CertStore::default()
    }

    pub fn index(&self) -> arc_swap::Guard<Arc<Index>> {
        self.index.load()
    }

    /// Reads `dir` again. A pair that fails keeps its previous certificate (by NAME);
    /// a pair whose files are gone is dropped.
    pub fn reload(&self, dir: &Path, default: Option<&str>) -> std::io::Result<ReloadReport> {
        let (pairs, errors) = scan_dir(dir)?;
        let old = self.index.load();
        let mut report = ReloadReport {
            loaded: pairs.len(),
            ..Default::default()
        };
        let mut all: Vec<Arc<Pair>> = pairs.into_iter().map(Arc::new).collect();
        for (name, _) in &errors {
            if let Some(prev) = old.get(name) {
                all.push(prev.clone());
                report.kept.push(name.clone());
            }
        }
        report.errors = errors;
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        parts.dir = all;
        parts.default = default.map(str::to_string);
        self.rebuild(&parts);
        Ok(report)
    }

    /// Replaces the provided pairs (Kubernetes Secrets), given as PEM. A pair that
    /// fails keeps its previous certificate (by NAME); its error is returned.
    pub fn set_provided(&self, pairs: &[(String, Vec<u8>, Vec<u8>)]) -> PairErrors {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let mut errors = Vec::new();
        let mut next = Vec::new();
        for (name, crt, key) in pairs {
            let label = PathBuf::from(format!("Secret {name}"));
            match pair_from_pem(name, crt, &label, key, &label) {
                Ok(p) => next.push(Arc::new(p)),
                Err(e) => {
                    if let Some(prev) = parts.provided.iter().find(|p| p.name == *name) {
                        next.push(prev.clone());
                    }
                    errors.push((name.clone(), e));
                }
            }
        }
        parts.provided = next;
        self.rebuild(&parts);
        errors
    }

    fn rebuild(&self, parts: &Parts) {
        let all = parts.dir.iter().chain(parts.provided.iter()).cloned();
        self.index
            .store(Arc::new(Index::build(all, parts.default.as_deref())));
    }

    pub fn len(&self) -> usize {
        self.index.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets, once, what is called with an SNI name no pair covers.
    pub fn set_on_miss(&self, hook: MissHook) {
        let _ = self.on_miss.set(hook);
    }

    /// Sets (or clears) the directory of TLS-ALPN-01 challenge certificates.
    pub fn set_alpn_challenge_dir(&self, dir: Option<PathBuf>) {
        self.alpn_challenges.store(dir.map(Arc::new));
    }

    /// The challenge certificate for `host`, read from the challenge directory (only
    /// validation handshakes, which offer nothing but `acme-tls/1`, come here).
    fn alpn_challenge(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let dir = self.alpn_challenges.load_full()?;
        if !plain_host(host) {
            return None;
        }
        let crt = read(&dir.join(format!("{host}.crt"))).ok()?;
        let key = read(&dir.join(format!("{host}.key"))).ok()?;
        // Not `load_pair`: webpki (behind rustls' key check) rejects the challenge
        // certificate's critical acmeIdentifier extension, which only the validator reads.
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt)
            .collect::<Result<_, _>>()
            .ok()?;
        let der = PrivateKeyDer::from_pem_slice(&key).ok()?;
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).ok()?;
        Some(Arc::new(CertifiedKey::new(chain, signer)))
    }

    /// True when a certificate names `host` (the default pair does not count).
    pub fn covers(&self, host: &str) -> bool {
        let index = self.index.load();
        index
            .covering(host)
            .is_some_and(|p| !index.default.as_ref().is_some_and(|d| Arc::ptr_eq(d, p)))
    }
}

/// The rustls resolver over a [`CertStore`].
#[derive(Debug)]
pub struct Resolver(pub Arc<CertStore>);

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("pairs", &self.len())
            .finish()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let index = self.0.index.load();
        let sni = hello
            .server_name()
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        if hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN))
        {
            // A TLS-ALPN-01 validation: the challenge certificate or nothing.
            return self.0.alpn_challenge(sni.as_deref()?);
        }
        if let (Some(name), Some(hook)) = (sni.as_deref(), self.0.on_miss.get()) {
            if index.covering(name).is_none() {
                hook(name);
            }
        }
        index.lookup(sni.as_deref()).map(|p| p.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str, sans: &[&str]) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let ck = rcgen::generate_simple_self_signed(
            sans.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), ck.cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("{name}.key")),
            ck.signing_key.serialize_pem(),
        )
        .unwrap();
        ck
    }

    #[test]
    fn loads_pairs_and_indexes_names() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "acme", &["acme.test", "erp.acme.test"]);
        write_pair(dir.path(), "wild", &["*.saas.test"]);
        write_pair(dir.path(), "fallback", &["fallback.test"]);
        let store = CertStore::new();
        let r = store.reload(dir.path(), Some("fallback")).unwrap();
        assert_eq!(r.loaded, 3);
        assert!(r.errors.is_empty());
        let idx = store.index();
        assert_eq!(idx.lookup(Some("erp.acme.test")).unwrap().name, "acme");
        assert_eq!(idx.lookup(Some("x.saas.test")).unwrap().name, "wild");
        assert_eq!(idx.lookup(Some("a.b.saas.test")).unwrap().name, "fallback");
        assert_eq!(idx.lookup(Some("nothing.test")).unwrap().name, "fallback");
        assert_eq!(idx.lookup(None).unwrap().name, "fallback");
        assert!(store.covers("x.saas.test"));
        assert!(!store.covers("nothing.test"));
        let p = idx.get("acme").unwrap();
        assert!(p.seconds_left(std::time::SystemTime::now()) > 0.0);
    }

    #[test]
    fn no_default_means_no_certificate() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "acme", &["acme.test"]);
        let store = CertStore::new();
        store.reload(dir.path(), None).unwrap();
        assert!(store.index().lookup(Some("other.test")).is_none());
        assert!(store.index().lookup(None).is_none());
    }

    #[test]
    fn mismatched_and_broken_pairs_are_rejected_and_the_old_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "acme", &["acme.test"]);
        let store = CertStore::new();
        store.reload(dir.path(), None).unwrap();
        let before = store.index().get("acme").unwrap().key.clone();
        // Replace only the key: mismatch.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("acme.key"), other.serialize_pem()).unwrap();
        let r = store.reload(dir.path(), None).unwrap();
        assert!(
            matches!(r.errors[0].1, CertError::Mismatch { .. }),
            "{:?}",
            r.errors
        );
        assert_eq!(r.kept, vec!["acme".to_string()]);
        assert!(Arc::ptr_eq(
            &store.index().get("acme").unwrap().key,
            &before
        ));
        // A half-written certificate.
        write_pair(dir.path(), "acme", &["acme.test"]);
        let pem = std::fs::read_to_string(dir.path().join("acme.crt")).unwrap();
        std::fs::write(dir.path().join("acme.crt"), &pem[..pem.len() / 2]).unwrap();
        let r = store.reload(dir.path(), None).unwrap();
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(store.covers("acme.test"));
    }

    #[test]
    fn unpaired_files_and_bad_keys_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "ok", &["ok.test"]);
        std::fs::write(dir.path().join("lonely.crt"), "x").unwrap();
        std::fs::write(dir.path().join("orphan.key"), "x").unwrap();
        std::fs::write(dir.path().join(".hidden.crt"), "x").unwrap();
        let (pairs, errors) = scan_dir(dir.path()).unwrap();
        assert_eq!(pairs.len(), 1);
        let names: Vec<&str> = errors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["lonely", "orphan"]);
        assert!(errors
            .iter()
            .all(|(_, e)| matches!(e, CertError::Unpaired { .. })));
    }

    #[test]
    fn rsa_pkcs1_pkcs8_and_ecdsa_keys_load() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // ECDSA P-256, PKCS#8 (rcgen).
        write_pair(d, "ec", &["ec.test"]);
        // RSA 2048 from openssl, as PKCS#8 and as traditional PKCS#1.
        for (name, extra) in [("rsa8", &[][..]), ("rsa1", &["-traditional"][..])] {
            let key = d.join(format!("{name}.key"));
            let crt = d.join(format!("{name}.crt"));
            let ok = std::process::Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj",
                ])
                .arg(format!("/CN={name}.test"))
                .arg("-addext")
                .arg(format!("subjectAltName=DNS:{name}.test"))
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&crt)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl is installed (scripts/setup.sh)")
                .success();
            assert!(ok);
            if !extra.is_empty() {
                let ok = std::process::Command::new("openssl")
                    .args(["rsa", "-traditional", "-in"])
                    .arg(&key)
                    .arg("-out")
                    .arg(&key)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .unwrap()
                    .success();
                assert!(ok);
                assert!(std::fs::read_to_string(&key)
                    .unwrap()
                    .contains("BEGIN RSA PRIVATE KEY"));
            }
        }
        let (pairs, errors) = scan_dir(d).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let mut names: Vec<&str> = pairs.iter().map(|p| p.name.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["ec", "rsa1", "rsa8"]);
    }
}
