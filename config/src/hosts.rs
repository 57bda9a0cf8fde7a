//! Host patterns and the host index ("Routing", step 1): exact names first, then
//! `{tenant}` templates, the longest fixed suffix winning.

use std::collections::HashMap;

/// Index of a tenant in [`crate::Config::tenants`].
pub type TenantId = usize;

/// A host as written in a tenant's `hosts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `erp.acme.com`
    Exact(String),
    /// `{tenant}.erp.example.com`: `prefix` + one captured label + `suffix`.
    Template { prefix: String, suffix: String },
}

impl HostPattern {
    /// Parses and normalises (lower case, no trailing dot) a host pattern.
    pub fn parse(raw: &str) -> Result<HostPattern, String> {
        let host = raw.trim().trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return Err("empty host name".into());
        }
        if host.contains(':') {
            return Err(format!(
                "host \"{raw}\" has a port; hosts are matched without the port"
            ));
        }
        if host.len() > 253 {
            return Err(format!("host \"{raw}\" is longer than 253 characters"));
        }
        let mut template_at = None;
        let labels: Vec<&str> = host.split('.').collect();
        for (i, label) in labels.iter().enumerate() {
            if *label == "{tenant}" {
                if template_at.is_some() {
                    return Err(format!("host \"{raw}\" has more than one {{tenant}}"));
                }
                template_at = Some(i);
                continue;
            }
            if label.contains("{tenant}") {
                return Err(format!(
                    "host \"{raw}\": {{tenant}} must be a whole label, as in {{tenant}}.erp.example.com"
                ));
            }
            if !valid_label(label) {
                return Err(format!(
                    "host \"{raw}\": \"{label}\" is not a valid DNS label (letters, digits and '-')"
                ));
            }
        }
        match template_at {
            None => Ok(HostPattern::Exact(host)),
            Some(i) => {
                if labels.len() < 2 {
                    return Err(format!(
                        "host \"{raw}\": a template needs at least one fixed label besides {{tenant}}"
                    ));
                }
                let prefix: String = labels[..i].iter().map(|l| format!("{l}.")).collect();
                let suffix: String = labels[i + 1..].iter().map(|l| format!(".{l}")).collect();
                Ok(HostPattern::Template { prefix, suffix })
            }
        }
    }

    pub fn is_template(&self) -> bool {
        matches!(self, HostPattern::Template { .. })
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Template { prefix, suffix } => write!(f, "{prefix}{{tenant}}{suffix}"),
        }
    }
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The result of a host lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMatch<'a> {
    pub tenant: TenantId,
    /// The label captured by a `{tenant}` template; `None` for an exact match.
    pub captured: Option<&'a str>,
}

#[derive(Clone, Debug)]
struct Template {
    prefix: String,
    suffix: String,
    tenant: TenantId,
}

/// The compiled host table.
#[derive(Clone, Debug, Default)]
pub struct HostIndex {
    /// Looked up on every request: aHash, not SipHash (its entries come from the
    /// configuration, so a client's host cannot make them collide).
    exact: HashMap<String, TenantId, ahash::RandomState>,
    /// Sorted: longest suffix first, then longest prefix.
    templates: Vec<Template>,
}

impl HostIndex {
    /// The tenant that claims exactly this pattern, if any.
    pub fn claimed_by(&self, pattern: &HostPattern) -> Option<TenantId> {
        match pattern {
            HostPattern::Exact(h) => self.exact.get(h).copied(),
            HostPattern::Template { prefix, suffix } => self
                .templates
                .iter()
                .find(|t| &t.prefix == prefix && &t.suffix == suffix)
                .map(|t| t.tenant),
        }
    }

