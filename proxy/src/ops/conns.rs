//! Client connection caps (contract `[listen] max_connections`,
//! `max_connections_per_ip`): a connection beyond either is closed at accept, before
//! any TLS work, and counted in `portier_connections_refused_total{reason}`. The
//! counts go down when a connection's socket is dropped, wherever it ends (vendor
//! patch 7 keeps a guard in the stream).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use pingora::listeners::{ConnectionFilter, ConnectionGuard};
use prometheus::IntCounter;

use crate::io::forward;

/// The open-connection counts and the caps (fixed at start: `[listen]` changes need a
/// restart).
pub struct ConnLimits {
    open: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
    max: usize,
    /// 0 = no cap.
    max_per_ip: usize,
    refused_total: IntCounter,
    refused_per_ip: IntCounter,
}

impl std::fmt::Debug for ConnLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLimits")
            .field("open", &self.open.load(Ordering::Relaxed))
            .field("max", &self.max)
            .field("max_per_ip", &self.max_per_ip)
            .finish()
    }
}

/// Held by an open connection; gives its place back when dropped.
struct Open {
    limits: Arc<ConnLimits>,
    ip: Option<IpAddr>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            if let dashmap::Entry::Occupied(mut e) = self.limits.per_ip.entry(ip) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }
}

impl ConnLimits {
    pub fn new(
        max: usize,
        max_per_ip: usize,
        refused_total: IntCounter,
        refused_per_ip: IntCounter,
    ) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            open: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            max,
            max_per_ip,
            refused_total,
            refused_per_ip,
        })
    }

    /// One more connection from `peer`, or `None` when a cap is reached.
    fn take(self: &Arc<Self>, peer: Option<&SocketAddr>) -> Option<Open> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused_total.inc();
            return None;
        }
        let ip = match (self.max_per_ip, peer) {
            (0, _) | (_, None) => None,
            (cap, Some(peer)) => {
                let ip = forward::canonical(peer.ip());
                let mut n = self.per_ip.entry(ip).or_insert(0);
                if *n >= cap {
                    drop(n);
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    self.refused_per_ip.inc();
                    return None;
                }
                *n += 1;
                Some(ip)
            }
        };
        Some(Open {
            limits: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// The filter pingora calls at each accept.
#[derive(Debug)]
pub struct Filter(pub Arc<ConnLimits>);

#[async_trait]
impl ConnectionFilter for Filter {
    async fn admit(&self, addr: Option<&SocketAddr>) -> Option<ConnectionGuard> {
        let open = self.0.take(addr)?;
        Some(ConnectionGuard(Some(Box::new(open))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_total_and_per_address_and_places_come_back() {
        let limits = ConnLimits::new(
            3,
            2,
            IntCounter::new("t", "t").unwrap(),
            IntCounter::new("p", "p").unwrap(),
        );
        let a: SocketAddr = "203.0.113.1:1000".parse().unwrap();
        let a2: SocketAddr = "[::ffff:203.0.113.1]:1001".parse().unwrap();
        let b: SocketAddr = "203.0.113.2:1000".parse().unwrap();
        let x = limits.take(Some(&a)).unwrap();
        let y = limits.take(Some(&a2)).unwrap();
        assert!(
            limits.take(Some(&a)).is_none(),
            "per address (v4-mapped is the same)"
        );
        assert_eq!(limits.refused_per_ip.get(), 1);
        let z = limits.take(Some(&b)).unwrap();
        assert!(limits.take(Some(&b)).is_none(), "in total");
        assert_eq!(limits.refused_total.get(), 1);
        assert_eq!(limits.open(), 3);
        drop((x, y));
        assert_eq!(limits.open(), 1);
        assert!(limits.per_ip.get(&forward::canonical(a.ip())).is_none());
        let _again = limits.take(Some(&a)).unwrap();
        drop(z);
        assert_eq!(limits.open(), 1);
    }
}
