//! Rendering and dispatch against a real provider on 127.0.0.1 (SPEC §4, §4.1,
//! §5.1, §5.2, §6): action definitions are written to a temporary config
//! directory and loaded as the worker loads them, events go through
//! `Dispatcher::execute`, and every assertion is about what the provider
//! actually received (or did not receive) and the outcome the event ended with.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::closed_port;
use journey_actions::action::load_dir;
use journey_actions::dispatch::{AttemptStatus, DispatchOptions, Dispatcher, Outcome, OutcomeCode};
use journey_actions::event::ActionEvent;
use serde_json::{json, Value};
use tempfile::TempDir;
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A loaded action set with its dispatcher; the directory lives as long as it.
struct Fixture {
    _dir: TempDir,
    dispatcher: Dispatcher,
}

/// Writes each definition as `actions/<id>.json` (and each `(name, content)`
/// file beside `actions/`, for `${file:…}` secrets) and loads them.
fn load_with_files(defs: &[Value], files: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let actions = dir.path().join("actions");
    std::fs::create_dir(&actions).expect("actions dir");
    for def in defs {
        let id = def["id"].as_str().expect("every definition has an id");
        std::fs::write(
            actions.join(format!("{id}.json")),
            serde_json::to_vec_pretty(def).expect("definition serialises"),
        )
        .expect("write definition");
    }
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write file");
    }
    let set = match load_dir(&actions, dir.path()) {
        Ok(set) => set,
        Err(problems) => {
            let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
            panic!("definitions do not load:\n{}", lines.join("\n"));
        }
    };
    let dispatcher =
        Dispatcher::new(Arc::new(set), DispatchOptions::default()).expect("dispatcher");
    Fixture {
        _dir: dir,
        dispatcher,
    }
}

fn load(defs: &[Value]) -> Fixture {
    load_with_files(defs, &[])
}

/// A POST action to `url` with fast retries, patched with `extra`.
fn action(id: &str, url: &str, extra: Value) -> Value {
    let mut def = json!({
        "id": id,
        "endpoint": { "method": "POST", "url": url, "timeout": "5s" },
        "retry": { "initial_backoff": "10ms", "max_backoff": "50ms" }
    });
    merge(&mut def, extra);
    def
}

/// Recursive object merge: objects merge key by key, anything else replaces.
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (k, v) in patch {
                merge(base.entry(k).or_insert(Value::Null), v);
            }
        }
        (base, patch) => *base = patch,
    }
}

static EVENT_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A valid event for `action_id` with `params`, a journey and a context.
fn event(action_id: &str, params: Value) -> ActionEvent {
    event_with(action_id, params, json!({}))
}

/// Like [`event`], with top-level fields of `extra` added or replaced.
fn event_with(action_id: &str, params: Value, extra: Value) -> ActionEvent {
    let n = EVENT_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut value = json!({
        "event_id": format!("evt-{n}-{}", std::process::id()),
        "action_id": action_id,
        "profile_id": "p-12345",
        "journey": { "id": "welcome", "version": "3", "step_id": "send_sms" },
        "params": params,
        "context": { "locale": "fr" }
    });
    merge(&mut value, extra);
    ActionEvent::from_value(value).expect("a valid action event")
}

async fn received(server: &MockServer) -> Vec<Request> {
    server
        .received_requests()
        .await
        .expect("request recording is on")
}

/// The body the provider received, which must always be valid JSON.
fn body_json(req: &Request) -> Value {
    serde_json::from_slice(&req.body).unwrap_or_else(|e| {
        panic!(
            "the provider received a body that is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&req.body)
        )
    })
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers
        .get(name)
        .map(|v| v.to_str().expect("ASCII header"))
}

fn assert_code(outcome: &Outcome, code: OutcomeCode) {
    assert_eq!(outcome.code, code, "unexpected outcome: {outcome:#?}");
}

fn decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .expect("UTF-8 after decoding")
        .into_owned()
}

/// Answers with `responses` in turn (the last one repeats) and records when
/// each request arrived, so waits can be measured at the provider.
struct Scripted {
    responses: Vec<ResponseTemplate>,
    next: AtomicUsize,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

/// When each call reached a [`Scripted`] responder.
type Arrivals = Arc<Mutex<Vec<Instant>>>;

impl Scripted {
    fn new(responses: Vec<ResponseTemplate>) -> (Scripted, Arrivals) {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let scripted = Scripted {
            responses,
            next: AtomicUsize::new(0),
            arrivals: arrivals.clone(),
        };
        (scripted, arrivals)
    }
}

impl Respond for Scripted {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.arrivals
            .lock()
            .expect("arrivals lock")
            .push(Instant::now());
        let i = self.next.fetch_add(1, Ordering::SeqCst);
        self.responses[i.min(self.responses.len() - 1)].clone()
    }
}

fn arrivals_of(arrivals: &Arrivals) -> Vec<Instant> {
    arrivals.lock().expect("arrivals lock").clone()
}

fn count(outcomes: &[Outcome], code: OutcomeCode) -> usize {
    outcomes.iter().filter(|o| o.code == code).count()
}

// ---------------------------------------------------------------------------
// §4.1 Structural rendering
// ---------------------------------------------------------------------------

