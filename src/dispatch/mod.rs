//! Dispatch: one action event → the provider call(s) → one [`Outcome`].
//!
//! The [`Dispatcher`] knows nothing about Kafka. Per attempt the limits
//! compose in a fixed order: rate limit (wait), cap (reject), bulkhead
//! (wait), then the call with its per-attempt timeout; between attempts the
//! retry policy decides and waits. `expires_at` bounds every wait.

pub mod auth;
pub mod client;
pub mod limits;
pub mod outcome;
pub mod retry;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use foldhash::HashMap;
use reqwest::header::{HeaderMap, HeaderName, RETRY_AFTER};
use reqwest::{Client, Request, StatusCode};
use serde_json::Value;

use crate::action::{ActionDefinition, ActionSet};
use crate::event::ActionEvent;
use crate::render::RenderedRequest;
pub use client::ColdStart;
use limits::{KeyLimits, Slot};
pub use outcome::{Attempt, AttemptStatus, Outcome, OutcomeCode};
use retry::{classify, AttemptClass, Verdict};
use tokio::sync::OwnedSemaphorePermit;

/// How much of a response `send` prints.
pub const SEND_BODY_LIMIT: usize = 1024 * 1024;

/// Settings the dispatcher takes from `[dispatch]`.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    pub default_timeout: Duration,
    /// `None` when `dispatch.idempotency_header` is empty.
    pub idempotency_header: Option<HeaderName>,
}

impl DispatchOptions {
    pub fn from_settings(s: &crate::settings::DispatchSettings) -> DispatchOptions {
        DispatchOptions {
            default_timeout: s.default_timeout,
            idempotency_header: (!s.idempotency_header.is_empty())
                .then(|| HeaderName::from_bytes(s.idempotency_header.as_bytes()).ok())
                .flatten(),
        }
    }
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions::from_settings(&crate::settings::DispatchSettings::default())
    }
}

/// A provider's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    /// At most the limit asked for.
    pub body: Bytes,
    /// The provider sent more than `body`.
    pub truncated: bool,
}

/// Why an attempt got no answer.
#[derive(Debug, Clone)]
struct Failure {
    class: AttemptClass,
    message: String,
    /// The provider was not called (credentials could not be obtained).
    before_call: bool,
}

/// The loaded actions and the live limits of their keys, swapped as one.
struct Catalog {
    actions: Arc<ActionSet>,
    limits: HashMap<String, Arc<KeyLimits>>,
}

impl Catalog {
    /// Builds the limits of `actions`, keeping the live state (rate, cap
    /// window, bulkhead) of every key whose limits did not change.
    fn new(actions: Arc<ActionSet>, previous: Option<&Catalog>) -> Catalog {
        let limits = actions
            .limits()
            .into_iter()
            .filter(|(_, spec)| !spec.is_empty())
            .map(|(key, spec)| {
                let kept = previous
                    .and_then(|p| p.limits.get(&key))
                    .filter(|l| l.spec == spec)
                    .cloned();
                let limits = kept.unwrap_or_else(|| Arc::new(KeyLimits::new(key.clone(), &spec)));
                (key, limits)
            })
            .collect();
        Catalog { actions, limits }
    }
}

/// Executes action events against providers.
pub struct Dispatcher {
    catalog: ArcSwap<Catalog>,
    /// Shared clients: one following every redirect (GET), one only 307/308.
    client_get: Client,
    client_body: Client,
    /// Their cold-start rules (see [`ColdStart`]).
    cold_get: Arc<ColdStart>,
    cold_body: Arc<ColdStart>,
    options: DispatchOptions,
}

impl Dispatcher {
    pub fn new(actions: Arc<ActionSet>, options: DispatchOptions) -> anyhow::Result<Dispatcher> {
        let client_get = client::build(None, client::Redirects::All).map_err(anyhow::Error::msg)?;
        let client_body =
            client::build(None, client::Redirects::KeepingMethod).map_err(anyhow::Error::msg)?;
        Ok(Dispatcher {
            catalog: ArcSwap::from_pointee(Catalog::new(actions, None)),
            client_get,
            client_body,
            cold_get: Arc::default(),
            cold_body: Arc::default(),
            options,
        })
    }

    /// The current action set.
    pub fn actions(&self) -> Arc<ActionSet> {
        self.catalog.load().actions.clone()
    }

