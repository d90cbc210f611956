//! The action definition as written in a file (SPEC §4), before validation.
//!
//! These types only fix the shape (field names, nesting, scalar kinds); every
//! value is checked and compiled by `action::load` into an `ActionDefinition`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub endpoint: EndpointSpec,
    #[serde(default)]
    pub auth: Option<AuthSpec>,
    #[serde(default)]
    pub parameters: serde_json::Map<String, Value>,
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default)]
    pub null_values: Option<String>,
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    #[serde(default)]
    pub throttle: Option<ThrottleSpec>,
    #[serde(default)]
    pub cap: Option<CapSpec>,
    #[serde(default)]
    pub response: Option<ResponseSpec>,
    #[serde(default)]
    pub tls: Option<TlsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub query: serde_json::Map<String, Value>,
    #[serde(default)]
    pub headers: serde_json::Map<String, Value>,
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthSpec {
    None,
    Basic {
        username: String,
        password: String,
    },
    ApiKey {
        name: String,
        value: String,
        #[serde(rename = "in", default = "default_in")]
        location: String,
    },
    Bearer {
        token: String,
    },
    Oauth2 {
        token_url: String,
        client_id: String,
        client_secret: String,
        #[serde(default)]
        scope: Option<String>,
        #[serde(default)]
        audience: Option<String>,
        /// `body` (client_secret_post, the default) or `basic` (client_secret_basic).
        #[serde(default)]
        client_auth: Option<String>,
    },
    Custom {
        endpoint: String,
        #[serde(default = "default_post")]
        method: String,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        #[serde(default = "default_form")]
        body_type: String,
        #[serde(default)]
        body: Option<Value>,
        #[serde(default)]
        token_path: String,
        #[serde(default)]
        expiry_path: Option<String>,
        #[serde(default)]
        cache_for: Option<String>,
        #[serde(default = "default_place")]
        place: String,
    },
    Hmac {
        secret: String,
    },
}

fn default_in() -> String {
    "header".into()
}
fn default_post() -> String {
    "POST".into()
}
fn default_form() -> String {
    "form".into()
}
fn default_place() -> String {
    "bearer".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    pub max_attempts: Option<u32>,
    pub initial_backoff: Option<String>,
    pub max_backoff: Option<String>,
    pub multiplier: Option<f64>,
    pub max_elapsed: Option<String>,
    pub retry_on: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpec {
    pub key: Option<String>,
    pub rate: Option<String>,
    pub burst: Option<u32>,
    pub max_concurrency: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapSpec {
    pub max_calls: u64,
    pub per: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseSpec {
    pub capture: Option<bool>,
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub ca_cert: Option<String>,
}
