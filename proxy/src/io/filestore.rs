//! The filestore offload's building blocks (Odoo's `--x-sendfile`): which file a
//! worker's `X-Accel-Redirect` names, opening it so that nothing outside the tenant's
//! `filestore/DB` can be reached, and which bytes of it a request gets.
//!
//! Odoo names the file relative to its `data_dir/filestore` (`odoo/http.py`,
//! `Stream.get_response`: `X-Accel-Redirect: /web/filestore/DB/xx/SHA1`).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use pingora::http::ResponseHeader;

/// The location Odoo's `X-Accel-Redirect` points into (nginx's `internal` location).
pub const PREFIX: &str = "/web/filestore/";

/// What a worker's handover comes to.
pub enum Handover {
    /// Send `len` bytes of `file` from `start`, with this header (the worker's, edited).
    Send {
        header: Box<ResponseHeader>,
        file: File,
        start: u64,
        len: u64,
    },
    /// Not sent: portier answers itself, for this reason.
    Refuse(Refused),
}

/// Why a handover is not sent: `502` for `Unset` and `Denied`, `404` for `Missing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The pool has no `filestore`.
    Unset,
    /// The path names another database, has `.`, `..` or empty segments, or resolves
    /// outside `filestore/DB`; or the file cannot be read.
    Denied,
    /// No such file.
    Missing,
}

/// The file's path under `filestore/DB` for `target` (the `X-Accel-Redirect` value),
/// when it names a file of database `db` and nothing else: every segment non-empty and
/// neither `.` nor `..`, no escapes, no control characters.
pub fn relative_path(target: &str, db: &str) -> Option<PathBuf> {
    let rest = target.strip_prefix(PREFIX)?;
    if rest
        .bytes()
        .any(|b| b < 0x20 || b == 0x7f || b == b'%' || b == b'\\')
    {
        return None;
    }
    let mut segments = rest.split('/');
    if segments.next()? != db || db.is_empty() {
        return None;
    }
    let mut rel = PathBuf::new();
    for s in segments {
        if s.is_empty() || s == "." || s == ".." {
            return None;
        }
        rel.push(s);
    }
    (!rel.as_os_str().is_empty()).then_some(rel)
}

/// Opens `rel` beneath `root/db` for reading, and its size. `openat2` with
/// `RESOLVE_BENEATH` resolves the path (symlinks included) inside the directory handle
/// and refuses anything that leaves it, with no window between a check and the open.
/// On a kernel without `openat2` (before Linux 5.6) the fallback checks the
/// canonicalised path against the canonicalised directory before opening it (a
/// symlink swapped in between could still escape there).
pub fn open_beneath(root: &Path, db: &str, rel: &Path) -> Result<(File, u64), Refused> {
    let dir = root.join(db);
    let file = match openat2_beneath(&dir, rel) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => open_checked(&dir, rel),
        other => other,
    }
    .map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Refused::Missing,
        _ => {
            tracing::warn!(dir = %dir.display(), path = %rel.display(), error = %e, "filestore: file refused");
            Refused::Denied
        }
    })?;
    let meta = file.metadata().map_err(|_| Refused::Denied)?;
    if !meta.is_file() {
        return Err(Refused::Denied);
    }
    Ok((file, meta.len()))
}

#[cfg(target_os = "linux")]
fn openat2_beneath(dir: &Path, rel: &Path) -> io::Result<File> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;

    let dir = File::open(dir)?;
    let path = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain data; zeroed is its documented initial state.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid directory fd, a NUL-terminated path and a correctly sized open_how.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

#[cfg(not(target_os = "linux"))]
fn openat2_beneath(_dir: &Path, _rel: &Path) -> io::Result<File> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

fn open_checked(dir: &Path, rel: &Path) -> io::Result<File> {
    let base = dir.canonicalize()?;
    let real = base.join(rel).canonicalize()?;
    if !real.starts_with(&base) {
        return Err(io::Error::from(io::ErrorKind::PermissionDenied));
    }
    File::open(real)
}

/// Which bytes of a `size`-byte file a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Whole,
    /// First and last byte, inclusive.
    Part(u64, u64),
    Unsatisfiable,
}

