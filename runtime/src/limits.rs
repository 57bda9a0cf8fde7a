//! Per-tenant, per-class limits on integration (and optionally interactive) traffic:
//! a GCRA rate limiter (governor) and an in-flight counter, keyed by the tenant's
//! effective name, so each `{tenant}` of a template has its own budget.
//!
//! Hot path: exact-host tenants reach their limiter through their snapshot entry (a
//! `OnceLock`, no lock); template tenants through a sharded map read. After a
//! tenant's first request no allocation happens. Limiters are long-lived runtime
//! state: they survive reloads while the tenant exists; a changed rate or burst
//! rebuilds the GCRA state at once. Limiters idle long enough to have refilled are
//! evicted, bounding memory.
//!
//! The login limits (`login`) are here too: per client address and tenant, on the login
//! paths (`edge::login` decides which requests they apply to).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use portier_config::{Class, Limit, LoginLimit, Rate};

use crate::breaker::now_ms;
use crate::cluster::{check_rate, retry_after, Cluster, LimitKey};
use crate::telemetry::Refusal;

/// A refusal with the seconds the client should wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub why: Refusal,
    pub retry_after: u64,
}

struct Gcra {
    rate: Rate,
    burst: u32,
    limiter: DefaultDirectRateLimiter,
}

/// The limiter of one tenant and one class.
#[derive(Default)]
pub struct ClassLimiter {
    gcra: ArcSwapOption<Gcra>,
    inflight: AtomicU32,
}

impl ClassLimiter {
    fn gcra_for(&self, rate: Rate, burst: u32) -> Option<Arc<Gcra>> {
        if let Some(g) = self.gcra.load_full() {
            if g.rate == rate && g.burst == burst {
                return Some(g);
            }
        }
        let interval = rate.interval().max(Duration::from_nanos(1));
        let quota = Quota::with_period(interval)?.allow_burst(NonZeroU32::new(burst.max(1))?);
        let fresh = Arc::new(Gcra {
            rate,
            burst,
            limiter: RateLimiter::direct(quota),
        });
        self.gcra.store(Some(fresh.clone()));
        Some(fresh)
    }

    /// Takes a concurrency slot under `limit` (if it has one); `Ok(true)` when taken.
    fn acquire(&self, limit: &Limit) -> Result<bool, Refused> {
        let Some(max) = limit.concurrency else {
            return Ok(false);
        };
        let now = self.inflight.fetch_add(1, Ordering::AcqRel) + 1;
        if now > max {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused {
                why: Refusal::ConcurrencyLimited,
                retry_after: 1,
            });
        }
        Ok(true)
    }

    /// One request under the local GCRA at `rate` and `burst`; `Err` holds the
    /// seconds to wait.
    fn check_rate(&self, rate: Rate, burst: u32) -> Result<(), u64> {
        let Some(g) = self.gcra_for(rate, burst) else {
            return Ok(());
        };
        g.limiter
            .check()
            .map_err(|not_until| retry_after(&not_until, g.limiter.clock()))
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Acquire)
    }
}

/// The limiters of one tenant.
#[derive(Default)]
pub struct TenantLimiter {
    integration: ClassLimiter,
    interactive: ClassLimiter,
    last_used: AtomicU64,
}

impl TenantLimiter {
    fn class(&self, class: Class) -> Option<&ClassLimiter> {
        match class {
            Class::Integration => Some(&self.integration),
            Class::Interactive => Some(&self.interactive),
            Class::Static | Class::Longpolling => None,
        }
    }

    /// Admits a request of `class` under `limit`: its concurrency slot first (held by
    /// the returned permit until it is dropped), then its rate, local or shared through
    /// `cluster` (keyed by the tenant's effective name).
    pub async fn admit(
        self: &Arc<Self>,
        class: Class,
        limit: &Limit,
        cluster: Option<&Cluster>,
        tenant: &Arc<str>,
    ) -> Result<Option<Permit>, Refused> {
        let Some(cl) = self.class(class) else {
            return Ok(None);
        };
        self.last_used.store(now_ms(), Ordering::Relaxed);
        let permit = cl.acquire(limit)?.then(|| Permit {
            limiter: self.clone(),
            class,
        });
        // On a refusal below, the permit drops and gives the slot back.
        let Some(rate) = limit.rate else {
            return Ok(permit);
        };
        let key = || LimitKey::Rate(tenant.clone(), class);
        check_rate(cluster, key, rate, limit.burst, |r, b| cl.check_rate(r, b))
            .await
            .map_err(|retry_after| Refused {
                why: Refusal::RateLimited,
                retry_after,
            })?;
        Ok(permit)
    }

    fn idle(&self) -> bool {
        self.integration.inflight() == 0 && self.interactive.inflight() == 0
    }
}

