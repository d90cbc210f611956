//! `bench`: see `crate::bench`.

use std::process::ExitCode;

use super::BenchArgs;
use crate::bench::{self, BenchOptions};

pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let options = BenchOptions {
        events: args.events,
        concurrency: args.concurrency.max(1),
        mix: args.actions,
        ordering: args.ordering,
        keys: args.keys.unwrap_or(args.events).max(1),
        sink_latency: args.sink_latency,
        brokers: args.brokers.clone(),
        rate: args.rate,
        partitions: args.partitions.max(1),
        bulkhead: args.max_concurrency,
        json: args.json.clone(),
    };
    anyhow::ensure!(options.events > 0, "--events must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(bench::run(options))?;
    print!("{}", bench::table(&report));
    Ok(ExitCode::SUCCESS)
}
