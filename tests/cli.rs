//! The command line (SPEC §2): `validate`, `render` and `send` run as the real
//! binary, with exit codes, stdout and stderr checked as a user sees them.
//! `send` calls a wiremock provider on 127.0.0.1 and the tests check what it
//! received.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::closed_port;
use serde_json::{json, Value};
use tempfile::TempDir;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// What one run of the binary produced.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The binary with a clean environment for the settings it reads.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_journey-actions"));
    cmd.args(args).env_remove("RUST_LOG");
    for (name, _) in std::env::vars() {
        if name.starts_with("JOURNEY_ACTIONS__") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn finish(output: Output) -> Run {
    let run = Run {
        code: output.status.code().expect("the binary exited, not killed"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "the binary panicked: {}",
        run.stderr
    );
    run
}

fn run(args: &[&str]) -> Run {
    finish(command(args).output().expect("the binary starts"))
}

fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    finish(cmd.output().expect("the binary starts"))
}

/// Runs the binary off the async runtime (the provider keeps answering).
async fn run_async(args: Vec<String>) -> Run {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args)
    })
    .await
    .expect("the blocking run finished")
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn shipped_config() -> PathBuf {
    manifest_dir().join("config")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A config directory with `actions/` holding the given `(file name, content)`s.
fn config_with(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let actions = dir.path().join("actions");
    std::fs::create_dir(&actions).expect("actions dir");
    for (name, content) in files {
        std::fs::write(actions.join(name), content).expect("write action");
    }
    dir
}

fn write_event(dir: &TempDir, name: &str, event: &Value) -> PathBuf {
    let file = dir.path().join(name);
    std::fs::write(&file, serde_json::to_vec_pretty(event).expect("event JSON"))
        .expect("write event");
    file
}

/// The `render` output split into request line, headers and body.
struct Rendered {
    request_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn parse_render(stdout: &str) -> Rendered {
    let (head, body) = stdout
        .split_once("\n\n")
        .unwrap_or_else(|| panic!("no blank line between headers and body:\n{stdout}"));
    let mut lines = head.lines();
    let request_line = lines.next().expect("a request line").to_string();
    let headers = lines
        .map(|l| {
            let (name, value) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("not a header line: {l:?}"));
            (name.to_ascii_lowercase(), value.to_string())
        })
        .collect();
    Rendered {
        request_line,
        headers,
        body: body.trim_end_matches('\n').to_string(),
    }
}

impl Rendered {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A command that failed on a problem the user can fix: exit 1 and a single
/// `error: …` line on stderr that contains `piece`.
fn assert_fails_with(run: &Run, piece: &str) {
    assert_eq!(run.code, 1, "{run:#?}");
    let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one stderr line, got:\n{}",
        run.stderr
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    assert!(run.stderr.contains(piece), "{piece:?} in {}", run.stderr);
}

// ---------------------------------------------------------------------------
// validate
// ---------------------------------------------------------------------------

#[test]
fn validate_accepts_the_shipped_config() {
    let config = shipped_config();

    let run = run(&["--config", path_str(&config), "validate"]);

    assert_eq!(run.code, 0, "{run:#?}");
    for id in [
        "crm_webhook",
        "email_send",
        "push_notification",
        "sms_gateway",
    ] {
        assert!(run.stdout.contains(id), "{id} not listed: {}", run.stdout);
    }
}

/// A valid action, with `{ID}` to fill in.
const VALID: &str = r#"
id: {ID}
endpoint:
  method: POST
  url: "https://provider.example.com/v1/{{ params.account }}"
parameters:
  account: { type: string, required: true }
payload:
  account: "{{ params.account }}"
"#;

fn valid(id: &str) -> String {
    VALID.replace("{ID}", id)
}

#[test]
fn validate_reports_one_line_per_problem_with_file_and_field() {
    let files: Vec<(&str, String)> = vec![
        ("bad_id.yaml", valid("bad-id!")),
        ("dup_a.yaml", valid("dup_action")),
        ("dup_b.yaml", valid("dup_action")),
        (
            "unknown_top.yaml",
            format!("{}nmae: typo\n", valid("unknown_top")),
        ),
        (
            "unknown_nested.yaml",
            valid("unknown_nested").replace("  method: POST\n", "  method: POST\n  verb: POST\n"),
        ),
        (
            "bad_method.yaml",
            valid("bad_method").replace("method: POST", "method: FETCH"),
        ),
        (
            "get_payload.yaml",
            valid("get_payload").replace("method: POST", "method: GET"),
        ),
        (
            "bad_duration.yaml",
            valid("bad_duration")
                .replace("  method: POST\n", "  method: POST\n  timeout: 5 parsecs\n"),
        ),
        (
            "bad_rate.yaml",
            format!("{}throttle:\n  rate: fast\n", valid("bad_rate")),
        ),
        (
            "syntax.yaml",
            valid("syntax").replace(
                "  account: \"{{ params.account }}\"",
                "  text: \"line one\\n{{ params.account | }}\"",
            ),
        ),
        (
            "undeclared.yaml",
            valid("undeclared").replace(
                "  account: \"{{ params.account }}\"",
                "  to: \"{{ params.phone }}\"",
            ),
        ),
        (
            "secret.yaml",
            format!(
                "{}auth:\n  type: bearer\n  token: \"${{env:NOPE_NOT_SET}}\"\n",
                valid("secret")
            ),
        ),
        (
            "broken_yaml.yaml",
            "id: broken_yaml\nendpoint: [unclosed\n".to_string(),
        ),
        (
            "broken_json.json",
            "{ \"id\": \"broken_json\", }".to_string(),
        ),
    ];
    let file_refs: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let config = config_with(&file_refs);
    let actions = config.path().join("actions");
    // (file, field, a piece of the message)
    let expected = [
        ("bad_id.yaml", "id", "bad-id!"),
        ("dup_b.yaml", "id", "dup_a.yaml"),
        ("unknown_top.yaml", "nmae", "unknown field"),
        ("unknown_nested.yaml", "endpoint.verb", "unknown field"),
        ("bad_method.yaml", "endpoint.method", "FETCH"),
        ("get_payload.yaml", "payload", "GET"),
        ("bad_duration.yaml", "endpoint.timeout", "5 parsecs"),
        ("bad_rate.yaml", "throttle.rate", "fast"),
        ("syntax.yaml", "payload.text", "line 2"),
        ("undeclared.yaml", "payload.to", "phone"),
        ("secret.yaml", "auth.token", "NOPE_NOT_SET"),
        ("broken_yaml.yaml", "-", "YAML"),
        ("broken_json.json", "-", "JSON"),
    ];

    let mut cmd = command(&["--config", path_str(config.path()), "validate"]);
    cmd.env_remove("NOPE_NOT_SET");
    let run = finish(cmd.output().expect("the binary starts"));

    assert_eq!(run.code, 1, "{run:#?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per problem expected:\n{}",
        run.stdout
    );
    for (file, field, piece) in expected {
        let prefix = format!("{}: {field}: ", actions.join(file).display());
        let hits: Vec<&&str> = lines.iter().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(
            hits.len(),
            1,
            "expected one `{prefix}…` line:\n{}",
            run.stdout
        );
        assert!(
            hits[0].contains(piece),
            "{:?} should mention {piece:?}",
            hits[0]
        );
    }
    assert!(
        !run.stdout.contains("dup_a.yaml: "),
        "the first definition of an id is fine"
    );
}

// ---------------------------------------------------------------------------
// render
// ---------------------------------------------------------------------------

#[test]
fn render_prints_each_shipped_example_with_secrets_masked() {
    let config = shipped_config();
    let table = [
        (
            "sms_gateway",
            "POST https://sms.example.com/v1/accounts/acme/messages?locale=fr",
        ),
        (
            "crm_webhook",
            "PUT https://crm.example.com/hooks/journeys/onboarding/profiles/p-12345",
        ),
        (
            "email_send",
            "POST https://api.mailer.example.com/v3/mail/send",
        ),
        (
            "push_notification",
            "POST https://push.example.com/api/v2/apps/shop-ios/notifications",
        ),
    ];
    let secrets: Vec<String> = std::fs::read_dir(config.join("secrets"))
        .expect("config/secrets")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_none())
        .map(|p| {
            std::fs::read_to_string(&p)
                .expect("secret file")
                .trim()
                .to_string()
        })
        .collect();
    assert!(!secrets.is_empty());

    for (action, request_line) in table {
        let event_file = manifest_dir()
            .join("examples/events")
            .join(format!("{action}.json"));
        let event: Value =
            serde_json::from_str(&std::fs::read_to_string(&event_file).expect("example event"))
                .expect("example event is JSON");

        let run = run(&[
            "--config",
            path_str(&config),
            "render",
            "--action",
            action,
            "--event",
            path_str(&event_file),
        ]);

        assert_eq!(run.code, 0, "{action}: {run:#?}");
        let r = parse_render(&run.stdout);
        assert_eq!(r.request_line, request_line, "{action}");
        assert_eq!(
            r.header("idempotency-key"),
            event["event_id"].as_str(),
            "{action}"
        );
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{action}"
        );
        let body: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{action}: body is not JSON ({e}): {}", r.body));
        assert!(body.is_object(), "{action}");
        for secret in &secrets {
            assert!(
                !run.stdout.contains(secret.as_str()),
                "{action}: a secret is printed:\n{}",
                run.stdout
            );
        }
    }
}

