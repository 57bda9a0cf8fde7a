//! The request as it goes upstream (contract "What goes upstream"): the client's
//! headers, less the ones portier owns, plus the forwarding headers, the request id and
//! the tenant's database.

use http::{header, HeaderMap, HeaderValue};
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType, Result};
use portier_config::Class;

use crate::io::forward;
use crate::phase::ctx::Ctx;
use crate::phase::request::request_host;
use crate::snapshot::{DatabaseHeaders, Snapshot};

/// The request as it goes upstream.
///
/// Edited in place, through the header map (vendor patch 34): the headers the client
/// sent go on as they are (names without their case, as read: vendor patch 31), the
/// client's copies of the headers portier sets never pass (so a client cannot pick
/// another tenant's database), and portier's are added.
pub fn request_headers(
    ctx: &Ctx,
    client: &RequestHeader,
    upstream: &mut RequestHeader,
) -> Result<()> {
    let Some(snap) = ctx.snap.as_ref() else {
        return Ok(());
    };
    let Some(tenant) = ctx.tenant(snap) else {
        return Ok(());
    };
    let settings = &tenant.settings;
    let out = upstream.headers_mut();
    // A client rarely sends any of them: one pass over the names finds them (nothing is
    // allocated when there are none), then each is removed with all its values.
    let dropped: Vec<header::HeaderName> = out
        .keys()
        .filter(|name| {
            forward::is_own_header(name) || (ctx.body.preread && *name == header::EXPECT)
        })
        .cloned()
        .collect();
    for name in dropped {
        out.remove(name);
    }
    // Room for the six portier sets on every proxied request (X-Odoo-dbfilter,
    // X-Forwarded-Host, -For, -Proto, X-Real-IP, X-Request-Id) at once, rather than as
    // the map fills; the rarer Host and X-Odoo-Database grow it if they do not fit. The
    // map keeps a power of two of slots and the worker's connection keeps this header for
    // as long as it is open (a WebSocket: hours), so the bound is kept tight.
    out.reserve(6);
    let has_host = out.contains_key(header::HOST);
    database_headers(ctx, snap, out)?;
    if let Some(h) = request_host(client) {
        let h = HeaderValue::from_str(h)
            .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "host"))?;
        if !has_host {
            out.insert(header::HOST, h.clone());
        }
        out.insert(forward::X_FORWARDED_HOST, h);
    }
    if let Some(peer_ip) = ctx.client_ip {
        let trusted = settings.is_trusted_proxy(peer_ip);
        let mut sent = client.headers.get_all(&forward::X_FORWARDED_FOR).iter();
        let proto = if ctx.tls { "https" } else { "http" };
        let mut proto = HeaderValue::from_static(proto);
        match (trusted, sent.next()) {
            (true, Some(first)) => {
                let mut chain = String::from_utf8_lossy(first.as_bytes()).into_owned();
                for v in sent {
                    chain.push_str(", ");
                    chain.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
                let (xff, real) = forward::forwarded_for(peer_ip, Some(&chain), settings);
                let xff = HeaderValue::try_from(xff)
                    .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "x-forwarded-for"))?;
                out.insert(forward::X_FORWARDED_FOR, xff);
                out.insert(forward::X_REAL_IP, forward::ip_header_value(real));
            }
            _ => {
                // The common case: one address, formatted once.
                let ip = forward::ip_header_value(peer_ip);
                out.insert(forward::X_FORWARDED_FOR, ip.clone());
                out.insert(forward::X_REAL_IP, ip);
            }
        }
        if trusted {
            if let Some(p) = client.headers.get(&forward::X_FORWARDED_PROTO) {
                if p == "http" || p == "https" {
                    proto = p.clone();
                }
            }
        }
        out.insert(forward::X_FORWARDED_PROTO, proto);
    }
    out.insert(forward::X_REQUEST_ID, ctx.request_id.clone());
    Ok(())
}

/// The tenant's database (contract r2, "What goes upstream"): `X-Odoo-dbfilter:
/// ^NAME$` on every request; `X-Odoo-Database: NAME` only on integration requests
/// without a `session_id` cookie. Odoo 19 (`odoo/http.py`, `_get_session_and_dbname`)
/// treats a request with that header and no session as a stateless call whose
/// session is never saved, so on browser traffic it would make logging in
/// impossible, and with a session of another database Odoo answers 403.
fn database_headers(ctx: &Ctx, snap: &Snapshot, out: &mut HeaderMap) -> Result<()> {
    let with_database =
        ctx.route.class == Some(Class::Integration) && ctx.route.session_hash.is_none();
    let fixed = ctx
        .route
        .tenant
        .and_then(|t| snap.tenants.get(t))
        .and_then(|t| t.database.as_ref());
    if let Some(h) = fixed {
        out.insert(forward::X_ODOO_DBFILTER, h.dbfilter.clone());
        if with_database {
            out.insert(forward::X_ODOO_DATABASE, h.database.clone());
        }
        return Ok(());
    }
    let (Some(tenant), Some(name)) = (ctx.tenant(snap), ctx.route.tenant_name.as_deref()) else {
        return Ok(());
    };
    let Some(h) = tenant
        .database_for(name)
        .and_then(|db| DatabaseHeaders::new(&db))
    else {
        return Ok(());
    };
    out.insert(forward::X_ODOO_DBFILTER, h.dbfilter);
    if with_database {
        out.insert(forward::X_ODOO_DATABASE, h.database);
    }
    Ok(())
}

