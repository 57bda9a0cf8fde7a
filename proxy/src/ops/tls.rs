//! TLS operations around the certificate store: loading and reloading the pairs of
//! the configured directory, change detection, expiry metrics, and `check`'s
//! validation of every pair.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::{Duration, SystemTime};

use portier_config::{Config, Diagnostic};

use crate::state::Shared;

/// Certificates expiring sooner than this get a warning from `check`.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// Reloads the certificate directory of the current configuration (if it has
/// `[tls]`), logging what failed; previous certificates of failed pairs are kept.
pub fn reload_certs(shared: &Shared) {
    let snap = shared.snapshot.load();
    let Some(tls) = snap.config.tls.as_ref() else {
        return;
    };
    let Some(dir) = tls.certs.as_ref() else {
        update_expiry(shared);
        return;
    };
    match shared.certs.reload(dir, tls.default.as_deref()) {
        Ok(report) => {
            for (name, err) in &report.errors {
                if report.kept.contains(name) {
                    tracing::error!(pair = %name, error = %err, "certificate pair rejected; the previous certificate stays in use");
                } else {
                    tracing::error!(pair = %name, error = %err, "certificate pair rejected");
                }
            }
            if let Some(d) = &tls.default {
                if !shared.certs.index().has_default() {
                    tracing::error!(default = %d, "the default certificate pair is not loaded");
                }
            }
            tracing::info!(certificates = shared.certs.len(), "certificates loaded");
        }
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot read the certificate directory; keeping the loaded certificates");
        }
    }
    *shared
        .cert_fingerprint
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = fingerprint(dir);
    update_expiry(shared);
}

/// Reloads when the directory's files changed since the last load.
pub fn reload_if_changed(shared: &Shared) {
    let snap = shared.snapshot.load();
    let Some(dir) = snap.config.tls.as_ref().and_then(|t| t.certs.as_ref()) else {
        return;
    };
    let now = fingerprint(dir);
    let last = *shared
        .cert_fingerprint
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if now != last {
        tracing::info!(dir = %dir.display(), "certificate files changed; reloading them");
        reload_certs(shared);
    }
}

/// Sets `portier_cert_expiry_seconds{name}` for every loaded pair.
pub fn update_expiry(shared: &Shared) {
    let now = SystemTime::now();
    let index = shared.certs.index();
    shared.metrics.cert_expiry.reset();
    for p in index.pairs() {
        shared
            .metrics
            .cert_expiry
            .with_label_values(&[p.name.as_str()])
            .set(p.seconds_left(now));
    }
}

/// A cheap summary of the directory (names, sizes, modification times, symlink
/// targets), to notice added, replaced and removed files.
pub fn fingerprint(dir: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut items: Vec<(String, u64, Option<SystemTime>)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // Follow symlinks (Kubernetes swaps `..data`): the target's metadata counts.
            let meta = std::fs::metadata(e.path()).ok()?;
            Some((name, meta.len(), meta.modified().ok()))
        })
        .collect();
    items.sort();
    items.hash(&mut h);
    h.finish()
}

/// `check`'s validation of `[tls]`: every pair must load, the default must exist;
/// certificates expiring within 14 days are warned about. Returns the diagnostics
/// and the number of valid pairs.
pub fn check_certs(config: &Config) -> (Vec<Diagnostic>, usize) {
    let mut diags = Vec::new();
    let Some(tls) = &config.tls else {
        return (diags, 0);
    };
    let Some(certs) = tls.certs.as_ref() else {
        return (diags, 0); // (r3) Kubernetes Secrets supply them
    };
    let file = config.path.display().to_string();
    let (pairs, errors) = match portier_certs::scan_dir(certs) {
        Ok(x) => x,
        Err(e) => {
            diags.push(Diagnostic::error(
                &file,
                tls.certs_pos,
                format!(
                    "cannot read the certificate directory {}: {e}",
                    certs.display()
                ),
            ));
            return (diags, 0);
        }
    };
    for (name, err) in &errors {
        diags.push(Diagnostic::error(
            &file,
            tls.certs_pos,
            format!("certificate pair `{name}`: {err}"),
        ));
    }
    let now = SystemTime::now();
    for p in &pairs {
        let left = p.seconds_left(now);
        if left <= 0.0 {
            diags.push(Diagnostic::warning(
                &file,
                tls.certs_pos,
                format!("certificate `{}` ({}) has expired", p.name, p.crt.display()),
            ));
        } else if left < EXPIRY_WARNING.as_secs_f64() {
            diags.push(Diagnostic::warning(
                &file,
                tls.certs_pos,
                format!(
                    "certificate `{}` ({}) expires in {:.1} days",
                    p.name,
                    p.crt.display(),
                    left / 86_400.0
                ),
            ));
        }
    }
    if let (Some(d), Some(pos)) = (&tls.default, tls.default_pos) {
        if !pairs.iter().any(|p| &p.name == d) {
            diags.push(Diagnostic::error(
                &file,
                pos,
                format!(
                    "`default` names `{d}`, but there is no valid {d}.crt + {d}.key pair in {}",
                    certs.display()
                ),
            ));
        }
    }
    // With ACME the directory may start empty: its certificates arrive there.
    if config.listen.https.is_some()
        && pairs.is_empty()
        && errors.is_empty()
        && tls.acme.is_none()
        && config.kubernetes.is_none()
    {
        diags.push(Diagnostic::error(
            &file,
            tls.certs_pos,
            format!(
                "no certificate pairs (NAME.crt + NAME.key) in {}",
                certs.display()
            ),
        ));
    }
    (diags, pairs.len())
}
