use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = journey_actions::cli::Cli::parse();
    journey_actions::cli::main(cli)
}
