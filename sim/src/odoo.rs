//! What an Odoo server decides about a request before its controller runs, modelled
//! on Odoo's own code so that a proxy test catches a wrong assumption:
//!
//! - the database of a request: `odoo/http.py`, `Request._get_session_and_dbname`
//!   (Odoo 16-18: the session's database if the filter admits it, else the only
//!   database the filter admits; Odoo 19 adds the `X-Odoo-Database` header: without a
//!   session it selects the database for a stateless call whose session is never
//!   saved (`session.can_save = False`), and with a session of another database the
//!   answer is 403 "Cannot use both the session_id cookie and the x-odoo-database
//!   header.");
//! - the database filter: OCA/server-tools `dbfilter_from_header` (`override.py`),
//!   which keeps the databases for which `re.match(X-Odoo-dbfilter, db)` matches (a
//!   prefix match: `acme` admits `acme2`);
//! - sessions: `Request._save_session` saves a session (and sends its cookie) only
//!   when it may be saved and was modified; logging in rotates the session id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use http::{header, HeaderMap};

/// The Odoo major version a simulated worker behaves as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OdooVersion {
    V16,
    V17,
    V18,
    V19,
}

impl OdooVersion {
    /// Odoo 19 reads `X-Odoo-Database` (`odoo/http.py`, `_get_session_and_dbname`).
    pub fn reads_database_header(self) -> bool {
        self >= OdooVersion::V19
    }

    /// Odoo 17+ requires `Origin` on a WebSocket handshake
    /// (`addons/bus/websocket.py`, `_REQUIRED_HANDSHAKE_HEADERS`).
    pub fn websocket_needs_origin(self) -> bool {
        self >= OdooVersion::V17
    }

    /// The JSON-2 API (`/json/2/<model>/<method>`) exists from Odoo 19.
    pub fn has_json2(self) -> bool {
        self >= OdooVersion::V19
    }

    /// Where a logged-in user lands (`/odoo` since 18, `/web` before).
    pub fn home(self) -> &'static str {
        if self >= OdooVersion::V18 {
            "/odoo"
        } else {
            "/web"
        }
    }
}

/// A session as Odoo's session store keeps it.
#[derive(Clone, Debug, Default)]
pub struct Session {
    pub db: Option<String>,
    /// The logged-in user (Odoo's `uid`; here the login).
    pub login: Option<String>,
}

/// The state one Odoo server keeps across its ports (HTTP workers and the gevent
/// port share the session store and the databases).
pub struct Odoo {
    pub version: OdooVersion,
    /// The databases on the PostgreSQL server. `None`: whichever database the proxy
    /// names (the database of the dbfilter header, else `odoo`): for tests that do
    /// not care about database selection.
    databases: Option<Vec<String>>,
    sessions: Mutex<HashMap<String, Session>>,
    seq: AtomicU64,
    /// `/web/health?db_server_status=1` reports the PostgreSQL server up.
    pub db_server_up: AtomicBool,
    /// `data_dir/filestore`, once attachments are stored (see [`Odoo::set_data_dir`]).
    filestore: std::sync::OnceLock<crate::filestore::Filestore>,
}

/// Why a request gets no database, or an error instead.
#[derive(Debug, PartialEq, Eq)]
pub enum DbError {
    /// 403 from Odoo 19: a session of one database and the header of another.
    SessionAndHeader,
}

/// The outcome of `_get_session_and_dbname` for one request.
pub struct Resolved {
    pub sid: Option<String>,
    pub session: Session,
    pub db: Option<String>,
    /// False when Odoo will not save this request's session (Odoo 19 stateless calls).
    pub can_save: bool,
    /// The cookie named a session the store knows.
    pub known: bool,
}

impl Odoo {
    pub fn new(version: OdooVersion, databases: Option<&[&str]>) -> Odoo {
        Odoo {
            version,
            databases: databases.map(|d| d.iter().map(|s| s.to_string()).collect()),
            sessions: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(1),
            db_server_up: AtomicBool::new(true),
            filestore: std::sync::OnceLock::new(),
        }
    }

    /// Gives the server a `data_dir` whose `filestore` holds attachments (once).
    pub fn set_data_dir(
        &self,
        data_dir: &std::path::Path,
    ) -> std::io::Result<&crate::filestore::Filestore> {
        if self.filestore.get().is_none() {
            let _ = self
                .filestore
                .set(crate::filestore::Filestore::new(data_dir)?);
        }
        self.filestore
            .get()
            .ok_or_else(|| std::io::Error::other("filestore not set"))
    }

    /// The server's filestore, if it has a `data_dir`.
    pub fn filestore(&self) -> Option<&crate::filestore::Filestore> {
        self.filestore.get()
    }

    fn all_databases(&self, headers: &HeaderMap) -> Vec<String> {
        match &self.databases {
            Some(d) => d.clone(),
            None => vec![filter_header(headers)
                .map(|f| unescape_anchored(&f))
                .unwrap_or_else(|| "odoo".to_string())],
        }
    }

    /// `http.db_filter` as patched by OCA `dbfilter_from_header`.
    pub fn db_filter(&self, dbs: Vec<String>, headers: &HeaderMap) -> Vec<String> {
        match filter_header(headers) {
            None => dbs,
            Some(pattern) => match python_match(&pattern) {
                Some(re) => dbs.into_iter().filter(|d| re.is_match(d)).collect(),
                // `re.error`: the module logs a warning and keeps the list.
                None => dbs,
            },
        }
    }