    /// Adds a pattern; returns the tenant that already claims it, if any.
    pub fn insert(&mut self, pattern: &HostPattern, tenant: TenantId) -> Result<(), TenantId> {
        match pattern {
            HostPattern::Exact(h) => {
                if let Some(&other) = self.exact.get(h) {
                    return Err(other);
                }
                self.exact.insert(h.clone(), tenant);
            }
            HostPattern::Template { prefix, suffix } => {
                if let Some(t) = self
                    .templates
                    .iter()
                    .find(|t| &t.prefix == prefix && &t.suffix == suffix)
                {
                    return Err(t.tenant);
                }
                self.templates.push(Template {
                    prefix: prefix.clone(),
                    suffix: suffix.clone(),
                    tenant,
                });
                self.templates.sort_by(|a, b| {
                    b.suffix
                        .len()
                        .cmp(&a.suffix.len())
                        .then(b.prefix.len().cmp(&a.prefix.len()))
                });
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.templates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks a request host up. `host` must already be normalised with [`normalize_host`].
    pub fn lookup<'h>(&self, host: &'h str) -> Option<HostMatch<'h>> {
        if let Some(&tenant) = self.exact.get(host) {
            return Some(HostMatch {
                tenant,
                captured: None,
            });
        }
        for t in &self.templates {
            if host.len() <= t.prefix.len() + t.suffix.len() {
                continue;
            }
            if let Some(rest) = host
                .strip_suffix(t.suffix.as_str())
                .and_then(|r| r.strip_prefix(t.prefix.as_str()))
            {
                if !rest.is_empty() && !rest.contains('.') && valid_label(rest) {
                    return Some(HostMatch {
                        tenant: t.tenant,
                        captured: Some(rest),
                    });
                }
            }
        }
        None
    }
}

/// Normalises a `Host` / `:authority` value for lookup: the port is dropped, the name
/// lower-cased and a trailing dot removed. Borrows when nothing needs to change.
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let without_port = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        match rest.find(']') {
            Some(end) => &raw[..end + 2],
            None => raw,
        }
    } else {
        match raw.rfind(':') {
            Some(i) if raw[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &raw[..i],
            _ => raw,
        }
    };
    let trimmed = without_port.strip_suffix('.').unwrap_or(without_port);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(patterns: &[(&str, TenantId)]) -> HostIndex {
        let mut idx = HostIndex::default();
        for (p, t) in patterns {
            idx.insert(&HostPattern::parse(p).unwrap(), *t).unwrap();
        }
        idx
    }

    #[test]
    fn parse_patterns() {
        assert_eq!(
            HostPattern::parse("ACME.example.com.").unwrap(),
            HostPattern::Exact("acme.example.com".into())
        );
        assert_eq!(
            HostPattern::parse("{tenant}.erp.example.com").unwrap(),
            HostPattern::Template {
                prefix: String::new(),
                suffix: ".erp.example.com".into()
            }
        );
        assert_eq!(
            HostPattern::parse("www.{tenant}.example.com").unwrap(),
            HostPattern::Template {
                prefix: "www.".into(),
                suffix: ".example.com".into()
            }
        );
        assert!(HostPattern::parse("acme.com:443").is_err());
        assert!(HostPattern::parse("erp-{tenant}.example.com").is_err());
        assert!(HostPattern::parse("{tenant}.{tenant}.com").is_err());
        assert!(HostPattern::parse("{tenant}").is_err());
        assert!(HostPattern::parse("bad host.com").is_err());
        assert!(HostPattern::parse("").is_err());
    }

    #[test]
    fn exact_before_template() {
        let idx = index(&[("{tenant}.erp.example.com", 0), ("acme.erp.example.com", 1)]);
        assert_eq!(idx.lookup("acme.erp.example.com").unwrap().tenant, 1);
        let m = idx.lookup("beta.erp.example.com").unwrap();
        assert_eq!((m.tenant, m.captured), (0, Some("beta")));
    }

    #[test]
    fn longest_suffix_wins() {
        let idx = index(&[("{tenant}.example.com", 0), ("{tenant}.eu.example.com", 1)]);
        let m = idx.lookup("x.eu.example.com").unwrap();
        assert_eq!((m.tenant, m.captured), (1, Some("x")));
        let m = idx.lookup("eu.example.com").unwrap();
        assert_eq!((m.tenant, m.captured), (0, Some("eu")));
    }

    #[test]
    fn template_captures_exactly_one_label() {
        let idx = index(&[("{tenant}.erp.example.com", 0)]);
        assert!(idx.lookup("a.b.erp.example.com").is_none());
        assert!(idx.lookup("erp.example.com").is_none());
        assert!(idx.lookup(".erp.example.com").is_none());
        assert!(idx.lookup("unknown.org").is_none());
    }

    #[test]
    fn duplicates_are_reported() {
        let mut idx = index(&[("a.com", 0), ("{tenant}.b.com", 0)]);
        assert_eq!(idx.insert(&HostPattern::parse("A.com").unwrap(), 1), Err(0));
        assert_eq!(
            idx.insert(&HostPattern::parse("{tenant}.b.com").unwrap(), 2),
            Err(0)
        );
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Acme.Example.COM:8080"), "acme.example.com");
        assert_eq!(normalize_host("acme.example.com."), "acme.example.com");
        assert_eq!(normalize_host("acme.example.com"), "acme.example.com");
        assert!(matches!(
            normalize_host("acme.example.com"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(normalize_host("[::1]:443"), "[::1]");
        assert_eq!(normalize_host("127.0.0.1:80"), "127.0.0.1");
    }
}
