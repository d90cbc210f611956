//! Rendering: action event + definition → the exact HTTP request (SPEC §4.1).
//!
//! A [`RequestTemplate`] is compiled once per definition at load; per event
//! only the templates are evaluated and the body written once. Rendering is
//! structural: the payload is a JSON tree whose string leaves are rendered one
//! by one and serialised by `serde_json`, so event data can never change the
//! shape of the JSON, the host of the URL, or the set of headers.

pub mod fast;
pub mod template;

use std::cell::OnceCell;
use std::collections::HashSet;
use std::io::Write as _;

use bytes::Bytes;
use minijinja::Value;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Map;
use url::Url;

use crate::action::secret::{self, Part};
use crate::event::{ActionEvent, Object};
use fast::Found;
pub use template::{EvalError as RenderError, Json, Leaf, Templates};

/// What an optional parameter that the event does not carry becomes in a
/// single-expression leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullValues {
    /// The key (or list element) is left out.
    Omit,
    /// The value is JSON `null`.
    Keep,
}

/// The roots a template may read: the event's fields.
const EVENT_ROOTS: &[&str] = &[
    "event_id",
    "action_id",
    "profile_id",
    "journey",
    "params",
    "context",
    "emitted_at",
    "expires_at",
];
/// Where secrets referenced inside templated fields are placed.
const SECRETS_ROOT: &str = "__secrets";
/// Functions minijinja provides that show up as undeclared names.
const GLOBAL_FUNCTIONS: &[&str] = &[
    "range",
    "dict",
    "namespace",
    "debug",
    "lipsum",
    "cycler",
    "joiner",
];

/// One compiled problem with a definition: the field and what is wrong.
pub type Problem = (String, String);

#[derive(Debug)]
struct HeaderTemplate {
    name: HeaderName,
    value: Leaf,
    /// Holds a secret: masked when shown.
    sensitive: bool,
}

/// A payload template: constant parts pre-serialised, leaves evaluated per event.
#[derive(Debug)]
enum Node {
    Const(Vec<u8>),
    Leaf(Leaf),
    Array(Vec<Node>),
    Object(Vec<(Vec<u8>, Node)>),
}

/// The parts of an action definition that make its request, compiled.
#[derive(Debug)]
pub struct RequestTemplate {
    templates: Templates,
    pub method: Method,
    /// `scheme://authority`, fixed at load.
    base: Url,
    path: Leaf,
    static_query: Option<String>,
    query: Vec<(String, Leaf)>,
    headers: Vec<HeaderTemplate>,
    payload: Option<Node>,
    null_values: NullValues,
    secrets: Value,
    has_content_type: bool,
}

/// The raw inputs of [`RequestTemplate::compile`].
pub struct RequestSpec<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub query: &'a Map<String, serde_json::Value>,
    pub headers: &'a Map<String, serde_json::Value>,
    pub payload: Option<&'a serde_json::Value>,
    pub null_values: NullValues,
    /// Declared parameter names.
    pub parameters: HashSet<&'a str>,
    /// Resolves relative `${file:…}` references.
    pub secret_base: &'a std::path::Path,
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct RenderedRequest {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// Headers whose values hold secrets.
    pub sensitive: Vec<HeaderName>,
}

struct Compiler<'a> {
    templates: Templates,
    parameters: &'a HashSet<&'a str>,
    secret_base: &'a std::path::Path,
    secret_values: Vec<secrecy::SecretString>,
    secret_map: serde_json::Map<String, serde_json::Value>,
    problems: Vec<Problem>,
}

