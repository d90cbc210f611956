use std::process::ExitCode;

use clap::Parser;

// The hot path allocates per event (records, headers, bodies) from many
// threads; glibc's malloc showed as ~17 % of CPU in the benchmark's profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = journey_actions::cli::Cli::parse();
    journey_actions::cli::main(cli)
}
