//! The HTTP client: one pooled `reqwest::Client` shared by every action
//! (actions with their own TLS material get a client of their own), and the
//! classification of transport failures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Certificate, Client, Identity, Url};
use tokio::sync::Notify;

use super::retry::AttemptClass;

/// Redirects followed before a call fails (SPEC: at most 5).
pub const MAX_REDIRECTS: usize = 5;

/// TLS material of one action, as PEM text.
#[derive(Clone, Default)]
pub struct TlsMaterial {
    pub identity_pem: Option<Vec<u8>>,
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field(
                "client_identity",
                &self.identity_pem.as_ref().map(|_| "***"),
            )
            .field("ca", &self.ca_pem.is_some())
            .finish()
    }
}

/// Which redirects a client follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirects {
    /// Any redirect, up to [`MAX_REDIRECTS`] (for GET).
    All,
    /// Only 307 and 308, which keep the method and the body. A 301/302/303
    /// would turn a POST into a body-less GET and report success for a
    /// payload that never arrived: it is returned as the final answer instead.
    KeepingMethod,
}

impl Redirects {
    pub fn for_method(method: &reqwest::Method) -> Redirects {
        if method == reqwest::Method::GET {
            Redirects::All
        } else {
            Redirects::KeepingMethod
        }
    }

    fn policy(self) -> reqwest::redirect::Policy {
        match self {
            Redirects::All => reqwest::redirect::Policy::limited(MAX_REDIRECTS),
            Redirects::KeepingMethod => reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if matches!(attempt.status().as_u16(), 307 | 308) {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            }),
        }
    }
}

/// How long an idle connection stays in a client's pool.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// Builds a client; `tls` adds a client certificate and/or a private CA.
pub fn build(tls: Option<&TlsMaterial>, redirects: Redirects) -> Result<Client, String> {
    let mut builder = Client::builder()
        .redirect(redirects.policy())
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(POOL_IDLE)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("journey-actions/", env!("CARGO_PKG_VERSION")));
    if let Some(tls) = tls {
        if let Some(pem) = &tls.identity_pem {
            let identity = Identity::from_pem(pem)
                .map_err(|e| format!("client certificate and key: {}", describe(&e)))?;
            builder = builder.identity(identity);
        }
        if let Some(pem) = &tls.ca_pem {
            let certs = Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("CA certificate: {}", describe(&e)))?;
            if certs.is_empty() {
                return Err("CA certificate: no certificate in the PEM".into());
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
    }
    builder
        .build()
        .map_err(|e| format!("HTTP client: {}", describe(&e)))
}

/// How a transport failure counts for `retry_on`.
pub fn class_of(err: &reqwest::Error) -> AttemptClass {
    if err.is_timeout() {
        AttemptClass::Timeout
    } else if err.is_connect() {
        AttemptClass::Connect
    } else {
        AttemptClass::Error
    }
}

/// The error with its causes, on one line.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// HTTP/2 at a cold start: until a client has had an answer from an origin,
/// it cannot know whether the origin speaks HTTP/2 (ALPN says so during the
/// first TLS handshake), so every call that finds no pooled connection opens
/// its own, and a backlog opens up to `max_in_flight` TLS handshakes at once
/// to one provider. So the first call to each `https` origin goes alone; the
/// others wait until it is answered (or failed), and never beyond
/// [`ColdStart::WAIT`] after it started; then they find its HTTP/2 connection
/// in the pool, or open their HTTP/1.1 connections as before. Once answered,
/// an origin is not waited for again, unless no call went to it for as long
/// as the pool keeps an idle connection: its connections are gone, and the
/// next wave is a cold start again. One per connection pool: each client
/// holds its own (the shared clients in the dispatcher, an action with TLS
/// material in its definition, so a reload starts afresh).
#[derive(Default)]
pub struct ColdStart {
    /// By host, then by port.
    origins: Mutex<foldhash::HashMap<String, Ports>>,
}

/// A host's ports and their first calls.
type Ports = Vec<(u16, Arc<FirstCall>)>;

impl std::fmt::Debug for ColdStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts = self.origins.lock().map(|o| o.len()).unwrap_or(0);
        f.debug_struct("ColdStart").field("hosts", &hosts).finish()
    }
}

/// An origin's first call (since its connections were last let go).
struct FirstCall {
    started: tokio::time::Instant,
    answered: AtomicBool,
    notify: Notify,
    /// When the latest call to the origin started, in ms after `started`.
    latest: AtomicU64,
}

impl FirstCall {
    fn new(now: tokio::time::Instant) -> Arc<FirstCall> {
        Arc::new(FirstCall {
            started: now,
            answered: AtomicBool::new(false),
            notify: Notify::new(),
            latest: AtomicU64::new(0),
        })
    }

    /// Notes a call starting at `now`; whether the origin was idle for as
    /// long as the pool keeps a connection before it.
    fn call_at(&self, now: tokio::time::Instant) -> bool {
        let at = now.duration_since(self.started).as_millis() as u64;
        let latest = self.latest.swap(at, Ordering::Relaxed);
        Duration::from_millis(at.saturating_sub(latest)) >= POOL_IDLE
    }
}