#[tokio::test]
async fn single_expression_leaves_keep_their_json_type_and_mixed_leaves_are_strings() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/typed"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "typed",
        &format!("{}/typed", server.uri()),
        json!({
            "endpoint": {
                "query": { "vip": "{{ params.vip }}", "tags": "{{ params.tags }}" },
                "headers": { "X-Vip": "{{ params.vip }}", "X-Count": "{{ params.count }}" }
            },
            "parameters": {
                "count": { "type": "integer" },
                "price": { "type": "decimal" },
                "vip": { "type": "boolean" },
                "tags": { "type": "list<string>" },
                "attrs": { "type": "object" }
            },
            "payload": {
                "count": "{{ params.count }}",
                "price": "{{ params.price }}",
                "vip": "{{ params.vip }}",
                "tags": "{{ params.tags }}",
                "attrs": "{{ params.attrs }}",
                "count_text": "n={{ params.count }}",
                "vip_text": "vip: {{ params.vip }}",
                "tag_count": "{{ params.tags | length }}",
                "journey": "{{ journey.id }}",
                "nested": { "list": ["{{ params.count }}", "#{{ params.count }}", true] },
                "source": "journey",
                "constant": 7
            }
        }),
    )]);

    let outcome = f
        .dispatcher
        .execute(&event(
            "typed",
            json!({
                "count": 42, "price": 12.5, "vip": true, "tags": ["a", "b"],
                "attrs": { "x": 1, "y": [true, null], "z": "s" }
            }),
        ))
        .await;

    assert_code(&outcome, OutcomeCode::Ok);
    let requests = received(&server).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(
        body_json(&requests[0]),
        json!({
            "count": 42,
            "price": 12.5,
            "vip": true,
            "tags": ["a", "b"],
            "attrs": { "x": 1, "y": [true, null], "z": "s" },
            "count_text": "n=42",
            "vip_text": "vip: true",
            "tag_count": 2,
            "journey": "welcome",
            "nested": { "list": [42, "#42", true] },
            "source": "journey",
            "constant": 7
        })
    );
    // Text outside the body (query, headers) prints values as JSON writes them.
    let mut query: Vec<(String, String)> = requests[0].url.query_pairs().into_owned().collect();
    query.sort();
    assert_eq!(
        query,
        [
            ("tags".to_string(), r#"["a","b"]"#.to_string()),
            ("vip".to_string(), "true".to_string())
        ]
    );
    assert_eq!(header(&requests[0], "x-vip"), Some("true"));
    assert_eq!(header(&requests[0], "x-count"), Some("42"));
}

/// The action used by the `null_values` tests: two optional parameters used
/// as single expressions, in a list and in a mixed leaf.
fn null_values_action(uri: &str, null_values: &str) -> Value {
    action(
        "nulls",
        &format!("{uri}/nulls"),
        json!({
            "parameters": {
                "phone": { "type": "string", "required": true },
                "name": { "type": "string" },
                "count": { "type": "integer" }
            },
            "payload": {
                "to": "{{ params.phone }}",
                "name": "{{ params.name }}",
                "count": "{{ params.count }}",
                "list": ["{{ params.name }}", 1],
                "greeting": "Hi {{ params.name }}!"
            },
            "null_values": null_values
        }),
    )
}

#[tokio::test]
async fn missing_optional_param_drops_its_key_with_null_values_omit() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[null_values_action(&server.uri(), "omit")]);

    let outcome = f
        .dispatcher
        .execute(&event("nulls", json!({ "phone": "+33612345678" })))
        .await;

    assert_code(&outcome, OutcomeCode::Ok);
    let requests = received(&server).await;
    assert_eq!(
        body_json(&requests[0]),
        json!({ "to": "+33612345678", "list": [1], "greeting": "Hi !" })
    );
}

#[tokio::test]
async fn missing_optional_param_is_sent_as_null_with_null_values_keep() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[null_values_action(&server.uri(), "keep")]);

    let outcome = f
        .dispatcher
        .execute(&event("nulls", json!({ "phone": "+33612345678" })))
        .await;

    assert_code(&outcome, OutcomeCode::Ok);
    let requests = received(&server).await;
    assert_eq!(
        body_json(&requests[0]),
        json!({
            "to": "+33612345678",
            "name": null,
            "count": null,
            "list": [null, 1],
            "greeting": "Hi !"
        })
    );
}

#[tokio::test]
async fn default_filter_fills_a_missing_optional_param() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(2)
        .mount(&server)
        .await;
    let f = load(&[action(
        "defaults",
        &format!("{}/defaults", server.uri()),
        json!({
            "parameters": { "name": { "type": "string" }, "count": { "type": "integer" } },
            "payload": {
                "name": "{{ params.name | default('x') }}",
                "greeting": "Hello {{ params.name | default('there') }}!",
                "count": "{{ params.count | default(0) }}"
            }
        }),
    )]);

    let missing = f.dispatcher.execute(&event("defaults", json!({}))).await;
    let given = f
        .dispatcher
        .execute(&event("defaults", json!({ "name": "Zoë", "count": 3 })))
        .await;

    assert_code(&missing, OutcomeCode::Ok);
    assert_code(&given, OutcomeCode::Ok);
    let requests = received(&server).await;
    assert_eq!(
        body_json(&requests[0]),
        json!({ "name": "x", "greeting": "Hello there!", "count": 0 })
    );
    assert_eq!(
        body_json(&requests[1]),
        json!({ "name": "Zoë", "greeting": "Hello Zoë!", "count": 3 })
    );
}

#[tokio::test]
async fn url_path_expression_arrives_as_one_encoded_segment() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "paths",
        &format!(
            "{}/v1/accounts/{{{{ params.account }}}}/messages",
            server.uri()
        ),
        json!({ "parameters": { "account": { "type": "string", "required": true } } }),
    )]);

    let outcome = f
        .dispatcher
        .execute(&event("paths", json!({ "account": "a/b ?#" })))
        .await;

    assert_code(&outcome, OutcomeCode::Ok);
    let requests = received(&server).await;
    let url = &requests[0].url;
    let segments: Vec<&str> = url.path_segments().expect("a path").collect();
    assert_eq!(segments.len(), 4, "{url}");
    assert_eq!(segments[..2], ["v1", "accounts"]);
    assert_eq!(decoded(segments[2]), "a/b ?#", "{url}");
    assert_eq!(segments[3], "messages");
    assert_eq!(
        url.query(),
        None,
        "`?` in a param must not start a query: {url}"
    );
    assert_eq!(
        url.fragment(),
        None,
        "`#` in a param must not start a fragment"
    );
}

#[tokio::test]
async fn dot_segments_from_params_are_a_render_error_and_nothing_is_sent() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let f = load(&[action(
        "paths",
        &format!(
            "{}/v1/accounts/{{{{ params.account }}}}/messages",
            server.uri()
        ),
        json!({ "parameters": { "account": { "type": "string", "required": true } } }),
    )]);

    for account in ["..", "."] {
        let outcome = f
            .dispatcher
            .execute(&event("paths", json!({ "account": account })))
            .await;
        assert_code(&outcome, OutcomeCode::RenderError);
        assert!(outcome.attempts.is_empty(), "{outcome:#?}");
    }
    assert!(received(&server).await.is_empty());
}

