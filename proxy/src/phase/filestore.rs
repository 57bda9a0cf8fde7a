//! The filestore offload (configuration: the pool's `filestore`). Odoo started with
//! `--x-sendfile` answers a download with `X-Accel-Redirect: /web/filestore/DB/xx/SHA1`,
//! `X-Sendfile`, `Content-Length: 0` and the download's headers (`odoo/http.py`,
//! `Stream.get_response`), and leaves the bytes to the web server. portier sends them:
//!
//! 1. `take_over` (at the worker's response head): the file is checked and opened —
//!    the tenant's database only, opened beneath `filestore/DB` (`io::filestore`) —
//!    the worker's slot is freed, and the attempt ends with [`HANDOVER`], an error
//!    that is never retried and counts against no backend. The worker's connection is
//!    not kept (its response is over).
//! 2. `send` (pingora's `fail_to_proxy`, where portier writes its own answers): the
//!    worker's status and headers, less `X-Accel-Redirect`/`X-Sendfile`, with the
//!    real `Content-Length` (and `Content-Range`), then the file read in 64 KiB pieces as
//!    the client takes them: never spooled, never whole in memory, never compressed or
//!    cached. The client's connection is kept.
//!
//! A client's own request for `/web/filestore/...` never reaches a worker (`internal`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, Session};
use pingora::{Error, ErrorType, Result};
use portier_runtime::telemetry::{Metrics, Refusal};

use crate::io::filestore::{self as store, Handover, Plan, Refused};
use crate::phase::answer::{self, Answer};
use crate::phase::ctx::Ctx;
use crate::phase::response;

/// The error type ending an attempt whose answer is a handover.
pub const HANDOVER: ErrorType = ErrorType::Custom("filestore handover");

/// The worker's header naming the file it hands over.
static X_ACCEL_REDIRECT: http::HeaderName = http::HeaderName::from_static("x-accel-redirect");

/// How much of the file is read at a time.
const CHUNK: usize = 64 << 10;

/// The answer to a client's own request for the filestore's internal location (its
/// normalised `path`): `404`, as nginx's `internal` location answers; no worker sees it.
pub fn internal(path: &str) -> std::result::Result<(), Answer> {
    if path.starts_with(store::PREFIX) {
        return Err(Answer::refuse(
            404,
            Refusal::FilestoreDenied,
            "not found",
            false,
        ));
    }
    Ok(())
}

/// `upstream_response_filter`: when the worker's answer hands a file over, decides what
/// the client gets (kept in the request's context for `send`) and ends the attempt.
pub async fn take_over(ctx: &mut Ctx, req: &RequestHeader, resp: &ResponseHeader) -> Result<()> {
    let Some(target) = resp.headers.get(&X_ACCEL_REDIRECT) else {
        return Ok(());
    };
    if !matches!(resp.status.as_u16(), 200 | 206) {
        return Ok(());
    }
    let target = String::from_utf8_lossy(target.as_bytes()).into_owned();
    let handover = match prepare(ctx, req, resp, &target).await {
        Ok(h) => h,
        Err(why) => Handover::Refuse(why),
    };
    // The worker is done with this request: its slot goes to the next one now.
    ctx.attempt.slot = None;
    ctx.response.handover = Some(handover);
    Err(Error::explain(HANDOVER, "the worker handed a file over"))
}