/// The request's range of the file. The worker's own `206` (werkzeug applies a `Range`
/// itself) is sent exactly; else a single `Range` of the client's, honoured when its
/// `If-Range` names the worker's `ETag` or `Last-Modified`; several ranges: whole.
pub fn plan(
    worker_status: u16,
    worker_content_range: Option<&str>,
    range: Option<&str>,
    if_range: Option<&str>,
    validators: (Option<&str>, Option<&str>),
    size: u64,
) -> Option<Plan> {
    if worker_status == 206 {
        // "bytes FIRST-LAST/TOTAL", within the file as it is.
        let spec = worker_content_range?.trim().strip_prefix("bytes ")?;
        let (span, _total) = spec.split_once('/')?;
        let (a, b) = span.split_once('-')?;
        let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        return (a <= b && b < size).then_some(Plan::Part(a, b));
    }
    let Some(range) = range else {
        return Some(Plan::Whole);
    };
    if let Some(v) = if_range {
        let (etag, last_modified) = validators;
        // A weak ETag never matches for If-Range (RFC 9110 13.1.5).
        let matches =
            etag.is_some_and(|e| e == v && !e.starts_with("W/")) || last_modified == Some(v);
        if !matches {
            return Some(Plan::Whole);
        }
    }
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return Some(Plan::Whole);
    };
    if spec.contains(',') {
        return Some(Plan::Whole);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Some(Plan::Whole);
    };
    let (a, b) = (a.trim(), b.trim());
    let part = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Err(_), Ok(n)) if a.is_empty() => {
            (n > 0 && size > 0).then(|| (size - n.min(size), size - 1))
        }
        (Ok(s), Err(_)) if b.is_empty() => (s < size).then(|| (s, size - 1)),
        (Ok(s), Ok(e)) if s <= e => (s < size).then(|| (s, e.min(size - 1))),
        // A malformed Range is ignored (RFC 9110 14.2).
        _ => return Some(Plan::Whole),
    };
    Some(match part {
        Some((s, e)) => Plan::Part(s, e),
        None => Plan::Unsatisfiable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_of_the_tenants_database_are_named() {
        let ok = relative_path("/web/filestore/acme/ab/abcdef", "acme").unwrap();
        assert_eq!(ok, PathBuf::from("ab/abcdef"));
        for bad in [
            "/web/filestore/acme2/ab/abcdef",
            "/web/filestore/acm/ab/abcdef",
            "/web/filestore/acme/../acme2/ab/x",
            "/web/filestore/acme/./ab/x",
            "/web/filestore/acme//ab/x",
            "/web/filestore/acme/ab/x/",
            "/web/filestore/acme",
            "/web/filestore/acme/",
            "/web/filestore/acme/%2e%2e/x",
            "/web/filestore/acme/a\\b",
            "/web/filestore/acme/a\nb",
            "/filestore/acme/ab/x",
        ] {
            assert_eq!(relative_path(bad, "acme"), None, "{bad:?}");
        }
        assert_eq!(relative_path("/web/filestore//ab/x", ""), None);
    }

    #[test]
    fn nothing_outside_the_database_directory_opens() {
        let root = tempfile::tempdir().unwrap();
        let db = root.path().join("acme");
        std::fs::create_dir_all(db.join("ab")).unwrap();
        std::fs::write(db.join("ab/abc"), b"hello").unwrap();
        std::fs::create_dir_all(root.path().join("other")).unwrap();
        std::fs::write(root.path().join("other/secret"), b"no").unwrap();
        std::os::unix::fs::symlink(root.path().join("other/secret"), db.join("ab/link")).unwrap();
        std::os::unix::fs::symlink("../../other/secret", db.join("ab/rel")).unwrap();
        std::os::unix::fs::symlink("abc", db.join("ab/inside")).unwrap();
        let (_, size) = open_beneath(root.path(), "acme", Path::new("ab/abc")).unwrap();
        assert_eq!(size, 5);
        // A symlink that stays inside is followed; one that leaves is not.
        assert!(open_beneath(root.path(), "acme", Path::new("ab/inside")).is_ok());
        for escape in ["ab/link", "ab/rel"] {
            assert_eq!(
                open_beneath(root.path(), "acme", Path::new(escape)).err(),
                Some(Refused::Denied),
                "{escape}"
            );
        }
        assert_eq!(
            open_beneath(root.path(), "acme", Path::new("ab/none")).err(),
            Some(Refused::Missing)
        );
        assert_eq!(
            open_beneath(root.path(), "acme", Path::new("ab")).err(),
            Some(Refused::Denied),
            "a directory is not sent"
        );
        // The fallback refuses the same escapes.
        for escape in ["ab/link", "ab/rel"] {
            assert!(open_checked(&db, Path::new(escape)).is_err(), "{escape}");
        }
        assert!(open_checked(&db, Path::new("ab/abc")).is_ok());
    }

    #[test]
    fn ranges_as_rfc_9110_and_werkzeug_answer_them() {
        let v = (Some("\"e1\""), Some("Mon, 07 Dec 2026 04:00:00 GMT"));
        let p = |r: Option<&str>, ir: Option<&str>| plan(200, None, r, ir, v, 100);
        assert_eq!(p(None, None), Some(Plan::Whole));
        assert_eq!(p(Some("bytes=0-9"), None), Some(Plan::Part(0, 9)));
        assert_eq!(p(Some("bytes=90-"), None), Some(Plan::Part(90, 99)));
        assert_eq!(p(Some("bytes=-10"), None), Some(Plan::Part(90, 99)));
        assert_eq!(p(Some("bytes=95-200"), None), Some(Plan::Part(95, 99)));
        assert_eq!(p(Some("bytes=100-"), None), Some(Plan::Unsatisfiable));
        assert_eq!(p(Some("bytes=-0"), None), Some(Plan::Unsatisfiable));
        assert_eq!(p(Some("bytes=0-1,5-6"), None), Some(Plan::Whole));
        assert_eq!(p(Some("items=0-1"), None), Some(Plan::Whole));
        assert_eq!(p(Some("bytes=5-1"), None), Some(Plan::Whole));
        assert_eq!(p(Some("bytes=0-9"), Some("\"e1\"")), Some(Plan::Part(0, 9)));
        assert_eq!(p(Some("bytes=0-9"), v.1), Some(Plan::Part(0, 9)));
        assert_eq!(p(Some("bytes=0-9"), Some("\"old\"")), Some(Plan::Whole));
        // The worker's own 206 is sent as it says, within the file.
        assert_eq!(
            plan(206, Some("bytes 10-19/100"), None, None, v, 100),
            Some(Plan::Part(10, 19))
        );
        assert_eq!(
            plan(206, Some("bytes 10-100/100"), None, None, v, 100),
            None
        );
        assert_eq!(plan(206, None, None, None, v, 100), None);
    }
}
