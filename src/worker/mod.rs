//! The Kafka worker (SPEC §5, §6): consume action events, dispatch them with
//! per-key ordering and bounded concurrency, write result and dead-letter
//! records, and commit offsets only below what is final.
//!
//! One task owns the consumer and the per-key queues (the consume loop);
//! each event runs in a task of its own, at most `max_in_flight` at a time,
//! and reports back on a channel. Offsets are tracked per partition and the
//! committed position never passes an event whose records are not
//! acknowledged by the broker.

pub mod context;
pub mod offsets;
pub mod records;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::action::ActionSet;
use crate::dispatch::{DispatchOptions, Dispatcher, Outcome, OutcomeCode};
use crate::event::ActionEvent;
use crate::settings::{Ordering, Settings};
use crate::telemetry::{Metrics, UNKNOWN_ACTION};
use context::{Shared, WorkerContext};
use records::{Identity, Source};

/// How often final offsets are committed.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);
/// Resume paused partitions once the events held fall to this share of the limit.
const RESUME_AT: f64 = 0.75;
/// How long the loop may stop reading while `max_in_flight` events are held
/// before it pauses the partitions. Not reading is free (librdkafka's queue is
/// bounded by `queued.max.messages.kbytes`) but also serves no rebalance;
/// pausing purges that queue, so a resume has to fetch again.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a produce that failed.
const MAX_PRODUCE_BACKOFF: Duration = Duration::from_secs(5);

/// What an observer (the demo, the benchmark) learns of each final event.
#[derive(Debug, Clone)]
pub struct Finished {
    pub event_id: Option<String>,
    /// The action id when it names a loaded action, else `-`.
    pub action: String,
    pub code: OutcomeCode,
    pub attempts: u32,
    /// From consume to the outcome's records acknowledged.
    pub latency: Duration,
}

pub type Observer = Arc<dyn Fn(&Finished) + Send + Sync>;

/// A consumed record, owned.
#[derive(Debug)]
struct Record {
    partition: i32,
    offset: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
    consumed_at: Instant,
}

/// Events with the same key run one after another (ordering `key`/`partition`).
type ChainKey = (i32, Option<Bytes>);

struct Job {
    record: Record,
    epoch: u64,
    cancel: CancellationToken,
    chain: Option<ChainKey>,
}

/// A job's report to the consume loop.
struct Done {
    partition: i32,
    offset: i64,
    epoch: u64,
    chain: Option<ChainKey>,
    /// The outcome's records are acknowledged (false: abandoned).
    completed: bool,
}

/// What every job needs, shared.
struct JobContext {
    dispatcher: Arc<Dispatcher>,
    producer: FutureProducer,
    input_topic: String,
    results_topic: Option<String>,
    dlq_topic: String,
    metrics: Arc<Metrics>,
    observer: Option<Observer>,
    done: mpsc::Sender<Done>,
}

/// The worker: build it, then [`Worker::run`] it until shutdown.
pub struct Worker {
    settings: Settings,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    observer: Option<Observer>,
}

