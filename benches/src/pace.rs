//! The paced loads' schedule (`load::paced`, `load::paced_h2`): wrk2's constant rate
//! per connection, with latency counted so that a slow server cannot hide its queueing.

use std::time::{Duration, Instant};

/// wrk2's pacing of one connection: its k-th request is due at `start + k·interval`.
/// A request sent late because the previous answer came late counts from when it was
/// due (the server's queueing: no coordinated omission); one the timer woke late (the
/// generator's, not the server's doing) counts from when it was sent.
pub(crate) struct Pacer {
    start: Instant,
    interval: Duration,
    k: u32,
}

impl Pacer {
    /// Connection `i` of `conns`, which share `rate` requests per second between them;
    /// their schedules are staggered so that they do not all send at once.
    pub(crate) fn new(rate: f64, i: usize, conns: usize) -> Pacer {
        Pacer::starting_at(Instant::now(), rate, i, conns)
    }

    fn starting_at(base: Instant, rate: f64, i: usize, conns: usize) -> Pacer {
        let interval = Duration::from_secs_f64(conns as f64 / rate.max(1e-3));
        Pacer {
            start: base + interval.mul_f64(i as f64 / conns as f64),
            interval,
            k: 0,
        }
    }

    /// Waits until the next request is due; returns the instant its latency counts from.
    async fn next(&mut self) -> Instant {
        let due = self.start + self.interval * self.k;
        self.k += 1;
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
            return Instant::now();
        }
        due
    }
}

/// When the next request of a connection goes and where its latency counts from:
/// at once (closed loop), or paced (`Some(pacer)`).
pub(crate) async fn next_start(pacer: &mut Option<Pacer>) -> Instant {
    match pacer {
        Some(p) => p.next().await,
        None => Instant::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk2's rule: a request the server made late counts from when it was due; one the
    /// timer wakes counts from when it goes.
    #[tokio::test]
    async fn a_late_request_counts_from_when_it_was_due() {
        let mut p = Pacer::new(100.0, 0, 1); // one request every 10 ms
        let first = p.next().await;
        tokio::time::sleep(Duration::from_millis(35)).await; // an answer 35 ms late
        assert_eq!(p.next().await, first + Duration::from_millis(10));
        assert_eq!(p.next().await, first + Duration::from_millis(20));
        assert_eq!(p.next().await, first + Duration::from_millis(30));
        // Caught up: the next is waited for and counts from when it goes.
        let on_time = p.next().await;
        assert!(on_time >= first + Duration::from_millis(40));
        assert!(Instant::now() >= on_time);
    }

    #[test]
    fn connections_share_the_rate_on_staggered_schedules() {
        let base = Instant::now();
        let a = Pacer::starting_at(base, 1000.0, 0, 4);
        let b = Pacer::starting_at(base, 1000.0, 2, 4);
        assert_eq!(a.interval, Duration::from_millis(4));
        assert_eq!(b.start - a.start, Duration::from_millis(2));
    }
}