    /// Swaps in a new, fully valid action set. Events already running keep
    /// the definition they started with.
    pub fn reload(&self, actions: Arc<ActionSet>) {
        let current = self.catalog.load_full();
        self.catalog
            .store(Arc::new(Catalog::new(actions, Some(&current))));
    }

    /// The client a call of `def` goes through, with its cold-start rule.
    pub fn pool_for<'a>(&'a self, def: &'a ActionDefinition) -> (&'a Client, &'a Arc<ColdStart>) {
        match (
            &def.client,
            client::Redirects::for_method(&def.request.method),
        ) {
            (Some(own), _) => (own, &def.cold_start),
            (None, client::Redirects::All) => (&self.client_get, &self.cold_get),
            (None, client::Redirects::KeepingMethod) => (&self.client_body, &self.cold_body),
        }
    }

    /// Looks up the action, checks the params and the expiry, and renders.
    pub fn prepare(
        &self,
        event: &ActionEvent,
    ) -> Result<(Arc<ActionDefinition>, RenderedRequest), Outcome> {
        prepare(
            &self.catalog.load().actions,
            event,
            self.options.idempotency_header.as_ref(),
        )
    }

    /// Runs one event to its final outcome: limits, calls, retries. The
    /// same steps as the worker's (`prepare`, `try_admit`, `admit`, `run`),
    /// for a caller that holds the parsed event while it waits; the worker
    /// drops it and parses again once admitted (see `worker::decide`).
    pub async fn execute(&self, event: &ActionEvent) -> Outcome {
        let (def, request) = match self.prepare(event) {
            Ok(ready) => ready,
            Err(outcome) => return outcome,
        };
        let first = match self.try_admit(&def) {
            Admission::Ready(admitted) => admitted,
            Admission::Refused(outcome) => return outcome,
            Admission::Wait(waiting) => match self.admit(waiting, event.deadline).await {
                Ok(admitted) => admitted,
                Err(outcome) => return outcome,
            },
        };
        self.run(&def, &request, event, first).await
    }

    /// The first attempt's limits, if they can be taken without waiting:
    /// rate permit, cap, bulkhead slot.
    pub fn try_admit(&self, def: &ActionDefinition) -> Admission {
        let limits = self.catalog.load().limits.get(&def.limits_key).cloned();
        let Some(limits) = limits else {
            return Admission::Ready(Admitted::default());
        };
        match try_admit(&limits) {
            Ok(admitted) => Admission::Ready(admitted),
            Err(Blocked::Capped) => {
                let refusal = Refusal::Capped(Duration::ZERO);
                Admission::Refused(refuse(no_outcome_yet(), &limits, refusal))
            }
            Err(Blocked::Wait { throttled }) => Admission::Wait(Waiting { limits, throttled }),
        }
    }

    /// Waits for the rest of the first attempt's limits, up to `deadline`
    /// (the event's `expires_at`).
    pub async fn admit(
        &self,
        waiting: Waiting,
        deadline: Option<DateTime<Utc>>,
    ) -> Result<Admitted, Outcome> {
        let Waiting { limits, throttled } = waiting;
        wait_admit(&limits, throttled, until_instant(deadline))
            .await
            .map_err(|refusal| refuse(no_outcome_yet(), &limits, refusal))
    }

    /// Runs a prepared event whose first attempt is admitted: the calls,
    /// and the retries with their own limits.
    pub async fn run(
        &self,
        def: &ActionDefinition,
        request: &RenderedRequest,
        event: &ActionEvent,
        first: Admitted,
    ) -> Outcome {
        let deadline = until_instant(event.deadline);
        let started = Instant::now();
        let limits = first.limits.clone();
        let mut outcome = no_outcome_yet();
        outcome.limits_key = limits.as_ref().map(|l| l.key.clone());
        let mut schedule = def.retry.schedule();
        let mut next = Some(first);
        loop {
            // The first attempt comes admitted; each retry takes its own limits.
            let admitted = match (next.take(), &limits) {
                (Some(admitted), _) => admitted,
                (None, None) => Admitted::default(),
                (None, Some(limits)) => match admit_attempt(limits, deadline).await {
                    Ok(admitted) => admitted,
                    Err(refusal) => return refuse(outcome, limits, refusal),
                },
            };
            outcome.throttle_wait += admitted.throttle_wait;
            let _permit = admitted.permit;
            outcome.first_attempt_at.get_or_insert_with(Utc::now);
            // Boxed: the HTTP call's state machine is many KiB, and events
            // waiting for a permit should not carry it (10 000 held events:
            // 10 000 such futures).
            let call = self.call(
                def,
                request,
                event,
                def.response.max_bytes,
                &mut outcome.attempts,
            );
            let result = Box::pin(call).await;
            drop(_permit);

            let class = match &result {
                Ok(reply) => AttemptClass::Status(reply.status),
                Err(failure) => failure.class,
            };
            let verdict = classify(class, &def.retry.retry_on);
            finish(def, &mut outcome, &result);
            if verdict != Verdict::Retry {
                return outcome;
            }
            let Some(backoff) = schedule.next() else {
                return outcome;
            };
            let retry_after = match &result {
                Ok(reply) if matches!(reply.status, 429 | 503) => reply
                    .headers
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry::parse_retry_after(v, SystemTime::now())),
                _ => None,
            };
            let Some(delay) =
                def.retry
                    .next_delay(backoff, retry_after, started.elapsed(), &mut rand::rng())
            else {
                return outcome;
            };
            if deadline.is_some_and(|d| tokio::time::Instant::now() + delay >= d) {
                return expired(outcome, "before the next retry");
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// The "send test request": one call, no retries and no limits.
    pub async fn send_once(&self, event: &ActionEvent) -> Result<Reply, Outcome> {
        let (def, request) = self.prepare(event)?;
        let mut outcome = Outcome::early(OutcomeCode::Ok, "");
        outcome.first_attempt_at = Some(Utc::now());
        let result = self
            .call(
                &def,
                &request,
                event,
                SEND_BODY_LIMIT,
                &mut outcome.attempts,
            )
            .await;
        match result {
            Ok(reply) => Ok(reply),
            Err(_) => {
                finish(&def, &mut outcome, &result);
                Err(outcome)
            }
        }
    }

    /// One provider call with credentials, through the action's client and
    /// within its timeout; on a 401 with a token scheme the token is
    /// refreshed once and the call repeated.
    async fn call(
        &self,
        def: &ActionDefinition,
        rendered: &RenderedRequest,
        event: &ActionEvent,
        body_limit: usize,
        attempts: &mut Vec<Attempt>,
    ) -> Result<Reply, Failure> {
        let (client, cold_start) = self.pool_for(def);
        let timeout = def.timeout.unwrap_or(self.options.default_timeout);
        let mut refreshed = false;
        loop {
            let mut req = to_request(rendered);
            let used = def
                .auth
                .apply(client, &mut req, &event.event_id, timeout)
                .await
                .map_err(|e| Failure {
                    class: e.class,
                    message: def.mask(&e.to_string()),
                    before_call: true,
                })?;
            let turn = cold_start.turn(req.url()).await;
            let start = Instant::now();
            let result = tokio::time::timeout(timeout, exchange(client, req, body_limit)).await;
            let duration = start.elapsed();
            drop(turn);
            let result = match result {
                Ok(r) => r,
                Err(_) => Err(Failure {
                    class: AttemptClass::Timeout,
                    message: format!("no answer within {}", humantime::format_duration(timeout)),
                    before_call: false,
                }),
            };
            let status = match &result {
                Ok(reply) => AttemptStatus::Status(reply.status),
                Err(f) if f.class == AttemptClass::Timeout => AttemptStatus::Timeout,
                Err(_) => AttemptStatus::Error,
            };
            attempts.push(Attempt { status, duration });
            match (result, used) {
                (Ok(reply), Some(token))
                    if reply.status == 401 && !refreshed && def.auth.refreshes_on_401() =>
                {
                    def.auth.invalidate(token);
                    refreshed = true;
                }
                (Ok(reply), _) => return Ok(reply),
                (Err(mut f), _) => {
                    f.message = def.mask(&f.message);
                    return Err(f);
                }
            }
        }
    }
}

/// Looks up the action, checks params and expiry, renders the request.
pub fn prepare(
    actions: &ActionSet,
    event: &ActionEvent,
    idempotency: Option<&HeaderName>,
) -> Result<(Arc<ActionDefinition>, RenderedRequest), Outcome> {
    let Some(def) = actions.get(&event.action_id) else {
        return Err(Outcome::early(
            OutcomeCode::UnknownAction,
            format!("no action `{}` is defined", event.action_id),
        ));
    };
    let missing = def
        .check_params(&event.params)
        .map_err(|e| Outcome::early(OutcomeCode::InvalidEvent, e))?;
    if event.expired_at(Utc::now()) {
        return Err(Outcome::early(
            OutcomeCode::Expired,
            "expires_at passed before the event could be sent",
        ));
    }
    let request = def
        .request
        .render(event, &missing, idempotency)
        .map_err(|e| Outcome::early(OutcomeCode::RenderError, def.mask(&e.to_string())))?;
    Ok((def.clone(), request))
}

/// A `reqwest::Request` for a rendered request (the body is shared, not copied).
pub fn to_request(rendered: &RenderedRequest) -> Request {
    let mut req = Request::new(rendered.method.clone(), rendered.url.clone());
    *req.headers_mut() = rendered.headers.clone();
    if let Some(body) = &rendered.body {
        *req.body_mut() = Some(body.clone().into());
    }
    req
}

/// Sends `req` and reads at most `limit` bytes of the answer.
async fn exchange(client: &Client, req: Request, limit: usize) -> Result<Reply, Failure> {
    let transport = |e: reqwest::Error| Failure {
        class: client::class_of(&e),
        message: client::describe(&e),
        before_call: false,
    };
    let mut resp = client.execute(req).await.map_err(transport)?;
    let status = resp.status().as_u16();
    let headers = std::mem::take(resp.headers_mut());
    let mut body = Vec::new();
    let mut truncated = false;
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            truncated = true;
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply {
        status,
        headers,
        body: Bytes::from(body),
        truncated,
    })
}