impl Worker {
    pub fn new(
        settings: Settings,
        actions: Arc<ActionSet>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Worker> {
        let dispatcher =
            Dispatcher::new(actions, DispatchOptions::from_settings(&settings.dispatch))?;
        Ok(Worker {
            settings,
            dispatcher: Arc::new(dispatcher),
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            observer: None,
        })
    }

    /// Called once per final event (after its records are acknowledged).
    pub fn with_observer(mut self, observer: Observer) -> Worker {
        self.observer = Some(observer);
        self
    }

    /// True once the consumer has joined its group.
    pub fn ready_flag(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// Consumes until `shutdown` is cancelled, then drains (up to
    /// `dispatch.shutdown_grace`), commits what is final and flushes.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let kafka = &self.settings.kafka;
        let dispatch = &self.settings.dispatch;
        let shared = Arc::new(Shared::new(
            kafka.input_topic.clone(),
            self.ready.clone(),
            self.metrics.clone(),
        ));
        let consumer: Arc<StreamConsumer<WorkerContext>> = Arc::new(
            consumer_config(&self.settings)
                .create_with_context(WorkerContext {
                    shared: shared.clone(),
                })
                .context("creating the Kafka consumer")?,
        );
        consumer
            .subscribe(&[&kafka.input_topic])
            .context("subscribing to the input topic")?;
        let producer: FutureProducer = producer_config(&self.settings)
            .create()
            .context("creating the Kafka producer")?;

        let max_in_flight = dispatch.max_in_flight;
        // Every job sends exactly one report and at most max_in_flight (plus
        // the few records that arrive while pausing) run at once.
        let (done_tx, mut done_rx) = mpsc::channel::<Done>(max_in_flight + 64);
        let jobs = Arc::new(JobContext {
            dispatcher: self.dispatcher.clone(),
            producer: producer.clone(),
            input_topic: kafka.input_topic.clone(),
            results_topic: (!kafka.results_topic.is_empty()).then(|| kafka.results_topic.clone()),
            dlq_topic: kafka.dlq_topic.clone(),
            metrics: self.metrics.clone(),
            observer: self.observer.clone(),
            done: done_tx,
        });
        let mut state = Loop {
            consumer: consumer.clone(),
            shared: shared.clone(),
            jobs,
            ordering: dispatch.ordering,
            chains: HashMap::new(),
            in_flight: 0,
            max_in_flight,
            paused: false,
            full_since: None,
        };
        let mut commit_tick = tokio::time::interval(COMMIT_INTERVAL);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        tracing::info!(topic = %kafka.input_topic, group = %kafka.group_id, max_in_flight, ordering = ?dispatch.ordering, "worker started");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = done_rx.recv() => state.finished(done),
                _ = commit_tick.tick() => state.commit(CommitMode::Async),
                _ = tokio::time::sleep_until(state.full_since.unwrap_or_else(tokio::time::Instant::now) + PAUSE_AFTER),
                    if state.full_since.is_some() && !state.paused => state.set_paused(true),
                // Backpressure: at max_in_flight, stop reading (then pause, see PAUSE_AFTER).
                received = consumer.recv(), if state.in_flight < state.max_in_flight || state.paused => match received {
                    Ok(message) => state.consumed(&message),
                    // Transient (fetch, transport): librdkafka recovers on its own.
                    Err(e) => tracing::warn!(error = %e, "consumer error"),
                },
            }
        }

        // Shutdown: no more fetching; let what is held finish, up to the grace period.
        tracing::info!(in_flight = state.in_flight, grace = ?dispatch.shutdown_grace, "stopping: draining in-flight events");
        let deadline = tokio::time::Instant::now() + dispatch.shutdown_grace;
        while state.in_flight > 0 {
            tokio::select! {
                Some(done) = done_rx.recv() => state.finished(done),
                _ = commit_tick.tick() => state.commit(CommitMode::Async),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(abandoned = state.in_flight, "shutdown grace over: abandoning the rest (redelivered to the next owner)");
                    shared.abandon_all();
                    break;
                }
            }
        }
        let list = shared.commit_list(None, true);
        {
            let mut positions: Vec<(i32, Option<i64>)> = shared
                .partitions()
                .iter()
                .map(|(p, s)| (*p, s.tracker.committable()))
                .collect();
            positions.sort();
            tracing::info!(?positions, "final positions");
        }
        let closing = consumer.clone();
        tokio::task::spawn_blocking(move || {
            if list.count() > 0 {
                if let Err(e) = closing.commit(&list, CommitMode::Sync) {
                    tracing::warn!(error = %e, "final commit failed");
                }
            }
            closing.unsubscribe();
        })
        .await
        .ok();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
            .await
            .ok();
        self.metrics.in_flight.set(0);
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// The consume loop's own state.
struct Loop {
    consumer: Arc<StreamConsumer<WorkerContext>>,
    shared: Arc<Shared>,
    jobs: Arc<JobContext>,
    ordering: Ordering,
    /// Keys with an event running; the queue holds the ones waiting behind it.
    chains: HashMap<ChainKey, VecDeque<Job>>,
    in_flight: usize,
    max_in_flight: usize,
    paused: bool,
    /// Since when `max_in_flight` events are held (reading stopped).
    full_since: Option<tokio::time::Instant>,
}

