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

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::dispatch::Outcome;

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
        }
    }

    /// Counts one final outcome: the one place every outcome is counted.
    pub fn record(&self, action: &str, outcome: &Outcome, event_seconds: f64) {
        let code = outcome.code.to_string();
        self.outcomes.with_label_values(&[action, &code]).inc();
        self.event_duration
            .with_label_values(&[action])
            .observe(event_seconds);
        for attempt in &outcome.attempts {
            self.http_requests
                .with_label_values(&[action, &attempt.status.to_string()])
                .inc();
            self.http_duration
                .with_label_values(&[action])
                .observe(attempt.duration.as_secs_f64());
        }
        if outcome.attempts.len() > 1 {
            self.retries
                .with_label_values(&[action])
                .inc_by(outcome.attempts.len() as u64 - 1);
        }
        if let Some(key) = &outcome.limits_key {
            if outcome.code == crate::dispatch::OutcomeCode::Capped {
                self.capped.with_label_values(&[key]).inc();
            }
            if !outcome.attempts.is_empty() || !outcome.throttle_wait.is_zero() {
                self.throttle_wait
                    .with_label_values(&[key])
                    .observe(outcome.throttle_wait.as_secs_f64());
            }
        }
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
