//! The Odoo edge phases that need no response body (contract, "Maintenance", "Login
//! protection", "Assets, compression, cookies"): a tenant in maintenance answered by
//! portier, login attempts limited per client address and tenant, and `Secure` +
//! `SameSite=Lax` on Odoo's session cookie over TLS.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method};
use pingora::proxy::Session;
use portier_config::class::normalize_path;
use portier_config::{LoginLimit, Settings};

use crate::io::forward;
use crate::phase::answer::Answer;
use crate::phase::ctx::Ctx;
use crate::snapshot::Snapshot;
use arc_swap::ArcSwapOption;
use portier_runtime::cluster::{check_rate, Cluster, LimitKey};
use portier_runtime::limits::LoginLimits;
use portier_runtime::telemetry::Metrics;

/// Odoo's health route reaches the worker even in maintenance.
const HEALTH_PATH: &str = "/web/health";

/// The login paths of the contract (POST only).
const LOGIN_PATHS: [&str; 4] = [
    "/web/login",
    "/web/session/authenticate",
    "/web/reset_password",
    "/web/signup",
];

/// XML-RPC's `common` service: only its `authenticate` and `login` methods are logins
/// (`odoo/service/common.py` `exp_authenticate`, `exp_login`); `version` is not.
const XMLRPC_COMMON: [&str; 2] = ["/xmlrpc/2/common", "/xmlrpc/common"];

/// What the login protection must look at for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginProbe {
    /// Not a login path.
    No,
    /// A login by its path alone.
    Path,
    /// An XML-RPC `common` call: a login if its `methodName` says so (needs the body).
    XmlRpc,
}

impl LoginProbe {
    /// Whether the request is a login attempt: by its path, or for an XML-RPC `common`
    /// call by the `methodName` of its `body` (none yet: not one).
    pub fn is_login(self, body: Option<&Bytes>) -> bool {
        match self {
            LoginProbe::No => false,
            LoginProbe::Path => true,
            LoginProbe::XmlRpc => body.is_some_and(|b| xmlrpc_is_login(b)),
        }
    }

    pub fn of(method: &Method, path: &str) -> LoginProbe {
        if method != Method::POST {
            return LoginProbe::No;
        }
        let path = normalize_path(path);
        let path = path.trim_end_matches('/');
        if LOGIN_PATHS.contains(&path) {
            LoginProbe::Path
        } else if XMLRPC_COMMON.contains(&path) {
            LoginProbe::XmlRpc
        } else {
            LoginProbe::No
        }
    }
}

/// True when an XML-RPC request body calls `authenticate` or `login`.
pub fn xmlrpc_is_login(body: &[u8]) -> bool {
    const OPEN: &[u8] = b"<methodName>";
    const CLOSE: &[u8] = b"</methodName>";
    let Some(start) = find(body, OPEN).map(|i| i + OPEN.len()) else {
        return false;
    };
    let rest = &body[start..];
    let Some(end) = find(rest, CLOSE) else {
        return false;
    };
    let name = rest[..end].trim_ascii();
    name == b"authenticate" || name == b"login"
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The client's address as the contract means it: the peer, or behind
/// `trusted_proxies` the right-most untrusted `X-Forwarded-For` entry.
pub fn real_client(session: &Session, ctx: &Ctx, settings: &Settings) -> Option<IpAddr> {
    let peer = ctx.client_ip?;
    if !settings.is_trusted_proxy(peer) {
        return Some(peer);
    }
    let sent = session
        .req_header()
        .headers
        .get(&forward::X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok());
    Some(forward::forwarded_for(peer, sent, settings).1)
}

/// A tenant in maintenance: 503 with the maintenance page for everyone outside
/// `admin_cidrs`; `/web/health` still reaches the worker.
pub fn maintenance(snap: &Snapshot, session: &Session, ctx: &Ctx) -> Result<(), Answer> {
    let Some(tenant) = ctx.tenant(snap) else {
        return Ok(());
    };
    if !tenant.maintenance {
        return Ok(());
    }
    if normalize_path(session.req_header().uri.path()) == HEALTH_PATH {
        return Ok(());
    }
    if real_client(session, ctx, &tenant.settings).is_some_and(|ip| tenant.settings.is_admin(ip)) {
        return Ok(());
    }
    Err(Answer::Maintenance)
}

/// The login limit of a request that is a login attempt ([`LoginProbe::is_login`]);
/// shared across replicas with `[cluster]`.
pub async fn login(
    limits: &LoginLimits,
    cluster: &ArcSwapOption<Cluster>,
    metrics: &Metrics,
    snap: &Snapshot,
    session: &Session,
    ctx: &Ctx,
) -> Result<(), Answer> {
    let Some(tenant) = ctx.tenant(snap) else {
        return Ok(());
    };
    let settings = &tenant.settings;
    let (Some(limit), Some(ip), Some(name)) = (
        &settings.login,
        real_client(session, ctx, settings),
        &ctx.route.tenant_name,
    ) else {
        return Ok(());
    };
    if settings.is_admin(ip) {
        return Ok(());
    }
    let key = || LimitKey::Login(name.clone(), ip);
    let cluster = cluster.load_full();
    let verdict = check_rate(
        cluster.as_deref(),
        key,
        limit.rate,
        limit.burst,
        |rate, burst| limits.check(&LoginLimit { rate, burst }, name, ip),
    )
    .await;
    match verdict {
        Ok(()) => Ok(()),
        Err(retry_after) => {
            if let Some(stats) = &ctx.route.stats {
                metrics.login_limited(stats);
            }
            Err(Answer::LoginLimited {
                tenant: name.clone(),
                retry_after,
            })
        }
    }
}

/// A WebSocket close frame (server to client, unmasked) with code 1001, "going away".
const CLOSE_GOING_AWAY: &[u8] = &[0x88, 0x02, 0x03, 0xe9];

/// For an upgraded connection (the bus WebSocket): a future that resolves with a close
/// frame (1001) when a reload puts the connection's tenant into maintenance. A
/// connection opened while its tenant was already in maintenance (an admin's) is left
/// alone.
pub fn websocket_interrupt(
    mut reloads: tokio::sync::watch::Receiver<u64>,
    current: impl Fn() -> Arc<Snapshot> + Send + 'static,
    ctx: &Ctx,
) -> Option<futures_util::future::BoxFuture<'static, Option<Bytes>>> {
    let snap = ctx.snap.as_ref()?;
    let tenant = ctx.tenant(snap)?;
    let name = tenant.name.clone();
    let was = tenant.maintenance;
    Some(Box::pin(async move {
        while reloads.changed().await.is_ok() {
            let snap = current();
            let now = snap
                .config
                .tenants
                .iter()
                .any(|t| t.name == name && t.maintenance);
            if now && !was {
                return Some(Bytes::from_static(CLOSE_GOING_AWAY));
            }
        }
        // The process is going away: leave the connection to the shutdown.
        std::future::pending().await
    }))
}