    /// `Request._get_session_and_dbname`.
    pub fn resolve(&self, headers: &HeaderMap) -> Result<Resolved, DbError> {
        let sid = session_cookie(headers);
        let stored = sid.as_ref().and_then(|s| {
            self.sessions
                .lock()
                .ok()
                .and_then(|m| m.get(s.as_str()).cloned())
        });
        let known = stored.is_some();
        let mut session = stored.unwrap_or_default();
        let mut can_save = true;
        let header_db = if self.version.reads_database_header() {
            headers
                .get("x-odoo-database")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        } else {
            None
        };
        let session_db_ok = session
            .db
            .as_ref()
            .is_some_and(|d| !self.db_filter(vec![d.clone()], headers).is_empty());
        let db = if session_db_ok {
            let db = session.db.clone();
            if header_db.is_some() && header_db != db {
                return Err(DbError::SessionAndHeader);
            }
            db
        } else if let Some(h) = header_db {
            can_save = false;
            let exists = self.all_databases(headers).contains(&h);
            (exists && !self.db_filter(vec![h.clone()], headers).is_empty()).then_some(h)
        } else {
            let mono = self.db_filter(self.all_databases(headers), headers);
            (mono.len() == 1).then(|| mono[0].clone())
        };
        if session.db != db {
            if session.db.is_some() {
                // "Logged into database %r, but dbfilter rejects it; logging session out."
                session.login = None;
            }
            session.db = db.clone();
        }
        Ok(Resolved {
            sid,
            session,
            db,
            can_save,
            known,
        })
    }

    /// Saves a modified session, as `_save_session` does; returns the `Set-Cookie`
    /// value to send, or `None` when the session may not be saved.
    pub fn save(&self, r: &Resolved, rotate: bool) -> Option<String> {
        if !r.can_save {
            return None;
        }
        let sid = match (&r.sid, rotate || !r.known) {
            (Some(s), false) => s.clone(),
            _ => self.new_sid(),
        };
        if let Ok(mut m) = self.sessions.lock() {
            if rotate {
                if let Some(old) = &r.sid {
                    m.remove(old.as_str());
                }
            }
            m.insert(sid.clone(), r.session.clone());
        }
        Some(format!(
            "session_id={sid}; Expires=Thu, 01 Jan 2099 00:00:00 GMT; Max-Age=604800; HttpOnly; Path=/"
        ))
    }

    fn new_sid(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        // Odoo's session ids are 84 characters of URL-safe base64; any opaque token
        // does here.
        format!("{:016x}{:016x}{:08x}", random_u64(), random_u64(), n as u32)
    }

    /// The session a WebSocket was opened with (for the bus to report).
    pub fn session(&self, sid: &str) -> Option<Session> {
        self.sessions.lock().ok().and_then(|m| m.get(sid).cloned())
    }
}

fn filter_header(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-odoo-dbfilter")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Python's `re.match(pattern, s)`: a match anchored at the start only.
fn python_match(pattern: &str) -> Option<regex::Regex> {
    regex::Regex::new(&format!("^(?:{pattern})")).ok()
}

/// The database an anchored, escaped filter (`^acme\-prod$`) names.
fn unescape_anchored(f: &str) -> String {
    let f = f.strip_prefix('^').unwrap_or(f);
    let f = f.strip_suffix('$').unwrap_or(f);
    let mut out = String::with_capacity(f.len());
    let mut esc = false;
    for c in f.chars() {
        if c == '\\' && !esc {
            esc = true;
            continue;
        }
        esc = false;
        out.push(c);
    }
    out
}

/// The `session_id` cookie, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|c| c.split(';'))
        .find_map(|p| p.trim().strip_prefix("session_id=").map(str::to_string))
        .filter(|s| !s.is_empty())
}

/// A `application/x-www-form-urlencoded` field (no decoding beyond `+`).
pub fn form_field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

pub fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn oca_filter_is_a_prefix_match() {
        let o = Odoo::new(OdooVersion::V17, Some(&["acme", "acme2", "acmecorp"]));
        let all = || vec!["acme".into(), "acme2".into(), "acmecorp".into()];
        assert_eq!(
            o.db_filter(all(), &hdrs(&[("x-odoo-dbfilter", "acme")]))
                .len(),
            3
        );
        assert_eq!(
            o.db_filter(all(), &hdrs(&[("x-odoo-dbfilter", "^acme$")])),
            vec!["acme".to_string()]
        );
        // No filter: every database, so no monodb choice.
        assert!(o.resolve(&HeaderMap::new()).unwrap().db.is_none());
    }

    #[test]
    fn odoo19_header_without_session_is_stateless() {
        let o = Odoo::new(OdooVersion::V19, Some(&["acme", "beta"]));
        let r = o.resolve(&hdrs(&[("x-odoo-database", "acme")])).unwrap();
        assert_eq!(r.db.as_deref(), Some("acme"));
        assert!(!r.can_save);
        assert!(o.save(&r, false).is_none());
        // Odoo 17 ignores the header.
        let o17 = Odoo::new(OdooVersion::V17, Some(&["acme", "beta"]));
        let r = o17.resolve(&hdrs(&[("x-odoo-database", "acme")])).unwrap();
        assert!(r.db.is_none() && r.can_save);
    }

    #[test]
    fn odoo19_session_of_another_database_is_403() {
        let o = Odoo::new(OdooVersion::V19, Some(&["acme", "beta"]));
        let r = o.resolve(&hdrs(&[("x-odoo-dbfilter", "^beta$")])).unwrap();
        let cookie = o.save(&r, false).unwrap();
        let sid = cookie.split(';').next().unwrap().to_string();
        let e = o.resolve(&hdrs(&[("cookie", &sid), ("x-odoo-database", "acme")]));
        assert_eq!(e.err(), Some(DbError::SessionAndHeader));
    }
}