impl RequestTemplate {
    /// Compiles the request parts of a definition. On failure returns every
    /// problem found, each with its field path.
    pub fn compile(
        spec: RequestSpec<'_>,
        secrets_out: &mut Vec<secrecy::SecretString>,
    ) -> Result<Self, Vec<Problem>> {
        let mut c = Compiler {
            templates: Templates::with_fast_paths(EVENT_ROOTS),
            parameters: &spec.parameters,
            secret_base: spec.secret_base,
            secret_values: Vec::new(),
            secret_map: serde_json::Map::new(),
            problems: Vec::new(),
        };
        let method = match spec.method.to_ascii_uppercase().as_str() {
            m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE") => {
                Method::from_bytes(m.as_bytes()).ok()
            }
            other => {
                c.problem(
                    "endpoint.method",
                    format!("`{other}` is not one of GET, POST, PUT, PATCH, DELETE"),
                );
                None
            }
        };
        if method == Some(Method::GET) && spec.payload.is_some() {
            c.problem(
                "payload",
                "a GET request cannot have a payload (use endpoint.query)".into(),
            );
        }
        let url = c.url(spec.url);
        let mut query = Vec::new();
        for (name, value) in spec.query {
            let field = format!("endpoint.query.{name}");
            if let Some(text) = c.scalar(&field, value) {
                if let Some((leaf, _)) = c.leaf(&field, &text) {
                    query.push((name.clone(), leaf));
                }
            }
        }
        let mut headers = Vec::new();
        let mut has_content_type = false;
        for (name, value) in spec.headers {
            let field = format!("endpoint.headers.{name}");
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                c.problem(&field, format!("`{name}` is not a valid HTTP header name"));
                continue;
            };
            has_content_type |= header == CONTENT_TYPE;
            if let Some(text) = c.scalar(&field, value) {
                if let Some((leaf, sensitive)) = c.leaf(&field, &text) {
                    if let Leaf::Const(v) = &leaf {
                        if HeaderValue::from_str(v).is_err() {
                            c.problem(&field, "the value is not a valid HTTP header value".into());
                        }
                    }
                    headers.push(HeaderTemplate {
                        name: header,
                        value: leaf,
                        sensitive,
                    });
                }
            }
        }
        let payload = spec.payload.map(|p| c.node("payload", p));
        secrets_out.append(&mut c.secret_values);
        match (method, url) {
            (Some(method), Some((base, path, static_query))) if c.problems.is_empty() => {
                Ok(RequestTemplate {
                    secrets: Value::from_serialize(&c.secret_map),
                    templates: c.templates,
                    method,
                    base,
                    path,
                    static_query,
                    query,
                    headers,
                    payload,
                    null_values: spec.null_values,
                    has_content_type,
                })
            }
            _ => Err(c.problems),
        }
    }

    /// The host calls go to (the default throttle key).
    pub fn host(&self) -> &str {
        self.base.host_str().unwrap_or_default()
    }

    /// Renders the request for one event. `missing` lists the optional
    /// parameters the event does not carry (they render as `none`).
    pub fn render(
        &self,
        event: &ActionEvent,
        missing: &[&str],
        idempotency: Option<&HeaderName>,
    ) -> Result<RenderedRequest, RenderError> {
        let ctx = EventScope {
            event,
            missing,
            secrets: &self.secrets,
            context: OnceCell::new(),
        };

        let path = self.templates.text(&self.path, &ctx)?.unwrap_or_default();
        check_path(&path)?;
        let mut url = self.base.clone();
        url.set_path(&path);
        url.set_query(self.static_query.as_deref());
        if !self.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, leaf) in &self.query {
                if let Some(value) = self.templates.text(leaf, &ctx)? {
                    pairs.append_pair(name, &value);
                }
            }
        }

        let mut headers = HeaderMap::with_capacity(self.headers.len() + 2);
        let mut sensitive = Vec::new();
        for h in &self.headers {
            let Some(value) = self.templates.text(&h.value, &ctx)? else {
                continue;
            };
            let field = || format!("endpoint.headers.{}", h.name);
            if value.contains(['\r', '\n']) {
                return Err(RenderError {
                    field: field(),
                    message: "the value contains CR or LF (header injection refused)".into(),
                });
            }
            let value = HeaderValue::from_str(&value).map_err(|_| RenderError {
                field: field(),
                message: "the value has characters not allowed in an HTTP header".into(),
            })?;
            if h.sensitive {
                sensitive.push(h.name.clone());
            }
            headers.append(h.name.clone(), value);
        }
        if let Some(name) = idempotency {
            let value = HeaderValue::from_str(&event.event_id).map_err(|_| RenderError {
                field: "event_id".into(),
                message: "cannot be sent as the idempotency header (control characters)".into(),
            })?;
            headers.insert(name.clone(), value);
        }

        let body = match &self.payload {
            None => None,
            Some(node) => {
                let mut buf = Vec::with_capacity(256);
                if !self.write_node(node, &ctx, &mut buf)? {
                    buf.extend_from_slice(b"null");
                }
                if !self.has_content_type {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                Some(Bytes::from(buf))
            }
        };
        Ok(RenderedRequest {
            method: self.method.clone(),
            url,
            headers,
            body,
            sensitive,
        })
    }

    /// Writes `node` as JSON; returns false when it was omitted (`none` with `null_values: omit`).
    fn write_node(
        &self,
        node: &Node,
        ctx: &EventScope<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<bool, RenderError> {
        match node {
            Node::Const(bytes) => buf.extend_from_slice(bytes),
            Node::Leaf(leaf) => match self.templates.json(leaf, ctx)? {
                Json::None if self.null_values == NullValues::Omit => return Ok(false),
                Json::None => buf.extend_from_slice(b"null"),
                value => serde_json::to_writer(&mut *buf, &value).map_err(|e| RenderError {
                    field: leaf.name().unwrap_or("payload").to_string(),
                    message: format!("the value cannot be written as JSON: {e}"),
                })?,
            },
            Node::Array(items) => {
                buf.push(b'[');
                let mut first = true;
                for item in items {
                    let mark = buf.len();
                    if !first {
                        buf.push(b',');
                    }
                    if self.write_node(item, ctx, buf)? {
                        first = false;
                    } else {
                        buf.truncate(mark);
                    }
                }
                buf.push(b']');
            }
            Node::Object(entries) => {
                buf.push(b'{');
                let mut first = true;
                for (key, value) in entries {
                    let mark = buf.len();
                    if !first {
                        buf.push(b',');
                    }
                    buf.extend_from_slice(key);
                    buf.push(b':');
                    if self.write_node(value, ctx, buf)? {
                        first = false;
                    } else {
                        buf.truncate(mark);
                    }
                }
                buf.push(b'}');
            }
        }
        Ok(true)
    }
}

