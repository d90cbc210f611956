//! `journey-actions demo`: the whole pipeline on one machine with nothing to
//! install. librdkafka's in-process mock cluster stands in for Kafka, a
//! loopback mock provider for the providers, and the shipped example actions
//! (embedded in the binary) are pointed at it. Sample events, some of them
//! invalid, go through the real worker.

mod provider;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::action::{self, ActionSet};
use crate::dispatch::OutcomeCode;
use crate::settings::Settings;
use crate::telemetry::Metrics;
use crate::worker::{Finished, Worker};

/// The example actions and their placeholder secrets, as shipped in `config/`.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "sms_gateway.yaml",
        include_str!("../../config/actions/sms_gateway.yaml"),
    ),
    (
        "email_send.yaml",
        include_str!("../../config/actions/email_send.yaml"),
    ),
    (
        "push_notification.yaml",
        include_str!("../../config/actions/push_notification.yaml"),
    ),
    (
        "crm_webhook.yaml",
        include_str!("../../config/actions/crm_webhook.yaml"),
    ),
];
const SECRETS: &[(&str, &str)] = &[
    ("sms_token", include_str!("../../config/secrets/sms_token")),
    (
        "mailer_client_secret",
        include_str!("../../config/secrets/mailer_client_secret"),
    ),
    (
        "push_api_key",
        include_str!("../../config/secrets/push_api_key"),
    ),
    (
        "crm_webhook_secret",
        include_str!("../../config/secrets/crm_webhook_secret"),
    ),
];
/// The demo raises the examples' rates so a run takes seconds, not minutes.
const RATE_FACTOR: u32 = 10;
const PARTITIONS: i32 = 6;
/// The demo gives up when no event became final for this long.
const STALL_LIMIT: Duration = Duration::from_secs(60);

pub struct DemoOptions {
    pub events: usize,
    /// A real broker instead of the in-process mock cluster.
    pub brokers: Option<String>,
    pub exit: bool,
    pub listen: String,
}

#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<String, u64>,
    latencies: Vec<Duration>,
    retries: u64,
    dlq: u64,
}

pub async fn run(options: DemoOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let total = options.events;
    let kafka = if options.brokers.is_some() {
        "a real Kafka broker"
    } else {
        "in-process mock Kafka"
    };
    eprintln!("journey-actions demo: {total} events through the real worker ({kafka}, mock providers in-process)");

    let mut settings = Settings::default();
    settings.kafka.group_id = "journey-actions-demo".into();
    settings.admin.listen = options.listen.clone();
    let cluster = match &options.brokers {
        None => {
            let cluster =
                MockCluster::new(1).context("starting the in-process Kafka mock cluster")?;
            settings.kafka.brokers = cluster.bootstrap_servers();
            for topic in [
                &settings.kafka.input_topic,
                &settings.kafka.results_topic,
                &settings.kafka.dlq_topic,
            ] {
                cluster
                    .create_topic(topic, PARTITIONS, 1)
                    .with_context(|| format!("creating topic {topic}"))?;
            }
            Some(cluster)
        }
        Some(brokers) => {
            // Fresh topics per run, so an earlier run's events are not mixed in.
            let run = chrono::Utc::now().format("%Y%m%d%H%M%S");
            settings.kafka.brokers = brokers.clone();
            settings.kafka.group_id = format!("journey-actions-demo-{run}");
            settings.kafka.input_topic = format!("journey.actions.demo-{run}");
            settings.kafka.results_topic = format!("journey.actions.results.demo-{run}");
            settings.kafka.dlq_topic = format!("journey.actions.dlq.demo-{run}");
            let k = &settings.kafka;
            let topics = [&*k.input_topic, &k.results_topic, &k.dlq_topic];
            create_topics(brokers, &topics, PARTITIONS).await?;
            eprintln!(
                "  broker {brokers}: topics {}, {}, {}",
                k.input_topic, k.results_topic, k.dlq_topic
            );
            None
        }
    };

    let provider_stop = CancellationToken::new();
    let provider = provider::start(provider_stop.clone()).await?;
    let workdir = tempfile::tempdir()?;
    let actions = Arc::new(demo_actions(workdir.path(), &format!("http://{provider}"))?);
    eprintln!(
        "  actions: {}",
        actions
            .iter()
            .map(|a| a.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    produce(
        &settings.kafka.brokers,
        &settings.kafka.input_topic,
        &sample_events(total, 42),
    )
    .await?;
    eprintln!(
        "  produced {total} events to {}",
        settings.kafka.input_topic
    );

    let metrics = Arc::new(Metrics::new());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let finished = Arc::new(AtomicU64::new(0));
    let observer = {
        let (tally, finished) = (tally.clone(), finished.clone());
        Arc::new(move |f: &Finished| {
            if let Ok(mut t) = tally.lock() {
                *t.outcomes.entry(f.code.to_string()).or_default() += 1;
                t.latencies.push(f.latency);
                t.retries += u64::from(f.attempts.saturating_sub(1));
                t.dlq += u64::from(f.code != OutcomeCode::Ok);
            }
            finished.fetch_add(1, Ordering::Relaxed);
        })
    };
    let worker =
        Worker::new(settings.clone(), actions.clone(), metrics.clone())?.with_observer(observer);
    let worker_stop = CancellationToken::new();
    let admin_state = crate::admin::AdminState {
        metrics: metrics.clone(),
        dispatcher: worker.dispatcher().clone(),
        ready: worker.ready_flag(),
    };
    let ready = admin_state.ready.clone();
    let admin = match crate::admin::serve(&options.listen, admin_state.clone(), worker_stop.clone())
        .await
    {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("  note: {e}; serving /metrics on a free port instead");
            crate::admin::serve("127.0.0.1:0", admin_state, worker_stop.clone()).await?
        }
    };
    eprintln!("  metrics: http://{admin}/metrics");
    let worker_task = tokio::spawn(worker.run(worker_stop.clone()));

    // Progress until every event is final (the clock starts when the group is joined).
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let tty = std::io::stderr().is_terminal();
    let mut started = Instant::now();
    let mut joined = false;
    let (mut last_done, mut last_progress, mut ticks) = (0usize, Instant::now(), 0u64);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        ticks += 1;
        if !joined && ready.load(Ordering::Relaxed) {
            joined = true;
            started = Instant::now();
        }
        let done = finished.load(Ordering::Relaxed) as usize;
        if done != last_done {
            (last_done, last_progress) = (done, Instant::now());
        } else if last_progress.elapsed() > STALL_LIMIT {
            stalled = true;
            break;
        }
        let line = format!(
            "  {done}/{total} final · {:.0} events/s · in flight {}",
            done as f64 / started.elapsed().as_secs_f64().max(0.001),
            metrics.in_flight.get()
        );
        if tty {
            eprint!("\r{line}   ");
        } else if ticks % 4 == 0 || done >= total {
            eprintln!("{line}");
        }
        if done >= total {
            break;
        }
    }
    eprintln!();
    let elapsed = started.elapsed();
    {
        let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
        print_summary(&tally, total, elapsed);
    }

    if stalled {
        worker_stop.cancel();
        let _ = worker_task.await;
        anyhow::bail!(
            "{} events are not final after {STALL_LIMIT:?} without progress",
            total - last_done
        );
    }
    if !options.exit && !shutdown.is_cancelled() {
        eprintln!("metrics stay up at http://{admin}/metrics; Ctrl-C to stop");
        shutdown.cancelled().await;
    }
    worker_stop.cancel();
    worker_task.await.context("worker task")??;
    provider_stop.cancel();
    drop(cluster);
    Ok(())
}

