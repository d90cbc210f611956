//! Parsing of the human-written units used in configuration: durations
//! (`250ms`, `10s`, `5m`, `6h`) and rates (`500/s`, `20/m`, `3/10s`).
//!
//! Both are pure functions so the settings loader and the action validator
//! report the same message for the same mistake.

use std::time::Duration;

/// Parses a duration such as `250ms`, `10s`, `5m`, `6h` or `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration (expected e.g. `250ms`, `10s`, `5m`, `6h`)".into());
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("invalid duration `{text}`: {e} (expected e.g. `250ms`, `10s`, `5m`, `6h`)")
    })
}

/// A number of calls allowed per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The time between two permits when calls are spread evenly.
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

/// Parses a rate `N/UNIT` where UNIT is `s`, `m`, `h` or any duration (`10s`, `100ms`).
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let expected = "(expected e.g. `500/s`, `20/m`, `3/10s`)";
    let (count, unit) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("invalid rate `{text}` {expected}"))?;
    let count: u32 = count.trim().parse().map_err(|_| {
        format!(
            "invalid rate `{text}`: `{}` is not a whole number {expected}",
            count.trim()
        )
    })?;
    if count == 0 {
        return Err(format!(
            "invalid rate `{text}`: the count must be at least 1"
        ));
    }
    let unit = unit.trim();
    let per = match unit {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => parse_duration(other).map_err(|e| format!("invalid rate `{text}`: {e}"))?,
    };
    if per.is_zero() {
        return Err(format!(
            "invalid rate `{text}`: the period must be longer than zero"
        ));
    }
    if per / count == Duration::ZERO {
        return Err(format!(
            "invalid rate `{text}`: more than one call per nanosecond"
        ));
    }
    Ok(Rate { count, per })
}

/// Serde helper: a duration written as a string.
pub mod serde_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit_parse() {
        let table = [
            ("250ms", Duration::from_millis(250)),
            ("10s", Duration::from_secs(10)),
            ("5m", Duration::from_secs(300)),
            ("6h", Duration::from_secs(6 * 3600)),
            ("1h30m", Duration::from_secs(5400)),
            (" 2s ", Duration::from_secs(2)),
        ];
        for (text, want) in table {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_durations_are_rejected_with_the_input_named() {
        for text in ["", "10", "ten seconds", "5x", "-1s"] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("duration"), "{text}: {err}");
        }
    }

    #[test]
    fn rates_parse_with_named_and_duration_units() {
        let table = [
            ("500/s", 500, Duration::from_secs(1)),
            ("20/m", 20, Duration::from_secs(60)),
            ("3/h", 3, Duration::from_secs(3600)),
            ("3/10s", 3, Duration::from_secs(10)),
            ("1/250ms", 1, Duration::from_millis(250)),
        ];
        for (text, count, per) in table {
            assert_eq!(parse_rate(text), Ok(Rate { count, per }), "{text}");
        }
        assert_eq!(
            parse_rate("20/s").unwrap().interval(),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn bad_rates_are_rejected() {
        for text in ["500", "0/s", "-3/s", "x/s", "5/parsec", "5/0s", ""] {
            assert!(parse_rate(text).is_err(), "{text}");
        }
    }
}
