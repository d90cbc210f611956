//! The output producer: rdkafka's `BaseProducer` with a thread of its own
//! that serves delivery reports, and sleeps while there are none.
//!
//! rdkafka's `ThreadedProducer` polls in a loop of 100 ms deadlines, and
//! each deadline ends in a spin: once less than a millisecond is left, the
//! timeout passed to librdkafka rounds down to 0 ms, so the thread polls
//! without waiting until the deadline passes (up to 1 ms of every 100 ms).
//! An idle worker spent 91 ms of CPU per 10 s in that thread, 9 times all its
//! other threads together. Here the thread asks librdkafka to call it back
//! when the producer's event queue goes from empty to not empty
//! (`rd_kafka_queue_cb_event_enable`, as rdkafka's stream consumer does for
//! its wakers), drains the queue without waiting, and parks until the next
//! call back (or [`IDLE_CHECK`], a safety net).

use std::ffi::c_void;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::producer::{BaseProducer, ProducerContext};

/// The longest the thread sleeps without a call back: a wake-up that could
/// be missed costs at most this much delay, not a lost report.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// The polling thread's name (bench counts its CPU with the Kafka clients').
pub const THREAD_NAME: &str = "ja-deliveries";

/// A `BaseProducer` whose delivery reports are served by a thread of its
/// own. Derefs to the producer; dropping it stops the thread first.
pub struct PolledProducer<C: ProducerContext + 'static> {
    producer: Arc<BaseProducer<C>>,
    poller: Arc<Poller>,
    thread: Option<JoinHandle<()>>,
}

/// What the producer and its thread share.
#[derive(Default)]
struct Poller {
    stop: AtomicBool,
    /// How many times the thread woke up and looked at the queue.
    turns: AtomicU64,
}

impl<C: ProducerContext + 'static> PolledProducer<C> {
    pub fn new(producer: BaseProducer<C>) -> std::io::Result<PolledProducer<C>> {
        Self::with_idle_check(producer, IDLE_CHECK)
    }

    fn with_idle_check(
        producer: BaseProducer<C>,
        idle_check: Duration,
    ) -> std::io::Result<PolledProducer<C>> {
        let producer = Arc::new(producer);
        let poller = Arc::new(Poller::default());
        let thread = {
            let producer = producer.clone();
            let poller = poller.clone();
            std::thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn(move || serve(&producer, &poller, idle_check))?
        };
        Ok(PolledProducer {
            producer,
            poller,
            thread: Some(thread),
        })
    }

    /// How many times the delivery report thread has looked at the queue.
    #[cfg(test)]
    fn turns(&self) -> u64 {
        self.poller.turns.load(Ordering::Relaxed)
    }
}

impl<C: ProducerContext + 'static> Deref for PolledProducer<C> {
    type Target = BaseProducer<C>;

    fn deref(&self) -> &BaseProducer<C> {
        &self.producer
    }
}

impl<C: ProducerContext + 'static> Drop for PolledProducer<C> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.poller.stop.store(true, Ordering::Release);
            thread.thread().unpark();
            if thread.join().is_err() {
                tracing::warn!("the delivery report thread panicked");
            }
        }
        // The producer itself goes next (rdkafka purges and flushes it).
    }
}

/// The producer's event queue (its main queue), with the call back enabled
/// for as long as this lives. The call back is set on this queue itself:
/// were it forwarded to another (librdkafka forwards a consumer's main
/// queue, never a producer's), only the safety net would wake the thread.
struct Queue {
    queue: *mut rd::rd_kafka_queue_t,
    /// The thread to unpark, owned here, read by librdkafka's threads.
    waker: *mut Thread,
}

impl Queue {
    fn new<C: ProducerContext>(producer: &BaseProducer<C>) -> Queue {
        use rdkafka::producer::Producer as _;
        let waker = Box::into_raw(Box::new(std::thread::current()));
        // SAFETY: the client pointer is valid while `producer` lives, which
        // outlives this queue (both are in `serve`); the reference taken here
        // is given back in `drop`, after the call back is disabled, and only
        // then is `waker` freed.
        let queue = unsafe {
            let queue = rd::rd_kafka_queue_get_main(producer.client().native_ptr());
            rd::rd_kafka_queue_cb_event_enable(queue, Some(wake), waker.cast());
            queue
        };
        Queue { queue, waker }
    }

    fn len(&self) -> usize {
        // SAFETY: the queue reference is held until drop.
        unsafe { rd::rd_kafka_queue_length(self.queue) }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: disabling takes the queue's lock, under which librdkafka
        // calls `wake`: once it returns, no call back can read `waker`.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.queue, None, std::ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.queue);
            drop(Box::from_raw(self.waker));
        }
    }
}

