//! Request bodies: the `max_body` limit, and bodies received before a worker is
//! picked (so a slow client never holds an Odoo worker and a bad body never reaches
//! one).

use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use portier_config::Settings;

use crate::answer::Answer;
use crate::ctx::Ctx;
use crate::forward;
use crate::telemetry::Refusal;

/// Timeout for reading a request body from the client.
pub const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The most one read of a request body returns (pingora's HTTP/1 body buffer, 64 KiB,
/// plus the body bytes that came with the header block): room kept in the replay
/// buffer so that the read crossing `buffer_body` still fits.
const READ_SLACK: u64 = 128 * 1024;

/// The body phase of `request_filter`: refuses a declared body over `max_body`, and
/// receives a body of up to `buffer_body` (Content-Length or chunked) completely before
/// a worker is picked: a slow client never holds an Odoo worker, a body with bad
/// chunking never reaches one, and the body can be sent again on a retry (pingora's
/// replay buffer, given room for it: vendor/PATCHES.md, patch 2). Larger bodies stream
/// after their first `buffer_body` bytes.
pub async fn receive(
    session: &mut Session,
    ctx: &mut Ctx,
    settings: &Settings,
) -> Result<Result<(), Answer>> {
    let declared = forward::content_length(session.req_header());
    if declared.is_some_and(|n| n > settings.max_body) {
        return Ok(Err(too_large(true)));
    }
    session.set_read_timeout(Some(CLIENT_IO_TIMEOUT));
    let has_body = !session.is_body_empty();
    let cap = settings.buffer_body.min(settings.max_body);
    if has_body && declared.is_none_or(|n| n <= cap) {
        if let Err(answer) = preread(session, ctx, settings.max_body, cap).await? {
            return Ok(Err(answer));
        }
    }
    if ctx.websocket {
        session.set_read_timeout(Some(settings.websocket_idle));
    }
    Ok(Ok(()))
}

fn too_large(close: bool) -> Answer {
    Answer::refuse(413, Refusal::BodyTooLarge, "request body too large", close)
}

/// Reads the request body before a worker is picked, into pingora's replay buffer:
/// all of it, or (a chunked body larger than `cap`) its first `cap` bytes.
async fn preread(
    session: &mut Session,
    ctx: &mut Ctx,
    max_body: u64,
    cap: u64,
) -> Result<Result<(), Answer>> {
    let room = usize::try_from(cap.saturating_add(READ_SLACK)).unwrap_or(usize::MAX);
    session.as_mut().enable_retry_buffering_with_capacity(room);
    if forward::expects_continue(
        session
            .req_header()
            .headers
            .get(header::EXPECT)
            .map(|v| v.as_bytes()),
    ) {
        session.write_continue_response().await?;
    }
    loop {
        if session.is_body_done() {
            ctx.body_preread = true;
            return Ok(Ok(()));
        }
        // Past `cap` (a chunked body of unknown size), the rest streams.
        if ctx.body_seen >= cap {
            return Ok(Ok(()));
        }
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                ctx.body_seen += chunk.len() as u64;
                if ctx.body_seen > max_body {
                    return Ok(Err(too_large(true)));
                }
            }
            Ok(None) => {
                ctx.body_preread = true;
                return Ok(Ok(()));
            }
            Err(e) => {
                return Ok(Err(match e.etype() {
                    ErrorType::ReadTimedout => Answer::refuse(
                        408,
                        Refusal::BadRequest,
                        "timed out reading the request body",
                        true,
                    ),
                    _ => Answer::refuse(400, Refusal::BadRequest, "malformed request body", true),
                }));
            }
        }
    }
}

/// `request_body_filter`: counts a streamed body against `max_body`.
pub fn count_streamed(ctx: &mut Ctx, body: &Option<Bytes>) -> Result<()> {
    if ctx.body_preread || ctx.websocket {
        return Ok(());
    }
    if let Some(b) = body {
        ctx.body_seen += b.len() as u64;
        let max = ctx
            .snap
            .as_ref()
            .and_then(|s| ctx.tenant(s).map(|t| t.settings.max_body))
            .unwrap_or(u64::MAX);
        if ctx.body_seen > max {
            ctx.refused = Some(Refusal::BodyTooLarge);
            return Err(Error::explain(
                ErrorType::HTTPStatus(413),
                "request body over max_body",
            ));
        }
    }
    Ok(())
}
