//! Logging: a `tracing` subscriber on stderr, text or JSON, with the level
//! set by `-v`/`-q` (or `RUST_LOG` when set).

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber; `verbosity` is `-v` count minus `-q` count.
pub fn init(format: LogFormat, verbosity: i8) {
    let level = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("journey_actions={level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

use std::fmt::Display;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use foldhash::HashMap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::dispatch::{AttemptStatus, Outcome, OutcomeCode};

/// The label used for `action` when the event names no known action, so
/// label values stay bounded by the configuration.
pub const UNKNOWN_ACTION: &str = "-";

/// The metric catalogue of SPEC §7, registered in one registry.
pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounter,
    pub outcomes: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub event_duration: HistogramVec,
    pub retries: IntCounterVec,
    pub dlq: IntCounterVec,
    pub throttle_wait: HistogramVec,
    pub capped: IntCounterVec,
    pub in_flight: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    /// The series [`Metrics::record`] updates, per action and per limits key.
    actions: Series<ActionSeries>,
    keys: Series<KeySeries>,
    /// `dlq`'s series by outcome ([`Metrics::dead_lettered`]).
    dead_letters: Children<OutcomeCode>,
}

/// Series found once per label value and kept: a labelled lookup hashes the
/// label values and takes the vector's lock, and an event updates five to
/// seven series, from every runtime thread at once. Reading the map takes no
/// lock; a label value seen for the first time is added (copy on write).
struct Series<T> {
    by_label: ArcSwap<HashMap<String, Arc<T>>>,
}

impl<T> Series<T> {
    fn new() -> Series<T> {
        Series {
            by_label: ArcSwap::from_pointee(HashMap::default()),
        }
    }

    /// Runs `f` on the series of `label`, made by `make` the first time
    /// (borrowed, not cloned: an `Arc` clone is a write to a shared counter).
    fn with<R>(&self, label: &str, make: impl FnOnce() -> T, f: impl FnOnce(&T) -> R) -> R {
        if let Some(found) = self.by_label.load().get(label) {
            return f(found);
        }
        let made = Arc::new(make());
        self.by_label.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.entry(label.to_string())
                .or_insert_with(|| made.clone());
            next
        });
        f(&made)
    }
}

/// One action's series.
struct ActionSeries {
    event_duration: Histogram,
    /// From the first call on, and the first retry on.
    http_duration: OnceLock<Histogram>,
    retries: OnceLock<IntCounter>,
    outcomes: Children<OutcomeCode>,
    http_requests: Children<AttemptStatus>,
}

/// One limits key's series, each from its first use on.
struct KeySeries {
    throttle_wait: OnceLock<Histogram>,
    capped: OnceLock<IntCounter>,
}

/// The counters of a vector by the value of their last label (outcome,
/// status), the labels before it being fixed; found once each.
struct Children<K> {
    seen: ArcSwap<Vec<(K, IntCounter)>>,
}

