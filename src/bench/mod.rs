//! `journey-actions bench`: the worker measured against the physical limits
//! of the machine it runs on, in one run, on the same events:
//!
//! - limit A, HTTP: the sink driven by the worker's HTTP client settings at
//!   the worker's concurrency, no Kafka;
//! - limit B, Kafka: the events consumed with the worker's consumer settings,
//!   no dispatch;
//! - end-to-end: the real worker (render, limits, dispatch, result records,
//!   commits) on the same events.
//!
//! The sink runs in a process of its own; the mock cluster (default) runs
//! inside this one, so its CPU is counted with the worker's.

pub mod sink;
mod threads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::Message;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::action::{self, ActionSet};
use crate::dispatch::{ColdStart, DispatchOptions, Dispatcher, OutcomeCode};
use crate::settings::{Ordering, Settings};
use crate::telemetry::Metrics;
use crate::worker::producer::PolledProducer;
use crate::worker::{Finished, Worker};
use sink::{Certificates, Latency, Protocol, SinkProcess};
pub use threads::ByThread;
use threads::Threads;

/// Which actions the events use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mix {
    /// One action: POST with a templated path, headers and a JSON payload (like the SMS example, no auth).
    Simple,
    /// The four shipped examples (bearer, OAuth2, custom auth, HMAC), limits removed, ~1 % invalid events.
    Examples,
}

