//! Retry policy (SPEC §4 `retry`, §6): which attempt results are retried and
//! how long to wait before the next attempt. Everything here is pure; the
//! dispatcher feeds it attempt results and a clock.

use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::Rng;
use serde_json::Value;

use crate::units::parse_duration;

/// The attempt result classes named in `retry_on`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect: bool,
    pub timeout: bool,
    /// Other transport failures (TLS, protocol, reset after connect).
    pub error: bool,
    pub codes: Vec<u16>,
    /// `4xx`, `5xx`, …: the hundreds digit.
    pub classes: Vec<u16>,
}

impl RetryOn {
    pub fn parse(values: &[Value]) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for value in values {
            let text = match value {
                Value::String(s) => s.trim().to_ascii_lowercase(),
                Value::Number(n) => n.to_string(),
                other => return Err(format!("`{other}` is not a retry class")),
            };
            match text.as_str() {
                "connect" => on.connect = true,
                "timeout" => on.timeout = true,
                "error" => on.error = true,
                t if t.len() == 3 && t.ends_with("xx") && matches!(t.as_bytes()[0], b'1'..=b'5') => {
                    on.classes.push(u16::from(t.as_bytes()[0] - b'0'))
                }
                t => match t.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => on.codes.push(code),
                    _ => {
                        return Err(format!(
                            "`{t}` is not a retry class (use connect, timeout, error, a status code such as 429, or a class such as 5xx)"
                        ))
                    }
                },
            }
        }
        Ok(on)
    }

    pub fn status(&self, status: u16) -> bool {
        self.codes.contains(&status) || self.classes.contains(&(status / 100))
    }
}

/// A validated retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The first try included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f32,
    /// No new attempt starts after this much time since the first.
    pub max_elapsed: Duration,
    pub retry_on: RetryOn,
}

impl Default for RetryPolicy {
    /// Three attempts on transient failures: the defaults a provider that
    /// honours idempotency keys is safe with.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            max_elapsed: Duration::from_secs(120),
            retry_on: RetryOn {
                connect: true,
                timeout: true,
                error: false,
                codes: vec![408, 425, 429],
                classes: vec![5],
            },
        }
    }
}

/// How an attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptClass {
    Status(u16),
    Timeout,
    Connect,
    Error,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx: the event is `ok`.
    Success,
    /// Worth another attempt, if the policy has one left.
    Retry,
    /// Final: not retryable.
    Final,
}

