//! `[kubernetes]` (r3): where the API server is and which objects are portier's.

use super::*;

pub(super) fn read_kubernetes(
    cx: &mut Cx<'_>,
    t: &DeTable<'_>,
    base_dir: &Path,
) -> Option<Kubernetes> {
    let mut tbl = Tbl::new(t, "[kubernetes]", KUBERNETES_KEYS);
    let errors_before = cx.diags.iter().filter(|d| d.is_error()).count();
    let mut k = Kubernetes::default();
    if let Some(v) = tbl.get("kubeconfig") {
        if let Some(s) = want_str(cx, "kubeconfig", v) {
            let p = PathBuf::from(s);
            k.kubeconfig = Some(if p.is_absolute() { p } else { base_dir.join(p) });
        }
    }
    if let Some(v) = tbl.get("namespaces") {
        for item in want_array(cx, "namespaces", v).unwrap_or_default() {
            if let Some(s) = want_str(cx, "namespaces", item) {
                if dns_label(s) {
                    k.namespaces.push(s.to_string());
                } else {
                    cx.error(
                        &item.span(),
                        format!("\"{s}\" is not a namespace name (a DNS label)"),
                    );
                }
            }
        }
    }
    for (key, field) in [
        ("gateway_class", &mut k.gateway_class),
        ("ingress_class", &mut k.ingress_class),
    ] {
        if let Some(v) = tbl.get(key) {
            if let Some(s) = want_str(cx, key, v) {
                if s.is_empty() {
                    cx.error(&v.span(), format!("`{key}` must not be empty"));
                }
                *field = s.to_string();
            }
        }
    }
    if let Some(v) = tbl.get("status") {
        if let Some(b) = want_bool(cx, "status", v) {
            k.status = b;
        }
    }
    if let Some(v) = tbl.get("lease") {
        if let Some(s) = want_str(cx, "lease", v) {
            match s.split_once('/') {
                Some((ns, name)) if dns_label(ns) && !name.is_empty() && !name.contains('/') => {
                    k.lease = (ns.to_string(), name.to_string());
                }
                _ => cx.error(
                    &v.span(),
                    format!("`lease` must be NAMESPACE/NAME, found \"{s}\""),
                ),
            }
        }
    }
    if let Some(v) = tbl.get("status_address") {
        if let Some(s) = want_str(cx, "status_address", v) {
            k.status_address = s.to_string();
        }
    }
    tbl.finish(cx);
    let errors_after = cx.diags.iter().filter(|d| d.is_error()).count();
    (errors_after == errors_before).then_some(k)
}

/// An RFC 1123 label: what a namespace name is.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
