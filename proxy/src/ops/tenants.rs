//! `GET /status/tenants`: each tenant's live figures over the last minute, for the
//! dashboard. `?q=TEXT` keeps the tenants whose name or a host contains TEXT (without
//! regard to case), `?limit=N&offset=M` pages (default limit 100, at most 1000). A
//! `{tenant}` template is listed as itself, then each captured name with figures in the
//! window as a tenant of its own (its host the template's, with the name in it).

use portier_runtime::live::{self, Figures, WINDOW_S};
use serde_json::{json, Value};

use crate::state::Shared;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// One row: a tenant's name, hosts, pool and maintenance, and its figures.
struct Row {
    name: String,
    hosts: Vec<String>,
    pool: String,
    maintenance: bool,
    figures: Figures,
}

/// The answer to `GET /status/tenants?QUERY`.
pub fn json(shared: &Shared, query: &str) -> Value {
    let (q, limit, offset) = params(query);
    let snap = shared.snapshot.load();
    let now = live::now_s();
    let members = shared.live.members();
    let mut rows = Vec::new();
    for t in &snap.config.tenants {
        let pool = snap
            .config
            .pools
            .get(t.pool)
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let hosts: Vec<String> = t.hosts.iter().map(|h| h.to_string()).collect();
        rows.push(Row {
            name: t.name.clone(),
            hosts: hosts.clone(),
            pool: pool.clone(),
            maintenance: t.maintenance,
            figures: shared.live.figures(&t.name, now),
        });
        for member in members.get(t.name.as_str()).into_iter().flatten() {
            rows.push(Row {
                name: member.to_string(),
                hosts: hosts
                    .iter()
                    .map(|h| h.replace("{tenant}", member))
                    .collect(),
                pool: pool.clone(),
                maintenance: t.maintenance,
                figures: shared.live.figures(member, now),
            });
        }
    }
    let matching: Vec<Row> = rows
        .into_iter()
        .filter(|r| matches(r, q.as_deref()))
        .collect();
    let total = matching.len();
    let page: Vec<Value> = matching
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(row_json)
        .collect();
    json!({"window_s": WINDOW_S, "total": total, "offset": offset, "limit": limit, "tenants": page})
}

fn matches(r: &Row, q: Option<&str>) -> bool {
    let Some(q) = q else { return true };
    r.name.to_lowercase().contains(q) || r.hosts.iter().any(|h| h.to_lowercase().contains(q))
}

fn row_json(r: Row) -> Value {
    // Rates to a few decimals: the figures are counts over a minute.
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    json!({
        "name": r.name,
        "hosts": r.hosts,
        "pool": r.pool,
        "maintenance": r.maintenance,
        "rps": round(r.figures.rps),
        "errors_per_s": round(r.figures.errors_per_s),
        "refused_per_s": round(r.figures.refused_per_s),
        "p99_ms": r.figures.p99_ms.map(|v| (v * 10.0).round() / 10.0),
    })
}

/// `q` (lower-cased, percent-decoded), `limit` and `offset` from the query string.
fn params(query: &str) -> (Option<String>, usize, usize) {
    let (mut q, mut limit, mut offset) = (None, DEFAULT_LIMIT, 0);
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "q" if !v.is_empty() => q = Some(decode(v).to_lowercase()),
            "limit" => limit = v.parse().unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT),
            "offset" => offset = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    (q, limit, offset)
}

/// `+` and `%XX` decoded (what a browser's form or `encodeURIComponent` sends).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or(""), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        assert_eq!(params(""), (None, 100, 0));
        assert_eq!(
            params("q=Acme&limit=5&offset=10"),
            (Some("acme".into()), 5, 10)
        );
        assert_eq!(
            params("q=erp%2Eacme+x&limit=5000"),
            (Some("erp.acme x".into()), 1000, 0)
        );
        assert_eq!(params("limit=x&offset=-1"), (None, 100, 0));
        assert_eq!(decode("a%zz%4"), "a%zz%4");
    }
}
