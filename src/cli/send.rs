//! `send`: the "send test request": one real call, printed.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use super::{load_actions, read_event, ActionArgs};
use crate::dispatch::{DispatchOptions, Dispatcher};

pub fn run(config: &Path, args: &ActionArgs) -> anyhow::Result<ExitCode> {
    let (settings, actions) = load_actions(config, &args.action)?;
    let event = read_event(&args.event, &args.action)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dispatcher = Dispatcher::new(
        Arc::new(actions),
        DispatchOptions::from_settings(&settings.dispatch),
    )?;
    let result = runtime.block_on(dispatcher.send_once(&event));
    let def = dispatcher.actions().get(&args.action).cloned();
    let mask = |text: &str| {
        def.as_ref()
            .map(|d| d.mask(text))
            .unwrap_or_else(|| text.to_string())
    };
    match result {
        Ok(reply) => {
            let reason = reqwest::StatusCode::from_u16(reply.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            let mut out = format!("HTTP {} {reason}\n", reply.status);
            for (name, value) in &reply.headers {
                out.push_str(&format!(
                    "{name}: {}\n",
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            out.push('\n');
            out.push_str(&String::from_utf8_lossy(&reply.body));
            if reply.truncated {
                out.push_str("\n[body cut at 1 MiB]");
            }
            println!("{}", mask(&out));
            Ok(if (200..300).contains(&reply.status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(outcome) => {
            eprintln!(
                "error: {}: {}",
                outcome.code,
                outcome.error.unwrap_or_default()
            );
            Ok(ExitCode::from(1))
        }
    }
}
