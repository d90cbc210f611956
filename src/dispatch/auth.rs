//! Authentication (SPEC §4.2): credentials resolved at load, tokens fetched
//! and cached at run time.
//!
//! Token-based schemes (`oauth2`, `custom`) keep one token per action. All
//! concurrent callers share it; when it is missing or due, exactly one caller
//! fetches a new one while the others wait for that fetch (single flight).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION};
use reqwest::{Client, Method, Request};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::Sha256;
use url::Url;

use super::retry::AttemptClass;
use crate::action::secret;
use crate::action::spec::AuthSpec;
use crate::units::parse_duration;

/// Refresh a token this long before it expires (SPEC §4.2), or at half its
/// lifetime when it lives less than twice that.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Lifetime assumed when an OAuth2 server sends no `expires_in`.
const DEFAULT_OAUTH2_LIFETIME: Duration = Duration::from_secs(3600);
/// `custom` auth's default `cache_for`.
const DEFAULT_CUSTOM_LIFETIME: Duration = Duration::from_secs(3600);

/// Where a fetched token goes on the provider call.
#[derive(Debug, Clone)]
pub enum Placement {
    Bearer,
    Header(HeaderName),
    Query(String),
}

#[derive(Debug)]
enum TokenSource {
    OAuth2 {
        token_url: Url,
        client_id: SecretString,
        client_secret: SecretString,
        scope: Option<String>,
        audience: Option<String>,
        basic: bool,
    },
    Custom {
        endpoint: Url,
        method: Method,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: CustomBody,
        token_path: Vec<String>,
        expiry_path: Option<Vec<String>>,
        cache_for: Duration,
    },
}

#[derive(Debug)]
enum CustomBody {
    None,
    Form(Vec<(String, SecretString)>),
    Json(SecretString),
}

#[derive(Clone)]
struct CachedToken {
    value: Arc<SecretString>,
    refresh_at: Instant,
    generation: u64,
}

/// A token scheme with its cache.
#[derive(Debug)]
pub struct TokenAuth {
    source: TokenSource,
    place: Placement,
    current: RwLock<Option<CachedToken>>,
    /// Held while fetching; holds the last fetch's failure (`None` after a success).
    refresh: tokio::sync::Mutex<Option<AuthError>>,
    /// Fetches finished, failed or not.
    fetches: AtomicU64,
    generation: AtomicU64,
}

impl std::fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CachedToken(***)")
    }
}

/// An action's authentication, resolved.
#[derive(Debug)]
pub enum Auth {
    None,
    /// `basic`, `bearer`, `api_key` in a header.
    Header {
        name: HeaderName,
        value: HeaderValue,
    },
    /// `api_key` in the query.
    Query {
        name: String,
        value: SecretString,
    },
    Token(Box<TokenAuth>),
    /// Standard Webhooks signing.
    Hmac {
        key: SecretString,
    },
}

/// Credentials could not be obtained for a call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("authentication: {message}")]
pub struct AuthError {
    pub message: String,
    pub class: AttemptClass,
}

/// What [`Auth::apply`] put on the request; lets a 401 invalidate exactly that token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenUsed(u64);

type Problems = Vec<(String, String)>;