async fn prepare(
    ctx: &Ctx,
    req: &RequestHeader,
    resp: &ResponseHeader,
    target: &str,
) -> std::result::Result<Handover, Refused> {
    let snap = ctx.snap.as_ref().ok_or(Refused::Denied)?;
    let root = ctx
        .pool(snap)
        .and_then(|p| p.cfg.filestore.clone())
        .ok_or(Refused::Unset)?;
    let tenant = ctx.tenant(snap).ok_or(Refused::Denied)?;
    let name = ctx.route.tenant_name.as_deref().unwrap_or(&tenant.name);
    let db = tenant
        .database_for(name)
        .ok_or(Refused::Denied)?
        .into_owned();
    let Some(rel) = store::relative_path(target, &db) else {
        tracing::warn!(
            tenant = name,
            target,
            "filestore: a path outside the tenant's database refused"
        );
        return Err(Refused::Denied);
    };
    let (file, size) = tokio::task::spawn_blocking(move || store::open_beneath(&root, &db, &rel))
        .await
        .map_err(|_| Refused::Denied)??;
    let get = |h: &header::HeaderName, from: &http::HeaderMap| {
        from.get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let plan = store::plan(
        resp.status.as_u16(),
        get(&header::CONTENT_RANGE, &resp.headers).as_deref(),
        get(&header::RANGE, &req.headers).as_deref(),
        get(&header::IF_RANGE, &req.headers).as_deref(),
        (
            get(&header::ETAG, &resp.headers).as_deref(),
            get(&header::LAST_MODIFIED, &resp.headers).as_deref(),
        ),
        size,
    )
    .ok_or(Refused::Denied)?;
    let (status, start, len, range) = match plan {
        Plan::Whole => (200, 0, size, None),
        Plan::Part(a, b) => (206, a, b - a + 1, Some(format!("bytes {a}-{b}/{size}"))),
        Plan::Unsatisfiable => (416, 0, 0, Some(format!("bytes */{size}"))),
    };
    let header = client_header(ctx, resp, status, len, range).map_err(|_| Refused::Denied)?;
    Ok(Handover::Send {
        header: Box::new(header),
        file,
        start,
        len,
    })
}

/// The worker's header as the client gets it with the file.
fn client_header(
    ctx: &Ctx,
    resp: &ResponseHeader,
    status: u16,
    len: u64,
    range: Option<String>,
) -> Result<ResponseHeader> {
    let mut h = resp.clone();
    h.set_status(status)?;
    for name in [
        "x-accel-redirect",
        "x-sendfile",
        "transfer-encoding",
        "content-encoding",
    ] {
        h.remove_header(name);
    }
    h.remove_header(&header::CONTENT_RANGE);
    h.insert_header(header::CONTENT_LENGTH, len.to_string())?;
    h.insert_header(header::ACCEPT_RANGES, "bytes")?;
    if let Some(r) = range {
        h.insert_header(header::CONTENT_RANGE, r)?;
    }
    response::client_headers(ctx, &mut h)?;
    Ok(h)
}

/// `fail_to_proxy` for a handover: the file (or portier's refusal) to the client.
pub async fn send(
    session: &mut Session,
    ctx: &mut Ctx,
    h: Handover,
    metrics: &Metrics,
) -> FailToProxy {
    let m = &metrics.filestore;
    let (header, file, start, len) = match h {
        Handover::Send {
            header,
            file,
            start,
            len,
        } => (header, file, start, len),
        Handover::Refuse(why) => {
            let (status, refusal, counter) = match why {
                Refused::Unset => (502, Refusal::FilestoreUnset, &m.unset),
                Refused::Denied => (502, Refusal::FilestoreDenied, &m.denied),
                Refused::Missing => (404, Refusal::FilestoreMissing, &m.missing),
            };
            counter.inc();
            if why == Refused::Unset {
                log_unset(ctx);
            }
            let text = if status == 404 {
                "not found"
            } else {
                "bad gateway"
            };
            let sent =
                answer::send(session, ctx, Answer::refuse(status, refusal, text, false)).await;
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: sent.is_ok(),
            };
        }
    };
    let status = header.status.as_u16();
    m.sent.inc();
    let result = stream(session, header, file, start, len, m).await;
    if let Err(e) = &result {
        tracing::debug!(error = %e, "filestore: the client went away during a download");
    }
    FailToProxy {
        error_code: status,
        can_reuse_downstream: result.is_ok(),
    }
}

/// The header, then `len` bytes of `file` from `start`, each piece read once the client
/// has taken the one before (the write awaits the socket, or HTTP/2 flow control).
async fn stream(
    session: &mut Session,
    header: Box<ResponseHeader>,
    file: std::fs::File,
    start: u64,
    len: u64,
    m: &portier_runtime::telemetry::FilestoreMetrics,
) -> Result<()> {
    let head_only = session.req_header().method == http::Method::HEAD || len == 0;
    session.write_response_header(header, head_only).await?;
    if head_only {
        return Ok(());
    }
    let file = std::sync::Arc::new(file);
    let (mut at, mut left) = (start, len);
    while left > 0 {
        let want = CHUNK.min(usize::try_from(left).unwrap_or(CHUNK));
        let piece = read_at(&file, at, want).await?;
        let n = piece.len() as u64;
        if n == 0 {
            // The file shrank under us: the client's Content-Length cannot be met.
            return Error::e_explain(ErrorType::ReadError, "the file ended early");
        }
        (at, left) = (at + n, left - n);
        m.bytes.inc_by(n);
        session.write_response_body(Some(piece), left == 0).await?;
    }
    Ok(())
}

/// Up to `want` bytes of `file` at `offset`, read on the blocking pool straight into the
/// buffer that is sent (`pread`: no file position shared, one copy).
async fn read_at(
    file: &std::sync::Arc<std::fs::File>,
    offset: u64,
    want: usize,
) -> Result<bytes::Bytes> {
    use std::os::unix::fs::FileExt;
    let file = file.clone();
    // Allocated (and freed, once sent) on this thread, not the blocking pool's: a
    // buffer freed by another thread than its allocator's stays in that thread's heap.
    let mut buf = BytesMut::zeroed(want);
    let read = tokio::task::spawn_blocking(move || {
        let n = file.read_at(&mut buf, offset)?;
        buf.truncate(n);
        Ok::<_, std::io::Error>(buf.freeze())
    })
    .await
    .map_err(|e| Error::because(ErrorType::ReadError, "reading the file", e))?;
    read.map_err(|e| Error::because(ErrorType::ReadError, "reading the file", e))
}

/// A pool without `filestore` meets a handover: logged at most once a minute.
fn log_unset(ctx: &Ctx) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::error!(
            pool = ctx.pool_name().unwrap_or("-"),
            "filestore: a worker handed a file over (X-Accel-Redirect, Odoo's --x-sendfile) but the pool has no `filestore`; answering 502"
        );
    }
}
