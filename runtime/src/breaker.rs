//! The lock-free state machines kept in each backend: the passive circuit breaker
//! (open after `failures` consecutive failed proxied requests, one half-open trial
//! after `open_for`) and the active-check state (up after `rise` passes, down after
//! `fall` failures), and the monotonic clock they run on. No I/O here: the checks
//! themselves are in `health.rs`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds on a process-local monotonic clock.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// What the breaker lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The one half-open trial request.
    Trial,
    No,
}

/// Breaker state as shown in `/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// The circuit breaker of one backend: a small lock-free state machine.
///
/// closed --(`failures` consecutive failures)--> open --(`open_for` passes; the next
/// request is the trial)--> half-open --(trial succeeds)--> closed, or --(trial fails)-->
/// open again. A trial that never reports back is replaced after another `open_for`.
#[derive(Default)]
pub struct Breaker {
    state: AtomicU8,
    failures: AtomicU32,
    /// While open: when the trial may start. While half-open: when the trial began.
    since: AtomicU64,
}

impl Breaker {
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Whether a request could be admitted now, without taking the trial.
    pub fn peek(&self, now: u64, open_for: u64) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            OPEN => now >= self.since.load(Ordering::Acquire),
            _ => now >= self.since.load(Ordering::Acquire).saturating_add(open_for),
        }
    }

    /// Admits a request (taking the half-open trial when it is due).
    pub fn admit(&self, now: u64, open_for: u64) -> Admit {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Admit::Yes,
            OPEN => {
                let until = self.since.load(Ordering::Acquire);
                if now < until {
                    return Admit::No;
                }
                if self
                    .state
                    .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.since.store(now, Ordering::Release);
                    Admit::Trial
                } else {
                    Admit::No
                }
            }
            _ => {
                // Half-open: the trial is out. If it never came back, start another.
                let began = self.since.load(Ordering::Acquire);
                if now >= began.saturating_add(open_for)
                    && self
                        .since
                        .compare_exchange(began, now, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    Admit::Trial
                } else {
                    Admit::No
                }
            }
        }
    }

    /// Records the outcome of a proxied request. Returns the new state if it changed.
    pub fn record(
        &self,
        ok: bool,
        now: u64,
        threshold: u32,
        open_for: u64,
    ) -> Option<BreakerState> {
        let state = self.state.load(Ordering::Acquire);
        if ok {
            self.failures.store(0, Ordering::Release);
            if state == HALF_OPEN
                && self
                    .state
                    .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(BreakerState::Closed);
            }
            return None;
        }
        match state {
            CLOSED => {
                let f = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if f >= threshold
                    && self
                        .state
                        .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.since.store(now + open_for, Ordering::Release);
                    self.failures.store(0, Ordering::Release);
                    return Some(BreakerState::Open);
                }
                None
            }
            HALF_OPEN => {
                if self
                    .state
                    .compare_exchange(HALF_OPEN, OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.since.store(now + open_for, Ordering::Release);
                    return Some(BreakerState::Open);
                }
                None
            }
            // Late failures of requests admitted before the breaker opened.
            _ => None,
        }
    }
}

/// Active health-check state of one backend. Backends start up.
pub struct HealthState {
    up: AtomicBool,
    passes: AtomicU32,
    fails: AtomicU32,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            up: AtomicBool::new(true),
            passes: AtomicU32::new(0),
            fails: AtomicU32::new(0),
        }
    }
}

impl HealthState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Records one check; returns `Some(up)` when the state flips.
    pub fn record(&self, pass: bool, rise: u32, fall: u32) -> Option<bool> {
        if pass {
            self.fails.store(0, Ordering::Release);
            let p = self.passes.fetch_add(1, Ordering::AcqRel) + 1;
            if !self.is_up() && p >= rise {
                self.up.store(true, Ordering::Release);
                return Some(true);
            }
        } else {
            self.passes.store(0, Ordering::Release);
            let f = self.fails.fetch_add(1, Ordering::AcqRel) + 1;
            if self.is_up() && f >= fall {
                self.up.store(false, Ordering::Release);
                return Some(false);
            }
        }
        None
    }

    /// Back to "up" (when a pool stops having active checks).
    pub fn reset_up(&self) -> bool {
        self.passes.store(0, Ordering::Release);
        self.fails.store(0, Ordering::Release);
        !self.up.swap(true, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: u64 = 1000;

    #[test]
    fn breaker_opens_after_consecutive_failures() {
        let b = Breaker::default();
        assert_eq!(b.admit(0, OPEN_FOR), Admit::Yes);
        for _ in 0..4 {
            assert_eq!(b.record(false, 10, 5, OPEN_FOR), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.record(false, 10, 5, OPEN_FOR), Some(BreakerState::Open));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(500, OPEN_FOR), Admit::No);
        assert!(!b.peek(500, OPEN_FOR));
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breaker::default();
        for _ in 0..4 {
            b.record(false, 0, 5, OPEN_FOR);
        }
        b.record(true, 0, 5, OPEN_FOR);
        for _ in 0..4 {
            assert_eq!(b.record(false, 0, 5, OPEN_FOR), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn half_open_trial_closes_or_reopens() {
        let b = Breaker::default();
        b.record(false, 0, 1, OPEN_FOR);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.peek(OPEN_FOR, OPEN_FOR));
        assert_eq!(b.admit(OPEN_FOR, OPEN_FOR), Admit::Trial);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // Only one trial at a time.
        assert_eq!(b.admit(OPEN_FOR + 1, OPEN_FOR), Admit::No);
        // The trial fails: open again for another open_for.
        assert_eq!(
            b.record(false, OPEN_FOR + 5, 1, OPEN_FOR),
            Some(BreakerState::Open)
        );
        assert_eq!(b.admit(OPEN_FOR + 10, OPEN_FOR), Admit::No);
        assert_eq!(b.admit(2 * OPEN_FOR + 5, OPEN_FOR), Admit::Trial);
        // The trial succeeds: closed.
        assert_eq!(
            b.record(true, 2 * OPEN_FOR + 6, 1, OPEN_FOR),
            Some(BreakerState::Closed)
        );
        assert_eq!(b.admit(2 * OPEN_FOR + 7, OPEN_FOR), Admit::Yes);
    }

    #[test]
    fn a_lost_trial_is_replaced() {
        let b = Breaker::default();
        b.record(false, 0, 1, OPEN_FOR);
        assert_eq!(b.admit(OPEN_FOR, OPEN_FOR), Admit::Trial);
        assert_eq!(b.admit(OPEN_FOR + 999, OPEN_FOR), Admit::No);
        assert_eq!(b.admit(2 * OPEN_FOR, OPEN_FOR), Admit::Trial);
    }

    #[test]
    fn late_results_do_not_flip_an_open_breaker() {
        let b = Breaker::default();
        b.record(false, 0, 1, OPEN_FOR);
        assert_eq!(b.record(true, 1, 1, OPEN_FOR), None);
        assert_eq!(b.record(false, 2, 1, OPEN_FOR), None);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn health_rise_and_fall() {
        let h = HealthState::default();
        assert!(h.is_up());
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), Some(false));
        assert!(!h.is_up());
        assert_eq!(h.record(true, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(true, 2, 3), None);
        assert_eq!(h.record(true, 2, 3), Some(true));
        assert!(!h.reset_up());
    }
}
