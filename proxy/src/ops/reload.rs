//! Configuration reload: parse and validate the whole file off the request path, then
//! swap the snapshot atomically. An invalid file leaves the running config in force.

use std::sync::Arc;

use portier_config::{load_file, render};

use crate::snapshot::Snapshot;
use crate::state::Shared;

/// The outcome of a reload attempt.
pub type ReloadResult = Result<String, String>;

/// Reloads the configuration file; returns the new version or the errors.
pub fn reload(shared: &Arc<Shared>) -> ReloadResult {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading, monotonic_now()]);
    let result = do_reload(shared);
    match &result {
        Ok(version) => {
            shared
                .metrics
                .config_reloads
                .with_label_values(&["ok"])
                .inc();
            if let Ok(mut st) = shared.reload_status.lock() {
                st.last_error = None;
            }
            tracing::info!(version = %version, "configuration reloaded");
        }
        Err(e) => {
            shared
                .metrics
                .config_reloads
                .with_label_values(&["error"])
                .inc();
            if let Ok(mut st) = shared.reload_status.lock() {
                st.last_error = Some(e.clone());
            }
            tracing::error!(errors = %e, "configuration reload failed; the previous configuration stays in force");
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    result
}

fn monotonic_now() -> sd_notify::NotifyState<'static> {
    sd_notify::NotifyState::monotonic_usec_now()
        .unwrap_or(sd_notify::NotifyState::Status("reloading"))
}

fn do_reload(shared: &Arc<Shared>) -> ReloadResult {
    let Some(path) = shared.config_path.clone() else {
        return Err(
            "this instance runs an embedded configuration (demo): nothing to reload".into(),
        );
    };
    let (config, warnings) = load_file(&path).map_err(|diags| render(&diags))?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let config = crate::ops::kubernetes::compose(shared, config);
    let old = shared.snapshot.load_full();
    if old.config.listen != config.listen {
        tracing::warn!("[listen] changed: new addresses, threads and drain apply after a restart");
    }
    if old.config.kubernetes != config.kubernetes {
        tracing::warn!("[kubernetes] changed: the provider follows the new table after a restart");
    }
    let version = config.version.clone();
    let access = config.log.access;
    swap_in(shared, config);
    shared.assets.reconfigure(&shared.snapshot.load().config);
    // Discovery may have updated the old snapshot while this one was built.
    let snap = shared.snapshot.load();
    for p in snap
        .pools
        .iter()
        .filter(|p| p.cfg.discover.is_some() || p.cfg.provided)
    {
        if let Some(m) = shared.discovered.get(&*p.name) {
            p.members.store(m.clone());
        }
    }
    shared.access_log.set_enabled(access);
    shared.forget_unused_backends();
    Ok(version)
}

/// Compiles `config` against the runtime state and swaps it in (one atomic store);
/// tells what follows reloads (WebSockets of tenants entering maintenance, the heap
/// trimmer).
pub fn swap_in(shared: &Shared, config: portier_config::Config) {
    let snapshot = Snapshot::build(
        config,
        &shared.registry,
        &shared.queues,
        &shared.metrics,
        &shared.discovered,
    );
    shared.snapshot.store(Arc::new(snapshot));
    shared.reloaded.send_modify(|n| *n += 1);
}