impl Auth {
    pub fn from_spec(
        spec: Option<&AuthSpec>,
        base: &Path,
        secrets: &mut Vec<SecretString>,
    ) -> Result<Auth, Problems> {
        let mut problems = Vec::new();
        let mut res = |field: &str, text: &str| -> SecretString {
            match secret::resolve(text, base, secrets) {
                Ok(v) => v,
                Err(e) => {
                    problems.push((format!("auth.{field}"), e));
                    SecretString::from(String::new())
                }
            }
        };
        let auth = match spec {
            None | Some(AuthSpec::None) => Auth::None,
            Some(AuthSpec::Basic { username, password }) => {
                let user = res("username", username);
                let pass = res("password", password);
                let encoded =
                    BASE64.encode(format!("{}:{}", user.expose_secret(), pass.expose_secret()));
                header_auth(
                    AUTHORIZATION,
                    &format!("Basic {encoded}"),
                    "auth.password",
                    &mut problems,
                )
            }
            Some(AuthSpec::Bearer { token }) => {
                let token = res("token", token);
                header_auth(
                    AUTHORIZATION,
                    &format!("Bearer {}", token.expose_secret()),
                    "auth.token",
                    &mut problems,
                )
            }
            Some(AuthSpec::ApiKey {
                name,
                value,
                location,
            }) => {
                let value = res("value", value);
                match location.as_str() {
                    "header" => match HeaderName::from_bytes(name.as_bytes()) {
                        Ok(h) => header_auth(h, value.expose_secret(), "auth.value", &mut problems),
                        Err(_) => {
                            problems.push((
                                "auth.name".into(),
                                format!("`{name}` is not a valid HTTP header name"),
                            ));
                            Auth::None
                        }
                    },
                    "query" if !name.is_empty() => Auth::Query {
                        name: name.clone(),
                        value,
                    },
                    "query" => {
                        problems.push(("auth.name".into(), "must not be empty".into()));
                        Auth::None
                    }
                    other => {
                        problems.push((
                            "auth.in".into(),
                            format!("`{other}` is not one of header, query"),
                        ));
                        Auth::None
                    }
                }
            }
            Some(AuthSpec::Oauth2 {
                token_url,
                client_id,
                client_secret,
                scope,
                audience,
                client_auth,
            }) => {
                let client_id = res("client_id", client_id);
                let client_secret = res("client_secret", client_secret);
                let basic = match client_auth.as_deref() {
                    None | Some("body") => false,
                    Some("basic") => true,
                    Some(other) => {
                        problems.push((
                            "auth.client_auth".into(),
                            format!("`{other}` is not one of body, basic"),
                        ));
                        false
                    }
                };
                match parse_http_url(token_url) {
                    Ok(token_url) => Auth::token(
                        TokenSource::OAuth2 {
                            token_url,
                            client_id,
                            client_secret,
                            scope: scope.clone(),
                            audience: audience.clone(),
                            basic,
                        },
                        Placement::Bearer,
                    ),
                    Err(e) => {
                        problems.push(("auth.token_url".into(), e));
                        Auth::None
                    }
                }
            }
            Some(AuthSpec::Custom {
                endpoint,
                method,
                headers,
                body_type,
                body,
                token_path,
                expiry_path,
                cache_for,
                place,
            }) => {
                let endpoint = parse_http_url(endpoint)
                    .map_err(|e| problems.push(("auth.endpoint".into(), e)))
                    .ok();
                let method = match method.to_ascii_uppercase().as_str() {
                    "GET" => Method::GET,
                    "POST" => Method::POST,
                    other => {
                        problems.push((
                            "auth.method".into(),
                            format!("`{other}` is not one of GET, POST"),
                        ));
                        Method::POST
                    }
                };
                let mut header_list = Vec::new();
                for (name, value) in headers {
                    let field = format!("auth.headers.{name}");
                    let value = match secret::resolve(value, base, secrets) {
                        Ok(v) => v,
                        Err(e) => {
                            problems.push((field, e));
                            continue;
                        }
                    };
                    match (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_str(value.expose_secret()),
                    ) {
                        (Ok(n), Ok(mut v)) => {
                            v.set_sensitive(true);
                            header_list.push((n, v));
                        }
                        _ => problems.push((field, "not a valid HTTP header".into())),
                    }
                }
                let body = match (body_type.as_str(), body) {
                    (_, None) => CustomBody::None,
                    ("form", Some(Value::Object(map))) => {
                        let mut pairs = Vec::new();
                        for (k, v) in map {
                            let text = match v {
                                Value::String(s) => s.clone(),
                                Value::Number(_) | Value::Bool(_) => v.to_string(),
                                _ => {
                                    problems.push((
                                        format!("auth.body.{k}"),
                                        "form values must be strings".into(),
                                    ));
                                    continue;
                                }
                            };
                            match secret::resolve(&text, base, secrets) {
                                Ok(s) => pairs.push((k.clone(), s)),
                                Err(e) => problems.push((format!("auth.body.{k}"), e)),
                            }
                        }
                        CustomBody::Form(pairs)
                    }
                    ("form", Some(_)) => {
                        problems.push((
                            "auth.body".into(),
                            "a form body must be a map of names to values".into(),
                        ));
                        CustomBody::None
                    }
                    ("json", Some(value)) => match resolve_json(value, base, secrets) {
                        Ok(v) => CustomBody::Json(SecretString::from(v.to_string())),
                        Err(e) => {
                            problems.push(("auth.body".into(), e));
                            CustomBody::None
                        }
                    },
                    (other, Some(_)) => {
                        problems.push((
                            "auth.body_type".into(),
                            format!("`{other}` is not one of form, json"),
                        ));
                        CustomBody::None
                    }
                };
                if method == Method::GET && !matches!(body, CustomBody::None) {
                    problems.push((
                        "auth.body".into(),
                        "a GET token call cannot have a body".into(),
                    ));
                }
                let cache_for = match cache_for {
                    None => DEFAULT_CUSTOM_LIFETIME,
                    Some(text) => parse_duration(text).unwrap_or_else(|e| {
                        problems.push(("auth.cache_for".into(), e));
                        DEFAULT_CUSTOM_LIFETIME
                    }),
                };
                if expiry_path.is_some() && cache_for != DEFAULT_CUSTOM_LIFETIME {
                    problems.push((
                        "auth.cache_for".into(),
                        "give expiry_path or cache_for, not both".into(),
                    ));
                }
                let place = parse_placement(place).unwrap_or_else(|e| {
                    problems.push(("auth.place".into(), e));
                    Placement::Bearer
                });
                match endpoint {
                    Some(endpoint) => Auth::token(
                        TokenSource::Custom {
                            endpoint,
                            method,
                            headers: header_list,
                            body,
                            token_path: split_path(token_path),
                            expiry_path: expiry_path.as_deref().map(split_path),
                            cache_for,
                        },
                        place,
                    ),
                    None => Auth::None,
                }
            }
            Some(AuthSpec::Hmac { secret: text }) => {
                let key = res("secret", text);
                if key.expose_secret().is_empty() {
                    problems.push(("auth.secret".into(), "must not be empty".into()));
                } else if let Some(b64) = key.expose_secret().strip_prefix("whsec_") {
                    if BASE64.decode(b64).is_err() {
                        problems.push((
                            "auth.secret".into(),
                            "a `whsec_` secret must be base64 after the prefix".into(),
                        ));
                    }
                }
                Auth::Hmac { key }
            }
        };
        if problems.is_empty() {
            Ok(auth)
        } else {
            Err(problems)
        }
    }