/// Property tests of the request header rewrite (the stable-Rust stand-in for fuzzing;
/// `scripts/fuzz.sh` runs them longer): whatever headers a client sends, the worker
/// gets exactly the tenant's database headers, portier's forwarding headers and
/// request id, and never a client's own copy of them.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn cases() -> u32 {
        crate::io::forward::props::fuzz_cases(500)
    }

    fn snapshot(trusted: bool) -> Arc<Snapshot> {
        let text = format!(
            "[listen]\nhttp = \"127.0.0.1:80\"\n[defaults]\ntrusted_proxies = [{}]\n[pools.p]\nhttp = [\"127.0.0.1:8069\"]\n[tenants.acme]\nhosts = [\"acme.test\"]\npool = \"p\"\ndatabase = \"acme\"\n",
            if trusted { "\"10.0.0.0/8\"" } else { "" }
        );
        let (config, _) = portier_config::load_str(&text, std::path::Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e:?}"));
        Arc::new(Snapshot::build(
            config,
            &portier_runtime::backend::Registry::default(),
            &portier_runtime::admission::Queues::default(),
            &portier_runtime::telemetry::Metrics::new(),
            &dashmap::DashMap::new(),
        ))
    }

    fn header() -> impl Strategy<Value = (String, String)> {
        let name = prop::sample::select(vec![
            "x-odoo-database",
            "X-Odoo-Dbfilter",
            "x-forwarded-for",
            "X-Forwarded-Host",
            "x-forwarded-proto",
            "x-real-ip",
            "x-request-id",
            "host",
            "cookie",
            "x-custom",
            "accept",
        ]);
        let value = prop::sample::select(vec![
            "acme2",
            "^.*$",
            "203.0.113.9",
            "10.1.2.3, 203.0.113.9",
            "evil.test",
            "https",
            "session_id=abc",
            "x",
            "",
        ]);
        (name, value).prop_map(|(n, v)| (n.to_string(), v.to_string()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        #[test]
        fn the_worker_gets_portiers_headers_and_never_a_clients_copy(
            headers in prop::collection::vec(header(), 0..10),
            integration in any::<bool>(),
            session in any::<bool>(),
            trusted in any::<bool>(),
            tls in any::<bool>(),
        ) {
            let snap = snapshot(trusted);
            let mut client = RequestHeader::build("POST", b"/jsonrpc", None).unwrap();
            for (n, v) in &headers {
                client.append_header(n.clone(), v.as_str()).unwrap();
            }
            let mut ctx = Ctx::new();
            ctx.snap = Some(snap);
            ctx.route.tenant = Some(0);
            ctx.route.tenant_name = Some(Arc::from("acme"));
            ctx.route.class = Some(if integration { Class::Integration } else { Class::Interactive });
            ctx.route.session_hash = session.then_some(1);
            ctx.tls = tls;
            ctx.request_id = HeaderValue::from_static("rid-1");
            let peer: std::net::IpAddr = if trusted { "10.9.9.9" } else { "198.51.100.7" }.parse().unwrap();
            ctx.client_ip = Some(peer);
            let mut upstream = client.clone();
            request_headers(&ctx, &client, &mut upstream).unwrap();
            let all = |name: &str| -> Vec<String> {
                upstream.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_string()).collect()
            };
            prop_assert_eq!(all("x-odoo-dbfilter"), vec!["^acme$".to_string()]);
            let want_db: Vec<String> = if integration && !session { vec!["acme".into()] } else { vec![] };
            prop_assert_eq!(all("x-odoo-database"), want_db);
            prop_assert_eq!(all("x-request-id"), vec!["rid-1".to_string()]);
            let xff = all("x-forwarded-for");
            prop_assert_eq!(xff.len(), 1);
            prop_assert!(xff[0].ends_with(&peer.to_string()), "{:?}", xff);
            if !trusted {
                prop_assert_eq!(&xff[0], &peer.to_string(), "an untrusted peer's chain is dropped");
                prop_assert_eq!(all("x-forwarded-proto"), vec![if tls { "https" } else { "http" }.to_string()]);
            }
            prop_assert_eq!(all("x-real-ip").len(), 1);
            prop_assert!(all("x-forwarded-host").len() <= 1);
            // Everything else the client sent is passed on unchanged.
            for (n, v) in &headers {
                let name = http::HeaderName::from_bytes(n.as_bytes()).unwrap();
                if !forward::is_own_header(&name) && name != header::HOST {
                    prop_assert!(upstream.headers.get_all(&name).iter().any(|x| x == v.as_str()), "{} lost", n);
                }
            }
        }
    }
}