/// How fast `--rate` produces the end-to-end events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    PerSecond(u32),
    /// Half of what the end-to-end phase reaches at full speed in the same
    /// run (measured first).
    HalfOfMax,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        if text == "half" {
            return Ok(Rate::HalfOfMax);
        }
        match text.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Rate::PerSecond(n)),
            _ => Err(format!(
                "`{text}`: expected events per second (a whole number above 0) or `half`"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The worker's settings; brokers, topics, group, `max_in_flight` and
    /// ordering are replaced by the bench's own.
    pub settings: Settings,
    pub events: usize,
    pub concurrency: usize,
    pub mix: Mix,
    pub ordering: Ordering,
    /// Distinct Kafka keys (profiles) over the events.
    pub keys: usize,
    pub sink_latency: Latency,
    pub sink_protocol: Protocol,
    pub brokers: Option<String>,
    /// Produce the end-to-end events at this rate instead of beforehand.
    pub rate: Option<Rate>,
    pub partitions: i32,
    /// `throttle.max_concurrency` of the simple action: events beyond it are
    /// held without an HTTP connection.
    pub bulkhead: Option<u32>,
    pub json: Option<PathBuf>,
    /// Return the mock cluster and the sink ([`Held`]) instead of stopping them.
    pub hold: bool,
    /// How many times the phases run, one round after another on the same
    /// events, sink and broker (see [`Report::rounds`]).
    pub rounds: usize,
}

/// What `--hold` keeps up after the run: the mock cluster with the run's
/// topics, the sink and the bench's actions. Stopped when dropped.
pub struct Held {
    _cluster: Option<MockCluster<'static, DefaultProducerContext>>,
    _sink: Option<SinkProcess>,
    _workdir: tempfile::TempDir,
    /// The brokers, the topics with their record counts, and the sink's URL.
    pub description: String,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_mib: u64,
    pub cpu: String,
}

#[derive(Debug, Serialize)]
pub struct Limit {
    pub count: usize,
    pub seconds: f64,
    pub per_second: f64,
    /// CPU of this process (not the sink's) per 10 000 operations.
    pub cpu_seconds_per_10k: f64,
    /// CPU of the sink process per 10 000 operations (limit A only).
    pub sink_cpu_seconds_per_10k: Option<f64>,
    /// Limit A only: connections the sink accepted during the phase, and
    /// the HTTP versions of the answers (`HTTP/1.1`, `HTTP/2.0`) with their
    /// counts.
    pub sink_connections: Option<usize>,
    pub http_versions: Option<BTreeMap<String, usize>>,
    /// Limit A only: each call's HTTP exchange (request sent → answer read),
    /// as the worker's attempts time theirs.
    pub exchange_ms: Option<Spread>,
    /// Share of the machine's CPU time that was busy during the phase, and
    /// the share the hypervisor took (steal), from `/proc/stat`.
    pub machine: Option<MachineLoad>,
    /// This process's CPU by kind of thread, µs per operation (limit A,
    /// limit B and the Kafka round trip).
    pub cpu_by_thread_us: Option<ByThread>,
}

/// How busy the whole machine was during a phase (`/proc/stat`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MachineLoad {
    /// Busy (user, system, interrupts) share of all cores' time, 0–1.
    pub busy: f64,
    /// Time the hypervisor gave to others (steal), share, 0–1.
    pub steal: f64,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Mean and percentiles of durations, milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

impl Spread {
    /// Of sorted milliseconds ([`sorted_ms`]).
    pub fn of(sorted_ms: &[f64]) -> Spread {
        let p = percentiles(sorted_ms, 0.0);
        Spread {
            mean: sorted_ms.iter().sum::<f64>() / sorted_ms.len().max(1) as f64,
            p50: p.p50,
            p99: p.p99,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EndToEnd {
    pub events: usize,
    pub seconds: f64,
    pub events_per_second: f64,
    /// end-to-end / min(limit A, limit B); none with `--rate` (the rate,
    /// not the worker, sets the pace).
    pub ratio: Option<f64>,
    /// Events consumed in the first `warmup_seconds` are left out of the
    /// latency figures below (only with `--rate`; 0 otherwise).
    pub warmup_seconds: f64,
    /// Events the latency figures are over.
    pub latency_events: usize,
    /// Consume to outcome (the HTTP call done, before its result record is
    /// produced), milliseconds.
    pub latency_ms: Percentiles,
    /// `latency_ms` minus the sink's own (its fixed or mean latency).
    pub added_latency_ms: Percentiles,
    /// Consume to the outcome's records acknowledged by the broker (when the
    /// offset may be committed), milliseconds.
    pub acked_latency_ms: Percentiles,
    /// `latency_ms` over every event, warm-up included.
    pub all_latency_ms: Percentiles,
    /// Of `latency_ms`, over the events that made a call: the time in their
    /// HTTP exchanges (request sent → answer read, every attempt), to set
    /// beside limit A's `exchange_ms` ...
    pub exchange_ms: Spread,
    /// ... and the rest: the worker's own steps and waits (task start,
    /// parsing, rendering, auth, including a token fetch, limits, retries'
    /// backoff, the outcome).
    pub besides_exchange_ms: Spread,
    pub peak_rss_mib: f64,
    /// CPU of this process (worker and, by default, the mock cluster).
    pub cpu_seconds_per_10k: f64,
    /// CPU of the sink process.
    pub sink_cpu_seconds_per_10k: f64,
    /// Connections the sink accepted during the phase.
    pub sink_connections: usize,
    pub machine: Option<MachineLoad>,
    /// `cpu_seconds_per_10k` by kind of thread, µs per event.
    pub cpu_by_thread_us: ByThread,
    pub outcomes: BTreeMap<String, usize>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub events: usize,
    pub concurrency: usize,
    pub mix: Mix,
    pub ordering: String,
    pub keys: usize,
    pub partitions: i32,
    pub sink_latency: String,
    /// What the sink spoke: `http`, `https` (HTTP/1.1 over TLS) or `h2`.
    pub sink_protocol: Protocol,
    pub broker: String,
    /// The rate the end-to-end events were produced at (events/s).
    pub rate: Option<u32>,
    /// With `--rate half`: the end-to-end phase at full speed, run first;
    /// `rate` is half of its events/s.
    pub full_speed: Option<EndToEnd>,
    pub bulkhead: Option<u32>,
    /// Limit A's calls at once: the most the worker can make at once
    /// (`concurrency`, or fewer with a bulkhead, few keys with ordering
    /// `key`, or ordering `partition`), and which of these bounds them.
    pub http_concurrency: CallsAtOnce,
    /// Calls sent to the sink before the first phase, not counted: two per
    /// call the worker can make at once, at most one per event.
    pub warm_up_calls: usize,
    /// Connections the sink accepted during the warm-up.
    pub warm_up_connections: usize,
    /// librdkafka settings given on top of the worker's defaults
    /// (`[kafka.consumer]`, `[kafka.producer]`, and on the mock cluster
    /// with `--rate` [`MOCK_FETCH_WAIT`]).
    pub consumer_settings: BTreeMap<String, String>,
    pub producer_settings: BTreeMap<String, String>,
    pub limit_http: Limit,
    pub limit_kafka: Limit,
    /// Not a limit of issue 4: the Kafka work the worker cannot avoid, each
    /// event consumed and a result-sized record produced and acknowledged.
    pub kafka_round_trip: Limit,
    /// The ratio a worker would reach that did, per event, only limit A's
    /// call, the Kafka round trip and the parse and render, on the CPUs limit
    /// A kept busy: CPU of the call / CPU of all three (each measured at its
    /// cheapest). An estimate, not a ceiling: limit A's call includes its
    /// connection set-up. `None` when limit A left the CPUs idle.
    pub necessary_work_ratio: Option<f64>,
    pub end_to_end: EndToEnd,
    /// Parsing, checking and rendering one event, single thread, µs (what
    /// an event costs on top of a bare HTTP call, before Kafka).
    pub parse_render_us: f64,
    /// The ratio the CPU allows when both limit A and end-to-end keep the
    /// machine busy: CPU per call (this process + sink) over CPU per event.
    pub cpu_bound_ratio: Option<f64>,
    /// When `cpu_bound_ratio` is measured: what an event cost beyond one of
    /// limit A's calls, by kind of thread.
    pub beyond_the_call: Option<BeyondTheCall>,
    /// Which round (1-based) the phases above are from: the one with the
    /// median ratio, or with `--rate` the median added p99 (see
    /// [`median_round`]). Their peak RSS is the first round's, which ran
    /// first.
    pub shown_round: usize,
    /// Every round's headline figures, in the order they ran.
    pub rounds: Vec<RoundFigures>,
}

/// What an end-to-end event cost beyond one of limit A's calls, in µs of
/// CPU (this process and the sink), by where it went; and what the
/// issue's ratio of 0.85 would leave for it. The parts add up to the
/// event's cost minus the call's.
#[derive(Debug, Serialize)]
pub struct BeyondTheCall {
    /// Limit A's call, this process and the sink.
    pub call_us: f64,
    /// The event's CPU (this process and the sink) minus the call's:
    /// the sum of the four parts below.
    pub total_us: f64,
    /// The most an event may cost beyond the call for a ratio of 0.85,
    /// both phases being CPU-bound: `call_us / 0.85 - call_us`.
    pub allowed_for_085_us: f64,
    /// The runtime's threads: the worker's tasks (parsing, rendering,
    /// dispatch, result records, the consume loop) beyond the call's share.
    pub runtime_us: f64,
    /// The Kafka clients' and the mock broker's threads.
    pub kafka_us: f64,
    /// The sink's CPU beyond what it spent per call of limit A.
    pub sink_us: f64,
    /// The rest of `total_us`: other threads, and what the per-thread
    /// readings and the process's total disagree on.
    pub other_us: f64,
}

/// The target for end-to-end / min(A, B).
const TARGET_RATIO: f64 = 0.85;

fn beyond_the_call(http: &Limit, e2e: &EndToEnd) -> Option<BeyondTheCall> {
    let a = http.cpu_by_thread_us?;
    let e = e2e.cpu_by_thread_us;
    let call_us = http.with_sink_us()?;
    let total_us = e2e.with_sink_us() - call_us;
    let runtime_us = e.runtime - a.runtime;
    let kafka_us = e.kafka_clients + e.mock_broker - a.kafka_clients - a.mock_broker;
    let sink_us = (e2e.sink_cpu_seconds_per_10k - http.sink_cpu_seconds_per_10k?) * US_PER_10K;
    Some(BeyondTheCall {
        call_us,
        total_us,
        allowed_for_085_us: call_us / TARGET_RATIO - call_us,
        runtime_us,
        kafka_us,
        sink_us,
        other_us: total_us - runtime_us - kafka_us - sink_us,
    })
}

pub async fn run(options: BenchOptions) -> anyhow::Result<(Report, Option<Held>)> {
    let o = &options;
    let run_id = chrono::Utc::now().format("%Y%m%d%H%M%S%3f").to_string();
    let mut settings = o.settings.clone();
    settings.dispatch.max_in_flight = o.concurrency;
    settings.dispatch.ordering = o.ordering;
    settings.kafka.input_topic = format!("bench.input.{run_id}");
    settings.kafka.results_topic = format!("bench.results.{run_id}");
    settings.kafka.dlq_topic = format!("bench.dlq.{run_id}");
    let rounds = o.rounds.max(1);
    // Each round names its consumer groups and, at --rate, the topic its
    // events are produced into anew.
    let round_ids: Vec<String> = (1..=rounds).map(|i| format!("{run_id}.{i}")).collect();
    let mut topics = vec![
        settings.kafka.input_topic.clone(),
        settings.kafka.results_topic.clone(),
        settings.kafka.dlq_topic.clone(),
    ];
    if o.rate.is_some() {
        topics.extend(round_ids.iter().map(|id| rate_topic(id)));
    }
    let cluster = match &o.brokers {
        None => {
            let cluster =
                MockCluster::new(1).context("starting the in-process Kafka mock cluster")?;
            settings.kafka.brokers = cluster.bootstrap_servers();
            // The mock broker answers a fetch that finds no record only after
            // the whole fetch.wait.max.ms, even if records arrive meanwhile
            // (librdkafka's rdkafka_mock_handlers.c); a real broker answers
            // as soon as they arrive. With the worker's 10 ms, a steady rate
            // would reach the worker in bursts of 10 ms of events. Without a
            // rate every event is there before the phase starts, and only
            // the fetches that find nothing wait: the worker's own setting
            // is kept (at 1 ms those idle fetches cost ~2 µs of CPU per
            // event at full speed).
            if o.rate.is_some() {
                settings
                    .kafka
                    .consumer
                    .entry(MOCK_FETCH_WAIT.0.into())
                    .or_insert_with(|| MOCK_FETCH_WAIT.1.into());
            }
            for t in &topics {
                cluster.create_topic(t, o.partitions, 1)?;
            }
            Some(cluster)
        }
        Some(b) => {
            settings.kafka.brokers = b.clone();
            let names: Vec<&str> = topics.iter().map(|t| t.as_str()).collect();
            crate::demo::create_topics(b, &names, o.partitions).await?;
            None
        }
    };

    let workdir = tempfile::tempdir()?;
    let certificates = match o.sink_protocol {
        Protocol::Http => None,
        Protocol::Https | Protocol::H2 => Some(Certificates::create(workdir.path())?),
    };
    let mut sink = SinkProcess::start(o.sink_latency, o.sink_protocol, certificates.as_ref())
        .context("starting the HTTP sink process")?;
    let base = format!("{}://{}", o.sink_protocol.scheme(), sink.addr);
    let ca = certificates.as_ref().map(|c| c.ca.as_path());
    let events = match o.mix {
        Mix::Simple => {
            write_simple_action(workdir.path(), &base, o.bulkhead, ca)?;
            simple_events(o.events, o.keys)
        }
        Mix::Examples => {
            crate::demo::example_actions(workdir.path(), &base, None, ca)?;
            crate::demo::sample_events(o.events, 7)
        }
    };
    // Every phase loads the definitions anew: an action with TLS material
    // has a client of its own, and each phase starts with clients that hold
    // no connection yet.
    let actions = || load_actions(workdir.path());
    eprintln!(
        "bench: {} events, concurrency {}, {:?} mix, ordering {:?}, {} keys, sink latency {} ({}), {}",
        o.events,
        o.concurrency,
        o.mix,
        o.ordering,
        o.keys,
        o.sink_latency,
        base,
        o.brokers.as_deref().map(|b| format!("broker {b}")).unwrap_or_else(|| "in-process mock cluster".into())
    );
    if o.brokers.is_none() {
        fits_the_mock_cluster(&events, o)?;
    }
    crate::demo::produce(
        &settings.kafka.brokers,
        &settings.kafka.input_topic,
        &events,
    )
    .await?;

    let options = DispatchOptions::from_settings(&settings.dispatch);
    let warm_up_calls = warm_up_calls(o);
    let connections_before = sink.connections()?;
    warm_up(
        actions()?,
        options.clone(),
        &events,
        warm_up_calls,
        calls_at_once(o).calls,
    )
    .await?;
    let warm_up_connections = sink.connections()? - connections_before;
    let mut all = Vec::with_capacity(rounds);
    for (i, round_id) in round_ids.iter().enumerate() {
        if rounds > 1 {
            eprintln!("  round {} of {rounds}", i + 1);
        }
        let phases = Phases {
            settings: &settings,
            events: &events,
            options: &options,
            round_id,
        };
        all.push(phases.round(o, &actions, &mut sink).await?);
    }
    let rounds_figures: Vec<RoundFigures> = all.iter().map(RoundFigures::of).collect();
    let shown = median_round(&rounds_figures);
    // The first round's phases ran first: later rounds also hold what
    // earlier ones left (the result records in the mock broker, memory the
    // allocators keep). Its peak RSS is the one reported.
    let first_rss = all[0].end_to_end.peak_rss_mib;
    let first_full_rss = all[0].full_speed.as_ref().map(|f| f.peak_rss_mib);
    let Round {
        mut full_speed,
        mut end_to_end,
        limit_kafka,
        kafka_round_trip,
        limit_http,
        parse_render_us,
        rate,
    } = all.swap_remove(shown);
    end_to_end.peak_rss_mib = first_rss;
    if let (Some(full), Some(rss)) = (&mut full_speed, first_full_rss) {
        full.peak_rss_mib = rss;
    }
    // Stopped here unless --hold keeps it.
    let sink = o.hold.then_some(sink);

    let full = full_speed.as_ref().unwrap_or(&end_to_end);
    let cpu_bound_ratio = cpu_bound_ratio(&limit_http, full);
    let beyond_the_call = cpu_bound_ratio.and_then(|_| beyond_the_call(&limit_http, full));
    let necessary_work_ratio =
        necessary_work_ratio(&limit_http, &kafka_round_trip, parse_render_us);
    let report = Report {
        cpu_bound_ratio,
        beyond_the_call,
        machine: machine(),
        events: o.events,
        concurrency: o.concurrency,
        mix: o.mix,
        ordering: format!("{:?}", o.ordering).to_lowercase(),
        keys: o.keys,
        partitions: o.partitions,
        sink_latency: o.sink_latency.to_string(),
        sink_protocol: o.sink_protocol,
        broker: o.brokers.clone().unwrap_or_else(|| "mock".into()),
        rate,
        full_speed,
        bulkhead: o.bulkhead,
        http_concurrency: calls_at_once(o),
        warm_up_calls,
        warm_up_connections,
        consumer_settings: settings.kafka.consumer.clone(),
        producer_settings: settings.kafka.producer.clone(),

        limit_http,
        limit_kafka,
        necessary_work_ratio,
        kafka_round_trip,
        end_to_end,
        parse_render_us,
        shown_round: shown + 1,
        rounds: rounds_figures,
    };
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let held = o.hold.then(|| {
        let ca = certificates.as_ref().map(|c| c.ca.as_path());
        let rated = rate_topic(&round_ids[shown]);
        let description = held_description(&settings, &rated, &report, &base, ca);
        Held {
            _cluster: cluster,
            _sink: sink,
            _workdir: workdir,
            description,
        }
    });
    Ok((report, held))
}

/// What one round measured: the phases, in the order they ran.
struct Round {
    /// With `--rate half`: end-to-end at full speed, before the rated run.
    full_speed: Option<EndToEnd>,
    end_to_end: EndToEnd,
    limit_kafka: Limit,
    kafka_round_trip: Limit,
    limit_http: Limit,
    parse_render_us: f64,
    /// The rate the end-to-end events were produced at.
    rate: Option<u32>,
}

/// Where a round's events are produced at `--rate`.
fn rate_topic(round_id: &str) -> String {
    format!("bench.rated.{round_id}")
}

/// What a round runs on.
struct Phases<'a> {
    settings: &'a Settings,
    events: &'a [(String, Vec<u8>)],
    options: &'a DispatchOptions,
    /// Names this round's consumer groups and its `--rate` topic.
    round_id: &'a str,
}

impl Phases<'_> {
    /// The phases of one round: end-to-end (at full speed first with
    /// `--rate half`), limit B, the Kafka round trip, limit A; the ratio
    /// is this round's end-to-end over this round's limits.
    async fn round(
        &self,
        o: &BenchOptions,
        actions: &impl Fn() -> anyhow::Result<Arc<ActionSet>>,
        sink: &mut SinkProcess,
    ) -> anyhow::Result<Round> {
        let (settings, events, run_id) = (self.settings, self.events, self.round_id);
        // End-to-end first, so its memory peak is not inflated by what the
        // limit phases leave allocated (10 000 sink connections, for one).
        let mut full_speed = match o.rate {
            Some(Rate::HalfOfMax) => {
                let mut full = settings.clone();
                full.kafka.group_id = format!("bench-full-{run_id}");
                let run = end_to_end(full, actions()?, events, o, None, sink).await?;
                eprintln!(
                    "  end-to-end at full speed: {:>10.0} events/s",
                    run.events_per_second
                );
                Some(run)
            }
            _ => None,
        };
        let rate = match (o.rate, &full_speed) {
            (Some(Rate::PerSecond(n)), _) => Some(n),
            (Some(Rate::HalfOfMax), Some(full)) => {
                Some(((full.events_per_second / 2.0) as u32).max(1))
            }
            _ => None,
        };
        let mut e2e_settings = settings.clone();
        e2e_settings.kafka.group_id = format!("bench-e2e-{run_id}");
        if rate.is_some() {
            e2e_settings.kafka.input_topic = rate_topic(run_id);
        }
        let mut end_to_end = end_to_end(e2e_settings, actions()?, events, o, rate, sink).await?;
        eprintln!(
            "  end-to-end:      {:>10.0} events/s",
            end_to_end.events_per_second
        );
        let limit_kafka = kafka_limit(settings, o.events, run_id).await?;
        eprintln!(
            "  limit B (Kafka): {:>10.0} events/s",
            limit_kafka.per_second
        );
        let kafka_round_trip = kafka_round_trip(settings, o.events, run_id).await?;
        eprintln!(
            "  Kafka round trip:{:>10.0} events/s",
            kafka_round_trip.per_second
        );
        let (limit_http, parse_render_us) = http_limit(
            actions()?,
            self.options.clone(),
            events,
            calls_at_once(o).calls,
            sink,
        )
        .await?;
        eprintln!("  limit A (HTTP):  {:>10.0} calls/s", limit_http.per_second);
        let limit = limit_http.per_second.min(limit_kafka.per_second).max(1e-9);
        end_to_end.ratio = rate.is_none().then(|| end_to_end.events_per_second / limit);
        if let Some(full) = &mut full_speed {
            full.ratio = Some(full.events_per_second / limit);
        }
        // The simple mix has no invalid event and a sink that always
        // answers 200: anything but `ok` for every event is a fault, not a
        // figure.
        if o.mix == Mix::Simple {
            for run in std::iter::once(&end_to_end).chain(&full_speed) {
                let ok = run.outcomes.get("ok").copied().unwrap_or(0);
                anyhow::ensure!(
                    ok == o.events,
                    "end-to-end: {ok} of {} events ok; outcomes {:?}",
                    o.events,
                    run.outcomes
                );
            }
        }
        Ok(Round {
            full_speed,
            end_to_end,
            limit_kafka,
            kafka_round_trip,
            limit_http,
            parse_render_us,
            rate,
        })
    }
}

/// One round's headline figures (the report's phases are those of the
/// round [`Report::shown_round`]).
#[derive(Debug, Clone, Serialize)]
pub struct RoundFigures {
    pub limit_http_per_second: f64,
    pub limit_kafka_per_second: f64,
    /// At full speed (with `--rate half`, the full-speed run).
    pub end_to_end_per_second: f64,
    /// end-to-end (at full speed) / min(A, B) of this round.
    pub ratio: Option<f64>,
    /// The rated run, with `--rate`.
    pub rate: Option<u32>,
    pub rated_per_second: Option<f64>,
    /// The end-to-end run's added latency (the rated one with `--rate`).
    pub added_latency_p99_ms: f64,
    pub peak_rss_mib: f64,
    /// CPU s per 10 000 events (calls): end-to-end and limit A, this
    /// process and the sink.
    pub end_to_end_cpu_seconds_per_10k: f64,
    pub end_to_end_sink_cpu_seconds_per_10k: f64,
    pub limit_http_cpu_seconds_per_10k: f64,
    pub limit_http_sink_cpu_seconds_per_10k: Option<f64>,
}

impl RoundFigures {
    fn of(r: &Round) -> RoundFigures {
        let full = r.full_speed.as_ref().unwrap_or(&r.end_to_end);
        RoundFigures {
            limit_http_per_second: r.limit_http.per_second,
            limit_kafka_per_second: r.limit_kafka.per_second,
            end_to_end_per_second: full.events_per_second,
            ratio: full.ratio,
            rate: r.rate,
            rated_per_second: r.rate.map(|_| r.end_to_end.events_per_second),
            added_latency_p99_ms: r.end_to_end.added_latency_ms.p99,
            peak_rss_mib: r.end_to_end.peak_rss_mib,
            end_to_end_cpu_seconds_per_10k: full.cpu_seconds_per_10k,
            end_to_end_sink_cpu_seconds_per_10k: full.sink_cpu_seconds_per_10k,
            limit_http_cpu_seconds_per_10k: r.limit_http.cpu_seconds_per_10k,
            limit_http_sink_cpu_seconds_per_10k: r.limit_http.sink_cpu_seconds_per_10k,
        }
    }
}

/// The round whose phases the report shows (0-based): the one with the
/// median ratio, or with `--rate` (what such a run is for is the latency at
/// the rate) the median added p99. Of an even count, the less flattering of
/// the middle two: the lower ratio, the higher p99.
/// `rounds` is never empty.
fn median_round(rounds: &[RoundFigures]) -> usize {
    let by_ratio = ranked_by_ratio(rounds);
    let key = |r: &RoundFigures| match r.ratio {
        Some(ratio) if by_ratio => ratio,
        _ => r.added_latency_p99_ms,
    };
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|&a, &b| key(&rounds[a]).total_cmp(&key(&rounds[b])));
    let n = rounds.len();
    order[if by_ratio { (n - 1) / 2 } else { n / 2 }]
}

/// Whether the rounds are ranked by their ratio (no `--rate`), else by
/// their added p99.
fn ranked_by_ratio(rounds: &[RoundFigures]) -> bool {
    rounds.iter().all(|r| r.rate.is_none() && r.ratio.is_some())
}

/// What `--hold` prints: where the topics and the sink are, and what the
/// topics hold.
fn held_description(
    settings: &Settings,
    rate_topic: &str,
    report: &Report,
    sink: &str,
    ca: Option<&Path>,
) -> String {
    let kafka = &settings.kafka;
    let mut topics = vec![
        format!("{} ({} events)", kafka.input_topic, report.events),
        format!("{} (the worker's result records)", kafka.results_topic),
    ];
    if report.rate.is_some() {
        topics.push(format!("{rate_topic} (the events produced at --rate)"));
    }
    let ca = ca
        .map(|path| format!(", its CA {}", path.display()))
        .unwrap_or_default();
    // The mock broker holds a fetch that finds nothing for the whole
    // fetch.wait.max.ms (kcat's default: 500 ms) before the end shows.
    let wait = if report.broker == "mock" {
        " -X fetch.wait.max.ms=1"
    } else {
        ""
    };
    format!(
        "held: brokers {brokers}\n  topics: {topics}\n  sink: {sink} (answers every request{ca})\n  \
         e.g. kcat -C -b {brokers} -t {input}{wait} -o beginning -e -q -f '%o\\n' | wc -l\n\
         Ctrl-C or SIGTERM stops them.\n",
        brokers = kafka.brokers,
        topics = topics.join(", "),
        input = kafka.input_topic,
    )
}

/// See [`Report::necessary_work_ratio`].
fn necessary_work_ratio(http: &Limit, round_trip: &Limit, parse_render_us: f64) -> Option<f64> {
    necessary_work(http, round_trip, parse_render_us).map(|w| w.bound)
}

/// The work no worker can skip, per event, in µs of CPU, and the ratio it
/// allows (`None` when limit A left the CPUs idle).
struct NecessaryWork {
    /// A's call, with the sink's share.
    call: f64,
    round_trip: f64,
    bound: f64,
}

fn necessary_work(http: &Limit, round_trip: &Limit, parse_render_us: f64) -> Option<NecessaryWork> {
    let busy = http.machine?;
    if busy.busy + busy.steal < CPU_BOUND {
        return None;
    }
    let call = http.with_sink_us()?;
    let round_trip = round_trip.cpu_seconds_per_10k * US_PER_10K;
    let all = call + round_trip + parse_render_us;
    (all > 0.0).then(|| NecessaryWork {
        call,
        round_trip,
        bound: call / all,
    })
}

/// A phase that keeps the machine at least this busy is CPU-bound.
const CPU_BOUND: f64 = 0.85;

/// When limit A and the end-to-end phase both keep the machine's CPUs busy,
/// their throughputs are in the inverse ratio of what a call and an event
/// cost in CPU (this process + the sink): that is the most the ratio can be.
/// `None` when either phase left the CPUs idle (then CPU is not the limit),
/// or with `--rate`.
fn cpu_bound_ratio(http: &Limit, e2e: &EndToEnd) -> Option<f64> {
    let (a, e) = (http.machine?, e2e.machine?);
    if e2e.ratio.is_none() || a.busy + a.steal < CPU_BOUND || e.busy + e.steal < CPU_BOUND {
        return None;
    }
    let (call, event) = (http.with_sink_us()?, e2e.with_sink_us());
    (event > 0.0).then(|| call / event)
}

/// CPU seconds per 10 000 operations → µs per operation.
const US_PER_10K: f64 = 100.0;

impl Limit {
    /// CPU per call, this process's and the sink's, µs (limit A only).
    fn with_sink_us(&self) -> Option<f64> {
        Some((self.cpu_seconds_per_10k + self.sink_cpu_seconds_per_10k?) * US_PER_10K)
    }
}

impl EndToEnd {
    /// CPU per event, this process's and the sink's, µs.
    fn with_sink_us(&self) -> f64 {
        (self.cpu_seconds_per_10k + self.sink_cpu_seconds_per_10k) * US_PER_10K
    }
}

/// The consumer's `fetch.wait.max.ms` on the mock cluster with `--rate`,
/// unless the configuration sets one.
pub const MOCK_FETCH_WAIT: (&str, &str) = ("fetch.wait.max.ms", "1");

/// librdkafka's mock cluster keeps at most 5 MiB per partition and silently
/// drops the oldest records beyond that: the bench would then wait for events
/// that are gone. Refuse up front, with the flag that fixes it.
fn fits_the_mock_cluster(events: &[(String, Vec<u8>)], o: &BenchOptions) -> anyhow::Result<()> {
    const KEPT: usize = 5 << 20;
    // Record and batch framing per record, and room for uneven key hashing.
    let bytes: usize = events.iter().map(|(k, v)| k.len() + v.len() + 20).sum();
    let needed = (bytes + bytes / 10).div_ceil(KEPT).max(1);
    anyhow::ensure!(
        needed <= o.partitions as usize,
        "{} events ({} MiB) do not fit the in-process mock cluster, which keeps 5 MiB per partition: \
         use --partitions {} (or more), or a real broker with --brokers",
        events.len(),
        bytes >> 20,
        needed
    );
    Ok(())
}

/// The bench's action definitions in `dir/actions`, loaded.
fn load_actions(dir: &Path) -> anyhow::Result<Arc<ActionSet>> {
    action::load_dir(&dir.join("actions"), dir)
        .map(Arc::new)
        .map_err(|problems| {
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("bench actions: {}", problems.join("; "))
        })
}

/// Writes the one action of the `simple` mix (the SMS example's shape
/// without auth) into `dir/actions`. `ca` is the sink's CA when it speaks TLS.
fn write_simple_action(
    dir: &Path,
    base: &str,
    bulkhead: Option<u32>,
    ca: Option<&Path>,
) -> anyhow::Result<()> {
    let actions = dir.join("actions");
    std::fs::create_dir_all(&actions)?;
    let mut def = json!({
        "id": "bench_webhook",
        "endpoint": {
            "method": "POST",
            "url": format!("{base}/v1/accounts/{{{{ params.account }}}}/messages"),
            "query": { "locale": "{{ context.locale | default('en') }}" },
            "headers": { "X-Api-Version": "2", "X-Journey": "{{ journey.id }}" },
            "timeout": "10s"
        },
        "parameters": {
            "account": { "type": "string", "required": true },
            "phone": { "type": "string", "required": true },
            "firstName": { "type": "string" },
            "amount": { "type": "decimal" },
            "tags": { "type": "list<string>" }
        },
        "payload": {
            "to": "{{ params.phone }}",
            "text": "Hello {{ params.firstName | default('there') }}!",
            "amount": "{{ params.amount }}",
            "tags": "{{ params.tags }}",
            "source": "journey"
        }
    });
    if let Some(n) = bulkhead {
        def["throttle"] = json!({ "max_concurrency": n });
    }
    if let Some(ca) = ca {
        crate::demo::trust_ca(&mut def, ca);
    }
    std::fs::write(
        actions.join("bench_webhook.json"),
        serde_json::to_vec_pretty(&def)?,
    )?;
    Ok(())
}

fn simple_events(total: usize, keys: usize) -> Vec<(String, Vec<u8>)> {
    (0..total)
        .map(|i| {
            let key = format!("p-{}", i % keys.max(1));
            let event = json!({
                "event_id": format!("bench-{i:08}"), "action_id": "bench_webhook", "profile_id": key,
                "journey": { "id": "welcome", "version": "3", "step_id": "send_sms" },
                "params": { "account": "acme", "phone": format!("+3361{i:07}"), "firstName": "Zoë",
                            "amount": 12.5, "tags": ["vip", "fr"] },
                "context": { "locale": "fr" },
                "emitted_at": "2026-11-23T12:00:00Z"
            });
            (key, serde_json::to_vec(&event).unwrap_or_default())
        })
        .collect()
}

/// Limit A: the rendered requests sent with the worker's client settings at
/// the worker's concurrency; the limit's `count` is the answers read. Also
/// returns what parsing and rendering one event costs (µs, on one thread,
/// before the requests are sent: all events over the time to prepare them).
async fn http_limit(
    actions: Arc<ActionSet>,
    options: DispatchOptions,
    events: &[(String, Vec<u8>)],
    concurrency: usize,
    sink: &mut SinkProcess,
) -> anyhow::Result<(Limit, f64)> {
    let dispatcher = Dispatcher::new(actions, options)?;
    let rendering = Instant::now();
    let requests = Calls::prepare(&dispatcher, events)?;
    let parse_render_us = rendering.elapsed().as_secs_f64() * 1e6 / events.len().max(1) as f64;
    let total = events.len();
    let connections_before = sink.connections()?;
    let before = Snapshot::take(sink.pid());
    let started = Instant::now();
    let (versions, exchanges) = requests.send(total, concurrency).await?;
    let answered = versions.values().sum();
    let mut measured = limit(answered, started.elapsed());
    let used = before.since();
    measured.cpu_seconds_per_10k = per_10k(used.own, answered);
    measured.sink_cpu_seconds_per_10k = Some(per_10k(used.sink, answered));
    measured.sink_connections = Some(sink.connections()? - connections_before);
    measured.http_versions = Some(versions);
    measured.exchange_ms = Some(Spread::of(&sorted_ms(exchanges.into_iter())));
    measured.machine = used.machine;
    measured.cpu_by_thread_us = Some(used.threads.per_op(answered));
    Ok((measured, parse_render_us))
}

/// Before any phase is measured: limit A's calls, `calls` of them, not
/// counted. The sink's process starts cold (its first connections, tasks
/// and memory): whichever phase came first would pay for that, and the
/// end-to-end phase comes first. The calls run on a thread and runtime of
/// their own, whose memory is given back when they are done, so that the
/// end-to-end phase's peak RSS is the worker's alone.
async fn warm_up(
    actions: Arc<ActionSet>,
    options: DispatchOptions,
    events: &[(String, Vec<u8>)],
    calls: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let events = events[..calls.min(events.len())].to_vec();
    let thread = std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let sent = runtime.block_on(async {
            let dispatcher = Dispatcher::new(actions, options)?;
            let requests = Calls::prepare(&dispatcher, &events)?;
            tokio::time::timeout(WARM_UP_LIMIT, requests.send(calls, concurrency))
                .await
                .map_err(|_| {
                    anyhow::anyhow!("the sink answered no warm-up call for {WARM_UP_LIMIT:?}")
                })?
        });
        drop((runtime, events));
        // SAFETY: mi_collect has no preconditions; it returns to the system
        // the memory this thread's heap no longer uses (the warm-up's, all
        // of it allocated here, freed when its runtime was dropped).
        unsafe { libmimalloc_sys::mi_collect(true) };
        sent.map(drop).context("warm-up calls to the sink")
    });
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            anyhow::anyhow!("the warm-up panicked: {why}")
        })?
}

