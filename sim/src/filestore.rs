//! Attachments in the filestore, and Odoo's `--x-sendfile`.
//!
//! Odoo keeps attachment contents under `data_dir/filestore/DB/xx/SHA1`
//! (`odoo/addons/base/models/ir_attachment.py`, `_get_path`: the first two hex digits of
//! the SHA-1 of the content, then the whole digest). `/web/content/<id>` and
//! `/web/image/<id>` (`addons/web/controllers/binary.py`) answer through
//! `odoo.http.Stream.get_response` (`odoo/http.py`): werkzeug's `send_file` with
//! `conditional=True` — `ETag`, `Last-Modified`, a `Range` answered `206` with
//! `Content-Range` (an unsatisfiable one `416`), `If-None-Match` answered `304` — and,
//! with `--x-sendfile`, an empty body: `X-Sendfile: <absolute path>`,
//! `X-Accel-Redirect: /web/filestore/<path under the filestore>`, `Content-Length: 0`.
//! `binary.py`'s own `/web/filestore/<path>` route logs an error when `x_sendfile` is on
//! (the web server should have served it) and answers 404.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use sha1::{Digest, Sha1};

use crate::routes::Resp;

/// One attachment stored in the filestore.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub id: u64,
    pub db: String,
    pub name: String,
    pub mimetype: String,
    /// The SHA-1 of the content, hex: the file's name.
    pub sha: String,
    pub size: u64,
    pub modified: SystemTime,
}

impl Attachment {
    /// The file's path under the filestore: `DB/xx/SHA1`.
    pub fn store_fname(&self) -> String {
        format!("{}/{}/{}", self.db, &self.sha[..2], self.sha)
    }
}

/// A server's `data_dir/filestore` and the attachments it holds.
pub struct Filestore {
    root: PathBuf,
    attachments: Mutex<HashMap<u64, Attachment>>,
    seq: AtomicU64,
}

impl Filestore {
    /// The filestore of `data_dir` (created if missing).
    pub fn new(data_dir: &Path) -> std::io::Result<Filestore> {
        let root = data_dir.join("filestore");
        std::fs::create_dir_all(&root)?;
        Ok(Filestore {
            root,
            attachments: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(1),
        })
    }

    /// `data_dir/filestore`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores `content` as an attachment of `db` (as `ir.attachment` with file storage does).
    pub fn add(
        &self,
        db: &str,
        name: &str,
        mimetype: &str,
        content: &[u8],
    ) -> std::io::Result<Attachment> {
        let sha: String = Sha1::digest(content)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let a = Attachment {
            id: self.seq.fetch_add(1, Ordering::Relaxed),
            db: db.to_string(),
            name: name.to_string(),
            mimetype: mimetype.to_string(),
            sha,
            size: content.len() as u64,
            modified: SystemTime::now(),
        };
        let path = self.root.join(a.store_fname());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, content)?;
        if let Ok(mut m) = self.attachments.lock() {
            m.insert(a.id, a.clone());
        }
        Ok(a)
    }

    fn get(&self, id: u64) -> Option<Attachment> {
        self.attachments.lock().ok()?.get(&id).cloned()
    }
}

/// `/web/content/<id>[/<filename>]` and `/web/image/<id>`: the attachment of the request's
/// database as `Stream.get_response` answers it. `x_sendfile` hands the file to the web
/// server. `x-sim-accel-redirect` (a test's header) makes the worker name another path,
/// as a buggy or hostile module could.
pub(crate) fn content(
    worker: &str,
    store: &Filestore,
    db: &str,
    path: &str,
    headers: &HeaderMap,
    x_sendfile: bool,
) -> Resp {
    let id = path.split('/').nth(3).and_then(|s| s.parse::<u64>().ok());
    let Some(a) = id.and_then(|id| store.get(id)).filter(|a| a.db == db) else {
        return text(StatusCode::NOT_FOUND, worker, "not found");
    };
    let etag = format!("\"{}\"", a.sha);
    let last_modified = httpdate::fmt_http_date(a.modified);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        let mut r = text(StatusCode::NOT_MODIFIED, worker, "");
        set(r.headers_mut(), header::ETAG, &etag);
        return r;
    }
    // werkzeug's make_conditional: a Range is honoured when If-Range (if any) names the
    // current ETag or date; `x-sim-no-range` is a Stream sent with conditional=False.
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v == etag || v == last_modified);
    let range = (if_range_ok && !headers.contains_key("x-sim-no-range"))
        .then(|| headers.get(header::RANGE).and_then(|v| v.to_str().ok()))
        .flatten()
        .map(|r| single_range(r, a.size));
    let (status, content_range) = match range {
        Some(Some((start, end))) => (
            StatusCode::PARTIAL_CONTENT,
            Some(format!("bytes {start}-{end}/{}", a.size)),
        ),
        Some(None) => {
            let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, worker, "");
            set(
                r.headers_mut(),
                header::CONTENT_RANGE,
                &format!("bytes */{}", a.size),
            );
            return r;
        }
        None => (StatusCode::OK, None),
    };
    let body = if x_sendfile {
        Bytes::new()
    } else {
        let all = std::fs::read(store.root().join(a.store_fname())).unwrap_or_default();
        match &range {
            Some(Some((s, e))) => Bytes::copy_from_slice(&all[*s as usize..=*e as usize]),
            _ => Bytes::from(all),
        }
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    set(h, header::CONTENT_TYPE, &a.mimetype);
    set(
        h,
        header::CONTENT_DISPOSITION,
        &format!("inline; filename=\"{}\"", a.name),
    );
    set(h, header::ETAG, &etag);
    set(h, header::LAST_MODIFIED, &last_modified);
    // Not public: `Stream.get_response` makes the answer private; no max_age: no-cache.
    set(h, header::CACHE_CONTROL, "no-cache, private");
    set(h, header::ACCEPT_RANGES, "bytes");
    set(h, "x-content-type-options", "nosniff");
    set(h, "content-security-policy", "default-src 'none'");
    set(h, "x-sim-worker", worker);
    if let Some(cr) = content_range {
        set(h, header::CONTENT_RANGE, &cr);
    }
    if x_sendfile {
        let accel = headers
            .get("x-sim-accel-redirect")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| format!("/web/filestore/{}", a.store_fname()));
        let absolute = store.root().join(a.store_fname());
        set(h, "x-sendfile", &absolute.display().to_string());
        set(h, "x-accel-redirect", &accel);
        // "In case of X-Sendfile/X-Accel-Redirect, the body is empty, yet werkzeug gives
        // the length of the file" (odoo/http.py): Odoo sets 0.
        set(h, header::CONTENT_LENGTH, "0");
    }
    r
}

/// A single `bytes=` range of a `size`-byte file: `Some((first, last))`; `None` when it
/// cannot be satisfied. Several ranges are answered whole by werkzeug here (as one).
fn single_range(spec: &str, size: u64) -> Option<(u64, u64)> {
    let spec = spec.strip_prefix("bytes=")?.split(',').next()?.trim();
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.checked_sub(n.min(size))?, size.checked_sub(1)?)
        }
        (s, "") => (s.parse().ok()?, size.checked_sub(1)?),
        (s, e) => (
            s.parse().ok()?,
            e.parse::<u64>().ok()?.min(size.checked_sub(1)?),
        ),
    };
    (start <= end && start < size).then_some((start, end))
}

fn set(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

fn text(status: StatusCode, worker: &str, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    set(r.headers_mut(), "x-sim-worker", worker);
    r
}
