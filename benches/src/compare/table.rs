//! The compare's table and JSON: each figure's median over the rounds with its min-max
//! spread, and portier's ratio to each peer taken round by round (both measured in the
//! same round) and summarised the same way.

use super::{Latency, Report, Round};
use crate::peers::Sockets;

pub(super) fn row<'a>(bench: &'a serde_json::Value, target: &str) -> Option<&'a serde_json::Value> {
    bench["rows"]
        .as_array()?
        .iter()
        .find(|r| r["target"] == target)
}

type Extract = Box<dyn Fn(&Round, &str) -> Option<f64>>;

fn shared(phase: &'static str, field: &'static str) -> Extract {
    Box::new(move |r: &Round, t: &str| row(&r.bench, t)?[phase][field].as_f64())
}

fn sockets(pick: fn(&Round) -> &Vec<Sockets>) -> Extract {
    Box::new(move |r: &Round, t: &str| {
        pick(r)
            .iter()
            .find(|s| s.target == t && s.echoed == s.opened && s.opened > 0)
            .map(Sockets::kib_per_conn)
    })
}

fn latency(f: fn(&Latency) -> f64) -> Extract {
    Box::new(move |r: &Round, t: &str| r.latency.iter().find(|l| l.target == t).map(f))
}

/// Every figure the table shows: its name and how to read it off a round.
fn metrics() -> Vec<(&'static str, Extract)> {
    vec![
        ("HTTP/1.1 req/s", shared("h1", "rps")),
        ("HTTP/1.1 p99 ms", shared("h1", "p99_ms")),
        ("HTTP/2+TLS req/s", shared("h2", "rps")),
        ("HTTP/2+TLS p99 ms", shared("h2", "p99_ms")),
        (
            "new TLS handshakes/s",
            Box::new(|r: &Round, t: &str| {
                r.handshakes
                    .iter()
                    .find(|h| h.target == t)
                    .map(|h| h.per_second)
            }),
        ),
        (
            "KiB per held longpoll",
            Box::new(|r: &Round, t: &str| row(&r.conns, t)?["result"]["rss_kb_per_conn"].as_f64()),
        ),
        ("KiB per open WebSocket", sockets(|r| &r.ws)),
        ("KiB per open wss", sockets(|r| &r.wss)),
        ("HTTP/1.1 at equal load p50 ms", latency(|l| l.h1.ms(0.5))),
        ("HTTP/1.1 at equal load p99 ms", latency(|l| l.h1.ms(0.99))),
        ("HTTP/1.1 at equal load CPU %", latency(|l| l.h1_cpu_pct)),
        ("HTTP/2 at equal load p50 ms", latency(|l| l.h2.ms(0.5))),
        ("HTTP/2 at equal load p99 ms", latency(|l| l.h2.ms(0.99))),
        ("HTTP/2 at equal load CPU %", latency(|l| l.h2_cpu_pct)),
        (
            "peak RSS MiB (h1+h2 run)",
            Box::new(|r: &Round, t: &str| row(&r.bench, t)?["peak_rss_mib"].as_f64()),
        ),
    ]
}

