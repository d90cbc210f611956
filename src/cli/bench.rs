//! `bench`: see `crate::bench`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use super::BenchArgs;
use crate::bench::{self, BenchOptions};
use crate::settings::Settings;

pub fn run(config: &Path, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    // The worker's settings ([kafka.consumer], [kafka.producer], timeouts)
    // from the configuration directory when there is one; bench sets the
    // brokers, topics, group, max_in_flight and ordering itself. Without
    // one, the defaults; but a --config that names no directory is a mistake.
    let settings = if config.is_dir() {
        Settings::load(config)?
    } else {
        anyhow::ensure!(
            config == Path::new(super::DEFAULT_CONFIG),
            "--config {}: not a directory",
            config.display()
        );
        Settings::default()
    };
    let options = BenchOptions {
        settings,
        events: args.events,
        concurrency: args.concurrency.max(1),
        mix: args.actions,
        ordering: args.ordering,
        keys: args.keys.unwrap_or(args.events).max(1),
        sink_latency: args.sink_latency,
        sink_protocol: args.sink_protocol,
        brokers: args.brokers.clone(),
        rate: args.rate,
        partitions: args.partitions.max(1),
        bulkhead: args.max_concurrency,
        json: args.json.clone(),
        hold: args.hold,
    };
    anyhow::ensure!(options.events > 0, "--events must be at least 1");
    if let Some(path) = &options.json {
        writable(path).with_context(|| format!("--json {}", path.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (report, held) = runtime.block_on(bench::run(options))?;
    print!("{}", bench::table(&report));
    if let Some(held) = held {
        use std::io::Write;
        print!("{}", held.description);
        std::io::stdout().flush()?;
        let stop = tokio_util::sync::CancellationToken::new();
        runtime.block_on(super::run::stop_on_signal(stop.clone()));
        drop(held);
    }
    Ok(ExitCode::SUCCESS)
}

/// Fails now, rather than after the whole run, when `--json` names a file
/// that cannot be written: an existing file is opened for writing (and left
/// as it is), a new one needs its directory.
fn writable(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::OpenOptions::new().append(true).open(path)?;
        return Ok(());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    Ok(())
}
