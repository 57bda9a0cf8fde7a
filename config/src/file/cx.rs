//! Diagnostics with positions, and typed readers of single values.

use super::*;

pub(super) type Val<'i> = Spanned<DeValue<'i>>;

/// Collects diagnostics and turns byte offsets into line and column.
pub(crate) struct Cx<'s> {
    file: String,
    src: &'s str,
    pub(crate) diags: Vec<Diagnostic>,
}

impl<'s> Cx<'s> {
    pub(super) fn new(file: String, src: &'s str) -> Self {
        Cx {
            file,
            src,
            diags: Vec::new(),
        }
    }

    pub(super) fn pos(&self, offset: usize) -> Pos {
        Pos::of_offset(self.src, offset)
    }

    pub(super) fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        let pos = self.pos(span.start);
        self.diags
            .push(Diagnostic::error(&self.file, pos, message.into()));
    }

    pub(super) fn warn(&mut self, span: &Range<usize>, message: impl Into<String>) {
        let pos = self.pos(span.start);
        self.diags
            .push(Diagnostic::warning(&self.file, pos, message.into()));
    }

    pub(super) fn has_errors(&self) -> bool {
        self.diags.iter().any(|d| d.is_error())
    }
}

/// A table being read: remembers which keys were used so the rest can be reported.
pub(super) struct Tbl<'t, 'i> {
    pub(super) entries: Vec<(&'t Spanned<DeString<'i>>, &'t Val<'i>, bool)>,
    what: String,
    known: &'static [&'static str],
}

impl<'t, 'i> Tbl<'t, 'i> {
    pub(super) fn new(
        table: &'t DeTable<'i>,
        what: impl Into<String>,
        known: &'static [&'static str],
    ) -> Self {
        Tbl {
            entries: table.iter().map(|(k, v)| (k, v, false)).collect(),
            what: what.into(),
            known,
        }
    }

    pub(super) fn get(&mut self, key: &str) -> Option<&'t Val<'i>> {
        for e in self.entries.iter_mut() {
            if e.0.get_ref().as_ref() == key {
                e.2 = true;
                return Some(e.1);
            }
        }
        None
    }

    /// Like [`Self::get`], with the span of the key: for a table, its name in its header
    /// (`tls` of `[tls]`), where a key missing from it is reported.
    pub(super) fn get_keyed(&mut self, key: &str) -> Option<(Range<usize>, &'t Val<'i>)> {
        for e in self.entries.iter_mut() {
            if e.0.get_ref().as_ref() == key {
                e.2 = true;
                return Some((e.0.span(), e.1));
            }
        }
        None
    }

    pub(super) fn finish(self, cx: &mut Cx<'_>) {
        for (k, _, used) in self.entries {
            if !used {
                let name = k.get_ref().as_ref();
                let hint = suggest(name, self.known)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                cx.error(
                    &k.span(),
                    format!(
                        "unknown key `{name}` in {}{hint}; expected one of: {}",
                        self.what,
                        self.known.join(", ")
                    ),
                );
            }
        }
    }
}

/// The closest known key, when one is close enough to be a typo.
pub(super) fn suggest(name: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

pub(super) fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

pub(super) fn want_str<'t>(cx: &mut Cx<'_>, key: &str, v: &'t Val<'_>) -> Option<&'t str> {
    match v.get_ref() {
        DeValue::String(s) => Some(s.as_ref()),
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be a string, found {}", type_name(other)),
            );
            None
        }
    }
}

pub(super) fn want_bool(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<bool> {
    match v.get_ref() {
        DeValue::Boolean(b) => Some(*b),
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be true or false, found {}", type_name(other)),
            );
            None
        }
    }
}

