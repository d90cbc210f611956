//! The Kafka worker (SPEC §5, §6): consume action events, dispatch them with
//! per-key ordering and bounded concurrency, write result and dead-letter
//! records, and commit offsets only below what is final.
//!
//! One task owns the consumer and the per-key queues (the consume loop);
//! each event runs in a task of its own until its outcome: it enqueues the
//! outcome's records in the producer and reports the outcome on a channel
//! (its `max_in_flight` slot is free and the next event of its key may
//! start). The producer's delivery callback reports each record's
//! acknowledgement on the same channel, so acknowledgements reach the loop
//! in batches, without waking the event's task again; once all of an
//! event's records are acknowledged its offset may be committed. Reading
//! stops while `max_in_flight` events are before their outcome or the
//! acknowledgement window (`max_in_flight`, at least [`MIN_ACK_WINDOW`])
//! waits for acknowledgements, so each count stays near its bound (the
//! second can pass it by the events that were in flight when reading
//! stopped). Offsets are tracked per
//! partition and the committed position never passes an event whose records
//! are not acknowledged by the broker.

pub mod context;
pub mod offsets;
pub mod producer;
pub mod records;

use std::collections::VecDeque;

use foldhash::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::action::ActionDefinition;
use crate::action::ActionSet;
use crate::dispatch::{
    Admission, Admitted, DispatchOptions, Dispatcher, Outcome, OutcomeCode, Waiting,
};
use crate::event::ActionEvent;
use crate::render::RenderedRequest;
use crate::settings::{Ordering, Settings};
use crate::telemetry::{Metrics, UNKNOWN_ACTION};
use chrono::{DateTime, Utc};
use context::{Shared, WorkerContext};
use records::{Identity, Source};

/// How often final offsets are committed.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);
/// How long a stopping worker waits for its consumer to close
/// ([`close_consumer`]).
const CONSUMER_CLOSE_WAIT: Duration = Duration::from_secs(10);
/// Resume paused partitions once both counts fall to this share of their
/// bounds ([`Loop::full`]).
const RESUME_AT: f64 = 0.75;
/// The fewest events whose records may wait for the broker's
/// acknowledgement at once, whatever `max_in_flight` is. Those events have
/// their outcome and hold a result record each (a few hundred bytes); with
/// a window as small as a small `max_in_flight`, every event would wait for
/// the producer's linger and the broker's answer before the next is read
/// (`max_in_flight` 1 against a 5 ms provider: 154 events/s of the 200 its
/// calls allow, with an acknowledgement 1.3 ms after each outcome).
pub const MIN_ACK_WINDOW: usize = 256;
/// How long the loop may stop reading while it is full ([`Loop::full`])
/// before it pauses the partitions. Not reading is free (librdkafka's queue is
/// bounded by `queued.max.messages.kbytes`) but also serves no rebalance;
/// pausing purges that queue, so a resume has to fetch again.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// Most records taken from librdkafka in one turn of the consume loop.
const RECEIVE_BATCH: usize = 64;
/// The wait before a failed produce is tried again; it doubles each time,
/// up to [`MAX_PRODUCE_BACKOFF`].
const FIRST_PRODUCE_BACKOFF: Duration = Duration::from_millis(100);
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
    /// From consume to the outcome (the rest of `latency` is producing
    /// the records).
    pub to_outcome: Duration,
    /// Of `to_outcome`, the time in the HTTP exchanges of its attempts
    /// (request sent → answer read), summed; zero without a call.
    pub exchange: Duration,
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

/// What the consume loop hears: from an event's task, `Outcome`, and
/// `Final` when there is no record to wait for; from the producer's delivery
/// callback, `Acked` or `Failed` for each record.
enum Report {
    /// The event has its outcome, or was abandoned before one: its slot is
    /// free and the next event of its key may start. `delivering`: it now
    /// waits for its records (false: abandoned, nothing more comes).
    Outcome {
        chain: Option<ChainKey>,
        delivering: bool,
    },
    /// The event has its outcome and no record to wait for: it is final.
    Final(Arc<Delivering>),
    /// One of the event's records is acknowledged by the broker.
    Acked(Box<Delivery>),
    /// One of its records could not be produced (enqueued or acknowledged):
    /// it is produced again after a backoff, or given up if its event was
    /// abandoned (partition revoked, shutdown grace over).
    Failed(Box<Delivery>, String),
}

/// An event whose outcome's records are being produced.
struct Delivering {
    partition: i32,
    offset: i64,
    epoch: u64,
    cancel: CancellationToken,
    /// Records not acknowledged (or abandoned) yet.
    remaining: AtomicUsize,
    /// A record was given up (the partition was revoked, or shutdown).
    abandoned: AtomicBool,
    consumed_at: Instant,
    /// What the observer gets, built only when there is one (taken once,
    /// when the event is final).
    finished: Mutex<Option<Finished>>,
}

/// One output record of an event, with what it takes to produce it again.
struct Delivery {
    event: Arc<Delivering>,
    output: Output,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Option<OwnedHeaders>,
    /// The wait before producing it again after a failure.
    backoff: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Output {
    Result,
    /// The dead letter of a failure with this outcome.
    DeadLetter(OutcomeCode),
}

/// The producer's callbacks: every delivery report goes to the consume loop.
struct Deliveries {
    reports: mpsc::UnboundedSender<Report>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        let report = match result {
            Ok(_) => Report::Acked(delivery),
            Err((e, _)) => Report::Failed(delivery, e.to_string()),
        };
        // The loop is gone only after shutdown; nothing waits for it then.
        let _ = self.reports.send(report);
    }
}