#[tokio::test]
async fn query_values_are_encoded_as_query_values() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "search",
        &format!("{}/search?v=1", server.uri()),
        json!({
            "endpoint": {
                "method": "GET",
                "query": {
                    "q": "{{ params.q }}",
                    "lang": "{{ context.locale | default('en') }}",
                    "n": 5
                }
            },
            "parameters": { "q": { "type": "string", "required": true } }
        }),
    )]);
    let q = "a&b=c d#e+f%20ü";

    let outcome = f
        .dispatcher
        .execute(&event("search", json!({ "q": q })))
        .await;

    assert_code(&outcome, OutcomeCode::Ok);
    let requests = received(&server).await;
    let mut pairs: Vec<(String, String)> = requests[0].url.query_pairs().into_owned().collect();
    pairs.sort();
    let mut want = vec![
        ("lang".to_string(), "fr".to_string()),
        ("n".to_string(), "5".to_string()),
        ("q".to_string(), q.to_string()),
        ("v".to_string(), "1".to_string()),
    ];
    want.sort();
    assert_eq!(pairs, want, "{}", requests[0].url);
}

#[tokio::test]
async fn header_value_with_cr_or_lf_is_a_render_error_and_nothing_is_sent() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "headers",
        &format!("{}/headers", server.uri()),
        json!({
            "endpoint": { "headers": { "X-Name": "{{ params.name }}", "X-Fixed": "yes" } },
            "parameters": { "name": { "type": "string", "required": true } }
        }),
    )]);

    for hostile in ["a\r\nX-Injected: 1", "a\nX-Injected: 1", "a\rb"] {
        let outcome = f
            .dispatcher
            .execute(&event("headers", json!({ "name": hostile })))
            .await;
        assert_code(&outcome, OutcomeCode::RenderError);
        assert!(outcome.attempts.is_empty());
    }
    let ok = f
        .dispatcher
        .execute(&event("headers", json!({ "name": "Zoe O'Neil" })))
        .await;

    assert_code(&ok, OutcomeCode::Ok);
    let requests = received(&server).await;
    assert_eq!(
        requests.len(),
        1,
        "only the benign event reaches the provider"
    );
    assert_eq!(header(&requests[0], "x-name"), Some("Zoe O'Neil"));
    assert_eq!(header(&requests[0], "x-fixed"), Some("yes"));
    assert!(requests[0].headers.get("x-injected").is_none());
}

#[tokio::test]
async fn idempotency_header_carries_the_event_id_and_json_bodies_are_labelled() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(3)
        .mount(&server)
        .await;
    let uri = server.uri();
    let f = load(&[
        action(
            "post_json",
            &format!("{uri}/post"),
            json!({ "payload": { "a": 1 } }),
        ),
        action(
            "get_nobody",
            &format!("{uri}/get"),
            json!({ "endpoint": { "method": "GET" } }),
        ),
        action(
            "own_type",
            &format!("{uri}/own"),
            json!({
                "endpoint": { "headers": { "Content-Type": "application/vnd.api+json" } },
                "payload": { "a": 1 }
            }),
        ),
    ]);
    let post = event("post_json", json!({}));
    let get = event("get_nobody", json!({}));
    let own = event("own_type", json!({}));

    for e in [&post, &get, &own] {
        assert_code(&f.dispatcher.execute(e).await, OutcomeCode::Ok);
    }

    let requests = received(&server).await;
    let by_path = |p: &str| {
        requests
            .iter()
            .find(|r| r.url.path() == p)
            .unwrap_or_else(|| panic!("no request to {p}"))
    };
    let (post_req, get_req, own_req) = (by_path("/post"), by_path("/get"), by_path("/own"));
    assert_eq!(
        header(post_req, "idempotency-key"),
        Some(post.event_id.as_str())
    );
    assert_eq!(
        header(get_req, "idempotency-key"),
        Some(get.event_id.as_str())
    );
    assert_eq!(
        header(own_req, "idempotency-key"),
        Some(own.event_id.as_str())
    );
    assert_eq!(header(post_req, "content-type"), Some("application/json"));
    assert_eq!(body_json(post_req), json!({ "a": 1 }));
    assert_eq!(get_req.method.as_str(), "GET");
    assert!(get_req.body.is_empty());
    assert_eq!(
        header(get_req, "content-type"),
        None,
        "no body, no Content-Type"
    );
    let own_types: Vec<_> = own_req.headers.get_all("content-type").iter().collect();
    assert_eq!(
        own_types,
        ["application/vnd.api+json"],
        "a configured Content-Type wins"
    );
}

// ---------------------------------------------------------------------------
// §4.1 Event data can never break the request
// ---------------------------------------------------------------------------

const HOSTILE: &[&str] = &[
    "{{ 7*7 }}",
    "{% if true %}x{% endif %}",
    "{# comment #}",
    "\"\\\n\"}",
    "\u{1}\u{1f}",
    "👩‍💻",
    "{\"a\":1}",
    "${env:HOME}",
    "</script><script>",
    "' OR 1=1 --",
];

#[tokio::test]
async fn hostile_params_arrive_byte_exact() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(HOSTILE.len() as u64)
        .mount(&server)
        .await;
    let f = load(&[action(
        "hostile",
        &format!("{}/h/{{{{ params.v }}}}", server.uri()),
        json!({
            "endpoint": { "query": { "q": "{{ params.v }}" } },
            "parameters": { "v": { "type": "string", "required": true } },
            "payload": {
                "v": "{{ params.v }}",
                "mixed": "<{{ params.v }}>",
                "list": ["{{ params.v }}", "{{ params.v }}!"],
                "nested": { "v": "{{ params.v }}" }
            }
        }),
    )]);

    for value in HOSTILE {
        let outcome = f
            .dispatcher
            .execute(&event("hostile", json!({ "v": value })))
            .await;
        assert_code(&outcome, OutcomeCode::Ok);
    }

    let requests = received(&server).await;
    assert_eq!(requests.len(), HOSTILE.len());
    for (req, value) in requests.iter().zip(HOSTILE) {
        let body = body_json(req);
        assert_eq!(
            body,
            json!({
                "v": value,
                "mixed": format!("<{value}>"),
                "list": [value, format!("{value}!")],
                "nested": { "v": value }
            }),
            "param {value:?}"
        );
        let segments: Vec<&str> = req.url.path_segments().expect("a path").collect();
        assert_eq!(
            segments.len(),
            2,
            "param {value:?} split the path: {}",
            req.url
        );
        assert_eq!(decoded(segments[1]), *value, "path segment for {value:?}");
        let query: Vec<(String, String)> = req.url.query_pairs().into_owned().collect();
        assert_eq!(
            query,
            [("q".to_string(), value.to_string())],
            "query for {value:?}"
        );
    }
}

