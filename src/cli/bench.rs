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
    let events = args.events.unwrap_or_else(|| default_events(args.rate));
    let options = BenchOptions {
        settings,
        events,
        concurrency: args.concurrency,
        mix: args.actions,
        ordering: args.ordering,
        keys: args.keys.unwrap_or(events),
        sink_latency: args.sink_latency,
        sink_protocol: args.sink_protocol,
        brokers: args.brokers.clone(),
        rate: args.rate,
        partitions: args.partitions,
        bulkhead: args.max_concurrency,
        json: args.json.clone(),
        hold: args.hold,
        rounds: usize::from(args.rounds),
    };
    if let Some(path) = &options.json {
        writable(path).with_context(|| format!("--json {}", path.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (report, held) = runtime.block_on(bench::run(options))?;
    print!("{}", bench::table(&report));
    if let Some(held) = held {
        runtime.block_on(hold(&held.description))?;
        drop(held);
    }
    Ok(ExitCode::SUCCESS)
}

/// Events per phase when `--events` is not given. With a rate, about five
/// seconds of it: its latency figures leave out the first second (with
/// 10 000 events at `half` of ~20 000/s there was nothing left to measure).
/// `half` is not known before the run: 60 000 events last 5 s at 12 000/s
/// (the slower state of the development VM) and fit the mock cluster's six
/// default partitions.
fn default_events(rate: Option<bench::Rate>) -> usize {
    match rate {
        None => 10_000,
        Some(bench::Rate::HalfOfMax) => 60_000,
        Some(bench::Rate::PerSecond(n)) => (n as usize).saturating_mul(5).clamp(1_000, 60_000),
    }
}

/// Prints what `--hold` keeps up, then waits for SIGINT or SIGTERM (listened
/// for before the text that invites them is printed).
async fn hold(description: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    print!("{description}");
    std::io::stdout().flush()?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Fails now, rather than after the whole run, when `--json` names a file
/// that cannot be written: an existing file is opened for writing (and left
/// as it is); for a new one, a file is made and removed in its directory.
fn writable(path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(!path.as_os_str().is_empty(), "an empty path");
    anyhow::ensure!(!path.is_dir(), "a directory, not a file");
    if path.exists() {
        std::fs::OpenOptions::new().append(true).open(path)?;
        return Ok(());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    anyhow::ensure!(dir.exists(), "{} does not exist", dir.display());
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_gets_five_seconds_of_events_by_default() {
        assert_eq!(default_events(None), 10_000);
        assert_eq!(default_events(Some(bench::Rate::HalfOfMax)), 60_000);
        assert_eq!(default_events(Some(bench::Rate::PerSecond(300))), 1_500);
        assert_eq!(default_events(Some(bench::Rate::PerSecond(50))), 1_000);
        assert_eq!(default_events(Some(bench::Rate::PerSecond(50_000))), 60_000);
        assert_eq!(
            default_events(Some(bench::Rate::PerSecond(u32::MAX))),
            60_000
        );
    }
}
