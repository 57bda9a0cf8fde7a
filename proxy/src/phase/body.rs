//! Request bodies: the `max_body` limit, and bodies received before a worker is
//! picked (so a slow client never holds an Odoo worker and a bad body never reaches
//! one).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use portier_config::Settings;

use crate::io::forward;
use crate::io::spool::{self, BodySpool};
use crate::phase::answer::Answer;
use crate::phase::ctx::Ctx;
use crate::snapshot::Snapshot;
use portier_runtime::telemetry::{Direction, Metrics, Refusal};

/// Timeout for reading a request body from the client.
pub const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The body phase of `request_filter`: refuses a declared body over `max_body`, and
/// receives every body (Content-Length or chunked) completely before a worker is
/// picked — in memory up to `buffer_body`, beyond that in a file under `spool_dir` — so
/// a slow client never holds an Odoo worker and a body with bad chunking never reaches
/// one. The whole body is handed to pingora to send at full speed and to replay on a
/// retry (vendor/PATCHES.md, patch 3). When it cannot be spooled (disk full, directory
/// gone), what was received is sent and the rest streams.
pub async fn receive(
    session: &mut Session,
    ctx: &mut Ctx,
    snap: &Snapshot,
    metrics: &Metrics,
) -> Result<Result<(), Answer>> {
    let Some(settings) = ctx.tenant(snap).map(|t| &t.settings) else {
        return Ok(Err(Answer::error(500)));
    };
    let spool_dir = &snap.config.listen.spool_dir;
    let declared = forward::content_length(session.req_header());
    if declared.is_some_and(|n| n > settings.max_body) {
        return Ok(Err(too_large(true)));
    }
    session.set_read_timeout(Some(CLIENT_IO_TIMEOUT));
    if !session.is_body_empty() && !ctx.route.websocket {
        if let Err(answer) = read_whole(session, ctx, settings, spool_dir, metrics).await? {
            return Ok(Err(answer));
        }
    }
    if ctx.route.websocket {
        session.set_read_timeout(Some(settings.websocket_idle));
    }
    Ok(Ok(()))
}

fn too_large(close: bool) -> Answer {
    Answer::refuse(413, Refusal::BodyTooLarge, "request body too large", close)
}

async fn read_whole(
    session: &mut Session,
    ctx: &mut Ctx,
    settings: &Settings,
    spool_dir: &Path,
    metrics: &Metrics,
) -> Result<Result<(), Answer>> {
    if forward::expects_continue(
        session
            .req_header()
            .headers
            .get(header::EXPECT)
            .map(|v| v.as_bytes()),
    ) {
        session.write_continue_response().await?;
    }
    let mut body = BodySpool::new(settings.buffer_body.min(settings.max_body), spool_dir);
    loop {
        if session.is_body_done() {
            break;
        }
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                ctx.body.seen += chunk.len() as u64;
                if ctx.body.seen > settings.max_body {
                    return Ok(Err(too_large(true)));
                }
                if let Err(e) = body.push(&chunk).await {
                    // No room to spool: send what came, stream the rest.
                    spool::log_spool_error(&e);
                    session.as_mut().set_retry_buffer(body.so_far(&chunk).await);
                    return Ok(Ok(()));
                }
            }
            Ok(None) => break,
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
    let spooled = body.spooled();
    match body.finish().await {
        Ok(whole) => {
            metrics.spooled(Direction::Request, spooled);
            if ctx.body.keep {
                ctx.body.kept = Some(whole.clone());
            }
            session.as_mut().set_retry_buffer(whole);
            ctx.body.preread = true;
            Ok(Ok(()))
        }
        Err(e) => {
            // The body was received but cannot be mapped back: nothing can be sent.
            spool::log_spool_error(&e);
            Ok(Err(Answer::error(500)))
        }
    }
}

/// `request_body_filter`: counts a streamed body against `max_body`.
pub fn count_streamed(ctx: &mut Ctx, body: &Option<Bytes>) -> Result<()> {
    if ctx.body.preread || ctx.route.websocket {
        return Ok(());
    }
    if let Some(b) = body {
        ctx.body.seen += b.len() as u64;
        let max = ctx
            .snap
            .as_ref()
            .and_then(|s| ctx.tenant(s).map(|t| t.settings.max_body))
            .unwrap_or(u64::MAX);
        if ctx.body.seen > max {
            ctx.refused = Some(Refusal::BodyTooLarge);
            return Err(Error::explain(
                ErrorType::HTTPStatus(413),
                "request body over max_body",
            ));
        }
    }
    Ok(())
}