#[test]
fn render_of_the_sms_example_is_the_exact_request() {
    let config = shipped_config();
    let event_file = manifest_dir().join("examples/events/sms_gateway.json");

    let run = run(&[
        "--config",
        path_str(&config),
        "render",
        "--action",
        "sms_gateway",
        "--event",
        path_str(&event_file),
    ]);

    assert_eq!(run.code, 0, "{run:#?}");
    let r = parse_render(&run.stdout);
    assert_eq!(r.header("authorization"), Some("Bearer ***"));
    assert_eq!(r.header("x-api-version"), Some("2"));
    assert_eq!(r.header("x-journey"), Some("welcome"));
    let body: Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(
        body,
        json!({
            "to": "+33612345678",
            "text": "Hello Zoë!",
            "amount": 12.5,
            "tags": ["vip", "fr"],
            "source": "journey"
        })
    );
}

const SECRET_ACTIONS: &[(&str, &str)] = &[
    (
        "bearer_secret.yaml",
        r#"
id: bearer_secret
endpoint:
  method: POST
  url: "https://provider.example.com/v1/send"
  headers:
    X-Api-Key: "${env:JA_CLI_TEST_KEY}"
auth:
  type: bearer
  token: "${env:JA_CLI_TEST_TOKEN}"
payload:
  key: "k-${env:JA_CLI_TEST_KEY}"
  profile: "{{ profile_id }}"
"#,
    ),
    (
        "query_secret.yaml",
        r#"
id: query_secret
endpoint:
  method: GET
  url: "https://provider.example.com/v1/lookup"
  query:
    q: "{{ profile_id }}"
auth:
  type: api_key
  name: api_key
  value: "${env:JA_CLI_TEST_KEY}"
  in: query
"#,
    ),
];

