//! Authentication (SPEC §4.2), checked from the provider's side: every test
//! loads real action files, runs `Dispatcher::execute`, and asserts on what the
//! wiremock provider (or token endpoint, or TLS server) actually received.
//!
//! Each test has its own temp dir, its own mock servers and its own env var
//! names, so the tests run in parallel without sharing state.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use journey_actions::action::{load_dir, ActionSet, LoadProblem};
use journey_actions::dispatch::{AttemptStatus, DispatchOptions, Dispatcher, Outcome, OutcomeCode};
use journey_actions::event::ActionEvent;
use serde_json::{json, Value};
use sha2::Sha256;
use tempfile::TempDir;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

// ---------------------------------------------------------------- helpers

/// A config directory: `actions/` with the action files, secret files beside it.
struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("actions")).expect("actions dir");
        Fixture { dir }
    }

    /// Writes `actions/{id}.yaml` from a JSON description of the action.
    fn action(&self, action: Value) -> &Fixture {
        let id = action["id"].as_str().expect("action id").to_string();
        let yaml = serde_yaml_ng::to_string(&action).expect("yaml");
        std::fs::write(
            self.dir.path().join("actions").join(format!("{id}.yaml")),
            yaml,
        )
        .expect("write action");
        self
    }

    /// Writes a secret file; returns its `${file:…}` reference (relative to the base).
    fn secret_file(&self, name: &str, content: &str) -> String {
        std::fs::write(self.dir.path().join(name), content).expect("write secret");
        format!("${{file:{name}}}")
    }

    fn load(&self) -> Result<ActionSet, Vec<LoadProblem>> {
        load_dir(&self.dir.path().join("actions"), self.dir.path())
    }

    fn dispatcher(&self) -> Arc<Dispatcher> {
        let set = self.load().unwrap_or_else(|problems| {
            panic!(
                "actions should load: {:#?}",
                problems.iter().map(ToString::to_string).collect::<Vec<_>>()
            )
        });
        Arc::new(Dispatcher::new(Arc::new(set), DispatchOptions::default()).expect("dispatcher"))
    }
}

/// Sets a process-unique env var and returns its `${env:…}` reference.
fn env_secret(tag: &str, value: &str) -> String {
    let name = format!("JA_AUTH_TEST_{tag}_{}", std::process::id());
    std::env::set_var(&name, value);
    format!("${{env:{name}}}")
}

/// A POST action to `{url}` with `auth`, a JSON payload and no retries
/// (unless `extra` says otherwise).
fn action(id: &str, url: &str, auth: Value, extra: Value) -> Value {
    let mut a = json!({
        "id": id,
        "endpoint": { "method": "POST", "url": url },
        "auth": auth,
        "payload": { "profile": "{{ profile_id }}", "text": "héllo \"world\"", "n": 1 },
        "retry": { "max_attempts": 1 },
    });
    if let (Value::Object(a), Value::Object(extra)) = (&mut a, extra) {
        a.extend(extra);
    }
    a
}

fn event(action_id: &str, event_id: &str) -> ActionEvent {
    ActionEvent::from_value(json!({
        "event_id": event_id,
        "action_id": action_id,
        "profile_id": "p-42",
        "params": {},
    }))
    .expect("valid event")
}

fn header_of<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers
        .get(name)
        .map(|v| v.to_str().expect("ascii header"))
}

/// The requests `server` received on `p`, in arrival order.
async fn received(server: &MockServer, p: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .expect("request recording is on")
        .into_iter()
        .filter(|r| r.url.path() == p)
        .collect()
}

fn form_of(req: &Request) -> Vec<(String, String)> {
    url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect::<Vec<_>>()
}

fn form_value<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn query_pairs(req: &Request) -> Vec<(String, String)> {
    req.url.query_pairs().into_owned().collect()
}

fn assert_ok(outcome: &Outcome) {
    assert_eq!(
        outcome.code,
        OutcomeCode::Ok,
        "expected ok, got {} ({:?})",
        outcome.code,
        outcome.error
    );
}

fn statuses(outcome: &Outcome) -> Vec<AttemptStatus> {
    outcome.attempts.iter().map(|a| a.status).collect()
}

/// Answers with `make(n)` for the n-th request (1-based): token endpoints
/// that hand out `tok-1`, `tok-2`, … so a test can tell which token was used.
struct Sequence<F>(AtomicUsize, F);

impl<F: Fn(usize) -> ResponseTemplate + Send + Sync + 'static> Respond for Sequence<F> {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        (self.1)(n)
    }
}

fn sequence<F: Fn(usize) -> ResponseTemplate + Send + Sync + 'static>(make: F) -> Sequence<F> {
    Sequence(AtomicUsize::new(0), make)
}

/// An OAuth2 token endpoint handing out `{prefix}-1`, `{prefix}-2`, …
fn oauth_tokens(prefix: &'static str, expires_in: u64) -> impl Respond {
    sequence(move |n| {
        ResponseTemplate::new(200).set_body_json(json!({
            "access_token": format!("{prefix}-{n}"),
            "token_type": "Bearer",
            "expires_in": expires_in,
        }))
    })
}

async fn provider_ok(server: &MockServer) {
    Mock::given(path("/hook"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "m-1"})))
        .mount(server)
        .await;
}