impl Loop {
    fn consumed(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) {
        self.jobs.metrics.events_consumed.inc();
        let partition = message.partition();
        let offset = message.offset();
        let (epoch, cancel) = {
            let mut partitions = self.shared.partitions();
            match partitions.get_mut(&partition) {
                Some(p) => {
                    if !p.tracker.consumed(offset) {
                        return; // a re-fetch of something already held
                    }
                    (p.epoch, p.cancel.clone())
                }
                // Not (or no longer) ours: the owner handles it.
                None => return,
            }
        };
        let record = Record {
            partition,
            offset,
            key: message.key().map(Bytes::copy_from_slice),
            value: message.payload().map(Bytes::copy_from_slice),
            consumed_at: Instant::now(),
        };
        let chain = match self.ordering {
            Ordering::None => None,
            Ordering::Partition => Some((partition, None)),
            // Records without a key have no order to keep.
            Ordering::Key => record.key.clone().map(|k| (partition, Some(k))),
        };
        self.in_flight += 1;
        self.jobs.metrics.in_flight.set(self.in_flight as i64);
        let job = Job {
            record,
            epoch,
            cancel,
            chain: chain.clone(),
        };
        match chain {
            Some(key) => match self.chains.get_mut(&key) {
                Some(waiting) => waiting.push_back(job),
                None => {
                    self.chains.insert(key, VecDeque::new());
                    self.spawn(job);
                }
            },
            None => self.spawn(job),
        }
        if self.in_flight >= self.max_in_flight && self.full_since.is_none() {
            self.full_since = Some(tokio::time::Instant::now());
        }
        // A new assignment starts unpaused: pause it too while we are paused.
        if self.shared.assigned.swap(false, AtomicOrdering::Relaxed) && self.paused {
            self.set_paused(true);
        }
    }

    fn finished(&mut self, done: Done) {
        self.in_flight -= 1;
        if done.completed {
            let mut partitions = self.shared.partitions();
            if let Some(p) = partitions.get_mut(&done.partition) {
                if p.epoch == done.epoch {
                    p.tracker.finished(done.offset);
                }
            }
        }
        if let Some(key) = done.chain {
            loop {
                match self.chains.get_mut(&key).and_then(VecDeque::pop_front) {
                    // Its partition was revoked: the new owner will run it.
                    Some(next) if next.cancel.is_cancelled() => self.in_flight -= 1,
                    Some(next) => {
                        self.spawn(next);
                        break;
                    }
                    None => {
                        self.chains.remove(&key);
                        break;
                    }
                }
            }
        }
        self.jobs.metrics.in_flight.set(self.in_flight as i64);
        if self.paused {
            if (self.in_flight as f64) <= self.max_in_flight as f64 * RESUME_AT {
                self.set_paused(false);
                self.full_since = None;
            }
        } else if self.in_flight < self.max_in_flight {
            self.full_since = None;
        }
    }

    fn set_paused(&mut self, pause: bool) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the assignment");
                return;
            }
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => {
                self.paused = pause;
                tracing::debug!(pause, in_flight = self.in_flight, "backpressure");
            }
            Err(e) => tracing::warn!(error = %e, pause, "pause/resume failed"),
        }
    }

    fn commit(&self, mode: CommitMode) {
        let list = self.shared.commit_list(None, false);
        if list.count() > 0 {
            if let Err(e) = self.consumer.commit(&list, mode) {
                tracing::warn!(error = %e, "offset commit failed");
            }
        }
    }

    fn spawn(&self, job: Job) {
        tokio::spawn(run_job(self.jobs.clone(), job));
    }
}

async fn run_job(ctx: Arc<JobContext>, job: Job) {
    let Job {
        record,
        epoch,
        cancel,
        chain,
    } = job;
    let completed = tokio::select! {
        _ = cancel.cancelled() => false,
        _ = process(&ctx, &record) => true,
    };
    let done = Done {
        partition: record.partition,
        offset: record.offset,
        epoch,
        chain,
        completed,
    };
    // The loop is gone only after shutdown; nothing is left to report to then.
    let _ = ctx.done.send(done).await;
}