impl<K: Copy + Eq + Display> Children<K> {
    fn new() -> Children<K> {
        Children {
            seen: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Counts one for `key`, whose series in `vec` has the labels `before`
    /// and then `key`.
    fn inc(&self, key: K, vec: &IntCounterVec, before: &[&str]) {
        if let Some((_, counter)) = self.seen.load().iter().find(|(k, _)| *k == key) {
            counter.inc();
            return;
        }
        let last = key.to_string();
        let labels: Vec<&str> = before.iter().copied().chain([last.as_str()]).collect();
        let counter = vec.with_label_values(&labels);
        counter.inc();
        self.seen.rcu(|seen| {
            let mut next = Vec::clone(seen);
            if !next.iter().any(|(k, _)| *k == key) {
                next.push((key, counter.clone()));
            }
            next
        });
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

const PREFIX: &str = "journey_actions";
/// Seconds; from a fast loopback call to a long retry sequence.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(PREFIX);
        let hist = |name: &str, help: &str| {
            HistogramOpts::new(name, help)
                .namespace(PREFIX)
                .buckets(LATENCY_BUCKETS.to_vec())
        };
        let r = &registry;
        Metrics {
            events_consumed: reg(
                r,
                IntCounter::with_opts(opts(
                    "events_consumed_total",
                    "Records consumed from the input topic",
                ))
                .unwrap(),
            ),
            outcomes: reg(
                r,
                IntCounterVec::new(
                    opts("outcomes_total", "Events by final outcome"),
                    &["action", "outcome"],
                )
                .unwrap(),
            ),
            http_requests: reg(
                r,
                IntCounterVec::new(
                    opts(
                        "http_requests_total",
                        "Provider calls by status (or timeout/error)",
                    ),
                    &["action", "status"],
                )
                .unwrap(),
            ),
            http_duration: reg(
                r,
                HistogramVec::new(
                    hist("http_request_duration_seconds", "Provider call duration"),
                    &["action"],
                )
                .unwrap(),
            ),
            event_duration: reg(
                r,
                HistogramVec::new(
                    hist("event_duration_seconds", "Consume to outcome"),
                    &["action"],
                )
                .unwrap(),
            ),
            retries: reg(
                r,
                IntCounterVec::new(
                    opts("retries_total", "Attempts after the first"),
                    &["action"],
                )
                .unwrap(),
            ),
            dlq: reg(
                r,
                IntCounterVec::new(
                    opts("dlq_total", "Records written to the dead-letter topic"),
                    &["outcome"],
                )
                .unwrap(),
            ),
            throttle_wait: reg(
                r,
                HistogramVec::new(
                    hist(
                        "throttle_wait_seconds",
                        "Time waiting for the rate limit (queue time)",
                    ),
                    &["key"],
                )
                .unwrap(),
            ),
            capped: reg(
                r,
                IntCounterVec::new(opts("capped_total", "Events rejected by a cap"), &["key"])
                    .unwrap(),
            ),
            in_flight: reg(
                r,
                IntGauge::with_opts(opts(
                    "in_flight",
                    "Events being processed by this worker (consumed, no outcome yet)",
                ))
                .unwrap(),
            ),
            consumer_lag: reg(
                r,
                IntGaugeVec::new(
                    opts("consumer_lag", "Messages behind the high watermark"),
                    &["partition"],
                )
                .unwrap(),
            ),
            config_reloads: reg(
                r,
                IntCounterVec::new(
                    opts("config_reloads_total", "Action set reloads"),
                    &["result"],
                )
                .unwrap(),
            ),
            registry,
            actions: Series::new(),
            keys: Series::new(),
            dead_letters: Children::new(),
        }
    }

    /// Counts one final outcome: the one place every outcome is counted.
    pub fn record(&self, action: &str, outcome: &Outcome, event_seconds: f64) {
        let make = || ActionSeries {
            event_duration: self.event_duration.with_label_values(&[action]),
            http_duration: OnceLock::new(),
            retries: OnceLock::new(),
            outcomes: Children::new(),
            http_requests: Children::new(),
        };
        self.actions.with(action, make, |series| {
            series.outcomes.inc(outcome.code, &self.outcomes, &[action]);
            series.event_duration.observe(event_seconds);
            for attempt in &outcome.attempts {
                series
                    .http_requests
                    .inc(attempt.status, &self.http_requests, &[action]);
                series
                    .http_duration
                    .get_or_init(|| self.http_duration.with_label_values(&[action]))
                    .observe(attempt.duration.as_secs_f64());
            }
            if outcome.attempts.len() > 1 {
                series
                    .retries
                    .get_or_init(|| self.retries.with_label_values(&[action]))
                    .inc_by(outcome.attempts.len() as u64 - 1);
            }
        });
        let Some(key) = &outcome.limits_key else {
            return;
        };
        let make = || KeySeries {
            throttle_wait: OnceLock::new(),
            capped: OnceLock::new(),
        };
        self.keys.with(key, make, |series| {
            if outcome.code == OutcomeCode::Capped {
                series
                    .capped
                    .get_or_init(|| self.capped.with_label_values(&[key]))
                    .inc();
            }
            if !outcome.attempts.is_empty() || !outcome.throttle_wait.is_zero() {
                series
                    .throttle_wait
                    .get_or_init(|| self.throttle_wait.with_label_values(&[key]))
                    .observe(outcome.throttle_wait.as_secs_f64());
            }
        });
    }

    /// Counts a dead letter the broker acknowledged (SPEC §7 `dlq_total`).
    pub fn dead_lettered(&self, code: OutcomeCode) {
        self.dead_letters.inc(code, &self.dlq, &[]);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dispatch::Attempt;

    fn outcome(code: OutcomeCode, statuses: &[AttemptStatus], key: Option<&str>) -> Outcome {
        let mut outcome = Outcome::early(code, "");
        outcome.attempts = statuses
            .iter()
            .map(|&status| Attempt {
                status,
                duration: Duration::from_millis(3),
            })
            .collect();
        outcome.limits_key = key.map(str::to_string);
        outcome
    }

    /// The lines of the exposition that name `needle`, comments left out.
    fn lines(metrics: &Metrics, needle: &str) -> Vec<String> {
        metrics
            .render()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn series_found_once_count_what_every_later_event_adds() {
        let metrics = Metrics::new();
        let ok = outcome(OutcomeCode::Ok, &[AttemptStatus::Status(200)], Some("k"));
        let retried = outcome(
            OutcomeCode::Http(503),
            &[
                AttemptStatus::Status(503),
                AttemptStatus::Timeout,
                AttemptStatus::Status(503),
            ],
            Some("k"),
        );
        for _ in 0..3 {
            metrics.record("a", &ok, 0.01);
        }
        metrics.record("a", &retried, 0.5);
        metrics.record("a", &retried, 0.5);
        metrics.record("b", &outcome(OutcomeCode::Capped, &[], Some("k")), 0.0);
        for code in [
            OutcomeCode::Http(503),
            OutcomeCode::Capped,
            OutcomeCode::Http(503),
        ] {
            metrics.dead_lettered(code);
        }

        let p = "journey_actions_";
        for (needle, expected) in [
            (
                "outcomes_total{",
                vec![
                    format!(r#"{p}outcomes_total{{action="a",outcome="http_503"}} 2"#),
                    format!(r#"{p}outcomes_total{{action="a",outcome="ok"}} 3"#),
                    format!(r#"{p}outcomes_total{{action="b",outcome="capped"}} 1"#),
                ],
            ),
            (
                "http_requests_total{",
                vec![
                    format!(r#"{p}http_requests_total{{action="a",status="200"}} 3"#),
                    format!(r#"{p}http_requests_total{{action="a",status="503"}} 4"#),
                    format!(r#"{p}http_requests_total{{action="a",status="timeout"}} 2"#),
                ],
            ),
            (
                "retries_total{",
                vec![format!(r#"{p}retries_total{{action="a"}} 4"#)],
            ),
            (
                "http_request_duration_seconds_count{",
                vec![format!(
                    r#"{p}http_request_duration_seconds_count{{action="a"}} 9"#
                )],
            ),
            (
                "event_duration_seconds_count{",
                vec![
                    format!(r#"{p}event_duration_seconds_count{{action="a"}} 5"#),
                    format!(r#"{p}event_duration_seconds_count{{action="b"}} 1"#),
                ],
            ),
            (
                "capped_total{",
                vec![format!(r#"{p}capped_total{{key="k"}} 1"#)],
            ),
            (
                "dlq_total{",
                vec![
                    format!(r#"{p}dlq_total{{outcome="capped"}} 1"#),
                    format!(r#"{p}dlq_total{{outcome="http_503"}} 2"#),
                ],
            ),
            (
                "throttle_wait_seconds_count{",
                vec![format!(r#"{p}throttle_wait_seconds_count{{key="k"}} 5"#)],
            ),
        ] {
            assert_eq!(lines(&metrics, needle), expected, "{needle}");
        }
    }
}