/// Refuses `.` and `..` segments (also percent-encoded): event data must not
/// move the request to another path of the provider.
fn check_path(path: &str) -> Result<(), RenderError> {
    // Longer than `%2e%2e`, a segment cannot decode to `.` or `..`.
    for segment in path.split('/').filter(|s| s.len() <= 6) {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        if decoded == "." || decoded == ".." {
            return Err(RenderError {
                field: "endpoint.url".into(),
                message: format!(
                    "the rendered path has a `{decoded}` segment (path traversal refused)"
                ),
            });
        }
    }
    Ok(())
}

impl Compiler<'_> {
    fn problem(&mut self, field: &str, message: String) {
        self.problems.push((field.to_string(), message));
    }

    /// Headers and query values may be written as numbers or booleans.
    fn scalar(&mut self, field: &str, value: &serde_json::Value) -> Option<String> {
        match value {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.problem(field, "must be a string, number or boolean".into());
                None
            }
        }
    }

    /// Compiles one templated string, turning `${…}` secret references into
    /// template variables so their values are inserted, never parsed.
    fn leaf(&mut self, field: &str, raw: &str) -> Option<(Leaf, bool)> {
        let parts = match secret::split(raw, self.secret_base) {
            Ok(p) => p,
            Err(e) => {
                self.problem(field, e);
                return None;
            }
        };
        let mut sensitive = false;
        let mut source = String::with_capacity(raw.len());
        for part in parts {
            match part {
                Part::Text(t) => source.push_str(&t),
                Part::Secret(s) => {
                    let key = format!("s{}", self.secret_map.len());
                    source.push_str(&format!("{{{{ {SECRETS_ROOT}.{key} }}}}"));
                    self.secret_map.insert(
                        key,
                        serde_json::Value::String(
                            secrecy::ExposeSecret::expose_secret(&s).to_string(),
                        ),
                    );
                    self.secret_values.push(s);
                    sensitive = true;
                }
            }
        }
        let leaf = match self.templates.add(field, &source) {
            Ok(leaf) => leaf,
            Err(e) => {
                let at = e.line.map(|l| format!(" at line {l}")).unwrap_or_default();
                self.problem(field, format!("template syntax error{at}: {}", e.message));
                return None;
            }
        };
        self.check_variables(field, &leaf);
        Some((leaf, sensitive))
    }

    fn check_variables(&mut self, field: &str, leaf: &Leaf) {
        let mut vars: Vec<String> = self.templates.variables(leaf).into_iter().collect();
        vars.sort();
        for var in vars {
            let mut path = var.split('.');
            let root = path.next().unwrap_or_default();
            if root == SECRETS_ROOT || GLOBAL_FUNCTIONS.contains(&root) {
                continue;
            }
            if !EVENT_ROOTS.contains(&root) {
                self.problem(
                    field,
                    format!(
                        "unknown variable `{root}` (templates read {})",
                        EVENT_ROOTS.join(", ")
                    ),
                );
            } else if root == "params" {
                if let Some(param) = path.next() {
                    if !self.parameters.contains(param) {
                        self.problem(
                            field,
                            format!("parameter `{param}` is used but not declared in `parameters`"),
                        );
                    }
                }
            }
        }
    }

    /// Splits the URL template into the fixed origin, the templated path and
    /// a constant query.
    fn url(&mut self, raw: &str) -> Option<(Url, Leaf, Option<String>)> {
        const FIELD: &str = "endpoint.url";
        let Some((scheme, rest)) = raw.split_once("://") else {
            self.problem(FIELD, format!("`{raw}` is not an absolute http(s) URL"));
            return None;
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, rest) = rest.split_at(authority_end);
        if template::has_syntax(scheme) || template::has_syntax(authority) {
            self.problem(
                FIELD,
                "templates are allowed only in the path: the scheme and host are fixed so event data cannot redirect calls".into(),
            );
            return None;
        }
        let base = match Url::parse(&format!("{scheme}://{authority}/")) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => u,
            Ok(u) => {
                self.problem(
                    FIELD,
                    format!("the scheme must be http or https, not `{}`", u.scheme()),
                );
                return None;
            }
            Err(e) => {
                self.problem(FIELD, format!("`{raw}` is not a valid URL: {e}"));
                return None;
            }
        };
        if rest.contains('#') {
            self.problem(
                FIELD,
                "a URL fragment (`#…`) is never sent; remove it".into(),
            );
            return None;
        }
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q.to_string())),
            None => (rest, None),
        };
        if query.as_deref().is_some_and(template::has_syntax) {
            self.problem(
                FIELD,
                "templated query values belong in endpoint.query (they are encoded there)".into(),
            );
            return None;
        }
        let path = if path.is_empty() { "/" } else { path };
        if secret::split(path, self.secret_base)
            .map(|p| p.len() != 1 || !matches!(p[0], Part::Text(_)))
            .unwrap_or(true)
        {
            self.problem(
                FIELD,
                "secrets are not allowed in the URL (use auth: api_key with in: query)".into(),
            );
            return None;
        }
        match self.templates.add(FIELD, path) {
            Ok(leaf) => {
                self.check_variables(FIELD, &leaf);
                Some((base, leaf, query))
            }
            Err(e) => {
                let at = e.line.map(|l| format!(" at line {l}")).unwrap_or_default();
                self.problem(FIELD, format!("template syntax error{at}: {}", e.message));
                None
            }
        }
    }

    fn node(&mut self, field: &str, value: &serde_json::Value) -> Node {
        let node = match value {
            serde_json::Value::String(s)
                if template::has_syntax(s) || s.contains("${env:") || s.contains("${file:") =>
            {
                match self.leaf(field, s) {
                    Some((leaf @ (Leaf::Expr(..) | Leaf::Text(..)), _)) => Node::Leaf(leaf),
                    Some((Leaf::Const(c), _)) => {
                        Node::Const(serde_json::to_vec(&c).unwrap_or_default())
                    }
                    None => Node::Const(Vec::new()),
                }
            }
            serde_json::Value::Array(items) => Node::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.node(&format!("{field}[{i}]"), v))
                    .collect(),
            ),
            serde_json::Value::Object(map) => Node::Object(
                map.iter()
                    .map(|(k, v)| {
                        let key = serde_json::to_vec(k).unwrap_or_default();
                        (key, self.node(&format!("{field}.{k}"), v))
                    })
                    .collect(),
            ),
            constant => Node::Const(serde_json::to_vec(constant).unwrap_or_default()),
        };
        fold_constants(node)
    }
}

