//! Cluster mode (contract "Cluster", `[cluster]`): replicas that name the same Redis and
//! `key_prefix` share every `rate` limit (tenant classes and `login`).
//!
//! The shared state is one GCRA per limit in Redis, advanced atomically by a Lua script
//! (one round trip). A replica does not ask Redis for every request: it takes a *lease*
//! of up to ~50 ms of the rate (at most `burst` tokens) and spends it locally, and when
//! Redis says no it refuses locally until that many tokens are due again. Redis never
//! grants more tokens than the rate allows, so the replicas together can only admit
//! less than the configured rate, never more; what a lease costs in accuracy is the
//! tokens a replica holds unspent when its lease expires (`LEASE_TTL_MS`), which only
//! happens to a replica that stops receiving that traffic.
//!
//! Redis slower than `timeout`, or down: each replica falls back to local limits at
//! rate ÷ the replicas last seen (replicas announce themselves in a sorted set with an
//! expiry), logs it once, `portier_cluster_redis_up` becomes 0, and no request fails or
//! waits on Redis until the background task (on the control thread) reaches it again.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use portier_config::{Class, Rate};
use prometheus::IntGauge;
use redis::aio::MultiplexedConnection;

use crate::breaker::now_ms;

/// Leased tokens not spent within this are dropped (they were taken from the shared
/// budget, so dropping them can only under-admit).
const LEASE_TTL_MS: u64 = 500;
/// A lease covers about this much of the rate.
const LEASE_SPAN: Duration = Duration::from_millis(50);
/// How often a replica announces itself, and after how long an announcement lapses.
const ANNOUNCE_EVERY_MS: u64 = 2_000;
const REPLICA_TTL_MS: u64 = 10_000;
/// Lease state unused this long is forgotten.
const IDLE_LEASE_MS: u64 = 10_000;

/// One GCRA in Redis, taking up to `want` tokens at once.
/// KEYS[1]: the limit's key (its theoretical arrival time, µs of Redis' clock).
/// ARGV: emission interval (µs), burst, tokens wanted.
/// Returns {granted, ms until one more token is due, ms until `want` more are due}:
/// a replica that spends its lease asks again only then (a flood costs each replica
/// one call per lease, not a grant and a refusal).
/// Redis' own clock (`TIME`) is used, so replicas' clocks need not agree.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local avail = math.floor((now + tolerance - tat) / interval)
if avail < 1 then
  local one = tat + interval - tolerance - now
  local all = tat + want * interval - tolerance - now
  return {0, math.ceil(one / 1000), math.ceil(all / 1000)}
end
local n = math.min(want, avail)
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
local next = tat + want * interval - tolerance - now
if next < 0 then next = 0 end
return {n, math.ceil((tat + interval - tolerance - now) / 1000), math.ceil(next / 1000)}
"#;

/// A replica announces itself: KEYS[1] the sorted set of replicas, ARGV: this replica's
/// id, the announcement's lifetime (ms). Returns the replicas alive.
const ANNOUNCE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 3)
return redis.call('ZCARD', KEYS[1])
"#;

/// Which shared limit: a tenant's class, or a tenant's login budget for one address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Rate(Arc<str>, Class),
    Login(Arc<str>, IpAddr),
}

impl LimitKey {
    fn redis_key(&self, prefix: &str) -> String {
        match self {
            LimitKey::Rate(tenant, class) => format!("{prefix}rate:{tenant}:{}", class.as_str()),
            LimitKey::Login(tenant, ip) => format!("{prefix}login:{tenant}:{ip}"),
        }
    }
}

/// This replica's side of one shared limit.
struct Lease {
    redis_key: String,
    /// Tokens leased and not spent yet, valid until `expires_ms`.
    tokens: AtomicU32,
    expires_ms: AtomicU64,
    /// Redis refused: refuse locally until then.
    denied_until_ms: AtomicU64,
    /// The seconds a client refused meanwhile is told to wait.
    retry_after: AtomicU64,
    /// One Redis call per limit at a time; the others wait for its answer.
    fetch: tokio::sync::Mutex<()>,
    last_used: AtomicU64,
}

impl Lease {
    fn spend(&self, now: u64) -> bool {
        if self.expires_ms.load(Ordering::Acquire) <= now {
            return false;
        }
        self.tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1))
            .is_ok()
    }

    fn denied(&self, now: u64) -> Option<u64> {
        let until = self.denied_until_ms.load(Ordering::Acquire);
        (until > now).then(|| self.retry_after.load(Ordering::Relaxed).max(1))
    }
}

