//! journey-actions: executes the custom actions of customer-journey
//! orchestration. An action event names an action definition; the
//! definition says how to render and send the provider call.
//!
//! The path of one event, in module order: [`event`] (parse) →
//! [`action`] (the definition it names) → [`render`] (the HTTP request) →
//! [`dispatch`] (limits, auth, calls, retries → [`dispatch::Outcome`]) →
//! [`worker`] (Kafka: consume, order, results and DLQ, commits) with
//! [`admin`] serving the metrics of [`telemetry`].

// An `Outcome` or `InvalidEvent` is the normal result for a failed event, moved
// once per event: boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

pub mod action;
pub mod admin;
pub mod bench;
pub mod cli;
pub mod demo;
pub mod dispatch;
pub mod event;
pub mod render;
pub mod settings;
pub mod telemetry;
pub mod units;
pub mod worker;

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// The worker as `journey-actions run` starts it: loads the actions named by
/// `settings`, serves the admin port, reloads the actions on SIGHUP or when
/// their files change, and consumes until `shutdown`.
pub async fn run(
    settings: settings::Settings,
    config_dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let actions = action::load_dir(&settings.actions.dir, config_dir).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid action definitions:\n{}", lines.join("\n"))
    })?;
    tracing::info!(actions = actions.len(), dir = %settings.actions.dir.display(), "actions loaded");
    let metrics = Arc::new(telemetry::Metrics::new());
    let worker = worker::Worker::new(settings.clone(), Arc::new(actions), metrics.clone())?;
    let admin = admin::AdminState {
        metrics: metrics.clone(),
        dispatcher: worker.dispatcher().clone(),
        ready: worker.ready_flag(),
    };
    admin::serve(&settings.admin.listen, admin, shutdown.clone()).await?;
    tokio::spawn(action::reload::watch(
        settings.actions.dir.clone(),
        config_dir.to_path_buf(),
        worker.dispatcher().clone(),
        metrics,
        shutdown.clone(),
    ));
    worker.run(shutdown).await
}