#[tokio::test]
async fn numbers_arrive_exact_at_the_edges_of_their_range() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "numbers",
        &format!("{}/numbers", server.uri()),
        json!({
            "parameters": { "n": { "type": "list<decimal>" } },
            "payload": { "n": "{{ params.n }}", "first": "{{ params.n[0] }}" }
        }),
    )]);
    let numbers = json!([
        9007199254740993u64,
        i64::MIN,
        u64::MAX,
        0.1,
        1e-7,
        -0.0,
        12.5
    ]);

    let outcome = f
        .dispatcher
        .execute(&event("numbers", json!({ "n": numbers })))
        .await;

    assert_code(&outcome, OutcomeCode::Ok);
    let requests = received(&server).await;
    assert_eq!(
        body_json(&requests[0]),
        json!({ "n": numbers, "first": 9007199254740993u64 })
    );
}

// ---------------------------------------------------------------------------
// §4.1, §5.2 Params check, unknown actions, undefined variables
// ---------------------------------------------------------------------------

fn checked_action(uri: &str) -> Value {
    action(
        "checked",
        &format!("{uri}/checked"),
        json!({
            "parameters": {
                "phone": { "type": "string", "required": true },
                "count": { "type": "integer" },
                "amount": { "type": "decimal" },
                "vip": { "type": "boolean" },
                "at": { "type": "dateTime" },
                "attrs": { "type": "object" },
                "tags": { "type": "list<string>" }
            },
            "payload": { "to": "{{ params.phone }}" }
        }),
    )
}

#[tokio::test]
async fn missing_required_param_is_invalid_event_and_nothing_is_sent() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let f = load(&[checked_action(&server.uri())]);

    for params in [json!({}), json!({ "phone": null }), json!({ "count": 1 })] {
        let outcome = f
            .dispatcher
            .execute(&event("checked", params.clone()))
            .await;
        assert_code(&outcome, OutcomeCode::InvalidEvent);
        assert!(outcome.attempts.is_empty());
        let error = outcome.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("phone"),
            "{params}: the reason names the param: {error}"
        );
    }
    assert!(received(&server).await.is_empty());
}

#[tokio::test]
async fn mistyped_params_are_invalid_event_and_nothing_is_sent() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[checked_action(&server.uri())]);
    let cases = [
        ("phone", json!(33612345678u64)),
        ("count", json!("3")),
        ("count", json!(3.5)),
        ("amount", json!("12.5")),
        ("vip", json!("true")),
        ("at", json!("yesterday")),
        ("attrs", json!([1])),
        ("tags", json!(["a", 1])),
        ("tags", json!("a")),
    ];

    for (name, value) in &cases {
        let mut params = json!({ "phone": "+33612345678" });
        params[*name] = value.clone();
        let outcome = f.dispatcher.execute(&event("checked", params)).await;
        assert_code(&outcome, OutcomeCode::InvalidEvent);
        assert!(outcome.attempts.is_empty());
        let error = outcome.error.as_deref().unwrap_or_default();
        assert!(error.contains(name), "{name}={value}: {error}");
    }
    // The same action with every param well typed does reach the provider.
    let good = f
        .dispatcher
        .execute(&event(
            "checked",
            json!({
                "phone": "+33612345678", "count": 3, "amount": 12, "vip": false,
                "at": "2026-11-23T12:00:00Z", "attrs": {}, "tags": ["a"]
            }),
        ))
        .await;
    assert_code(&good, OutcomeCode::Ok);
    assert_eq!(received(&server).await.len(), 1);
}

#[tokio::test]
async fn unknown_action_ends_as_unknown_action() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let f = load(&[checked_action(&server.uri())]);

    let outcome = f
        .dispatcher
        .execute(&event("no_such_action", json!({ "phone": "+33" })))
        .await;

    assert_code(&outcome, OutcomeCode::UnknownAction);
    assert!(outcome.attempts.is_empty());
    assert!(received(&server).await.is_empty());
}

#[tokio::test]
async fn undefined_variable_is_a_render_error_and_nothing_is_sent() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let uri = server.uri();
    let f = load(&[
        action(
            "ctx_expr",
            &format!("{uri}/a"),
            json!({ "payload": { "x": "{{ context.missing }}" } }),
        ),
        action(
            "ctx_text",
            &format!("{uri}/b"),
            json!({ "payload": { "x": "value: {{ context.missing }}" } }),
        ),
        action(
            "journey_id",
            &format!("{uri}/c"),
            json!({ "endpoint": { "headers": { "X-Journey": "{{ journey.id }}" } } }),
        ),
    ]);

    let cases = [
        event("ctx_expr", json!({})),
        event("ctx_text", json!({})),
        event_with("ctx_expr", json!({}), json!({ "context": null })),
        event_with("journey_id", json!({}), json!({ "journey": null })),
    ];
    for e in &cases {
        let outcome = f.dispatcher.execute(e).await;
        assert_code(&outcome, OutcomeCode::RenderError);
        assert!(outcome.attempts.is_empty());
    }
    assert!(received(&server).await.is_empty());
}

// ---------------------------------------------------------------------------
// §4 retry, §5.2, §6 Retries as the provider counts them
// ---------------------------------------------------------------------------

