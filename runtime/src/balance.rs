//! Backend selection within a pool ("Routing", step 3).
//!
//! - Tenant spread: a tenant's backends are the `spread` HTTP backends with the
//!   highest rendezvous score for the tenant (highest-random-weight hashing), so a
//!   tenant stays on a few warm workers and a backend joining or leaving moves only
//!   the tenants that rank it.
//! - Sessions: among the tenant's usable backends, a `session_id` goes to the one
//!   with the highest score for the session: the same backend while it is up, and
//!   only the sessions on a backend that leaves move.
//! - Without a session: least in-flight among the tenant's usable backends, ties
//!   round-robin.
//! - Spill: if none of the tenant's backends is usable (down, breaker open, already
//!   tried), the pool's other usable backends serve it.
//!
//! Scores are computed on the fly (two multiplications per backend): no allocation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::backend::Backend;
use crate::breaker::Admit;
use crate::hash::score;

/// The value of the `session_id` cookie, if any.
pub fn session_id<'a>(cookies: impl Iterator<Item = &'a [u8]>) -> Option<&'a [u8]> {
    for header in cookies {
        for part in header.split(|&b| b == b';') {
            let part = part.trim_ascii();
            if let Some(v) = part.strip_prefix(b"session_id=") {
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// What to pick by.
pub struct Want<'a> {
    /// How many backends the tenant is pinned to; 0 = all.
    pub spread: usize,
    pub tenant: u64,
    pub session: Option<u64>,
    /// Backends already tried by this request.
    pub exclude: &'a [SocketAddr],
    pub now: u64,
    pub open_for: u64,
}

/// The `k` backends of a list with the highest score for a key (their hashes).
/// Found with `k` scans, without allocating for `k <= 16`.
struct TopK {
    inline: [u64; 16],
    heap: Vec<u64>,
    len: usize,
}

impl TopK {
    fn new(list: &[Arc<Backend>], key: u64, k: usize) -> TopK {
        let mut t = TopK {
            inline: [0; 16],
            heap: Vec::new(),
            len: 0,
        };
        let mut bound = u64::MAX;
        let mut bound_hash = u64::MAX;
        for _ in 0..k.min(list.len()) {
            // The best score strictly below the last one taken (ties broken by hash).
            let mut best: Option<(u64, u64)> = None;
            for b in list {
                let s = score(key, b.hash);
                let below = (s, b.hash) < (bound, bound_hash);
                if below && best.is_none_or(|x| (s, b.hash) > x) {
                    best = Some((s, b.hash));
                }
            }
            let Some((s, h)) = best else { break };
            (bound, bound_hash) = (s, h);
            if t.len < t.inline.len() {
                t.inline[t.len] = h;
            } else {
                if t.heap.is_empty() {
                    t.heap.extend_from_slice(&t.inline);
                }
                t.heap.push(h);
            }
            t.len += 1;
        }
        t
    }

    fn contains(&self, hash: u64) -> bool {
        if self.heap.is_empty() {
            self.inline[..self.len].contains(&hash)
        } else {
            self.heap.contains(&hash)
        }
    }
}

#[cfg(test)]
fn in_top(list: &[Arc<Backend>], b: &Backend, key: u64, k: usize) -> bool {
    TopK::new(list, key, k).contains(b.hash)
}

fn usable(b: &Backend, w: &Want<'_>) -> bool {
    b.health.is_up() && b.breaker.peek(w.now, w.open_for) && !w.exclude.contains(&b.addr())
}

/// Picks a backend from `list` (a pool's http or longpolling members).
pub fn pick(list: &[Arc<Backend>], rr: &AtomicUsize, w: &Want<'_>) -> Option<Arc<Backend>> {
    if list.is_empty() {
        return None;
    }
    let spread = if w.spread == 0 || w.spread >= list.len() {
        list.len()
    } else {
        w.spread
    };
    let all = spread == list.len();
    let top = if all {
        None
    } else {
        Some(TopK::new(list, w.tenant, spread))
    };
    let in_set = |b: &Backend| top.as_ref().is_none_or(|t| t.contains(b.hash));
    // Two passes: the tenant's own backends, then (spill) every other one.
    for spill in [false, true] {
        if spill && all {
            break;
        }
        // A few rounds in case a breaker's trial is taken concurrently.
        for _ in 0..3 {
            let candidate = match w.session {
                Some(key) => best_by_score(list, key, |b| in_set(b) != spill && usable(b, w)),
                None => least_inflight(list, rr, |b| in_set(b) != spill && usable(b, w)),
            };
            let Some(b) = candidate else { break };
            // A half-open breaker's trial is admitted like a closed one: the
            // attempt's outcome (record_outcome) closes or re-opens it.
            match b.breaker.admit(w.now, w.open_for) {
                Admit::Yes | Admit::Trial => return Some(b),
                Admit::No => continue,
            }
        }
    }
    None
}

/// The backends a request without a session may use, `picked` among them: the usable
/// ones of the same set `pick` chose it from (the tenant's `spread` backends, or the
/// rest of the pool when it spilled). For a request that must wait for a worker slot.
pub fn candidates(list: &[Arc<Backend>], w: &Want<'_>, picked: &Backend) -> Vec<Arc<Backend>> {
    let spread = if w.spread == 0 || w.spread >= list.len() {
        list.len()
    } else {
        w.spread
    };
    let top = (spread < list.len()).then(|| TopK::new(list, w.tenant, spread));
    let in_set = |b: &Backend| top.as_ref().is_none_or(|t| t.contains(b.hash));
    let spilled = !in_set(picked);
    list.iter()
        .filter(|b| in_set(b) != spilled && (usable(b, w) || b.hash == picked.hash))
        .cloned()
        .collect()
}

fn best_by_score(
    list: &[Arc<Backend>],
    key: u64,
    ok: impl Fn(&Backend) -> bool,
) -> Option<Arc<Backend>> {
    list.iter()
        .filter(|b| ok(b))
        .max_by_key(|b| score(key, b.hash))
        .cloned()
}

/// The usable backend with the fewest requests in flight; ties are broken round-robin
/// (the scan starts at a rotating offset and only a strictly smaller count wins).
pub fn least_inflight(
    list: &[Arc<Backend>],
    rr: &AtomicUsize,
    ok: impl Fn(&Backend) -> bool,
) -> Option<Arc<Backend>> {
    let n = list.len();
    if n == 0 {
        return None;
    }
    let start = rr.fetch_add(1, Ordering::Relaxed) % n;
    let mut best: Option<(&Arc<Backend>, u64)> = None;
    for i in 0..n {
        let b = &list[(start + i) % n];
        if !ok(b) {
            continue;
        }
        let load = b.inflight.load(Ordering::Relaxed);
        if best.is_none_or(|(_, l)| load < l) {
            best = Some((b, load));
        }
    }
    best.map(|(b, _)| b.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendKey, Registry, Role};
    use crate::hash::hash_bytes;
    use crate::telemetry::Metrics;
    use std::collections::{HashMap, HashSet};

    fn backends(n: usize) -> Vec<Arc<Backend>> {
        let reg = Registry::default();
        let m = Metrics::new();
        (0..n)
            .map(|i| {
                reg.get_or_create(
                    BackendKey {
                        pool: Arc::from("p"),
                        role: Role::Http,
                        addr: format!("10.0.0.{}:8069", i + 1).parse().unwrap(),
                    },
                    &m,
                )
            })
            .collect()
    }

    fn want(spread: usize, tenant: &str, session: Option<&str>) -> Want<'static> {
        Want {
            spread,
            tenant: hash_bytes(tenant.as_bytes()),
            session: session.map(|s| hash_bytes(s.as_bytes())),
            exclude: &[],
            now: 1,
            open_for: 15_000,
        }
    }

    fn pick_addr(list: &[Arc<Backend>], w: &Want<'_>) -> SocketAddr {
        let rr = AtomicUsize::new(0);
        pick(list, &rr, w).unwrap().addr()
    }

    #[test]
    fn least_inflight_prefers_the_idle_and_rotates_ties() {
        let list = backends(3);
        list[0].inflight.store(5, Ordering::Relaxed);
        list[1].inflight.store(1, Ordering::Relaxed);
        list[2].inflight.store(3, Ordering::Relaxed);
        let rr = AtomicUsize::new(0);
        for _ in 0..5 {
            assert_eq!(
                least_inflight(&list, &rr, |_| true).unwrap().addr(),
                list[1].addr()
            );
        }
        let list = backends(3);
        let seen: HashSet<_> = (0..3)
            .map(|_| least_inflight(&list, &rr, |_| true).unwrap().addr())
            .collect();
        assert_eq!(seen.len(), 3);
        assert!(least_inflight(&list, &rr, |_| false).is_none());
    }

    #[test]
    fn spread_bounds_a_tenants_backends() {
        let list = backends(8);
        for t in 0..50 {
            let tenant = format!("tenant{t}");
            let rr = AtomicUsize::new(0);
            let used: HashSet<_> = (0..100)
                .map(|_| pick(&list, &rr, &want(2, &tenant, None)).unwrap().addr())
                .collect();
            assert_eq!(used.len(), 2, "{tenant} used {used:?}");
        }
        // spread = 0: all of them.
        let rr = AtomicUsize::new(0);
        let used: HashSet<_> = (0..100)
            .map(|_| pick(&list, &rr, &want(0, "x", None)).unwrap().addr())
            .collect();
        assert_eq!(used.len(), 8);
    }

    #[test]
    fn tenants_spread_evenly() {
        let list = backends(8);
        let mut load: HashMap<SocketAddr, usize> = HashMap::new();
        for t in 0..4000 {
            let tenant = format!("t{t}");
            for b in list
                .iter()
                .filter(|b| in_top(&list, b, hash_bytes(tenant.as_bytes()), 2))
            {
                *load.entry(b.addr()).or_default() += 1;
            }
        }
        // 8000 placements over 8 backends: 1000 each, within 15 %.
        for (a, n) in &load {
            assert!((850..=1150).contains(n), "{a} has {n}");
        }
    }

    #[test]
    fn sessions_stick_and_move_minimally() {
        let list = backends(8);
        let sessions: Vec<String> = (0..10_000).map(|i| format!("sess-{i}")).collect();
        let before: Vec<SocketAddr> = sessions
            .iter()
            .map(|s| pick_addr(&list, &want(0, "t", Some(s))))
            .collect();
        // Sticky: the same answer every time.
        for (s, b) in sessions.iter().zip(&before).take(500) {
            assert_eq!(pick_addr(&list, &want(0, "t", Some(s))), *b);
        }
        // Remove backend 3.
        let gone = list[3].addr();
        let rest: Vec<Arc<Backend>> = list.iter().filter(|b| b.addr() != gone).cloned().collect();
        let mut moved = 0;
        for (s, b) in sessions.iter().zip(&before) {
            let after = pick_addr(&rest, &want(0, "t", Some(s)));
            if after != *b {
                moved += 1;
                assert_eq!(*b, gone, "{s} moved from {b}, which did not leave");
            }
        }
        assert!(moved > 0);
        assert!(
            moved <= 10_000 / 8 * 115 / 100,
            "{moved} of 10000 sessions moved"
        );
        // And back: the same sessions return, no others move.
        for (s, b) in sessions.iter().zip(&before).take(2000) {
            assert_eq!(pick_addr(&list, &want(0, "t", Some(s))), *b);
        }
    }

    #[test]
    fn tenant_sets_move_minimally_when_a_backend_joins() {
        let list = backends(9);
        let old: Vec<Arc<Backend>> = list[..8].to_vec();
        let joined = list[8].addr();
        for t in 0..2000 {
            let key = hash_bytes(format!("t{t}").as_bytes());
            let before: HashSet<_> = old
                .iter()
                .filter(|b| in_top(&old, b, key, 2))
                .map(|b| b.addr())
                .collect();
            let after: HashSet<_> = list
                .iter()
                .filter(|b| in_top(&list, b, key, 2))
                .map(|b| b.addr())
                .collect();
            if before != after {
                assert!(
                    after.contains(&joined),
                    "t{t} changed without ranking the new backend"
                );
                assert_eq!(before.intersection(&after).count(), 1);
            }
        }
    }

    #[test]
    fn down_and_open_backends_are_skipped_then_spill() {
        let list = backends(4);
        let w = want(2, "acme", None);
        let rr = AtomicUsize::new(0);
        let own: HashSet<_> = (0..20)
            .map(|_| pick(&list, &rr, &w).unwrap().addr())
            .collect();
        assert_eq!(own.len(), 2);
        let own: Vec<SocketAddr> = own.into_iter().collect();
        // One of the tenant's backends fails: the other takes everything.
        let b0 = list.iter().find(|b| b.addr() == own[0]).unwrap();
        b0.breaker.record(false, 1, 1, 15_000);
        for _ in 0..10 {
            assert_eq!(pick(&list, &rr, &w).unwrap().addr(), own[1]);
        }
        // Both are out: spill to the others.
        let b1 = list.iter().find(|b| b.addr() == own[1]).unwrap();
        b1.health.record(false, 1, 1);
        for _ in 0..10 {
            let a = pick(&list, &rr, &w).unwrap().addr();
            assert!(!own.contains(&a));
        }
        // Everything out: nothing.
        for b in &list {
            b.health.record(false, 1, 1);
        }
        assert!(pick(&list, &rr, &w).is_none());
    }

    #[test]
    fn an_open_breaker_gets_one_trial_after_open_for() {
        let list = backends(1);
        list[0].breaker.record(false, 1, 1, 100);
        let rr = AtomicUsize::new(0);
        let mut w = want(0, "t", None);
        w.open_for = 100;
        w.now = 50;
        assert!(pick(&list, &rr, &w).is_none());
        w.now = 200;
        assert_eq!(
            pick(&list, &rr, &w).map(|b| b.breaker.state()),
            Some(crate::breaker::BreakerState::HalfOpen)
        );
        assert!(pick(&list, &rr, &w).is_none());
    }

    #[test]
    fn excluded_backends_are_not_retried() {
        let list = backends(2);
        let ex = [list[0].addr()];
        let mut w = want(0, "t", Some("s"));
        w.exclude = &ex;
        for _ in 0..5 {
            assert_eq!(pick_addr(&list, &w), list[1].addr());
        }
    }

    #[test]
    fn session_cookie_parsing() {
        let h = [b"a=1; session_id=abc123; b=2".as_slice()];
        assert_eq!(session_id(h.into_iter()), Some(b"abc123".as_slice()));
        let h = [b"a=1".as_slice(), b"session_id=zz".as_slice()];
        assert_eq!(session_id(h.into_iter()), Some(b"zz".as_slice()));
        let h = [b"xsession_id=1; session_id=".as_slice()];
        assert_eq!(session_id(h.into_iter()), None);
    }
}