/// The warm-up gives up after this long (two rounds of calls even to a
/// slow sink take seconds).
const WARM_UP_LIMIT: Duration = Duration::from_secs(120);

/// The most calls the worker can make at once: `--concurrency` (its
/// `max_in_flight`), or fewer when `--max-concurrency` (the action's
/// bulkhead) is lower or the ordering leaves fewer events runnable at once:
/// one per key with ordering `key` (`--keys`, simple mix), one per
/// partition with `partition` (or per key, when fewer). Limit A and the warm-up use it, so that
/// limit A's calls are as concurrent as the worker's can be: with 3 keys,
/// 1 024 calls at once would measure 1 024 connections' set-up against a
/// worker that uses 3. Over HTTP/2 the worker's calls may share fewer
/// connections.
fn calls_at_once(o: &BenchOptions) -> CallsAtOnce {
    let partitions = usize::try_from(o.partitions).unwrap_or(1);
    let ordered = match (o.ordering, o.mix) {
        (Ordering::Key, Mix::Simple) => Some((o.keys, "one per key")),
        // The simple mix's keys place its events: with fewer keys than
        // partitions, some partitions get none.
        (Ordering::Partition, Mix::Simple) if o.keys < partitions => Some((o.keys, "one per key")),
        (Ordering::Partition, _) => Some((partitions, "one per partition")),
        _ => None,
    };
    let bulkhead = o
        .bulkhead
        .map(|b| (b as usize, "its throttle.max_concurrency"));
    [Some((o.concurrency, "--concurrency")), bulkhead, ordered]
        .into_iter()
        .flatten()
        .min_by_key(|(calls, _)| *calls)
        .map(|(calls, by)| CallsAtOnce {
            calls: calls.max(1),
            by,
        })
        .unwrap_or(CallsAtOnce {
            calls: 1,
            by: "--concurrency",
        })
}