    fn token(source: TokenSource, place: Placement) -> Auth {
        Auth::Token(Box::new(TokenAuth {
            source,
            place,
            current: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }))
    }

    /// Whether a 401 should refresh the token and retry the call once.
    pub fn refreshes_on_401(&self) -> bool {
        matches!(self, Auth::Token(_))
    }

    /// Puts credentials on `req` (fetching a token when needed).
    pub async fn apply(
        &self,
        client: &Client,
        req: &mut Request,
        event_id: &str,
        timeout: Duration,
    ) -> Result<Option<TokenUsed>, AuthError> {
        match self {
            Auth::Token(t) => {
                let token = t.get(client, timeout).await?;
                place_token(req, &t.place, token.value.expose_secret())?;
                Ok(Some(TokenUsed(token.generation)))
            }
            // Signing over an id the provider cannot be sent would deliver a
            // request nobody can verify: refuse it instead.
            Auth::Hmac { .. } if HeaderValue::from_str(event_id).is_err() => Err(error(
                "the event_id cannot be sent as the webhook-id header",
            )),
            other => {
                other.apply_static(req, event_id);
                Ok(None)
            }
        }
    }

    /// Puts credentials that need no network on `req`; a token scheme gets a
    /// `***` placeholder (used by `render`).
    pub fn apply_static(&self, req: &mut Request, event_id: &str) {
        match self {
            Auth::None => {}
            Auth::Header { name, value } => {
                req.headers_mut().insert(name.clone(), value.clone());
            }
            Auth::Query { name, value } => {
                req.url_mut()
                    .query_pairs_mut()
                    .append_pair(name, value.expose_secret());
            }
            Auth::Token(t) => {
                let _ = place_token(req, &t.place, "***");
            }
            Auth::Hmac { key } => sign(req, key, event_id, SystemTime::now()),
        }
    }

