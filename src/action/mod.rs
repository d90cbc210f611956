//! The config store (SPEC §4): one YAML or JSON file per action, loaded,
//! validated and compiled into [`ActionDefinition`]s.
//!
//! Loading is all-or-nothing: a set is returned only when every file is
//! valid; otherwise every problem found is returned as `FILE: FIELD: message`.

pub mod params;
pub mod reload;
pub mod secret;
pub mod spec;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use sha2::{Digest, Sha256};

use crate::dispatch::auth::Auth;
use crate::dispatch::client::{self, ColdStart, TlsMaterial};
use crate::dispatch::limits::{CapSpec, LimitSpec};
use crate::dispatch::retry::RetryPolicy;
use crate::render::{NullValues, RequestSpec, RequestTemplate};
use crate::units::{parse_duration, parse_rate};
pub use params::{ParamType, Parameter};
use spec::ActionSpec;

/// Default `response.max_bytes`.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// What to keep of the provider's answer.
#[derive(Debug, Clone, Copy)]
pub struct ResponseOptions {
    pub capture: bool,
    pub max_bytes: usize,
}

/// A validated action with every template compiled.
#[derive(Debug)]
pub struct ActionDefinition {
    pub id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub file: PathBuf,
    /// SHA-256 of the file's bytes, hex.
    pub hash: String,
    pub request: RequestTemplate,
    /// Per attempt; `None` takes `dispatch.default_timeout`.
    pub timeout: Option<Duration>,
    pub auth: Auth,
    pub parameters: Vec<Parameter>,
    pub retry: RetryPolicy,
    /// `throttle.key`, default the URL's host.
    pub limits_key: String,
    pub limits: LimitSpec,
    pub response: ResponseOptions,
    /// A client of its own when the action has TLS material.
    pub client: Option<reqwest::Client>,
    /// That client's cold-start rule (each definition has its own, so a
    /// reload, which builds new clients, starts afresh).
    pub cold_start: Arc<ColdStart>,
    /// Every resolved secret value, for masking outgoing text.
    pub secrets: Vec<SecretString>,
}

impl ActionDefinition {
    /// Checks `params` against `parameters`; returns the optional parameters
    /// the event does not carry (they render as `none`).
    pub fn check_params<'a>(
        &'a self,
        params: &crate::event::Object,
    ) -> Result<Vec<&'a str>, String> {
        params::check(&self.parameters, params)
    }

    /// Masks this action's secrets in `text`.
    pub fn mask(&self, text: &str) -> String {
        secret::mask(text, &self.secrets)
    }
}

/// A problem with one file, printed as `FILE: FIELD: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProblem {
    pub file: PathBuf,
    pub field: String,
    pub message: String,
}

impl fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.field,
            self.message
        )
    }
}

/// A complete, valid set of actions.
#[derive(Debug, Default)]
pub struct ActionSet {
    actions: HashMap<String, Arc<ActionDefinition>>,
}

impl ActionSet {
    pub fn get(&self, id: &str) -> Option<&Arc<ActionDefinition>> {
        self.actions.get(id)
    }

