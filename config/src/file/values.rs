//! Keys given one by one as TOML values, for another front end: Kubernetes objects
//! carry per-tenant and per-pool keys as `portier.dev/KEY` annotations "written as in
//! TOML". Each value is read by the same readers as the file, so a key means the same
//! and is checked the same wherever it is written.

use super::*;

/// A problem with one key's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

/// What per-tenant values set: the settings over the defaults, and `maintenance`.
#[derive(Clone, Debug)]
pub struct TenantValues {
    pub settings: Arc<Settings>,
    pub maintenance: bool,
}

const POOL_VALUE_KEYS: &[&str] = &[
    "workers",
    "spread",
    "health",
    "breaker",
    "retries",
    "queue",
    "filestore",
];

static TENANT_VALUE_KEYS: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| [&["maintenance"][..], SETTINGS_KEYS].concat());

/// Per-tenant keys (every `[defaults]` key and `maintenance`) over `defaults`.
pub fn tenant_from_values(
    defaults: &Arc<Settings>,
    values: &[(&str, &str)],
) -> Result<TenantValues, Vec<KeyError>> {
    let doc = Values::new(values, &TENANT_VALUE_KEYS)?;
    let mut out = None;
    doc.read(|cx, t| {
        let mut tbl = Tbl::new(t, "the values", &TENANT_VALUE_KEYS);
        let maintenance = tbl
            .get("maintenance")
            .and_then(|v| want_bool(cx, "maintenance", v))
            .unwrap_or(false);
        let settings = read_settings(cx, &mut tbl, defaults);
        tbl.finish(cx);
        let settings = if settings == **defaults {
            defaults.clone()
        } else {
            Arc::new(settings)
        };
        out = Some(TenantValues {
            settings,
            maintenance,
        });
    })?;
    out.ok_or_default()
}

/// A pool named `name` whose members are provided at run time, with the pool keys
/// (`workers`, `spread`, `health`, `breaker`, `retries`, `queue`, `filestore`).
pub fn pool_from_values(name: &str, values: &[(&str, &str)]) -> Result<Pool, Vec<KeyError>> {
    let doc = Values::new(values, POOL_VALUE_KEYS)?;
    let mut out = None;
    doc.read(|cx, t| {
        out = read_pool(cx, name, &(0..0), t, Path::new("/"), true);
    })?;
    let mut pool = out.ok_or_default()?;
    pool.provided = true;
    Ok(pool)
}

trait OkOrDefault<T> {
    fn ok_or_default(self) -> Result<T, Vec<KeyError>>;
}

impl<T> OkOrDefault<T> for Option<T> {
    fn ok_or_default(self) -> Result<T, Vec<KeyError>> {
        self.ok_or_else(|| {
            vec![KeyError {
                key: String::new(),
                message: "invalid values".into(),
            }]
        })
    }
}

/// The values as one TOML document, one `KEY = VALUE` per value, and the line each
/// starts on (to name the key of a problem).
struct Values {
    text: String,
    starts: Vec<(usize, String)>,
}

impl Values {
    fn new(values: &[(&str, &str)], known: &[&str]) -> Result<Values, Vec<KeyError>> {
        let mut errors = Vec::new();
        let mut text = String::new();
        let mut starts = Vec::new();
        for (key, value) in values {
            let key_error = |message: String| KeyError {
                key: key.to_string(),
                message,
            };
            if !known.contains(key) {
                errors.push(key_error(format!(
                    "unknown key `{key}`; expected one of: {}",
                    known.join(", ")
                )));
                continue;
            }
            // Alone first: one value must be one key's value, nothing more.
            let one = format!("{key} = {value}\n");
            let (doc, syntax) = DeTable::parse_recoverable(&one);
            if let Some(e) = syntax.first() {
                errors.push(key_error(format!(
                    "`{value}` is not a TOML value: {}",
                    e.message().trim()
                )));
                continue;
            }
            if doc.get_ref().len() != 1 {
                errors.push(key_error(format!("`{value}` must be one value")));
                continue;
            }
            starts.push((
                text.bytes().filter(|&b| b == b'\n').count() + 1,
                key.to_string(),
            ));
            text.push_str(&one);
        }
        if errors.is_empty() {
            Ok(Values { text, starts })
        } else {
            Err(errors)
        }
    }

    /// Runs `f` over the document; its errors, each named by its key.
    fn read(&self, f: impl FnOnce(&mut Cx<'_>, &DeTable<'_>)) -> Result<(), Vec<KeyError>> {
        let mut cx = Cx::new(String::new(), &self.text);
        let (doc, _) = DeTable::parse_recoverable(&self.text);
        f(&mut cx, doc.get_ref());
        let errors: Vec<KeyError> = cx
            .diags
            .iter()
            .filter(|d| d.is_error())
            .map(|d| KeyError {
                key: self
                    .starts
                    .iter()
                    .rev()
                    .find(|(line, _)| *line <= d.pos.line)
                    .map(|(_, k)| k.clone())
                    .unwrap_or_default(),
                message: d.message.clone(),
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_values_are_read_as_in_toml() {
        let d = Arc::new(Settings::default());
        let v = tenant_from_values(
            &d,
            &[
                (
                    "integration",
                    r#"{ rate = "20/s", burst = 40, concurrency = 8 }"#,
                ),
                ("maintenance", "true"),
                ("max_body", r#""10MiB""#),
            ],
        )
        .unwrap();
        assert!(v.maintenance);
        assert_eq!(v.settings.max_body, 10 << 20);
        let l = v.settings.integration.as_ref().unwrap();
        assert_eq!((l.burst, l.concurrency), (40, Some(8)));
        // Nothing set: the defaults themselves.
        let v = tenant_from_values(&d, &[]).unwrap();
        assert!(Arc::ptr_eq(&v.settings, &d) && !v.maintenance);
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let d = Arc::new(Settings::default());
        let e = tenant_from_values(&d, &[("maintenance", "yes"), ("max_body", "\"1MiB\"")])
            .unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, "maintenance");
        let e = tenant_from_values(
            &d,
            &[("max_body", "\"1MiB\""), ("login", "{ rate = \"x\" }")],
        )
        .unwrap_err();
        assert_eq!(e[0].key, "login", "{e:?}");
        let e = tenant_from_values(&d, &[("pool", "\"x\"")]).unwrap_err();
        assert!(e[0].message.contains("unknown key `pool`"), "{e:?}");
        // One annotation cannot smuggle a second key in.
        let e = tenant_from_values(&d, &[("maintenance", "true\nmax_body = \"1B\"")]).unwrap_err();
        assert!(e[0].message.contains("one value"), "{e:?}");
    }

    #[test]
    fn pool_values() {
        let p = pool_from_values("ns/svc:8069", &[("workers", "4"), ("retries", "0")]).unwrap();
        assert_eq!((p.workers, p.retries, p.provided), (4, 0, true));
        assert!(p.http.is_empty());
        let e = pool_from_values("x", &[("workers", "-1")]).unwrap_err();
        assert_eq!(e[0].key, "workers");
        let e = pool_from_values("x", &[("http", "[]")]).unwrap_err();
        assert_eq!(e[0].key, "http");
    }
}