/// The most calls the worker can make at once, and what bounds them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CallsAtOnce {
    pub calls: usize,
    /// `--concurrency`, `its throttle.max_concurrency`, `one per key` or
    /// `one per partition`.
    pub by: &'static str,
}

/// Two calls for each call the worker can make at once, at most one per
/// event.
fn warm_up_calls(o: &BenchOptions) -> usize {
    (2 * calls_at_once(o).calls).min(o.events)
}

/// Rendered requests, each with the client the worker would send it with
/// and that client's cold-start rule, which limit A follows too (see
/// [`ColdStart`]).
struct Calls(Arc<Vec<Call>>);

type Call = (
    reqwest::Client,
    Arc<ColdStart>,
    crate::render::RenderedRequest,
);

impl Calls {
    /// The events parsed and rendered, each request with the client the
    /// worker chooses for its action: the action's own when it has TLS
    /// material (the sink's CA), else the shared one.
    fn prepare(dispatcher: &Dispatcher, events: &[(String, Vec<u8>)]) -> anyhow::Result<Calls> {
        let requests: Vec<_> = events
            .iter()
            .filter_map(|(_, v)| crate::event::ActionEvent::from_slice(v).ok())
            .filter_map(|e| {
                let (def, request) = dispatcher.prepare(&e).ok()?;
                let (client, cold_start) = dispatcher.pool_for(&def);
                Some((client.clone(), cold_start.clone(), request))
            })
            .collect();
        anyhow::ensure!(!requests.is_empty(), "no event renders");
        Ok(Calls(Arc::new(requests)))
    }

    /// Sends `total` calls, `concurrency` at a time, reading every answer;
    /// the answers by HTTP version, and each call's exchange (request sent →
    /// answer read, timed as the worker times an attempt's).
    async fn send(
        &self,
        total: usize,
        concurrency: usize,
    ) -> anyhow::Result<(BTreeMap<String, usize>, Vec<Duration>)> {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency.min(total) {
            let (requests, next) = (self.0.clone(), next.clone());
            tasks.spawn(async move {
                let mut answered: BTreeMap<reqwest::Version, usize> = BTreeMap::new();
                let mut exchanges = Vec::new();
                loop {
                    let i = next.fetch_add(1, AtomicOrdering::Relaxed);
                    if i >= total {
                        return Ok::<_, reqwest::Error>((answered, exchanges));
                    }
                    let (client, cold_start, request) = &requests[i % requests.len()];
                    let request = crate::dispatch::to_request(request);
                    let turn = cold_start.turn(request.url()).await;
                    let start = Instant::now();
                    let resp = client.execute(request).await?;
                    let version = resp.version();
                    let _ = resp.bytes().await?;
                    exchanges.push(start.elapsed());
                    drop(turn);
                    // The connection goes back to the pool a moment after
                    // the answer is read; a call sent at once finds none
                    // idle and opens another (limit A opened 1 257–1 848
                    // connections for 1 024 calls at once, the worker's
                    // end-to-end phase 724–1 315).
                    tokio::task::yield_now().await;
                    *answered.entry(version).or_default() += 1;
                }
            });
        }
        let mut versions = BTreeMap::new();
        let mut exchanges = Vec::with_capacity(total);
        while let Some(r) = tasks.join_next().await {
            let (answered, timed) = r??;
            for (version, n) in answered {
                *versions.entry(format!("{version:?}")).or_default() += n;
            }
            exchanges.extend(timed);
        }
        Ok((versions, exchanges))
    }
}