#[tokio::test]
async fn retries_503_then_succeeds() {
    let server = MockServer::start().await;
    let (script, _) = Scripted::new(vec![
        ResponseTemplate::new(503),
        ResponseTemplate::new(503),
        ResponseTemplate::new(200),
    ]);
    Mock::given(any())
        .respond_with(script)
        .expect(3)
        .mount(&server)
        .await;
    let f = load(&[action(
        "flaky",
        &format!("{}/flaky", server.uri()),
        json!({ "retry": { "max_attempts": 4 }, "payload": { "a": 1 } }),
    )]);
    let e = event("flaky", json!({}));

    let outcome = f.dispatcher.execute(&e).await;

    assert_code(&outcome, OutcomeCode::Ok);
    let statuses: Vec<AttemptStatus> = outcome.attempts.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [
            AttemptStatus::Status(503),
            AttemptStatus::Status(503),
            AttemptStatus::Status(200)
        ]
    );
    let requests = received(&server).await;
    assert_eq!(requests.len(), 3);
    for req in &requests {
        assert_eq!(
            header(req, "idempotency-key"),
            Some(e.event_id.as_str()),
            "every retry carries the same idempotency key"
        );
        assert_eq!(body_json(req), json!({ "a": 1 }));
    }
}

#[tokio::test]
async fn http_400_is_final_after_one_call() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({ "error": "bad phone" })))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "bad",
        &format!("{}/bad", server.uri()),
        json!({ "retry": { "max_attempts": 5 } }),
    )]);

    let outcome = f.dispatcher.execute(&event("bad", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Http(400));
    assert_eq!(outcome.code.to_string(), "http_400");
    assert_eq!(outcome.attempts.len(), 1);
    assert_eq!(
        outcome.error_response,
        Some(json!({ "error": "bad phone" }))
    );
    assert_eq!(received(&server).await.len(), 1);
}

#[tokio::test]
async fn http_401_with_bearer_is_final_and_the_token_never_leaks_into_the_outcome() {
    let token = "tok-6c1f0e9a7b2d4e8f";
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({ "error": format!("token {token} is revoked") })),
        )
        .expect(1)
        .mount(&server)
        .await;
    let f = load_with_files(
        &[action(
            "bearer",
            &format!("{}/bearer", server.uri()),
            json!({
                "auth": { "type": "bearer", "token": "${file:token.txt}" },
                "retry": { "max_attempts": 3 }
            }),
        )],
        &[("token.txt", &format!("{token}\n"))],
    );

    let outcome = f.dispatcher.execute(&event("bearer", json!({}))).await;

    let requests = received(&server).await;
    assert_eq!(
        requests.len(),
        1,
        "a static bearer token is not retried on 401"
    );
    assert_eq!(
        header(&requests[0], "authorization"),
        Some(format!("Bearer {token}").as_str())
    );
    assert_code(&outcome, OutcomeCode::Http(401));
    assert_eq!(outcome.attempts.len(), 1);
    assert_eq!(
        outcome.error_response,
        Some(json!({ "error": "token *** is revoked" })),
        "the secret is masked in the captured error response"
    );
    assert!(!format!("{outcome:?}").contains(token));
}

#[tokio::test]
async fn http_500_forever_exhausts_max_attempts_and_captures_the_error_response() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(500).set_body_json(json!({ "error": "boom", "code": 17 })),
        )
        .expect(3)
        .mount(&server)
        .await;
    let f = load(&[action(
        "broken",
        &format!("{}/broken", server.uri()),
        json!({ "retry": { "max_attempts": 3 } }),
    )]);

    let outcome = f.dispatcher.execute(&event("broken", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Http(500));
    assert_eq!(outcome.attempts.len(), 3);
    assert!(outcome
        .attempts
        .iter()
        .all(|a| a.status == AttemptStatus::Status(500)));
    assert_eq!(outcome.response, None);
    assert_eq!(
        outcome.error_response,
        Some(json!({ "error": "boom", "code": 17 }))
    );
    assert_eq!(received(&server).await.len(), 3);
}

#[tokio::test]
async fn hanging_endpoint_times_out_on_every_attempt() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .expect(2)
        .mount(&server)
        .await;
    let timeout = Duration::from_millis(300);
    let f = load(&[action(
        "hangs",
        &format!("{}/hangs", server.uri()),
        json!({
            "endpoint": { "timeout": "300ms" },
            "retry": { "max_attempts": 2, "retry_on": ["timeout"] }
        }),
    )]);

    let outcome = f.dispatcher.execute(&event("hangs", json!({}))).await;

    assert_code(&outcome, OutcomeCode::TimedOut);
    assert_eq!(outcome.attempts.len(), 2);
    for attempt in &outcome.attempts {
        assert_eq!(attempt.status, AttemptStatus::Timeout);
        assert!(
            attempt.duration >= timeout,
            "an attempt gave up after {:?}, before the {timeout:?} timeout",
            attempt.duration
        );
    }
    assert_eq!(received(&server).await.len(), 2);
}

#[tokio::test]
async fn connection_refused_is_error_and_retried_when_connect_is_listed() {
    let (port, _held) = closed_port();
    let url = format!("http://127.0.0.1:{port}/nobody");
    let f = load(&[
        action(
            "refused_retried",
            &url,
            json!({ "retry": { "max_attempts": 3, "retry_on": ["connect"] } }),
        ),
        action(
            "refused_final",
            &url,
            json!({ "retry": { "max_attempts": 3, "retry_on": ["5xx"] } }),
        ),
    ]);

    let retried = f
        .dispatcher
        .execute(&event("refused_retried", json!({})))
        .await;
    let final_ = f
        .dispatcher
        .execute(&event("refused_final", json!({})))
        .await;

    assert_code(&retried, OutcomeCode::Error);
    assert_eq!(retried.attempts.len(), 3, "{retried:#?}");
    assert!(retried
        .attempts
        .iter()
        .all(|a| a.status == AttemptStatus::Error));
    assert!(retried.error.is_some());
    assert_code(&final_, OutcomeCode::Error);
    assert_eq!(
        final_.attempts.len(),
        1,
        "connect not in retry_on: no retry"
    );
}

