//! Per-tenant live figures (`GET /status/tenants`, the dashboard): requests, errors
//! (5xx answers that are not portier's refusals), refusals, and the latency of the
//! requests that reached a worker, over the last [`WINDOW_S`] seconds.
//!
//! Each tenant (by effective name: a template's captured label is a tenant of its own)
//! has a ring of 12 slots of 5 seconds; a slot holds three counters and a latency
//! histogram of 24 log-spaced buckets. The request path touches one slot with relaxed
//! atomic adds: no lock, no allocation once the tenant has its [`Live`] (about 1.5 KiB).
//! A slot reused for a new 5 seconds is cleared by whoever claims it first, while
//! counts of the new period on other threads wait (`Slot::enter`): none is lost.

use std::collections::HashMap;
use std::sync::atomic::{
    AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Arc;

use dashmap::DashMap;

/// The window the figures cover, seconds.
pub const WINDOW_S: u64 = 60;
const SLOT_S: u64 = 5;
const SLOTS: usize = (WINDOW_S / SLOT_S) as usize;
const BUCKETS: usize = 24;
/// The upper bound of latency bucket `i` is `BASE_MS * GROWTH^i`; the last bucket takes
/// everything above the one before it.
const BASE_MS: f64 = 1.0;
const GROWTH: f64 = 1.5;

#[derive(Default)]
struct Slot {
    /// Which 5 seconds (since the clock's start) the counts belong to.
    epoch: AtomicU64,
    requests: AtomicU32,
    errors: AtomicU32,
    refused: AtomicU32,
    latency: [AtomicU32; BUCKETS],
}

/// The epoch of a slot while one thread clears it for a new period.
const CLEARING: u64 = u64::MAX;

impl Slot {
    /// Makes the slot count for `epoch`: the first count of a new period clears what the
    /// slot held, and counts of that period made at once on other threads wait until it
    /// has (marking the slot [`CLEARING`] first; clearing after taking the slot over
    /// would wipe counts added in between). False for a count of a period the slot has
    /// already left (older than the window).
    fn enter(&self, epoch: u64) -> bool {
        loop {
            let seen = self.epoch.load(Acquire);
            if seen == epoch {
                return true;
            }
            if seen == CLEARING {
                std::thread::yield_now();
                continue;
            }
            if seen > epoch {
                return false;
            }
            if self
                .epoch
                .compare_exchange(seen, CLEARING, Acquire, Relaxed)
                .is_ok()
            {
                self.requests.store(0, Relaxed);
                self.errors.store(0, Relaxed);
                self.refused.store(0, Relaxed);
                for b in &self.latency {
                    b.store(0, Relaxed);
                }
                self.epoch.store(epoch, Release);
                return true;
            }
        }
    }
}

/// One tenant's ring.
#[derive(Default)]
pub struct Live {
    slots: [Slot; SLOTS],
}

/// What one request was, for its tenant's figures.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub status: u16,
    /// portier answered it itself (a `refused` reason).
    pub refused: bool,
    /// Milliseconds, for a request that reached a worker.
    pub worker_ms: Option<f64>,
}

/// A tenant's figures over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    pub rps: f64,
    pub errors_per_s: f64,
    pub refused_per_s: f64,
    /// The 99th percentile (the upper bound of its bucket) of the requests that reached
    /// a worker; `None` without such requests.
    pub p99_ms: Option<f64>,
}

fn bucket(ms: f64) -> usize {
    if ms <= BASE_MS {
        return 0;
    }
    ((ms / BASE_MS).ln() / GROWTH.ln())
        .ceil()
        .min((BUCKETS - 1) as f64) as usize
}

fn upper_ms(i: usize) -> f64 {
    BASE_MS * GROWTH.powi(i as i32)
}

impl Live {
    /// Counts one request at `now_s` (seconds of a monotonic clock).
    pub fn record(&self, now_s: u64, o: Outcome) {
        let epoch = now_s / SLOT_S + 1;
        let slot = &self.slots[(epoch % SLOTS as u64) as usize];
        if !slot.enter(epoch) {
            return;
        }
        slot.requests.fetch_add(1, Relaxed);
        if o.refused {
            slot.refused.fetch_add(1, Relaxed);
        } else if o.status >= 500 {
            slot.errors.fetch_add(1, Relaxed);
        }
        if let Some(ms) = o.worker_ms {
            slot.latency[bucket(ms)].fetch_add(1, Relaxed);
        }
    }