/// The first call's pass: its origin counts as answered when it is dropped.
#[must_use = "the origin's other calls wait until this is dropped"]
pub struct Turn(Option<Arc<FirstCall>>);

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(first) = self.0.take() {
            first.answered.store(true, Ordering::Release);
            first.notify.notify_waiters();
        }
    }
}

impl ColdStart {
    /// How long after an origin's first call started the others go anyway.
    pub const WAIT: Duration = Duration::from_secs(1);
    /// Hosts, and ports per host, remembered; beyond them calls are not
    /// held (URLs can be templated from event data, so their number is not
    /// bounded).
    const MAX_HOSTS: usize = 4096;
    const MAX_PORTS: usize = 16;

    /// Waits, if need be, until a call to `url` may go.
    pub async fn turn(&self, url: &Url) -> Turn {
        if url.scheme() != "https" {
            return Turn(None);
        }
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Turn(None);
        };
        let now = tokio::time::Instant::now();
        let first = {
            let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
            let full = origins.len() >= Self::MAX_HOSTS;
            let ports = match origins.get_mut(host) {
                Some(ports) => ports,
                None if full => return Turn(None),
                None => origins.entry(host.to_string()).or_default(),
            };
            let slots = ports.len();
            match ports.iter_mut().find(|(p, _)| *p == port) {
                Some((_, first)) => {
                    let idle = first.call_at(now);
                    if idle && first.answered.load(Ordering::Acquire) {
                        *first = FirstCall::new(now);
                        return Turn(Some(first.clone()));
                    }
                    first.clone()
                }
                None if slots >= Self::MAX_PORTS => return Turn(None),
                None => {
                    let first = FirstCall::new(now);
                    ports.push((port, first.clone()));
                    return Turn(Some(first));
                }
            }
        };
        let until = first.started + Self::WAIT;
        if first.answered.load(Ordering::Acquire) || now >= until {
            return Turn(None);
        }
        // Created before the check below, so the first call's answer cannot
        // fall between the two (`notify_waiters` wakes every `Notified`
        // that exists when it is called).
        let answered = first.notify.notified();
        if !first.answered.load(Ordering::Acquire) {
            let _ = tokio::time::timeout_at(until, answered).await;
        }
        Turn(None)
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use tokio::time::Instant;

    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).expect("URL")
    }

    /// A turn that is given at once, without waiting.
    fn not_held(cold: &ColdStart, text: &str) -> Turn {
        cold.turn(&url(text))
            .now_or_never()
            .unwrap_or_else(|| panic!("{text} was held"))
    }

    // The clock is paused: it moves only when every task waits on a timer,
    // so "no time passed" means "woken by the answer, not by the time limit".
    #[tokio::test(start_paused = true)]
    async fn the_first_https_call_to_an_origin_goes_alone() {
        let cold = Arc::new(ColdStart::default());
        let first = not_held(&cold, "https://api.example.com/a");
        // Another host, another port, plain HTTP: not held.
        drop(not_held(&cold, "https://other.example.com/a"));
        drop(not_held(&cold, "https://api.example.com:8443/a"));
        drop(not_held(&cold, "http://api.example.com/a"));

        let waiting = {
            let cold = cold.clone();
            tokio::spawn(async move {
                let _turn = cold.turn(&url("https://api.example.com:443/b")).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "the second call went before the first was answered"
        );
        let answered = Instant::now();
        drop(first);
        waiting.await.expect("task");
        assert_eq!(
            answered.elapsed(),
            Duration::ZERO,
            "the second call waited for the time limit, not for the answer"
        );
        // Answered: nobody waits any more.
        drop(not_held(&cold, "https://api.example.com/c"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_origin_idle_for_as_long_as_the_pool_keeps_connections_is_cold_again() {
        let cold = Arc::new(ColdStart::default());
        drop(not_held(&cold, "https://api.example.com/a"));
        // Calls closer together than the pool's idle time: not held.
        for _ in 0..3 {
            tokio::time::sleep(POOL_IDLE - Duration::from_secs(1)).await;
            drop(not_held(&cold, "https://api.example.com/a"));
        }
        tokio::time::sleep(POOL_IDLE).await;
        // The next call goes alone again; one beside it waits for its answer.
        let first = not_held(&cold, "https://api.example.com/a");
        assert!(
            cold.turn(&url("https://api.example.com/a"))
                .now_or_never()
                .is_none(),
            "a call beside the first after an idle spell was not held"
        );
        drop(first);
        drop(not_held(&cold, "https://api.example.com/a"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_others_wait_one_second_after_the_first_started_at_most() {
        let cold = ColdStart::default();
        let started = Instant::now();
        let _first = not_held(&cold, "https://slow.example.com/");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = tokio::time::timeout(
            Duration::from_secs(60),
            cold.turn(&url("https://slow.example.com/")),
        )
        .await
        .expect("a held call goes at the time limit");
        drop(held);
        assert_eq!(started.elapsed(), ColdStart::WAIT);
        // After that, calls to the still unanswered origin are not held.
        drop(not_held(&cold, "https://slow.example.com/"));
    }
}