    /// Forgets the token a call used after the provider answered 401.
    pub fn invalidate(&self, used: TokenUsed) {
        if let Auth::Token(t) = self {
            let mut current = t.current.write().unwrap_or_else(|p| p.into_inner());
            if current.as_ref().is_some_and(|c| c.generation == used.0) {
                *current = None;
            }
        }
    }

    /// The query parameter that carries a secret, if any (masked when shown).
    pub fn secret_query_param(&self) -> Option<&str> {
        match self {
            Auth::Query { name, .. } => Some(name),
            Auth::Token(t) => match &t.place {
                Placement::Query(n) => Some(n),
                _ => None,
            },
            _ => None,
        }
    }
}

fn header_auth(name: HeaderName, value: &str, field: &str, problems: &mut Problems) -> Auth {
    match HeaderValue::from_str(value) {
        Ok(mut v) => {
            v.set_sensitive(true);
            Auth::Header { name, value: v }
        }
        Err(_) => {
            problems.push((
                field.into(),
                "has characters not allowed in an HTTP header".into(),
            ));
            Auth::None
        }
    }
}

fn place_token(req: &mut Request, place: &Placement, token: &str) -> Result<(), AuthError> {
    let bad = || AuthError {
        message: "the token has characters not allowed in an HTTP header".into(),
        class: AttemptClass::Error,
    };
    match place {
        Placement::Bearer => {
            let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| bad())?;
            v.set_sensitive(true);
            req.headers_mut().insert(AUTHORIZATION, v);
        }
        Placement::Header(name) => {
            let mut v = HeaderValue::from_str(token).map_err(|_| bad())?;
            v.set_sensitive(true);
            req.headers_mut().insert(name.clone(), v);
        }
        Placement::Query(name) => {
            req.url_mut().query_pairs_mut().append_pair(name, token);
        }
    }
    Ok(())
}