#[test]
fn render_never_prints_secrets() {
    let token = "tok-5e0b2c9d71f4a8e6";
    let key = "key-0d9e8f7a6b5c4d3e";
    let config = config_with(SECRET_ACTIONS);
    let event = write_event(
        &config,
        "event.json",
        &json!({ "event_id": "e-1", "profile_id": "p-1" }),
    );
    let env = [("JA_CLI_TEST_TOKEN", token), ("JA_CLI_TEST_KEY", key)];

    let bearer = run_with_env(
        &[
            "--config",
            path_str(config.path()),
            "render",
            "--action",
            "bearer_secret",
            "--event",
            path_str(&event),
        ],
        &env,
    );
    let query = run_with_env(
        &[
            "--config",
            path_str(config.path()),
            "render",
            "--action",
            "query_secret",
            "--event",
            path_str(&event),
        ],
        &env,
    );

    for run in [&bearer, &query] {
        assert_eq!(run.code, 0, "{run:#?}");
        for secret in [token, key] {
            assert!(
                !run.stdout.contains(secret),
                "secret printed:\n{}",
                run.stdout
            );
            assert!(
                !run.stderr.contains(secret),
                "secret logged:\n{}",
                run.stderr
            );
        }
    }
    let r = parse_render(&bearer.stdout);
    assert_eq!(r.header("authorization"), Some("Bearer ***"));
    assert_eq!(r.header("x-api-key"), Some("***"));
    let body: Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(body, json!({ "key": "k-***", "profile": "p-1" }));
    let r = parse_render(&query.stdout);
    assert_eq!(
        r.request_line,
        "GET https://provider.example.com/v1/lookup?q=p-1&api_key=***"
    );
}

