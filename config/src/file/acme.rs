//! `[tls.acme]` (r2): automatic certificates. Nothing here contacts the directory.

use super::*;

use crate::units::Rate;

/// Let's Encrypt's production directory: the default of `directory`.
const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

pub(super) fn read_acme(cx: &mut Cx<'_>, t: &DeTable<'_>, base_dir: &Path) -> Option<Acme> {
    let mut tbl = Tbl::new(t, "[tls.acme]", ACME_KEYS);
    let mut ok = true;
    let mut acme = Acme {
        email: None,
        directory: LETS_ENCRYPT.to_string(),
        challenge: AcmeChallenge::Http01,
        ca: None,
        renew_before: Duration::from_secs(30 * 86_400),
        on_demand: false,
        on_demand_rate: Rate {
            count: 10,
            per: Duration::from_secs(60),
        },
    };
    if let Some(v) = tbl.get("email") {
        match want_str(cx, "email", v) {
            Some(s) if s.contains('@') && !s.contains(char::is_whitespace) => {
                acme.email = Some(s.to_string())
            }
            Some(_) => {
                cx.error(
                    &v.span(),
                    "`email` must be an address such as \"ops@example.com\"",
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if let Some(v) = tbl.get("directory") {
        match want_str(cx, "directory", v) {
            Some(s) if s.starts_with("https://") && s.len() > "https://".len() => {
                acme.directory = s.to_string()
            }
            Some(_) => {
                cx.error(
                    &v.span(),
                    "`directory` must be an https:// URL (RFC 8555 requires TLS)",
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if let Some(v) = tbl.get("challenge") {
        match want_str(cx, "challenge", v) {
            Some("http-01") => acme.challenge = AcmeChallenge::Http01,
            Some("tls-alpn-01") => acme.challenge = AcmeChallenge::TlsAlpn01,
            Some(_) => {
                cx.error(
                    &v.span(),
                    "`challenge` must be \"http-01\" or \"tls-alpn-01\"",
                );
                ok = false;
            }
            None => ok = false,
        }
    }
    if let Some(v) = tbl.get("ca") {
        match want_str(cx, "ca", v) {
            Some(s) => {
                let p = PathBuf::from(s);
                let p = if p.is_absolute() { p } else { base_dir.join(p) };
                match std::fs::read(&p) {
                    Ok(_) => acme.ca = Some(p),
                    Err(e) => {
                        cx.error(&v.span(), format!("`ca` {}: {e}", p.display()));
                        ok = false;
                    }
                }
            }
            None => ok = false,
        }
    }
    if let Some(v) = tbl.get("renew_before") {
        match want_positive_duration(cx, "renew_before", v) {
            Some(d) => acme.renew_before = d,
            None => ok = false,
        }
    }
    if let Some(v) = tbl.get("on_demand") {
        match want_bool(cx, "on_demand", v) {
            Some(b) => acme.on_demand = b,
            None => ok = false,
        }
    }
    if let Some(v) = tbl.get("on_demand_rate") {
        match want_str(cx, "on_demand_rate", v).map(parse_rate) {
            Some(Ok(r)) => acme.on_demand_rate = r,
            Some(Err(e)) => {
                cx.error(&v.span(), format!("`on_demand_rate`: {e}"));
                ok = false;
            }
            None => ok = false,
        }
    }
    tbl.finish(cx);
    ok.then_some(acme)
}

#[cfg(test)]
mod tests {
    use crate::{load_str, render, AcmeChallenge};
    use std::path::Path;
    use std::time::Duration;

    fn load(text: &str) -> Result<crate::Config, String> {
        load_str(text, Path::new("/etc/portier/portier.toml"))
            .map(|(c, _)| c)
            .map_err(|e| render(&e))
    }

    const BASE: &str =
        "[listen]\nhttp = \"127.0.0.1:80\"\nhttps = \"127.0.0.1:443\"\n[tls]\ncerts = \"/tmp\"\n";

    #[test]
    fn defaults_values_and_errors() {
        let c = load(&format!("{BASE}[tls.acme]\n")).unwrap();
        let a = c.tls.unwrap().acme.unwrap();
        assert_eq!(a.directory, super::LETS_ENCRYPT);
        assert_eq!(a.challenge, AcmeChallenge::Http01);
        assert_eq!(a.renew_before, Duration::from_secs(30 * 86_400));
        assert!(!a.on_demand);
        assert_eq!(
            (a.on_demand_rate.count, a.on_demand_rate.per),
            (10, Duration::from_secs(60))
        );
        assert_eq!((a.email, a.ca), (None, None));

        let ca = std::env::temp_dir().join(format!("portier-acme-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, "x").unwrap();
        let c = load(&format!(
            "{BASE}[tls.acme]\nemail = \"ops@example.com\"\ndirectory = \"https://127.0.0.1:14000/dir\"\nchallenge = \"tls-alpn-01\"\nca = \"{}\"\nrenew_before = \"10d\"\non_demand = true\non_demand_rate = \"2/s\"\n",
            ca.display()
        ))
        .unwrap();
        let a = c.tls.unwrap().acme.unwrap();
        assert_eq!(a.email.as_deref(), Some("ops@example.com"));
        assert_eq!(a.directory, "https://127.0.0.1:14000/dir");
        assert_eq!(a.challenge, AcmeChallenge::TlsAlpn01);
        assert_eq!(a.ca, Some(ca));
        assert_eq!(a.renew_before, Duration::from_secs(10 * 86_400));
        assert!(a.on_demand);
        assert_eq!(a.on_demand_rate.count, 2);
        let _ = std::fs::remove_file(a.ca.as_ref().unwrap());

        // Every problem reported, each at its position.
        let errs = load(&format!(
            "{BASE}[tls.acme]\nemail = \"nobody\"\ndirectory = \"http://x\"\nchallenge = \"dns-01\"\nca = \"/nonexistent/ca.pem\"\nrenew_before = \"soon\"\non_demand_rate = \"fast\"\nwildcards = true\n"
        ))
        .unwrap_err();
        for want in [
            ":7:9: `email`",
            ":8:13: `directory` must be an https:// URL",
            ":9:13: `challenge` must be",
            ":10:6: `ca` /nonexistent/ca.pem",
            ":11:16: `renew_before`",
            ":12:18: `on_demand_rate`",
            ":13:1: unknown key `wildcards`",
        ] {
            assert!(errs.contains(want), "{want} in {errs}");
        }
        assert_eq!(
            errs.lines().filter(|l| !l.contains("warning")).count(),
            7,
            "{errs}"
        );

        // Without an https listener.
        let errs = load("[listen]\nhttp = \"127.0.0.1:80\"\n[tls]\ncerts = \"/tmp\"\n[tls.acme]\n")
            .unwrap_err();
        assert!(
            errs.contains("[tls.acme] needs an `https` listener"),
            "{errs}"
        );
    }
}
