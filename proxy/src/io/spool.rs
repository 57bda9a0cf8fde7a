//! Buffering between clients and Odoo workers (contract r2, "Bodies and buffering").
//!
//! Request bodies ([`BodySpool`]) are received whole before a worker is picked: in memory
//! up to `buffer_body`, beyond that in a file under `spool_dir`.
//!
//! Responses are read from the worker ahead of the client (in memory up to
//! `buffer_response`, then in a spool file up to `max_response_spool`): a response of an interactive, integration or static request is taken
//! from the worker as fast as it sends it and held in memory, up to `buffer_response`,
//! so a slow client does not hold an Odoo worker; the worker slot is released as soon
//! as the last byte is read from the worker. A response larger than `buffer_response`
//! is sent on as it comes from then on (spooling to files under `spool_dir` is not
//! built yet). Longpolls and WebSockets always stream.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use portier_runtime::telemetry::{Direction, Metrics};

/// The read-ahead state of one response.
#[derive(Default)]
pub struct ResponseBuffer {
    /// The first chunk, kept as it came (most responses are one chunk: no copy).
    first: Option<Bytes>,
    /// Later chunks, appended to a copy of the first.
    more: BytesMut,
    /// Past `buffer_response`: the response so far, in a spool file (boxed: most
    /// responses never spool, and every request's context holds this buffer).
    file: Option<Box<BodySpool>>,
    /// Passed on as it comes (past `max_response_spool`, or no room to spool).
    streaming: bool,
}

impl ResponseBuffer {
    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.more.len()
    }

    fn push(&mut self, chunk: Bytes) {
        match self.first.take() {
            None if self.more.is_empty() => self.first = Some(chunk),
            first => {
                if let Some(f) = first {
                    self.more.extend_from_slice(&f);
                }
                self.more.extend_from_slice(&chunk);
            }
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        match self.first.take() {
            Some(f) => Some(f),
            None if self.more.is_empty() => None,
            None => Some(self.more.split().freeze()),
        }
    }
}

impl ResponseBuffer {
    /// The response hook: holds the worker's response until its end — in memory up to
    /// `buffer_response`, then in a spool file (under `dir`) up to `max_response_spool`
    /// more. Past `max_response_spool`, what is held is sent and the rest streams; with
    /// no room to spool, likewise. At the end, `body` is the whole response.
    pub async fn read_ahead(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        settings: &portier_config::Settings,
        dir: &Path,
        metrics: &Metrics,
    ) -> pingora::Result<()> {
        if self.streaming {
            return Ok(());
        }
        if let Some(chunk) = body.take() {
            hold(self, chunk, body, settings, dir).await;
        }
        if end_of_stream && !self.streaming {
            *body = match self.file.take() {
                Some(f) => {
                    metrics.spooled(Direction::Response, f.spooled());
                    Some(f.finish().await.map_err(|e| {
                        pingora::Error::because(
                            pingora::ErrorType::InternalError,
                            "mapping the spooled response",
                            e,
                        )
                    })?)
                }
                None => self.take(),
            };
        }
        Ok(())
    }
}

/// Holds one chunk; sets `out` when what is held must go now.
async fn hold(
    rb: &mut ResponseBuffer,
    chunk: Bytes,
    out: &mut Option<Bytes>,
    settings: &portier_config::Settings,
    dir: &Path,
) {
    if rb.file.is_none() && (rb.len() + chunk.len()) as u64 <= settings.buffer_response {
        rb.push(chunk);
        return;
    }
    if settings.max_response_spool == 0 {
        // No spooling: what is held goes now, the rest as it comes.
        rb.push(chunk);
        rb.streaming = true;
        *out = rb.take();
        return;
    }
    let spool = match rb.file.take() {
        Some(f) => Ok(f),
        None => {
            let mut f = Box::new(BodySpool::new(0, dir));
            match rb.take() {
                Some(held) => match f.push(&held).await {
                    Ok(()) => Ok(f),
                    Err(e) => Err((e, Some(held))),
                },
                None => Ok(f),
            }
        }
    };
    let mut f = match spool {
        Ok(f) => f,
        Err((e, held)) => {
            log_spool_error(&e);
            rb.streaming = true;
            let mut all = BytesMut::new();
            if let Some(h) = held {
                all.extend_from_slice(&h);
            }
            all.extend_from_slice(&chunk);
            *out = Some(all.freeze());
            return;
        }
    };
    let over = f.spooled() + chunk.len() as u64 > settings.max_response_spool;
    if let Err(e) = f.push(&chunk).await {
        log_spool_error(&e);
        rb.streaming = true;
        *out = Some(f.so_far(&chunk).await);
        return;
    }
    if over {
        // Past max_response_spool: what is spooled goes now, the rest streams.
        rb.streaming = true;
        *out = f.finish().await.ok();
        return;
    }
    rb.file = Some(f);
}

/// A request body being received: in memory up to `buffer_body`, then in a file under
/// `spool_dir`. The finished body is one `Bytes` (memory, or the mapped file, which is
/// unlinked as soon as it is mapped: nothing is left behind, whatever happens next).
pub struct BodySpool {
    mem: BytesMut,
    mem_limit: u64,
    dir: PathBuf,
    file: Option<SpoolFile>,
}

struct SpoolFile {
    path: PathBuf,
    file: tokio::fs::File,
    written: u64,
}

/// Why a body could not be spooled (the request then streams).
#[derive(Debug, thiserror::Error)]
#[error("cannot spool the request body under {dir}: {source}")]
pub struct SpoolError {
    dir: String,
    #[source]
    source: std::io::Error,
}

