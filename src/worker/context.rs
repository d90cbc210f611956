//! The consumer context: rebalance callbacks and statistics.
//!
//! librdkafka calls these from inside `recv()` on the worker's own task, so
//! the partition table they share with the consume loop is a plain mutex that
//! is never held across an `.await`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use foldhash::HashMap;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::offsets::OffsetTracker;
use crate::telemetry::Metrics;

/// The worker's view of one assigned partition.
#[derive(Debug)]
pub struct PartitionState {
    /// Distinguishes this assignment from an earlier one of the same partition.
    pub epoch: u64,
    pub tracker: OffsetTracker,
    /// The last position committed (or being committed).
    pub committed: Option<i64>,
    /// Cancelled when the partition is revoked: its work is abandoned.
    pub cancel: CancellationToken,
}

/// State shared by the consume loop and the rebalance callbacks.
pub struct Shared {
    pub topic: String,
    partitions: Mutex<HashMap<i32, PartitionState>>,
    next_epoch: AtomicU64,
    /// Set once the consumer has joined its group (first assignment).
    pub ready: Arc<AtomicBool>,
    /// Set on every assignment: new partitions start unpaused.
    pub assigned: AtomicBool,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn new(topic: String, ready: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Shared {
        Shared {
            topic,
            partitions: Mutex::new(HashMap::default()),
            next_epoch: AtomicU64::new(1),
            ready,
            assigned: AtomicBool::new(false),
            metrics,
        }
    }

    pub fn partitions(&self) -> MutexGuard<'_, HashMap<i32, PartitionState>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The positions that moved since the last commit, marked as committed.
    /// A final commit (`all`) lists every position: the result of an earlier
    /// asynchronous commit may not have been reported yet.
    pub fn commit_list(&self, only: Option<&[i32]>, all: bool) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (&partition, state) in self.partitions().iter_mut() {
            if only.is_some_and(|o| !o.contains(&partition)) {
                continue;
            }
            if let Some(position) = state.tracker.committable() {
                if all || state.committed != Some(position) {
                    let _ =
                        list.add_partition_offset(&self.topic, partition, Offset::Offset(position));
                    state.committed = Some(position);
                }
            }
        }
        list
    }

    /// Cancels the work of every partition (shutdown after the grace period).
    pub fn abandon_all(&self) {
        for state in self.partitions().values() {
            state.cancel.cancel();
        }
    }
}

pub struct WorkerContext {
    pub shared: Arc<Shared>,
}

impl ClientContext for WorkerContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.shared.topic) else {
            return;
        };
        for (id, p) in &topic.partitions {
            if *id >= 0 && p.consumer_lag >= 0 {
                self.shared
                    .metrics
                    .consumer_lag
                    .with_label_values(&[&id.to_string()])
                    .set(p.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        // A pause by the application outlives the assignment in librdkafka:
        // a partition paused now (backpressure, its own backlog) would still
        // be paused, and never read, if it were assigned to us again. The
        // rebalance keeps it from fetching until it is unassigned anyway.
        if let Err(e) = consumer.resume(revoked) {
            tracing::warn!(error = %e, "resuming revoked partitions failed");
        }
        // Commit what is final, then forget the partitions: work that finishes
        // after this point is never committed by this worker.
        let ids: Vec<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        let list = self.shared.commit_list(Some(&ids), true);
        {
            let mut partitions = self.shared.partitions();
            for id in &ids {
                if let Some(state) = partitions.remove(id) {
                    state.cancel.cancel();
                }
                self.shared
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[&id.to_string()])
                    .ok();
            }
        }
        if list.count() > 0 {
            let positions: Vec<(i32, i64)> = list
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
                .collect();
            match consumer.commit(&list, CommitMode::Sync) {
                Ok(()) => tracing::info!(?positions, "revoked; committed final offsets"),
                Err(e) => {
                    tracing::warn!(partitions = ?ids, error = %e, "revoked; final commit failed")
                }
            }
        } else {
            tracing::info!(partitions = ?ids, "revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                let mut partitions = self.shared.partitions();
                for e in assigned.elements() {
                    partitions
                        .entry(e.partition())
                        .or_insert_with(|| PartitionState {
                            epoch: self.shared.next_epoch.fetch_add(1, Ordering::Relaxed),
                            tracker: OffsetTracker::default(),
                            committed: None,
                            cancel: CancellationToken::new(),
                        });
                }
                let ids: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?ids, "assigned");
                self.shared.assigned.store(true, Ordering::Relaxed);
                self.shared.ready.store(true, Ordering::Relaxed);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; will retry");
            // Forget what we thought was committed so the next tick sends it again.
            let mut partitions = self.shared.partitions();
            for e in offsets.elements() {
                if let Some(state) = partitions.get_mut(&e.partition()) {
                    state.committed = None;
                }
            }
        }
    }
}
