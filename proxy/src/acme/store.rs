//! What ACME keeps in the certificate directory, so that a restart reuses it and
//! replicas sharing the directory (a Kubernetes volume, NFS) coordinate through it:
//!
//! - `HOST.crt` + `HOST.key`: issued pairs, served by the directory watcher like any;
//! - `acme/account.json`: the account (its key and URL), created once;
//! - `acme/issued/HOST`: marks `HOST.crt` as ACME's (renewable); a pair without it was
//!   placed by an operator and is never replaced;
//! - `acme/http-01/TOKEN`: key authorizations, answered by every replica's `http`
//!   listener;
//! - `acme/tls-alpn-01/HOST.crt` + `.key`: challenge certificates, served by every
//!   replica's SNI resolver to `acme-tls/1` handshakes;
//! - `acme/locks/NAME`: one replica orders a given certificate at a time; a lock holds
//!   its expiry, so a crashed holder's lock is taken over once it has lapsed.
//!
//! Every file is written to a temporary name and renamed, so readers see a whole file
//! or none.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The ACME files of one certificate directory.
#[derive(Clone, Debug)]
pub struct Store {
    certs: PathBuf,
    acme: PathBuf,
}

pub use portier_certs::plain_host;

/// An ACME token (base64url, RFC 8555 8.1).
pub fn plain_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Store {
    pub fn new(certs: &Path) -> Store {
        Store {
            certs: certs.to_path_buf(),
            acme: certs.join("acme"),
        }
    }

    pub fn alpn_dir(&self) -> PathBuf {
        self.acme.join("tls-alpn-01")
    }

    /// Writes `bytes` to `path` atomically (a temporary file in the same directory,
    /// then a rename), with `mode` permissions.
    pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    pub fn account_path(&self) -> PathBuf {
        self.acme.join("account.json")
    }

    pub fn read_account(&self) -> Option<Vec<u8>> {
        std::fs::read(self.account_path()).ok()
    }

    pub fn write_account(&self, json: &[u8]) -> Result<(), StoreError> {
        Self::write_atomic(&self.account_path(), json, 0o600)
    }

    /// True when `HOST.crt` was written by ACME.
    pub fn is_issued(&self, host: &str) -> bool {
        self.acme.join("issued").join(host).is_file()
    }

    /// The hosts ACME has issued certificates for in this directory.
    pub fn issued_hosts(&self) -> Vec<String> {
        std::fs::read_dir(self.acme.join("issued"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|h| plain_host(h))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True when a pair named `host` exists that ACME did not write.
    pub fn operator_pair(&self, host: &str) -> bool {
        let crt = self.certs.join(format!("{host}.crt"));
        let key = self.certs.join(format!("{host}.key"));
        (crt.exists() || key.exists()) && !self.is_issued(host)
    }

    /// Writes an issued pair as `HOST.key` + `HOST.crt` (the key first: the watcher
    /// loads a pair once both match) and marks it as ACME's. Refuses to replace a pair
    /// an operator placed.
    pub fn write_pair(&self, host: &str, chain_pem: &str, key_pem: &str) -> Result<(), StoreError> {
        if self.operator_pair(host) {
            return Err(StoreError::Io {
                path: self.certs.join(format!("{host}.crt")),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a pair placed by an operator is never replaced",
                ),
            });
        }
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        Self::write_atomic(
            &self.acme.join("issued").join(host),
            stamp.as_bytes(),
            0o644,
        )?;
        Self::write_atomic(
            &self.certs.join(format!("{host}.key")),
            key_pem.as_bytes(),
            0o600,
        )?;
        Self::write_atomic(
            &self.certs.join(format!("{host}.crt")),
            chain_pem.as_bytes(),
            0o644,
        )
    }

    pub fn put_http01(&self, token: &str, key_authorization: &str) -> Result<(), StoreError> {
        let path = self.acme.join("http-01").join(token);
        Self::write_atomic(&path, key_authorization.as_bytes(), 0o644)
    }

    /// The key authorization for `token`, if any replica published it.
    pub fn http01(&self, token: &str) -> Option<Vec<u8>> {
        if !plain_token(token) {
            return None;
        }
        std::fs::read(self.acme.join("http-01").join(token)).ok()
    }

    pub fn put_alpn01(&self, host: &str, cert_pem: &str, key_pem: &str) -> Result<(), StoreError> {
        let dir = self.alpn_dir();
        Self::write_atomic(&dir.join(format!("{host}.key")), key_pem.as_bytes(), 0o600)?;
        Self::write_atomic(&dir.join(format!("{host}.crt")), cert_pem.as_bytes(), 0o644)
    }

    /// Removes a finished challenge's files (best effort).
    pub fn clear_challenge(&self, host: &str, token: Option<&str>) {
        if let Some(t) = token.filter(|t| plain_token(t)) {
            let _ = std::fs::remove_file(self.acme.join("http-01").join(t));
        }
        let dir = self.alpn_dir();
        let _ = std::fs::remove_file(dir.join(format!("{host}.crt")));
        let _ = std::fs::remove_file(dir.join(format!("{host}.key")));
    }

    /// Takes the lock `name` for `lease` unless another holder's lock is still valid.
    /// A lapsed lock (its holder crashed or hung) is taken over.
    pub fn try_lock(
        &self,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Lock>, StoreError> {
        let dir = self.acme.join("locks");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(name);
        let now = unix_now();
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let until = now + lease.as_secs().max(1);
                    f.write_all(format!("{until} {owner}\n").as_bytes())
                        .map_err(io(&path))?;
                    return Ok(Some(Lock { path }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // A lock without a readable expiry is one another replica has just
                    // created and not written yet (create, then write): it counts as held
                    // for a lease from its creation, not as lapsed (taking it over then
                    // made two replicas order the same certificate).
                    let held_until = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                        .unwrap_or_else(|| {
                            std::fs::metadata(&path)
                                .and_then(|m| m.modified())
                                .ok()
                                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                                .map_or(0, |d| d.as_secs() + lease.as_secs().max(1))
                        });
                    if held_until > now {
                        return Ok(None);
                    }
                    // Lapsed: remove it and try once more (another replica may win).
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(None)
    }
}

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_exclude_until_released_or_lapsed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path());
        let a = s.try_lock("x.test", "a", Duration::from_secs(60)).unwrap();
        assert!(a.is_some());
        assert!(s
            .try_lock("x.test", "b", Duration::from_secs(60))
            .unwrap()
            .is_none());
        assert!(s
            .try_lock("y.test", "b", Duration::from_secs(60))
            .unwrap()
            .is_some());
        drop(a);
        assert!(s
            .try_lock("x.test", "b", Duration::from_secs(60))
            .unwrap()
            .is_some());
        // A crashed holder's lock (expired) is taken over.
        let stale = dir.path().join("acme/locks/z.test");
        std::fs::write(&stale, format!("{} crashed\n", unix_now() - 1)).unwrap();
        assert!(s
            .try_lock("z.test", "b", Duration::from_secs(60))
            .unwrap()
            .is_some());
        // A lock another replica has created but not written yet is held, not lapsed.
        let fresh = dir.path().join("acme/locks/w.test");
        std::fs::write(&fresh, "").unwrap();
        assert!(s
            .try_lock("w.test", "b", Duration::from_secs(60))
            .unwrap()
            .is_none());
        assert!(fresh.exists(), "the other replica's lock was removed");
    }

    #[test]
    fn pairs_are_marked_and_operator_pairs_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path());
        s.write_pair("a.test", "CRT", "KEY").unwrap();
        assert!(s.is_issued("a.test"));
        assert!(!s.operator_pair("a.test"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.test.crt")).unwrap(),
            "CRT"
        );
        // Renewal replaces ACME's own pair.
        s.write_pair("a.test", "CRT2", "KEY2").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.test.key")).unwrap(),
            "KEY2"
        );
        std::fs::write(dir.path().join("b.test.crt"), "OPERATOR").unwrap();
        std::fs::write(dir.path().join("b.test.key"), "OPERATOR").unwrap();
        assert!(s.operator_pair("b.test"));
        assert!(s.write_pair("b.test", "CRT", "KEY").is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b.test.crt")).unwrap(),
            "OPERATOR"
        );
        // No temporary files left behind.
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(stray.is_empty());
    }

    #[test]
    fn challenge_files_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::new(dir.path());
        s.put_http01("tok-EN_1", "tok-EN_1.thumb").unwrap();
        assert_eq!(
            s.http01("tok-EN_1").as_deref(),
            Some(&b"tok-EN_1.thumb"[..])
        );
        assert_eq!(s.http01("../account.json"), None);
        assert_eq!(s.http01("missing"), None);
        s.clear_challenge("a.test", Some("tok-EN_1"));
        assert_eq!(s.http01("tok-EN_1"), None);
        assert!(plain_host("a-b.example.com"));
        assert!(!plain_host("../x"));
        assert!(!plain_host("a/b"));
        assert!(!plain_host(""));
    }
}
