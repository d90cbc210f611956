//! `validate`: loads every definition and reports every problem.

use std::path::Path;
use std::process::ExitCode;

use crate::action;
use crate::settings::Settings;

pub fn run(config: &Path) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config)?;
    let dir = &settings.actions.dir;
    match action::load_dir(dir, config) {
        Ok(set) => {
            let ids: Vec<&str> = set.iter().map(|a| a.id.as_str()).collect();
            println!(
                "ok: {} action(s) valid in {}: {}",
                set.len(),
                dir.display(),
                ids.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            for p in &problems {
                println!("{p}");
            }
            eprintln!("{} problem(s) in {}", problems.len(), dir.display());
            Ok(ExitCode::from(1))
        }
    }
}
