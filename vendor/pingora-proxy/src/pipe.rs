// Copyright 2026 the portier authors (a patch on pingora-proxy, see vendor/PATCHES.md).
//
// Licensed under the Apache License, Version 2.0 (the "License"), as the rest of this
// crate: http://www.apache.org/licenses/LICENSE-2.0

//! The bounded task pipe between the downstream and upstream halves of a proxied request.
//!
//! Each direction of a request has exactly one sender and one receiver, polled from the
//! same task, and holds a handful of tasks at most. A tokio `mpsc` channel (built for many
//! senders across threads) costs two allocations of ~1.9 KiB per channel, two channels per
//! request, held for as long as the request is in flight; this pipe is one small
//! allocation plus a queue of `capacity` tasks, with the subset of the `mpsc` API the
//! proxy uses and its error types.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

pub use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};

struct State<T> {
    queue: VecDeque<T>,
    capacity: usize,
    /// The receiver waiting for a task (or for the sender to go).
    rx_waker: Option<Waker>,
    /// The sender waiting for room (or for the receiver to go).
    tx_waker: Option<Waker>,
    tx_gone: bool,
    rx_gone: bool,
}

impl<T> State<T> {
    /// The next task, waking a sender waiting for the room it leaves.
    fn pop(&mut self) -> Option<T> {
        let value = self.queue.pop_front()?;
        if let Some(w) = self.tx_waker.take() {
            w.wake();
        }
        Some(value)
    }
}

type Shared<T> = Arc<Mutex<State<T>>>;

fn lock<T>(shared: &Shared<T>) -> MutexGuard<'_, State<T>> {
    // a panic while holding the lock leaves the queue consistent: keep using it
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keep `waker` in `slot`; a different waker already there is woken so that it polls
/// again rather than being lost.
fn register(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => {
            if let Some(old) = slot.replace(waker.clone()) {
                old.wake();
            }
        }
    }
}

/// A pipe holding at most `capacity` tasks (at least one).
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Mutex::new(State {
        queue: VecDeque::new(), // allocated by the first send
        capacity: capacity.max(1),
        rx_waker: None,
        tx_waker: None,
        tx_gone: false,
        rx_gone: false,
    }));
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// The sending end (one per pipe).
pub struct Sender<T> {
    shared: Shared<T>,
}

/// A reserved place in the pipe: sending through it cannot fail or wait.
pub struct Permit<'a, T> {
    sender: &'a Sender<T>,
}

impl<T> std::fmt::Debug for Permit<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

impl<T> Permit<'_, T> {
    /// Send `value` in the place reserved (the only sender cannot have taken it).
    pub fn send(self, value: T) {
        let mut state = lock(&self.sender.shared);
        if state.rx_gone {
            return; // as for mpsc: the value is dropped
        }
        state.queue.push_back(value);
        if let Some(w) = state.rx_waker.take() {
            w.wake();
        }
    }
}

impl<T> Sender<T> {
    fn poll_reserve(&self, cx: &mut Context<'_>) -> Poll<Result<(), SendError<()>>> {
        let mut state = lock(&self.shared);
        if state.rx_gone {
            Poll::Ready(Err(SendError(())))
        } else if state.queue.len() < state.capacity {
            Poll::Ready(Ok(()))
        } else {
            register(&mut state.tx_waker, cx.waker());
            Poll::Pending
        }
    }

    /// Wait for room, then send `value`; fails (giving `value` back) once the receiver
    /// is gone.
    pub async fn send(&self, value: T) -> Result<(), SendError<T>> {
        match poll_fn(|cx| self.poll_reserve(cx)).await {
            Ok(()) => {
                Permit { sender: self }.send(value);
                Ok(())
            }
            Err(_) => Err(SendError(value)),
        }
    }

    /// Wait for room and reserve it.
    pub async fn reserve(&self) -> Result<Permit<'_, T>, SendError<()>> {
        poll_fn(|cx| self.poll_reserve(cx)).await?;
        Ok(Permit { sender: self })
    }

    /// Reserve room if there is some now.
    pub fn try_reserve(&self) -> Result<Permit<'_, T>, TrySendError<()>> {
        let state = lock(&self.shared);
        if state.rx_gone {
            Err(TrySendError::Closed(()))
        } else if state.queue.len() < state.capacity {
            Ok(Permit { sender: self })
        } else {
            Err(TrySendError::Full(()))
        }
    }

    /// Whether the receiver is gone.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared).rx_gone
    }

    /// Wait until the receiver is gone.
    pub async fn closed(&self) {
        poll_fn(|cx| {
            let mut state = lock(&self.shared);
            if state.rx_gone {
                Poll::Ready(())
            } else {
                register(&mut state.tx_waker, cx.waker());
                Poll::Pending
            }
        })
        .await
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        state.tx_gone = true;
        if let Some(w) = state.rx_waker.take() {
            w.wake();
        }
    }
}

/// The receiving end (one per pipe).
pub struct Receiver<T> {
    shared: Shared<T>,
}

impl<T> Receiver<T> {
    /// The next task; `None` once the pipe is empty and the sender is gone. Cancel safe.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            let mut state = lock(&self.shared);
            if let Some(value) = state.pop() {
                Poll::Ready(Some(value))
            } else if state.tx_gone {
                Poll::Ready(None)
            } else {
                register(&mut state.rx_waker, cx.waker());
                Poll::Pending
            }
        })
        .await
    }

    /// The next task if there is one now.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut state = lock(&self.shared);
        match state.pop() {
            Some(value) => Ok(value),
            None if state.tx_gone => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        state.rx_gone = true;
        state.queue.clear();
        if let Some(w) = state.tx_waker.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// Poll `f` once (without a task to wake): `Some` if it is ready.
    fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
        let f = std::pin::pin!(f);
        match f.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn tasks_arrive_in_order_and_the_end_is_seen() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.send(1).await.unwrap();
        tx.try_reserve().unwrap().send(2);
        assert!(matches!(tx.try_reserve(), Err(TrySendError::Full(()))));
        assert!(
            now_or_never(tx.send(3)).is_none(),
            "a full pipe makes send wait"
        );
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.try_recv().ok(), Some(2));
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        drop(tx);
        assert_eq!(rx.recv().await, None);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
    }

    #[tokio::test]
    async fn a_waiting_sender_is_woken_by_room_and_by_the_receiver_leaving() {
        let (tx, mut rx) = channel::<u32>(1);
        tx.send(1).await.unwrap();
        let (sent, got) = tokio::join!(tx.send(2), async {
            tokio::task::yield_now().await;
            (rx.recv().await, rx.recv().await)
        });
        assert!(sent.is_ok());
        assert_eq!(got, (Some(1), Some(2)));
        tx.send(3).await.unwrap();
        let (sent, _) = tokio::join!(tx.send(4), async {
            tokio::task::yield_now().await;
            drop(rx)
        });
        assert_eq!(sent.err().map(|e| e.0), Some(4));
        assert!(tx.is_closed());
        tx.closed().await;
        assert!(tx.reserve().await.is_err());
    }
}
