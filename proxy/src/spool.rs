//! Responses read from the worker ahead of the client (contract r2, "Bodies and
//! buffering"): a response of an interactive, integration or static request is taken
//! from the worker as fast as it sends it and held in memory, up to `buffer_response`,
//! so a slow client does not hold an Odoo worker; the worker slot is released as soon
//! as the last byte is read from the worker. A response larger than `buffer_response`
//! is sent on as it comes from then on (spooling to files under `spool_dir` is not
//! built yet). Longpolls and WebSockets always stream.

use bytes::{Bytes, BytesMut};
use portier_config::Class;

use crate::ctx::Ctx;

/// The read-ahead state of one response.
#[derive(Default)]
pub struct ResponseBuffer {
    held: BytesMut,
    /// Over `buffer_response`: passed on as it comes.
    streaming: bool,
}

/// `response_body_filter`: holds the worker's response until its end (within
/// `buffer_response`), and frees the worker slot when the response has been read whole.
pub fn read_ahead(ctx: &mut Ctx, body: &mut Option<Bytes>, end_of_stream: bool) {
    let limit = match (ctx.class, &ctx.snap) {
        (Some(Class::Longpolling), _) | (None, _) => 0,
        (Some(_), Some(snap)) => ctx
            .tenant(snap)
            .map(|t| t.settings.buffer_response)
            .unwrap_or(0),
        (Some(_), None) => 0,
    };
    let rb = &mut ctx.response;
    if limit > 0 && !rb.streaming && !ctx.websocket {
        if let Some(chunk) = body.take() {
            if (rb.held.len() + chunk.len()) as u64 > limit {
                // Too large to hold: what is held goes now, the rest as it comes.
                rb.streaming = true;
                if rb.held.is_empty() {
                    *body = Some(chunk);
                } else {
                    rb.held.extend_from_slice(&chunk);
                    *body = Some(rb.held.split().freeze());
                }
            } else {
                rb.held.extend_from_slice(&chunk);
            }
        }
        if end_of_stream && !rb.streaming && !rb.held.is_empty() {
            *body = Some(rb.held.split().freeze());
        }
    }
    if end_of_stream {
        // The last byte was read from the worker: its slot is free.
        ctx.slot = None;
    }
}