#[test]
fn render_shows_header_values_from_event_data_as_they_are_sent() {
    let config = config_with(&[(
        "named.yaml",
        r#"
id: named
endpoint:
  method: GET
  url: "https://provider.example.com/v1/profiles"
  headers:
    X-Name: "{{ params.name }}"
parameters:
  name: { type: string, required: true }
"#,
    )]);
    let event = write_event(
        &config,
        "event.json",
        &json!({ "params": { "name": "Zoë 👩‍💻" } }),
    );

    let run = run(&[
        "--config",
        path_str(config.path()),
        "render",
        "--action",
        "named",
        "--event",
        path_str(&event),
    ]);

    assert_eq!(run.code, 0, "{run:#?}");
    let r = parse_render(&run.stdout);
    assert_eq!(r.header("x-name"), Some("Zoë 👩‍💻"), "{}", run.stdout);
    assert_eq!(r.body, "", "a GET has no body");
}

#[test]
fn render_refuses_bad_input_with_one_error_line() {
    let config = shipped_config();
    let dir = tempfile::tempdir().expect("temp dir");
    let not_json = dir.path().join("not_json.json");
    std::fs::write(&not_json, "{ this is not json").expect("write");
    let not_object = write_event_in(dir.path(), "array.json", &json!([1, 2]));
    let mistyped = write_event_in(
        dir.path(),
        "mistyped.json",
        &json!({ "params": { "account": "acme", "phone": 33612345678u64 } }),
    );
    let missing = dir.path().join("does_not_exist.json");
    let good = manifest_dir().join("examples/events/sms_gateway.json");
    let cases = [
        ("sms_gateway", not_json.as_path(), "not valid JSON"),
        ("sms_gateway", not_object.as_path(), "invalid_event"),
        ("sms_gateway", mistyped.as_path(), "invalid_event"),
        ("sms_gateway", missing.as_path(), "does_not_exist.json"),
        ("no_such_action", good.as_path(), "no_such_action"),
    ];

    for (action, event, piece) in cases {
        let run = run(&[
            "--config",
            path_str(&config),
            "render",
            "--action",
            action,
            "--event",
            path_str(event),
        ]);

        assert!(
            run.stdout.is_empty(),
            "{action} {}: nothing rendered: {}",
            event.display(),
            run.stdout
        );
        assert_fails_with(&run, piece);
    }
}

fn write_event_in(dir: &Path, name: &str, event: &Value) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, serde_json::to_vec(event).expect("JSON")).expect("write");
    file
}

// ---------------------------------------------------------------------------
// send
// ---------------------------------------------------------------------------

fn send_action(uri: &str) -> String {
    format!(
        r#"
id: probe
endpoint:
  method: POST
  url: "{uri}/v1/messages/{{{{ params.account }}}}"
parameters:
  account: {{ type: string, required: true }}
payload:
  account: "{{{{ params.account }}}}"
  profile: "{{{{ profile_id }}}}"
retry:
  max_attempts: 5
  initial_backoff: 10ms
  max_backoff: 20ms
"#
    )
}

