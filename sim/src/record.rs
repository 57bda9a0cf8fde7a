//! What a simulated worker received, kept for the tests to assert on (the last
//! `MAX_RECORDED` requests, while recording is on).

use std::sync::atomic::Ordering;
use std::time::Instant;

use http::{HeaderMap, Method};

use crate::Shared;

/// One request as the worker received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body_len: usize,
    /// The database Odoo selected for it, on the paths that select one.
    pub db: Option<String>,
    /// When the request head arrived, and when its body was complete.
    pub head_at: Instant,
    pub body_at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// All values of a header (for checking that a client copy was dropped).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    }
}

const MAX_RECORDED: usize = 4096;

pub(crate) fn record(
    shared: &Shared,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body_len: usize,
    db: Option<String>,
    at: Instant,
) {
    record_full(
        shared,
        Recorded {
            method: method.as_str().to_string(),
            target: target.to_string(),
            headers: headers.clone(),
            body_len,
            db,
            head_at: at,
            body_at: at,
        },
    );
}

pub(crate) fn record_full(shared: &Shared, rec: Recorded) {
    if !shared.recording.load(Ordering::Relaxed) {
        return;
    }
    if let Ok(mut r) = shared.recorded.lock() {
        if r.len() >= MAX_RECORDED {
            r.pop_front();
        }
        r.push_back(rec);
    }
}

/// FNV-1a of a body, as the echo reports it (`body_fnv`): a test compares it with its
/// own body's to check that the bytes arrived unchanged.
pub fn body_fnv(body: &[u8]) -> u64 {
    body.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