    /// The figures of the slots within the window ending at `now_s`.
    pub fn figures(&self, now_s: u64) -> Figures {
        let epoch = now_s / SLOT_S + 1;
        let (mut requests, mut errors, mut refused) = (0u64, 0u64, 0u64);
        let mut latency = [0u64; BUCKETS];
        for s in &self.slots {
            let e = s.epoch.load(Relaxed);
            if e == 0 || e > epoch || epoch - e >= SLOTS as u64 {
                continue;
            }
            requests += u64::from(s.requests.load(Relaxed));
            errors += u64::from(s.errors.load(Relaxed));
            refused += u64::from(s.refused.load(Relaxed));
            for (sum, b) in latency.iter_mut().zip(&s.latency) {
                *sum += u64::from(b.load(Relaxed));
            }
        }
        let timed: u64 = latency.iter().sum();
        let p99_ms = (timed > 0).then(|| {
            let rank = (timed * 99).div_ceil(100);
            let mut seen = 0;
            let i = latency
                .iter()
                .position(|n| {
                    seen += n;
                    seen >= rank
                })
                .unwrap_or(BUCKETS - 1);
            upper_ms(i)
        });
        let per_s = |n: u64| n as f64 / WINDOW_S as f64;
        Figures {
            rps: per_s(requests),
            errors_per_s: per_s(errors),
            refused_per_s: per_s(refused),
            p99_ms,
        }
    }

    /// No request in the window ending at `now_s`.
    fn idle(&self, now_s: u64) -> bool {
        self.figures(now_s).rps == 0.0
    }
}

/// Every tenant's ring, by effective name, with the configured tenant it belongs to (a
/// template's captured names belong to the template). Survives reloads.
#[derive(Default)]
pub struct LiveTenants {
    map: DashMap<Arc<str>, (Arc<str>, Arc<Live>)>,
}

impl LiveTenants {
    /// The ring of `name` (of configured tenant `owner`), made on its first request.
    pub fn get(&self, name: &Arc<str>, owner: &Arc<str>) -> Arc<Live> {
        if let Some(e) = self.map.get(name) {
            return e.1.clone();
        }
        self.map
            .entry(name.clone())
            .or_insert_with(|| (owner.clone(), Arc::new(Live::default())))
            .1
            .clone()
    }

    /// The figures of `name`, zeros (and no p99) when it has no ring.
    pub fn figures(&self, name: &str, now_s: u64) -> Figures {
        self.map
            .get(name)
            .map(|e| e.1.figures(now_s))
            .unwrap_or_default()
    }

    /// The captured names with a ring (names other than their owner's), by owner, each
    /// list sorted: one pass over the rings, whatever the number of tenants.
    pub fn members(&self) -> HashMap<Arc<str>, Vec<Arc<str>>> {
        let mut by_owner: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
        for e in self.map.iter() {
            let owner = &e.value().0;
            if **owner != **e.key() {
                by_owner
                    .entry(owner.clone())
                    .or_default()
                    .push(e.key().clone());
            }
        }
        for names in by_owner.values_mut() {
            names.sort();
        }
        by_owner
    }