#[tokio::test]
async fn transport_errors_never_carry_a_query_secret() {
    let key = "key-3f9a1c7e5b2d4068";
    let (port, _held) = closed_port();
    let f = load_with_files(
        &[action(
            "keyed",
            &format!("http://127.0.0.1:{port}/nobody"),
            json!({
                "auth": { "type": "api_key", "name": "api_key", "value": "${file:key.txt}", "in": "query" },
                "retry": { "max_attempts": 1 }
            }),
        )],
        &[("key.txt", key)],
    );

    let outcome = f.dispatcher.execute(&event("keyed", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Error);
    let error = outcome.error.as_deref().unwrap_or_default();
    assert!(!error.is_empty());
    assert!(
        !error.contains(key),
        "the secret leaks into the error: {error}"
    );
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let server = MockServer::start().await;
    let (script, arrivals) = Scripted::new(vec![
        ResponseTemplate::new(429).insert_header("Retry-After", "2"),
        ResponseTemplate::new(200),
    ]);
    Mock::given(any())
        .respond_with(script)
        .expect(2)
        .mount(&server)
        .await;
    // The backoff alone would wait at most 10 ms: only Retry-After explains a 2 s wait.
    let f = load(&[action(
        "limited",
        &format!("{}/limited", server.uri()),
        json!({ "retry": { "max_attempts": 3, "initial_backoff": "10ms", "max_backoff": "5s" } }),
    )]);

    let outcome = f.dispatcher.execute(&event("limited", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Ok);
    let at = arrivals_of(&arrivals);
    assert_eq!(at.len(), 2);
    let gap = at[1] - at[0];
    assert!(
        gap >= Duration::from_secs(2),
        "the retry arrived {gap:?} after the 429 with Retry-After: 2"
    );
}

#[tokio::test]
async fn retry_after_as_an_http_date_on_503_is_honoured() {
    // Whole seconds only: a date 4 s ahead of a truncated "now" is more than 3 s away.
    let now = std::time::SystemTime::now();
    let whole = now
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let date = std::time::UNIX_EPOCH + Duration::from_secs(whole + 4);
    let server = MockServer::start().await;
    let (script, arrivals) = Scripted::new(vec![
        ResponseTemplate::new(503)
            .insert_header("Retry-After", httpdate::fmt_http_date(date).as_str()),
        ResponseTemplate::new(200),
    ]);
    Mock::given(any())
        .respond_with(script)
        .expect(2)
        .mount(&server)
        .await;
    let f = load(&[action(
        "dated",
        &format!("{}/dated", server.uri()),
        json!({ "retry": { "max_attempts": 3, "initial_backoff": "10ms", "max_backoff": "10s" } }),
    )]);

    let outcome = f.dispatcher.execute(&event("dated", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Ok);
    let at = arrivals_of(&arrivals);
    assert_eq!(at.len(), 2);
    let gap = at[1] - at[0];
    assert!(
        gap >= Duration::from_millis(2500),
        "the retry arrived {gap:?} after a 503 asking to wait until {}",
        httpdate::fmt_http_date(date)
    );
}

#[tokio::test]
async fn max_elapsed_stops_retries() {
    let server = MockServer::start().await;
    let (script, arrivals) = Scripted::new(vec![
        ResponseTemplate::new(503).insert_header("Retry-After", "1")
    ]);
    Mock::given(any())
        .respond_with(script)
        .expect(2)
        .mount(&server)
        .await;
    // Retries 1 s apart: the second attempt starts ~1 s in, a third would
    // start ~2 s in, past max_elapsed, so it never starts.
    let f = load(&[action(
        "slowly_failing",
        &format!("{}/down", server.uri()),
        json!({
            "retry": {
                "max_attempts": 10, "initial_backoff": "10ms",
                "max_backoff": "5s", "max_elapsed": "1800ms"
            }
        }),
    )]);

    let outcome = f
        .dispatcher
        .execute(&event("slowly_failing", json!({})))
        .await;

    assert_code(&outcome, OutcomeCode::Http(503));
    assert_eq!(outcome.attempts.len(), 2);
    assert_eq!(arrivals_of(&arrivals).len(), 2);
}

// ---------------------------------------------------------------------------
// §4 response, §5.3 Response capture
// ---------------------------------------------------------------------------

#[tokio::test]
async fn json_body_of_a_2xx_is_captured_as_json() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({ "message_id": "m-9", "n": [1, 2] })),
        )
        .mount(&server)
        .await;
    let f = load(&[action("capture", &format!("{}/c", server.uri()), json!({}))]);

    let outcome = f.dispatcher.execute(&event("capture", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Ok);
    assert_eq!(
        outcome.response,
        Some(json!({ "message_id": "m-9", "n": [1, 2] }))
    );
    assert_eq!(outcome.error_response, None);
    assert_eq!(outcome.error, None);
}

#[tokio::test]
async fn cut_or_non_json_response_is_captured_as_text() {
    let server = MockServer::start().await;
    Mock::given(path("/json"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({ "message_id": "m-123456789" })),
        )
        .mount(&server)
        .await;
    Mock::given(path("/text"))
        .respond_with(ResponseTemplate::new(200).set_body_string("queued, thanks"))
        .mount(&server)
        .await;
    Mock::given(path("/bytes"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(b"{\"a\":\"\xff\"}".to_vec()))
        .mount(&server)
        .await;
    let uri = server.uri();
    let f = load(&[
        action(
            "cut",
            &format!("{uri}/json"),
            json!({ "response": { "max_bytes": 10 } }),
        ),
        action("text", &format!("{uri}/text"), json!({})),
        action("bytes", &format!("{uri}/bytes"), json!({})),
        action(
            "no_capture",
            &format!("{uri}/json"),
            json!({ "response": { "capture": false } }),
        ),
    ]);

    let cut = f.dispatcher.execute(&event("cut", json!({}))).await;
    let text = f.dispatcher.execute(&event("text", json!({}))).await;
    let none = f.dispatcher.execute(&event("no_capture", json!({}))).await;
    let bytes = f.dispatcher.execute(&event("bytes", json!({}))).await;

    assert_code(&cut, OutcomeCode::Ok);
    assert_eq!(cut.response, Some(json!("{\"message_")));
    assert_code(&text, OutcomeCode::Ok);
    assert_eq!(text.response, Some(json!("queued, thanks")));
    assert_code(&none, OutcomeCode::Ok);
    assert_eq!(none.response, None);
    // JSON but for a byte that is not UTF-8: text, the byte replaced.
    assert_code(&bytes, OutcomeCode::Ok);
    assert_eq!(bytes.response, Some(json!("{\"a\":\"\u{fffd}\"}")));
}

// ---------------------------------------------------------------------------
// Redirects
// ---------------------------------------------------------------------------

/// Mounts `/r0 → /r1 → … → /r{hops-1} → /final` as 302s, and `/final` as 200.
async fn redirect_chain(server: &MockServer, hops: usize) {
    for i in 0..hops {
        let next = if i + 1 == hops {
            "/final".to_string()
        } else {
            format!("/r{}", i + 1)
        };
        Mock::given(path(format!("/r{i}")))
            .respond_with(ResponseTemplate::new(302).insert_header("Location", next.as_str()))
            .mount(server)
            .await;
    }
}

#[tokio::test]
async fn redirects_are_followed_up_to_five() {
    let server = MockServer::start().await;
    redirect_chain(&server, 5).await;
    Mock::given(path("/final"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "landed": true })))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "redirected",
        &format!("{}/r0", server.uri()),
        json!({ "endpoint": { "method": "GET" } }),
    )]);

    let outcome = f.dispatcher.execute(&event("redirected", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Ok);
    assert_eq!(outcome.response, Some(json!({ "landed": true })));
    assert_eq!(
        received(&server).await.len(),
        6,
        "5 redirects, then the target"
    );
}

