//! Human durations (`500ms`, `10s`, `30m`, `1h`; a unit is required, as in etcdctl and kubectl:
//! `10` could mean seconds or milliseconds), the one parser the CLI flags and the config files
//! share.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `10s`, `500ms`, `2m`, `1h`; a number without a unit is refused (but `0`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (use e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" if value == 0.0 => 0.0,
        "" => return Err(bare(s)),
        "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}"))
}

/// The error for a number given without its unit.
fn bare(s: &str) -> String {
    format!("invalid duration {s:?}: give its unit, e.g. {s}s or {s}ms")
}

/// A duration in a config file: a string such as `10s` (a bare number is refused, as on the
/// command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor (not an untagged enum) so errors keep the value's line and key.
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ConfigDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as 10s, 500ms or 30m")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ConfigDuration, E> {
                parse_duration(s).map(ConfigDuration).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ConfigDuration, E> {
                self.visit_str(&n.to_string())
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        // Issue 16: `lease_ttl: 10` was taken as seconds though only `10s` is documented.
        assert_eq!(
            parse_duration("3"),
            Err("invalid duration \"3\": give its unit, e.g. 3s or 3ms".to_owned())
        );
        for bad in ["10 parsecs", "", "s", "-1s", "1e400s", "2.5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
