//! Responses portier writes itself: refusals, redirects and error pages. Every phase
//! of the request path that stops a request returns a typed [`Answer`]; this module
//! turns it into a response, in one place.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::{FailToProxy, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use portier_config::Class;

use crate::io::forward;
use crate::phase::ctx::Ctx;
use portier_runtime::limits;
use portier_runtime::telemetry::Refusal;

/// A refused request's unread body up to this size is drained to keep the connection.
const DRAIN_LIMIT: u64 = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

const MAINTENANCE_PAGE: &str = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Maintenance</title></head>\n<body style=\"font-family:sans-serif;text-align:center;margin-top:15%\">\n<h1>Back in a moment</h1>\n<p>This service is briefly unavailable. Please try again in a few seconds.</p>\n</body></html>\n";

/// The page of a tenant in maintenance (its modules are being upgraded, or it moves).
const UPGRADE_PAGE: &str = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Maintenance</title></head>\n<body style=\"font-family:sans-serif;text-align:center;margin-top:15%\">\n<h1>Down for maintenance</h1>\n<p>This database is being upgraded. Please come back in a few minutes.</p>\n</body></html>\n";

/// A response portier sends instead of proxying.
#[derive(Debug)]
pub enum Answer {
    /// A short text body; `why` is logged as `refused` (none for plain errors).
    Text {
        status: u16,
        why: Option<Refusal>,
        text: &'static str,
        close: bool,
    },
    /// `308` to the https listener.
    Redirect { location: String },
    /// `429` from a tenant limit, with the contract's JSON body.
    Limited {
        refused: limits::Refused,
        tenant: Arc<str>,
        class: Class,
    },
    /// `503` with `Retry-After` and the maintenance page: no usable backend.
    Unavailable,
    /// `503` with `Retry-After` and `{"error": "queue_full" | "queue_timeout"}`: no
    /// worker slot.
    NoSlot(Refusal),
    /// `503` with `Retry-After: 60` and the maintenance page: the tenant is in
    /// maintenance.
    Maintenance,
    /// `429` from the login limit.
    LoginLimited { tenant: Arc<str>, retry_after: u64 },
    /// A fresh asset-cache entry.
    Cached(Arc<crate::io::assets::Entry>),
    /// `200` with an ACME HTTP-01 key authorization.
    AcmeChallenge(Bytes),
}

impl Answer {
    pub fn refuse(status: u16, why: Refusal, text: &'static str, close: bool) -> Answer {
        Answer::Text {
            status,
            why: Some(why),
            text,
            close,
        }
    }

    /// A bare error status (after a failed proxy attempt); the connection closes.
    pub fn error(status: u16) -> Answer {
        let text = match status {
            400 => "bad request",
            408 => "request timeout",
            413 => "request body too large",
            502 => "bad gateway",
            504 => "gateway timeout",
            _ => "error",
        };
        Answer::Text {
            status,
            why: None,
            text,
            close: true,
        }
    }

    fn refusal(&self) -> Option<Refusal> {
        match self {
            Answer::Text { why, .. } => *why,
            Answer::Redirect { .. } => None,
            Answer::Limited { refused, .. } => Some(refused.why),
            Answer::Unavailable => Some(Refusal::NoBackend),
            Answer::NoSlot(why) => Some(*why),
            Answer::Maintenance => Some(Refusal::Maintenance),
            Answer::LoginLimited { .. } => Some(Refusal::LoginLimited),
            Answer::Cached(_) | Answer::AcmeChallenge(_) => None,
        }
    }
}

/// The parts of a response portier writes.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Bytes,
    extra: Option<(&'static str, String)>,
    close: bool,
}

const TEXT: &str = "text/plain; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";

impl Reply {
    fn new(status: u16, content_type: &'static str, body: Bytes) -> Reply {
        Reply {
            status,
            content_type,
            body,
            extra: None,
            close: false,
        }
    }

    /// With one more header (`Location`, `Retry-After`).
    fn with(mut self, name: &'static str, value: String) -> Reply {
        self.extra = Some((name, value));
        self
    }
}