static SEQ: AtomicU64 = AtomicU64::new(0);
const PREFIX: &str = "portier-spool-";

impl BodySpool {
    pub fn new(mem_limit: u64, dir: &Path) -> BodySpool {
        BodySpool {
            mem: BytesMut::new(),
            mem_limit,
            dir: dir.to_path_buf(),
            file: None,
        }
    }

    /// Bytes written to a spool file so far.
    pub fn spooled(&self) -> u64 {
        self.file.as_ref().map_or(0, |f| f.written)
    }

    fn error(&self, source: std::io::Error) -> SpoolError {
        SpoolError {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    /// Adds a chunk; on an error the chunk is not kept (see [`Self::so_far`]).
    pub async fn push(&mut self, chunk: &Bytes) -> Result<(), SpoolError> {
        if self.file.is_none() && (self.mem.len() + chunk.len()) as u64 <= self.mem_limit {
            self.mem.extend_from_slice(chunk);
            return Ok(());
        }
        if self.file.is_none() {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(format!("{PREFIX}{}-{n}", std::process::id()));
            let file = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .await
                .map_err(|e| self.error(e))?;
            self.file = Some(SpoolFile {
                path,
                file,
                written: 0,
            });
            // What memory holds goes first, so the file is the whole body.
            let held = self.mem.split().freeze();
            if let Err(e) = self.write(&held).await {
                self.mem.extend_from_slice(&held);
                return Err(e);
            }
        }
        self.write(chunk).await
    }

    async fn write(&mut self, data: &Bytes) -> Result<(), SpoolError> {
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        match f.file.write_all(data).await {
            Ok(()) => {
                f.written += data.len() as u64;
                Ok(())
            }
            Err(e) => Err(SpoolError {
                dir: self.dir.display().to_string(),
                source: e,
            }),
        }
    }

    /// The whole body received.
    pub async fn finish(mut self) -> Result<Bytes, SpoolError> {
        let Some(mut f) = self.file.take() else {
            return Ok(self.mem.split().freeze());
        };
        let mapped = async {
            f.file.flush().await?;
            let std_file = f.file.try_clone().await?.into_std().await;
            map(&std_file, f.written)
        }
        .await;
        // Mapped (or failed): the file goes now; a mapping keeps its pages.
        let _ = tokio::fs::remove_file(&f.path).await;
        mapped.map_err(|e| self.error(e))
    }

    /// What was received before an error, followed by `chunk`, as one `Bytes` (a copy
    /// of the spooled part: this happens only when the disk fails mid-body).
    pub async fn so_far(mut self, chunk: &Bytes) -> Bytes {
        let mut out = BytesMut::new();
        if let Some(mut f) = self.file.take() {
            let read = async {
                f.file.flush().await?;
                let std_file = f.file.try_clone().await?.into_std().await;
                map(&std_file, f.written)
            }
            .await;
            if let Ok(b) = read {
                out.extend_from_slice(&b);
            }
            let _ = tokio::fs::remove_file(&f.path).await;
        }
        out.extend_from_slice(&self.mem);
        out.extend_from_slice(chunk);
        out.freeze()
    }
}

impl Drop for BodySpool {
    fn drop(&mut self) {
        // A request that ended before its body was whole leaves no file.
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(&f.path);
        }
    }
}

/// The first `len` bytes of a spool file as `Bytes`, mapped (no copy).
fn map(file: &std::fs::File, len: u64) -> std::io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the file was created by this process with `create_new` under a name no
    // one else uses, is written no more once mapped, and is unlinked right after; no
    // other process changes it while the mapping lives.
    let mapping = unsafe { memmap2::MmapOptions::new().len(len as usize).map(file)? };
    Ok(Bytes::from_owner(mapping))
}

/// Removes spool files left by portier processes that are gone (a crash, a kill).
pub fn clean_dir(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Logs a spooling failure at most once a minute.
pub fn log_spool_error(e: &SpoolError) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = portier_runtime::breaker::now_ms();
    let last = LAST.load(Ordering::Relaxed);
    if (last == 0 || now.saturating_sub(last) >= 60_000)
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(error = %e, "bodies stream instead of being spooled (logged once a minute)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_chunk_is_kept_without_a_copy_and_more_are_joined() {
        let mut rb = ResponseBuffer::default();
        let chunk = Bytes::from(vec![7u8; 1000]);
        let ptr = chunk.as_ptr();
        rb.push(chunk);
        let out = rb.take().unwrap();
        assert_eq!(out.as_ptr(), ptr, "the single chunk was copied");
        assert!(rb.take().is_none());
        rb.push(Bytes::from_static(b"ab"));
        rb.push(Bytes::from_static(b"cd"));
        rb.push(Bytes::from_static(b"e"));
        assert_eq!(rb.len(), 5);
        assert_eq!(&rb.take().unwrap()[..], b"abcde");
    }

    #[tokio::test]
    async fn a_body_past_the_memory_limit_is_spooled_and_mapped_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = BodySpool::new(10, dir.path());
        for part in [&b"hello "[..], b"spooled ", b"world"] {
            spool.push(&Bytes::copy_from_slice(part)).await.unwrap();
        }
        assert_eq!(spool.spooled(), 19);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let body = spool.finish().await.unwrap();
        assert_eq!(&body[..], b"hello spooled world");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "file left"
        );
        // A body that fits stays in memory.
        let mut small = BodySpool::new(10, dir.path());
        small.push(&Bytes::from_static(b"tiny")).await.unwrap();
        assert_eq!(small.spooled(), 0);
        assert_eq!(&small.finish().await.unwrap()[..], b"tiny");
    }
}