/// Whether less than 0.9 s passed since `since`: checks that a 2 s token is
/// still used within its first second only run when the calls were quick
/// enough for them to mean something (they are skipped, never failed, on a
/// slow machine).
fn quick(since: Instant) -> bool {
    since.elapsed() < Duration::from_millis(900)
}

/// Polls `cond` until it holds or `within` passes.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- static schemes

#[tokio::test]
async fn none_sends_no_credentials() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    let fx = Fixture::new();
    let url = format!("{}/hook", server.uri());
    fx.action(action("plain", &url, json!({"type": "none"}), json!({})));
    fx.action(json!({
        "id": "no_auth_block",
        "endpoint": { "method": "POST", "url": url },
        "payload": { "a": 1 },
    }));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("plain", "e-1")).await);
    assert_ok(&d.execute(&event("no_auth_block", "e-2")).await);

    let got = received(&server, "/hook").await;
    assert_eq!(got.len(), 2);
    for req in &got {
        assert!(req.headers.get("authorization").is_none());
        assert!(req.headers.get("webhook-signature").is_none());
        assert!(req.url.query().is_none());
    }
}

#[tokio::test]
async fn basic_sends_base64_of_user_colon_password() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    let fx = Fixture::new();
    // A colon and non-ASCII in the password: only the first colon separates.
    let password = "p@ss:wörd 1";
    let auth = json!({
        "type": "basic",
        "username": "svc-user",
        "password": env_secret("BASIC_PW", password),
    });
    fx.action(action(
        "basic",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("basic", "e-1")).await);

    let got = received(&server, "/hook").await;
    assert_eq!(got.len(), 1);
    let value = header_of(&got[0], "authorization").expect("Authorization header");
    let encoded = value.strip_prefix("Basic ").expect("Basic scheme");
    let decoded = BASE64.decode(encoded).expect("base64");
    assert_eq!(
        String::from_utf8(decoded).expect("utf-8"),
        format!("svc-user:{password}")
    );
}

#[tokio::test]
async fn bearer_sends_the_token_from_a_secret_file() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    let fx = Fixture::new();
    // The trailing newline of the file is not part of the token.
    let token = fx.secret_file("token.txt", "eyJhbGciOi.payload.sig\n");
    fx.action(action(
        "bearer",
        &format!("{}/hook", server.uri()),
        json!({"type": "bearer", "token": token}),
        json!({}),
    ));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("bearer", "e-1")).await);

    let got = received(&server, "/hook").await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        header_of(&got[0], "authorization"),
        Some("Bearer eyJhbGciOi.payload.sig")
    );
}

#[tokio::test]
async fn api_key_in_a_custom_header() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    let fx = Fixture::new();
    let auth = json!({
        "type": "api_key",
        "name": "X-Api-Key",
        "value": env_secret("APIKEY_HDR", "k-123-secret"),
        "in": "header",
    });
    fx.action(action(
        "key_hdr",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("key_hdr", "e-1")).await);

    let got = received(&server, "/hook").await;
    assert_eq!(got.len(), 1);
    assert_eq!(header_of(&got[0], "x-api-key"), Some("k-123-secret"));
    assert!(got[0].headers.get("authorization").is_none());
    assert!(got[0].url.query().is_none());
}

#[tokio::test]
async fn api_key_in_the_query_is_percent_encoded() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    let fx = Fixture::new();
    let key = "a&b=c+d e/é?#";
    let auth = json!({
        "type": "api_key",
        "name": "api_key",
        "value": env_secret("APIKEY_QUERY", key),
        "in": "query",
    });
    let extra = json!({
        "endpoint": {
            "method": "POST",
            "url": format!("{}/hook", server.uri()),
            "query": { "locale": "fr" },
        }
    });
    fx.action(action("key_query", "unused", auth, extra));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("key_query", "e-1")).await);

    let got = received(&server, "/hook").await;
    assert_eq!(got.len(), 1);
    // Decoded, the provider sees exactly two parameters: nothing in the key
    // split it or started a fragment.
    assert_eq!(
        query_pairs(&got[0]),
        vec![
            ("locale".to_string(), "fr".to_string()),
            ("api_key".to_string(), key.to_string()),
        ]
    );
    let raw = got[0].url.query().expect("a query");
    for reserved in ["&b", "=c", "+d"] {
        assert!(!raw.contains(reserved), "`{reserved}` unencoded in {raw}");
    }
    assert!(got[0].headers.get("authorization").is_none());
}

// ---------------------------------------------------------------- oauth2

fn oauth2_auth(token_url: &str, secret_ref: &str) -> Value {
    json!({
        "type": "oauth2",
        "token_url": token_url,
        "client_id": "ja-client",
        "client_secret": secret_ref,
        "scope": "sms.send sms.read",
        "audience": "https://api.example.com/",
    })
}