impl From<Answer> for Reply {
    fn from(a: Answer) -> Reply {
        match a {
            Answer::Text {
                status,
                text,
                close,
                ..
            } => Reply {
                close,
                ..Reply::new(status, TEXT, Bytes::from(format!("{text}\n")))
            },
            Answer::Redirect { location } => {
                Reply::new(308, TEXT, Bytes::from_static(b"moved to https\n"))
                    .with("location", location)
            }
            Answer::Limited {
                refused,
                tenant,
                class,
            } => Reply::new(
                429,
                JSON,
                Bytes::from(limits::refusal_body(&refused, &tenant, class)),
            )
            .with("retry-after", refused.retry_after.to_string()),
            Answer::Unavailable => {
                Reply::new(503, HTML, Bytes::from_static(MAINTENANCE_PAGE.as_bytes()))
                    .with("retry-after", "5".to_string())
            }
            Answer::Maintenance => {
                Reply::new(503, HTML, Bytes::from_static(UPGRADE_PAGE.as_bytes()))
                    .with("retry-after", "60".to_string())
            }
            Answer::LoginLimited {
                tenant,
                retry_after,
            } => Reply::new(429, JSON, login_limited_body(&tenant, retry_after))
                .with("retry-after", retry_after.to_string()),
            // Sent by `assets::serve`; never built.
            Answer::Cached(_) => Reply {
                close: true,
                ..Reply::new(500, TEXT, Bytes::new())
            },
            Answer::AcmeChallenge(key_authorization) => {
                Reply::new(200, "application/octet-stream", key_authorization)
            }
            Answer::NoSlot(why) => Reply::new(
                503,
                JSON,
                Bytes::from(format!("{{\"error\":\"{}\"}}", why.as_str())),
            )
            .with("retry-after", "5".to_string()),
        }
    }
}

/// `{"error":"login_limited","tenant":"...","retry_after":N}`.
fn login_limited_body(tenant: &str, retry_after: u64) -> Bytes {
    let mut body = String::with_capacity(80);
    body.push_str("{\"error\":\"login_limited\",\"tenant\":");
    portier_runtime::access_log::push_json_str(&mut body, tenant);
    body.push_str(",\"retry_after\":");
    body.push_str(&retry_after.to_string());
    body.push('}');
    Bytes::from(body)
}

/// Sends `answer` to the client and records its refusal reason for the access log.
pub async fn send(session: &mut Session, ctx: &mut Ctx, answer: Answer) -> Result<()> {
    if let Some(why) = answer.refusal() {
        ctx.refused = Some(why);
    }
    if let Answer::Cached(entry) = answer {
        return crate::io::assets::serve(session, &entry, &ctx.request_id, ctx.hsts()).await;
    }
    let Reply {
        status,
        content_type,
        body,
        extra,
        mut close,
    } = Reply::from(answer);
    if !close && !session.is_body_done() {
        // An unread body would be taken for the next request: read and drop a
        // small one to keep the connection; close it otherwise.
        let small = forward::content_length(session.req_header()).is_some_and(|n| n <= DRAIN_LIMIT);
        close = !small
            || !matches!(
                tokio::time::timeout(DRAIN_TIMEOUT, session.drain_request_body()).await,
                Ok(Ok(()))
            );
    }
    if close {
        session.set_keepalive(None);
    }
    let mut h = ResponseHeader::build(status, Some(6))?;
    h.insert_header(header::CONTENT_TYPE, content_type)?;
    h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    h.insert_header("x-request-id", ctx.request_id.clone())?;
    h.insert_header(header::CACHE_CONTROL, "no-store")?;
    if let Some((k, v)) = extra {
        h.insert_header(k, v)?;
    }
    if let Some(hsts) = ctx.hsts() {
        h.insert_header(header::STRICT_TRANSPORT_SECURITY, hsts)?;
    }
    if close {
        h.insert_header(header::CONNECTION, "close")?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// `fail_to_proxy`: the answer to a request that failed before its response began —
/// 503 with the maintenance page when no backend was usable, 503 with the queue's
/// reason, else the status of the error — and what pingora is told of it.
pub async fn failed(session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
    let code = error_status(e, ctx);
    if code > 0 && session.response_written().is_none() {
        let answer = match (code, ctx.refused) {
            (503, Some(Refusal::NoBackend)) => Answer::Unavailable,
            (503, Some(why @ (Refusal::QueueFull | Refusal::QueueTimeout))) => Answer::NoSlot(why),
            _ => Answer::error(code),
        };
        if let Err(err) = send(session, ctx, answer).await {
            tracing::debug!(error = %err, "cannot send error response");
        }
    }
    FailToProxy {
        error_code: code,
        can_reuse_downstream: false,
    }
}

/// The status for a failed request: the error's own, 504 for upstream timeouts, 502
/// for other upstream failures, 408/400 for client faults, 0 (nothing to send) when
/// the client is gone.
fn error_status(e: &Error, ctx: &mut Ctx) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(c) => *c,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if *e.esource() == ErrorSource::Upstream =>
        {
            504
        }
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                ErrorType::ReadTimedout => 408,
                _ => {
                    ctx.refused.get_or_insert(Refusal::BadRequest);
                    400
                }
            },
            _ => 500,
        },
    }
}
