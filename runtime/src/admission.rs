//! Worker slots and the fair priority queue of a pool (contract r2, "Worker slots and
//! the queue").
//!
//! An Odoo HTTP worker process serves one request at a time; a pool with `workers = N`
//! sends at most N requests at once to each HTTP backend. A request takes a slot with
//! one compare-and-swap on its backend's counter (no lock, no allocation). When its
//! backend (a session's) or every backend it may use (its tenant's `spread`) is full,
//! it waits in the pool's queue: slots freed go to waiting requests by class —
//! interactive, then static, then integration — and within a class the tenants take
//! turns, so one tenant's burst waits behind itself. A waiter is woken by the release
//! of a slot (a oneshot), never by polling. The queue is long-lived per pool name, so
//! a reload does not strand its waiters.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use portier_config::{Class, QueueCfg};
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::telemetry::Metrics;

/// Every pool's worker queue, by pool name; they survive reloads.
#[derive(Default)]
pub struct Queues(dashmap::DashMap<Arc<str>, Arc<PoolQueue>>);

impl Queues {
    /// The worker queue of a pool (created on first use).
    pub fn get(&self, pool: &Arc<str>, metrics: &Metrics) -> Arc<PoolQueue> {
        if let Some(q) = self.0.get(pool) {
            return q.clone();
        }
        self.0
            .entry(pool.clone())
            .or_insert_with(|| Arc::new(PoolQueue::new(pool, metrics)))
            .clone()
    }
}

/// The classes that queue are served in the order interactive, static, integration
/// (longpolls take no slot).
fn class_index(c: Class) -> usize {
    match c {
        Class::Static => 1,
        Class::Integration => 2,
        Class::Interactive | Class::Longpolling => 0,
    }
}

/// Takes a slot on `b` if fewer than `cap` of its slots are busy and the pool lets a
/// request of this kind in (see [`PoolQueue::enter`]).
pub fn try_acquire(b: &Backend, cap: u32, pool: &PoolQueue, gate: u32) -> bool {
    if !pool.enter(gate) {
        return false;
    }
    if take(b, cap) {
        return true;
    }
    pool.leave();
    false
}

/// The pool-wide limit for a request of `class`: static and integration requests leave
/// `reserve` of the pool's `slots` to interactive ones.
pub fn gate(class: Class, slots: u32, reserve: u32) -> u32 {
    match class {
        Class::Interactive | Class::Longpolling => u32::MAX,
        Class::Static | Class::Integration => slots.saturating_sub(reserve),
    }
}

fn take(b: &Backend, cap: u32) -> bool {
    let mut busy = b.busy.load(Ordering::Acquire);
    loop {
        if busy >= cap {
            return false;
        }
        match b
            .busy
            .compare_exchange_weak(busy, busy + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                b.stats.busy.inc();
                return true;
            }
            Err(now) => busy = now,
        }
    }
}

/// A slot held on a backend; released (and handed to a waiter) when dropped.
pub struct Slot {
    backend: Arc<Backend>,
    queue: Arc<PoolQueue>,
}

impl Slot {
    /// Wraps a slot already taken with [`try_acquire`] (or granted by the queue).
    pub fn taken(backend: Arc<Backend>, queue: Arc<PoolQueue>) -> Slot {
        Slot { backend, queue }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        release(&self.backend, &self.queue);
    }
}

fn release(b: &Backend, queue: &PoolQueue) {
    b.busy.fetch_sub(1, Ordering::SeqCst);
    b.stats.busy.dec();
    queue.leave();
    if queue.waiting.load(Ordering::SeqCst) > 0 {
        queue.dispatch();
    }
}

/// Who waits: the request's class and its tenant (the rendezvous key of its name).
pub struct Waiting {
    pub class: Class,
    pub tenant: u64,
}

/// Why a request got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSlot {
    /// The queue already holds `queue.max` requests.
    Full,
    /// No slot within `queue.timeout`.
    Timeout,
}