    pub fn len(&self) -> usize {
        self.actions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The actions sorted by id.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ActionDefinition>> {
        let mut all: Vec<_> = self.actions.values().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.into_iter()
    }

    /// The merged limits of every key.
    pub fn limits(&self) -> BTreeMap<String, LimitSpec> {
        let mut keys: BTreeMap<String, LimitSpec> = BTreeMap::new();
        for action in self.iter() {
            let _ = keys
                .entry(action.limits_key.clone())
                .or_default()
                .merge(&action.limits);
        }
        keys
    }
}

/// Loads every `*.yaml`, `*.yml` and `*.json` file in `dir`, all or nothing.
/// `secret_base` resolves relative `${file:…}` and TLS paths (the config directory).
pub fn load_dir(dir: &Path, secret_base: &Path) -> Result<ActionSet, Vec<LoadProblem>> {
    match load_dir_partial(dir, secret_base) {
        (set, problems) if problems.is_empty() => Ok(set),
        (_, problems) => Err(problems),
    }
}

/// Loads what is valid in `dir` and reports the rest (for `render` and
/// `send`, which need one action and should not fail on another's mistake).
pub fn load_dir_partial(dir: &Path, secret_base: &Path) -> (ActionSet, Vec<LoadProblem>) {
    match action_files(dir) {
        Ok(files) => load_files_partial(&files, secret_base),
        Err(problem) => (ActionSet::default(), vec![problem]),
    }
}

fn action_files(dir: &Path) -> Result<Vec<PathBuf>, LoadProblem> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadProblem {
        file: dir.to_path_buf(),
        field: "-".into(),
        message: format!("cannot read the actions directory: {e}"),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Loads the given files as one set, all or nothing.
pub fn load_files(files: &[PathBuf], secret_base: &Path) -> Result<ActionSet, Vec<LoadProblem>> {
    match load_files_partial(files, secret_base) {
        (set, problems) if problems.is_empty() => Ok(set),
        (_, problems) => Err(problems),
    }
}

fn load_files_partial(files: &[PathBuf], secret_base: &Path) -> (ActionSet, Vec<LoadProblem>) {
    let mut problems = Vec::new();
    let mut actions: HashMap<String, Arc<ActionDefinition>> = HashMap::new();
    let mut keys: HashMap<String, (LimitSpec, PathBuf)> = HashMap::new();
    for file in files {
        let mut report = |field: String, message: String| {
            problems.push(LoadProblem {
                file: file.clone(),
                field,
                message,
            })
        };
        let def = match load_file(file, secret_base) {
            Ok(def) => def,
            Err(list) => {
                for (field, message) in list {
                    report(field, message);
                }
                continue;
            }
        };
        if let Some(other) = actions.get(&def.id) {
            report(
                "id".into(),
                format!(
                    "`{}` is already defined in {}",
                    def.id,
                    other.file.display()
                ),
            );
            continue;
        }
        if !def.limits.is_empty() || keys.contains_key(&def.limits_key) {
            let (merged, first) = keys
                .entry(def.limits_key.clone())
                .or_insert_with(|| (LimitSpec::default(), file.clone()));
            if let Err(e) = merged.merge(&def.limits) {
                report(
                    "throttle".into(),
                    format!(
                        "key `{}`: {e} ({}); actions sharing a key share one budget, so give them equal limits or different `throttle.key`s",
                        def.limits_key,
                        first.display()
                    ),
                );
                continue;
            }
        }
        actions.insert(def.id.clone(), Arc::new(def));
    }
    (ActionSet { actions }, problems)
}

type Problems = Vec<(String, String)>;

/// Parses and compiles one file.
pub fn load_file(file: &Path, secret_base: &Path) -> Result<ActionDefinition, Problems> {
    let bytes = std::fs::read(file)
        .map_err(|e| vec![("-".to_string(), format!("cannot read the file: {e}"))])?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| vec![("-".to_string(), "the file is not UTF-8".to_string())])?;
    let value: serde_json::Value = if file.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| {
            vec![(
                "-".to_string(),
                format!(
                    "invalid JSON at line {} column {}: {e}",
                    e.line(),
                    e.column()
                ),
            )]
        })?
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" at line {} column {}", l.line(), l.column()))
                .unwrap_or_default();
            vec![("-".to_string(), format!("invalid YAML{at}: {e}"))]
        })?
    };
    let spec: ActionSpec = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        vec![(field_of(&path, &message), message)]
    })?;
    let hash = hex(&Sha256::digest(&bytes));
    compile(spec, file, hash, secret_base)
}

/// Names the field a serde error is about, including the unknown or
/// missing field itself.
fn field_of(path: &str, message: &str) -> String {
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| {
            message
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('`').next())
        });
    match (path, named) {
        (".", Some(name)) => name.to_string(),
        (".", None) => "-".to_string(),
        (p, Some(name)) if !p.ends_with(name) => format!("{p}.{name}"),
        (p, _) => p.to_string(),
    }
}

