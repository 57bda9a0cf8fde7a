//! Automatic certificates (contract "ACME", `[tls.acme]`): every exact host of every
//! tenant that no pair in `certs` covers gets a certificate from the ACME directory,
//! renewed `renew_before` its expiry. The work runs on the control thread, one order
//! at a time; issued pairs are written into `certs` and served by the same store as
//! every other pair. Challenges (HTTP-01 answered on the `http` listener before any
//! redirect or tenant lookup, TLS-ALPN-01 through the SNI resolver) are files in the
//! directory, so any replica sharing it can answer them; a lock file per host makes
//! one replica order at a time (`store.rs`).

mod order;
pub mod store;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use portier_certs::CertStore;
use portier_config::{Acme, Config, HostPattern};
use store::Store;

const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";
/// How often the hosts are looked at.
const TICK: Duration = Duration::from_secs(2);
/// An order that takes longer is abandoned (and retried with backoff).
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// A host's lock outlives an order that hangs to its timeout.
const LOCK_LEASE: Duration = Duration::from_secs(600);
/// While another replica holds a host's lock, look again this often.
const LOCKED_RETRY: Duration = Duration::from_secs(5);
/// Failed orders are retried after 1, 2, 4, ... times this, at most `RETRY_MAX`
/// (`PORTIER_ACME_RETRY_SECONDS` overrides the base, for tests against a local CA).
const RETRY_BASE: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(6 * 3600);

/// What `/status` shows of one host.
#[derive(Clone, Debug, Default)]
struct HostStatus {
    state: &'static str,
    not_after: Option<SystemTime>,
    last_error: Option<String>,
    failures: u32,
    next_try: Option<Instant>,
}

/// ACME's runtime state (in `Shared`; survives reloads).
#[derive(Default)]
pub struct AcmeState {
    hosts: Mutex<BTreeMap<String, HostStatus>>,
    /// The account, for the directory it belongs to.
    account: tokio::sync::Mutex<Option<(String, instant_acme::Account)>>,
    /// Template tenants' hosts asked for at a handshake (`on_demand`).
    on_demand: Mutex<std::collections::BTreeSet<String>>,
    /// `on_demand_rate`, for the rate it was built with.
    on_demand_limit: Mutex<Option<(portier_config::Rate, governor::DefaultDirectRateLimiter)>>,
    /// Wakes the task (an on-demand host arrived).
    wake: tokio::sync::Notify,
}

impl AcmeState {
    /// A handshake named `host`, which no pair covers and a template tenant matches:
    /// it is ordered unless `rate` is spent (a host already asked for costs nothing).
    fn ask_on_demand(&self, host: &str, rate: portier_config::Rate) -> bool {
        let mut asked = self.on_demand.lock().unwrap_or_else(|e| e.into_inner());
        if asked.contains(host) {
            return true;
        }
        let mut limit = self
            .on_demand_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if limit.as_ref().is_none_or(|(r, _)| *r != rate) {
            let quota = governor::Quota::with_period(rate.interval().max(Duration::from_millis(1)))
                .map(|q| {
                    q.allow_burst(
                        std::num::NonZeroU32::new(rate.count).unwrap_or(std::num::NonZeroU32::MIN),
                    )
                });
            *limit = quota.map(|q| (rate, governor::RateLimiter::direct(q)));
        }
        let allowed = limit.as_ref().is_some_and(|(_, l)| l.check().is_ok());
        if allowed {
            asked.insert(host.to_string());
            self.wake.notify_one();
        }
        allowed
    }

    fn with_hosts<T>(&self, f: impl FnOnce(&mut BTreeMap<String, HostStatus>) -> T) -> T {
        let mut g = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// `/status` `acme`.
    pub fn status_json(&self) -> serde_json::Value {
        let hosts: Vec<serde_json::Value> = self.with_hosts(|h| {
            h.iter()
                .map(|(host, s)| {
                    serde_json::json!({
                        "host": host,
                        "state": s.state,
                        "not_after": s.not_after.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                        "last_error": s.last_error,
                    })
                })
                .collect()
        });
        serde_json::json!({ "hosts": hosts })
    }
}

/// The key authorization for an HTTP-01 validation request for `path` on the `http`
/// listener, when `[tls.acme]` is set and ACME published the token. Tokens ACME did not
/// publish pass on (an operator's own ACME client behind portier still works).
pub fn http01_answer(config: &Config, path: &str) -> Option<Vec<u8>> {
    let tls = config.tls.as_ref().filter(|t| t.acme.is_some())?;
    let token = path.strip_prefix(CHALLENGE_PATH)?;
    Store::new(tls.certs.as_ref()?).http01(token)
}

/// What the ACME scheduler needs of the process it runs in: the narrow handles, not the
/// process state (which implements this on the control side).
pub trait Host: Send + Sync + 'static {
    /// The configuration in force.
    fn config(&self) -> Arc<Config>;
    fn acme(&self) -> &AcmeState;
    fn certs(&self) -> &CertStore;
    /// Counts an order (`portier_acme_orders_total{result}`).
    fn order_done(&self, ok: bool);
    /// The process is draining: the scheduler stops.
    fn draining(&self) -> bool;
    /// Reloads the certificate directory (or only when its files changed).
    fn reload_certs(&self, only_if_changed: bool);
}

