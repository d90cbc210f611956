//! The HTTP client: one pooled `reqwest::Client` shared by every action
//! (actions with their own TLS material get a client of their own), and the
//! classification of transport failures.

use std::time::Duration;

use reqwest::{Certificate, Client, Identity};

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
