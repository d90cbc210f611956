//! `journey-actions bench` run as a user runs it (the binary, the in-process
//! mock cluster, the sink in its own process): what it prints and writes to
//! `--json` must hold together, and nothing may be lost. Timings are only
//! checked where a policy sets a floor (the sink's latency).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs `bench` with `args` and `--json` (one round unless `args` say
/// otherwise), and returns its stdout and the JSON.
fn bench(args: &[&str]) -> (String, Value) {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_journey-actions"));
    command.arg("bench").args(args);
    if !args.contains(&"--rounds") {
        command.args(["--rounds", "1"]);
    }
    let output = command
        .arg("--json")
        .arg(&json)
        // No configuration directory: bench uses the defaults.
        .current_dir(dir.path())
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (stdout, read_json(&json))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("bench wrote --json");
    serde_json::from_str(&text).expect("--json is JSON")
}

fn number(v: &Value, path: &str) -> f64 {
    let mut at = v;
    for part in path.split('.') {
        at = &at[part];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {at}"))
}

/// The percentiles of one latency figure, in order.
fn percentiles(v: &Value, figure: &str) -> [f64; 4] {
    ["p50", "p99", "p999", "max"].map(|p| number(v, &format!("end_to_end.{figure}.{p}")))
}

fn assert_ordered(figure: &str, p: [f64; 4]) {
    assert!(
        p.windows(2).all(|w| w[0] <= w[1]),
        "{figure}: percentiles out of order: {p:?}"
    );
}

#[test]
fn every_phase_sees_every_event_and_the_figures_agree() {
    let events = 1500;
    let (stdout, report) = bench(&[
        "--events",
        "1500",
        "--keys",
        "100",
        "--concurrency",
        "64",
        "--sink-latency",
        "5ms",
        "--rounds",
        "2",
    ]);

    // 100 keys and 64 in flight: limit A makes the worker's 64 calls at once.
    assert_eq!(
        report["http_concurrency"],
        serde_json::json!({"calls": 64, "by": "--concurrency"})
    );
    assert!(!stdout.contains("limit A makes"), "{stdout}");

    // Two rounds ran; the phases reported are those of the round with the
    // median ratio (of two, the lower), and the peak RSS is the first's.
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    let shown = number(&report, "shown_round") as usize;
    let ratios: Vec<f64> = rounds.iter().map(|r| number(r, "ratio")).collect();
    assert_eq!(
        ratios[shown - 1],
        ratios[0].min(ratios[1]),
        "round {shown} of {ratios:?}"
    );
    let round = &rounds[shown - 1];
    for (top, of_round) in [
        ("limit_http.per_second", "limit_http_per_second"),
        ("limit_kafka.per_second", "limit_kafka_per_second"),
        ("end_to_end.events_per_second", "end_to_end_per_second"),
        ("end_to_end.ratio", "ratio"),
        (
            "end_to_end.cpu_seconds_per_10k",
            "end_to_end_cpu_seconds_per_10k",
        ),
    ] {
        assert_eq!(number(&report, top), number(round, of_round), "{top}");
    }
    assert_eq!(
        number(&report, "end_to_end.peak_rss_mib"),
        number(&rounds[0], "peak_rss_mib")
    );
    assert!(
        stdout.contains(&format!(
            "the phases above are round {shown} of 2, the median ratio; every round's ratio: {:.2}  {:.2}",
            ratios[0], ratios[1]
        )),
        "{stdout}"
    );

    // Counted as they happen: answers read, events consumed.
    for phase in ["limit_http", "limit_kafka", "kafka_round_trip"] {
        assert_eq!(
            number(&report, &format!("{phase}.count")),
            events as f64,
            "{phase}"
        );
        assert!(
            number(&report, &format!("{phase}.per_second")) > 0.0,
            "{phase}"
        );
    }
    let e2e = &report["end_to_end"];
    assert_eq!(
        e2e["outcomes"],
        serde_json::json!({ "ok": events }),
        "every event ends ok"
    );
    // Without --rate no event is left out of the latency figures (a rate
    // run leaves out its first second: see the --rate test).
    assert_eq!(number(&report, "end_to_end.latency_events"), events as f64);

    // The ratio is end-to-end over the lower limit.
    let limit =
        number(&report, "limit_http.per_second").min(number(&report, "limit_kafka.per_second"));
    let ratio = number(&report, "end_to_end.ratio");
    let expected = number(&report, "end_to_end.events_per_second") / limit;
    assert!(
        (ratio - expected).abs() < 1e-9,
        "ratio {ratio}, expected {expected}"
    );
    assert!(
        stdout.contains(&format!("ratio end-to-end / min(A, B): {ratio:.2}")),
        "the table prints the same ratio:\n{stdout}"
    );

    // Each event waited for the sink's 5 ms; "added" is what is left.
    let latency = percentiles(&report, "latency_ms");
    let added = percentiles(&report, "added_latency_ms");
    let acked = percentiles(&report, "acked_latency_ms");
    assert!(
        latency[0] >= 5.0,
        "p50 {} ms is under the sink's 5 ms",
        latency[0]
    );
    for (l, a) in latency.iter().zip(added) {
        assert!((l - 5.0 - a).abs() < 1e-6, "added {a} is not {l} - 5");
    }
    // The records are acknowledged after the outcome.
    assert!(
        acked[0] >= latency[0],
        "acked p50 {acked:?} before the outcome {latency:?}"
    );
    for (figure, p) in [("latency", latency), ("acked", acked)] {
        assert_ordered(figure, p);
    }
    // Every call's exchange waited for the sink, in both phases; an event's
    // exchange is part of its latency, and the rest is what the worker adds.
    for figure in ["end_to_end.exchange_ms", "limit_http.exchange_ms"] {
        let [mean, p50, p99] =
            ["mean", "p50", "p99"].map(|p| number(&report, &format!("{figure}.{p}")));
        assert!(
            mean >= 5.0 && p50 >= 5.0,
            "{figure}: mean {mean} p50 {p50} p99 {p99} ms"
        );
    }
    assert!(number(&report, "end_to_end.exchange_ms.p50") <= latency[0] + 1e-9);
    let besides = number(&report, "end_to_end.besides_exchange_ms.p50");
    assert!(
        besides <= latency[0] - 5.0 + 1e-9,
        "{besides} ms besides the exchange, p50 latency {latency:?}"
    );
    assert!(
        stdout.contains("in the HTTP exchange (sent → answer read)")
            && stdout.contains("limit A's calls, timed the same way:"),
        "{stdout}"
    );

    assert!(number(&report, "end_to_end.peak_rss_mib") > 0.0);
    assert!(number(&report, "end_to_end.cpu_seconds_per_10k") > 0.0);
    assert!(number(&report, "parse_render_us") > 0.0);
    // This process's CPU by kind of thread adds up to its CPU per event (or
    // call); the end-to-end phase runs the worker's tasks, its Kafka
    // clients and, on the mock cluster, the broker.
    for phase in [
        "end_to_end",
        "limit_http",
        "limit_kafka",
        "kafka_round_trip",
    ] {
        let by = ["runtime", "kafka_clients", "mock_broker", "other"]
            .map(|kind| number(&report, &format!("{phase}.cpu_by_thread_us.{kind}")));
        let per_10k = number(&report, &format!("{phase}.cpu_seconds_per_10k"));
        let sum_per_10k = by.iter().sum::<f64>() / 100.0;
        assert!(
            (sum_per_10k - per_10k).abs() <= 0.1 * per_10k + 0.005,
            "{phase}: by thread {by:?} µs per event, in all {per_10k} s per 10k"
        );
    }
    for kind in ["runtime", "kafka_clients", "mock_broker"] {
        assert!(
            number(&report, &format!("end_to_end.cpu_by_thread_us.{kind}")) > 0.0,
            "end-to-end: no CPU counted for {kind}"
        );
    }
    assert!(number(&report, "limit_http.cpu_by_thread_us.runtime") > 0.0);
    // Without --rate the worker's own fetch.wait.max.ms is kept.
    assert!(
        report["consumer_settings"]
            .get("fetch.wait.max.ms")
            .is_none(),
        "{}",
        report["consumer_settings"]
    );
    assert_eq!(report["sink_latency"], "5ms");
    assert_eq!(report["sink_protocol"], "http");
    assert_eq!(report["broker"], "mock");
    assert_eq!(
        report["limit_http"]["http_versions"],
        serde_json::json!({ "HTTP/1.1": events })
    );
    assert!(number(&report, "end_to_end.sink_connections") >= 1.0);
    // The warm-up: two calls per connection the worker will use, uncounted.
    assert_eq!(number(&report, "warm_up_calls"), 128.0);
    assert!(number(&report, "warm_up_connections") >= 1.0);
    for row in [
        "warm-up: 128 calls to the sink over",
        "limit A: HTTP to the sink",
        "limit B: Kafka consume",
        "Kafka round trip (+result)",
        "end-to-end worker",
        "event latency (consume → outcome)",
        "peak RSS",
        "connections the sink accepted: end-to-end",
        "this process's CPU by thread, µs per call or event:",
    ] {
        assert!(stdout.contains(row), "table row {row:?} missing:\n{stdout}");
    }
}

/// `bench` on 700 events of the four shipped examples (with ~1 % invalid
/// events), no ordering, 32 in flight, and `extra` flags.
fn example_mix(extra: &[&str]) -> (String, Value) {
    let mut args = vec![
        "--events",
        "700",
        "--actions",
        "examples",
        "--ordering",
        "none",
        "--concurrency",
        "32",
    ];
    args.extend_from_slice(extra);
    bench(&args)
}

#[test]
fn the_example_mix_accounts_for_every_event_including_the_failures() {
    let (_, report) = example_mix(&[]);
    let outcomes = report["end_to_end"]["outcomes"]
        .as_object()
        .expect("outcomes");
    let total: u64 = outcomes.values().filter_map(Value::as_u64).sum();
    assert_eq!(total, 700, "every event has one outcome: {outcomes:?}");
    // The mix carries invalid events on purpose: they are outcomes, not losses.
    assert!(
        outcomes.get("invalid_event").and_then(Value::as_u64) > Some(0),
        "{outcomes:?}"
    );
    assert!(
        outcomes.get("ok").and_then(Value::as_u64) > Some(600),
        "{outcomes:?}"
    );
    assert_eq!(report["mix"], "examples");
    assert_eq!(report["ordering"], "none");
}

#[test]
fn the_sink_speaks_http2_over_tls_to_every_example_action() {
    // The examples' auth calls (OAuth2 token, custom-auth login) go to the
    // sink too: every action must trust the sink's private CA.
    let (stdout, report) = example_mix(&["--sink-protocol", "h2"]);
    let outcomes = &report["end_to_end"]["outcomes"];
    assert!(
        outcomes["ok"].as_u64() > Some(600),
        "the calls over TLS succeed: {outcomes}"
    );
    assert_eq!(outcomes.get("error"), None, "{outcomes}");
    let versions = report["limit_http"]["http_versions"]
        .as_object()
        .expect("versions");
    assert_eq!(
        versions.keys().collect::<Vec<_>>(),
        ["HTTP/2.0"],
        "limit A's answers came over HTTP/2 only: {versions:?}"
    );
    assert_eq!(report["sink_protocol"], "h2");
    assert!(stdout.contains("sink h2 latency 0ms"), "{stdout}");
}

#[test]
fn an_http2_provider_gets_one_connection_per_client_at_a_cold_start() {
    // Each phase starts with clients that hold no connection. Without the
    // cold-start rule every call that found none opened its own TLS
    // connection until one had negotiated h2 (258–494 per phase here).
    let (stdout, report) = bench(&[
        "--events",
        "2000",
        "--concurrency",
        "256",
        "--sink-protocol",
        "h2",
    ]);
    assert_eq!(number(&report, "warm_up_connections"), 1.0, "{stdout}");
    assert_eq!(
        number(&report, "end_to_end.sink_connections"),
        1.0,
        "{stdout}"
    );
    assert_eq!(
        number(&report, "limit_http.sink_connections"),
        1.0,
        "{stdout}"
    );
    assert_eq!(
        report["limit_http"]["http_versions"],
        serde_json::json!({ "HTTP/2.0": 2000 })
    );
}

#[test]
fn the_sink_speaks_http1_over_tls() {
    let (_, report) = bench(&[
        "--events",
        "300",
        "--concurrency",
        "16",
        "--sink-protocol",
        "https",
    ]);
    // bench itself fails unless every event of the simple mix ends ok.
    assert_eq!(
        report["end_to_end"]["outcomes"],
        serde_json::json!({ "ok": 300 })
    );
    assert_eq!(
        report["limit_http"]["http_versions"],
        serde_json::json!({ "HTTP/1.1": 300 })
    );
}

#[test]
fn a_rate_without_events_runs_five_seconds_of_them() {
    // Without --events a rate gets five seconds of events (10 000 would all
    // fall in the first second at 20 000/s, and leave nothing to measure).
    let (_, report) = bench(&["--rate", "300", "--concurrency", "64"]);
    assert_eq!(report["events"], 1500);
    assert_eq!(report["rate"], 300);
    let kept = number(&report, "end_to_end.latency_events");
    assert!(
        kept > 0.0 && kept < 1500.0,
        "{kept} of 1500 events in the latency figures"
    );
}

#[test]
fn a_rate_leaves_the_first_second_out_of_the_latency_figures() {
    // 1 200 events at 600/s: about two seconds, the first of which is warm-up.
    let (stdout, report) = bench(&[
        "--events",
        "1200",
        "--rate",
        "600",
        "--concurrency",
        "64",
        "--rounds",
        "2",
    ]);
    assert_eq!(report["rate"], 600);
    // Each round produced the events anew, at the rate; the round shown is
    // the one with the higher added p99 of the two, and its figures are the
    // report's.
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    for round in rounds {
        assert_eq!(round["rate"], 600, "{round}");
        assert!(round["ratio"].is_null(), "{round}");
        assert!(number(round, "rated_per_second") > 0.0, "{round}");
    }
    let p99s: Vec<f64> = rounds
        .iter()
        .map(|r| number(r, "added_latency_p99_ms"))
        .collect();
    let shown = number(&report, "shown_round") as usize;
    assert_eq!(
        p99s[shown - 1],
        p99s[0].max(p99s[1]),
        "round {shown} of {p99s:?}"
    );
    assert_eq!(
        number(&report, "end_to_end.added_latency_ms.p99"),
        p99s[shown - 1]
    );
    // Records produced during the phase reach the worker through the mock
    // broker's held fetches: bench shortens them, with --rate only.
    assert_eq!(report["consumer_settings"]["fetch.wait.max.ms"], "1");
    let kept = number(&report, "end_to_end.latency_events");
    assert!(
        kept > 0.0 && kept < 1200.0,
        "{kept} of 1200 events in the latency figures"
    );
    assert_eq!(number(&report, "end_to_end.warmup_seconds"), 1.0);
    // With a rate, the throughput is the producer's: no ratio is claimed.
    assert!(report["end_to_end"]["ratio"].is_null());
    // Limit A ran flat out, not at the rate: its exchange says so.
    assert!(
        stdout.contains("limit A's calls, at full speed:"),
        "{stdout}"
    );
    assert_ordered("all", percentiles(&report, "all_latency_ms"));
    assert!(stdout.contains("end-to-end at 600/s"), "{stdout}");
    assert!(
        stdout.contains("produced at 600/s (linger.ms 5)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ratio end-to-end / min(A, B): not measured"),
        "{stdout}"
    );
}

#[test]
fn hold_keeps_the_topics_and_the_sink_up_until_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::ClientConfig;

    /// Kills the held bench if the test fails before it stops it.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let stderr = dir.path().join("stderr");
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_journey-actions"))
            .args(["bench", "--events", "300", "--keys", "30", "--rounds", "1"])
            .args(["--concurrency", "32", "--hold"])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("run bench"),
    );
    let (mut held, mut table) = (Vec::new(), Vec::new());
    for line in BufReader::new(child.0.stdout.take().expect("stdout")).lines() {
        let line = line.expect("stdout is text");
        table.push(line.clone());
        let last = line.starts_with("Ctrl-C");
        if line.starts_with("held:") || !held.is_empty() {
            held.push(line);
        }
        if last {
            break;
        }
    }
    let field = |prefix: &str| {
        held.iter()
            .find_map(|l| l.trim_start().strip_prefix(prefix))
            .unwrap_or_else(|| {
                let stderr = std::fs::read_to_string(&stderr).unwrap_or_default();
                panic!("no {prefix:?} line in {held:#?}\nstderr:\n{stderr}")
            })
            .to_string()
    };
    // 30 keys with ordering `key`: the worker makes 30 calls at once at
    // most, and so does limit A (not --concurrency's 32).
    let at_once = "limit A makes 30 calls at once: the most the worker can make (one per key)";
    assert!(
        table.iter().any(|l| l == at_once),
        "no {at_once:?} in:\n{}",
        table.join("\n")
    );
    let brokers = field("held: brokers ");
    let topics = field("topics: ");
    let input = topics.split_whitespace().next().expect("a topic");
    assert!(
        topics.starts_with(&format!("{input} (300 events)")),
        "{topics}"
    );
    let sink = field("sink: ");
    let sink = sink.split_whitespace().next().expect("a URL").to_string();

    // The run's events are still there, for another consumer.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "hold-test")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[input]).expect("subscribe");
    let (mut read, deadline) = (0, Instant::now() + Duration::from_secs(30));
    while read < 300 && Instant::now() < deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            read += 1;
        }
    }
    assert_eq!(read, 300, "records read back from {input} at {brokers}");
    drop(consumer);

    // And the sink answers.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let url = format!("{sink}/v1/acme/messages");
    let status = runtime
        .block_on(reqwest::Client::new().post(&url).body("{}").send())
        .expect("the sink answers")
        .status();
    assert_eq!(status, 200, "{url}");

    // SIGTERM ends the hold, and takes the sink down with it.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let status = child.0.wait().expect("bench exits");
    assert!(status.success(), "{status}");
    let after = runtime.block_on(reqwest::Client::new().post(&url).body("{}").send());
    assert!(after.is_err(), "the sink is still up: {after:?}");
}