/// The certificate store's hook for handshakes whose SNI no pair covers: with
/// `on_demand`, a host that a template tenant matches (and only such a host) is asked
/// for, within `on_demand_rate`. That handshake gets the `default` certificate (or
/// fails); later ones get the new certificate once it is issued.
pub fn on_demand_hook<E: Host>(env: &Arc<E>) -> portier_certs::MissHook {
    let weak = Arc::downgrade(env);
    Box::new(move |host: &str| {
        let Some(env) = weak.upgrade() else {
            return;
        };
        let config = env.config();
        let Some(acme) = config.acme().filter(|a| a.on_demand) else {
            return;
        };
        if !store::plain_host(host)
            || config
                .hosts
                .lookup(host)
                .is_none_or(|m| m.captured.is_none())
        {
            return;
        }
        if !env.acme().ask_on_demand(host, acme.on_demand_rate) {
            tracing::warn!(
                host,
                "acme: on_demand_rate spent; no certificate ordered for this host now"
            );
        }
    })
}

/// The hosts to hold certificates for: every exact host of every tenant, and with
/// `on_demand` the template tenants' hosts asked for at a handshake or issued before
/// (so they are renewed), while a template tenant still matches them.
fn wanted_hosts(config: &Config, acme: &AcmeState, store: &Store) -> Vec<String> {
    let mut hosts = exact_hosts(config);
    if config
        .tls
        .as_ref()
        .and_then(|t| t.acme.as_ref())
        .is_some_and(|a| a.on_demand)
    {
        let asked: Vec<String> = acme
            .on_demand
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        for h in asked.into_iter().chain(store.issued_hosts()) {
            if config
                .hosts
                .lookup(&h)
                .is_some_and(|m| m.captured.is_some())
            {
                hosts.push(h);
            }
        }
        hosts.sort();
        hosts.dedup();
    }
    hosts
}

/// The exact hosts of every tenant, sorted and without duplicates.
fn exact_hosts(config: &Config) -> Vec<String> {
    let mut hosts: Vec<String> = config
        .tenants
        .iter()
        .flat_map(|t| t.hosts.iter())
        .filter_map(|h| match h {
            HostPattern::Exact(h) if store::plain_host(h) => Some(h.clone()),
            _ => None,
        })
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

fn retry_base() -> Duration {
    std::env::var("PORTIER_ACME_RETRY_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(RETRY_BASE)
}

/// The wait after `failures` failed orders in a row.
fn backoff(failures: u32, base: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(RETRY_MAX)
}

/// The background task (control thread): every `TICK`, orders what is missing or due.
pub async fn run<E: Host>(env: Arc<E>) {
    let owner = portier_runtime::cluster::replica_id();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = env.acme().wake.notified() => {}
        }
        if env.draining() {
            return;
        }
        let config = env.config();
        let Some(tls) = config.tls.as_ref() else {
            continue;
        };
        let Some(cfg) = tls.acme.as_ref() else {
            env.certs().set_alpn_challenge_dir(None);
            env.acme().with_hosts(|h| h.clear());
            continue;
        };
        // ACME is refused without `certs` (its certificates are written there).
        let Some(dir) = tls.certs.as_ref() else {
            continue;
        };
        let store = Store::new(dir);
        env.certs().set_alpn_challenge_dir(Some(store.alpn_dir()));
        let wanted = wanted_hosts(&config, env.acme(), &store);
        env.acme()
            .with_hosts(|h| h.retain(|host, _| wanted.binary_search(host).is_ok()));
        for host in &wanted {
            visit(&*env, cfg, &store, host, owner).await;
            if env.draining() {
                return;
            }
        }
    }
}