/// Records the result of the latest attempt as the outcome so far.
fn finish(def: &ActionDefinition, outcome: &mut Outcome, result: &Result<Reply, Failure>) {
    outcome.completed_at = Utc::now();
    match result {
        Ok(reply) if (200..300).contains(&reply.status) => {
            outcome.code = OutcomeCode::Ok;
            outcome.error = None;
            outcome.error_response = None;
            outcome.response = def.response.capture.then(|| capture(reply)).flatten();
        }
        Ok(reply) => {
            outcome.code = OutcomeCode::Http(reply.status);
            let reason = StatusCode::from_u16(reply.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            outcome.error = Some(
                format!("the provider answered {} {reason}", reply.status)
                    .trim_end()
                    .to_string(),
            );
            outcome.response = None;
            outcome.error_response = def
                .response
                .capture
                .then(|| capture(reply))
                .flatten()
                .map(|v| mask_value(def, v));
        }
        Err(f) => {
            outcome.code = if f.class == AttemptClass::Timeout {
                OutcomeCode::TimedOut
            } else {
                OutcomeCode::Error
            };
            outcome.error = Some(if f.before_call {
                f.message.clone()
            } else {
                format!("call failed: {}", f.message)
            });
            outcome.response = None;
            outcome.error_response = None;
        }
    }
}

/// The body as JSON when it is complete JSON, else as text (cut at the limit).
pub fn capture(reply: &Reply) -> Option<Value> {
    if reply.body.is_empty() {
        return None;
    }
    if !reply.truncated {
        if let Some(v) = crate::event::json_from_bytes(&reply.body) {
            return Some(v);
        }
    }
    Some(Value::String(
        String::from_utf8_lossy(&reply.body).into_owned(),
    ))
}

fn mask_value(def: &ActionDefinition, v: Value) -> Value {
    if def.secrets.is_empty() {
        return v;
    }
    let text = v.to_string();
    let masked = def.mask(&text);
    if masked == text {
        v
    } else {
        serde_json::from_str(&masked).unwrap_or(Value::String(masked))
    }
}

/// The limits taken for one attempt; the bulkhead slot is held until the
/// attempt ends.
#[derive(Debug, Default)]
pub struct Admitted {
    /// The key's limits (for the retries), when the action has any.
    limits: Option<Arc<KeyLimits>>,
    permit: Option<OwnedSemaphorePermit>,
    /// Time spent waiting for the rate limit.
    throttle_wait: Duration,
}

/// An attempt that must wait for its limits.
#[derive(Debug)]
pub struct Waiting {
    limits: Arc<KeyLimits>,
    /// The rate permit and the cap are already taken.
    throttled: bool,
}

/// See [`Dispatcher::try_admit`].
#[derive(Debug)]
// A return value, matched at once and never stored.
#[allow(clippy::large_enum_variant)]
pub enum Admission {
    Ready(Admitted),
    /// Wait with [`Dispatcher::admit`].
    Wait(Waiting),
    /// The cap refused the call (`capped`).
    Refused(Outcome),
}

/// Why an attempt's limits could not all be taken at once.
enum Blocked {
    Capped,
    /// `throttled`: the rate permit and the cap are taken; the bulkhead is not.
    Wait {
        throttled: bool,
    },
}

enum Refusal {
    /// After waiting this long for the rate limit.
    Capped(Duration),
    Expired(&'static str),
}

/// One attempt's limits, in order, as far as they go without waiting:
/// rate (would wait), cap (rejects), bulkhead (would wait).
fn try_admit(limits: &Arc<KeyLimits>) -> Result<Admitted, Blocked> {
    if !limits.try_throttle() {
        return Err(Blocked::Wait { throttled: false });
    }
    if !limits.take_cap() {
        return Err(Blocked::Capped);
    }
    let permit = match limits.try_enter() {
        Slot::Unbounded => None,
        Slot::Taken(permit) => Some(permit),
        Slot::Busy => return Err(Blocked::Wait { throttled: true }),
    };
    Ok(Admitted {
        limits: Some(limits.clone()),
        permit,
        throttle_wait: Duration::ZERO,
    })
}

/// One attempt's limits, waiting as they demand, up to `deadline`.
async fn admit_attempt(
    limits: &Arc<KeyLimits>,
    deadline: Option<tokio::time::Instant>,
) -> Result<Admitted, Refusal> {
    match try_admit(limits) {
        Ok(admitted) => Ok(admitted),
        Err(Blocked::Capped) => Err(Refusal::Capped(Duration::ZERO)),
        Err(Blocked::Wait { throttled }) => wait_admit(limits, throttled, deadline).await,
    }
}

/// The rest of one attempt's limits after [`try_admit`] was blocked.
async fn wait_admit(
    limits: &Arc<KeyLimits>,
    throttled: bool,
    deadline: Option<tokio::time::Instant>,
) -> Result<Admitted, Refusal> {
    let mut throttle_wait = Duration::ZERO;
    if !throttled {
        throttle_wait = until(deadline, limits.throttle())
            .await
            .ok_or(Refusal::Expired("while throttled"))?;
        if !limits.take_cap() {
            return Err(Refusal::Capped(throttle_wait));
        }
    }
    let permit = until(deadline, limits.enter())
        .await
        .ok_or(Refusal::Expired("while waiting for a concurrency slot"))?;
    Ok(Admitted {
        limits: Some(limits.clone()),
        permit,
        throttle_wait,
    })
}

/// The outcome of an event before its first attempt.
fn no_outcome_yet() -> Outcome {
    let mut outcome = Outcome::early(OutcomeCode::Ok, "");
    outcome.error = None;
    outcome
}

/// The outcome so far, ended by a refusal of the limits.
fn refuse(mut outcome: Outcome, limits: &KeyLimits, refusal: Refusal) -> Outcome {
    outcome.limits_key = Some(limits.key.clone());
    match refusal {
        Refusal::Capped(throttled) => {
            outcome.throttle_wait += throttled;
            outcome.code = OutcomeCode::Capped;
            outcome.error = Some(format!("cap of key `{}` reached", limits.key));
            outcome.completed_at = Utc::now();
            outcome
        }
        Refusal::Expired(while_what) => expired(outcome, while_what),
    }
}

/// The outcome so far, ended because `expires_at` passed.
fn expired(mut outcome: Outcome, while_what: &str) -> Outcome {
    outcome.code = OutcomeCode::Expired;
    let last = outcome
        .error
        .take()
        .map(|e| format!(" (last attempt: {e})"))
        .unwrap_or_default();
    outcome.error = Some(format!("expires_at passed {while_what}{last}"));
    outcome.completed_at = Utc::now();
    outcome
}

/// An event's `expires_at` as a timer deadline.
fn until_instant(deadline: Option<DateTime<Utc>>) -> Option<tokio::time::Instant> {
    deadline.map(|d| {
        let left = (d - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::time::Instant::now() + left
    })
}

/// Runs `fut` until `deadline`; `None` when the deadline came first.
async fn until<T>(
    deadline: Option<tokio::time::Instant>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        None => Some(fut.await),
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
    }
}
