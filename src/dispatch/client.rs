//! The HTTP client: one pooled `reqwest::Client` shared by every action
//! (actions with their own TLS material get a client of their own), and the
//! classification of transport failures.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Builds a client; `tls` adds a client certificate and/or a private CA.
pub fn build(tls: Option<&TlsMaterial>, redirects: Redirects) -> Result<Client, String> {
    let mut builder = Client::builder()
        .redirect(redirects.policy())
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(Duration::from_secs(90))
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
/// others wait until it is answered (or failed), at most [`ColdStart::WAIT`],
/// and then find its HTTP/2 connection in the pool, or open their HTTP/1.1
/// connections as before. Once answered, an origin is never waited for again.
pub struct ColdStart {
    origins: Mutex<foldhash::HashMap<u64, Arc<Origin>>>,
    hasher: foldhash::fast::RandomState,
}

#[derive(Default)]
struct Origin {
    answered: AtomicBool,
    notify: Notify,
}

/// The first call's pass: its origin counts as answered when it is dropped.
#[must_use = "the origin's other calls wait until this is dropped"]
pub struct Turn(Option<Arc<Origin>>);

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(origin) = self.0.take() {
            origin.answered.store(true, Ordering::Release);
            origin.notify.notify_waiters();
        }
    }
}

impl Default for ColdStart {
    fn default() -> Self {
        ColdStart {
            origins: Mutex::new(foldhash::HashMap::default()),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl ColdStart {
    /// The longest a call waits for its origin's first answer.
    pub const WAIT: Duration = Duration::from_secs(1);
    /// Origins remembered; beyond them calls are not held (URLs can be
    /// templated from event data, so their number is not bounded).
    const MAX_ORIGINS: usize = 4096;

    /// Waits, if need be, until a call of the client `pool` (see
    /// [`pool_id`]) to `url` may go.
    pub async fn turn(&self, pool: usize, url: &Url) -> Turn {
        if url.scheme() != "https" {
            return Turn(None);
        }
        let key = self
            .hasher
            .hash_one((pool, url.host_str(), url.port_or_known_default()));
        let origin = {
            let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
            match origins.get(&key) {
                Some(origin) => origin.clone(),
                None if origins.len() >= Self::MAX_ORIGINS => return Turn(None),
                None => {
                    let origin = Arc::new(Origin::default());
                    origins.insert(key, origin.clone());
                    return Turn(Some(origin));
                }
            }
        };
        if origin.answered.load(Ordering::Acquire) {
            return Turn(None);
        }
        let notified = origin.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !origin.answered.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(Self::WAIT, notified).await;
        }
        Turn(None)
    }
}

/// Which connection pool a client is: its address, as long as it lives.
pub fn pool_id(client: &Client) -> usize {
    client as *const Client as usize
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).expect("URL")
    }

    #[tokio::test]
    async fn the_first_https_call_to_an_origin_goes_alone() {
        let cold = Arc::new(ColdStart::default());
        let not_held = |pool, text: &str| {
            cold.turn(pool, &url(text))
                .now_or_never()
                .unwrap_or_else(|| panic!("{text} (pool {pool}) was held"))
        };
        let first = not_held(1, "https://api.example.com/a");
        // Another origin, another pool, plain HTTP: not held.
        drop(not_held(1, "https://other.example.com/a"));
        drop(not_held(2, "https://api.example.com/a"));
        drop(not_held(1, "http://api.example.com/a"));

        let waiting = {
            let cold = cold.clone();
            tokio::spawn(async move {
                let _turn = cold.turn(1, &url("https://api.example.com:443/b")).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "the second call went before the first was answered"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the second call goes once the first is answered")
            .expect("task");
        // Answered: nobody waits any more.
        drop(not_held(1, "https://api.example.com/c"));
    }

    #[tokio::test]
    async fn a_first_call_that_hangs_holds_the_others_for_one_second_at_most() {
        let cold = ColdStart::default();
        let _first = cold.turn(1, &url("https://slow.example.com/")).await;
        let start = std::time::Instant::now();
        drop(cold.turn(1, &url("https://slow.example.com/")).await);
        assert!(start.elapsed() >= ColdStart::WAIT, "{:?}", start.elapsed());
    }
}
