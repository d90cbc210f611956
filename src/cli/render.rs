//! `render`: prints the exact request an event produces, secrets masked.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use reqwest::header::AUTHORIZATION;

use super::{load_actions, read_event, ActionArgs};
use crate::action::ActionDefinition;
use crate::dispatch::{self, DispatchOptions};

pub fn run(config: &Path, args: &ActionArgs) -> anyhow::Result<ExitCode> {
    let (settings, actions) = load_actions(config, &args.action)?;
    let event = read_event(&args.event, &args.action)?;
    let options = DispatchOptions::from_settings(&settings.dispatch);
    match dispatch::prepare(&actions, &event, options.idempotency_header.as_ref()) {
        Ok((def, rendered)) => {
            let mut req = dispatch::to_request(&rendered);
            def.auth.apply_static(&mut req, &event.event_id);
            print!("{}", describe(&def, &req, &rendered.sensitive));
            Ok(ExitCode::SUCCESS)
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

/// The request as text: request line, headers, blank line, body. Credentials
/// and every resolved secret are shown as `***`.
pub fn describe(
    def: &ActionDefinition,
    req: &reqwest::Request,
    sensitive: &[reqwest::header::HeaderName],
) -> String {
    let mut url = req.url().clone();
    if let Some(param) = def.auth.secret_query_param() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == param {
                    "***".to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    let mut out = format!("{} {}\n", req.method(), url);
    for (name, value) in req.headers() {
        // Header values may carry UTF-8 from event data (sent as is): show it.
        let text = String::from_utf8_lossy(value.as_bytes());
        let shown = if name == AUTHORIZATION {
            match text.split_once(' ') {
                Some((scheme, _)) => format!("{scheme} ***"),
                None => "***".into(),
            }
        } else if value.is_sensitive() || sensitive.contains(name) {
            "***".into()
        } else {
            text.to_string()
        };
        let _ = writeln!(out, "{name}: {shown}");
    }
    out.push('\n');
    if let Some(body) = req.body().and_then(|b| b.as_bytes()) {
        out.push_str(&String::from_utf8_lossy(body));
        out.push('\n');
    }
    def.mask(&out)
}