/// Event → outcome → records acknowledged.
async fn process(ctx: &JobContext, record: &Record) {
    let (who, outcome) = match &record.value {
        None => (
            Identity::default(),
            Outcome::early(OutcomeCode::InvalidEvent, "the record has no value"),
        ),
        Some(value) => match ActionEvent::from_slice(value) {
            Err(invalid) => (
                Identity::of_invalid(&invalid),
                Outcome::early(OutcomeCode::InvalidEvent, invalid.reason.clone()),
            ),
            Ok(event) => {
                let span = tracing::debug_span!("event", event_id = %event.event_id, action_id = %event.action_id, partition = record.partition, offset = record.offset);
                let outcome =
                    tracing::Instrument::instrument(ctx.dispatcher.execute(&event), span).await;
                (Identity::of_event(&event), outcome)
            }
        },
    };
    let action = match who.action_id.as_deref() {
        Some(id) if ctx.dispatcher.actions().get(id).is_some() => id.to_string(),
        _ => UNKNOWN_ACTION.to_string(),
    };
    let elapsed = record.consumed_at.elapsed();
    ctx.metrics.record(&action, &outcome, elapsed.as_secs_f64());
    if outcome.code.is_failure() {
        tracing::debug!(event_id = ?who.event_id, outcome = %outcome.code, error = ?outcome.error, "event failed");
    }

    let result = async {
        if let (Some(topic), Some(value)) = (
            &ctx.results_topic,
            records::result_value(&who, &outcome, elapsed.as_secs_f64() * 1000.0),
        ) {
            deliver(ctx, topic, record.key.as_deref(), Some(&value), None).await;
        }
    };
    let dead_letter = async {
        if outcome.code.is_failure() {
            let source = Source {
                topic: &ctx.input_topic,
                partition: record.partition,
                offset: record.offset,
            };
            let mut headers = OwnedHeaders::new();
            for (name, value) in records::dlq_headers(&who, &outcome, source) {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_str()),
                });
            }
            deliver(
                ctx,
                &ctx.dlq_topic,
                record.key.as_deref(),
                record.value.as_deref(),
                Some(headers),
            )
            .await;
            ctx.metrics
                .dlq
                .with_label_values(&[&outcome.code.to_string()])
                .inc();
        }
    };
    // Boxed: the produce futures are large and only live after the outcome,
    // so events still waiting (for a permit, a backoff) do not carry them.
    Box::pin(async { tokio::join!(result, dead_letter) }).await;

    if let Some(observer) = &ctx.observer {
        observer(&Finished {
            event_id: who.event_id,
            action,
            code: outcome.code,
            attempts: outcome.attempt_count(),
            latency: record.consumed_at.elapsed(),
        });
    }
}

/// Produces one record and waits for the broker's acknowledgement, trying
/// again until it is acknowledged: an outcome is never skipped.
async fn deliver(
    ctx: &JobContext,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: Option<OwnedHeaders>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Some(h) = &headers {
            record = record.headers(h.clone());
        }
        match ctx.producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => return,
            Err((e, _)) => {
                tracing::warn!(topic, error = %e, retry_in = ?backoff, "produce failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_PRODUCE_BACKOFF);
            }
        }
    }
}

pub fn consumer_config(settings: &Settings) -> ClientConfig {
    let kafka = &settings.kafka;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // Bound what librdkafka prefetches while we are paused or busy.
        .set("queued.max.messages.kbytes", "16384")
        // Records arrive in smaller, steadier batches: a 500 ms default let a
        // burst of up to max_in_flight events start at once (bench, 2000/s:
        // p50 19.7 -> 2.2 ms). Idle cost: ~100 empty fetches/s per broker.
        .set("fetch.wait.max.ms", "10");
    for (k, v) in &kafka.consumer {
        config.set(k, v);
    }
    config
}

pub fn producer_config(settings: &Settings) -> ClientConfig {
    let kafka = &settings.kafka;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("acks", "all")
        // An event's offset waits for its records' acks, so linger is added
        // to every event's latency: 1 ms keeps batching under load (5 ms gave
        // ~25 % more events/s at 0 ms sink latency but +5 ms on every event;
        // see BENCHMARKS.md). `[kafka.producer]` can change it.
        .set("linger.ms", "1")
        .set("message.timeout.ms", "30000");
    for (k, v) in &kafka.producer {
        config.set(k, v);
    }
    config
}
