//! The benchmark's HTTP sink: a minimal HTTP/1.1 server that answers every
//! call with 200 and a small JSON body, after an optional latency. It runs in
//! a process of its own (`journey-actions bench-sink`, hidden) so its CPU is
//! not counted as the worker's.

use std::collections::BinaryHeap;
use std::convert::Infallible;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::Rng;

/// How long the sink waits before answering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    Fixed(Duration),
    /// Uniformly random within the bounds.
    Uniform(Duration, Duration),
}

impl Latency {
    pub fn mean(&self) -> Duration {
        match *self {
            Latency::Fixed(d) => d,
            Latency::Uniform(a, b) => (a + b) / 2,
        }
    }

    fn sample(&self) -> Duration {
        match *self {
            Latency::Fixed(d) => d,
            Latency::Uniform(a, b) => rand::rng().random_range(a..=b),
        }
    }
}

impl FromStr for Latency {
    type Err = String;

    /// `0ms`, `5ms`, or a range `1-20ms` / `1ms-20ms`.
    fn from_str(text: &str) -> Result<Latency, String> {
        let parse = |t: &str| crate::units::parse_duration(t);
        match text.split_once('-') {
            None => parse(text).map(Latency::Fixed),
            Some((low, high)) => {
                let high_d = parse(high)?;
                let unit: String = high
                    .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.')
                    .to_string();
                let low_d = parse(low).or_else(|_| parse(&format!("{low}{unit}")))?;
                if low_d > high_d {
                    return Err(format!("`{text}`: the low bound is above the high bound"));
                }
                Ok(Latency::Uniform(low_d, high_d))
            }
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Latency::Fixed(d) => write!(f, "{}ms", d.as_millis()),
            Latency::Uniform(a, b) => write!(f, "{}-{}ms", a.as_millis(), b.as_millis()),
        }
    }
}

const TOKEN_BODY: &str = r#"{"access_token":"bench-token","token_type":"Bearer","expires_in":3600,"data":{"jwt":"bench-token","expiresIn":3600}}"#;
const OK_BODY: &str = r#"{"ok":true,"id":"bench"}"#;

/// The hidden `bench-sink` role: serve on a free loopback port, print
/// `listening ADDR`, and exit when stdin closes (the parent is gone).
pub fn run_process(latency: Latency, threads: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let timer = Timer::start();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        std::thread::spawn(|| {
            let _ = std::io::stdin().lock().lines().count();
            std::process::exit(0);
        });
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let timer = timer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    answer(req, latency, timer.clone())
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    latency: Latency,
    timer: Timer,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let arrived = Instant::now();
    let token = req.uri().path().ends_with("/token");
    let _ = req.into_body().collect().await;
    let wait = latency.sample();
    if !wait.is_zero() {
        timer.sleep_until(arrived + wait).await;
    }
    let body = if token { TOKEN_BODY } else { OK_BODY };
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_default())
}

/// Wakes waiters at their deadline to within the kernel's timer slack
/// (~50 µs). tokio's timer wheel has 1 ms ticks and rounds every sleep up to
/// the next one, so a `5ms` sink answered in 5.5–6.3 ms and that surplus was
/// counted as the worker's added latency.
#[derive(Clone)]
struct Timer(Arc<(Mutex<BinaryHeap<Waiter>>, Condvar)>);

struct Waiter {
    at: Instant,
    wake: tokio::sync::oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    /// Reversed: the heap's top is the earliest deadline.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at)
    }
}

impl Timer {
    fn start() -> Timer {
        let timer = Timer(Arc::new((Mutex::new(BinaryHeap::new()), Condvar::new())));
        let shared = timer.0.clone();
        std::thread::spawn(move || {
            let (heap, changed) = &*shared;
            let mut waiting = heap.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let now = Instant::now();
                while waiting.peek().is_some_and(|w| w.at <= now) {
                    if let Some(due) = waiting.pop() {
                        let _ = due.wake.send(());
                    }
                }
                waiting = match waiting.peek().map(|w| w.at - now) {
                    Some(left) => changed
                        .wait_timeout(waiting, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0),
                    None => changed.wait(waiting).unwrap_or_else(|e| e.into_inner()),
                };
            }
        });
        timer
    }

    async fn sleep_until(&self, at: Instant) {
        let (wake, woken) = tokio::sync::oneshot::channel();
        {
            let (heap, changed) = &*self.0;
            let mut waiting = heap.lock().unwrap_or_else(|e| e.into_inner());
            let earliest = waiting.peek().is_none_or(|w| at < w.at);
            waiting.push(Waiter { at, wake });
            if earliest {
                changed.notify_one();
            }
        }
        let _ = woken.await;
    }
}

/// A sink process; killed when dropped.
pub struct SinkProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl SinkProcess {
    pub fn start(latency: Latency) -> anyhow::Result<SinkProcess> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["-q", "bench-sink", "--latency", &latency.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("sink has no stdout"))?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("the sink did not start: `{}`", line.trim()))?;
        Ok(SinkProcess { child, addr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_parse() {
        assert_eq!("0ms".parse(), Ok(Latency::Fixed(Duration::ZERO)));
        assert_eq!("5ms".parse(), Ok(Latency::Fixed(Duration::from_millis(5))));
        let range = Latency::Uniform(Duration::from_millis(1), Duration::from_millis(20));
        assert_eq!("1-20ms".parse(), Ok(range));
        assert_eq!("1ms-20ms".parse(), Ok(range));
        assert_eq!(range.mean(), Duration::from_micros(10_500));
        assert!("20-1ms".parse::<Latency>().is_err());
        assert!("fast".parse::<Latency>().is_err());
    }
}