/// A concurrency slot, released when dropped (at the end of the request).
pub struct Permit {
    limiter: Arc<TenantLimiter>,
    class: Class,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(cl) = self.limiter.class(self.class) {
            cl.inflight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// All tenants' limiters, by effective tenant name.
#[derive(Default)]
pub struct Limits {
    map: DashMap<Box<str>, Arc<TenantLimiter>>,
}

impl Limits {
    pub fn get(&self, tenant: &str) -> Arc<TenantLimiter> {
        if let Some(l) = self.map.get(tenant) {
            return l.clone();
        }
        self.map
            .entry(Box::from(tenant))
            .or_insert_with(|| {
                Arc::new(TenantLimiter {
                    last_used: AtomicU64::new(now_ms()),
                    ..Default::default()
                })
            })
            .clone()
    }

    /// Tenants with a limiter now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drops limiters unused for `idle_for` with nothing in flight: their buckets have
    /// refilled, so a fresh limiter is the same. Returns how many went.
    pub fn evict_idle(&self, idle_for: Duration) -> usize {
        let cutoff = now_ms().saturating_sub(idle_for.as_millis() as u64);
        let before = self.map.len();
        self.map
            .retain(|_, l| l.last_used.load(Ordering::Relaxed) > cutoff || !l.idle());
        before - self.map.len()
    }
}

/// The JSON body of a 429.
pub fn refusal_body(r: &Refused, tenant: &str, class: Class) -> String {
    let mut out = String::with_capacity(96);
    out.push_str("{\"error\":\"");
    out.push_str(r.why.as_str());
    out.push_str("\",\"tenant\":");
    crate::access_log::push_json_str(&mut out, tenant);
    out.push_str(",\"class\":\"");
    out.push_str(class.as_str());
    out.push_str("\",\"retry_after\":");
    out.push_str(&r.retry_after.to_string());
    out.push('}');
    out
}

type LoginKey = (Arc<str>, IpAddr);

/// Login limiters: one keyed GCRA (governor) per distinct `login` setting, keyed by
/// the tenant's effective name and the client address. Long-lived runtime state: it
/// survives reloads; a changed `login` setting starts a fresh limiter for it.
#[derive(Default)]
pub struct LoginLimits {
    by_limit: DashMap<(u32, Duration, u32), Arc<DefaultKeyedRateLimiter<LoginKey>>>,
}

impl LoginLimits {
    fn limiter(&self, limit: &LoginLimit) -> Option<Arc<DefaultKeyedRateLimiter<LoginKey>>> {
        let key = (limit.rate.count, limit.rate.per, limit.burst);
        if let Some(l) = self.by_limit.get(&key) {
            return Some(l.clone());
        }
        let interval = limit.rate.interval().max(Duration::from_nanos(1));
        let quota = Quota::with_period(interval)?.allow_burst(NonZeroU32::new(limit.burst.max(1))?);
        Some(
            self.by_limit
                .entry(key)
                .or_insert_with(|| Arc::new(RateLimiter::keyed(quota)))
                .clone(),
        )
    }

    /// One login attempt of `ip` at `tenant`; `Err` holds the seconds to wait.
    pub fn check(&self, limit: &LoginLimit, tenant: &Arc<str>, ip: IpAddr) -> Result<(), u64> {
        let Some(l) = self.limiter(limit) else {
            return Ok(());
        };
        l.check_key(&(tenant.clone(), ip))
            .map_err(|not_until| retry_after(&not_until, l.clock()))
    }