#[tokio::test]
async fn send_prints_the_answer_and_exits_0_on_2xx() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(201)
                .insert_header("X-Request-Id", "req-77")
                .set_body_json(json!({ "message_id": "m-9" })),
        )
        .expect(1)
        .mount(&server)
        .await;
    let config = config_with(&[("probe.yaml", &send_action(&server.uri()))]);
    let event = write_event(
        &config,
        "event.json",
        &json!({ "event_id": "e-42", "profile_id": "p-1", "params": { "account": "acme" } }),
    );

    let run = run_async(vec![
        "--config".into(),
        path_str(config.path()).into(),
        "send".into(),
        "--action".into(),
        "probe".into(),
        "--event".into(),
        path_str(&event).into(),
    ])
    .await;

    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stdout.starts_with("HTTP 201 Created\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .to_ascii_lowercase()
            .contains("x-request-id: req-77"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(r#"{"message_id":"m-9"}"#),
        "{}",
        run.stdout
    );
    let requests = server.received_requests().await.expect("recording");
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].url.path(), "/v1/messages/acme");
    assert_eq!(
        requests[0]
            .headers
            .get("idempotency-key")
            .map(|v| v.as_bytes()),
        Some(&b"e-42"[..])
    );
    let body: Value = serde_json::from_slice(&requests[0].body).expect("JSON body");
    assert_eq!(body, json!({ "account": "acme", "profile": "p-1" }));
}

#[tokio::test]
async fn send_exits_1_on_500_after_exactly_one_call() {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500).set_body_string("provider exploded"))
        .expect(1)
        .mount(&server)
        .await;
    let config = config_with(&[("probe.yaml", &send_action(&server.uri()))]);
    let event = write_event(
        &config,
        "event.json",
        &json!({ "params": { "account": "acme" } }),
    );

    let run = run_async(vec![
        "--config".into(),
        path_str(config.path()).into(),
        "send".into(),
        "--action".into(),
        "probe".into(),
        "--event".into(),
        path_str(&event).into(),
    ])
    .await;

    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stdout.starts_with("HTTP 500 Internal Server Error\n"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("provider exploded"), "{}", run.stdout);
    let requests = server.received_requests().await.expect("recording");
    assert_eq!(requests.len(), 1, "send makes one call, no retries");
}

#[test]
fn send_exits_1_with_one_error_line_when_the_provider_is_unreachable() {
    let (port, _held) = closed_port();
    let config = config_with(&[(
        "probe.yaml",
        &send_action(&format!("http://127.0.0.1:{port}")),
    )]);
    let event = write_event(
        &config,
        "event.json",
        &json!({ "params": { "account": "acme" } }),
    );

    let run = run(&[
        "--config",
        path_str(config.path()),
        "send",
        "--action",
        "probe",
        "--event",
        path_str(&event),
    ]);

    // The outcome code is named.
    assert_fails_with(&run, "error: error:");
}

#[test]
fn validate_rejects_unknown_settings_keys_with_one_error_line() {
    let config = config_with(&[("ok.yaml", &valid("ok"))]);
    std::fs::write(
        config.path().join("default.toml"),
        "[dispatch]\nmax_inflight = 3\n",
    )
    .expect("write default.toml");

    let run = run(&["--config", path_str(config.path()), "validate"]);

    assert_fails_with(&run, "max_inflight");
}

// ---------------------------------------------------------------------------
// usage
// ---------------------------------------------------------------------------