/// Collapses subtrees with no templates into one pre-serialised constant.
fn fold_constants(node: Node) -> Node {
    let all_const = match &node {
        Node::Array(items) => items.iter().all(|n| matches!(n, Node::Const(_))),
        Node::Object(entries) => entries.iter().all(|(_, n)| matches!(n, Node::Const(_))),
        _ => false,
    };
    if !all_const {
        return node;
    }
    let mut buf = Vec::new();
    match node {
        Node::Array(items) => {
            buf.push(b'[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                if let Node::Const(b) = item {
                    buf.extend_from_slice(&b);
                }
            }
            buf.push(b']');
        }
        Node::Object(entries) => {
            buf.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                let _ = buf.write_all(&key);
                buf.push(b':');
                if let Node::Const(b) = value {
                    buf.extend_from_slice(&b);
                }
            }
            buf.push(b'}');
        }
        other => return other,
    }
    Node::Const(buf)
}

/// The template context: the whole event, with the missing optional
/// parameters present as `none`, plus the definition's own secrets.
struct Context<'a> {
    event: &'a ActionEvent,
    missing: &'a [&'a str],
    secrets: &'a Value,
}

/// One event as the leaves see it: looked up directly by planned leaves,
/// converted into the template context only if a leaf needs the engine.
struct EventScope<'a> {
    event: &'a ActionEvent,
    missing: &'a [&'a str],
    secrets: &'a Value,
    context: OnceCell<Value>,
}