#[tokio::test]
async fn oauth2_posts_client_credentials_and_sends_the_access_token() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(oauth_tokens("at", 3600))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let secret = "cs-&=+ secret/1";
    let auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_CS", secret),
    );
    fx.action(action(
        "oauth",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("oauth", "e-1")).await);

    let token_calls = received(&server, "/token").await;
    assert_eq!(token_calls.len(), 1);
    let call = &token_calls[0];
    assert_eq!(
        header_of(call, "content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let form = form_of(call);
    assert_eq!(form_value(&form, "grant_type"), Some("client_credentials"));
    assert_eq!(form_value(&form, "client_id"), Some("ja-client"));
    assert_eq!(form_value(&form, "client_secret"), Some(secret));
    assert_eq!(form_value(&form, "scope"), Some("sms.send sms.read"));
    assert_eq!(
        form_value(&form, "audience"),
        Some("https://api.example.com/")
    );
    assert!(call.headers.get("authorization").is_none());

    let hooks = received(&server, "/hook").await;
    assert_eq!(hooks.len(), 1);
    assert_eq!(header_of(&hooks[0], "authorization"), Some("Bearer at-1"));
}

#[tokio::test]
async fn oauth2_client_auth_basic_sends_credentials_as_http_basic() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(oauth_tokens("at", 3600))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let mut auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_BASIC_CS", "basic-secret-9"),
    );
    auth["client_auth"] = json!("basic");
    fx.action(action(
        "oauth_basic",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("oauth_basic", "e-1")).await);

    let token_calls = received(&server, "/token").await;
    assert_eq!(token_calls.len(), 1);
    let value = header_of(&token_calls[0], "authorization").expect("Basic credentials");
    let decoded = BASE64
        .decode(value.strip_prefix("Basic ").expect("Basic scheme"))
        .expect("base64");
    assert_eq!(decoded, b"ja-client:basic-secret-9");
    let form = form_of(&token_calls[0]);
    assert_eq!(form_value(&form, "grant_type"), Some("client_credentials"));
    assert_eq!(form_value(&form, "client_id"), None);
    assert_eq!(form_value(&form, "client_secret"), None);

    let hooks = received(&server, "/hook").await;
    assert_eq!(header_of(&hooks[0], "authorization"), Some("Bearer at-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oauth2_concurrent_callers_share_one_token_request() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    // A slow token endpoint: every caller arrives while the fetch is in flight.
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "shared-1", "expires_in": 3600}))
                .set_delay(Duration::from_millis(300)),
        )
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_CONC_CS", "conc-secret"),
    );
    fx.action(action(
        "oauth_conc",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let d = d.clone();
        calls.spawn(async move { d.execute(&event("oauth_conc", &format!("e-{i}"))).await });
    }
    while let Some(outcome) = calls.join_next().await {
        assert_ok(&outcome.expect("task"));
    }

    assert_eq!(received(&server, "/token").await.len(), 1);
    let hooks = received(&server, "/hook").await;
    assert_eq!(hooks.len(), 50);
    assert!(hooks
        .iter()
        .all(|h| header_of(h, "authorization") == Some("Bearer shared-1")));
}

