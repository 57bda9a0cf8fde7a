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

#[cfg(test)]
mod tests {
    use crate::load_str;
    use std::path::Path;

    fn load(text: &str) -> Result<crate::Config, Vec<String>> {
        load_str(text, Path::new("/etc/portier/portier.toml"))
            .map(|(c, _)| c)
            .map_err(|d| d.iter().map(|d| d.to_string()).collect())
    }

    #[test]
    fn defaults_and_values() {
        let c = load("[listen]\nhttp = \"127.0.0.1:80\"\n[kubernetes]\n").unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k, crate::Kubernetes::default());
        assert_eq!(k.gateway_class, "portier");
        assert_eq!(k.ingress_class, "portier");
        assert!(k.status && k.namespaces.is_empty() && k.status_address.is_empty());
        assert_eq!(
            k.lease,
            ("portier".to_string(), "portier-status".to_string())
        );
        let c = load("[listen]\nhttp = \"127.0.0.1:80\"\n[kubernetes]\nkubeconfig = \"kc\"\nnamespaces = [\"a\", \"b-2\"]\nstatus = false\nlease = \"ops/lead\"\nstatus_address = \"10.0.0.1\"\n").unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.kubeconfig.as_deref(), Some(Path::new("/etc/portier/kc")));
        assert_eq!(k.namespaces, ["a", "b-2"]);
        assert_eq!(k.lease, ("ops".to_string(), "lead".to_string()));
        assert!(!k.status);
    }

    #[test]
    fn bad_values_have_positions() {
        let e = load("[listen]\nhttp = \"127.0.0.1:80\"\n[kubernetes]\nlease = \"nolease\"\nnamespaces = [\"Bad_NS\"]\nwatch = true\n").unwrap_err();
        assert!(
            e.iter()
                .any(|d| d
                    .starts_with("/etc/portier/portier.toml:4:9: `lease` must be NAMESPACE/NAME")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|d| d
                .starts_with("/etc/portier/portier.toml:5:15: \"Bad_NS\" is not a namespace name")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|d| d
                .starts_with("/etc/portier/portier.toml:6:1: unknown key `watch` in [kubernetes]")),
            "{e:?}"
        );
    }

    /// (r3) An https listener whose `[tls]` has no `certs` is an error unless
    /// `[kubernetes]` supplies certificates; ACME still needs `certs`.
    #[test]
    fn tls_without_certs_only_with_kubernetes() {
        let base = "[listen]\nhttp = \"127.0.0.1:80\"\nhttps = \"127.0.0.1:443\"\n[tls]\nredirect_http = true\n";
        let e = load(base).unwrap_err();
        assert!(
            e.iter()
                .any(|d| d.starts_with("/etc/portier/portier.toml:4:2: [tls] needs `certs`")),
            "{e:?}"
        );
        let c = load(&format!("{base}[kubernetes]\n")).unwrap();
        assert!(c.tls.unwrap().certs.is_none());
        let e = load(&format!(
            "{base}[tls.acme]\nemail = \"a@b.c\"\n[kubernetes]\n"
        ))
        .unwrap_err();
        assert!(e.iter().any(|d| d.contains("[tls] needs `certs`")), "{e:?}");
    }
}