struct Waiter {
    id: u64,
    /// The backends this request may use (its session's, or its tenant's).
    targets: Vec<Arc<Backend>>,
    cap: u32,
    gate: u32,
    tx: oneshot::Sender<Arc<Backend>>,
}

#[derive(Default)]
struct ClassQueue {
    /// Tenants with waiters, in the order of their turns.
    turns: VecDeque<u64>,
    by_tenant: HashMap<u64, VecDeque<Waiter>>,
}

#[derive(Default)]
struct Inner {
    classes: [ClassQueue; 3],
    next_id: u64,
}

/// Metric handles of one pool's queue.
struct QueueStats {
    depth: [IntGauge; 3],
    wait: [Histogram; 3],
    full: IntCounter,
    timeout: IntCounter,
}

/// The queue of one pool.
pub struct PoolQueue {
    /// Requests waiting now (read without the lock by releasers).
    waiting: AtomicUsize,
    /// Slots taken on the pool's backends, all classes.
    busy: AtomicU32,
    depth: [AtomicUsize; 3],
    granted: AtomicU64,
    inner: Mutex<Inner>,
    /// The pool's queue series, made on first use (or when the pool has worker slots:
    /// [`PoolQueue::declare`]); a pool without `workers` never queues and has none.
    stats: std::sync::OnceLock<QueueStats>,
    families: crate::telemetry::QueueFamilies,
    name: std::sync::Arc<str>,
}

impl PoolQueue {
    pub fn new(pool: &str, metrics: &Metrics) -> PoolQueue {
        PoolQueue {
            waiting: AtomicUsize::new(0),
            busy: AtomicU32::new(0),
            depth: Default::default(),
            granted: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
            stats: std::sync::OnceLock::new(),
            families: metrics.queue_families(),
            name: std::sync::Arc::from(pool),
        }
    }

    /// Makes the pool's queue series visible (at 0) before its first queued request.
    pub fn declare(&self) {
        self.stats();
    }

    fn stats(&self) -> &QueueStats {
        self.stats.get_or_init(|| {
            let h = self.families.handles(&self.name);
            QueueStats {
                depth: h.depth,
                wait: h.wait,
                full: h.full,
                timeout: h.timeout,
            }
        })
    }

    /// Counts a slot taken in the pool if fewer than `gate` are (see [`gate`]).
    fn enter(&self, gate: u32) -> bool {
        let mut busy = self.busy.load(Ordering::Acquire);
        loop {
            if busy >= gate {
                return false;
            }
            match self.busy.compare_exchange_weak(
                busy,
                busy + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => busy = now,
            }
        }
    }

    fn leave(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    /// Requests waiting now: interactive, static, integration.
    pub fn depth(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| self.depth[i].load(Ordering::Relaxed))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every change is a
        // single push or pop), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot on one of `targets` (`cap` slots each, pool-wide `gate`);
    /// returns the backend whose slot it got.
    pub async fn wait(
        self: &Arc<Self>,
        who: Waiting,
        targets: Vec<Arc<Backend>>,
        (cap, gate): (u32, u32),
        cfg: QueueCfg,
    ) -> Result<Arc<Backend>, NoSlot> {
        let Waiting { class, tenant } = who;
        let (max, timeout) = (cfg.max, cfg.timeout);
        let ci = class_index(class);
        if self.waiting.load(Ordering::SeqCst) >= max {
            self.stats().full.inc();
            return Err(NoSlot::Full);
        }
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut inner = self.lock();
            inner.next_id += 1;
            let id = inner.next_id;
            let cq = &mut inner.classes[ci];
            let q = cq.by_tenant.entry(tenant).or_default();
            if q.is_empty() {
                cq.turns.push_back(tenant);
            }
            q.push_back(Waiter {
                id,
                targets,
                cap,
                gate,
                tx,
            });
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.depth[ci].fetch_add(1, Ordering::Relaxed);
            self.stats().depth[ci].inc();
            id
        };
        // A slot freed between the caller's attempt and the enqueue is found here.
        self.dispatch();
        let start = Instant::now();
        let mut ticket = Ticket {
            queue: self.clone(),
            ci,
            tenant,
            id,
            rx: Some(rx),
        };
        let got = match ticket.rx.as_mut() {
            Some(rx) => tokio::time::timeout(timeout, rx).await,
            None => return Err(NoSlot::Timeout),
        };
        self.stats().wait[ci].observe(start.elapsed().as_secs_f64());
        match got {
            Ok(Ok(b)) => {
                ticket.rx = None;
                Ok(b)
            }
            // Timed out (or the queue let go of the waiter): leave the queue, unless a
            // slot was granted meanwhile.
            _ => match ticket.leave() {
                Some(b) => Ok(b),
                None => {
                    self.stats().timeout.inc();
                    Err(NoSlot::Timeout)
                }
            },
        }
    }

