//! The worker's own configuration (SPEC §3): `default.toml` in the config
//! directory, overlaid by `local.toml`, then by `JOURNEY_ACTIONS__SECTION__KEY`
//! environment variables. Loaded and validated once at start-up; unknown keys
//! are errors so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::units::serde_duration;

/// Environment variables with this prefix (then `__`) override file settings.
pub const ENV_PREFIX: &str = "JOURNEY_ACTIONS";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub dispatch: DispatchSettings,
    pub admin: AdminSettings,
    pub actions: ActionsSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    pub input_topic: String,
    pub dlq_topic: String,
    /// Empty disables the results topic.
    pub results_topic: String,
    /// Extra librdkafka consumer properties, passed through as they are.
    pub consumer: BTreeMap<String, String>,
    /// Extra librdkafka producer properties, passed through as they are.
    pub producer: BTreeMap<String, String>,
}

/// SPEC §6: which events run one after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Events with the same Kafka key, in offset order
    Key,
    /// All events of a partition, one at a time
    Partition,
    /// No order
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    pub max_in_flight: usize,
    pub ordering: Ordering,
    /// Empty disables the header.
    pub idempotency_header: String,
    #[serde(with = "serde_duration")]
    pub default_timeout: Duration,
    #[serde(with = "serde_duration")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionsSettings {
    pub dir: PathBuf,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            group_id: "journey-actions".into(),
            input_topic: "journey.actions".into(),
            dlq_topic: "journey.actions.dlq".into(),
            results_topic: "journey.actions.results".into(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            ordering: Ordering::Key,
            idempotency_header: "Idempotency-Key".into(),
            default_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
        }
    }
}

impl Default for ActionsSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("actions"),
        }
    }
}

impl Settings {
    /// Loads `default.toml` and `local.toml` from `config_dir` (both optional:
    /// missing keys take the defaults of SPEC §3), then the environment.
    /// Relative paths are resolved against `config_dir`.
    pub fn load(config_dir: &Path) -> anyhow::Result<Settings> {
        Self::load_with_env(config_dir, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        config_dir: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Settings> {
        if !config_dir.is_dir() {
            bail!("config directory {} does not exist", config_dir.display());
        }
        // `with_prefix` below keeps only the JOURNEY_ACTIONS__ variables.
        let env: config::Map<String, String> = vars.into_iter().collect();
        let built = config::Config::builder()
            .add_source(config::File::from(config_dir.join("default.toml")).required(false))
            .add_source(config::File::from(config_dir.join("local.toml")).required(false))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .with_context(|| format!("reading configuration in {}", config_dir.display()))?;
        let mut settings: Settings = built.try_deserialize().map_err(|e| {
            anyhow::anyhow!("invalid configuration in {}: {e}", config_dir.display())
        })?;
        settings.validate()?;
        if settings.actions.dir.is_relative() {
            settings.actions.dir = config_dir.join(&settings.actions.dir);
        }
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.dispatch.max_in_flight == 0 {
            bail!("dispatch.max_in_flight: must be at least 1");
        }
        if self.dispatch.default_timeout.is_zero() {
            bail!("dispatch.default_timeout: must be longer than zero");
        }
        let header = &self.dispatch.idempotency_header;
        if !header.is_empty() && reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err()
        {
            bail!("dispatch.idempotency_header: `{header}` is not a valid HTTP header name");
        }
        for (name, value) in [
            ("kafka.brokers", &self.kafka.brokers),
            ("kafka.group_id", &self.kafka.group_id),
            ("kafka.input_topic", &self.kafka.input_topic),
            ("kafka.dlq_topic", &self.kafka.dlq_topic),
        ] {
            if value.trim().is_empty() {
                bail!("{name}: must not be empty");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(default_toml: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("default.toml"), default_toml).unwrap();
        dir
    }

    #[test]
    fn defaults_apply_when_files_are_silent() {
        let dir = dir_with("");
        let s = Settings::load_with_env(dir.path(), []).unwrap();
        assert_eq!(s.kafka.input_topic, "journey.actions");
        assert_eq!(s.dispatch.max_in_flight, 1024);
        assert_eq!(s.dispatch.ordering, Ordering::Key);
        assert_eq!(s.dispatch.default_timeout, Duration::from_secs(10));
        assert_eq!(s.actions.dir, dir.path().join("actions"));
    }

    #[test]
    fn local_toml_then_environment_override_default_toml() {
        let dir = dir_with(
            "[kafka]\nbrokers = \"a:1\"\ngroup_id = \"g1\"\n[dispatch]\ndefault_timeout = \"3s\"\n",
        );
        std::fs::write(
            dir.path().join("local.toml"),
            "[kafka]\ngroup_id = \"g2\"\n",
        )
        .unwrap();
        let env = [
            (
                "JOURNEY_ACTIONS__KAFKA__BROKERS".to_string(),
                "kafka:9092".to_string(),
            ),
            (
                "JOURNEY_ACTIONS__DISPATCH__MAX_IN_FLIGHT".to_string(),
                "7".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let s = Settings::load_with_env(dir.path(), env).unwrap();
        assert_eq!(s.kafka.brokers, "kafka:9092");
        assert_eq!(s.kafka.group_id, "g2");
        assert_eq!(s.dispatch.max_in_flight, 7);
        assert_eq!(s.dispatch.default_timeout, Duration::from_secs(3));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let dir = dir_with("[dispatch]\nmax_inflight = 3\n");
        let err = format!("{:#}", Settings::load_with_env(dir.path(), []).unwrap_err());
        assert!(err.contains("max_inflight"), "{err}");
        let dir = dir_with("[kafkaa]\nbrokers = \"x\"\n");
        let err = format!("{:#}", Settings::load_with_env(dir.path(), []).unwrap_err());
        assert!(err.contains("kafkaa"), "{err}");
    }

    #[test]
    fn bad_durations_and_orderings_are_errors() {
        let dir = dir_with("[dispatch]\ndefault_timeout = \"ten\"\n");
        let err = format!("{:#}", Settings::load_with_env(dir.path(), []).unwrap_err());
        assert!(err.contains("ten"), "{err}");
        let dir = dir_with("[dispatch]\nordering = \"random\"\n");
        assert!(Settings::load_with_env(dir.path(), []).is_err());
    }

    #[test]
    fn absolute_actions_dir_is_kept() {
        let dir = dir_with("[actions]\ndir = \"/etc/ja/actions\"\n");
        let s = Settings::load_with_env(dir.path(), []).unwrap();
        assert_eq!(s.actions.dir, PathBuf::from("/etc/ja/actions"));
    }
}