    /// Forgets addresses whose budget has refilled (a fresh entry is the same), so a
    /// flood from many addresses costs memory only while their budgets refill.
    pub fn evict_idle(&self) {
        for l in self.by_limit.iter() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Addresses with a partly spent budget.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_limit.iter().map(|l| l.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    impl TenantLimiter {
        /// `admit` without a cluster: never waits, so it completes on its first poll.
        fn admit_local(
            self: &Arc<Self>,
            class: Class,
            l: &Limit,
        ) -> Result<Option<Permit>, Refused> {
            let t: Arc<str> = Arc::from("t");
            self.admit(class, l, None, &t)
                .now_or_never()
                .expect("a local admit does not wait")
        }
    }

    fn limit(rate: Option<&str>, burst: u32, concurrency: Option<u32>) -> Limit {
        Limit {
            rate: rate.map(|r| portier_config::parse_rate(r).unwrap()),
            burst,
            concurrency,
        }
    }

    #[test]
    fn rate_allows_the_burst_then_refuses_with_retry_after() {
        let limits = Limits::default();
        let t = limits.get("acme");
        let l = limit(Some("1/h"), 3, None);
        for _ in 0..3 {
            assert!(t.admit_local(Class::Integration, &l).is_ok());
        }
        let r = t.admit_local(Class::Integration, &l).err().unwrap();
        assert_eq!(r.why, Refusal::RateLimited);
        assert!(
            r.retry_after > 1000 && r.retry_after <= 3600,
            "{}",
            r.retry_after
        );
    }

    #[test]
    fn concurrency_holds_slots_until_permits_drop() {
        let limits = Limits::default();
        let t = limits.get("acme");
        let l = limit(None, 1, Some(2));
        let a = t.admit_local(Class::Integration, &l).unwrap();
        let b = t.admit_local(Class::Integration, &l).unwrap();
        let r = t.admit_local(Class::Integration, &l).err().unwrap();
        assert_eq!(
            r,
            Refused {
                why: Refusal::ConcurrencyLimited,
                retry_after: 1
            }
        );
        drop(a);
        let c = t.admit_local(Class::Integration, &l).unwrap();
        assert!(c.is_some());
        drop((b, c));
        assert_eq!(t.integration.inflight(), 0);
    }

    #[test]
    fn a_rate_refusal_gives_back_the_concurrency_slot() {
        let limits = Limits::default();
        let t = limits.get("acme");
        let l = limit(Some("1/h"), 1, Some(5));
        let _p = t.admit_local(Class::Integration, &l).unwrap();
        assert!(t.admit_local(Class::Integration, &l).is_err());
        assert_eq!(t.integration.inflight(), 1);
    }

    #[test]
    fn classes_and_tenants_are_separate() {
        let limits = Limits::default();
        let l = limit(Some("1/h"), 1, None);
        let a = limits.get("a");
        assert!(a.admit_local(Class::Integration, &l).is_ok());
        assert!(a.admit_local(Class::Integration, &l).is_err());
        assert!(a.admit_local(Class::Interactive, &l).is_ok());
        assert!(limits.get("b").admit_local(Class::Integration, &l).is_ok());
        // Static and longpolling are never limited.
        for _ in 0..5 {
            assert!(a.admit_local(Class::Static, &l).is_ok());
        }
        assert!(Arc::ptr_eq(&a, &limits.get("a")));
    }

    #[test]
    fn changed_limits_apply_at_once_and_unchanged_keep_state() {
        let limits = Limits::default();
        let t = limits.get("acme");
        let l1 = limit(Some("1/h"), 1, None);
        assert!(t.admit_local(Class::Integration, &l1).is_ok());
        assert!(t.admit_local(Class::Integration, &l1).is_err());
        // Same limit: still exhausted.
        assert!(t
            .admit_local(Class::Integration, &limit(Some("1/h"), 1, None))
            .is_err());
        // Raised: fresh budget.
        let l2 = limit(Some("1/h"), 3, None);
        assert!(t.admit_local(Class::Integration, &l2).is_ok());
    }

    #[test]
    fn idle_limiters_are_evicted() {
        let limits = Limits::default();
        let l = limit(None, 1, Some(1));
        let busy = limits.get("busy");
        let _permit = busy.admit_local(Class::Integration, &l).unwrap();
        limits.get("idle");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(limits.evict_idle(Duration::from_millis(10)), 1);
        assert_eq!(limits.len(), 1);
    }

    #[test]
    fn refusal_json() {
        let body = refusal_body(
            &Refused {
                why: Refusal::RateLimited,
                retry_after: 3,
            },
            "acme",
            Class::Integration,
        );
        assert_eq!(
            body,
            r#"{"error":"rate_limited","tenant":"acme","class":"integration","retry_after":3}"#
        );
    }

    #[test]
    fn login_budget_per_address_and_tenant_and_idle_entries_go() {
        let limits = LoginLimits::default();
        let limit = LoginLimit {
            rate: portier_config::parse_rate("10/min").unwrap(),
            burst: 2,
        };
        let acme: Arc<str> = Arc::from("acme");
        let other: Arc<str> = Arc::from("other");
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "203.0.113.2".parse().unwrap();
        assert!(limits.check(&limit, &acme, a).is_ok());
        assert!(limits.check(&limit, &acme, a).is_ok());
        let wait = limits.check(&limit, &acme, a).unwrap_err();
        assert!((1..=6).contains(&wait), "{wait}");
        assert!(limits.check(&limit, &acme, b).is_ok());
        assert!(limits.check(&limit, &other, a).is_ok());

        // A flood from 100 000 addresses at a fast-refilling limit: every entry goes
        // once its budget has refilled.
        let fast = LoginLimit {
            rate: portier_config::parse_rate("1000/s").unwrap(),
            burst: 1,
        };
        for i in 0..100_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(limits.check(&fast, &acme, ip).is_ok());
        }
        assert!(limits.len() >= 100_000);
        std::thread::sleep(Duration::from_millis(20));
        limits.evict_idle();
        // The slow limit's spent budgets stay; the fast one's are gone.
        assert!(limits.len() <= 3, "{}", limits.len());
        assert!(limits.check(&limit, &acme, a).is_err());
    }
}