/// The producer of result and dead-letter records.
type OutputProducer = producer::PolledProducer<Deliveries>;

/// What every job needs, shared.
struct JobContext {
    dispatcher: Arc<Dispatcher>,
    producer: Arc<OutputProducer>,
    input_topic: String,
    results_topic: Option<String>,
    dlq_topic: String,
    metrics: Arc<Metrics>,
    observer: Option<Observer>,
    reports: mpsc::UnboundedSender<Report>,
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

    /// Called once per final event (after its records are acknowledged;
    /// not for an event whose partition was revoked meanwhile).
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
        let max_in_flight = dispatch.max_in_flight;
        // Unbounded, yet bounded: each event sends an outcome and one report
        // per record (two at most), and reading stops while max_in_flight
        // events are before their outcome or the acknowledgement window is
        // full (see the module doc).
        let (report_tx, mut reports) = mpsc::unbounded_channel::<Report>();
        let producer: BaseProducer<Deliveries> = producer_config(&self.settings)
            .create_with_context(Deliveries {
                reports: report_tx.clone(),
            })
            .context("creating the Kafka producer")?;
        let producer: Arc<OutputProducer> = Arc::new(
            producer::PolledProducer::new(producer)
                .context("starting the producer's delivery report thread")?,
        );
        let jobs = Arc::new(JobContext {
            dispatcher: self.dispatcher.clone(),
            producer: producer.clone(),
            input_topic: kafka.input_topic.clone(),
            results_topic: (!kafka.results_topic.is_empty()).then(|| kafka.results_topic.clone()),
            dlq_topic: kafka.dlq_topic.clone(),
            metrics: self.metrics.clone(),
            observer: self.observer.clone(),
            reports: report_tx,
        });
        let outputs: Vec<String> = jobs
            .results_topic
            .iter()
            .chain([&jobs.dlq_topic])
            .cloned()
            .collect();
        let warming = producer.clone();
        tokio::task::spawn_blocking(move || warm_up(warming, outputs));
        let mut state = Loop {
            consumer: consumer.clone(),
            shared: shared.clone(),
            jobs,
            ordering: dispatch.ordering,
            chains: HashMap::default(),
            queued: HashMap::default(),
            held_back: HashSet::default(),
            assigned: 0,
            in_flight: 0,
            delivering: 0,
            max_in_flight,
            ack_window: max_in_flight.max(MIN_ACK_WINDOW),
            paused: false,
            full_since: None,
            waker: Waker::new(consumer.clone(), kafka.input_topic.clone()),
        };
        let mut commit_tick = tokio::time::interval(COMMIT_INTERVAL);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        tracing::info!(topic = %kafka.input_topic, group = %kafka.group_id, max_in_flight, ordering = ?dispatch.ordering, "worker started");
        // One stream for the worker's life (each `recv` would make one).
        let mut messages = consumer.stream();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(report) = reports.recv() => {
                    state.report(report);
                    // And whatever else is already there, without another turn.
                    while let Ok(report) = reports.try_recv() {
                        state.report(report);
                    }
                }
                _ = commit_tick.tick() => state.commit(CommitMode::Async),
                _ = tokio::time::sleep_until(state.full_since.unwrap_or_else(tokio::time::Instant::now) + PAUSE_AFTER),
                    if state.full_since.is_some() && !state.paused => state.set_paused(true),
                // Backpressure: when full, stop reading (then pause, see PAUSE_AFTER).
                Some(received) = messages.next(), if state.reading() => {
                    state.received(received);
                    // Records librdkafka already holds are taken in the same
                    // turn, a batch at most (reports and shutdown come next).
                    for _ in 1..RECEIVE_BATCH {
                        if !state.reading() {
                            break;
                        }
                        match messages.next().now_or_never() {
                            Some(Some(received)) => state.received(received),
                            _ => break,
                        }
                    }
                }
            }
        }

        drop(messages);
        // Shutdown: no more reading; let what is held finish, up to the grace period.
        tracing::info!(in_flight = state.in_flight, delivering = state.delivering, grace = ?dispatch.shutdown_grace, "stopping: draining in-flight events");
        let deadline = tokio::time::Instant::now() + dispatch.shutdown_grace;
        while state.in_flight as isize + state.delivering > 0 {
            tokio::select! {
                Some(report) = reports.recv() => state.report(report),
                _ = commit_tick.tick() => state.commit(CommitMode::Async),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(abandoned = state.in_flight as isize + state.delivering, "shutdown grace over: abandoning the rest (redelivered to the next owner)");
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
        // A wake still running holds a handle of the consumer.
        state.waker.finish().await;
        // The loop's share of the producer goes first, so that the last one
        // (whose drop joins the delivery report thread, and flushes what a
        // purge leaves) is normally dropped here, off the runtime's threads
        // (an event task that has sent its last report may still hold one
        // for a moment).
        drop(state);
        let flushed =
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "flushing the output producer at shutdown");
        }
        close_consumer(consumer).await;
        self.metrics.in_flight.set(0);
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// Drops the consumer's last handle, which closes it (leaves the group),
/// waiting at most [`CONSUMER_CLOSE_WAIT`]. The close serves a last rebalance
/// callback, and librdkafka can leave that callback waiting forever for the
/// group's rebalance protocol (seen against a real broker in CI, as in
/// confluentinc/librdkafka#4041 and fede1024/rust-rdkafka#509): a shutdown
/// must end anyway, and its offsets are committed by then.
async fn close_consumer(consumer: Arc<StreamConsumer<WorkerContext>>) {
    if !drop_within(consumer, CONSUMER_CLOSE_WAIT).await {
        tracing::warn!(wait = ?CONSUMER_CLOSE_WAIT, "the consumer did not close in time; left to close on its own");
    }
}