fn print_summary(t: &Tally, total: usize, elapsed: Duration) {
    let final_count: u64 = t.outcomes.values().sum();
    println!(
        "{final_count} of {total} events final in {:.1} s: {:.0} events/s",
        elapsed.as_secs_f64(),
        final_count as f64 / elapsed.as_secs_f64().max(0.001)
    );
    println!("outcomes:");
    for (code, n) in &t.outcomes {
        println!("  {code:<16}{n:>8}");
    }
    println!("retries: {}   DLQ records: {}", t.retries, t.dlq);
    let ms = crate::bench::sorted_ms(t.latencies.iter().copied());
    let p = crate::bench::percentiles(&ms, 0.0);
    println!(
        "event latency (consume → records acknowledged): p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        p.p50, p.p99, p.max
    );
}

/// The embedded examples, rewritten to call the mock provider at `base`
/// (`https://HOST/path` → `{base}/HOST/path`), each keeping its own limits
/// key, with rates raised by `RATE_FACTOR`.
pub fn demo_actions(dir: &Path, base: &str) -> anyhow::Result<ActionSet> {
    example_actions(dir, base, Some(RATE_FACTOR), None)
}

/// The embedded examples pointed at `base`. With `rate_factor` their rates
/// are multiplied by it; without, every throttle and cap is removed (the
/// benchmark measures the worker, not the examples' budgets). `ca_cert` is
/// a PEM file the actions trust (`tls.ca_cert`), for a provider on TLS.
pub fn example_actions(
    dir: &Path,
    base: &str,
    rate_factor: Option<u32>,
    ca_cert: Option<&Path>,
) -> anyhow::Result<ActionSet> {
    let actions_dir = dir.join("actions");
    std::fs::create_dir_all(actions_dir.join("..").join("secrets"))?;
    std::fs::create_dir_all(&actions_dir)?;
    for (name, content) in SECRETS {
        std::fs::write(dir.join("secrets").join(name), content)?;
    }
    for (name, yaml) in EXAMPLES {
        let mut spec: Value =
            serde_yaml_ng::from_str(yaml).with_context(|| format!("embedded example {name}"))?;
        let url = spec["endpoint"]["url"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let host = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_default()
            .to_string();
        spec["endpoint"]["url"] = json!(rebase(&url, base));
        for field in ["token_url", "endpoint"] {
            if let Some(u) = spec["auth"][field].as_str().map(str::to_string) {
                spec["auth"][field] = json!(rebase(&u, base));
            }
        }
        if let (None, Some(o)) = (rate_factor, spec.as_object_mut()) {
            o.remove("cap");
        }
        let throttle = spec.as_object_mut().and_then(|o| {
            o.entry("throttle")
                .or_insert_with(|| json!({}))
                .as_object_mut()
        });
        if let Some(t) = throttle {
            t.entry("key").or_insert_with(|| json!(host));
            match rate_factor {
                None => t.retain(|k, _| k == "key"),
                Some(factor) => {
                    let rate = t.get("rate").and_then(Value::as_str);
                    if let Some((count, per)) = rate.and_then(|r| r.split_once('/')) {
                        if let Ok(n) = count.parse::<u32>() {
                            let raised = format!("{}/{per}", n * factor);
                            t.insert("rate".into(), json!(raised));
                        }
                    }
                }
            }
        }
        if let Some(ca) = ca_cert {
            trust_ca(&mut spec, ca);
        }
        let file = actions_dir.join(name.replace(".yaml", ".json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&spec)?)?;
    }
    action::load_dir(&actions_dir, dir).map_err(|problems| {
        anyhow::anyhow!(
            "the embedded examples do not load: {}",
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// Makes the action definition `spec` trust the CA in the PEM file `ca`
/// (`tls.ca_cert`), keeping the rest of its `tls`.
pub fn trust_ca(spec: &mut Value, ca: &Path) {
    if let Some(o) = spec.as_object_mut() {
        let tls = o.entry("tls").or_insert_with(|| json!({}));
        tls["ca_cert"] = json!(format!("${{file:{}}}", ca.display()));
    }
}

fn rebase(url: &str, base: &str) -> String {
    match url.split_once("://") {
        Some((_, rest)) => format!("{base}/{rest}"),
        None => url.to_string(),
    }
}

/// The sample events: realistic params over the four actions, keyed by
/// profile (several events per profile, so per-key order matters), with
/// about 1 % invalid ones of each kind.
pub fn sample_events(total: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let names = [
        "Zoë",
        "Ada",
        "李雷",
        "O'Brien",
        "José",
        "{{ 7*7 }}",
        "Ünal",
        "Chloé \"CC\"",
    ];
    let profiles = (total / 4).max(1);
    (0..total)
        .map(|i| {
            let profile = format!("p-{}", rng.random_range(0..profiles));
            let event_id = format!("demo-{i:08}");
            let name = names[i % names.len()];
            let (action, params) = match rng.random_range(0..100) {
                0..40 => (
                    "sms_gateway",
                    json!({"account": "acme", "phone": format!("+3361234{:04}", i % 10000), "firstName": name,
                           "amount": (i % 500) as f64 / 4.0, "tags": ["demo", "journey"]}),
                ),
                40..65 => (
                    "push_notification",
                    json!({"appId": "shop-ios", "deviceToken": format!("tok{i:x}"), "title": format!("Hi {name}"), "badge": i % 9}),
                ),
                65..85 => (
                    "email_send",
                    json!({"email": format!("user{i}@example.org"), "templateId": "d-welcome", "firstName": name,
                           "orderTotal": 19.9, "items": [{"sku": "A-1", "qty": 1}]}),
                ),
                _ => (
                    "crm_webhook",
                    json!({"stage": "qualified", "score": i % 100, "enteredAt": "2026-11-23T12:00:00Z",
                           "attributes": {"plan": "pro"}}),
                ),
            };
            let mut event = json!({
                "event_id": event_id, "action_id": action, "profile_id": profile,
                "journey": {"id": "welcome", "version": "3", "step_id": format!("step_{action}")},
                "params": params, "context": {"locale": "fr"},
                "emitted_at": chrono::Utc::now().to_rfc3339(),
            });
            // A few invalid events of each kind: the DLQ's reason to exist.
            let value = match i % 100 {
                13 if i % 300 == 13 => b"{not json".to_vec(),
                27 if i % 300 == 27 => {
                    event["params"] = json!({});
                    serde_json::to_vec(&event).unwrap_or_default()
                }
                41 if i % 300 == 41 => {
                    event["action_id"] = json!("fax_machine");
                    serde_json::to_vec(&event).unwrap_or_default()
                }
                55 if i % 300 == 55 => {
                    event["expires_at"] = json!("2020-01-01T00:00:00Z");
                    serde_json::to_vec(&event).unwrap_or_default()
                }
                _ => serde_json::to_vec(&event).unwrap_or_default(),
            };
            (profile, value)
        })
        .collect()
}

/// Creates topics on a real broker (an existing topic is fine).
pub async fn create_topics(brokers: &str, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("creating topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Produces keyed records and waits until the broker has them all.
pub async fn produce(
    brokers: &str,
    topic: &str,
    records: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("creating a producer")?;
    let sends = records.iter().map(|(key, value)| {
        producer.send(
            FutureRecord::to(topic)
                .key(key.as_str())
                .payload(value.as_slice()),
            Duration::from_secs(30),
        )
    });
    for result in futures::future::join_all(sends).await {
        result.map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
    }
    Ok(())
}