fn method_of(text: &str) -> reqwest::Method {
    reqwest::Method::from_bytes(text.to_ascii_uppercase().as_bytes())
        .unwrap_or(reqwest::Method::POST)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn compile(
    spec: ActionSpec,
    file: &Path,
    hash: String,
    base: &Path,
) -> Result<ActionDefinition, Problems> {
    let mut problems: Problems = Vec::new();
    let mut secrets = Vec::new();
    if !valid_id(&spec.id) {
        problems.push((
            "id".into(),
            format!(
                "`{}` must be 1 to 64 letters, digits or underscores",
                spec.id
            ),
        ));
    }
    let parameters = params::compile(&spec.parameters, &mut problems);
    let null_values = match spec.null_values.as_deref() {
        None | Some("omit") => NullValues::Omit,
        Some("keep") => NullValues::Keep,
        Some(other) => {
            problems.push((
                "null_values".into(),
                format!("`{other}` is not one of omit, keep"),
            ));
            NullValues::Omit
        }
    };
    let request = RequestTemplate::compile(
        RequestSpec {
            method: &spec.endpoint.method,
            url: &spec.endpoint.url,
            query: &spec.endpoint.query,
            headers: &spec.endpoint.headers,
            payload: spec.payload.as_ref(),
            null_values,
            parameters: parameters
                .iter()
                .map(|p| p.name.as_str())
                .collect::<HashSet<_>>(),
            secret_base: base,
        },
        &mut secrets,
    )
    .map_err(|list| problems.extend(list))
    .ok();
    let timeout = spec
        .endpoint
        .timeout
        .as_deref()
        .and_then(|t| match parse_duration(t) {
            Ok(d) if d.is_zero() => {
                problems.push(("endpoint.timeout".into(), "must be longer than zero".into()));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(("endpoint.timeout".into(), e));
                None
            }
        });
    let auth = Auth::from_spec(spec.auth.as_ref(), base, &mut secrets)
        .map_err(|list| problems.extend(list))
        .ok();
    let retry = match &spec.retry {
        None => RetryPolicy::default(),
        Some(r) => RetryPolicy::from_spec(r).unwrap_or_else(|list| {
            problems.extend(list);
            RetryPolicy::default()
        }),
    };
    let mut limits = LimitSpec::default();
    let mut key = None;
    if let Some(t) = &spec.throttle {
        if let Some(k) = &t.key {
            if k.trim().is_empty() {
                problems.push(("throttle.key".into(), "must not be empty".into()));
            }
            key = Some(k.clone());
        }
        if let Some(rate) = &t.rate {
            match parse_rate(rate) {
                Ok(r) => limits.rate = Some(r),
                Err(e) => problems.push(("throttle.rate".into(), e)),
            }
        }
        match t.burst {
            Some(0) => problems.push(("throttle.burst".into(), "must be at least 1".into())),
            Some(_) if t.rate.is_none() => {
                problems.push(("throttle.burst".into(), "needs throttle.rate".into()))
            }
            Some(b) => limits.burst = b,
            None => limits.burst = 1,
        }
        match t.max_concurrency {
            Some(0) => problems.push((
                "throttle.max_concurrency".into(),
                "must be at least 1".into(),
            )),
            n => limits.max_concurrency = n,
        }
    }
    if let Some(c) = &spec.cap {
        if c.max_calls == 0 {
            problems.push(("cap.max_calls".into(), "must be at least 1".into()));
        }
        match parse_duration(&c.per) {
            Ok(per) if !per.is_zero() => {
                limits.cap = Some(CapSpec {
                    max_calls: c.max_calls,
                    per,
                })
            }
            Ok(_) => problems.push(("cap.per".into(), "must be longer than zero".into())),
            Err(e) => problems.push(("cap.per".into(), e)),
        }
    }
    let response = ResponseOptions {
        capture: spec
            .response
            .as_ref()
            .and_then(|r| r.capture)
            .unwrap_or(true),
        max_bytes: spec
            .response
            .as_ref()
            .and_then(|r| r.max_bytes)
            .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
    };
    let client = spec.tls.as_ref().and_then(|tls| {
        let mut pem = |field: &str, value: &Option<String>| -> Option<Vec<u8>> {
            let text = value.as_deref()?;
            let resolved = secret::resolve(text, base, &mut secrets)
                .map_err(|e| problems.push((format!("tls.{field}"), e)))
                .ok()?;
            let resolved = secrecy::ExposeSecret::expose_secret(&resolved).to_string();
            if resolved.trim_start().starts_with("-----BEGIN") {
                Some(resolved.into_bytes())
            } else {
                let path = base.join(resolved.trim());
                std::fs::read(&path)
                    .map_err(|e| {
                        problems.push((
                            format!("tls.{field}"),
                            format!("cannot read `{}`: {e}", path.display()),
                        ))
                    })
                    .ok()
            }
        };
        let cert = pem("client_cert", &tls.client_cert);
        let key = pem("client_key", &tls.client_key);
        let ca = pem("ca_cert", &tls.ca_cert);
        let identity = match (cert, key) {
            (Some(mut c), Some(k)) => {
                c.push(b'\n');
                c.extend_from_slice(&k);
                Some(c)
            }
            (None, None) => None,
            _ => {
                problems.push((
                    "tls".into(),
                    "client_cert and client_key go together".into(),
                ));
                return None;
            }
        };
        let material = TlsMaterial {
            identity_pem: identity,
            ca_pem: ca,
        };
        client::build(
            Some(&material),
            client::Redirects::for_method(&method_of(&spec.endpoint.method)),
        )
        .map_err(|e| problems.push(("tls".into(), e)))
        .ok()
    });
    match (request, auth) {
        (Some(request), Some(auth)) if problems.is_empty() => Ok(ActionDefinition {
            limits_key: key.unwrap_or_else(|| request.host().to_string()),
            id: spec.id,
            name: spec.name,
            description: spec.description,
            file: file.to_path_buf(),
            hash,
            request,
            timeout,
            auth,
            parameters,
            retry,
            limits,
            response,
            client,
            cold_start: Arc::default(),
            secrets,
        }),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_errors_name_the_field() {
        assert_eq!(
            field_of(".", "unknown field `nmae`, expected one of"),
            "nmae"
        );
        assert_eq!(
            field_of("endpoint", "unknown field `verb`, expected"),
            "endpoint.verb"
        );
        assert_eq!(field_of(".", "missing field `endpoint`"), "endpoint");
        assert_eq!(
            field_of("retry.max_attempts", "invalid type: string"),
            "retry.max_attempts"
        );
    }

    #[test]
    fn ids_follow_the_pattern() {
        assert!(valid_id("sms_gateway_2"));
        assert!(!valid_id(""));
        assert!(!valid_id("sms-gateway"));
        assert!(!valid_id(&"x".repeat(65)));
    }
}