#[tokio::test]
async fn more_than_five_redirects_is_error() {
    let server = MockServer::start().await;
    redirect_chain(&server, 6).await;
    Mock::given(path("/final"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let f = load(&[action(
        "loops",
        &format!("{}/r0", server.uri()),
        json!({ "endpoint": { "method": "GET" }, "retry": { "max_attempts": 1 } }),
    )]);

    let outcome = f.dispatcher.execute(&event("loops", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Error);
    let error = outcome.error.as_deref().unwrap_or_default();
    assert!(error.contains("redirect"), "{error}");
    assert!(received(&server)
        .await
        .iter()
        .all(|r| r.url.path() != "/final"));
}

#[tokio::test]
async fn a_302_on_a_post_is_final_not_a_silent_get() {
    // Following it would turn the POST into a body-less GET and report `ok`
    // for a payload that never arrived.
    let server = MockServer::start().await;
    redirect_chain(&server, 1).await;
    Mock::given(path("/final"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let f = load(&[action(
        "posted",
        &format!("{}/r0", server.uri()),
        json!({ "payload": { "a": "{{ profile_id }}" } }),
    )]);

    let outcome = f.dispatcher.execute(&event("posted", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Http(302));
    let requests = received(&server).await;
    assert_eq!(requests.len(), 1, "only the POST, no follow-up GET");
    assert_eq!(requests[0].method.as_str(), "POST");
}

#[tokio::test]
async fn redirect_307_keeps_method_and_body() {
    let server = MockServer::start().await;
    Mock::given(path("/old"))
        .respond_with(ResponseTemplate::new(307).insert_header("Location", "/new"))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path("/new"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "moved",
        &format!("{}/old", server.uri()),
        json!({ "payload": { "a": "{{ profile_id }}" } }),
    )]);

    let outcome = f.dispatcher.execute(&event("moved", json!({}))).await;

    assert_code(&outcome, OutcomeCode::Ok);
    let requests = received(&server).await;
    let new = requests
        .iter()
        .find(|r| r.url.path() == "/new")
        .expect("the redirect was followed");
    assert_eq!(new.method.as_str(), "POST");
    assert_eq!(body_json(new), json!({ "a": "p-12345" }));
}

// ---------------------------------------------------------------------------
// §4 throttle and cap
// ---------------------------------------------------------------------------

/// A provider that answers 200 to `calls` calls and records when each came.
async fn timed_provider(calls: u64) -> (MockServer, Arrivals) {
    let server = MockServer::start().await;
    let (script, arrivals) = Scripted::new(vec![ResponseTemplate::new(200)]);
    Mock::given(any())
        .respond_with(script)
        .expect(calls)
        .mount(&server)
        .await;
    (server, arrivals)
}

/// Executes `n` events at once, taking turns among `actions`; all must end
/// `ok`. Returns the outcomes and the time from the first call's arrival at
/// the provider to the last's.
async fn run_all_at_once(
    f: &Fixture,
    actions: &[&str],
    n: usize,
    arrivals: &Arrivals,
) -> (Vec<Outcome>, Duration) {
    let events: Vec<ActionEvent> = (0..n)
        .map(|i| event(actions[i % actions.len()], json!({})))
        .collect();
    let outcomes = futures::future::join_all(events.iter().map(|e| f.dispatcher.execute(e))).await;
    assert_eq!(count(&outcomes, OutcomeCode::Ok), n, "{outcomes:#?}");
    let at = arrivals_of(arrivals);
    assert_eq!(at.len(), n);
    (outcomes, at[n - 1] - at[0])
}

#[tokio::test]
async fn rate_limit_spreads_calls_at_the_provider() {
    let (server, arrivals) = timed_provider(40).await;
    let f = load(&[action(
        "throttled",
        &format!("{}/t", server.uri()),
        json!({ "throttle": { "rate": "20/s", "burst": 1 } }),
    )]);

    let (_, span) = run_all_at_once(&f, &["throttled"], 40, &arrivals).await;

    assert!(
        span >= Duration::from_millis(1900),
        "40 calls at 20/s with burst 1 took only {span:?} at the provider"
    );
}

#[tokio::test]
async fn actions_sharing_a_throttle_key_share_one_budget() {
    let (server, arrivals) = timed_provider(40).await;
    let port = server.address().port();
    let throttle = json!({ "throttle": { "key": "shared-budget", "rate": "20/s", "burst": 1 } });
    // Different hosts, so only the explicit key can make them share.
    let f = load(&[
        action(
            "via_ip",
            &format!("http://127.0.0.1:{port}/a"),
            throttle.clone(),
        ),
        action("via_name", &format!("http://localhost:{port}/b"), throttle),
    ]);

    let (outcomes, span) = run_all_at_once(&f, &["via_ip", "via_name"], 40, &arrivals).await;

    assert!(
        span >= Duration::from_millis(1900),
        "20 + 20 calls on one 20/s budget took only {span:?}: the budgets are not shared"
    );
    assert!(outcomes
        .iter()
        .all(|o| o.limits_key.as_deref() == Some("shared-budget")));
}

#[tokio::test]
async fn without_a_key_actions_on_one_host_share_the_budget_one_of_them_declares() {
    let (server, arrivals) = timed_provider(40).await;
    // SPEC §4: the key defaults to the URL's host. Only one action declares
    // the rate; the other, on the same host, has no throttle section at all.
    let f = load(&[
        action(
            "declares",
            &format!("{}/a", server.uri()),
            json!({ "throttle": { "rate": "20/s", "burst": 1 } }),
        ),
        action("silent", &format!("{}/b", server.uri()), json!({})),
    ]);

    let (outcomes, span) = run_all_at_once(&f, &["declares", "silent"], 40, &arrivals).await;

    assert!(
        span >= Duration::from_millis(1900),
        "20 + 20 calls on one host's 20/s budget took only {span:?}: the host is not the key"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.limits_key.as_deref() == Some("127.0.0.1")),
        "{:?}",
        outcomes.iter().map(|o| &o.limits_key).collect::<Vec<_>>()
    );
}

/// Counts the calls in flight at a slow provider (wiremock cannot see when
/// a response is finished, so this one is a small axum server).
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
    total: AtomicUsize,
}

async fn slow_provider(delay: Duration) -> (String, Arc<InFlight>) {
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;

    let state = Arc::new(InFlight::default());
    let app = axum::Router::new()
        .route(
            "/slow",
            post(move |State(s): State<Arc<InFlight>>| async move {
                let n = s.now.fetch_add(1, Ordering::SeqCst) + 1;
                s.max.fetch_max(n, Ordering::SeqCst);
                s.total.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                s.now.fetch_sub(1, Ordering::SeqCst);
                StatusCode::OK
            }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (format!("http://{addr}"), state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_bounds_the_calls_in_flight() {
    let (base, provider) = slow_provider(Duration::from_millis(150)).await;
    let f = load(&[action(
        "bulkhead",
        &format!("{base}/slow"),
        json!({ "throttle": { "max_concurrency": 2 } }),
    )]);
    let events: Vec<ActionEvent> = (0..8).map(|_| event("bulkhead", json!({}))).collect();

    let outcomes = futures::future::join_all(events.iter().map(|e| f.dispatcher.execute(e))).await;

    assert_eq!(count(&outcomes, OutcomeCode::Ok), 8, "{outcomes:#?}");
    assert_eq!(provider.total.load(Ordering::SeqCst), 8);
    let max = provider.max.load(Ordering::SeqCst);
    assert!(max <= 2, "{max} calls were in flight at once");
}

#[tokio::test]
async fn cap_rejects_calls_beyond_max_calls_as_capped() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(5)
        .mount(&server)
        .await;
    let f = load(&[action(
        "capped",
        &format!("{}/cap", server.uri()),
        json!({ "cap": { "max_calls": 5, "per": "1m" } }),
    )]);

    let mut outcomes = Vec::new();
    for _ in 0..8 {
        outcomes.push(f.dispatcher.execute(&event("capped", json!({}))).await);
    }

    assert_eq!(received(&server).await.len(), 5);
    assert_eq!(count(&outcomes, OutcomeCode::Ok), 5);
    assert_eq!(count(&outcomes, OutcomeCode::Capped), 3);
    for o in outcomes.iter().filter(|o| o.code == OutcomeCode::Capped) {
        assert!(o.attempts.is_empty());
        assert_eq!(o.code.to_string(), "capped");
    }
}

// ---------------------------------------------------------------------------
// §5.1 expires_at
// ---------------------------------------------------------------------------

fn in_seconds(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs)).to_rfc3339()
}

#[tokio::test]
async fn event_past_its_expires_at_is_expired_and_not_sent() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let f = load(&[action("late", &format!("{}/late", server.uri()), json!({}))]);

    let outcome = f
        .dispatcher
        .execute(&event_with(
            "late",
            json!({}),
            json!({ "expires_at": in_seconds(-60) }),
        ))
        .await;

    assert_code(&outcome, OutcomeCode::Expired);
    assert!(outcome.attempts.is_empty());
    assert!(received(&server).await.is_empty());
}

#[tokio::test]
async fn retry_after_beyond_expires_at_ends_as_expired() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "30"))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "busy",
        &format!("{}/busy", server.uri()),
        json!({ "retry": { "max_attempts": 5, "max_backoff": "1m" } }),
    )]);

    let outcome = f
        .dispatcher
        .execute(&event_with(
            "busy",
            json!({}),
            json!({ "expires_at": in_seconds(5) }),
        ))
        .await;

    assert_code(&outcome, OutcomeCode::Expired);
    assert_eq!(outcome.attempts.len(), 1);
    assert_eq!(outcome.last_status(), Some(429));
    assert_eq!(received(&server).await.len(), 1);
}