/// Standard Webhooks: `v1,` + base64(HMAC-SHA256(key, "{id}.{ts}.{body}")).
pub fn signature(key: &[u8], event_id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(event_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// The key bytes of a Standard Webhooks secret: base64 after `whsec_`, else the raw text.
pub fn hmac_key(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => BASE64
            .decode(b64)
            .unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    }
}

fn sign(req: &mut Request, key: &SecretString, event_id: &str, now: SystemTime) {
    let ts = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let body = req.body().and_then(|b| b.as_bytes()).unwrap_or_default();
    let sig = signature(&hmac_key(key.expose_secret()), event_id, ts, body);
    let headers = req.headers_mut();
    if let Ok(id) = HeaderValue::from_str(event_id) {
        headers.insert(HeaderName::from_static("webhook-id"), id);
    }
    headers.insert(
        HeaderName::from_static("webhook-timestamp"),
        HeaderValue::from(ts),
    );
    if let Ok(v) = HeaderValue::from_str(&sig) {
        headers.insert(HeaderName::from_static("webhook-signature"), v);
    }
}

impl TokenAuth {
    fn valid(&self) -> Option<CachedToken> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .filter(|t| Instant::now() < t.refresh_at)
            .cloned()
    }

    async fn get(&self, client: &Client, timeout: Duration) -> Result<CachedToken, AuthError> {
        if let Some(t) = self.valid() {
            return Ok(t);
        }
        // Single flight: whoever holds the lock fetches; the rest find its
        // token, or its failure when it failed while they waited (so a dead
        // token endpoint is asked once, not once per queued caller in turn).
        let seen = self.fetches.load(Ordering::Acquire);
        let mut last_failure = self.refresh.lock().await;
        if let Some(t) = self.valid() {
            return Ok(t);
        }
        if self.fetches.load(Ordering::Acquire) != seen {
            if let Some(e) = last_failure.as_ref() {
                return Err(e.clone());
            }
        }
        let fetched = tokio::time::timeout(timeout, self.fetch(client))
            .await
            .map_err(|_| AuthError {
                message: format!("token request timed out after {timeout:?}"),
                class: AttemptClass::Timeout,
            })
            .and_then(|r| r);
        self.fetches.fetch_add(1, Ordering::Release);
        *last_failure = fetched.as_ref().err().cloned();
        let (value, lifetime) = fetched?;
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        let token = CachedToken {
            value: Arc::new(value),
            refresh_at: Instant::now() + lifetime.saturating_sub(margin),
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
        };
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        Ok(token)
    }

    async fn fetch(&self, client: &Client) -> Result<(SecretString, Duration), AuthError> {
        match &self.source {
            TokenSource::OAuth2 {
                token_url,
                client_id,
                client_secret,
                scope,
                audience,
                basic,
            } => {
                let mut form = vec![("grant_type", "client_credentials".to_string())];
                if let Some(s) = scope {
                    form.push(("scope", s.clone()));
                }
                if let Some(a) = audience {
                    form.push(("audience", a.clone()));
                }
                let mut req = client.post(token_url.clone());
                if *basic {
                    req = req.basic_auth(
                        client_id.expose_secret(),
                        Some(client_secret.expose_secret()),
                    );
                } else {
                    form.push(("client_id", client_id.expose_secret().to_string()));
                    form.push(("client_secret", client_secret.expose_secret().to_string()));
                }
                let body = send(req.form(&form), "token endpoint").await?;
                let json: Value = serde_json::from_slice(&body)
                    .map_err(|_| error("the token endpoint did not answer JSON"))?;
                let token = json
                    .get("access_token")
                    .and_then(Value::as_str)
                    .ok_or_else(|| error("the token endpoint's answer has no access_token"))?;
                let lifetime = json
                    .get("expires_in")
                    .and_then(seconds)
                    .unwrap_or(DEFAULT_OAUTH2_LIFETIME);
                Ok((SecretString::from(token.to_string()), lifetime))
            }
            TokenSource::Custom {
                endpoint,
                method,
                headers,
                body,
                token_path,
                expiry_path,
                cache_for,
            } => {
                let mut req = client.request(method.clone(), endpoint.clone());
                for (n, v) in headers {
                    req = req.header(n, v);
                }
                req = match body {
                    CustomBody::None => req,
                    CustomBody::Form(pairs) => {
                        let pairs: Vec<(&str, &str)> = pairs
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.expose_secret()))
                            .collect();
                        req.form(&pairs)
                    }
                    CustomBody::Json(json) => req
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(json.expose_secret().to_string()),
                };
                let body = send(req, "custom auth endpoint").await?;
                let token = if token_path.is_empty() {
                    String::from_utf8_lossy(&body).trim().to_string()
                } else {
                    let json: Value = serde_json::from_slice(&body)
                        .map_err(|_| error("the custom auth endpoint did not answer JSON"))?;
                    match lookup(&json, token_path) {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Number(n)) => n.to_string(),
                        _ => {
                            return Err(error(&format!(
                                "no token at `{}` in the auth response",
                                token_path.join(".")
                            )))
                        }
                    }
                };
                if token.is_empty() {
                    return Err(error("the custom auth endpoint returned an empty token"));
                }
                let lifetime = match expiry_path {
                    Some(path) => {
                        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        lookup(&json, path).and_then(seconds).unwrap_or(*cache_for)
                    }
                    None => *cache_for,
                };
                Ok((SecretString::from(token), lifetime))
            }
        }
    }
}

