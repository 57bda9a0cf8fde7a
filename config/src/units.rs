//! Parsing of the contract's unit strings: durations (`"250ms"`, `"5s"`, `"2m"`,
//! `"1h"`, compounds like `"1m30s"`), sizes (`"512KiB"`, `"128MiB"`) and rates
//! (`"20/s"`, `"600/min"`).

use std::time::Duration;

/// A request rate: `count` requests per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The interval between two requests at this rate (the GCRA emission interval).
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }

    /// Requests per second, as a float (for display and defaults).
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }
}

/// Parses a duration such as `250ms`, `5s`, `2m`, `1h`, `1d` or a compound `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; expected e.g. \"5s\", \"250ms\", \"2m\"".into());
    }
    let bytes = t.as_bytes();
    let mut i = 0;
    let mut total = Duration::ZERO;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!(
                "invalid duration \"{s}\": expected a number followed by ms, s, m, h or d"
            ));
        }
        let n: u64 = t[start..i]
            .parse()
            .map_err(|_| format!("invalid duration \"{s}\": number too large"))?;
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &t[ustart..i];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "" => {
                return Err(format!(
                    "invalid duration \"{s}\": missing unit (ms, s, m, h or d)"
                ))
            }
            other => {
                return Err(format!(
                    "invalid duration \"{s}\": unknown unit \"{other}\" (use ms, s, m, h or d)"
                ))
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Parses a size such as `512KiB`, `128MiB`, `1GiB`, `10MB`, `100B` or a bare byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid size \"{s}\": expected a number followed by B, KiB, MiB or GiB"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size \"{s}\": number too large"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
            "invalid size \"{s}\": unknown unit \"{other}\" (use B, KiB, MiB, GiB, KB, MB or GB)"
        ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size \"{s}\": too large"))
}

/// Parses a rate such as `20/s`, `600/min`, `1000/h`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    let (num, unit) = t.split_once('/').ok_or_else(|| {
        format!("invalid rate \"{s}\": expected COUNT/UNIT, e.g. \"20/s\" or \"600/min\"")
    })?;
    let count: u32 = num.trim().parse().map_err(|_| {
        format!(
            "invalid rate \"{s}\": \"{}\" is not a whole number",
            num.trim()
        )
    })?;
    if count == 0 {
        return Err(format!(
            "invalid rate \"{s}\": the count must be at least 1"
        ));
    }
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => {
            return Err(format!(
                "invalid rate \"{s}\": unknown unit \"{other}\" (use s, min, h or d)"
            ))
        }
    };
    Ok(Rate { count, per })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("1m500ms").unwrap(),
            Duration::from_millis(60_500)
        );
        assert_eq!(parse_duration(" 3s ").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("5").unwrap_err().contains("missing unit"));
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("1.5s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_size("128MiB").unwrap(), 128 * 1024 * 1024);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("100B").unwrap(), 100);
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999GiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn rates() {
        let r = parse_rate("20/s").unwrap();
        assert_eq!((r.count, r.per), (20, Duration::from_secs(1)));
        assert_eq!(r.interval(), Duration::from_millis(50));
        let r = parse_rate("600/min").unwrap();
        assert_eq!((r.count, r.per), (600, Duration::from_secs(60)));
        assert!((r.per_second() - 10.0).abs() < 1e-9);
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("20").is_err());
        assert!(parse_rate("20/fortnight").is_err());
        assert!(parse_rate("x/s").is_err());
    }
}