/// What the shared limit says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Refused; the seconds to wait.
    Deny(u64),
    /// Redis is unavailable: apply the local limit at rate ÷ this many replicas.
    Local(u32),
}

/// The Redis side of one `[cluster]` section.
pub struct Cluster {
    pub cfg: portier_config::Cluster,
    client: Option<redis::Client>,
    conn: ArcSwapOption<MultiplexedConnection>,
    up: AtomicBool,
    /// The state last logged (`None` before the first attempt).
    logged_up: std::sync::Mutex<Option<bool>>,
    replicas: AtomicU32,
    id: String,
    leases: DashMap<LimitKey, Arc<Lease>>,
    gcra: redis::Script,
    announce: redis::Script,
    last_announce_ms: AtomicU64,
    gauge: IntGauge,
}

impl Cluster {
    pub fn new(cfg: portier_config::Cluster, gauge: IntGauge) -> Cluster {
        let client = match redis::Client::open(cfg.redis.as_str()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "cluster: the redis URL is not usable; local limits only");
                None
            }
        };
        gauge.set(0);
        Cluster {
            client,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            logged_up: std::sync::Mutex::new(None),
            replicas: AtomicU32::new(1),
            // A restarted container may come back with the same host name and PID
            // while its old announcement lasts: the random part tells them apart.
            id: format!("{}:{:08x}", replica_id(), fastrand::u32(..)),
            leases: DashMap::new(),
            gcra: redis::Script::new(GCRA_LUA),
            announce: redis::Script::new(ANNOUNCE_LUA),
            last_announce_ms: AtomicU64::new(0),
            gauge,
            cfg,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The replicas last seen (at least 1).
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// One request under the shared limit `key` (`rate`, `burst`).
    pub async fn take(&self, key: LimitKey, rate: Rate, burst: u32) -> Verdict {
        if !self.is_up() {
            return Verdict::Local(self.replicas());
        }
        let now = now_ms();
        let lease = self.lease(key, now);
        if lease.spend(now) {
            return Verdict::Admit;
        }
        if let Some(wait) = lease.denied(now) {
            return Verdict::Deny(wait);
        }
        // One call to Redis per limit at a time: the others wait for its answer (at
        // most `timeout`) and look again.
        let _one = lease.fetch.lock().await;
        let now = now_ms();
        if lease.spend(now) {
            return Verdict::Admit;
        }
        if let Some(wait) = lease.denied(now) {
            return Verdict::Deny(wait);
        }
        let Some(conn) = self.conn.load_full().filter(|_| self.is_up()) else {
            return Verdict::Local(self.replicas());
        };
        let mut conn = (*conn).clone();
        let interval = rate.interval().as_micros().max(1) as u64;
        let burst = burst.max(1);
        let want = lease_size(rate, burst);
        let mut call = self.gcra.key(&lease.redis_key);
        call.arg(interval).arg(burst).arg(want);
        let answer = tokio::time::timeout(
            self.cfg.timeout,
            call.invoke_async::<(u32, u64, u64)>(&mut conn),
        )
        .await;
        let (granted, wait_one, wait_all) = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                self.down(&e.to_string());
                return Verdict::Local(self.replicas());
            }
            Err(_) => {
                self.down(&format!("no answer within {:?}", self.cfg.timeout));
                return Verdict::Local(self.replicas());
            }
        };
        let now = now_ms();
        if granted == 0 {
            let retry = wait_one.div_ceil(1000).max(1);
            lease.retry_after.store(retry, Ordering::Relaxed);
            lease
                .denied_until_ms
                .store(now + wait_all.max(1), Ordering::Release);
            return Verdict::Deny(retry);
        }
        // One of the granted tokens is this request's. Once the rest is spent, refuse
        // locally until `want` more are due (none is due earlier: Redis' state says so).
        lease.tokens.store(granted - 1, Ordering::Release);
        lease
            .expires_ms
            .store(now + LEASE_TTL_MS, Ordering::Release);
        if wait_all > 0 {
            let retry = wait_one.div_ceil(1000).max(1);
            lease.retry_after.store(retry, Ordering::Relaxed);
            lease
                .denied_until_ms
                .store(now + wait_all, Ordering::Release);
        }
        Verdict::Admit
    }

    fn lease(&self, key: LimitKey, now: u64) -> Arc<Lease> {
        let lease = match self.leases.get(&key) {
            Some(l) => l.clone(),
            None => {
                let redis_key = key.redis_key(&self.cfg.key_prefix);
                self.leases
                    .entry(key)
                    .or_insert_with(|| {
                        Arc::new(Lease {
                            redis_key,
                            tokens: AtomicU32::new(0),
                            expires_ms: AtomicU64::new(0),
                            denied_until_ms: AtomicU64::new(0),
                            retry_after: AtomicU64::new(1),
                            fetch: tokio::sync::Mutex::new(()),
                            last_used: AtomicU64::new(now),
                        })
                    })
                    .clone()
            }
        };
        lease.last_used.store(now, Ordering::Relaxed);
        lease
    }

    /// Redis failed or was too slow: local limits from now on, until the background
    /// task reaches it again. Logged once per outage.
    fn down(&self, why: &str) {
        self.up.store(false, Ordering::Release);
        self.conn.store(None);
        self.gauge.set(0);
        self.log_state(false, why);
    }

    fn log_state(&self, up: bool, why: &str) {
        let Ok(mut logged) = self.logged_up.lock() else {
            return;
        };
        if *logged == Some(up) {
            return;
        }
        *logged = Some(up);
        if up {
            tracing::info!(redis = %self.cfg.redis, replicas = self.replicas(), "cluster: Redis reached; rate limits are shared");
        } else {
            tracing::warn!(redis = %self.cfg.redis, error = %why, replicas = self.replicas(),
                "cluster: Redis unavailable; local limits at rate / replicas until it is back");
        }
    }

    /// The background side, every half second: (re)connect when down, announce this
    /// replica every two seconds (which also tells whether Redis answers in time), and
    /// forget idle lease state.
    pub async fn maintain(&self) {
        let now = now_ms();
        if !self.is_up()
            || now.saturating_sub(self.last_announce_ms.load(Ordering::Relaxed))
                >= ANNOUNCE_EVERY_MS
        {
            match self.reach().await {
                Ok(n) => {
                    self.last_announce_ms.store(now, Ordering::Relaxed);
                    self.replicas.store(n.max(1), Ordering::Relaxed);
                    self.up.store(true, Ordering::Release);
                    self.gauge.set(1);
                    self.log_state(true, "");
                }
                Err(why) => self.down(&why),
            }
        }
        self.leases.retain(|_, l| {
            now.saturating_sub(l.last_used.load(Ordering::Relaxed)) < IDLE_LEASE_MS
                || l.denied_until_ms.load(Ordering::Relaxed) > now
        });
    }

    /// A replica going away (draining) takes its announcement back, so the others'
    /// share while Redis is down is not computed with it (best effort: otherwise it
    /// lapses after `REPLICA_TTL_MS`).
    pub async fn leave(&self) {
        let Some(conn) = self.conn.load_full().filter(|_| self.is_up()) else {
            return;
        };
        let mut conn = (*conn).clone();
        let key = format!("{}replicas", self.cfg.key_prefix);
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(key).arg(&self.id);
        let left = tokio::time::timeout(self.cfg.timeout, cmd.query_async::<i64>(&mut conn)).await;
        if !matches!(left, Ok(Ok(1))) {
            tracing::debug!("cluster: could not take this replica's announcement back");
        }
    }

    /// Connects if needed and announces this replica; the replicas alive.
    async fn reach(&self) -> Result<u32, String> {
        let timeout = self.cfg.timeout;
        let conn = match self.conn.load_full() {
            Some(c) => c,
            None => {
                let client = self.client.as_ref().ok_or("the redis URL is not usable")?;
                // A connection gets a few round trips (handshake, maybe TLS) to set up.
                let setup = timeout.saturating_mul(4).max(Duration::from_millis(200));
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(setup))
                    .set_response_timeout(Some(timeout));
                let c = tokio::time::timeout(
                    setup,
                    client.get_multiplexed_async_connection_with_config(&config),
                )
                .await
                .map_err(|_| format!("no connection within {setup:?}"))?
                .map_err(|e| e.to_string())?;
                let c = Arc::new(c);
                self.conn.store(Some(c.clone()));
                c
            }
        };
        let mut conn = (*conn).clone();
        let key = format!("{}replicas", self.cfg.key_prefix);
        let mut call = self.announce.key(key);
        call.arg(&self.id).arg(REPLICA_TTL_MS);
        tokio::time::timeout(timeout, call.invoke_async::<u32>(&mut conn))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|e| e.to_string())
    }
}

