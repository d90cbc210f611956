//! The command line (SPEC §2): one file per verb.
//!
//! Exit codes: 0 ok, 1 a problem the user can fix, 2 usage (clap's own).

mod bench;
mod demo;
mod render;
mod run;
mod send;
mod validate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::action::{self, ActionSet};
use crate::event::ActionEvent;
use crate::settings::Settings;
use crate::telemetry::{self, LogFormat};

/// `--config` when it is not given.
pub const DEFAULT_CONFIG: &str = "config";

#[derive(Debug, Parser)]
#[command(
    name = "journey-actions",
    version,
    about = "Executes journey custom actions: renders each action event into the provider's REST call and sends it",
    long_about = "Executes the custom actions of customer-journey orchestration. An action event (JSON) names an \
action definition (one YAML or JSON file in the actions directory); journey-actions renders the HTTP request \
from the event and calls the provider with throttling, capping, timeouts and retries.\n\n\
Configuration: DIR/default.toml, then DIR/local.toml, then JOURNEY_ACTIONS__SECTION__KEY variables."
)]
pub struct Cli {
    /// Configuration directory (default.toml, local.toml, and actions/ unless `[actions] dir` says otherwise)
    #[arg(long, global = true, value_name = "DIR", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Log line format on stderr
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// More log output (-v debug, -vv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (-q warnings only, -qq errors only)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The worker: consume action events, call providers, write results and DLQ records, serve /metrics; until SIGTERM/SIGINT
    Run,
    /// The embedded default: in-process Kafka (librdkafka mock cluster) and mock providers, the example actions, sample events through the real worker; prints a summary
    Demo(DemoArgs),
    /// Measure throughput, latency, memory and CPU against this machine's HTTP and Kafka limits, in one run
    ///
    /// Starts an HTTP sink in a process of its own, sends it uncounted warm-up calls, then runs on
    /// the same events: the end-to-end worker (events/s, latency, peak RSS, CPU), limit B (Kafka
    /// consume alone), the Kafka round trip, and limit A (the worker's HTTP client alone, at the
    /// same concurrency). Prints a table and the ratio end-to-end / min(A, B), this process's CPU
    /// by kind of thread (runtime, Kafka clients, mock broker), and, when both phases are
    /// CPU-bound, what an event costs beyond limit A's call against what a ratio of 0.85 allows;
    /// `--json FILE` writes the same figures. See BENCHMARKS.md.
    Bench(BenchArgs),
    /// The benchmark's HTTP sink (started by `bench` in a process of its own)
    #[command(hide = true)]
    BenchSink {
        #[arg(long, default_value = "0ms")]
        latency: crate::bench::sink::Latency,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, value_enum, default_value = "http")]
        protocol: crate::bench::sink::Protocol,
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Load and check every action definition; print `FILE: FIELD: message` per problem (exit 1 if any)
    Validate,
    /// Print the exact HTTP request an event would produce (secrets shown as ***); sends nothing
    Render(ActionArgs),
    /// Send one test request for an event: one real call, no retries; print status, headers and body (exit 0 on 2xx)
    Send(ActionArgs),
}

#[derive(Debug, Args)]
pub struct ActionArgs {
    /// The action id (overrides the event's `action_id`)
    #[arg(long, value_name = "ID")]
    pub action: String,
    /// The action event, a JSON file (`-` for stdin). `event_id` and `profile_id` may be left out: test values are used
    #[arg(long, value_name = "FILE")]
    pub event: PathBuf,
}