impl fast::Scope for EventScope<'_> {
    fn find(&self, path: &[String]) -> Found<'_> {
        let Some((root, rest)) = path.split_first() else {
            return Found::Unknown;
        };
        let e = self.event;
        fn text<'s>(s: Option<&'s String>, rest: &[String]) -> Found<'s> {
            match (s, rest) {
                (Some(s), []) => Found::Str(s),
                _ => Found::Unknown,
            }
        }
        let map = match root.as_str() {
            "event_id" => return text(Some(&e.event_id), rest),
            "action_id" => return text(Some(&e.action_id), rest),
            "profile_id" => return text(Some(&e.profile_id), rest),
            "emitted_at" => return text(e.emitted_at.as_ref(), rest),
            "expires_at" => return text(e.expires_at.as_ref(), rest),
            "journey" => e.journey.as_ref(),
            "context" => e.context.as_ref(),
            "params" => {
                // A declared optional parameter the event lacks is `none`.
                if let [key] = rest {
                    if !e.params.contains_key(key) && self.missing.contains(&key.as_str()) {
                        return Found::None;
                    }
                }
                Some(&e.params)
            }
            _ => None,
        };
        match (map, rest) {
            (Some(map), [key, deeper @ ..]) => found(map.get(key), deeper),
            _ => Found::Unknown,
        }
    }

    fn context(&self) -> &Value {
        self.context.get_or_init(|| {
            Value::from_serialize(Context {
                event: self.event,
                missing: self.missing,
                secrets: self.secrets,
            })
        })
    }
}