/// Called by librdkafka (under the queue's lock) when an event is enqueued
/// on the empty queue: only unparks the polling thread.
unsafe extern "C" fn wake(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Thread` that `Queue` owns and frees only after
    // disabling this call back.
    let thread = unsafe { &*opaque.cast::<Thread>() };
    thread.unpark();
}

/// The polling thread: serve every queued event (a delivery report calls the
/// context's `delivery`) without waiting, then park until the queue gets
/// one. An event enqueued between the emptiness check and `park` unparks
/// first, and `park` then returns at once.
///
/// A delivery callback that panics loses its record's report (its event is
/// never final, and its partition's offset stops there), but not the thread:
/// the other reports keep coming, and the panic is logged.
fn serve<C: ProducerContext>(producer: &BaseProducer<C>, poller: &Poller, idle_check: Duration) {
    let queue = Queue::new(producer);
    loop {
        poller.turns.fetch_add(1, Ordering::Relaxed);
        while queue.len() > 0 {
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                producer.poll(Duration::ZERO)
            }));
            if served.is_err() {
                tracing::error!("a delivery report callback panicked; its report is lost");
            }
        }
        if poller.stop.load(Ordering::Acquire) {
            break;
        }
        std::thread::park_timeout(idle_check);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext};
    use rdkafka::ClientContext;
    use std::sync::mpsc;

    /// Sends each report's offset (or error) on a channel; with `panics`,
    /// the first report's callback panics instead.
    struct Reports {
        sent: mpsc::Sender<Result<i64, String>>,
        panics: AtomicBool,
    }

    impl ClientContext for Reports {}

    impl ProducerContext for Reports {
        type DeliveryOpaque = ();

        fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
            if self.panics.swap(false, Ordering::Relaxed) {
                panic!("the first report panics (a test)");
            }
            let report = match result {
                Ok(m) => Ok(rdkafka::Message::offset(m)),
                Err((e, _)) => Err(e.to_string()),
            };
            let _ = self.sent.send(report);
        }
    }

    /// A producer on a fresh mock cluster whose thread only the call back
    /// can wake (its safety net is an hour away), and its reports.
    fn producer(
        cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        panics: bool,
    ) -> (PolledProducer<Reports>, mpsc::Receiver<Result<i64, String>>) {
        let (sent, reports) = mpsc::channel();
        let producer: BaseProducer<Reports> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("linger.ms", "0")
            .create_with_context(Reports {
                sent,
                panics: AtomicBool::new(panics),
            })
            .expect("producer");
        let producer =
            PolledProducer::with_idle_check(producer, Duration::from_secs(3600)).expect("thread");
        (producer, reports)
    }

    fn send(producer: &PolledProducer<Reports>) {
        producer
            .send(BaseRecord::<str, str>::to("t").partition(0).payload("x"))
            .expect("enqueued");
    }

    /// Only the call back can wake the thread here (its safety net is an
    /// hour away), so a report that arrives after the thread went idle shows
    /// that librdkafka's call back woke it; and an idle thread parks instead
    /// of polling in a loop (rdkafka's `ThreadedProducer` polls without
    /// waiting through the last millisecond of each of its 100 ms polls).
    #[test]
    fn reports_wake_the_parked_thread_and_idle_costs_no_turns() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let (producer, reports) = producer(&cluster, false);
        for round in 0..3 {
            // Idle: the thread has parked (or parks now) and stays parked.
            std::thread::sleep(Duration::from_millis(300));
            let before = producer.turns();
            std::thread::sleep(Duration::from_millis(300));
            // (`park` may return spuriously, rarely: a spin would be thousands.)
            let idle_turns = producer.turns() - before;
            assert!(
                idle_turns <= 2,
                "round {round}: {idle_turns} turns while idle"
            );
            send(&producer);
            let offset = reports
                .recv_timeout(Duration::from_secs(30))
                .expect("a delivery report");
            assert_eq!(offset, Ok(round), "round {round}");
        }
        // Dropping stops the parked thread (its safety net would take an hour).
        let (done, dropped) = mpsc::channel();
        std::thread::spawn(move || {
            drop(producer);
            let _ = done.send(());
        });
        dropped
            .recv_timeout(Duration::from_secs(30))
            .expect("the producer's drop returns");
    }

    #[test]
    fn a_panicking_callback_loses_its_report_not_the_thread() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let (producer, reports) = producer(&cluster, true);
        send(&producer);
        // The first report's callback panics: nothing comes. (The second
        // record is sent after this wait, so that the two reports do not
        // come in one event, which the panic would cut short.)
        assert!(reports.recv_timeout(Duration::from_secs(2)).is_err());
        send(&producer);
        let got = reports.recv_timeout(Duration::from_secs(30));
        assert_eq!(got, Ok(Ok(1)), "the second report after the panic");
    }
}