/// Drops `value` on a thread of its own and waits for that at most `wait`;
/// false if the drop had not ended by then (the thread is left to it). A
/// drop that cannot get a thread happens here, however long it takes.
async fn drop_within<T: Send + 'static>(value: T, wait: Duration) -> bool {
    let (dropped, done) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("ja-close".into())
        .spawn(move || {
            drop(value);
            let _ = dropped.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to drop on; dropping in place");
        return true;
    }
    tokio::time::timeout(wait, done).await.is_ok()
}

/// The consume loop's own state.
struct Loop {
    consumer: Arc<StreamConsumer<WorkerContext>>,
    shared: Arc<Shared>,
    jobs: Arc<JobContext>,
    ordering: Ordering,
    /// Keys with an event running; the queue holds the ones waiting behind it.
    chains: HashMap<ChainKey, VecDeque<Job>>,
    /// Per partition, the events waiting in `chains` (behind a running one).
    queued: HashMap<i32, usize>,
    /// Partitions paused because their waiting events fill their share of
    /// `max_in_flight` ([`Loop::queue_grew`]).
    held_back: HashSet<i32>,
    /// Partitions assigned, as of the last record read (read from the
    /// partition table while it is locked for that record anyway).
    assigned: usize,
    /// Events consumed and without an outcome yet.
    in_flight: usize,
    /// Events with an outcome whose records are not acknowledged yet. Signed:
    /// an event's records can be acknowledged before the loop reads its
    /// outcome (the two reports come from different threads), and then this
    /// is below the count, by one per such event, until it does.
    delivering: isize,
    max_in_flight: usize,
    /// The most events waiting for their records' acknowledgements before
    /// reading stops: `max_in_flight`, at least [`MIN_ACK_WINDOW`].
    ack_window: usize,
    paused: bool,
    /// Since when the loop is [`Loop::full`] (reading stopped).
    full_since: Option<tokio::time::Instant>,
    /// Wakes the broker threads after a resume.
    waker: Waker,
}

impl Loop {
    fn received(
        &mut self,
        received: Result<rdkafka::message::BorrowedMessage<'_>, rdkafka::error::KafkaError>,
    ) {
        match received {
            Ok(message) => self.consumed(&message),
            // Transient (fetch, transport): librdkafka recovers on its own.
            Err(e) => tracing::warn!(error = %e, "consumer error"),
        }
    }