/// What `value` (the value at a key, if the key is there) holds at
/// `deeper`, the rest of the path.
fn found<'a>(value: Option<&'a serde_json::Value>, deeper: &[String]) -> Found<'a> {
    match (value, deeper) {
        (Some(value), []) => Found::Json(value),
        (Some(serde_json::Value::Object(inner)), [key, rest @ ..]) => found(inner.get(key), rest),
        (None, []) => Found::Missing,
        _ => Found::Unknown,
    }
}

struct Params<'a> {
    given: &'a Object,
    missing: &'a [&'a str],
}

impl Serialize for Params<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.given.len() + self.missing.len()))?;
        for (k, v) in self.given {
            map.serialize_entry(k, v)?;
        }
        for k in self.missing {
            if !self.given.contains_key(k) {
                map.serialize_entry(k, &())?;
            }
        }
        map.end()
    }
}

impl Serialize for Context<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.event;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("event_id", &e.event_id)?;
        map.serialize_entry("action_id", &e.action_id)?;
        map.serialize_entry("profile_id", &e.profile_id)?;
        if let Some(j) = &e.journey {
            map.serialize_entry("journey", j)?;
        }
        map.serialize_entry(
            "params",
            &Params {
                given: &e.params,
                missing: self.missing,
            },
        )?;
        if let Some(c) = &e.context {
            map.serialize_entry("context", c)?;
        }
        if let Some(t) = &e.emitted_at {
            map.serialize_entry("emitted_at", t)?;
        }
        if let Some(t) = &e.expires_at {
            map.serialize_entry("expires_at", t)?;
        }
        map.serialize_entry(SECRETS_ROOT, self.secrets)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::fast::Scope;
    use super::*;
    use serde_json::json;

    #[test]
    fn dot_segments_are_refused_in_any_spelling() {
        for path in [
            "/a/../b",
            "/a/.",
            "/%2e%2e/b",
            "/a/.%2E/b",
            "/a/%2E",
            "/a/%2e%2e",
        ] {
            assert!(check_path(path).is_err(), "{path}");
        }
        for path in [
            "/a/b",
            "/a/.b/c",
            "/a/.../b",
            "/%2e%2e%2e/b",
            "/a/%2e%2ex",
            "/a//b",
            "",
        ] {
            assert!(check_path(path).is_ok(), "{path}");
        }
    }

    /// Every planned leaf that the shortcut answers must give exactly what
    /// the template engine gives for the same event: same value (same JSON,
    /// same text), and `none` where the engine says `none`.
    #[test]
    fn the_shortcut_answers_exactly_as_the_template_engine() {
        let events = [
            json!({
                "event_id": "e-1", "action_id": "a", "profile_id": "p/1 é",
                "journey": { "id": "welcome", "version": 3, "step": { "id": "s1", "n": null } },
                "params": { "a": "acme/x y?z#é", "n": 42, "neg": -7, "f": 12.5, "whole": 12.0,
                            "big": 18446744073709551615u64, "b": true, "nul": null,
                            "list": ["vip", 1, false, null], "obj": { "k": "v", "deep": { "x": 1 } },
                            "empty": "" },
                "context": { "locale": "fr" },
                "emitted_at": "2026-11-23T12:00:00Z", "expires_at": "2036-11-23T18:00:00Z"
            }),
            json!({ "event_id": "e-2", "action_id": "a", "profile_id": "p", "params": {} }),
        ];
        let sources = [
            "{{ params.a }}",
            "{{ params.n }}",
            "{{ params.neg }}",
            "{{ params.f }}",
            "{{ params.whole }}",
            "{{ params.big }}",
            "{{ params.b }}",
            "{{ params.nul }}",
            "{{ params.nul | default('d') }}",
            "{{ params.list }}",
            "{{ params.obj }}",
            "{{ params.obj.k }}",
            "{{ params.obj.deep }}",
            "{{ params.obj.deep.x }}",
            "{{ params.obj.nope | d('z') }}",
            "{{ params.obj.k.x }}",
            "{{ params.empty | default('e') }}",
            "{{ params.opt }}",
            "{{ params.opt | default('there') }}",
            "{{ params.undeclared }}",
            "{{ params.undeclared | default('u') }}",
            "{{ params.a.b }}",
            "{{ journey.id }}",
            "{{ journey.version }}",
            "{{ journey.step.n }}",
            "{{ journey.step.n | default(\"n\") }}",
            "{{ journey.nope | default('j') }}",
            "{{ context.locale | default('en') }}",
            "{{ context.nope }}",
            "{{ event_id }}",
            "{{ profile_id }}",
            "{{ emitted_at }}",
            "{{ expires_at | default('never') }}",
            "{{ event_id.x }}",
            "Hello {{ params.opt | default('there') }}, {{ params.a }}!",
            "{{ params.n }}/{{ params.f }}/{{ params.b }}/{{ params.list }}/{{ params.obj }}/{{ params.nul }}",
            "x{{ params.opt }}y{{ params.empty }}z",
            "/v1/{{ params.a }}/{{ params.f }}/{{ params.b }}/{{ params.list }}",
            "id={{ journey.id }} step={{ journey.step.id | default('-') }}",
        ];
        let missing = ["opt"];
        let secrets = Value::from(());
        let (mut answered, mut compared) = (0, 0);
        for event in &events {
            let event = ActionEvent::from_value(event.clone()).unwrap();
            let scope = EventScope {
                event: &event,
                missing: &missing,
                secrets: &secrets,
                context: OnceCell::new(),
            };
            for (i, source) in sources.iter().enumerate() {
                for name in [format!("payload.f{i}"), format!("endpoint.url.{i}")] {
                    let mut templates = Templates::with_fast_paths(EVENT_ROOTS);
                    let leaf = templates.add(&name, source).unwrap();
                    compared += 1;
                    let engine_value = templates.eval(&leaf, scope.context());
                    let engine_text = templates.text(&leaf, scope.context());
                    let shortcut_value = match &leaf {
                        Leaf::Expr(_, Some(lookup)) => lookup.eval(&scope).ok(),
                        Leaf::Text(_, Some(plan)) => {
                            plan.text(&scope).ok().map(|t| Some(Value::from(t)))
                        }
                        _ => panic!("{name} `{source}`: not planned"),
                    };
                    let Some(shortcut_value) = shortcut_value else {
                        // Left to the engine (where the engine fails or the path
                        // leads through a non-object): rendering through the
                        // event's scope gives the engine's answer, errors and
                        // their wording included.
                        let via_scope = templates.text(&leaf, &scope).map_err(|e| e.to_string());
                        let engine = engine_text.map_err(|e| e.to_string());
                        assert_eq!(via_scope, engine, "{name} `{source}`");
                        continue;
                    };
                    answered += 1;
                    let engine_value = engine_value.unwrap_or_else(|e| {
                        panic!("{name} `{source}`: shortcut {shortcut_value:?}, engine error {e}")
                    });
                    let json =
                        |v: &Option<Value>| v.as_ref().map(|v| serde_json::to_string(v).unwrap());
                    assert_eq!(
                        json(&shortcut_value),
                        json(&engine_value),
                        "{name} `{source}`"
                    );
                    // A payload leaf is written from the event as it came.
                    let written = match templates.json(&leaf, &scope).unwrap() {
                        Json::None => None,
                        value => Some(serde_json::to_string(&value).unwrap()),
                    };
                    assert_eq!(written, json(&engine_value), "{name} `{source}`");
                    let shortcut_text = templates.text(&leaf, &scope).unwrap();
                    assert_eq!(shortcut_text, engine_text.unwrap(), "{name} `{source}`");
                }
            }
        }
        assert!(
            answered > 80,
            "the shortcut answered {answered} of {compared}"
        );
    }
}