#[tokio::test]
async fn throttled_past_expires_at_ends_as_expired() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "one_a_minute",
        &format!("{}/slow", server.uri()),
        json!({ "throttle": { "rate": "1/m", "burst": 1 } }),
    )]);

    let first = f
        .dispatcher
        .execute(&event("one_a_minute", json!({})))
        .await;
    let second = f
        .dispatcher
        .execute(&event_with(
            "one_a_minute",
            json!({}),
            json!({ "expires_at": in_seconds(1) }),
        ))
        .await;

    assert_code(&first, OutcomeCode::Ok);
    assert_code(&second, OutcomeCode::Expired);
    assert!(second.attempts.is_empty());
    assert_eq!(received(&server).await.len(), 1);
}

// ---------------------------------------------------------------------------
// The "send test request"
// ---------------------------------------------------------------------------

#[tokio::test]
async fn send_once_makes_exactly_one_call_without_retries_or_limits() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(503).set_body_string("try later"))
        .expect(1)
        .mount(&server)
        .await;
    let f = load(&[action(
        "probe",
        &format!("{}/probe", server.uri()),
        json!({
            "retry": { "max_attempts": 5 },
            "payload": { "p": "{{ profile_id }}" }
        }),
    )]);

    let reply = f
        .dispatcher
        .send_once(&event("probe", json!({})))
        .await
        .expect("the provider answered");

    assert_eq!(reply.status, 503);
    assert_eq!(&reply.body[..], b"try later");
    let requests = received(&server).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(body_json(&requests[0]), json!({ "p": "p-12345" }));
}
