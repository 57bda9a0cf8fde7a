//! The control side's background tasks over the whole process state: each follows
//! reloads and drives a feature through the narrow handle its module defines (the
//! cluster connection, ACME's [`Host`]), so those modules never see [`Shared`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use portier_config::Config;

use crate::acme::{AcmeState, Host};
use crate::state::Shared;
use portier_runtime::cluster::Cluster;

/// At the start of a drain (on the drain thread): this replica's announcement is
/// taken back, so the others' share while Redis is down no longer counts it.
pub fn leave_cluster(shared: &Shared) {
    let Some(c) = shared.cluster.load_full() else {
        return;
    };
    // The connection's driver runs on the control thread; this only waits for it.
    match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt.block_on(c.leave()),
        Err(e) => tracing::debug!(error = %e, "cluster: no runtime to leave with"),
    }
}

/// The background task (control thread): applies `[cluster]` changes from reloads and
/// keeps the connection, the announcement and the lease table up to date.
pub async fn cluster(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.draining.load(Ordering::Acquire) {
            // Going away (`leave` takes the announcement back): no more announcements;
            // the lease state serves the drain.
            return;
        }
        let want = shared.snapshot.load().config.cluster.clone();
        let current = shared.cluster.load_full();
        match (&want, &current) {
            (None, Some(_)) => {
                tracing::info!("cluster: [cluster] removed; limits are per replica");
                shared.cluster.store(None);
                shared.metrics.cluster_up.set(0);
            }
            (Some(w), c) if c.as_ref().map(|c| &c.cfg) != Some(w) => {
                shared.metrics.register_cluster_up();
                let fresh = Arc::new(Cluster::new(w.clone(), shared.metrics.cluster_up.clone()));
                shared.cluster.store(Some(fresh));
            }
            _ => {}
        }
        if let Some(c) = shared.cluster.load_full() {
            c.maintain().await;
        }
    }
}

/// ACME's scheduler runs against the process state through this handle.
impl Host for Shared {
    fn config(&self) -> Arc<Config> {
        self.snapshot.load().config.clone()
    }

    fn acme(&self) -> &AcmeState {
        &self.acme
    }

    fn certs(&self) -> &portier_certs::CertStore {
        &self.certs
    }

    fn order_done(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.metrics.acme_orders.with_label_values(&[result]).inc();
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn reload_certs(&self, only_if_changed: bool) {
        if only_if_changed {
            crate::ops::tls::reload_if_changed(self);
        } else {
            crate::ops::tls::reload_certs(self);
        }
    }
}