pub fn classify(class: AttemptClass, on: &RetryOn) -> Verdict {
    let retry = match class {
        AttemptClass::Status(s) if (200..300).contains(&s) => return Verdict::Success,
        AttemptClass::Status(s) => on.status(s),
        AttemptClass::Timeout => on.timeout,
        AttemptClass::Connect => on.connect,
        AttemptClass::Error => on.error,
    };
    if retry {
        Verdict::Retry
    } else {
        Verdict::Final
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP date (a date in the past is zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Full jitter: a uniformly random delay in `[0, base]`.
pub fn full_jitter(base: Duration, rng: &mut impl Rng) -> Duration {
    if base.is_zero() {
        return base;
    }
    Duration::from_nanos(rng.random_range(0..=base.as_nanos().min(u128::from(u64::MAX)) as u64))
}

impl RetryPolicy {
    /// The un-jittered exponential delays before attempts 2, 3, … (one fewer
    /// than `max_attempts`), capped at `max_backoff`.
    pub fn schedule(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(self.multiplier)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .build()
    }

    /// The wait before the next attempt: the server's `Retry-After` (clamped
    /// to `max_backoff`) when it sent one, else the jittered backoff. `None`
    /// when that attempt would start after `max_elapsed`.
    pub fn next_delay(
        &self,
        backoff: Duration,
        retry_after: Option<Duration>,
        elapsed: Duration,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        let delay = match retry_after {
            Some(ra) => ra.min(self.max_backoff),
            None => full_jitter(backoff, rng),
        };
        (elapsed + delay <= self.max_elapsed).then_some(delay)
    }

    pub fn from_spec(
        spec: &crate::action::spec::RetrySpec,
    ) -> Result<RetryPolicy, Vec<(String, String)>> {
        let mut policy = RetryPolicy::default();
        let mut problems = Vec::new();
        let mut duration = |field: &str, value: &Option<String>, target: &mut Duration| {
            if let Some(text) = value {
                match parse_duration(text) {
                    Ok(d) => *target = d,
                    Err(e) => problems.push((format!("retry.{field}"), e)),
                }
            }
        };
        duration(
            "initial_backoff",
            &spec.initial_backoff,
            &mut policy.initial_backoff,
        );
        duration("max_backoff", &spec.max_backoff, &mut policy.max_backoff);
        duration("max_elapsed", &spec.max_elapsed, &mut policy.max_elapsed);
        if let Some(n) = spec.max_attempts {
            if n == 0 {
                problems.push((
                    "retry.max_attempts".into(),
                    "must be at least 1 (the first try counts)".into(),
                ));
            }
            policy.max_attempts = n;
        }
        if let Some(m) = spec.multiplier {
            if !(1.0..=100.0).contains(&m) {
                problems.push((
                    "retry.multiplier".into(),
                    format!("{m} is not between 1.0 and 100.0"),
                ));
            }
            policy.multiplier = m as f32;
        }
        if let Some(on) = &spec.retry_on {
            match RetryOn::parse(on) {
                Ok(on) => policy.retry_on = on,
                Err(e) => problems.push(("retry.retry_on".into(), e)),
            }
        }
        if policy.max_backoff < policy.initial_backoff {
            problems.push((
                "retry.max_backoff".into(),
                "must not be shorter than initial_backoff".into(),
            ));
        }
        if problems.is_empty() {
            Ok(policy)
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn on(values: Value) -> RetryOn {
        RetryOn::parse(values.as_array().unwrap()).unwrap()
    }

    #[test]
    fn classification_follows_retry_on() {
        let policy = on(json!(["connect", "timeout", 408, 429, "5xx"]));
        let table = [
            (AttemptClass::Status(200), Verdict::Success),
            (AttemptClass::Status(204), Verdict::Success),
            (AttemptClass::Status(503), Verdict::Retry),
            (AttemptClass::Status(500), Verdict::Retry),
            (AttemptClass::Status(429), Verdict::Retry),
            (AttemptClass::Status(408), Verdict::Retry),
            (AttemptClass::Status(400), Verdict::Final),
            (AttemptClass::Status(401), Verdict::Final),
            (AttemptClass::Status(404), Verdict::Final),
            (AttemptClass::Status(301), Verdict::Final),
            (AttemptClass::Timeout, Verdict::Retry),
            (AttemptClass::Connect, Verdict::Retry),
            (AttemptClass::Error, Verdict::Final),
        ];
        for (class, want) in table {
            assert_eq!(classify(class, &policy), want, "{class:?}");
        }
        assert_eq!(
            classify(AttemptClass::Timeout, &on(json!([503]))),
            Verdict::Final
        );
        assert_eq!(
            classify(AttemptClass::Status(418), &on(json!(["4xx"]))),
            Verdict::Retry
        );
    }

    #[test]
    fn bad_retry_classes_are_rejected() {
        for bad in [
            json!(["sometimes"]),
            json!([99]),
            json!(["6xx"]),
            json!([true]),
        ] {
            assert!(RetryOn::parse(bad.as_array().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Wed, 25 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 25 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 25 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn schedule_grows_by_the_multiplier_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            multiplier: 2.0,
            ..RetryPolicy::default()
        };
        let delays: Vec<_> = policy.schedule().collect();
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn full_jitter_stays_within_zero_and_base() {
        let mut rng = rand::rng();
        let base = Duration::from_millis(300);
        let mut saw_low = false;
        for _ in 0..1000 {
            let d = full_jitter(base, &mut rng);
            assert!(d <= base);
            saw_low |= d < base / 2;
        }
        assert!(
            saw_low,
            "jitter never went below half the base in 1000 draws"
        );
    }

    #[test]
    fn retry_after_is_clamped_and_max_elapsed_stops_retries() {
        let policy = RetryPolicy {
            max_backoff: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        let mut rng = rand::rng();
        let base = Duration::from_secs(1);
        assert_eq!(
            policy.next_delay(
                base,
                Some(Duration::from_secs(60)),
                Duration::ZERO,
                &mut rng
            ),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            policy.next_delay(base, Some(Duration::from_secs(2)), Duration::ZERO, &mut rng),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            policy.next_delay(
                base,
                Some(Duration::from_secs(2)),
                Duration::from_secs(9),
                &mut rng
            ),
            None
        );
        assert!(
            policy
                .next_delay(base, None, Duration::ZERO, &mut rng)
                .unwrap()
                <= base
        );
    }
}
