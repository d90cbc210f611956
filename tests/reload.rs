//! SPEC §4: the config store is reloaded on SIGHUP and when files change; a
//! new set is swapped in only when all of it validates.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use journey_actions::action::{self, reload};
use journey_actions::dispatch::{DispatchOptions, Dispatcher};
use journey_actions::telemetry::Metrics;
use tokio_util::sync::CancellationToken;

fn write(dir: &Path, name: &str, id: &str, path: &str) {
    let yaml = format!("id: {id}\nendpoint:\n  method: POST\n  url: \"http://127.0.0.1:9/{path}\"\npayload:\n  a: 1\n");
    std::fs::write(dir.join(name), yaml).unwrap();
}

fn setup() -> (tempfile::TempDir, Arc<Dispatcher>, Arc<Metrics>) {
    let root = tempfile::tempdir().unwrap();
    let actions = root.path().join("actions");
    std::fs::create_dir(&actions).unwrap();
    write(&actions, "a.yaml", "first", "a");
    let set = action::load_dir(&actions, root.path()).unwrap();
    let dispatcher = Arc::new(Dispatcher::new(Arc::new(set), DispatchOptions::default()).unwrap());
    (root, dispatcher, Arc::new(Metrics::new()))
}

fn ids(d: &Dispatcher) -> Vec<String> {
    d.actions().iter().map(|a| a.id.clone()).collect()
}

#[test]
fn a_valid_set_is_swapped_in_and_an_invalid_one_is_refused() {
    let (root, dispatcher, metrics) = setup();
    let dir = root.path().join("actions");
    write(&dir, "b.yaml", "second", "b");
    assert!(reload::reload(&dir, root.path(), &dispatcher, &metrics));
    assert_eq!(ids(&dispatcher), ["first", "second"]);

    std::fs::write(
        dir.join("c.yaml"),
        "id: broken\nendpoint: { method: FETCH, url: x }\n",
    )
    .unwrap();
    assert!(!reload::reload(&dir, root.path(), &dispatcher, &metrics));
    assert_eq!(
        ids(&dispatcher),
        ["first", "second"],
        "the previous set stays"
    );
    assert_eq!(metrics.config_reloads.with_label_values(&["ok"]).get(), 1);
    assert_eq!(
        metrics.config_reloads.with_label_values(&["error"]).get(),
        1
    );
}

#[tokio::test]
async fn changed_files_are_picked_up_without_a_signal() {
    let (root, dispatcher, metrics) = setup();
    let dir = root.path().join("actions");
    let stop = CancellationToken::new();
    tokio::spawn(reload::watch(
        dir.clone(),
        root.path().to_path_buf(),
        dispatcher.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    // Let the watcher take its first look before the change.
    tokio::time::sleep(Duration::from_millis(100)).await;
    write(&dir, "b.yaml", "added_later", "b");
    let deadline = Instant::now() + reload::POLL * 5;
    while !ids(&dispatcher).contains(&"added_later".to_string()) {
        assert!(
            Instant::now() < deadline,
            "the new action was not loaded: {:?}",
            ids(&dispatcher)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
}
