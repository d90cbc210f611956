//! Where this process's CPU goes during a phase, by kind of thread: the
//! async runtime's (the worker's tasks, or limit A's calls), the Kafka
//! clients' (librdkafka's broker and main threads, the threads that serve
//! the producers' delivery reports), the in-process mock broker's, and the
//! rest.
//!
//! Read from `/proc/self/task/TID/schedstat` (time on a CPU, in
//! nanoseconds) and `comm` (the thread's name) at the start and the end of
//! a phase.

use std::collections::HashMap;

use serde::Serialize;

/// The kinds of thread, told apart by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// tokio's worker and blocking threads (`tokio-rt-worker`).
    Runtime,
    /// librdkafka's threads of the worker's (or the phase's) consumer and
    /// producer (`rdk:main`, `rdk:brokerN`), the worker's delivery report
    /// thread (`ja-deliveries`), and rdkafka's `producer polling thread` of
    /// bench's own producers (names are cut at 15 bytes).
    KafkaClient,
    /// librdkafka's mock cluster (`rdk:mock`), when bench runs on it.
    MockBroker,
    Other,
}

impl Kind {
    fn of(name: &str) -> Kind {
        if name.starts_with("tokio-rt-worker") {
            Kind::Runtime
        } else if name.starts_with("rdk:mock") {
            Kind::MockBroker
        } else if name.starts_with("rdk:")
            || name.starts_with("producer pollin")
            || name == crate::worker::producer::THREAD_NAME
        {
            Kind::KafkaClient
        } else {
            Kind::Other
        }
    }
}

/// Each live thread's kind and CPU time (ns) at one moment.
pub struct Threads(HashMap<u32, (Kind, u64)>);

impl Threads {
    /// Every thread of this process now; empty where `/proc` cannot say.
    pub fn read() -> Threads {
        let mut threads = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return Threads(threads);
        };
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let path = entry.path();
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let on_cpu = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok());
            if let Some(ns) = on_cpu {
                threads.insert(tid, (Kind::of(name.trim_end()), ns));
            }
        }
        Threads(threads)
    }

    /// CPU seconds by kind from `self` to `now`. `process_seconds` is the
    /// whole process's CPU over the same span (getrusage): what the threads
    /// alive at `now` do not account for (threads that ended meanwhile)
    /// goes to `other`.
    pub fn until(&self, now: &Threads, process_seconds: f64) -> ByThread {
        let mut by = ByThread::default();
        for (tid, (kind, ns)) in &now.0 {
            let before = self.0.get(tid).map_or(0, |(_, ns)| *ns);
            let seconds = ns.saturating_sub(before) as f64 / 1e9;
            match kind {
                Kind::Runtime => by.runtime += seconds,
                Kind::KafkaClient => by.kafka_clients += seconds,
                Kind::MockBroker => by.mock_broker += seconds,
                Kind::Other => by.other += seconds,
            }
        }
        by.other += (process_seconds - by.total()).max(0.0);
        by
    }
}

/// CPU by kind of thread: seconds for a phase, or (after [`ByThread::per_op`])
/// µs per event or call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ByThread {
    /// The async runtime's threads: the worker's tasks (consume loop,
    /// events, HTTP connections), or limit A's calls.
    pub runtime: f64,
    /// librdkafka's threads of the phase's consumer and producer, and
    /// the threads that serve their delivery reports.
    pub kafka_clients: f64,
    /// The in-process mock cluster's thread (0 with `--brokers`).
    pub mock_broker: f64,
    /// Every other thread, and threads that ended during the phase.
    pub other: f64,
}

impl ByThread {
    /// Seconds for `count` operations as µs per operation.
    pub fn per_op(self, count: usize) -> ByThread {
        let k = 1e6 / count.max(1) as f64;
        ByThread {
            runtime: self.runtime * k,
            kafka_clients: self.kafka_clients * k,
            mock_broker: self.mock_broker * k,
            other: self.other * k,
        }
    }

    pub fn total(&self) -> f64 {
        self.runtime + self.kafka_clients + self.mock_broker + self.other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_told_apart_by_name() {
        assert_eq!(Kind::of("tokio-rt-worker"), Kind::Runtime);
        assert_eq!(Kind::of("rdk:broker1"), Kind::KafkaClient);
        assert_eq!(Kind::of("rdk:main"), Kind::KafkaClient);
        assert_eq!(Kind::of("producer pollin"), Kind::KafkaClient);
        assert_eq!(Kind::of("ja-deliveries"), Kind::KafkaClient);
        assert_eq!(Kind::of("rdk:mock"), Kind::MockBroker);
        assert_eq!(Kind::of("journey-actions"), Kind::Other);
    }

    /// Spins until this thread has had `ms` of CPU (not of wall time: a
    /// loaded machine only makes it take longer).
    fn spin_cpu(ms: u64) {
        let on_cpu = || {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime only writes the struct it is given.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
            t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
        };
        let until = on_cpu() + ms * 1_000_000;
        let mut x = 0u64;
        while on_cpu() < until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    #[test]
    fn a_thread_is_counted_under_its_kind_and_an_ended_one_under_other() {
        let before = Threads::read();
        let process_before = super::super::cpu_seconds();
        // Ends before the phase does: its time comes back only through the
        // process total, as `other`. 60 ms each, checked against 50: the
        // readings may lag by a scheduler tick.
        std::thread::Builder::new()
            .name("rdk:broker7".into())
            .spawn(|| spin_cpu(60))
            .unwrap()
            .join()
            .unwrap();
        // Still alive when the phase ends.
        let (spun_tx, spun) = std::sync::mpsc::channel::<()>();
        let (end, end_rx) = std::sync::mpsc::channel::<()>();
        let alive = std::thread::Builder::new()
            .name("rdk:mock".into())
            .spawn(move || {
                spin_cpu(60);
                spun_tx.send(()).unwrap();
                end_rx.recv().ok();
            })
            .unwrap();
        spun.recv().unwrap();
        let by = before.until(
            &Threads::read(),
            super::super::cpu_seconds() - process_before,
        );
        end.send(()).unwrap();
        alive.join().unwrap();
        assert!(by.mock_broker >= 0.05, "{by:?}");
        // No Kafka client runs in this test binary; the ended thread's 60 ms
        // are in `other` (asked for 50: a scheduler tick of slack).
        assert_eq!(by.kafka_clients, 0.0, "{by:?}");
        assert!(by.other >= 0.05, "{by:?}");
        let per = by.per_op(1000);
        assert!((per.total() - by.total() * 1000.0).abs() < 1e-6);
    }
}
