//! One certificate pair: PEM parsed and checked (the key matches the leaf), the leaf's
//! DNS names and expiry.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// One loaded certificate pair.
pub struct Pair {
    /// NAME of `NAME.crt` / `NAME.key`.
    pub name: String,
    pub key: Arc<CertifiedKey>,
    /// DNS names of the leaf (subjectAltName; the CN when there is none), lower case.
    pub dns_names: Vec<String>,
    pub not_after: SystemTime,
    pub crt: PathBuf,
}

impl Pair {
    /// Time left until expiry (negative when expired).
    pub fn seconds_left(&self, now: SystemTime) -> f64 {
        match self.not_after.duration_since(now) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("name", &self.name)
            .field("dns_names", &self.dns_names)
            .field("not_after", &self.not_after)
            .finish()
    }
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads and checks one pair: parsable, key matches the leaf.
pub fn load_pair(name: &str, crt: &Path, key: &Path) -> Result<Pair, CertError> {
    let crt_pem = read(crt)?;
    let key_pem = read(key)?;
    pair_from_pem(name, &crt_pem, crt, &key_pem, key)
}

/// Checks one pair given as PEM (`crt` and `key` name them in errors, e.g. a
/// Kubernetes Secret).
pub fn pair_from_pem(
    name: &str,
    crt_pem: &[u8],
    crt: &Path,
    key_pem: &[u8],
    key: &Path,
) -> Result<Pair, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(crt_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem {
            path: crt.to_path_buf(),
            message: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: crt.to_path_buf(),
        });
    };
    let der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NoKey {
            path: key.to_path_buf(),
        },
        other => CertError::Pem {
            path: key.to_path_buf(),
            message: other.to_string(),
        },
    })?;
    let signer =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).map_err(|e| CertError::Key {
            path: key.to_path_buf(),
            message: e.to_string(),
        })?;
    let (dns_names, not_after) = inspect(leaf).map_err(|message| CertError::X509 {
        path: crt.to_path_buf(),
        message,
    })?;
    let certified = CertifiedKey::new(chain.clone(), signer);
    certified.keys_match().map_err(|_| CertError::Mismatch {
        cert: crt.to_path_buf(),
        key: key.to_path_buf(),
    })?;
    Ok(Pair {
        name: name.to_string(),
        key: Arc::new(certified),
        dns_names,
        not_after,
        crt: crt.to_path_buf(),
    })
}

/// The leaf's DNS names and expiry.
fn inspect(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime), String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = gn {
                names.push(n.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    let ts = cert.validity().not_after.timestamp();
    let not_after = if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH
    };
    Ok((names, not_after))
}
