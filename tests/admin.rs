//! SPEC §7: the admin port serves /healthz, /readyz, /metrics and /actions.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use journey_actions::action;
use journey_actions::admin::{self, AdminState};
use journey_actions::dispatch::{DispatchOptions, Dispatcher, Outcome, OutcomeCode};
use journey_actions::telemetry::Metrics;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn admin_port_reports_health_readiness_metrics_and_actions() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let set = action::load_dir(&config.join("actions"), &config).unwrap();
    let dispatcher = Arc::new(Dispatcher::new(Arc::new(set), DispatchOptions::default()).unwrap());
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let state = AdminState {
        metrics: metrics.clone(),
        dispatcher,
        ready: ready.clone(),
    };
    let addr = admin::serve("127.0.0.1:0", state, stop.clone())
        .await
        .unwrap();
    let get = |path: &str| {
        let url = format!("http://{addr}{path}");
        async move {
            let resp = reqwest::get(url).await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };

    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(
        get("/readyz").await.0,
        503,
        "not ready before the group is joined"
    );
    ready.store(true, Ordering::Relaxed);
    assert_eq!(get("/readyz").await.0, 200);

    metrics.events_consumed.inc();
    metrics.record(
        "sms_gateway",
        &Outcome::early(OutcomeCode::Capped, "cap"),
        0.01,
    );
    let (status, text) = get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "journey_actions_events_consumed_total 1",
        "journey_actions_outcomes_total{action=\"sms_gateway\",outcome=\"capped\"} 1",
        "journey_actions_event_duration_seconds_count{action=\"sms_gateway\"} 1",
        "journey_actions_in_flight 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }

    let (status, body) = get("/actions").await;
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "crm_webhook",
            "email_send",
            "push_notification",
            "sms_gateway"
        ]
    );
    for a in list.as_array().unwrap() {
        assert_eq!(a["hash"].as_str().unwrap().len(), 64, "sha-256 hex: {a}");
        assert!(a["file"].as_str().unwrap().ends_with(".yaml"));
    }
    stop.cancel();
}
