//! Reloading the config store (SPEC §4): on SIGHUP, and when the files of the
//! actions directory change (checked every [`POLL`]). A new set replaces the
//! old one only when all of it validates; otherwise the old set stays and
//! every problem is logged and counted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::telemetry::Metrics;

/// How often the directory is checked for changes.
pub const POLL: Duration = Duration::from_secs(2);

/// Names, sizes and modification times of the directory's files: any edit,
/// addition or removal changes it.
pub fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let meta = e.metadata().ok()?;
                    meta.is_file()
                        .then(|| (e.path(), meta.len(), meta.modified().ok()))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Loads the directory and swaps the set in when it is valid; returns whether it was.
pub fn reload(dir: &Path, secret_base: &Path, dispatcher: &Dispatcher, metrics: &Metrics) -> bool {
    match super::load_dir(dir, secret_base) {
        Ok(set) => {
            tracing::info!(actions = set.len(), "actions reloaded");
            dispatcher.reload(Arc::new(set));
            metrics.config_reloads.with_label_values(&["ok"]).inc();
            true
        }
        Err(problems) => {
            for p in &problems {
                tracing::error!(problem = %p, "reload refused; the previous actions stay");
            }
            metrics.config_reloads.with_label_values(&["error"]).inc();
            false
        }
    }
}

/// Runs until `shutdown`: reloads on SIGHUP and on file changes.
pub async fn watch(
    dir: PathBuf,
    secret_base: PathBuf,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = fingerprint(&dir);
    let mut tick = tokio::time::interval(POLL);
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sighup => {
                tracing::info!("SIGHUP: reloading actions");
                seen = fingerprint(&dir);
                reload(&dir, &secret_base, &dispatcher, &metrics);
            }
            _ = tick.tick() => {
                let now = fingerprint(&dir);
                if now != seen {
                    seen = now;
                    tracing::info!(dir = %dir.display(), "action files changed: reloading");
                    reload(&dir, &secret_base, &dispatcher, &metrics);
                }
            }
        }
    }
}