#[tokio::test]
async fn oauth2_token_is_refreshed_before_it_expires() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    // expires_in 2 s: the refresh margin is min(60 s, 2 s / 2) = 1 s.
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(oauth_tokens("short", 2))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_EXP_CS", "exp-secret"),
    );
    fx.action(action(
        "oauth_exp",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    let fetched = Instant::now();
    assert_ok(&d.execute(&event("oauth_exp", "e-1")).await);
    assert_ok(&d.execute(&event("oauth_exp", "e-2")).await);
    // Within the first second the token is still fresh.
    if quick(fetched) {
        assert_eq!(received(&server, "/token").await.len(), 1);
    }

    tokio::time::sleep_until((fetched + Duration::from_millis(1500)).into()).await;
    assert_ok(&d.execute(&event("oauth_exp", "e-3")).await);

    let token_calls = received(&server, "/token").await;
    let hooks = received(&server, "/hook").await;
    let last = hooks.last().expect("a provider call");
    assert_eq!(
        header_of(last, "authorization"),
        Some(&*format!("Bearer short-{}", token_calls.len()))
    );
    assert_eq!(
        token_calls.len(),
        2,
        "one fetch, then one refresh after 1 s"
    );
    assert_eq!(
        header_of(&hooks[0], "authorization"),
        Some("Bearer short-1")
    );
}

#[tokio::test]
async fn oauth2_provider_401_refreshes_the_token_once_and_repeats_the_call() {
    let server = MockServer::start().await;
    Mock::given(path("/hook"))
        .and(header("authorization", "Bearer r-1"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(path("/hook"))
        .and(header("authorization", "Bearer r-2"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(oauth_tokens("r", 3600))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_401_CS", "s401-secret"),
    );
    fx.action(action(
        "oauth_401",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    let outcome = d.execute(&event("oauth_401", "e-1")).await;

    assert_ok(&outcome);
    assert_eq!(
        statuses(&outcome),
        vec![AttemptStatus::Status(401), AttemptStatus::Status(200)]
    );
    assert_eq!(received(&server, "/token").await.len(), 2);
    let seen: Vec<_> = received(&server, "/hook")
        .await
        .iter()
        .map(|r| {
            header_of(r, "authorization")
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(seen, vec!["Bearer r-1", "Bearer r-2"]);
    // The new token stays cached for the next event.
    assert_ok(&d.execute(&event("oauth_401", "e-2")).await);
    assert_eq!(received(&server, "/token").await.len(), 2);
}

#[tokio::test]
async fn oauth2_persistent_401_refreshes_only_once() {
    let server = MockServer::start().await;
    Mock::given(path("/hook"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(oauth_tokens("p", 3600))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_P401_CS", "p401-secret"),
    );
    // A provider that rejects every token: one refresh, one repeat, then the 401 stands.
    let extra = json!({"retry": {"max_attempts": 1}});
    fx.action(action(
        "oauth_p401",
        &format!("{}/hook", server.uri()),
        auth,
        extra,
    ));
    let d = fx.dispatcher();

    let outcome = d.execute(&event("oauth_p401", "e-1")).await;

    assert_eq!(outcome.code, OutcomeCode::Http(401));
    assert_eq!(outcome.attempts.len(), 2);
    assert_eq!(received(&server, "/token").await.len(), 2);
    assert_eq!(received(&server, "/hook").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oauth2_concurrent_401s_share_one_refresh() {
    let server = MockServer::start().await;
    Mock::given(path("/hook"))
        .and(header("authorization", "Bearer c-1"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(path("/hook"))
        .and(header("authorization", "Bearer c-2"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(oauth_tokens("c", 3600))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_C401_CS", "c401-secret"),
    );
    fx.action(action(
        "oauth_c401",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..10 {
        let d = d.clone();
        calls.spawn(async move { d.execute(&event("oauth_c401", &format!("e-{i}"))).await });
    }
    while let Some(outcome) = calls.join_next().await {
        assert_ok(&outcome.expect("task"));
    }

    // Every caller that saw c-1 rejected invalidates c-1 only: one refresh in all.
    assert_eq!(received(&server, "/token").await.len(), 2);
}

#[tokio::test]
async fn oauth2_token_endpoint_500_is_an_error_without_a_provider_call() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    Mock::given(path("/token"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_500_CS", "s500-secret"),
    );
    // 5xx is in the default retry_on: the token request is retried like a call.
    let extra =
        json!({"retry": {"max_attempts": 2, "initial_backoff": "10ms", "max_backoff": "10ms"}});
    fx.action(action(
        "oauth_500",
        &format!("{}/hook", server.uri()),
        auth,
        extra,
    ));
    let d = fx.dispatcher();

    let outcome = d.execute(&event("oauth_500", "e-1")).await;

    assert_eq!(outcome.code, OutcomeCode::Error);
    assert!(outcome.attempts.is_empty(), "{:?}", outcome.attempts);
    let error = outcome.error.as_deref().expect("a reason");
    assert!(error.contains("500"), "{error}");
    assert_eq!(received(&server, "/token").await.len(), 2);
    assert!(received(&server, "/hook").await.is_empty());
}

#[tokio::test]
async fn oauth2_token_endpoint_non_json_is_an_error_without_a_provider_call() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    Mock::given(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>login</html>"))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_HTML_CS", "html-secret"),
    );
    // Default retry policy: a malformed answer is not a transient failure.
    let extra = json!({"retry": {"max_attempts": 3, "initial_backoff": "10ms"}});
    fx.action(action(
        "oauth_html",
        &format!("{}/hook", server.uri()),
        auth,
        extra,
    ));
    let d = fx.dispatcher();

    let outcome = d.execute(&event("oauth_html", "e-1")).await;

    assert_eq!(outcome.code, OutcomeCode::Error);
    assert!(outcome.attempts.is_empty());
    assert_eq!(received(&server, "/token").await.len(), 1);
    assert!(received(&server, "/hook").await.is_empty());
}

#[tokio::test]
async fn oauth2_client_secret_never_appears_in_the_outcome() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    let secret = "cs-do-not-leak-7f3a";
    // A token endpoint that echoes the secret back in its error.
    Mock::given(path("/token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_client",
            "error_description": format!("client secret {secret} is wrong"),
        })))
        .mount(&server)
        .await;
    // And one that answers 200 but with the secret instead of a token shape.
    Mock::given(path("/token2"))
        .respond_with(ResponseTemplate::new(200).set_body_string(format!("bad {secret}")))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let secret_ref = env_secret("OAUTH_LEAK_CS", secret);
    let hook = format!("{}/hook", server.uri());
    fx.action(action(
        "leak_400",
        &hook,
        oauth2_auth(&format!("{}/token", server.uri()), &secret_ref),
        json!({}),
    ));
    fx.action(action(
        "leak_json",
        &hook,
        oauth2_auth(&format!("{}/token2", server.uri()), &secret_ref),
        json!({}),
    ));
    // Unreachable token endpoint: the transport error text is shown too.
    fx.action(action(
        "leak_down",
        &hook,
        oauth2_auth("http://127.0.0.1:9/token", &secret_ref),
        json!({}),
    ));
    let d = fx.dispatcher();

    for id in ["leak_400", "leak_json", "leak_down"] {
        let outcome = d.execute(&event(id, "e-1")).await;
        assert_eq!(outcome.code, OutcomeCode::Error, "{id}");
        let error = outcome.error.clone().expect("a reason");
        assert!(!error.is_empty());
        assert!(!error.contains(secret), "{id}: {error}");
        assert!(!format!("{outcome:?}").contains(secret), "{id}");
    }
    assert!(received(&server, "/hook").await.is_empty());
}

// ---------------------------------------------------------------- custom

#[tokio::test]
async fn custom_post_json_body_with_nested_token_path() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    Mock::given(method("POST"))
        .and(path("/login"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"data": {"jwt": "jwt-abc.def"}})),
        )
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let password = "pw \"quoted\" \\ é";
    let auth = json!({
        "type": "custom",
        "endpoint": format!("{}/login", server.uri()),
        "method": "POST",
        "body_type": "json",
        "body": {
            "username": "svc",
            "password": env_secret("CUSTOM_JSON_PW", password),
            "options": { "ttl": 3600, "scopes": ["a", "b"] },
        },
        "token_path": "data.jwt",
        "place": "bearer",
    });
    fx.action(action(
        "custom_json",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("custom_json", "e-1")).await);

    let logins = received(&server, "/login").await;
    assert_eq!(logins.len(), 1);
    assert_eq!(
        header_of(&logins[0], "content-type"),
        Some("application/json")
    );
    let body: Value = logins[0].body_json().expect("a JSON body");
    assert_eq!(
        body,
        json!({
            "username": "svc",
            "password": password,
            "options": { "ttl": 3600, "scopes": ["a", "b"] },
        })
    );
    let hooks = received(&server, "/hook").await;
    assert_eq!(
        header_of(&hooks[0], "authorization"),
        Some("Bearer jwt-abc.def")
    );
}

#[tokio::test]
async fn custom_post_form_body_places_the_token_in_a_header() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    Mock::given(method("POST"))
        .and(path("/login"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"access_token": "form-tok"})))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let password = "p&ss=w rd+1";
    let auth = json!({
        "type": "custom",
        "endpoint": format!("{}/login", server.uri()),
        "body_type": "form",
        "body": {
            "grant_type": "password",
            "username": "svc",
            "password": fx.secret_file("pw.txt", &format!("{password}\n")),
        },
        "token_path": "access_token",
        "place": "header:X-Token",
    });
    fx.action(action(
        "custom_form",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("custom_form", "e-1")).await);

    let logins = received(&server, "/login").await;
    assert_eq!(logins.len(), 1);
    assert_eq!(
        header_of(&logins[0], "content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let form = form_of(&logins[0]);
    assert_eq!(form_value(&form, "grant_type"), Some("password"));
    assert_eq!(form_value(&form, "username"), Some("svc"));
    assert_eq!(form_value(&form, "password"), Some(password));
    let hooks = received(&server, "/hook").await;
    assert_eq!(header_of(&hooks[0], "x-token"), Some("form-tok"));
    assert!(hooks[0].headers.get("authorization").is_none());
}

#[tokio::test]
async fn custom_get_with_headers_and_whole_body_token_placed_in_the_query() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    // token_path empty: the whole (trimmed) body is the token.
    let token = "raw+tok/en=&x";
    Mock::given(method("GET"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_string(format!("{token}\n")))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = json!({
        "type": "custom",
        "endpoint": format!("{}/token", server.uri()),
        "method": "GET",
        "headers": {
            "X-Api-Key": env_secret("CUSTOM_GET_KEY", "get-key-55"),
            "X-Tenant": "acme",
        },
        "place": "query:access_token",
    });
    fx.action(action(
        "custom_get",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    assert_ok(&d.execute(&event("custom_get", "e-1")).await);

    let token_calls = received(&server, "/token").await;
    assert_eq!(token_calls.len(), 1);
    assert!(token_calls[0].body.is_empty());
    assert_eq!(header_of(&token_calls[0], "x-api-key"), Some("get-key-55"));
    assert_eq!(header_of(&token_calls[0], "x-tenant"), Some("acme"));
    let hooks = received(&server, "/hook").await;
    assert_eq!(
        query_pairs(&hooks[0]),
        vec![("access_token".to_string(), token.to_string())]
    );
    assert!(hooks[0].headers.get("authorization").is_none());
}

#[tokio::test]
async fn custom_token_is_cached_across_calls() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    Mock::given(path("/login"))
        .respond_with(sequence(|n| {
            ResponseTemplate::new(200).set_body_json(json!({"token": format!("cached-{n}")}))
        }))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = json!({
        "type": "custom",
        "endpoint": format!("{}/login", server.uri()),
        "token_path": "token",
    });
    fx.action(action(
        "custom_cache",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    for i in 0..5 {
        assert_ok(&d.execute(&event("custom_cache", &format!("e-{i}"))).await);
    }

    assert_eq!(received(&server, "/login").await.len(), 1);
    let hooks = received(&server, "/hook").await;
    assert_eq!(hooks.len(), 5);
    assert!(hooks
        .iter()
        .all(|h| header_of(h, "authorization") == Some("Bearer cached-1")));
}

#[tokio::test]
async fn custom_expiry_path_is_honoured_and_cache_for_defaults_to_an_hour() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    // Every token endpoint says the token lives 2 s; only the action that
    // reads `expiry_path` (or sets a short `cache_for`) should care.
    for (p, prefix) in [
        ("/auth-exp", "exp"),
        ("/auth-default", "def"),
        ("/auth-cache", "cf"),
    ] {
        Mock::given(path(p))
            .respond_with(sequence(move |n| {
                ResponseTemplate::new(200)
                    .set_body_json(json!({"token": format!("{prefix}-{n}"), "meta": {"ttl": 2}}))
            }))
            .mount(&server)
            .await;
    }
    let fx = Fixture::new();
    let hook = format!("{}/hook", server.uri());
    let custom = |p: &str, more: Value| {
        let mut a = json!({
            "type": "custom",
            "endpoint": format!("{}{p}", server.uri()),
            "token_path": "token",
        });
        if let (Value::Object(a), Value::Object(more)) = (&mut a, more) {
            a.extend(more);
        }
        a
    };
    fx.action(action(
        "with_expiry",
        &hook,
        custom("/auth-exp", json!({"expiry_path": "meta.ttl"})),
        json!({}),
    ));
    fx.action(action(
        "with_default",
        &hook,
        custom("/auth-default", json!({})),
        json!({}),
    ));
    fx.action(action(
        "with_cache_for",
        &hook,
        custom("/auth-cache", json!({"cache_for": "2s"})),
        json!({}),
    ));
    let d = fx.dispatcher();
    let ids = ["with_expiry", "with_default", "with_cache_for"];

    let fetched = Instant::now();
    for id in ids {
        assert_ok(&d.execute(&event(id, "e-1")).await);
        assert_ok(&d.execute(&event(id, "e-2")).await);
    }
    // A 2 s token is refreshed 1 s after it was fetched, not sooner.
    if quick(fetched) {
        for p in ["/auth-exp", "/auth-default", "/auth-cache"] {
            assert_eq!(
                received(&server, p).await.len(),
                1,
                "{p} within the first second"
            );
        }
    }
    tokio::time::sleep_until((fetched + Duration::from_millis(1500)).into()).await;
    for id in ids {
        assert_ok(&d.execute(&event(id, "e-3")).await);
    }

    assert_eq!(
        received(&server, "/auth-exp").await.len(),
        2,
        "expiry_path 2 s"
    );
    assert_eq!(
        received(&server, "/auth-default").await.len(),
        1,
        "default 1 h"
    );
    assert_eq!(
        received(&server, "/auth-cache").await.len(),
        2,
        "cache_for 2 s"
    );
    let last_tokens: Vec<_> = received(&server, "/hook")
        .await
        .iter()
        .rev()
        .take(3)
        .map(|r| {
            header_of(r, "authorization")
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        last_tokens,
        vec!["Bearer cf-2", "Bearer def-1", "Bearer exp-2"]
    );
}

#[tokio::test]
async fn custom_provider_401_refreshes_the_token_once_and_repeats_the_call() {
    let server = MockServer::start().await;
    Mock::given(path("/hook"))
        .and(header("x-token", "k-1"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(path("/hook"))
        .and(header("x-token", "k-2"))
        .respond_with(ResponseTemplate::new(201))
        .mount(&server)
        .await;
    Mock::given(path("/login"))
        .respond_with(sequence(|n| {
            ResponseTemplate::new(200).set_body_json(json!({"token": format!("k-{n}")}))
        }))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = json!({
        "type": "custom",
        "endpoint": format!("{}/login", server.uri()),
        "token_path": "token",
        "place": "header:X-Token",
    });
    fx.action(action(
        "custom_401",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    let outcome = d.execute(&event("custom_401", "e-1")).await;

    assert_ok(&outcome);
    assert_eq!(
        statuses(&outcome),
        vec![AttemptStatus::Status(401), AttemptStatus::Status(201)]
    );
    assert_eq!(received(&server, "/login").await.len(), 2);
    let seen: Vec<_> = received(&server, "/hook")
        .await
        .iter()
        .map(|r| header_of(r, "x-token").unwrap_or_default().to_string())
        .collect();
    assert_eq!(seen, vec!["k-1", "k-2"]);
}

// ---------------------------------------------------------------- hmac

/// Verifies a Standard Webhooks signature the way a receiver would, with
/// nothing from the crate under test.
fn webhook_signature_valid(key: &[u8], id: &str, ts: &str, body: &[u8], header: &str) -> bool {
    let Some(b64) = header.strip_prefix("v1,") else {
        return false;
    };
    let Ok(sig) = BASE64.decode(b64) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

async fn check_hmac_delivery(secret: &str, key: &[u8], tag: &str) {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    let fx = Fixture::new();
    let auth = json!({"type": "hmac", "secret": env_secret(tag, secret)});
    fx.action(action(
        "signed",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();
    let event_id = "msg_2b7c9e1f-8d1e-4f7a";

    let before = chrono::Utc::now().timestamp();
    assert_ok(&d.execute(&event("signed", event_id)).await);
    let after = chrono::Utc::now().timestamp();

    let hooks = received(&server, "/hook").await;
    assert_eq!(hooks.len(), 1);
    let req = &hooks[0];
    let id = header_of(req, "webhook-id").expect("webhook-id");
    let ts = header_of(req, "webhook-timestamp").expect("webhook-timestamp");
    let sig = header_of(req, "webhook-signature").expect("webhook-signature");
    assert_eq!(id, event_id);
    let ts_num: i64 = ts.parse().expect("unix seconds");
    assert!(
        (before - 1..=after + 1).contains(&ts_num),
        "{ts_num} not within [{before}, {after}]"
    );
    assert!(sig.starts_with("v1,"), "{sig}");
    assert!(
        webhook_signature_valid(key, id, ts, &req.body, sig),
        "signature {sig} does not verify over the received body"
    );
    // The body that was signed is the rendered payload.
    let body: Value = serde_json::from_slice(&req.body).expect("JSON body");
    assert_eq!(body["profile"], "p-42");
    // Tampering with any part breaks it.
    let mut tampered = req.body.clone();
    tampered.push(b' ');
    assert!(!webhook_signature_valid(key, id, ts, &tampered, sig));
    let other_ts = (ts_num + 1).to_string();
    assert!(!webhook_signature_valid(key, id, &other_ts, &req.body, sig));
    assert!(!webhook_signature_valid(
        key, "other-id", ts, &req.body, sig
    ));
    assert!(!webhook_signature_valid(
        b"wrong key",
        id,
        ts,
        &req.body,
        sig
    ));
}

#[tokio::test]
async fn hmac_signs_with_a_whsec_base64_secret() {
    let key: Vec<u8> = (0u8..32)
        .map(|b| b.wrapping_mul(37).wrapping_add(11))
        .collect();
    let secret = format!("whsec_{}", BASE64.encode(&key));
    check_hmac_delivery(&secret, &key, "HMAC_WHSEC").await;
}

#[tokio::test]
async fn hmac_signs_with_a_raw_text_secret() {
    let secret = "a plain shared secret: not base64!";
    check_hmac_delivery(secret, secret.as_bytes(), "HMAC_RAW").await;
}

// ---------------------------------------------------------------- tls

/// A private CA with a server certificate for 127.0.0.1/localhost and a client certificate.
struct Pki {
    ca: rcgen::Certificate,
    server_cert: rcgen::Certificate,
    server_key: rcgen::KeyPair,
    client_cert: rcgen::Certificate,
    client_key: rcgen::KeyPair,
}

fn make_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "journey-actions test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).expect("CA");

    let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).expect("signed");
        (cert, key)
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "provider",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        Vec::new(),
        "journey-actions",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    Pki {
        ca,
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

/// What the mTLS provider saw.
#[derive(Default)]
struct MtlsLog {
    /// Requests served: path and the DER of the client certificate presented.
    requests: Mutex<Vec<(String, Vec<u8>)>>,
    /// Handshakes that failed.
    rejected: AtomicUsize,
}

/// An HTTPS provider that requires a client certificate signed by the CA.
async fn spawn_mtls_provider(pki: &Pki) -> (SocketAddr, Arc<MtlsLog>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::server::WebPkiClientVerifier;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).expect("CA root");
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("client verifier");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![pki.server_cert.der().clone()], key)
        .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = Arc::new(MtlsLog::default());
    let server_log = log.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let log = server_log.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        log.rejected.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.as_ref().to_vec())
                    .unwrap_or_default();
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        let peer = peer.clone();
                        async move {
                            log.requests
                                .lock()
                                .expect("log")
                                .push((req.uri().path().to_string(), peer));
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"{\"ok\":true}"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, log)
}

fn write_pki(fx: &Fixture, pki: &Pki) {
    let dir = fx.dir.path();
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).expect("pem");
    write("ca.pem", pki.ca.pem());
    write("client.pem", pki.client_cert.pem());
    write("client.key", pki.client_key.serialize_pem());
}

fn tls_action(id: &str, addr: SocketAddr, tls: Value) -> Value {
    action(
        id,
        &format!("https://{addr}/hook"),
        json!({"type": "none"}),
        json!({"tls": tls}),
    )
}

#[tokio::test]
async fn tls_client_certificate_and_private_ca_reach_an_mtls_provider() {
    let pki = make_pki();
    let (addr, log) = spawn_mtls_provider(&pki).await;
    let fx = Fixture::new();
    write_pki(&fx, &pki);
    fx.action(tls_action(
        "mtls",
        addr,
        json!({
            "client_cert": "${file:client.pem}",
            "client_key": "${file:client.key}",
            "ca_cert": "${file:ca.pem}",
        }),
    ));
    let d = fx.dispatcher();

    let outcome = d.execute(&event("mtls", "e-1")).await;

    assert_ok(&outcome);
    let requests = log.requests.lock().expect("log");
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0, "/hook");
    assert_eq!(
        requests[0].1,
        pki.client_cert.der().to_vec(),
        "the provider saw our client certificate"
    );
}

#[tokio::test]
async fn tls_without_a_client_certificate_is_rejected_by_an_mtls_provider() {
    let pki = make_pki();
    let (addr, log) = spawn_mtls_provider(&pki).await;
    let fx = Fixture::new();
    write_pki(&fx, &pki);
    fx.action(tls_action(
        "ca_only",
        addr,
        json!({"ca_cert": "${file:ca.pem}"}),
    ));
    let d = fx.dispatcher();

    let outcome = d.execute(&event("ca_only", "e-1")).await;

    assert_eq!(outcome.code, OutcomeCode::Error, "{:?}", outcome.error);
    eventually(Duration::from_secs(5), "the rejected handshake", || {
        log.rejected.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert!(log.requests.lock().expect("log").is_empty());
}

#[tokio::test]
async fn tls_without_the_private_ca_does_not_trust_the_provider() {
    let pki = make_pki();
    let (addr, log) = spawn_mtls_provider(&pki).await;
    let fx = Fixture::new();
    write_pki(&fx, &pki);
    fx.action(tls_action(
        "no_ca",
        addr,
        json!({
            "client_cert": "${file:client.pem}",
            "client_key": "${file:client.key}",
        }),
    ));
    let d = fx.dispatcher();

    let outcome = d.execute(&event("no_ca", "e-1")).await;

    assert_eq!(outcome.code, OutcomeCode::Error, "{:?}", outcome.error);
    eventually(Duration::from_secs(5), "the aborted handshake", || {
        log.rejected.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert!(log.requests.lock().expect("log").is_empty());
}

// ---------------------------------------------------------------- validation

/// Loads one action with `auth` and returns the fields its problems name.
fn auth_problems(auth: Value) -> Vec<LoadProblem> {
    let fx = Fixture::new();
    fx.action(action(
        "bad_auth",
        "https://provider.example/hook",
        auth,
        json!({}),
    ));
    match fx.load() {
        Ok(_) => panic!("the action should not load"),
        Err(problems) => problems,
    }
}

fn assert_problem(problems: &[LoadProblem], field: &str, says: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.field == field && p.message.contains(says)),
        "no problem on `{field}` saying `{says}` in {:#?}",
        problems.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
}

#[test]
fn unknown_auth_type_is_a_load_problem() {
    let problems = auth_problems(json!({"type": "kerberos", "token": "x"}));
    assert_problem(&problems, "auth.type", "kerberos");
}

#[test]
fn api_key_in_cookie_is_a_load_problem() {
    let problems = auth_problems(json!({
        "type": "api_key", "name": "k", "value": "v", "in": "cookie",
    }));
    assert_problem(&problems, "auth.in", "cookie");
}

#[test]
fn custom_place_cookie_is_a_load_problem() {
    let problems = auth_problems(json!({
        "type": "custom",
        "endpoint": "https://auth.example/token",
        "token_path": "token",
        "place": "cookie:x",
    }));
    assert_problem(&problems, "auth.place", "cookie:x");
}

#[test]
fn unresolved_env_secret_is_a_load_problem() {
    let name = format!("JA_AUTH_TEST_NEVER_SET_{}", std::process::id());
    let problems = auth_problems(json!({"type": "bearer", "token": format!("${{env:{name}}}")}));
    assert_problem(&problems, "auth.token", &name);

    let problems = auth_problems(json!({
        "type": "oauth2",
        "token_url": "https://auth.example/token",
        "client_id": "id",
        "client_secret": format!("${{env:{name}}}"),
    }));
    assert_problem(&problems, "auth.client_secret", &name);
}

#[test]
fn other_invalid_auth_fields_are_load_problems() {
    let problems = auth_problems(json!({
        "type": "oauth2",
        "token_url": "ftp://auth.example/token",
        "client_id": "id",
        "client_secret": "s",
        "client_auth": "jwt",
    }));
    assert_problem(&problems, "auth.token_url", "ftp");
    assert_problem(&problems, "auth.client_auth", "jwt");

    let problems = auth_problems(json!({"type": "hmac", "secret": "whsec_not base64!"}));
    assert_problem(&problems, "auth.secret", "base64");

    let problems = auth_problems(json!({
        "type": "custom",
        "endpoint": "https://auth.example/token",
        "method": "GET",
        "body": {"a": "b"},
    }));
    assert_problem(&problems, "auth.body", "GET");
}

#[test]
fn problems_do_not_leak_the_secret_they_are_about() {
    // A bearer token with a newline cannot be a header value.
    let fx = Fixture::new();
    let token = fx.secret_file("bad_token.txt", "line-one-secret\nline-two-secret");
    fx.action(action(
        "bad_token",
        "https://provider.example/hook",
        json!({"type": "bearer", "token": token}),
        json!({}),
    ));
    let problems = fx.load().expect_err("a token with a newline is invalid");
    assert_problem(&problems, "auth.token", "not allowed in an HTTP header");
    for p in &problems {
        assert!(!p.to_string().contains("line-one-secret"), "{p}");
    }
}

#[tokio::test]
async fn hmac_refuses_an_event_id_that_cannot_be_a_header() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    let fx = Fixture::new();
    let auth = json!({"type": "hmac", "secret": env_secret("HMAC_BADID", "raw-secret-x")});
    fx.action(action(
        "signed_bad_id",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let set = fx.load().expect("loads");
    // Without the idempotency header nothing else stops such an id before signing.
    let options = DispatchOptions {
        idempotency_header: None,
        ..DispatchOptions::default()
    };
    let d = Dispatcher::new(Arc::new(set), options).expect("dispatcher");

    let outcome = d.execute(&event("signed_bad_id", "line\r\nbreak")).await;

    assert_ne!(outcome.code, OutcomeCode::Ok);
    assert!(
        received(&server, "/hook").await.is_empty(),
        "a signature without its webhook-id cannot be verified"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oauth2_concurrent_callers_share_a_failed_token_request() {
    let server = MockServer::start().await;
    provider_ok(&server).await;
    Mock::given(path("/token"))
        .respond_with(ResponseTemplate::new(503).set_delay(Duration::from_millis(300)))
        .mount(&server)
        .await;
    let fx = Fixture::new();
    let auth = oauth2_auth(
        &format!("{}/token", server.uri()),
        &env_secret("OAUTH_CFAIL_CS", "cfail-secret"),
    );
    fx.action(action(
        "oauth_cfail",
        &format!("{}/hook", server.uri()),
        auth,
        json!({}),
    ));
    let d = fx.dispatcher();

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..20 {
        let d = d.clone();
        calls.spawn(async move { d.execute(&event("oauth_cfail", &format!("e-{i}"))).await });
    }
    while let Some(outcome) = calls.join_next().await {
        let outcome = outcome.expect("task");
        assert_eq!(outcome.code, OutcomeCode::Error, "{:?}", outcome.error);
    }

    // Callers queued behind a failing fetch take its answer instead of
    // fetching again one after the other.
    assert_eq!(received(&server, "/token").await.len(), 1);
    assert!(received(&server, "/hook").await.is_empty());
}
