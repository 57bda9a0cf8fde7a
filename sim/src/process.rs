//! The worker process as Odoo's prefork server runs it (`odoo/service/server.py`,
//! `WorkerHTTP`): it works on one request at a time, reads the body with its socket
//! timeout, and writes its response itself, so a slow reader keeps it busy.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::routes::Resp;
use crate::Shared;

/// Why a request gets no answer: hyper closes the connection without a response.
#[derive(Debug)]
pub enum Dropped {
    /// The worker process serving the connection was recycled (`limit_request`).
    Recycled,
    /// The client stalled past `ODOO_HTTP_SOCKET_TIMEOUT` while sending its body.
    Stalled,
    /// The worker process was killed while working on the request.
    Killed,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dropped::Recycled => "worker process recycled",
            Dropped::Stalled => "client stalled",
            Dropped::Killed => "worker killed",
        })
    }
}

impl std::error::Error for Dropped {}

/// Counts a request as worked on (for `busy`, `peak_busy` and `busy_seconds`).
pub(crate) struct Busy(Arc<Shared>, Instant);

impl Busy {
    pub(crate) fn new(shared: &Arc<Shared>) -> Busy {
        let now = shared.busy.fetch_add(1, Ordering::AcqRel) + 1;
        shared.peak_busy.fetch_max(now, Ordering::AcqRel);
        Busy(shared.clone(), Instant::now())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        let held = self.1.elapsed().as_micros() as u64;
        self.0.busy_micros.fetch_add(held, Ordering::Relaxed);
    }
}

/// A response body that keeps its worker process (slot) busy until the body has been
/// written out, as a prefork Odoo process writes its response itself: a slow reader
/// holds the worker (`odoo/service/server.py`, `WorkerHTTP.process_request`).
pub struct Held {
    /// What is left to write, handed to hyper a frame at a time (hyper asks for the
    /// next frame as its write buffer drains, so the body ends when it is written).
    rest: Bytes,
    /// Bytes still written before the process dies mid-response (`Mode::Truncate`).
    cut: Option<usize>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    _busy: Option<Busy>,
}

const FRAME: usize = 64 * 1024;

impl hyper::body::Body for Held {
    type Data = Bytes;
    type Error = Dropped;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Dropped>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let mut n = this.rest.len().min(FRAME);
        if let Some(cut) = this.cut.as_mut() {
            if *cut == 0 {
                // The process dies: hyper aborts the connection mid-body.
                return std::task::Poll::Ready(Some(Err(Dropped::Killed)));
            }
            n = n.min(*cut);
            *cut -= n;
        }
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(this.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

pub(crate) fn held(
    resp: Resp,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    busy: Option<Busy>,
) -> Response<Held> {
    let (parts, body) = resp.into_parts();
    // A `Full` body is one frame, already there.
    let rest = body
        .collect()
        .now_or_never()
        .and_then(|r| r.ok())
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Response::from_parts(
        parts,
        Held {
            cut: None,
            rest,
            _slot: slot,
            _busy: busy,
        },
    )
}

/// [`held`], but the worker dies after writing half of the body (at least one byte).
pub(crate) fn held_truncated(
    resp: Resp,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    busy: Option<Busy>,
) -> Response<Held> {
    let mut r = held(resp, slot, busy);
    let half = r.body().rest.len() / 2;
    r.body_mut().cut = Some(half.max(1));
    r
}

/// Reads a request body as an Odoo worker does: with the socket timeout on every read.
pub(crate) async fn read_body(body: Incoming, timeout: Option<Duration>) -> Result<Bytes, Dropped> {
    let Some(t) = timeout else {
        return Ok(body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default());
    };
    let mut body = body;
    let mut out = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(t, body.frame()).await {
            Err(_) => return Err(Dropped::Stalled),
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            // The client went away: nothing to answer.
            Ok(Some(Err(_))) => return Err(Dropped::Stalled),
        }
    }
}