async fn send(req: reqwest::RequestBuilder, what: &str) -> Result<bytes::Bytes, AuthError> {
    let resp = req.send().await.map_err(|e| AuthError {
        message: format!("{what} unreachable: {}", super::client::describe(&e)),
        class: super::client::class_of(&e),
    })?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| AuthError {
        message: format!(
            "{what}: reading the answer failed: {}",
            super::client::describe(&e)
        ),
        class: super::client::class_of(&e),
    })?;
    if !status.is_success() {
        return Err(AuthError {
            message: format!("{what} answered {}", status.as_u16()),
            class: AttemptClass::Status(status.as_u16()),
        });
    }
    Ok(body)
}

fn error(message: &str) -> AuthError {
    AuthError {
        message: message.to_string(),
        class: AttemptClass::Error,
    }
}

fn seconds(v: &Value) -> Option<Duration> {
    let secs = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)))
}

fn split_path(path: &str) -> Vec<String> {
    path.split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Follows a dotted path (`data.jwt`, `items.0.token`) into a JSON value.
pub fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| match v {
        Value::Object(m) => m.get(key),
        Value::Array(a) => a.get(key.parse::<usize>().ok()?),
        _ => None,
    })
}

fn parse_placement(text: &str) -> Result<Placement, String> {
    let bad = || format!("`{text}` is not one of bearer, header:NAME, query:NAME");
    match text.split_once(':') {
        None if text == "bearer" => Ok(Placement::Bearer),
        Some(("header", name)) => HeaderName::from_bytes(name.trim().as_bytes())
            .map(Placement::Header)
            .map_err(|_| bad()),
        Some(("query", name)) if !name.trim().is_empty() => {
            Ok(Placement::Query(name.trim().to_string()))
        }
        _ => Err(bad()),
    }
}

fn parse_http_url(text: &str) -> Result<Url, String> {
    match Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(u),
        Ok(u) => Err(format!(
            "the scheme must be http or https, not `{}`",
            u.scheme()
        )),
        Err(e) => Err(format!("`{text}` is not a valid URL: {e}")),
    }
}

fn resolve_json(
    value: &Value,
    base: &Path,
    secrets: &mut Vec<SecretString>,
) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(
            secret::resolve(s, base, secrets)?
                .expose_secret()
                .to_string(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|v| resolve_json(v, base, secrets))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), resolve_json(v, base, secrets)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn standard_webhooks_signature_matches_the_reference_vector() {
        // The test vector published with the Standard Webhooks specification.
        let key = hmac_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let sig = signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn raw_secrets_are_used_as_text() {
        assert_eq!(hmac_key("plain"), b"plain".to_vec());
    }

    #[test]
    fn placements_parse() {
        assert!(matches!(parse_placement("bearer"), Ok(Placement::Bearer)));
        assert!(
            matches!(parse_placement("header:X-Token"), Ok(Placement::Header(h)) if h == "x-token")
        );
        assert!(matches!(parse_placement("query:tok"), Ok(Placement::Query(q)) if q == "tok"));
        assert!(parse_placement("cookie:x").is_err());
        assert!(parse_placement("query:").is_err());
    }

    #[test]
    fn dotted_paths_follow_objects_and_arrays() {
        let v = json!({"data": {"jwt": "t", "list": [{"x": 1}]}});
        let p = |s: &str| split_path(s);
        assert_eq!(lookup(&v, &p("data.jwt")), Some(&json!("t")));
        assert_eq!(lookup(&v, &p("data.list.0.x")), Some(&json!(1)));
        assert_eq!(lookup(&v, &p("data.nope")), None);
    }

    #[test]
    fn lifetimes_accept_numbers_and_numeric_strings() {
        assert_eq!(seconds(&json!(3600)), Some(Duration::from_secs(3600)));
        assert_eq!(seconds(&json!("120")), Some(Duration::from_secs(120)));
        assert_eq!(seconds(&json!(-5)), None);
        assert_eq!(seconds(&json!("soon")), None);
    }
}
