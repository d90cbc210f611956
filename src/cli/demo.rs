//! `demo`: the embedded default (see `crate::demo`).

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::DemoArgs;
use crate::demo::{self, DemoOptions};

pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(super::run::stop_on_signal(shutdown.clone()));
        demo::run(
            DemoOptions {
                events: args.events,
                brokers: args.brokers.clone(),
                exit: args.exit,
                listen: args.listen.clone(),
            },
            shutdown,
        )
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}