    fn consumed(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) {
        self.jobs.metrics.events_consumed.inc();
        let partition = message.partition();
        let offset = message.offset();
        let (epoch, cancel) = {
            let mut partitions = self.shared.partitions();
            self.assigned = partitions.len();
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
                Some(waiting) => {
                    waiting.push_back(job);
                    self.queue_grew(partition);
                }
                None => {
                    self.chains.insert(key, VecDeque::new());
                    self.spawn(job);
                }
            },
            None => self.spawn(job),
        }
        self.track_full();
        // A new assignment starts unpaused: pause it too while we are
        // paused, and the partitions held back that are still ours.
        if self.shared.assigned.swap(false, AtomicOrdering::Relaxed) {
            let ours: HashSet<i32> = self.shared.partitions().keys().copied().collect();
            self.held_back.retain(|p| ours.contains(p));
            // As in queue_grew: not every partition is held back.
            if !ours.is_empty() && self.held_back.len() >= ours.len() {
                if let Some(&p) = self.held_back.iter().next() {
                    self.held_back.remove(&p);
                    if !self.paused {
                        self.pause_partitions(&[p], false);
                    }
                }
            }
            if self.paused {
                self.set_paused(true);
            } else if !self.held_back.is_empty() {
                let held: Vec<i32> = self.held_back.iter().copied().collect();
                self.pause_partitions(&held, true);
            }
        }
    }

    /// An event of `partition` waits behind another of its key. Records come
    /// from librdkafka a partition at a time, so with `partition` ordering
    /// (or a few busy keys) one partition's backlog could fill the whole
    /// `max_in_flight` window and run one event at a time while the other
    /// partitions go unread: once its waiting events reach its share of the
    /// window ([`Loop::hold_back_at`]), the partition is paused until half of
    /// them have started. The last partition still read is not paused:
    /// holding it back would let no other partition be read, and a broker
    /// whose partitions are all paused has nothing to fetch, so its thread
    /// sleeps up to a second and notices a resume only then (`bench
    /// --ordering partition`: 1 466 events/s, one pause and resume of every
    /// partition a second, where the window and the fetches allow more).
    fn queue_grew(&mut self, partition: i32) {
        let queued = self.queued.entry(partition).or_default();
        *queued += 1;
        let queued = *queued;
        let at = self.hold_back_at();
        if holds_back(queued, at, self.assigned, self.held_back.len())
            && self.held_back.insert(partition)
        {
            tracing::debug!(partition, "backlog: partition paused");
            self.pause_partitions(&[partition], true);
        }
    }

    /// An event of `partition` that waited has started (or was dropped).
    fn queue_shrank(&mut self, partition: i32) {
        let left = match self.queued.get_mut(&partition) {
            Some(queued) => {
                *queued = queued.saturating_sub(1);
                *queued
            }
            None => 0,
        };
        if left == 0 {
            self.queued.remove(&partition);
        }
        if left <= self.hold_back_at() / 2 && self.held_back.remove(&partition) {
            // While everything is paused, the general resume takes it too.
            if !self.paused {
                tracing::debug!(partition, "backlog: partition resumed");
                self.pause_partitions(&[partition], false);
            }
        }
    }

    /// How many waiting events hold a partition back: its share of
    /// `max_in_flight`, and at least 4, so that a window smaller than the
    /// partitions does not pause and resume (and fetch again) per event.
    fn hold_back_at(&self) -> usize {
        (self.max_in_flight / self.assigned.max(1)).max(4)
    }

    /// No reading while `max_in_flight` events are before their outcome,
    /// or the acknowledgement window is full.
    fn full(&self) -> bool {
        self.in_flight >= self.max_in_flight || self.acks_awaited() >= self.ack_window
    }

    /// Paused, and both counts are low enough to read again.
    fn may_resume(&self) -> bool {
        let low = |count: usize, bound: usize| count as f64 <= bound as f64 * RESUME_AT;
        low(self.in_flight, self.max_in_flight) && low(self.acks_awaited(), self.ack_window)
    }

    /// Events with an outcome whose records are not all acknowledged.
    fn acks_awaited(&self) -> usize {
        self.delivering.max(0) as usize
    }

    /// Whether the consumer is read: while not full, and while paused (its
    /// partitions deliver no new records then, and reading serves
    /// rebalances).
    fn reading(&self) -> bool {
        !self.full() || self.paused
    }

    fn report(&mut self, report: Report) {
        match report {
            Report::Outcome { chain, delivering } => {
                self.in_flight -= 1;
                self.delivering += isize::from(delivering);
                if let Some(key) = chain {
                    self.next_of(key);
                }
            }
            Report::Final(event) => self.settled(&event, true),
            Report::Acked(delivery) => {
                if let Output::DeadLetter(code) = delivery.output {
                    self.jobs.metrics.dead_lettered(code);
                }
                self.record_done(&delivery.event, true);
            }
            Report::Failed(delivery, error) => self.produce_again(delivery, error),
        }
        self.jobs.metrics.in_flight.set(self.in_flight as i64);
        if self.paused {
            if self.may_resume() {
                self.set_paused(false);
                self.full_since = None;
            }
        } else {
            self.track_full();
        }
    }

    /// Starts the pause timer ([`PAUSE_AFTER`]) when the loop becomes full,
    /// whether by a record read or by outcomes moving events to the
    /// acknowledgement wait (a stalled output topic would otherwise keep the
    /// consumer unread, and its rebalances unserved, as long as it lasts),
    /// and stops it when the loop is no longer full.
    fn track_full(&mut self) {
        if !self.full() {
            self.full_since = None;
        } else if self.full_since.is_none() {
            self.full_since = Some(tokio::time::Instant::now());
        }
    }

    /// One of the event's records is acknowledged (`acked`) or given up.
    fn record_done(&mut self, event: &Delivering, acked: bool) {
        if !acked {
            event.abandoned.store(true, AtomicOrdering::Relaxed);
        }
        if event.remaining.fetch_sub(1, AtomicOrdering::AcqRel) == 1 {
            let completed = !event.abandoned.load(AtomicOrdering::Relaxed);
            self.settled(event, completed);
        }
    }

    /// The event is final: its offset may be committed (`completed`), or it
    /// was abandoned and its partition's next owner runs it again.
    fn settled(&mut self, event: &Delivering, completed: bool) {
        self.delivering -= 1;
        if !completed {
            return;
        }
        let ours = {
            let mut partitions = self.shared.partitions();
            match partitions.get_mut(&event.partition) {
                Some(p) if p.epoch == event.epoch => p.tracker.finished(event.offset),
                // Revoked meanwhile: the next owner runs it again.
                _ => false,
            }
        };
        if !ours {
            return;
        }
        if let Some(observer) = &self.jobs.observer {
            let taken = event.finished.lock().ok().and_then(|mut f| f.take());
            if let Some(mut finished) = taken {
                finished.latency = event.consumed_at.elapsed();
                observer(&finished);
            }
        }
    }

    /// Produces a record again after its backoff, until it is acknowledged:
    /// an outcome is never skipped. Given up only when its partition is
    /// revoked or shutdown abandons it.
    fn produce_again(&mut self, mut delivery: Box<Delivery>, error: String) {
        if delivery.event.cancel.is_cancelled() {
            let event = delivery.event.clone();
            self.record_done(&event, false);
            return;
        }
        let wait = delivery.backoff;
        delivery.backoff = (wait * 2).min(MAX_PRODUCE_BACKOFF);
        tracing::warn!(topic = self.jobs.topic(delivery.output), %error, retry_in = ?wait, "produce failed; retrying");
        let jobs = self.jobs.clone();
        tokio::spawn(async move {
            let cancel = delivery.event.cancel.clone();
            tokio::select! {
                // Back to the loop, which gives it up.
                _ = cancel.cancelled() => {
                    let _ = jobs.reports.send(Report::Failed(delivery, "abandoned".into()));
                }
                _ = tokio::time::sleep(wait) => produce(&jobs, delivery),
            }
        });
    }

    /// Starts the next waiting event of `key`, if any.
    fn next_of(&mut self, key: ChainKey) {
        loop {
            let next = self.chains.get_mut(&key).and_then(VecDeque::pop_front);
            if next.is_some() {
                self.queue_shrank(key.0);
            }
            match next {
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

    /// Pauses or resumes the whole assignment (backpressure). A resume
    /// leaves the partitions held back for their own backlog paused.
    fn set_paused(&mut self, pause: bool) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the assignment");
                return;
            }
        };
        let partitions: Vec<i32> = assignment
            .elements()
            .iter()
            .map(|e| e.partition())
            .filter(|p| pause || !self.held_back.contains(p))
            .collect();
        if self.pause_partitions(&partitions, pause) {
            self.paused = pause;
            tracing::debug!(
                pause,
                in_flight = self.in_flight,
                delivering = self.delivering,
                "backpressure"
            );
        }
    }

    /// Pauses or resumes some partitions of the input topic; false if
    /// librdkafka refused. A resume wakes the partitions' broker threads
    /// ([`Waker`]).
    fn pause_partitions(&mut self, partitions: &[i32], pause: bool) -> bool {
        let mut list = TopicPartitionList::new();
        for &p in partitions {
            list.add_partition(&self.shared.topic, p);
        }
        let result = if pause {
            self.consumer.pause(&list)
        } else {
            self.consumer.resume(&list)
        };
        match result {
            Ok(()) => {
                if !pause {
                    self.waker.wake(partitions);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, ?partitions, pause, "pause/resume failed");
                false
            }
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

/// Wakes the consumer's broker threads after a resume, so that they fetch
/// the resumed partitions now. librdkafka applies a resume without waking a
/// broker thread, and one whose partitions were all paused sleeps up to a
/// second (its longest wait) before it looks again: a provider slower than
/// [`PAUSE_AFTER`] at 64 in flight (2 s each) got 23 events/s of the 32 its
/// calls allow, the worker idle for up to a second after every wave. A
/// request to a partition's leader wakes its thread: a watermark query for
/// each resumed partition (its answer is not used), from one blocking task
/// at a time, which takes the partitions resumed meanwhile too. A partition
/// is queried at most every [`WAKE_EVERY`] (backlog resumes can come
/// hundreds of times a second): a later resume waits for that.
struct Waker {
    consumer: Arc<StreamConsumer<WorkerContext>>,
    topic: String,
    state: Arc<Mutex<Wakes>>,
    running: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Wakes {
    /// Partitions resumed and not queried since.
    pending: std::collections::BTreeSet<i32>,
    /// When each partition was last queried.
    last: HashMap<i32, Instant>,
    /// A task is querying (it clears this when it finds nothing pending,
    /// or the worker stopping).
    busy: bool,
    /// The worker is stopping: no more queries.
    stop: bool,
}

impl Waker {
    fn new(consumer: Arc<StreamConsumer<WorkerContext>>, topic: String) -> Waker {
        Waker {
            consumer,
            topic,
            state: Arc::default(),
            running: None,
        }
    }

    /// Wakes the leaders of `partitions`.
    fn wake(&mut self, partitions: &[i32]) {
        let Ok(mut wakes) = self.state.lock() else {
            return;
        };
        if wakes.stop {
            return;
        }
        wakes.pending.extend(partitions);
        if wakes.busy {
            return; // the running task takes them
        }
        wakes.busy = true;
        let (consumer, topic, state) = (
            self.consumer.clone(),
            self.topic.clone(),
            self.state.clone(),
        );
        self.running = Some(tokio::task::spawn_blocking(move || {
            Waker::query(consumer, &topic, &state)
        }));
    }

    /// The task: queries what is pending, partitions due first, until
    /// nothing is (or the worker stops). Its handle of the consumer is
    /// dropped before it says it is done, so that a task started after it
    /// is the only one [`Waker::finish`] has to wait for.
    fn query(consumer: Arc<StreamConsumer<WorkerContext>>, topic: &str, state: &Mutex<Wakes>) {
        let mut consumer = Some(consumer);
        loop {
            let due: Vec<i32> = {
                let Ok(mut wakes) = state.lock() else {
                    return;
                };
                if wakes.stop || wakes.pending.is_empty() {
                    drop(consumer.take());
                    wakes.busy = false;
                    return;
                }
                let now = Instant::now();
                let ready = |p: &i32, w: &Wakes| {
                    w.last
                        .get(p)
                        .is_none_or(|at| now.duration_since(*at) >= WAKE_EVERY)
                };
                let due: Vec<i32> = wakes
                    .pending
                    .iter()
                    .copied()
                    .filter(|p| ready(p, &wakes))
                    .collect();
                for p in &due {
                    wakes.pending.remove(p);
                    wakes.last.insert(*p, now);
                }
                due
            };
            if due.is_empty() {
                std::thread::sleep(WAKE_EVERY / 10);
                continue;
            }
            // One batch takes WAKE_WAIT at most (an unreachable leader), and
            // stops with the worker.
            let deadline = Instant::now() + WAKE_WAIT;
            for p in due {
                let left = deadline.saturating_duration_since(Instant::now());
                let stopping = state.lock().map_or(true, |w| w.stop);
                let Some(consumer) = consumer.as_ref().filter(|_| !left.is_zero() && !stopping)
                else {
                    break;
                };
                if let Err(e) = consumer.fetch_watermarks(topic, p, left) {
                    tracing::debug!(partition = p, error = %e, "waking the fetcher");
                }
            }
        }
    }

    /// Stops the queries and waits for the running one (at most one query,
    /// [`WAKE_WAIT`]): the task holds a handle of the consumer, whose last
    /// handle the shutdown must drop.
    async fn finish(&mut self) {
        if let Ok(mut wakes) = self.state.lock() {
            wakes.stop = true;
        }
        if let Some(running) = self.running.take() {
            let _ = running.await;
        }
    }
}

/// The longest a batch of wake queries ([`Waker`]) takes.
const WAKE_WAIT: Duration = Duration::from_secs(1);
/// The least time between two wake queries of a partition.
const WAKE_EVERY: Duration = Duration::from_millis(100);

/// Whether a partition with `queued` events waiting behind their keys is
/// held back ([`Loop::queue_grew`]): at `at` of them, unless it is the last
/// of the `assigned` partitions that is not (`held` are).
fn holds_back(queued: usize, at: usize, assigned: usize, held: usize) -> bool {
    queued >= at && assigned > held + 1
}

async fn run_job(ctx: Arc<JobContext>, job: Job) {
    let Job {
        record,
        epoch,
        cancel,
        chain,
    } = job;
    let decided = tokio::select! {
        _ = cancel.cancelled() => None,
        decided = decide(&ctx, &record) => Some(decided),
    };
    let Some(decided) = decided else {
        // Abandoned before its outcome: its slot is free, its offset stays.
        let _ = ctx.reports.send(Report::Outcome {
            chain,
            delivering: false,
        });
        return;
    };
    let event = Arc::new(Delivering::new(&ctx, &record, epoch, cancel, &decided));
    let deliveries = outputs(&ctx, &record, &event, &decided);
    // Before any record is sent: its report may come at once.
    event
        .remaining
        .store(deliveries.len(), AtomicOrdering::Release);
    let nothing_to_produce = deliveries.is_empty();
    // Enqueued before the outcome is reported, so that the next event of the
    // key, which may start then, does not overtake these records (unless one
    // of them has to be produced again).
    for delivery in deliveries {
        produce(&ctx, Box::new(delivery));
    }
    // The loop is gone only after shutdown; nothing is left to report to then.
    let _ = ctx.reports.send(Report::Outcome {
        chain,
        delivering: true,
    });
    if nothing_to_produce {
        let _ = ctx.reports.send(Report::Final(event));
    }
}

impl Delivering {
    fn new(
        ctx: &JobContext,
        record: &Record,
        epoch: u64,
        cancel: CancellationToken,
        decided: &Decided,
    ) -> Delivering {
        let finished = ctx.observer.is_some().then(|| Finished {
            action: action_label(&decided.who, decided.action_known).to_string(),
            event_id: decided.who.event_id.clone(),
            code: decided.outcome.code,
            attempts: decided.outcome.attempt_count(),
            latency: Duration::ZERO, // set when final
            to_outcome: decided.took,
            exchange: decided.outcome.attempts.iter().map(|a| a.duration).sum(),
        });
        Delivering {
            partition: record.partition,
            offset: record.offset,
            epoch,
            cancel,
            remaining: AtomicUsize::new(0),
            abandoned: AtomicBool::new(false),
            consumed_at: record.consumed_at,
            finished: Mutex::new(finished),
        }
    }
}

/// An event's outcome, and who it was for.
struct Decided {
    who: Identity,
    outcome: Outcome,
    /// `who.action_id` names a loaded action.
    action_known: bool,
    /// From consume to the outcome.
    took: Duration,
}

/// Event → outcome (with its metrics).
async fn decide(ctx: &JobContext, record: &Record) -> Decided {
    let dispatcher = &ctx.dispatcher;
    // Who the event is for: taken from the parsed event once it is no longer
    // needed (moved, not copied).
    let mut who = Identity::default();
    let span = |event_id: &str, action_id: &str| {
        tracing::debug_span!(
            "event",
            event_id,
            action_id,
            partition = record.partition,
            offset = record.offset
        )
    };
    let outcome = match start(dispatcher, record.value.as_deref(), &mut who) {
        Start::Done(outcome) => outcome,
        Start::Run(ready) => {
            let span = span(&ready.event.event_id, &ready.event.action_id);
            let (outcome, event) = run(dispatcher, ready).instrument(span).await;
            who = Identity::from_event(event);
            outcome
        }
        Start::Wait(waiting, deadline) => {
            let span = span(
                who.event_id.as_deref().unwrap_or_default(),
                who.action_id.as_deref().unwrap_or_default(),
            );
            let admitted = dispatcher
                .admit(waiting, deadline)
                .instrument(span.clone())
                .await;
            match admitted.and_then(|first| restart(dispatcher, record.value.as_deref(), first)) {
                Ok(ready) => run(dispatcher, ready).instrument(span).await.0,
                Err(outcome) => outcome,
            }
        }
    };
    // Every outcome but these two comes after the action was found.
    let action_known = match (who.action_id.as_deref(), outcome.code) {
        (Some(_), OutcomeCode::UnknownAction) | (None, _) => false,
        (Some(id), OutcomeCode::InvalidEvent) => dispatcher.actions().get(id).is_some(),
        (Some(_), _) => true,
    };
    let took = record.consumed_at.elapsed();
    let action = action_label(&who, action_known);
    ctx.metrics.record(action, &outcome, took.as_secs_f64());
    if outcome.code.is_failure() {
        tracing::debug!(event_id = ?who.event_id, outcome = %outcome.code, error = ?outcome.error, "event failed");
    }
    Decided {
        who,
        outcome,
        action_known,
        took,
    }
}

/// The metrics' `action` label: only ids of loaded actions (SPEC §7).
fn action_label(who: &Identity, known: bool) -> &str {
    match &who.action_id {
        Some(id) if known => id,
        _ => UNKNOWN_ACTION,
    }
}

/// What an event's record leads to, found without waiting. This is
/// [`Dispatcher::execute`] taken apart so that an event which must wait for
/// its first attempt's limits (rate, bulkhead) waits as its record's bytes
/// only: the parsed event and the rendered request are dropped, and made
/// again once it is admitted.
// A return value, matched at once and never stored.
#[allow(clippy::large_enum_variant)]
enum Start {
    /// Final already: invalid, unknown action, capped, expired, ...
    Done(Outcome),
    /// Admitted.
    Run(Box<Ready>),
    /// Its first attempt must wait for the limits (until `expires_at`).
    Wait(Waiting, Option<DateTime<Utc>>),
}

/// An admitted event, parsed and rendered.
struct Ready {
    event: ActionEvent,
    def: Arc<ActionDefinition>,
    request: RenderedRequest,
    first: Admitted,
}

fn start(dispatcher: &Dispatcher, value: Option<&[u8]>, who: &mut Identity) -> Start {
    let (event, def, request) = match prepared(dispatcher, value, who) {
        Ok(prepared) => prepared,
        Err(outcome) => return Start::Done(outcome),
    };
    match dispatcher.try_admit(&def) {
        Admission::Ready(first) => Start::Run(Box::new(Ready {
            event,
            def,
            request,
            first,
        })),
        Admission::Refused(outcome) => {
            *who = Identity::from_event(event);
            Start::Done(outcome)
        }
        Admission::Wait(waiting) => {
            let deadline = event.deadline;
            *who = Identity::from_event(event);
            Start::Wait(waiting, deadline)
        }
    }
}

/// An event admitted after waiting, parsed and rendered again: the same
/// bytes give the same request (unless a reload changed the action).
fn restart(
    dispatcher: &Dispatcher,
    value: Option<&[u8]>,
    first: Admitted,
) -> Result<Box<Ready>, Outcome> {
    let (event, def, request) = prepared(dispatcher, value, &mut Identity::default())?;
    Ok(Box::new(Ready {
        event,
        def,
        request,
        first,
    }))
}

/// The record's event, parsed, checked and rendered; on failure, `who` it
/// is for, as far as the record says.
fn prepared(
    dispatcher: &Dispatcher,
    value: Option<&[u8]>,
    who: &mut Identity,
) -> Result<(ActionEvent, Arc<ActionDefinition>, RenderedRequest), Outcome> {
    let value = value
        .ok_or_else(|| Outcome::early(OutcomeCode::InvalidEvent, "the record has no value"))?;
    let event = ActionEvent::from_slice(value).map_err(|invalid| {
        *who = Identity::of_invalid(&invalid);
        Outcome::early(OutcomeCode::InvalidEvent, invalid.reason)
    })?;
    match dispatcher.prepare(&event) {
        Ok((def, request)) => Ok((event, def, request)),
        Err(outcome) => {
            *who = Identity::from_event(event);
            Err(outcome)
        }
    }
}

/// The outcome, and the event back. Boxed: only admitted events carry the
/// calls' state.
async fn run(dispatcher: &Dispatcher, ready: Box<Ready>) -> (Outcome, ActionEvent) {
    Box::pin(async move {
        let Ready {
            event,
            def,
            request,
            first,
        } = *ready;
        let outcome = dispatcher.run(&def, &request, &event, first).await;
        (outcome, event)
    })
    .await
}

/// The records an outcome produces: its result (when there is a results
/// topic) and, for a failure, its dead letter.
fn outputs(
    ctx: &JobContext,
    record: &Record,
    event: &Arc<Delivering>,
    decided: &Decided,
) -> Vec<Delivery> {
    let delivery = |output, value, headers| Delivery {
        event: event.clone(),
        output,
        key: record.key.clone(),
        value,
        headers,
        backoff: FIRST_PRODUCE_BACKOFF,
    };
    let mut deliveries = Vec::with_capacity(2);
    if ctx.results_topic.is_some() {
        // The same duration as the metrics' (decide measured it).
        let elapsed_ms = decided.took.as_secs_f64() * 1000.0;
        if let Some(value) = records::result_value(&decided.who, &decided.outcome, elapsed_ms) {
            deliveries.push(delivery(Output::Result, Some(Bytes::from(value)), None));
        }
    }
    if decided.outcome.code.is_failure() {
        let source = Source {
            topic: &ctx.input_topic,
            partition: record.partition,
            offset: record.offset,
        };
        let mut headers = OwnedHeaders::new();
        for (name, value) in records::dlq_headers(&decided.who, &decided.outcome, source) {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_str()),
            });
        }
        let output = Output::DeadLetter(decided.outcome.code);
        deliveries.push(delivery(output, record.value.clone(), Some(headers)));
    }
    deliveries
}