/// Median, min and max of some figures (none when there are none).
fn spread(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(s: Option<(f64, f64, f64)>, rounds: usize) -> String {
    match s {
        None => "-".into(),
        Some((m, _, _)) if rounds < 2 => num(m),
        Some((m, lo, hi)) => format!("{} ({}–{})", num(m), num(lo), num(hi)),
    }
}

/// The figure of every round for one target.
fn values(r: &Report, f: &Extract, t: &str) -> Vec<f64> {
    r.rounds.iter().filter_map(|round| f(round, t)).collect()
}

/// portier / peer, round by round.
fn ratios(r: &Report, f: &Extract, peer: &str) -> Vec<f64> {
    r.rounds
        .iter()
        .filter_map(|round| match (f(round, "portier"), f(round, peer)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        })
        .collect()
}

fn peers(r: &Report) -> Vec<&str> {
    std::iter::once("direct")
        .chain(r.targets.iter().map(String::as_str))
        .filter(|t| *t != "portier")
        .collect()
}

/// The metrics of every target, median (min–max) over the rounds, and portier's ratio
/// to each (higher is better for throughput; for latency and memory lower is better:
/// the ratio is still portier / peer).
pub fn table(r: &Report, _targets: &[String]) -> String {
    let n = r.rounds.len();
    let columns: Vec<&str> = std::iter::once("direct")
        .chain(r.targets.iter().map(String::as_str))
        .collect();
    let peers = peers(r);
    let mut out =
        format!("{n} round(s); each cell: median (min–max) over the rounds\n\n| metric |");
    for t in &columns {
        out.push_str(&format!(" {t} |"));
    }
    for p in &peers {
        out.push_str(&format!(" portier / {p} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(columns.len() + peers.len()));
    out.push('\n');
    for (name, f) in metrics() {
        out.push_str(&format!("| {name} |"));
        for t in &columns {
            out.push_str(&format!(" {} |", cell(spread(values(r, &f, t)), n)));
        }
        for p in &peers {
            out.push_str(&format!(" {} |", cell(spread(ratios(r, &f, p)), n)));
        }
        out.push('\n');
    }
    out.push_str("\nversions: ");
    let v: Vec<String> = r
        .versions
        .iter()
        .map(|(t, v)| format!("{t} = {v}"))
        .collect();
    out.push_str(&v.join("; "));
    out.push('\n');
    out
}

fn sockets_json(s: &[Sockets]) -> serde_json::Value {
    s.iter()
        .map(|s| {
            serde_json::json!({
                "target": s.target, "opened": s.opened, "echoed": s.echoed,
                "rss_before_kib": s.rss_before_kib, "rss_open_kib": s.rss_open_kib,
                "kib_per_conn": s.kib_per_conn(),
            })
        })
        .collect()
}

fn round_json(r: &Round) -> serde_json::Value {
    serde_json::json!({
        "order": r.order,
        "shared_bench": r.bench,
        "shared_conns": r.conns,
        "handshakes": r.handshakes.iter().map(|h| serde_json::json!({
            "target": h.target, "per_second": h.per_second, "p50_ms": h.p50_ms,
            "p99_ms": h.p99_ms, "errors": h.errors, "proxy_cpu_pct": h.cpu_pct,
        })).collect::<Vec<_>>(),
        "websockets": sockets_json(&r.ws),
        "websockets_tls": sockets_json(&r.wss),
        "equal_load": r.latency.iter().map(|l| serde_json::json!({
            "target": l.target,
            "h1": {"offered_rps": l.h1_rate, "proxy_cpu_pct": l.h1_cpu_pct, "stats": l.h1.json()},
            "h2": {"offered_rps": l.h2_rate, "proxy_cpu_pct": l.h2_cpu_pct, "stats": l.h2.json()},
        })).collect::<Vec<_>>(),
    })
}

pub fn json(r: &Report) -> serde_json::Value {
    let mut summary = serde_json::Map::new();
    let columns: Vec<&str> = std::iter::once("direct")
        .chain(r.targets.iter().map(String::as_str))
        .collect();
    for (name, f) in metrics() {
        let mut m = serde_json::Map::new();
        for t in &columns {
            if let Some((median, min, max)) = spread(values(r, &f, t)) {
                m.insert(
                    t.to_string(),
                    serde_json::json!({"median": median, "min": min, "max": max}),
                );
            }
        }
        for p in peers(r) {
            if let Some((median, min, max)) = spread(ratios(r, &f, p)) {
                m.insert(
                    format!("portier/{p}"),
                    serde_json::json!({"median": median, "min": min, "max": max}),
                );
            }
        }
        summary.insert(name.to_string(), m.into());
    }
    serde_json::json!({
        "summary": summary,
        "rounds": r.rounds.iter().map(round_json).collect::<Vec<_>>(),
        "versions": r.versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_the_median_and_the_extremes() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(spread(vec![4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(spread(vec![f64::NAN]), None);
        assert_eq!(cell(Some((2.0, 1.0, 3.0)), 3), "2.00 (1.00–3.00)");
        assert_eq!(cell(Some((1234.4, 1000.0, 1500.0)), 1), "1234");
    }
}