/// With `secure_cookies` over TLS: `Secure` and `SameSite=Lax` added to a `session_id`
/// cookie that lacks them. `None` when the value stays as it is.
///
/// Odoo sets the cookie without either (`odoo/http.py` `Request._save_session`:
/// `set_cookie('session_id', ..., httponly=True)`), and behind a TLS-terminating proxy
/// it cannot know the browser's side is https.
pub fn secure_session_cookie(v: &HeaderValue) -> Option<HeaderValue> {
    let s = v.to_str().ok()?;
    let (name, _) = s.split_once('=')?;
    if name.trim() != "session_id" {
        return None;
    }
    let mut secure = false;
    let mut samesite = false;
    for attr in s.split(';').skip(1) {
        let a = attr.trim();
        let key = a.split('=').next().unwrap_or("").trim();
        secure |= key.eq_ignore_ascii_case("secure");
        samesite |= key.eq_ignore_ascii_case("samesite");
    }
    if secure && samesite {
        return None;
    }
    let mut out = String::with_capacity(s.len() + 24);
    out.push_str(s.trim_end().trim_end_matches(';'));
    if !secure {
        out.push_str("; Secure");
    }
    if !samesite {
        out.push_str("; SameSite=Lax");
    }
    HeaderValue::from_str(&out).ok()
}

/// `secure_cookies` applies to this request's response: TLS and the tenant's setting.
pub fn secures_cookies(ctx: &Ctx) -> bool {
    ctx.tls
        && ctx
            .snap
            .as_ref()
            .and_then(|s| ctx.tenant(s))
            .is_some_and(|t| t.settings.secure_cookies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie(s: &str) -> Option<String> {
        secure_session_cookie(&HeaderValue::from_str(s).unwrap())
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn session_cookie_gets_secure_and_samesite_once() {
        assert_eq!(
            cookie("session_id=abc; Expires=Thu, 01 Jan 2099 00:00:00 GMT; Max-Age=604800; HttpOnly; Path=/").as_deref(),
            Some("session_id=abc; Expires=Thu, 01 Jan 2099 00:00:00 GMT; Max-Age=604800; HttpOnly; Path=/; Secure; SameSite=Lax")
        );
        assert_eq!(
            cookie("session_id=abc; Path=/; secure").as_deref(),
            Some("session_id=abc; Path=/; secure; SameSite=Lax")
        );
        assert_eq!(
            cookie("session_id=abc; SameSite=Strict").as_deref(),
            Some("session_id=abc; SameSite=Strict; Secure")
        );
        assert_eq!(cookie("session_id=abc; Secure; SameSite=None"), None);
        assert_eq!(cookie("frontend_lang=en_US; Path=/"), None);
        assert_eq!(cookie("xsession_id=abc"), None);
    }

    #[test]
    fn login_paths_and_xmlrpc_methods() {
        assert_eq!(
            LoginProbe::of(&Method::POST, "/web/login"),
            LoginProbe::Path
        );
        assert_eq!(
            LoginProbe::of(&Method::POST, "//web/./login/"),
            LoginProbe::Path
        );
        assert_eq!(LoginProbe::of(&Method::GET, "/web/login"), LoginProbe::No);
        assert_eq!(
            LoginProbe::of(&Method::POST, "/web/signup"),
            LoginProbe::Path
        );
        assert_eq!(
            LoginProbe::of(&Method::POST, "/xmlrpc/2/common"),
            LoginProbe::XmlRpc
        );
        assert_eq!(
            LoginProbe::of(&Method::POST, "/xmlrpc/2/object"),
            LoginProbe::No
        );
        let call = |m: &str| {
            format!("<?xml version='1.0'?>\n<methodCall>\n<methodName> {m}</methodName>\n<params></params></methodCall>")
        };
        assert!(xmlrpc_is_login(call("authenticate").as_bytes()));
        assert!(xmlrpc_is_login(call("login").as_bytes()));
        assert!(!xmlrpc_is_login(call("version").as_bytes()));
        assert!(!xmlrpc_is_login(b"<methodName>login"));
    }
}
