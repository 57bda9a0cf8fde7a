//! Watching the configuration file and the certificate directory (the `notify`
//! crate, inotify on Linux). The parent directory of the config file is watched, not
//! the file itself, so editors that write a temporary file and rename it over the
//! original — and Kubernetes' ConfigMap symlink swaps — are seen. Events are
//! debounced by the control plane; a reload only happens when the file's content
//! actually changed.

use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Config,
    Certs,
}

/// Keeps the watcher alive; dropping it stops watching.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Starts watching `config` (through its directory) and `certs`. Events are sent on
/// `tx`. Returns `None` (and logs) if the platform watcher cannot start; the
/// periodic checks still catch changes then.
pub fn start(
    config: &Path,
    certs: Option<&Path>,
    tx: mpsc::UnboundedSender<Change>,
) -> Option<FileWatch> {
    let config_dir = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let config_name = config.file_name().map(|n| n.to_os_string());
    let certs_dir = certs.map(Path::to_path_buf);
    let (cd, cn, ct) = (config_dir.clone(), config_name.clone(), certs_dir.clone());
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        for path in &event.paths {
            let parent = path.parent();
            if ct
                .as_deref()
                .is_some_and(|c| parent == Some(c) || path == c)
            {
                let _ = tx.send(Change::Certs);
            }
            // The file itself, or anything else in its directory that may be what the
            // file's symlink points through (e.g. Kubernetes' `..data`).
            if parent == Some(cd.as_path()) {
                let own = path.file_name().map(|n| n.to_os_string()) == cn;
                let hidden = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(".."));
                if own || hidden {
                    let _ = tx.send(Change::Config);
                }
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP or POST /reload");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&config_dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %config_dir.display(), error = %e, "cannot watch the configuration directory");
    }
    if let Some(c) = &certs_dir {
        if let Err(e) = watcher.watch(c, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %c.display(), error = %e, "cannot watch the certificate directory");
        }
    }
    Some(FileWatch { _watcher: watcher })
}

/// Hex SHA-256 of a file (to compare with the loaded config's version).
pub fn file_version(path: &Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|bytes| portier_config::sha256_hex(&bytes))
}