impl JobContext {
    fn topic(&self, output: Output) -> &str {
        match output {
            Output::Result => self.results_topic.as_deref().unwrap_or_default(),
            Output::DeadLetter(_) => &self.dlq_topic,
        }
    }
}

/// Enqueues one record in the producer; its delivery report, or the failure
/// to enqueue it, goes to the consume loop.
fn produce(ctx: &JobContext, delivery: Box<Delivery>) {
    let topic = ctx.topic(delivery.output);
    // The record borrows these while the delivery moves into it.
    let (key, value, headers) = (
        delivery.key.clone(),
        delivery.value.clone(),
        delivery.headers.clone(),
    );
    let mut record = BaseRecord::<[u8], [u8], Box<Delivery>>::with_opaque_to(topic, delivery);
    if let Some(k) = key.as_deref() {
        record = record.key(k);
    }
    if let Some(v) = value.as_deref() {
        record = record.payload(v);
    }
    if let Some(h) = headers {
        record = record.headers(h);
    }
    if let Err((e, record)) = ctx.producer.send(record) {
        let _ = ctx
            .reports
            .send(Report::Failed(record.delivery_opaque, e.to_string()));
    }
}

/// Fetches the metadata of the output topics while the consumer joins its
/// group, and says early when one is missing (instead of at the first event).
fn warm_up(producer: Arc<OutputProducer>, topics: Vec<String>) {
    for topic in topics {
        let metadata = producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(5));
        match metadata {
            Ok(m) => {
                let errors: Vec<_> = m.topics().iter().filter_map(|t| t.error()).collect();
                if !errors.is_empty() {
                    tracing::warn!(
                        topic,
                        ?errors,
                        "output topic not available yet; its records will wait for it"
                    )
                }
            }
            Err(e) => tracing::warn!(topic, error = %e, "no metadata for an output topic yet"),
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
        // How long a broker may hold a fetch that finds nothing. A real
        // broker answers as soon as records arrive, so this only sets how
        // often an idle consumer asks (~100 fetches/s per broker); brokers
        // that hold the fetch for the whole wait (librdkafka's mock cluster)
        // deliver in bursts of this length (see BENCHMARKS.md).
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Tells `ended` when it is dropped, after `hold` lets it go.
    struct Held {
        hold: Mutex<mpsc::Receiver<()>>,
        ended: mpsc::Sender<()>,
    }

    impl Drop for Held {
        fn drop(&mut self) {
            if let Ok(hold) = self.hold.lock() {
                let _ = hold.recv();
            }
            let _ = self.ended.send(());
        }
    }

    fn held() -> (Held, mpsc::Sender<()>, mpsc::Receiver<()>) {
        let (release, hold) = mpsc::channel();
        let (ended, dropped) = mpsc::channel();
        let value = Held {
            hold: Mutex::new(hold),
            ended,
        };
        (value, release, dropped)
    }

    #[test]
    fn the_last_partition_read_is_not_held_back() {
        // At its share of the window, a partition is held back while others are read.
        assert!(holds_back(4, 4, 6, 0));
        assert!(holds_back(9, 4, 6, 4));
        assert!(!holds_back(3, 4, 6, 0));
        // Not the last one read: five of six are held back already.
        assert!(!holds_back(4, 4, 6, 5));
        assert!(!holds_back(100, 4, 6, 5));
        // A single partition is never held back.
        assert!(!holds_back(1_000, 4, 1, 0));
    }

    #[tokio::test]
    async fn a_drop_that_ends_is_waited_for() {
        let (value, release, dropped) = held();
        release.send(()).expect("release");
        assert!(drop_within(value, Duration::from_secs(30)).await);
        dropped
            .try_recv()
            .expect("dropped before drop_within returned");
    }

    #[tokio::test]
    async fn a_drop_that_blocks_is_left_after_the_wait() {
        let (value, release, dropped) = held();
        let returned = tokio::time::timeout(
            Duration::from_secs(30),
            drop_within(value, Duration::from_millis(50)),
        )
        .await;
        assert_eq!(
            returned,
            Ok(false),
            "returned, and said the drop had not ended"
        );
        assert!(dropped.try_recv().is_err(), "the drop is still held");
        // The thread is left to it: released, the drop ends there.
        release.send(()).expect("release");
        dropped
            .recv_timeout(Duration::from_secs(30))
            .expect("the left drop ends once released");
    }
}
