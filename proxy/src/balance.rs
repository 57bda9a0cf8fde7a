//! Backend selection within a pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::state::Backend;

/// The usable backend with the fewest requests in flight; ties are broken round-robin
/// (the scan starts at a rotating offset and only a strictly smaller count wins).
pub fn least_inflight(
    list: &[Arc<Backend>],
    rr: &AtomicUsize,
    usable: impl Fn(&Backend) -> bool,
) -> Option<Arc<Backend>> {
    let n = list.len();
    if n == 0 {
        return None;
    }
    let start = rr.fetch_add(1, Ordering::Relaxed) % n;
    let mut best: Option<(&Arc<Backend>, u64)> = None;
    for i in 0..n {
        let b = &list[(start + i) % n];
        if !usable(b) {
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
    use crate::state::{BackendKey, Registry, Role};
    use crate::telemetry::Metrics;

    fn backends(n: usize) -> Vec<Arc<Backend>> {
        let reg = Registry::default();
        let m = Metrics::new();
        (0..n)
            .map(|i| {
                reg.get_or_create(
                    BackendKey {
                        pool: Arc::from("p"),
                        role: Role::Http,
                        addr: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    },
                    &m,
                )
            })
            .collect()
    }

    #[test]
    fn picks_least_loaded() {
        let list = backends(3);
        list[0].inflight.store(5, Ordering::Relaxed);
        list[1].inflight.store(1, Ordering::Relaxed);
        list[2].inflight.store(3, Ordering::Relaxed);
        let rr = AtomicUsize::new(0);
        for _ in 0..5 {
            let b = least_inflight(&list, &rr, |_| true).unwrap();
            assert_eq!(b.addr().port(), 9001);
        }
    }

    #[test]
    fn ties_rotate() {
        let list = backends(3);
        let rr = AtomicUsize::new(0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            seen.insert(least_inflight(&list, &rr, |_| true).unwrap().addr().port());
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn unusable_are_skipped() {
        let list = backends(2);
        let rr = AtomicUsize::new(0);
        for _ in 0..4 {
            let b = least_inflight(&list, &rr, |b| b.addr().port() != 9000).unwrap();
            assert_eq!(b.addr().port(), 9001);
        }
        assert!(least_inflight(&list, &rr, |_| false).is_none());
        assert!(least_inflight(&[], &rr, |_| true).is_none());
    }
}