/// A count from 1 to 10 000 000 (`--events 0` is a mistake, not a request
/// for one); clap's message names the range.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..=10_000_000)
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Events per phase [default: 10000; with --rate, five seconds of events: 60000 with
    /// `half`, five times the rate with a number (1000 to 60000), so that the rate phase
    /// outlasts its one-second warm-up]
    #[arg(long, value_parser = at_least_one())]
    pub events: Option<usize>,
    /// The worker's max_in_flight, and the HTTP limit's concurrency
    #[arg(long, default_value_t = 1024, value_parser = at_least_one())]
    pub concurrency: usize,
    /// Which actions the events use
    #[arg(long, value_enum, default_value = "simple")]
    pub actions: crate::bench::Mix,
    /// Which events run one after another
    #[arg(long, value_enum, default_value = "key")]
    pub ordering: crate::settings::Ordering,
    /// Distinct Kafka keys (profiles); default: one per event
    #[arg(long, value_parser = at_least_one())]
    pub keys: Option<usize>,
    /// The sink's answer latency: 0ms, 5ms, or a range such as 1-20ms
    #[arg(long, default_value = "0ms")]
    pub sink_latency: crate::bench::sink::Latency,
    /// What the sink speaks; `https` and `h2` use a private CA that the bench's actions trust (`tls.ca_cert`)
    #[arg(long, value_enum, default_value = "http")]
    pub sink_protocol: crate::bench::sink::Protocol,
    /// A real broker instead of the in-process mock cluster
    #[arg(long, value_name = "HOST:PORT")]
    pub brokers: Option<String>,
    /// Produce the end-to-end events at this many per second, or `half`: first run end-to-end at full speed, then at half of what it reached (latency at a given load; the events consumed in the first second are left out of the latency figures and reported apart)
    #[arg(long, value_name = "PER_SECOND|half")]
    pub rate: Option<crate::bench::Rate>,
    /// Give the simple action `throttle.max_concurrency: N` (events beyond N wait without a connection)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: Option<u32>,
    /// Partitions of the bench topics
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,
    /// Run the phases this many times, one round after another on the same events, sink and
    /// broker; the table shows the round with the median ratio (or, with `--rate`, the median
    /// p99), every round's ratio, limit A and end-to-end beside it, and the first round's peak RSS
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub rounds: u16,
    /// Also write the figures as JSON
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// After the run, keep the in-process mock cluster (with the run's topics
    /// and their records) and the sink up, print their addresses, and wait
    /// for Ctrl-C or SIGTERM: to point kcat or an HTTP load generator at the
    /// same topic and sink
    #[arg(long)]
    pub hold: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many sample events to produce
    #[arg(long, default_value_t = 10_000)]
    pub events: usize,
    /// Exit once every event is final (default: keep /metrics up until Ctrl-C)
    #[arg(long)]
    pub exit: bool,
    /// Use this Kafka broker (fresh topics are created) instead of the in-process mock cluster
    #[arg(long, value_name = "HOST:PORT")]
    pub brokers: Option<String>,
    /// Where to serve /metrics (a free port is used if this one is taken)
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR")]
    pub listen: String,
}

/// Runs the CLI and maps the result to an exit code.
pub fn main(cli: Cli) -> ExitCode {
    // The demo and the benchmark speak through their summaries; their logs start at warnings.
    let quieter = matches!(cli.command, Command::Demo(_) | Command::Bench(_)) as i8;
    telemetry::init(
        cli.log_format,
        cli.verbose as i8 - cli.quiet as i8 - quieter,
    );
    let result = match &cli.command {
        Command::Run => run::run(&cli.config),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(&cli.config, args),
        Command::BenchSink {
            latency,
            threads,
            protocol,
            tls_cert,
            tls_key,
        } => crate::bench::sink::run_process(
            *latency,
            *threads,
            *protocol,
            tls_cert.as_deref().zip(tls_key.as_deref()),
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Validate => validate::run(&cli.config),
        Command::Render(args) => render::run(&cli.config, args),
        Command::Send(args) => send::run(&cli.config, args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Loads settings and the actions; problems in files other than the one
/// `wanted` are reported as warnings.
fn load_actions(config: &Path, wanted: &str) -> anyhow::Result<(Settings, ActionSet)> {
    let settings = Settings::load(config)?;
    let (set, problems) = action::load_dir_partial(&settings.actions.dir, config);
    if set.get(wanted).is_none() {
        for p in &problems {
            eprintln!("{p}");
        }
        anyhow::bail!(
            "no valid action `{wanted}` in {} ({} problem(s) above)",
            settings.actions.dir.display(),
            problems.len()
        );
    }
    for p in &problems {
        eprintln!("warning: {p}");
    }
    Ok((settings, set))
}

/// Reads an event file for `render`/`send`: `--action` names the action, and
/// missing `event_id`/`profile_id` get test values.
fn read_event(path: &Path, action: &str) -> anyhow::Result<ActionEvent> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the event from stdin")?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read event file {}", path.display()))?
    };
    let mut value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("event file {} is not valid JSON", path.display()))?;
    if let Some(map) = value.as_object_mut() {
        map.insert("action_id".into(), action.into());
        map.entry("event_id")
            .or_insert_with(|| format!("test-{}", chrono::Utc::now().timestamp_millis()).into());
        map.entry("profile_id")
            .or_insert_with(|| "test-profile".into());
    }
    ActionEvent::from_value(value)
        .map_err(|e| anyhow::anyhow!("invalid_event: {}: {}", path.display(), e.reason))
}
