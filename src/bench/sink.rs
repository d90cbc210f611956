//! The benchmark's HTTP sink: a minimal server that answers every call with
//! 200 and a small JSON body, after an optional latency. It speaks HTTP/1.1,
//! HTTP/1.1 over TLS, or HTTP/2 over TLS (negotiated by ALPN, as HTTP/2
//! providers serve it). It runs in a process of its own
//! (`journey-actions bench-sink`, hidden) so its CPU is not counted as the
//! worker's.

use std::collections::BinaryHeap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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

/// What the sink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 without TLS.
    Http,
    /// HTTP/1.1 over TLS.
    Https,
    /// HTTP/2 over TLS, chosen by ALPN (how providers serve HTTP/2).
    H2,
}

impl Protocol {
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https | Protocol::H2 => "https",
        }
    }

    fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            Protocol::Http | Protocol::Https => vec![b"http/1.1".to_vec()],
            // h2 first: the server's order decides, and every client that
            // offers h2 gets it; one that offers only HTTP/1.1 still works.
            Protocol::H2 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }
}

impl std::fmt::Display for Protocol {
    /// The name `--sink-protocol` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum as _;
        let value = self.to_possible_value().ok_or(std::fmt::Error)?;
        f.write_str(value.get_name())
    }
}

/// A private CA and the sink's certificate for 127.0.0.1, as PEM files in
/// one directory: `ca.pem` is what the bench's actions trust
/// (`tls.ca_cert`), `sink.pem` and `sink.key` what the sink serves.
pub struct Certificates {
    pub ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Certificates {
    pub fn create(dir: &Path) -> anyhow::Result<Certificates> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "journey-actions bench CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "journey-actions bench sink");
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let files = Certificates {
            ca: dir.join("ca.pem"),
            cert: dir.join("sink.pem"),
            key: dir.join("sink.key"),
        };
        std::fs::write(&files.ca, ca.pem())?;
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}

fn acceptor(
    protocol: Protocol,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = protocol.alpn();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

const TOKEN_BODY: &str = r#"{"access_token":"bench-token","token_type":"Bearer","expires_in":3600,"data":{"jwt":"bench-token","expiresIn":3600}}"#;
const OK_BODY: &str = r#"{"ok":true,"id":"bench"}"#;

/// The hidden `bench-sink` role: serve on a free loopback port, print
/// `listening ADDR`, and exit when stdin closes (the parent is gone). Each
/// line read on stdin is answered on stdout with `connections N`: the
/// connections accepted so far.
/// `tls` is the certificate and key files, required unless `protocol` is
/// plain HTTP.
pub fn run_process(
    latency: Latency,
    threads: usize,
    protocol: Protocol,
    tls: Option<(&Path, &Path)>,
) -> anyhow::Result<()> {
    let acceptor = match (protocol, tls) {
        (Protocol::Http, _) => None,
        (_, Some((cert, key))) => Some(acceptor(protocol, cert, key)?),
        (_, None) => anyhow::bail!("--protocol {protocol} needs --tls-cert and --tls-key"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let timer = Timer::start();
    runtime.block_on(async move {
        // A burst of new connections (a worker starting with `max_in_flight`
        // calls at once) must not overflow the accept queue: tokio's default
        // backlog of 1 024 did, and each dropped connection waited for the
        // kernel's 1 s retransmission. The kernel caps it at somaxconn.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        println!("listening {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        std::thread::spawn(|| {
            for _ in std::io::stdin().lock().lines() {
                println!("connections {}", ACCEPTED.load(AtomicOrdering::Relaxed));
                let _ = std::io::stdout().flush();
            }
            std::process::exit(0);
        });
        loop {
            let (stream, _) = listener.accept().await?;
            ACCEPTED.fetch_add(1, AtomicOrdering::Relaxed);
            let _ = stream.set_nodelay(true);
            let timer = timer.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Some(acceptor) = acceptor else {
                    return serve(stream, false, latency, timer).await;
                };
                let stream = match acceptor.accept(stream).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        // Once: a client that does not trust the bench's CA
                        // fails every handshake.
                        if !HANDSHAKE_FAILED.swap(true, AtomicOrdering::Relaxed) {
                            eprintln!("bench-sink: a TLS handshake failed: {e}");
                        }
                        return;
                    }
                };
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                serve(stream, h2, latency, timer).await;
            });
        }
    })
}

/// Serves one connection's calls: over HTTP/2 when ALPN chose it (`h2`),
/// else over HTTP/1.1.
async fn serve<S>(stream: S, h2: bool, latency: Latency, timer: Timer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        service_fn(move |req: Request<hyper::body::Incoming>| answer(req, latency, timer.clone()));
    let io = TokioIo::new(stream);
    let _ = if h2 {
        // No limit on concurrent streams: the worker's concurrency, not
        // the sink, decides how many calls run.
        http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(None)
            .serve_connection(io, service)
            .await
    } else {
        http1::Builder::new().serve_connection(io, service).await
    };
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

/// Wakes waiters at their deadline, with a timer slack of 1 ns instead of
/// the default 50 µs (which made a `5ms` call ~35 µs longer on average).
/// tokio's timer wheel has 1 ms ticks and rounds every sleep up to the next
/// one, so a `5ms` sink answered in 5.5–6.3 ms and that surplus was counted
/// as the worker's added latency.
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
            // The kernel may wake a timed wait up to the thread's timer
            // slack late (50 µs by default): 1 ns asks for the deadline.
            // SAFETY: PR_SET_TIMERSLACK takes one integer argument and
            // changes only this thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
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

/// The sink's accept queue (see `run_process`).
const LISTEN_BACKLOG: u32 = 16_384;

/// Connections the sink has accepted.
static ACCEPTED: AtomicUsize = AtomicUsize::new(0);
/// Whether a TLS handshake has failed (reported once).
static HANDSHAKE_FAILED: AtomicBool = AtomicBool::new(false);

/// A sink process; killed when dropped.
pub struct SinkProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub addr: SocketAddr,
}

impl SinkProcess {
    /// `tls` is needed unless `protocol` is plain HTTP.
    pub fn start(
        latency: Latency,
        protocol: Protocol,
        tls: Option<&Certificates>,
    ) -> anyhow::Result<SinkProcess> {
        let exe = std::env::current_exe()?;
        let mut command = Command::new(exe);
        command.args(["-q", "bench-sink", "--latency", &latency.to_string()]);
        command.args(["--protocol", &protocol.to_string()]);
        if let Some(tls) = tls {
            command.arg("--tls-cert").arg(&tls.cert);
            command.arg("--tls-key").arg(&tls.key);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("the sink process has no stdin or stdout");
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("the sink did not start: `{}`", line.trim()))?;
        Ok(SinkProcess {
            child,
            stdin,
            stdout,
            addr,
        })
    }

    /// The connections the sink has accepted so far.
    pub fn connections(&mut self) -> anyhow::Result<usize> {
        writeln!(self.stdin)?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim()
            .strip_prefix("connections ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("the sink answered `{}`", line.trim()))
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