pub(super) fn want_uint(
    cx: &mut Cx<'_>,
    key: &str,
    v: &Val<'_>,
    min: u64,
    max: u64,
) -> Option<u64> {
    match v.get_ref() {
        DeValue::Integer(i) => {
            let parsed = i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok();
            match parsed {
                Some(n) if n >= 0 && (n as u64) >= min && (n as u64) <= max => Some(n as u64),
                _ => {
                    cx.error(
                        &v.span(),
                        format!("`{key}` must be a whole number from {min} to {max}"),
                    );
                    None
                }
            }
        }
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be a whole number, found {}", type_name(other)),
            );
            None
        }
    }
}

pub(super) fn want_duration(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Duration> {
    match v.get_ref() {
        DeValue::String(s) => match parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                cx.error(&v.span(), format!("`{key}`: {e}"));
                None
            }
        },
        other => {
            cx.error(
                &v.span(),
                format!(
                    "`{key}` must be a duration string such as \"5s\" or \"250ms\", found {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}

pub(super) fn want_positive_duration(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Duration> {
    let d = want_duration(cx, key, v)?;
    if d.is_zero() {
        cx.error(&v.span(), format!("`{key}` must be longer than zero"));
        return None;
    }
    Some(d)
}

pub(super) fn want_size(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<u64> {
    match v.get_ref() {
        DeValue::String(s) => match parse_size(s) {
            Ok(n) => Some(n),
            Err(e) => {
                cx.error(&v.span(), format!("`{key}`: {e}"));
                None
            }
        },
        DeValue::Integer(_) => want_uint(cx, key, v, 0, u64::MAX / 2),
        other => {
            cx.error(
                &v.span(),
                format!(
                    "`{key}` must be a size such as \"512KiB\" or \"128MiB\", found {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}

pub(super) fn want_addr(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<SocketAddr> {
    let s = want_str(cx, key, v)?;
    parse_addr(s)
        .map_err(|e| cx.error(&v.span(), format!("`{key}`: {e}")))
        .ok()
}

pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        format!("\"{s}\" is not an IP:PORT address (e.g. \"10.0.1.11:8069\" or \"[::1]:8069\"; use `discover` for DNS names)")
    })
}

pub(super) fn want_array<'t, 'i>(
    cx: &mut Cx<'_>,
    key: &str,
    v: &'t Val<'i>,
) -> Option<Vec<&'t Val<'i>>> {
    match v.get_ref() {
        DeValue::Array(a) => Some(a.iter().collect()),
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be an array, found {}", type_name(other)),
            );
            None
        }
    }
}

/// The span of `key` in the table `v`, when `v` is a table that has it.
pub(super) fn key_span(v: &Val<'_>, key: &str) -> Option<Range<usize>> {
    match v.get_ref() {
        DeValue::Table(t) => t
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, val)| val.span()),
        _ => None,
    }
}

pub(super) fn want_table<'t, 'i>(
    cx: &mut Cx<'_>,
    key: &str,
    v: &'t Val<'i>,
) -> Option<&'t DeTable<'i>> {
    match v.get_ref() {
        DeValue::Table(t) => Some(t),
        other => {
            cx.error(
                &v.span(),
                format!("`{key}` must be a table, found {}", type_name(other)),
            );
            None
        }
    }
}

pub(super) fn want_addrs(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Vec<SocketAddr>> {
    let items = want_array(cx, key, v)?;
    let mut out = Vec::with_capacity(items.len());
    let mut seen = HashSet::new();
    let mut ok = true;
    for item in items {
        match want_addr(cx, key, item) {
            Some(a) => {
                if !seen.insert(a) {
                    cx.error(&item.span(), format!("`{key}`: {a} is listed twice"));
                    ok = false;
                }
                out.push(a)
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

pub(super) fn want_cidrs(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Vec<IpNet>> {
    let items = want_array(cx, key, v)?;
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in items {
        let Some(s) = want_str(cx, key, item) else {
            ok = false;
            continue;
        };
        let parsed = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(n) => out.push(n.trunc()),
            Err(_) => {
                cx.error(
                    &item.span(),
                    format!(
                        "`{key}`: \"{s}\" is not a CIDR such as \"10.0.0.0/8\" or an IP address"
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}
