//! An HTTPRoute's rules: paths, filters and backendRefs, as the tenant's pool and its
//! routes; what is not supported and what does not resolve.

use super::backend::{granted, BackendError, Backends, PortRef};
use super::{backend_problem, Draft};
use crate::gateway::{HttpRoute, HttpRouteRule, ObjectRef, GROUP};
use crate::objects::{Key, ObjRef, Objects};

pub(super) type Found = Vec<(String, String)>;
/// References that do not resolve: reason, message, field.
pub(super) type Unresolved = Vec<(String, String, String)>;

/// The rules as pools and routes; what is not supported (field, message) and the
/// references that do not resolve (reason, message).
#[allow(clippy::too_many_arguments)]
pub(super) fn rules(
    objects: &Objects,
    key: &Key,
    route: &HttpRoute,
    redirect_http: bool,
    backends: &mut Backends<'_>,
    hosts: Vec<String>,
    source: ObjRef,
) -> (Draft, Found, Unresolved) {
    let mut unsupported: Found = Vec::new();
    let mut unresolved: Unresolved = Vec::new();
    let mut draft = Draft {
        source,
        values: super::annotations(&route.metadata),
        hosts,
        pool: None,
        routes: Vec::new(),
    };
    for (ri, rule) in route.spec.rules.iter().enumerate() {
        let at = format!("/spec/rules/{ri}");
        let redirect = filters(rule, &at, redirect_http, &mut unsupported);
        let paths = paths(rule, &at, &mut unsupported);
        if redirect {
            continue;
        }
        let pool = match rule.backend_refs.as_slice() {
            [b] => backend(
                objects,
                key,
                b,
                backends,
                &mut unsupported,
                &mut unresolved,
                &at,
            ),
            [] => {
                unsupported.push((
                    at.clone(),
                    "a rule needs a backendRef (or a RequestRedirect to https)".into(),
                ));
                None
            }
            _ => {
                unsupported.push((
                    format!("{at}/backendRefs"),
                    "several backendRefs in one rule (weights) are not supported".into(),
                ));
                None
            }
        };
        let Some(pool) = pool else { continue };
        for (path, exact) in paths {
            draft.add_path(path, exact, pool);
        }
    }
    (draft, unsupported, unresolved)
}

fn backend(
    objects: &Objects,
    key: &Key,
    b: &ObjectRef,
    backends: &mut Backends<'_>,
    unsupported: &mut Found,
    unresolved: &mut Unresolved,
    at: &str,
) -> Option<usize> {
    let field = format!("{at}/backendRefs/0");
    if b.weight.is_some_and(|w| w != 1) || !b.filters.is_empty() {
        unsupported.push((
            field,
            "backendRef weights and filters are not supported".into(),
        ));
        return None;
    }
    if b.kind.as_deref().unwrap_or("Service") != "Service"
        || !b.group.as_deref().unwrap_or("").is_empty()
    {
        unresolved.push((
            "InvalidKind".into(),
            format!("backendRef {} is not a Service", b.name),
            field,
        ));
        return Some(backends.empty(&format!("{}/{}:invalid", key.0, b.name)));
    }
    let ns = b.namespace.clone().unwrap_or_else(|| key.0.clone());
    let Some(port) = b.port else {
        unsupported.push((field, format!("backendRef {} needs a port", b.name)));
        return None;
    };
    let name = format!("{ns}/{}:{port}", b.name);
    if !granted(objects, GROUP, "HTTPRoute", &key.0, "Service", &ns, &b.name) {
        unresolved.push((
            "RefNotPermitted".into(),
            format!(
                "no ReferenceGrant in {ns} lets this route use Service {}",
                b.name
            ),
            field,
        ));
        return Some(backends.empty(&name));
    }
    match backends.pool(&ns, &b.name, &PortRef::Number(port)) {
        Ok(i) => Some(i),
        Err(e @ BackendError::NotFound(_)) => {
            let (_, reason, m) = backend_problem(&e);
            unresolved.push((reason.into(), m, field));
            Some(backends.empty(&name))
        }
        Err(e) => {
            let (_, _, m) = backend_problem(&e);
            unsupported.push((field, m));
            None
        }
    }
}

/// A rule's filters: whether it is a redirect to https (supported with the file's
/// `redirect_http`); any other filter is not supported.
fn filters(rule: &HttpRouteRule, at: &str, redirect_http: bool, unsupported: &mut Found) -> bool {
    let mut redirect = false;
    for (fi, f) in rule.filters.iter().enumerate() {
        let https_only = f.request_redirect.as_ref().is_some_and(|r| {
            r.scheme.as_deref() == Some("https")
                && r.hostname.is_none()
                && r.path.is_none()
                && r.port.is_none()
        });
        if f.kind == "RequestRedirect" && https_only {
            redirect = true;
            if !redirect_http {
                unsupported.push((format!("{at}/filters/{fi}"), "RequestRedirect to https needs `redirect_http = true` in the file's [tls] (portier then redirects every host's plain HTTP)".into()));
            }
        } else {
            unsupported.push((
                format!("{at}/filters/{fi}"),
                format!(
                    "filter {}: only RequestRedirect to scheme https is supported",
                    f.kind
                ),
            ));
        }
    }
    redirect
}

/// A rule's paths (none: `/`), each with whether it is exact; header, query and method
/// matches and other path types are not supported.
fn paths(rule: &HttpRouteRule, at: &str, unsupported: &mut Found) -> Vec<(String, bool)> {
    let mut paths = Vec::new();
    let matches = if rule.matches.is_empty() {
        vec![Default::default()]
    } else {
        rule.matches.clone()
    };
    for (mi, m) in matches.iter().enumerate() {
        let mat = format!("{at}/matches/{mi}");
        for (what, set) in [
            ("headers", m.headers.is_some()),
            ("queryParams", m.query_params.is_some()),
            ("method", m.method.is_some()),
        ] {
            if set {
                unsupported.push((
                    format!("{mat}/{what}"),
                    format!("matches on {what} are not supported"),
                ));
            }
        }
        let (kind, value) = m.path.as_ref().map_or(("PathPrefix", "/"), |p| {
            (
                p.kind.as_deref().unwrap_or("PathPrefix"),
                p.value.as_deref().unwrap_or("/"),
            )
        });
        match kind {
            "PathPrefix" | "Exact" if value.starts_with('/') => {
                paths.push((value.to_string(), kind == "Exact"))
            }
            "PathPrefix" | "Exact" => unsupported.push((
                format!("{mat}/path"),
                format!("path \"{value}\" does not start with /"),
            )),
            other => unsupported.push((
                format!("{mat}/path"),
                format!("path match type {other} is not supported"),
            )),
        }
    }
    paths
}