fn per_10k(seconds: f64, count: usize) -> f64 {
    seconds / count.max(1) as f64 * 10_000.0
}

/// The Kafka work of the worker without the HTTP call: the same events
/// consumed with the worker's consumer settings, and for each a record of a
/// result's size produced with its producer settings; timed until the last
/// is acknowledged.
async fn kafka_round_trip(
    settings: &Settings,
    total: usize,
    run_id: &str,
) -> anyhow::Result<Limit> {
    let mut events = Consuming::start(settings, &format!("bench-round-trip-{run_id}"), total)?;
    let producer: FutureProducer = crate::worker::producer_config(settings).create()?;
    let results_topic = &settings.kafka.results_topic;
    // A result record of the simple mix is ~330 bytes.
    let result = vec![b'r'; 330];
    let mut pending = std::collections::VecDeque::with_capacity(total);
    while let Some(m) = events.next("Kafka round trip").await? {
        let key = m.key().map(bytes::Bytes::copy_from_slice);
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(results_topic).payload(&result[..]);
            if let Some(k) = key.as_deref() {
                record = record.key(k);
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                // The producer's queue is full: wait for the oldest.
                Err((e, _)) if pending.is_empty() => return Err(e.into()),
                Err(_) => {
                    if let Some(oldest) = pending.pop_front() {
                        oldest.await?.map_err(|(e, _)| e)?;
                    }
                }
            }
        }
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(events.measured())
}

/// The bench's events, consumed by a group of their own, one at a time.
struct Consuming {
    consumer: StreamConsumer,
    total: usize,
    count: usize,
    /// When the first event came, and this process's CPU then.
    started: Option<(Instant, OwnCpu)>,
    deadline: Instant,
}

impl Consuming {
    fn start(settings: &Settings, group: &str, total: usize) -> anyhow::Result<Consuming> {
        let mut s = settings.clone();
        s.kafka.group_id = group.to_string();
        let consumer: StreamConsumer = crate::worker::consumer_config(&s).create()?;
        consumer.subscribe(&[&s.kafka.input_topic])?;
        Ok(Consuming {
            consumer,
            total,
            count: 0,
            started: None,
            deadline: Instant::now() + Duration::from_secs(120),
        })
    }

