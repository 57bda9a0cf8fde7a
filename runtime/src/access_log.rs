//! The JSON access log: one line per request on stderr, the contract's fields. Lines go
//! through a bounded channel to a writer thread, so a slow stderr never blocks a
//! request (lines are dropped and counted instead).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::SystemTime;

use portier_config::Class;

use crate::telemetry::Refusal;

/// One access-log record.
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub tenant: Option<&'a str>,
    pub class: Option<Class>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: f64,
    pub backend: Option<&'a str>,
    pub refused: Option<Refusal>,
    /// Time spent waiting for a worker slot.
    pub queued_ms: f64,
    /// Backends tried.
    pub attempts: u32,
    /// The asset cache: `hit`, `miss` or none.
    pub cache: Option<&'static str>,
}

const LOG_QUEUE: usize = 65_536;

/// The JSON access log on stderr, written by a dedicated thread. The queue is bounded
/// by a counter (not preallocated): at most `LOG_QUEUE` lines wait; more are dropped.
pub struct AccessLog {
    enabled: AtomicBool,
    tx: Sender<String>,
    queued: Arc<AtomicUsize>,
}

impl AccessLog {
    pub fn new(enabled: bool) -> AccessLog {
        let (tx, rx) = channel::<String>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let spawned = std::thread::Builder::new()
            .name("portier-access-log".into())
            .spawn(move || writer(rx, q));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access-log writer");
        }
        AccessLog {
            enabled: AtomicBool::new(enabled),
            tx,
            queued,
        }
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Queues one line; returns false if it had to be dropped.
    pub fn log(&self, r: &AccessRecord<'_>) -> bool {
        if !self.enabled() {
            return true;
        }
        if self.queued.load(Ordering::Relaxed) >= LOG_QUEUE {
            return false;
        }
        let line = format_record(r, SystemTime::now());
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(line).is_ok()
    }

    /// Waits (up to `max`) until queued lines are written; used before exiting.
    pub fn flush(&self, max: std::time::Duration) {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        if let Ok(mut slot) = FLUSH_WAITER.lock() {
            *slot = Some(done_tx);
        }
        // An empty line is the flush marker: the writer answers when it reaches it.
        if self.tx.send(String::new()).is_ok() {
            let _ = done_rx.recv_timeout(max);
        }
    }
}

static FLUSH_WAITER: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>> =
    std::sync::Mutex::new(None);

fn writer(rx: Receiver<String>, queued: Arc<AtomicUsize>) {
    let stderr = std::io::stderr();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        let mut flush_requested = first.is_empty();
        if !first.is_empty() {
            queued.fetch_sub(1, Ordering::Relaxed);
            buf.extend_from_slice(first.as_bytes());
        }
        // Batch whatever else is queued into one write.
        while buf.len() < 60 * 1024 {
            match rx.try_recv() {
                Ok(l) if l.is_empty() => flush_requested = true,
                Ok(l) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    buf.extend_from_slice(l.as_bytes());
                }
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            let mut lock = stderr.lock();
            let _ = lock.write_all(&buf);
            let _ = lock.flush();
            buf.clear();
        }
        if flush_requested {
            if let Ok(mut slot) = FLUSH_WAITER.lock() {
                if let Some(tx) = slot.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_opt(out: &mut String, v: Option<&str>) {
    match v {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

/// Formats one record as a JSON line with the contract's fields, in its order.
pub fn format_record(r: &AccessRecord<'_>, now: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(256 + r.path.len());
    out.push_str("{\"ts\":\"");
    let _ = write!(out, "{}", humantime::format_rfc3339_millis(now));
    out.push_str("\",\"request_id\":");
    push_json_str(&mut out, r.request_id);
    out.push_str(",\"tenant\":");
    push_opt(&mut out, r.tenant);
    out.push_str(",\"class\":");
    push_opt(&mut out, r.class.map(Class::as_str));
    out.push_str(",\"method\":");
    push_json_str(&mut out, r.method);
    out.push_str(",\"path\":");
    push_json_str(&mut out, r.path);
    let _ = write!(
        out,
        ",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3},\"backend\":",
        r.status, r.bytes, r.duration_ms
    );
    push_opt(&mut out, r.backend);
    out.push_str(",\"refused\":");
    push_opt(&mut out, r.refused.map(Refusal::as_str));
    let _ = write!(
        out,
        ",\"queued_ms\":{:.3},\"attempts\":{},\"cache\":",
        r.queued_ms, r.attempts
    );
    push_opt(&mut out, r.cache);
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_line_is_json_with_contract_fields() {
        let line = format_record(
            &AccessRecord {
                request_id: "abc",
                tenant: Some("acme"),
                class: Some(Class::Integration),
                method: "POST",
                path: "/jsonrpc\"\n",
                status: 200,
                bytes: 1234,
                duration_ms: 12.5,
                backend: Some("10.0.1.11:8069"),
                refused: None,
                queued_ms: 3.25,
                attempts: 2,
                cache: Some("hit"),
            },
            SystemTime::UNIX_EPOCH,
        );
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["class"], "integration");
        assert_eq!(v["path"], "/jsonrpc\"\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 1234);
        assert_eq!(v["duration_ms"], 12.5);
        assert_eq!(v["refused"], serde_json::Value::Null);
        assert_eq!(v["queued_ms"], 3.25);
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["cache"], "hit");
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys.len(), 14);
    }
}