#[test]
fn help_works_for_every_verb() {
    let top = run(&["--help"]);
    assert_eq!(top.code, 0, "{top:#?}");
    // The `Commands:` list, one verb per line.
    let listed: Vec<&str> = top
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for verb in ["run", "demo", "bench", "validate", "render", "send"] {
        assert!(
            listed.contains(&verb),
            "{verb} missing from --help: {listed:?}"
        );
    }
    assert!(!listed.contains(&"bench-sink"), "the sink's role is hidden");
    for (verb, flags) in [
        ("render", &["--action", "--event"][..]),
        ("send", &["--action", "--event"][..]),
        ("demo", &["--events", "--exit", "--brokers"][..]),
        (
            "bench",
            &[
                "--events",
                "--concurrency",
                "--actions",
                "--ordering",
                "--sink-latency",
                "--brokers",
                "--rate",
                "--json",
            ][..],
        ),
    ] {
        let run = run(&[verb, "--help"]);
        assert_eq!(run.code, 0, "{verb} --help: {run:#?}");
        assert!(run.stdout.contains("Usage"), "{verb}: {}", run.stdout);
        for flag in flags {
            assert!(run.stdout.contains(flag), "{verb} --help lacks {flag}");
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["validate", "--no-such-flag"][..],
        &["--no-such-flag", "validate"][..],
        &["render", "--event", "x.json"][..],
        &["no-such-verb"][..],
        &["bench", "--sink-latency", "soon"][..],
        &["bench", "--ordering", "random"][..],
        &["bench", "--rate", "fast"][..],
        &["bench", "--rate", "0"][..],
        &["bench", "--rounds", "0"][..],
    ] {
        let run = run(args);
        assert_eq!(run.code, 2, "{args:?}: {run:#?}");
        assert!(run.stdout.is_empty());
        assert!(!run.stderr.is_empty());
    }
    // A count of zero is refused by name, not taken as one.
    for flag in [
        "--events",
        "--concurrency",
        "--keys",
        "--partitions",
        "--max-concurrency",
    ] {
        let run = run(&["bench", flag, "0"]);
        assert_eq!(run.code, 2, "{flag} 0: {run:#?}");
        assert!(run.stdout.is_empty(), "{flag} 0: {run:#?}");
        assert!(
            run.stderr
                .contains(&format!("invalid value '0' for '{flag}")),
            "{flag} 0: {}",
            run.stderr
        );
    }
}

// ---------------------------------------------------------------------------
// configuration from the environment (SPEC §3)
// ---------------------------------------------------------------------------

#[test]
fn environment_variables_override_the_files_and_misspelt_ones_are_refused() {
    // default.toml points at an empty directory; the environment points at
    // the one holding a broken action, and validate must read that one.
    let config = config_with(&[("broken.yaml", "id: broken\n")]);
    let empty = config.path().join("nothing-here");
    std::fs::create_dir(&empty).expect("mkdir");
    std::fs::write(
        config.path().join("default.toml"),
        "[actions]\ndir = \"nothing-here\"\n",
    )
    .expect("write default.toml");
    let args = ["--config", path_str(config.path()), "validate"];

    let from_file = run(&args);
    assert_eq!(from_file.code, 0, "the file's empty dir: {from_file:#?}");

    let overridden = run_with_env(&args, &[("JOURNEY_ACTIONS__ACTIONS__DIR", "actions")]);
    assert_eq!(overridden.code, 1, "{overridden:#?}");
    assert!(overridden.stdout.contains("broken.yaml"), "{overridden:#?}");

    let misspelt = run_with_env(&args, &[("JOURNEY_ACTIONS__DISPATCH__MAX_INFLIGHT", "3")]);
    assert_fails_with(&misspelt, "max_inflight");

    let zero = run_with_env(&args, &[("JOURNEY_ACTIONS__DISPATCH__MAX_IN_FLIGHT", "0")]);
    assert_fails_with(&zero, "max_in_flight");
}

#[test]
fn bench_refuses_a_config_that_is_not_a_directory() {
    let run = run(&[
        "bench",
        "--config",
        "/nonexistent/journey-actions",
        "--events",
        "10",
    ]);
    assert_fails_with(
        &run,
        "--config /nonexistent/journey-actions: not a directory",
    );
}

#[test]
fn bench_refuses_a_json_path_it_cannot_write_before_running() {
    let run = run(&[
        "bench",
        "--json",
        "/nonexistent/journey-actions/bench.json",
        "--events",
        "10",
    ]);
    // One line: nothing ran (no progress lines, no table).
    assert_fails_with(
        &run,
        "--json /nonexistent/journey-actions/bench.json: /nonexistent/journey-actions does not exist",
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}
