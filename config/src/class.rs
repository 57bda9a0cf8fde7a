//! Traffic classes of the contract ("Routing", step 2) and the path normalisation
//! that security decisions are made on.

use std::borrow::Cow;

/// The traffic class of a request, decided by its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// `/websocket` and `/longpolling/*`: go to the pool's longpolling (gevent) backends.
    Longpolling,
    /// `/xmlrpc/*`, `/jsonrpc`, `/json/*`, `/api/*`: machine-to-machine traffic, rate limited.
    Integration,
    /// `/web/static/*`, `/web/assets/*`, `/*/static/*`.
    Static,
    /// Everything else.
    Interactive,
}

impl Class {
    pub const ALL: [Class; 4] = [
        Class::Longpolling,
        Class::Integration,
        Class::Static,
        Class::Interactive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Longpolling => "longpolling",
            Class::Integration => "integration",
            Class::Static => "static",
            Class::Interactive => "interactive",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Classifies a request path (query string already removed; use [`normalize_path`]
    /// first so that `%2e%2e` tricks cannot move a request into another class).
    pub fn of(path: &str) -> Class {
        if is_segment_prefix(path, "/websocket") || path.starts_with("/longpolling/") {
            return Class::Longpolling;
        }
        if is_segment_prefix(path, "/xmlrpc")
            || is_segment_prefix(path, "/jsonrpc")
            || path.starts_with("/json/")
            || path.starts_with("/api/")
        {
            return Class::Integration;
        }
        if path.starts_with("/web/static/") || path.starts_with("/web/assets/") {
            return Class::Static;
        }
        // `/*/static/*`: any first segment, then `static`.
        if let Some(rest) = path.strip_prefix('/') {
            if let Some((first, tail)) = rest.split_once('/') {
                if !first.is_empty() && tail.starts_with("static/") {
                    return Class::Static;
                }
            }
        }
        Class::Interactive
    }
}

/// True when `path` is `prefix` itself or continues with `/` after it.
fn is_segment_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// True for `/web/database` and everything below it: Odoo's database manager.
pub fn is_database_manager(path: &str) -> bool {
    if is_segment_prefix(path, "/web/database") {
        return true;
    }
    // Both spellings below are found in one pass over the path.
    let (upper, params) = path.bytes().fold((false, false), |(u, p), b| {
        (u || b.is_ascii_uppercase(), p || b == b';')
    });
    // Werkzeug's routing is case-sensitive (`/WEB/database` is a 404 in Odoo), but a
    // case-insensitive layer in between would route it: blocked as well.
    if upper {
        return is_database_manager(&path.to_ascii_lowercase());
    }
    // Segment parameters (`/web/database;x/manager`) mean nothing to werkzeug, which
    // would not route them to the manager; but a server in between may strip them
    // (as servlet containers do), so those spellings are blocked too.
    params && {
        let stripped: String = path
            .split('/')
            .map(|seg| seg.split(';').next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("/");
        is_segment_prefix(&stripped, "/web/database")
    }
}

/// Returns the path part of a request target, without the query string.
pub fn path_of(target: &str) -> &str {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    &target[..end]
}

/// Normalises a request path the way the Odoo worker (werkzeug) will see it, so that
/// the class and the database-manager check cannot be dodged: percent-escapes of
/// unreserved characters and of `/` are decoded, `.` and `..` segments are resolved,
/// runs of `/` are collapsed. Allocation-free when the path needs none of that.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let needs_work =
        path.contains('%') || path.contains("//") || path.contains("/.") || !path.starts_with('/');
    if !needs_work {
        return Cow::Borrowed(path);
    }
    // Decode percent-escapes (invalid escapes are kept literally).
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len() + 1);
    if !path.starts_with('/') {
        decoded.push(b'/');
    }
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let h = hex(bytes[i + 1]).zip(hex(bytes[i + 2]));
            if let Some((a, b)) = h {
                decoded.push(a * 16 + b);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded).into_owned();
    // Resolve dot segments and collapse empty segments.
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() || (decoded.ends_with('/') && !out.is_empty()) {
        result.push('/');
    }
    Cow::Owned(result)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(Class::of("/websocket"), Class::Longpolling);
        assert_eq!(Class::of("/websocket/"), Class::Longpolling);
        assert_eq!(Class::of("/websockets"), Class::Interactive);
        assert_eq!(Class::of("/longpolling/poll"), Class::Longpolling);
        assert_eq!(Class::of("/longpolling/im_status"), Class::Longpolling);
        assert_eq!(Class::of("/xmlrpc/2/object"), Class::Integration);
        assert_eq!(Class::of("/xmlrpc/object"), Class::Integration);
        assert_eq!(Class::of("/xmlrpcfoo"), Class::Interactive);
        assert_eq!(Class::of("/jsonrpc"), Class::Integration);
        assert_eq!(Class::of("/json/2/res.partner/search"), Class::Integration);
        assert_eq!(Class::of("/api/v1/orders"), Class::Integration);
        assert_eq!(Class::of("/web/static/src/img/logo.png"), Class::Static);
        assert_eq!(
            Class::of("/web/assets/1/web.assets_web.min.js"),
            Class::Static
        );
        assert_eq!(Class::of("/website/static/src/x.css"), Class::Static);
        assert_eq!(Class::of("/static/x.css"), Class::Interactive);
        assert_eq!(Class::of("/web"), Class::Interactive);
        assert_eq!(Class::of("/web/login"), Class::Interactive);
        assert_eq!(
            Class::of("/web/dataset/call_kw/res.partner/read"),
            Class::Interactive
        );
        assert_eq!(Class::of("/"), Class::Interactive);
    }

    #[test]
    fn database_manager() {
        assert!(is_database_manager("/web/database/manager"));
        assert!(is_database_manager("/web/database/drop"));
        assert!(is_database_manager("/web/database"));
        assert!(!is_database_manager("/web/databases"));
        assert!(is_database_manager("/web/database;x/manager"));
        assert!(is_database_manager("/WEB/Database/manager"));
        assert!(!is_database_manager("/WEB/Databases"));
        assert!(is_database_manager("/web;a/database/list"));
        assert!(!is_database_manager("/web/databases;x"));
        assert!(!is_database_manager("/web/login"));
    }

    #[test]
    fn normalisation() {
        assert!(matches!(normalize_path("/web/login"), Cow::Borrowed(_)));
        assert_eq!(
            normalize_path("/web/%64atabase/manager"),
            "/web/database/manager"
        );
        assert_eq!(
            normalize_path("/web/static/../database/drop"),
            "/web/database/drop"
        );
        assert_eq!(
            normalize_path("//web//database/./manager"),
            "/web/database/manager"
        );
        assert_eq!(
            normalize_path("/web%2fdatabase%2Fmanager"),
            "/web/database/manager"
        );
        assert_eq!(normalize_path("/%6asonrpc"), "/jsonrpc");
        assert_eq!(normalize_path("/../../etc"), "/etc");
        assert_eq!(normalize_path("/a/b/"), "/a/b/");
        assert_eq!(normalize_path("/%zz"), "/%zz");
        assert_eq!(normalize_path("/%4"), "/%4");
        assert_eq!(normalize_path("*"), "/*");
    }

    #[test]
    fn path_without_query() {
        assert_eq!(path_of("/web?db=x"), "/web");
        assert_eq!(path_of("/web#x"), "/web");
        assert_eq!(path_of("/web"), "/web");
    }
}