    /// Hands free slots to waiting requests: classes in order, tenants taking turns.
    pub fn dispatch(&self) {
        let mut inner = self.lock();
        'again: loop {
            for ci in 0..3 {
                let cq = &mut inner.classes[ci];
                for _ in 0..cq.turns.len() {
                    let Some(tenant) = cq.turns.pop_front() else {
                        break;
                    };
                    let Some(q) = cq.by_tenant.get_mut(&tenant) else {
                        continue;
                    };
                    // The tenant's first request that a slot can serve.
                    let mut served = None;
                    for (i, w) in q.iter().enumerate() {
                        if let Some(b) = w
                            .targets
                            .iter()
                            .find(|b| try_acquire(b, w.cap, self, w.gate))
                        {
                            served = Some((i, b.clone()));
                            break;
                        }
                    }
                    let Some((i, b)) = served else {
                        cq.turns.push_back(tenant);
                        continue;
                    };
                    let w = q.remove(i);
                    if q.is_empty() {
                        cq.by_tenant.remove(&tenant);
                    } else {
                        cq.turns.push_back(tenant);
                    }
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.depth[ci].fetch_sub(1, Ordering::Relaxed);
                    self.stats().depth[ci].dec();
                    if let Some(w) = w {
                        if let Err(b) = w.tx.send(b) {
                            // The request went away: the slot goes back.
                            b.busy.fetch_sub(1, Ordering::SeqCst);
                            b.stats.busy.dec();
                            self.leave();
                        } else {
                            self.granted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // A higher class gets the next slot first.
                    continue 'again;
                }
            }
            return;
        }
    }

    /// Removes a waiter; false when it was no longer queued (granted).
    fn remove(&self, ci: usize, tenant: u64, id: u64) -> bool {
        let mut inner = self.lock();
        let cq = &mut inner.classes[ci];
        let Some(q) = cq.by_tenant.get_mut(&tenant) else {
            return false;
        };
        let Some(i) = q.iter().position(|w| w.id == id) else {
            return false;
        };
        q.remove(i);
        if q.is_empty() {
            cq.by_tenant.remove(&tenant);
            cq.turns.retain(|t| *t != tenant);
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.depth[ci].fetch_sub(1, Ordering::Relaxed);
        self.stats().depth[ci].dec();
        true
    }
}

/// A place in the queue; leaving it (timed out, or the request dropped) returns a
/// slot granted meanwhile to the pool.
struct Ticket {
    queue: Arc<PoolQueue>,
    ci: usize,
    tenant: u64,
    id: u64,
    rx: Option<oneshot::Receiver<Arc<Backend>>>,
}

impl Ticket {
    /// Leaves the queue; the backend of a slot granted before it could, if any.
    fn leave(&mut self) -> Option<Arc<Backend>> {
        let mut rx = self.rx.take()?;
        if self.queue.remove(self.ci, self.tenant, self.id) {
            return None;
        }
        // Not queued any more: granted (the grant is sent under the queue's lock).
        rx.try_recv().ok()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(b) = self.leave() {
            release(&b, &self.queue);
        }
    }
}