    /// Forgets the rings with nothing in the window (they are made again when needed),
    /// so memory follows the tenants with traffic. Returns how many went.
    pub fn evict_idle(&self, now_s: u64) -> usize {
        let before = self.map.len();
        self.map
            .retain(|_, (_, live)| Arc::strong_count(live) > 1 || !live.idle(now_s));
        before - self.map.len()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Seconds of the clock the figures are kept on (monotonic, shared with the breakers).
pub fn now_s() -> u64 {
    crate::breaker::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ms: f64) -> Outcome {
        Outcome {
            status: 200,
            refused: false,
            worker_ms: Some(ms),
        }
    }

    #[test]
    fn counts_rates_and_the_p99_over_the_window() {
        let live = Live::default();
        for i in 0..99 {
            live.record(100 + i % 50, ok(10.0));
        }
        live.record(120, ok(900.0));
        live.record(
            121,
            Outcome {
                status: 502,
                refused: false,
                worker_ms: Some(5.0),
            },
        );
        live.record(
            122,
            Outcome {
                status: 503,
                refused: true,
                worker_ms: None,
            },
        );
        live.record(
            123,
            Outcome {
                status: 429,
                refused: true,
                worker_ms: None,
            },
        );
        let f = live.figures(150);
        assert_eq!(f.rps, 103.0 / 60.0);
        assert_eq!(f.errors_per_s, 1.0 / 60.0);
        assert_eq!(f.refused_per_s, 2.0 / 60.0);
        // 101 timed requests (99 at 10 ms, one at 5, one at 900): the p99's rank, 100,
        // falls in the 10 ms bucket.
        let p99 = f.p99_ms.unwrap();
        assert!((10.0..16.0).contains(&p99), "{p99}");
        // Two slow ones out of 102 timed: the p99 is in the slow bucket.
        live.record(124, ok(900.0));
        let p99 = live.figures(150).p99_ms.unwrap();
        assert!((900.0..1400.0).contains(&p99), "{p99}");
    }

    #[test]
    fn old_slots_leave_the_window_and_are_reused() {
        let live = Live::default();
        live.record(0, ok(1.0));
        live.record(30, ok(1.0));
        assert_eq!(live.figures(30).rps, 2.0 / 60.0);
        // 60 s later the first is out, the second still in.
        assert_eq!(live.figures(60).rps, 1.0 / 60.0);
        assert_eq!(live.figures(90).rps, 0.0);
        assert_eq!(live.figures(90).p99_ms, None);
        // The slot of second 0 is reused at second 60 for new counts only.
        live.record(61, ok(1.0));
        assert_eq!(live.figures(61).rps, 2.0 / 60.0);
        // A count of second 1 arriving late (its slot now second 61's) is dropped; it
        // does not take the slot back.
        live.record(1, ok(1.0));
        assert_eq!(live.figures(61).rps, 2.0 / 60.0);
        assert!(live.idle(200));
    }

    /// Threads counting at once into a slot that a new period just took over: every
    /// count is kept (the slot is cleared before any of the new period's counts go in).
    #[test]
    fn requests_counted_at_once_in_a_new_slot_are_all_kept() {
        let live = Arc::new(Live::default());
        let threads = 4;
        let per_thread = 3;
        for round in 0..2_000u64 {
            let now = round * SLOT_S;
            let start = Arc::new(std::sync::Barrier::new(threads));
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let (live, start) = (live.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        for _ in 0..per_thread {
                            live.record(now, ok(1.0));
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
            let slot = &live.slots[((now / SLOT_S + 1) % SLOTS as u64) as usize];
            assert_eq!(
                slot.requests.load(Relaxed),
                (threads * per_thread) as u32,
                "round {round}"
            );
        }
    }

    #[test]
    fn rings_by_name_and_owner_and_idle_ones_go() {
        let t = LiveTenants::default();
        let (saas, x, y, acme) = (
            Arc::from("saas"),
            Arc::from("x"),
            Arc::from("y"),
            Arc::from("acme"),
        );
        t.get(&x, &saas).record(10, ok(1.0));
        t.get(&y, &saas).record(10, ok(1.0));
        t.get(&acme, &acme).record(10, ok(1.0));
        let members = t.members();
        assert_eq!(members.get("saas"), Some(&vec![x.clone(), y.clone()]));
        assert!(!members.contains_key("acme"));
        assert_eq!(t.figures("x", 10).rps, 1.0 / 60.0);
        assert_eq!(t.figures("nobody", 10), Figures::default());
        assert_eq!(t.evict_idle(20), 0);
        assert_eq!(t.evict_idle(200), 3);
        assert!(t.is_empty());
    }

    #[test]
    fn buckets_grow_by_half() {
        assert_eq!(bucket(0.2), 0);
        assert_eq!(bucket(1.0), 0);
        assert_eq!(bucket(1.4), 1);
        assert_eq!(bucket(1e9), BUCKETS - 1);
        assert!(upper_ms(BUCKETS - 1) > 10_000.0);
    }
}