/// Tokens taken from Redis at once: about `LEASE_SPAN` of the rate, at least 1, at
/// most the burst (so a lease never asks for more than the bucket can hold).
fn lease_size(rate: Rate, burst: u32) -> u32 {
    let span = (rate.per_second() * LEASE_SPAN.as_secs_f64()).ceil();
    (span as u32).clamp(1, burst.max(1))
}

/// One request under a `rate` limit, the one limiter interface of the tenant classes
/// and `login`: shared through `cluster` when it is set (the key built only then),
/// else — or while Redis is unavailable, at this replica's share — `local`. `Err`
/// holds the seconds the client should wait.
pub async fn check_rate(
    cluster: Option<&Cluster>,
    key: impl FnOnce() -> LimitKey,
    rate: Rate,
    burst: u32,
    local: impl FnOnce(Rate, u32) -> Result<(), u64>,
) -> Result<(), u64> {
    let Some(c) = cluster else {
        return local(rate, burst);
    };
    match c.take(key(), rate, burst).await {
        Verdict::Admit => Ok(()),
        Verdict::Deny(wait) => Err(wait),
        Verdict::Local(replicas) => {
            let (rate, burst) = share(rate, burst, replicas);
            local(rate, burst)
        }
    }
}

/// The seconds until `not_until`, as a `Retry-After` (at least 1).
pub fn retry_after<C: governor::clock::Clock>(
    not_until: &governor::NotUntil<C::Instant>,
    clock: &C,
) -> u64 {
    let wait = not_until.wait_time_from(clock.now());
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// A rate at `rate` ÷ `replicas` and a burst at `burst` ÷ `replicas` (at least 1): a
/// replica's share while Redis is unavailable.
pub fn share(rate: Rate, burst: u32, replicas: u32) -> (Rate, u32) {
    let n = replicas.max(1);
    (
        Rate {
            count: rate.count,
            per: rate.per.saturating_mul(n),
        },
        burst.div_ceil(n).max(1),
    )
}

/// This process among replicas (lock owners, announcements): `HOSTNAME:PID`.
pub fn replica_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}:{}", host.trim(), std::process::id())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        portier_config::parse_rate(s).unwrap()
    }

    #[test]
    fn leases_cover_about_50ms_of_the_rate_within_the_burst() {
        assert_eq!(lease_size(rate("5/s"), 10), 1);
        assert_eq!(lease_size(rate("10/min"), 5), 1);
        assert_eq!(lease_size(rate("200/s"), 50), 10);
        assert_eq!(lease_size(rate("1000/s"), 20), 20);
        assert_eq!(lease_size(rate("1000/s"), 0), 1);
    }

    #[test]
    fn a_replicas_share_divides_rate_and_burst() {
        let (r, b) = share(rate("10/s"), 10, 2);
        assert!((r.per_second() - 5.0).abs() < 1e-9);
        assert_eq!(b, 5);
        let (r, b) = share(rate("10/s"), 1, 3);
        assert!((r.per_second() - 10.0 / 3.0).abs() < 1e-9);
        assert_eq!(b, 1);
        let (r, b) = share(rate("10/s"), 4, 0);
        assert!((r.per_second() - 10.0).abs() < 1e-9);
        assert_eq!(b, 4);
    }

    #[test]
    fn keys_carry_the_prefix_tenant_and_class_or_address() {
        let t: Arc<str> = Arc::from("acme");
        assert_eq!(
            LimitKey::Rate(t.clone(), Class::Integration).redis_key("p:"),
            "p:rate:acme:integration"
        );
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            LimitKey::Login(t, ip).redis_key("p:"),
            "p:login:acme:203.0.113.9"
        );
    }

    #[test]
    fn a_lease_is_spent_once_per_token_and_not_after_it_expires() {
        let l = Lease {
            redis_key: String::new(),
            tokens: AtomicU32::new(2),
            expires_ms: AtomicU64::new(100),
            denied_until_ms: AtomicU64::new(0),
            retry_after: AtomicU64::new(3),
            fetch: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(0),
        };
        assert!(l.spend(50));
        assert!(l.spend(50));
        assert!(!l.spend(50));
        l.tokens.store(5, Ordering::Relaxed);
        assert!(!l.spend(100));
        assert_eq!(l.denied(10), None);
        l.denied_until_ms.store(20, Ordering::Relaxed);
        assert_eq!(l.denied(10), Some(3));
        assert_eq!(l.denied(20), None);
    }
}