/// One host: nothing to do (an operator's pair, a valid certificate, a retry not due
/// yet), or an order.
async fn visit<E: Host>(env: &E, cfg: &Acme, store: &Store, host: &str, owner: &str) {
    let now = SystemTime::now();
    let ours = {
        let index = env.certs().index();
        match index.covering(host) {
            // Another pair covers it (a wildcard, another name): ACME stays out.
            Some(p) if p.name != host || !store.is_issued(host) => {
                drop(index);
                env.acme().with_hosts(|h| h.remove(host));
                return;
            }
            Some(p) => Some(p.not_after),
            None => None,
        }
    };
    if ours.is_none() && store.operator_pair(host) {
        // An operator's files that do not load (yet): never overwritten.
        env.acme().with_hosts(|h| h.remove(host));
        return;
    }
    let due = match ours {
        Some(not_after) => not_after
            .duration_since(now)
            .map(|left| left < cfg.renew_before)
            .unwrap_or(true),
        None => true,
    };
    let retry_at = env.acme().with_hosts(|h| {
        let s = h.entry(host.to_string()).or_default();
        if let Some(na) = ours {
            s.not_after = Some(na);
        }
        if !due {
            s.state = "valid";
            s.last_error = None;
            s.failures = 0;
        } else if s.state.is_empty() {
            s.state = "pending";
        }
        s.next_try
    });
    if !due || retry_at.is_some_and(|t| t > Instant::now()) {
        return;
    }
    let lock = match store.try_lock(host, owner, LOCK_LEASE) {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            // Another replica is ordering it; its pair will appear in the directory.
            env.acme().with_hosts(|h| {
                let s = h.entry(host.to_string()).or_default();
                s.state = if ours.is_some() { "valid" } else { "pending" };
                s.next_try = Some(Instant::now() + LOCKED_RETRY);
            });
            return;
        }
        Err(e) => {
            failed(env, host, &e.to_string());
            return;
        }
    };
    // Another replica may have finished while this one waited for the lock.
    env.reload_certs(true);
    if ours.is_none() && env.certs().index().covering(host).is_some() {
        return;
    }
    let renewal = ours.is_some();
    tracing::info!(host, renewal, directory = %cfg.directory, "acme: ordering a certificate");
    let result = tokio::time::timeout(ORDER_TIMEOUT, order_for(env, cfg, store, host, owner))
        .await
        .unwrap_or(Err(order::OrderError::Timeout(ORDER_TIMEOUT)));
    match result {
        Ok(()) => {
            drop(lock);
            env.reload_certs(false);
            let not_after = env.certs().index().get(host).map(|p| p.not_after);
            env.order_done(true);
            let immediate = not_after
                .and_then(|na| na.duration_since(SystemTime::now()).ok())
                .is_some_and(|left| left < cfg.renew_before);
            env.acme().with_hosts(|h| {
                let s = h.entry(host.to_string()).or_default();
                s.state = "valid";
                s.not_after = not_after;
                s.last_error = None;
                s.failures = 0;
                // A CA whose certificates are shorter than `renew_before` would be asked
                // again at once: wait half the lifetime instead.
                s.next_try = immediate.then(|| {
                    let left = not_after
                        .and_then(|na| na.duration_since(SystemTime::now()).ok())
                        .unwrap_or_default();
                    Instant::now() + left / 2
                });
            });
            tracing::info!(host, renewal, not_after = ?not_after.map(humantime::format_rfc3339_seconds), "acme: certificate issued");
            if immediate {
                tracing::warn!(
                    host,
                    "acme: the certificate's lifetime is shorter than renew_before"
                );
            }
        }
        Err(e) => {
            drop(lock);
            failed(env, host, &e.to_string());
        }
    }
}

async fn order_for<E: Host>(
    env: &E,
    cfg: &Acme,
    store: &Store,
    host: &str,
    owner: &str,
) -> Result<(), order::OrderError> {
    let account = {
        let mut cached = env.acme().account.lock().await;
        match cached.as_ref().filter(|(dir, _)| *dir == cfg.directory) {
            Some((_, a)) => a.clone(),
            None => {
                // One replica creates the account; the others read it once written.
                let mut lock = None;
                for _ in 0..20 {
                    lock = store.try_lock("account", owner, LOCK_LEASE)?;
                    if lock.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                let a = order::account(cfg, store).await?;
                drop(lock);
                *cached = Some((cfg.directory.clone(), a.clone()));
                a
            }
        }
    };
    let (chain, key) = order::obtain(&account, host, cfg.challenge, store).await?;
    store.write_pair(host, &chain, &key)?;
    Ok(())
}

fn failed<E: Host>(env: &E, host: &str, error: &str) {
    env.order_done(false);
    let wait = env.acme().with_hosts(|h| {
        let s = h.entry(host.to_string()).or_default();
        s.failures += 1;
        s.state = "failed";
        s.last_error = Some(error.to_string());
        let wait = backoff(s.failures, retry_base());
        s.next_try = Some(Instant::now() + wait);
        wait
    });
    tracing::warn!(host, error, retry_in = ?wait, "acme: order failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let base = Duration::from_secs(60);
        assert_eq!(backoff(1, base), Duration::from_secs(60));
        assert_eq!(backoff(2, base), Duration::from_secs(120));
        assert_eq!(backoff(5, base), Duration::from_secs(960));
        assert_eq!(backoff(30, base), RETRY_MAX);
        assert_eq!(backoff(0, base), Duration::from_secs(60));
    }

    #[test]
    fn only_exact_hosts_are_ordered() {
        let text = "[listen]\nhttp = \"127.0.0.1:80\"\n[pools.p]\nhttp = [\"127.0.0.1:8069\"]\n\
            [tenants.a]\nhosts = [\"b.test\", \"a.test\"]\npool = \"p\"\n\
            [tenants.t]\nhosts = [\"{tenant}.saas.test\", \"a.test.\"]\npool = \"p\"\n";
        // Two tenants claiming one host is an error; use distinct ones.
        let text = text.replace("\"a.test.\"", "\"c.test\"");
        let (c, _) = portier_config::load_str(&text, std::path::Path::new("/x.toml")).unwrap();
        assert_eq!(exact_hosts(&c), ["a.test", "b.test", "c.test"]);
    }
}