    /// The next event, `None` once all are consumed; an error after 120 s.
    async fn next(&mut self, phase: &str) -> anyhow::Result<Option<BorrowedMessage<'_>>> {
        while self.count < self.total {
            anyhow::ensure!(
                Instant::now() < self.deadline,
                "{phase}: only {} of {} events consumed in 120 s",
                self.count,
                self.total
            );
            let received = tokio::time::timeout(Duration::from_secs(1), self.consumer.recv()).await;
            if let Ok(Ok(m)) = received {
                self.started.get_or_insert_with(|| {
                    // Read before the clock starts: the phase's time
                    // should not include reading /proc.
                    let cpu = OwnCpu::take();
                    (Instant::now(), cpu)
                });
                self.count += 1;
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Events per second and CPU per 10 000, from the first event consumed.
    fn measured(&self) -> Limit {
        let Some((at, cpu)) = &self.started else {
            return limit(0, Duration::ZERO);
        };
        let elapsed = at.elapsed();
        let (cpu, by_thread) = cpu.since();
        let mut measured = limit(self.count, elapsed);
        measured.cpu_seconds_per_10k = per_10k(cpu, self.count);
        measured.cpu_by_thread_us = Some(by_thread.per_op(self.count));
        measured
    }
}

/// Limit B: the same events consumed with the worker's consumer settings.
async fn kafka_limit(settings: &Settings, total: usize, run_id: &str) -> anyhow::Result<Limit> {
    let mut events = Consuming::start(settings, &format!("bench-consume-{run_id}"), total)?;
    while let Some(m) = events.next("limit B").await? {
        // Copy as the worker does.
        let _ = (
            m.key().map(bytes::Bytes::copy_from_slice),
            m.payload().map(bytes::Bytes::copy_from_slice),
        );
    }
    Ok(events.measured())
}

async fn end_to_end(
    settings: Settings,
    actions: Arc<ActionSet>,
    events: &[(String, Vec<u8>)],
    o: &BenchOptions,
    rate: Option<u32>,
    sink: &mut SinkProcess,
) -> anyhow::Result<EndToEnd> {
    let connections_before = sink.connections()?;
    let total = events.len();
    let finished: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let observer = {
        let finished = finished.clone();
        Arc::new(move |f: &Finished| {
            if let Ok(mut v) = finished.lock() {
                v.push(Seen {
                    at: Instant::now(),
                    latency: f.latency,
                    to_outcome: f.to_outcome,
                    exchange: f.exchange,
                    code: f.code,
                });
            }
        })
    };
    let metrics = Arc::new(Metrics::new());
    let worker = Worker::new(settings.clone(), actions, metrics.clone())?.with_observer(observer);
    let ready = worker.ready_flag();
    let stop = CancellationToken::new();
    reset_peak_rss();
    // Set when the worker's task ends, for the watcher thread below, which
    // cannot poll the task's handle.
    let ended = Arc::new(AtomicBool::new(false));
    let task = {
        let (ended, stop) = (ended.clone(), stop.clone());
        tokio::spawn(async move {
            // Set however the task ends, a panic included.
            let _ended = SetOnDrop(ended);
            worker.run(stop).await
        })
    };
    // Nothing is counted before the group join: until then, the worker waits.
    let join_deadline = Instant::now() + Duration::from_secs(60);
    while !ready.load(AtomicOrdering::Relaxed) {
        if task.is_finished() || Instant::now() > join_deadline {
            stop.cancel();
            task.await??;
            anyhow::bail!("end-to-end: the worker did not join its consumer group in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The events are there already: CPU is counted from the first one read,
    // as the events/s are (the fetches that start the partitions are left
    // out of both). Watched from a thread of its own, polling every 0.1 ms,
    // which the worker's busy runtime threads cannot hold up.
    let sink_pid = sink.pid();
    let before = if rate.is_none() {
        let (watched, stopped) = (metrics.clone(), ended.clone());
        let first_read = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while watched.events_consumed.get() == 0 {
                if Instant::now() > deadline || stopped.load(AtomicOrdering::Relaxed) {
                    return None;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            Some(Snapshot::take(sink_pid))
        });
        match first_read.await? {
            Some(snapshot) => snapshot,
            None => {
                let stopped = ended.load(AtomicOrdering::Relaxed);
                stop.cancel();
                task.await??;
                if stopped {
                    anyhow::bail!("end-to-end: the worker stopped before reading an event");
                }
                anyhow::bail!("end-to-end: the worker read no event in 60 s");
            }
        }
    } else {
        Snapshot::take(sink_pid)
    };
    // The rate producer: its loop on a thread of its own (named, so that
    // its CPU is counted under `other`, not as the runtime's), and its
    // producer kept until the phase's CPU is read, so that its librdkafka
    // threads are always counted with the Kafka clients.
    let mut producing = None;
    let mut rate_producer = None;
    if let Some(rate) = rate {
        let (brokers, topic, events) = (
            settings.kafka.brokers.clone(),
            settings.kafka.input_topic.clone(),
            events.to_vec(),
        );
        producing = Some(
            std::thread::Builder::new()
                .name(RATE_THREAD.into())
                .spawn(move || produce_at_rate(brokers, topic, events, rate))?,
        );
    }
    // Fail instead of hanging when events stop finishing.
    const STALL: Duration = Duration::from_secs(60);
    let (mut last_done, mut last_progress) = (0, Instant::now());
    loop {
        let done = finished.lock().map(|v| v.len()).unwrap_or(0);
        if done >= total {
            break;
        }
        if task.is_finished() {
            stop.cancel();
            task.await??;
            anyhow::bail!("end-to-end: the worker stopped with {done} of {total} events final");
        }
        if let Some(thread) = producing.take_if(|p| p.is_finished()) {
            match produced(thread) {
                Ok(producer) => rate_producer = Some(producer),
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        if done > last_done {
            (last_done, last_progress) = (done, Instant::now());
        } else if last_progress.elapsed() > STALL {
            stop.cancel();
            anyhow::bail!("end-to-end: only {done} of {total} events final, none for {STALL:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let used = before.since();
    let peak_rss_mib = peak_rss_mib();
    // Dropping a producer joins its delivery report thread: off the runtime's
    // threads. Every event is final, so every one was produced: a thread
    // still running is at most flushing.
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        drop(rate_producer);
        producing.map_or(Ok(()), |thread| produced(thread).map(drop))
    })
    .await??;
    stop.cancel();
    task.await??;

    let finished = finished.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let first_consumed = finished
        .iter()
        .map(|f| f.at - f.latency)
        .min()
        .unwrap_or_else(Instant::now);
    let last = finished
        .iter()
        .map(|f| f.at)
        .max()
        .unwrap_or_else(Instant::now);
    let seconds = (last - first_consumed).as_secs_f64();
    let mut outcomes = BTreeMap::new();
    for f in finished.iter() {
        *outcomes.entry(f.code.to_string()).or_default() += 1;
    }
    let warmup = if rate.is_some() {
        RATE_WARMUP
    } else {
        Duration::ZERO
    };
    let steady: Vec<&Seen> = finished
        .iter()
        .filter(|f| f.at - f.latency >= first_consumed + warmup)
        .collect();
    let latencies = sorted_ms(steady.iter().map(|f| f.to_outcome));
    let acked = sorted_ms(steady.iter().map(|f| f.latency));
    let all = sorted_ms(finished.iter().map(|f| f.to_outcome));
    let called = || steady.iter().filter(|f| !f.exchange.is_zero());
    let exchange = sorted_ms(called().map(|f| f.exchange));
    let besides = sorted_ms(called().map(|f| f.to_outcome.saturating_sub(f.exchange)));
    let sink_ms = o.sink_latency.mean().as_secs_f64() * 1e3;
    let per_second = total as f64 / seconds.max(1e-9);
    Ok(EndToEnd {
        events: total,
        seconds,
        events_per_second: per_second,
        ratio: None, // set once the limits are measured
        warmup_seconds: warmup.as_secs_f64(),
        latency_events: latencies.len(),
        latency_ms: percentiles(&latencies, 0.0),
        added_latency_ms: percentiles(&latencies, sink_ms),
        acked_latency_ms: percentiles(&acked, 0.0),
        all_latency_ms: percentiles(&all, 0.0),
        exchange_ms: Spread::of(&exchange),
        besides_exchange_ms: Spread::of(&besides),
        peak_rss_mib,
        cpu_seconds_per_10k: per_10k(used.own, total),
        sink_cpu_seconds_per_10k: per_10k(used.sink, total),
        sink_connections: sink.connections()? - connections_before,
        machine: used.machine,
        cpu_by_thread_us: used.threads.per_op(total),
        outcomes,
    })
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, AtomicOrdering::Relaxed);
    }
}

/// With `--rate`, events consumed in the first second are left out of the
/// latency figures: they include the backlog produced while the consumer
/// joined its group and the first connections to the sink.
const RATE_WARMUP: Duration = Duration::from_secs(1);

/// What the observer saw of one final event.
struct Seen {
    at: Instant,
    latency: Duration,
    to_outcome: Duration,
    exchange: Duration,
    code: OutcomeCode,
}

/// Produces the events at `rate` per second, in 1 ms steps, on a thread of
/// its own: on the runtime, its ticks would come late whenever the worker
/// keeps the runtime busy, and it would produce in bursts.
fn produce_at_rate(
    brokers: String,
    topic: String,
    events: Vec<(String, Vec<u8>)>,
    rate: u32,
) -> anyhow::Result<RateProducer> {
    // linger.ms 5, librdkafka's default (and the Java producer's since Kafka
    // 4.0): what a journey engine's producer is likely to send, a batch per
    // partition every 5 ms. The mock broker finds a fetch's records by
    // walking the partition's batches from the oldest, so every batch is
    // walked again by every later fetch: at 1 ms (a batch per partition per
    // step) that walk took a third of a core at 11 000/s, and the worker's
    // p99 measured it (6.7-9.5 ms against 2.7-3.1 at 5 ms, three pairs; see
    // BENCHMARKS.md, change 33). With 0 each record was a request of its own
    // (at 20 000/s the worker could not keep up).
    // Its delivery reports are served as the worker's are, by a thread that
    // sleeps while there are none (rdkafka's own polling thread spins for
    // ~1 ms of every 100 ms, and its CPU counts in the phase's).
    let producer = PolledProducer::new(
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", RATE_LINGER_MS)
            .create()?,
    )?;
    let started = Instant::now();
    let mut sent = 0usize;
    let mut step = 0u32;
    while sent < events.len() {
        step += 1;
        let next = started + Duration::from_millis(u64::from(step));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let due = ((started.elapsed().as_secs_f64() * f64::from(rate)) as usize).min(events.len());
        while sent < due {
            let (k, v) = &events[sent];
            let record = BaseRecord::to(&topic).key(k.as_str()).payload(v.as_slice());
            match producer.send(record) {
                Ok(_) => sent += 1,
                // Try again at the next step.
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => break,
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    rdkafka::producer::Producer::flush(&*producer, Duration::from_secs(30))?;
    Ok(producer)
}

/// bench's producer of the events at `--rate`.
type RateProducer = PolledProducer<DefaultProducerContext>;

/// The rate producer's thread, joined: its producer, or why it failed.
fn produced(
    thread: std::thread::JoinHandle<anyhow::Result<RateProducer>>,
) -> anyhow::Result<RateProducer> {
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the rate producer panicked"))?
        .context("producing at --rate")
}

/// The `linger.ms` of bench's producer at `--rate` (see `produce_at_rate`).
pub const RATE_LINGER_MS: &str = "5";

/// The name of the thread that produces the events at `--rate`.
const RATE_THREAD: &str = "bench-rate";

fn limit(count: usize, elapsed: Duration) -> Limit {
    let seconds = elapsed.as_secs_f64();
    Limit {
        count,
        seconds,
        per_second: count as f64 / seconds.max(1e-9),
        cpu_seconds_per_10k: 0.0,
        sink_cpu_seconds_per_10k: None,
        sink_connections: None,
        http_versions: None,
        exchange_ms: None,
        machine: None,
        cpu_by_thread_us: None,
    }
}

/// Durations as milliseconds, sorted (for [`percentiles`]).
pub fn sorted_ms(durations: impl Iterator<Item = Duration>) -> Vec<f64> {
    let mut ms: Vec<f64> = durations.map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// Nearest-rank percentiles of sorted milliseconds, each minus `minus` (≥ 0).
pub fn percentiles(sorted_ms: &[f64], minus: f64) -> Percentiles {
    let at = |p: f64| {
        let i = ((sorted_ms.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(sorted_ms.len().saturating_sub(1));
        (sorted_ms.get(i).copied().unwrap_or(0.0) - minus).max(0.0)
    };
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: at(1.0),
    }
}

/// CPU time of this process, of the sink and of the whole machine at one
/// moment; [`Snapshot::since`] gives what a phase used.
struct Snapshot {
    own: OwnCpu,
    sink: f64,
    sink_pid: u32,
    machine: Option<ProcStat>,
}

/// This process's CPU at one moment, in all and by thread.
struct OwnCpu {
    seconds: f64,
    threads: Threads,
}

impl OwnCpu {
    fn take() -> OwnCpu {
        OwnCpu {
            seconds: cpu_seconds(),
            threads: Threads::read(),
        }
    }

    /// CPU seconds since `self`, in all and by kind of thread.
    fn since(&self) -> (f64, ByThread) {
        let now = OwnCpu::take();
        let seconds = now.seconds - self.seconds;
        (seconds, self.threads.until(&now.threads, seconds))
    }
}

/// What a phase used, from two [`Snapshot`]s.
struct Usage {
    own: f64,
    sink: f64,
    machine: Option<MachineLoad>,
    /// `own` by kind of thread.
    threads: ByThread,
}

impl Snapshot {
    fn take(sink_pid: u32) -> Snapshot {
        Snapshot {
            own: OwnCpu::take(),
            sink: process_cpu_seconds(sink_pid).unwrap_or(0.0),
            sink_pid,
            machine: ProcStat::read(),
        }
    }

    fn since(&self) -> Usage {
        let (own, threads) = self.own.since();
        let sink = process_cpu_seconds(self.sink_pid).unwrap_or(0.0);
        let machine = match (&self.machine, &ProcStat::read()) {
            (Some(a), Some(b)) if b.total > a.total => {
                let total = (b.total - a.total) as f64;
                Some(MachineLoad {
                    busy: (b.busy - a.busy) as f64 / total,
                    steal: (b.steal - a.steal) as f64 / total,
                })
            }
            _ => None,
        };
        Usage {
            own,
            sink: (sink - self.sink).max(0.0),
            machine,
            threads,
        }
    }
}

/// The machine's CPU counters (all cores, clock ticks) from `/proc/stat`.
struct ProcStat {
    busy: u64,
    steal: u64,
    total: u64,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        // user nice system idle iowait irq softirq steal (guest is in user).
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let [user, nice, system, idle, iowait, irq, softirq, steal] = f[..] else {
            return None;
        };
        let busy = user + nice + system + irq + softirq;
        Some(ProcStat {
            busy,
            steal,
            total: busy + idle + iowait + steal,
        })
    }
}

/// User + system CPU seconds of another process, from `/proc/PID/stat`.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Resets the kernel's peak-RSS mark so the next reading covers one phase.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024;
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_mib,
        cpu,
    }
}

/// The report as the table `bench` prints.
pub fn table(r: &Report) -> String {
    let e = &r.end_to_end;
    let mut out = String::new();
    out.push_str(&format!(
        "journey-actions bench on {} cores / {} MiB ({}), broker: {}\n",
        r.machine.cores, r.machine.memory_mib, r.machine.cpu, r.broker
    ));
    out.push_str(&format!(
        "{} events, {} mix, concurrency {}, ordering {}, {} keys, {} partitions, sink {} latency {}{}\n",
        r.events,
        format!("{:?}", r.mix).to_lowercase(),
        r.concurrency,
        r.ordering,
        r.keys,
        r.partitions,
        r.sink_protocol,
        r.sink_latency,
        r.rate
            .map(|x| format!(", produced at {x}/s (linger.ms {RATE_LINGER_MS})"))
            .unwrap_or_default()
            + &r.bulkhead.map(|b| format!(", throttle.max_concurrency {b}")).unwrap_or_default()
    ));
    for (client, set) in [
        ("consumer", &r.consumer_settings),
        ("producer", &r.producer_settings),
    ] {
        if !set.is_empty() {
            let list: Vec<String> = set.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("{client} settings: {}\n", list.join(" ")));
        }
    }
    let counted = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    if r.http_concurrency.calls != r.concurrency {
        out.push_str(&format!(
            "limit A makes {} at once: the most the worker can make ({})\n",
            counted(r.http_concurrency.calls, "call"),
            r.http_concurrency.by
        ));
    }
    out.push_str(&format!(
        "warm-up: {} to the sink over {} before the first phase, not counted\n\n",
        counted(r.warm_up_calls, "call"),
        counted(r.warm_up_connections, "connection")
    ));
    out.push_str(&format!(
        "{:<28}{:>12}   {:>24}{:>8}   {}\n",
        "phase", "per second", "CPU s per 10k: this proc.", "sink", "machine CPU busy"
    ));
    let load = |m: Option<MachineLoad>| {
        m.map(|m| format!("{:.0} % (steal {:.0} %)", m.busy * 100.0, m.steal * 100.0))
            .unwrap_or_else(|| "–".into())
    };
    let sink = |c: Option<f64>| c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "–".into());
    let at_rate = r.rate.map(|n| format!("end-to-end at {n}/s"));
    let mut rows = vec![
        (
            "limit A: HTTP to the sink",
            r.limit_http.per_second,
            r.limit_http.cpu_seconds_per_10k,
            r.limit_http.sink_cpu_seconds_per_10k,
            r.limit_http.machine,
        ),
        (
            "limit B: Kafka consume",
            r.limit_kafka.per_second,
            r.limit_kafka.cpu_seconds_per_10k,
            None,
            None,
        ),
        (
            "Kafka round trip (+result)",
            r.kafka_round_trip.per_second,
            r.kafka_round_trip.cpu_seconds_per_10k,
            None,
            None,
        ),
    ];
    if let Some(full) = &r.full_speed {
        rows.push((
            "end-to-end at full speed",
            full.events_per_second,
            full.cpu_seconds_per_10k,
            Some(full.sink_cpu_seconds_per_10k),
            full.machine,
        ));
    }
    rows.push((
        at_rate.as_deref().unwrap_or("end-to-end worker"),
        e.events_per_second,
        e.cpu_seconds_per_10k,
        Some(e.sink_cpu_seconds_per_10k),
        e.machine,
    ));
    for (name, rate, cpu, sink_cpu, machine) in rows {
        out.push_str(&format!(
            "{name:<28}{rate:>12.0}   {cpu:>24.2}{:>8}   {}\n",
            sink(sink_cpu),
            load(machine)
        ));
    }
    let versions = r
        .limit_http
        .http_versions
        .iter()
        .flatten()
        .map(|(version, n)| format!("{version} × {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    out.push_str(&format!(
        "connections the sink accepted: end-to-end {}{}, limit A {}; limit A's answers: {versions}\n",
        e.sink_connections,
        r.full_speed
            .as_ref()
            .map(|f| format!(" (at full speed {})", f.sink_connections))
            .unwrap_or_default(),
        r.limit_http
            .sink_connections
            .map(|n| n.to_string())
            .unwrap_or_else(|| "–".into()),
    ));
    out.push_str(&format!(
        "this process's CPU by thread, µs per call or event: {:>9}{:>15}{:>13}{:>7}\n",
        "runtime", "Kafka clients", "mock broker", "other"
    ));
    let mut by_thread = vec![
        ("limit A", r.limit_http.cpu_by_thread_us),
        ("limit B", r.limit_kafka.cpu_by_thread_us),
        ("Kafka round trip", r.kafka_round_trip.cpu_by_thread_us),
    ];
    if let Some(full) = &r.full_speed {
        by_thread.push(("end-to-end at full speed", Some(full.cpu_by_thread_us)));
    }
    by_thread.push((
        at_rate.as_deref().unwrap_or("end-to-end worker"),
        Some(e.cpu_by_thread_us),
    ));
    for (name, by) in by_thread {
        if let Some(b) = by {
            out.push_str(&format!(
                "  {name:<50}{:>9.1}{:>15.1}{:>13.1}{:>7.1}\n",
                b.runtime, b.kafka_clients, b.mock_broker, b.other
            ));
        }
    }
    let ratio = e
        .ratio
        .map(|x| (x, ""))
        .or_else(|| Some((r.full_speed.as_ref()?.ratio?, " (full speed)")));
    match ratio {
        Some((ratio, which)) => out.push_str(&format!(
            "\nratio end-to-end{which} / min(A, B): {ratio:.2}\n"
        )),
        None => out
            .push_str("\nratio end-to-end / min(A, B): not measured (the events came at --rate)\n"),
    }
    if r.rounds.len() > 1 {
        out.push_str(&rounds_summary(r));
    }
    let full = r.full_speed.as_ref().unwrap_or(e);
    if let (Some(bound), Some(sink_a)) = (r.cpu_bound_ratio, r.limit_http.sink_cpu_seconds_per_10k)
    {
        out.push_str(&format!(
            "  both phases kept the CPUs busy, so the ratio is what CPU per call / CPU per event allows\n  \
             (this process + sink, s per 10k): ({:.2} + {:.2}) / ({:.2} + {:.2}) = {bound:.2}\n",
            r.limit_http.cpu_seconds_per_10k, sink_a, full.cpu_seconds_per_10k, full.sink_cpu_seconds_per_10k
        ));
    }
    if let Some(b) = &r.beyond_the_call {
        out.push_str(&format!(
            "  an event cost {:.1} µs of CPU (this process and the sink) more than one of A's calls, which\n  \
             cost {:.1}; a ratio of {TARGET_RATIO} allows {:.1}: runtime threads {:+.1} (parsing, rendering,\n  \
             the worker's tasks), Kafka clients and broker {:+.1}, the sink {:+.1}, other {:+.1}\n",
            b.total_us,
            b.call_us,
            b.allowed_for_085_us,
            b.runtime_us,
            b.kafka_us,
            b.sink_us,
            b.other_us
        ));
    }
    match necessary_work(&r.limit_http, &r.kafka_round_trip, r.parse_render_us) {
        Some(NecessaryWork { call, round_trip, bound }) => out.push_str(&format!(
            "  work no worker can skip, per event, in µs of CPU: A's call {call:.1} (with the sink) + the Kafka\n  \
             round trip {round_trip:.1} + parsing and rendering {:.1}: this work alone allows a ratio of about {bound:.2}\n",
            r.parse_render_us
        )),
        None => out.push_str(&format!(
            "  parsing and rendering one event alone: {:.1} µs (one thread)\n",
            r.parse_render_us
        )),
    }
    if e.warmup_seconds > 0.0 {
        out.push_str(&format!(
            "latency over the {} events consumed after a {:.0} s warm-up (all {}: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms)\n",
            e.latency_events, e.warmup_seconds, e.events, e.all_latency_ms.p50, e.all_latency_ms.p99, e.all_latency_ms.max
        ));
    }
    let row = |name: &str, p: &Percentiles| {
        format!(
            "{name:<44}p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms\n",
            p.p50, p.p99, p.p999, p.max
        )
    };
    if e.latency_events == 0 {
        // Every event came within the warm-up (a short run at --rate):
        // percentiles over no event would read as 0 ms.
        out.push_str(&format!(
            "no event was consumed after the {:.0} s warm-up: no latency figures (give --events more than the rate)\n",
            e.warmup_seconds
        ));
    } else {
        out.push_str(&row("event latency (consume → outcome):", &e.latency_ms));
        if e.exchange_ms.mean > 0.0 {
            let spread = |s: &Spread| {
                format!(
                    "mean {:.2} ms  p50 {:.2} ms  p99 {:.2} ms",
                    s.mean, s.p50, s.p99
                )
            };
            out.push_str(&format!(
                "  of it, in the HTTP exchange (sent → answer read):  {}\n",
                spread(&e.exchange_ms)
            ));
            if let Some(a) = &r.limit_http.exchange_ms {
                // Limit A runs flat out: beside a rate phase, its calls were
                // made at a higher load.
                let how = if r.rate.is_some() {
                    "at full speed"
                } else {
                    "timed the same way"
                };
                let label = format!("limit A's calls, {how}:");
                out.push_str(&format!("    {label:<48}{}\n", spread(a)));
            }
            out.push_str(&format!(
                "  and in the worker's own steps and waits:         {}\n",
                spread(&e.besides_exchange_ms)
            ));
        }
        out.push_str(&row(
            "added over the sink's own latency:",
            &e.added_latency_ms,
        ));
        out.push_str(&row(
            "consume → result records acknowledged:",
            &e.acked_latency_ms,
        ));
    }
    out.push_str(&format!(
        "peak RSS {:.1} MiB{}   CPU {:.2} s per 10 000 events   outcomes {:?}\n",
        e.peak_rss_mib,
        if r.rounds.len() > 1 { " (round 1)" } else { "" },
        e.cpu_seconds_per_10k,
        e.outcomes
    ));
    out
}

/// Which round the table shows, and every round's ratio (or p99) and
/// limits, in the order they ran.
fn rounds_summary(r: &Report) -> String {
    let n = r.rounds.len();
    let list =
        |f: &dyn Fn(&RoundFigures) -> String| r.rounds.iter().map(f).collect::<Vec<_>>().join("  ");
    let headline = if ranked_by_ratio(&r.rounds) {
        let ratios = r.rounds.iter().filter_map(|x| x.ratio);
        let (lo, hi) = ratios.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
        format!(
            "the phases above are round {} of {n}, the median ratio; every round's ratio: {}  (spread {lo:.2}–{hi:.2})\n",
            r.shown_round,
            list(&|x| format!("{:.2}", x.ratio.unwrap_or_default()))
        )
    } else {
        format!(
            "the phases above are round {} of {n}, the median p99; every round's added p99: {} ms\n",
            r.shown_round,
            list(&|x| format!("{:.2}", x.added_latency_p99_ms))
        )
    };
    let mut out = format!("  {headline}");
    out.push_str(&format!(
        "  limit A, calls/s: {}\n",
        list(&|x| format!("{:.0}", x.limit_http_per_second))
    ));
    // At --rate N the end-to-end throughput is the rate's (next line).
    if r.rate.is_none() || r.full_speed.is_some() {
        out.push_str(&format!(
            "  end-to-end at full speed, events/s: {}\n",
            list(&|x| format!("{:.0}", x.end_to_end_per_second))
        ));
    }
    if r.full_speed.is_some() {
        out.push_str(&format!(
            "  ratio at full speed: {}\n",
            list(&|x| format!("{:.2}", x.ratio.unwrap_or_default()))
        ));
    }
    if r.rate.is_some() {
        out.push_str(&format!(
            "  at the rate: rate, events/s and added p99: {}\n",
            list(&|x| format!(
                "{}/s {:.0} ({:.2} ms)",
                x.rate.unwrap_or_default(),
                x.rated_per_second.unwrap_or_default(),
                x.added_latency_p99_ms
            ))
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(partitions: i32) -> BenchOptions {
        BenchOptions {
            settings: Settings::default(),
            events: 0,
            concurrency: 1,
            mix: Mix::Simple,
            ordering: Ordering::Key,
            keys: 1,
            sink_latency: Latency::Fixed(Duration::ZERO),
            sink_protocol: Protocol::Http,
            brokers: None,
            rate: None,
            partitions,
            bulkhead: None,
            json: None,
            hold: false,
            rounds: 1,
        }
    }

    #[test]
    fn the_warm_up_makes_two_calls_per_call_the_worker_can_make_at_once() {
        // (--concurrency, --max-concurrency, --events, warm-up calls)
        for (concurrency, bulkhead, events, calls) in [
            (1024, None, 10_000, 2048),
            (64, None, 100, 100),
            (10_000, Some(256), 10_000, 512),
            (100, Some(500), 10_000, 200),
        ] {
            let o = BenchOptions {
                concurrency,
                bulkhead,
                events,
                keys: events,
                ..options(6)
            };
            assert_eq!(
                warm_up_calls(&o),
                calls,
                "{concurrency} {bulkhead:?} {events}"
            );
        }
    }

    #[test]
    fn limit_a_makes_as_many_calls_at_once_as_the_worker_can() {
        // (--concurrency, --max-concurrency, ordering, mix, keys, calls at once, bound)
        for (concurrency, bulkhead, ordering, mix, keys, calls, by) in [
            (
                1024,
                None,
                Ordering::Key,
                Mix::Simple,
                10_000,
                1024,
                "--concurrency",
            ),
            (1024, None, Ordering::Key, Mix::Simple, 3, 3, "one per key"),
            (
                1024,
                Some(256),
                Ordering::Key,
                Mix::Simple,
                10_000,
                256,
                "its throttle.max_concurrency",
            ),
            (
                2,
                Some(256),
                Ordering::Key,
                Mix::Simple,
                3,
                2,
                "--concurrency",
            ),
            (
                1024,
                None,
                Ordering::Partition,
                Mix::Simple,
                10_000,
                6,
                "one per partition",
            ),
            (
                4,
                None,
                Ordering::Partition,
                Mix::Simple,
                10_000,
                4,
                "--concurrency",
            ),
            (
                1024,
                None,
                Ordering::Partition,
                Mix::Simple,
                3,
                3,
                "one per key",
            ),
            (
                1024,
                None,
                Ordering::None,
                Mix::Simple,
                3,
                1024,
                "--concurrency",
            ),
            // The example mix picks its own profiles: --keys does not apply.
            (
                1024,
                None,
                Ordering::Key,
                Mix::Examples,
                3,
                1024,
                "--concurrency",
            ),
        ] {
            let o = BenchOptions {
                concurrency,
                bulkhead,
                ordering,
                mix,
                keys,
                events: 10_000,
                ..options(6)
            };
            let at_once = calls_at_once(&o);
            assert_eq!(
                (at_once.calls, at_once.by),
                (calls, by),
                "{concurrency} {bulkhead:?} {ordering:?} {mix:?} {keys}"
            );
        }
    }

    #[test]
    fn event_counts_beyond_the_mock_clusters_5_mib_per_partition_are_refused_with_the_fix() {
        let events = simple_events(100_000, 10_000);
        let refused = fits_the_mock_cluster(&events, &options(6))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--partitions 7"), "{refused}");
        assert!(fits_the_mock_cluster(&events, &options(7)).is_ok());
        assert!(fits_the_mock_cluster(&simple_events(50_000, 10_000), &options(6)).is_ok());
    }

    #[test]
    fn another_process_cpu_and_the_machine_load_are_read_from_proc() {
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(60) {
            std::hint::black_box(spin.elapsed());
        }
        let own = process_cpu_seconds(std::process::id()).expect("/proc/PID/stat");
        assert!(own >= 0.05, "{own}");
        assert!(process_cpu_seconds(u32::MAX).is_none());
        let before = Snapshot::take(std::process::id());
        while spin.elapsed() < Duration::from_millis(160) {
            std::hint::black_box(spin.elapsed());
        }
        let used = before.since();
        let load = used.machine.expect("/proc/stat");
        assert!(load.busy > 0.0 && load.busy <= 1.0, "{load:?}");
        assert!(used.own >= 0.05, "{}", used.own);
    }

    #[test]
    fn the_cpu_bound_ratio_needs_both_phases_busy() {
        let busy = |b| {
            Some(MachineLoad {
                busy: b,
                steal: 0.0,
            })
        };
        let mut http = limit(10_000, Duration::from_secs(1));
        http.cpu_seconds_per_10k = 0.2;
        http.sink_cpu_seconds_per_10k = Some(0.1);
        http.machine = busy(0.99);
        let e2e = |machine, ratio| EndToEnd {
            events: 10_000,
            seconds: 2.0,
            events_per_second: 5_000.0,
            ratio,
            warmup_seconds: 0.0,
            latency_events: 0,
            latency_ms: percentiles(&[], 0.0),
            added_latency_ms: percentiles(&[], 0.0),
            acked_latency_ms: percentiles(&[], 0.0),
            all_latency_ms: percentiles(&[], 0.0),
            exchange_ms: Spread::default(),
            besides_exchange_ms: Spread::default(),
            peak_rss_mib: 0.0,
            cpu_seconds_per_10k: 0.5,
            sink_cpu_seconds_per_10k: 0.1,
            sink_connections: 64,
            machine,
            cpu_by_thread_us: ByThread::default(),
            outcomes: BTreeMap::new(),
        };
        let bound = cpu_bound_ratio(&http, &e2e(busy(0.95), Some(0.5))).unwrap();
        assert!((bound - 0.5).abs() < 1e-9, "{bound}");
        assert!(cpu_bound_ratio(&http, &e2e(busy(0.5), Some(0.5))).is_none());
        assert!(cpu_bound_ratio(&http, &e2e(busy(0.95), None)).is_none());
        http.machine = busy(0.6);
        assert!(cpu_bound_ratio(&http, &e2e(busy(0.95), Some(0.5))).is_none());

        // 20 + 10 µs per call; an event 50 + 10: 30 µs more, by thread.
        http.cpu_by_thread_us = Some(ByThread {
            runtime: 19.5,
            other: 0.5,
            ..ByThread::default()
        });
        let mut event = e2e(busy(0.95), Some(0.5));
        event.cpu_by_thread_us = ByThread {
            runtime: 41.0,
            kafka_clients: 5.0,
            mock_broker: 3.5,
            other: 0.5,
        };
        let b = beyond_the_call(&http, &event).unwrap();
        assert!((b.call_us - 30.0).abs() < 1e-9, "{b:?}");
        assert!((b.total_us - 30.0).abs() < 1e-9, "{b:?}");
        assert!((b.allowed_for_085_us - (30.0 / 0.85 - 30.0)).abs() < 1e-9);
        assert!((b.runtime_us - 21.5).abs() < 1e-9, "{b:?}");
        assert!((b.kafka_us - 8.5).abs() < 1e-9, "{b:?}");
        assert!(b.sink_us.abs() < 1e-9 && b.other_us.abs() < 1e-9, "{b:?}");
        let sum = b.runtime_us + b.kafka_us + b.sink_us + b.other_us;
        assert!(
            (sum - 30.0).abs() < 1e-9,
            "the parts add up to the difference: {b:?}"
        );
        // Per-thread readings that add up to more than the process's total
        // (schedstat lags, `other` is never negative) leave the difference
        // itself alone: `other` is what remains of it.
        event.cpu_by_thread_us.other = 1.5;
        let b = beyond_the_call(&http, &event).unwrap();
        assert!((b.total_us - 30.0).abs() < 1e-9, "{b:?}");
        assert!(b.other_us.abs() < 1e-9, "{b:?}");
    }

    #[test]
    fn the_necessary_work_bounds_the_ratio_when_limit_a_is_cpu_bound() {
        let mut http = limit(10_000, Duration::from_secs(1));
        http.cpu_seconds_per_10k = 0.2;
        http.sink_cpu_seconds_per_10k = Some(0.1);
        http.machine = Some(MachineLoad {
            busy: 0.99,
            steal: 0.0,
        });
        let mut round_trip = limit(10_000, Duration::from_secs(1));
        round_trip.cpu_seconds_per_10k = 0.03;
        // 30 µs per call / (30 + 3 + 4) µs.
        let bound = necessary_work_ratio(&http, &round_trip, 4.0).unwrap();
        assert!((bound - 30.0 / 37.0).abs() < 1e-9, "{bound}");
        http.machine = Some(MachineLoad {
            busy: 0.5,
            steal: 0.0,
        });
        assert!(necessary_work_ratio(&http, &round_trip, 4.0).is_none());
    }

    #[test]
    fn the_round_shown_is_the_median_by_ratio_or_else_by_p99() {
        let round = |ratio: Option<f64>, p99: f64| RoundFigures {
            limit_http_per_second: 1.0,
            limit_kafka_per_second: 1.0,
            end_to_end_per_second: 1.0,
            ratio,
            rate: None,
            rated_per_second: None,
            added_latency_p99_ms: p99,
            peak_rss_mib: 1.0,
            end_to_end_cpu_seconds_per_10k: 1.0,
            end_to_end_sink_cpu_seconds_per_10k: 1.0,
            limit_http_cpu_seconds_per_10k: 1.0,
            limit_http_sink_cpu_seconds_per_10k: None,
        };
        let by_ratio = [0.7, 0.5, 0.6].map(|r| round(Some(r), 0.0));
        assert_eq!(median_round(&by_ratio), 2);
        // Of an even count, the lower of the middle two.
        let four = [0.9, 0.5, 0.8, 0.6].map(|r| round(Some(r), 0.0));
        assert_eq!(median_round(&four), 3);
        let by_p99 = [3.0, 9.0, 1.0].map(|p| round(None, p));
        assert_eq!(median_round(&by_p99), 0);
        // With --rate half every round has a ratio (at full speed), but
        // the run is about the latency at the rate.
        let half = [(0.5, 9.0), (0.7, 1.0), (0.6, 4.0)].map(|(ratio, p99)| RoundFigures {
            rate: Some(1000),
            ..round(Some(ratio), p99)
        });
        assert_eq!(median_round(&half), 2);
        // Of an even count, the higher p99 of the middle two.
        let two = [3.0, 2.0].map(|p| round(None, p));
        assert_eq!(median_round(&two), 0);
        assert_eq!(median_round(&[round(None, 1.0)]), 0);
    }

    #[test]
    fn rates_are_events_per_second_or_half() {
        assert_eq!("15000".parse::<Rate>(), Ok(Rate::PerSecond(15_000)));
        assert_eq!("half".parse::<Rate>(), Ok(Rate::HalfOfMax));
        for bad in ["0", "-5", "1.5", "fast", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_spread_has_the_mean_and_the_nearest_rank_percentiles() {
        let ms: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Spread::of(&ms);
        assert_eq!((s.mean, s.p50, s.p99), (50.5, 50.0, 99.0));
        let none = Spread::of(&[]);
        assert_eq!((none.mean, none.p50, none.p99), (0.0, 0.0, 0.0));
    }

    #[test]
    fn percentiles_take_the_nearest_rank_and_never_go_below_zero() {
        let ms: Vec<f64> = (1..=1000).map(f64::from).collect();
        let p = percentiles(&ms, 0.0);
        assert_eq!((p.p50, p.p99, p.p999, p.max), (500.0, 990.0, 999.0, 1000.0));
        assert_eq!(percentiles(&ms, 995.0).p50, 0.0);
        assert_eq!(percentiles(&[], 0.0).max, 0.0);
    }
}
