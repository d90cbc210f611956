//! The template engine: one `minijinja` environment per action definition,
//! holding every template of that definition compiled once at load.
//!
//! Two kinds of leaves exist (SPEC §4.1): a leaf that is exactly one
//! `{{ expression }}` evaluates to a *value* and keeps its JSON type; any
//! other leaf renders to a *string*. Undefined variables are errors (strict
//! mode); missing optional parameters are `none`, which prints as an empty
//! string and which `default(...)` replaces.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use minijinja::value::ValueKind;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Serialize, Serializer};

use super::fast::{self, Looked, Lookup, Scope, TextPlan};

/// Everything but RFC 3986 unreserved characters is encoded, `/` included,
/// so one expression always stays one path segment.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Templates whose name starts with this prefix percent-encode every
/// expression they print as one URL path segment.
pub const URL_PATH_PREFIX: &str = "endpoint.url";
const URL_ESCAPE: &str = "url-path";

/// The variable the single-expression wrapper assigns.
const RESULT_VAR: &str = "__ja_value";

/// A compiled leaf of a definition: its template's name, and the plan that
/// evaluates it without the engine when it is simple enough.
#[derive(Debug, Clone)]
pub enum Leaf {
    /// No template syntax: used as written.
    Const(String),
    /// Exactly one `{{ expression }}`: evaluates to a typed value.
    Expr(String, Option<Lookup>),
    /// Text mixed with expressions or statements: renders to a string.
    Text(String, Option<TextPlan>),
}

impl Leaf {
    /// The template's name (the field it came from); `None` for constants.
    pub fn name(&self) -> Option<&str> {
        match self {
            Leaf::Const(_) => None,
            Leaf::Expr(n, _) | Leaf::Text(n, _) => Some(n),
        }
    }
}

/// A leaf's value for a JSON payload (see [`Templates::json`]).
#[derive(Debug)]
pub enum Json<'a> {
    /// A value of the event, not `null`.
    Event(&'a serde_json::Value),
    /// A string.
    Text(Cow<'a, str>),
    /// What the template engine evaluated.
    Engine(Value),
    /// `none`.
    None,
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Event(v) => v.serialize(s),
            Json::Text(t) => s.serialize_str(t),
            Json::Engine(v) => v.serialize(s),
            Json::None => s.serialize_unit(),
        }
    }
}

/// A template that did not compile, with its position inside the leaf.
#[derive(Debug)]
pub struct SyntaxError {
    pub line: Option<usize>,
    pub message: String,
}

/// A failure while evaluating a template for one event.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {message}")]
pub struct EvalError {
    pub field: String,
    pub message: String,
}

pub struct Templates {
    env: Environment<'static>,
    /// The variables that leaves may read without the engine (see `fast`).
    fast_roots: &'static [&'static str],
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").finish_non_exhaustive()
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

impl Templates {
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|name| {
            if name.starts_with(URL_PATH_PREFIX) {
                AutoEscape::Custom(URL_ESCAPE)
            } else {
                AutoEscape::None
            }
        });
        env.set_formatter(|out, state, value| {
            // `none` (a missing optional parameter) prints as nothing.
            if value.is_none() {
                return Ok(());
            }
            let url = state.auto_escape() == AutoEscape::Custom(URL_ESCAPE);
            write_value(out, value, url)
                .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
        });
        // Like Jinja's `default`, but `none` (a missing optional parameter or
        // an explicit null) is replaced too: that is what journey authors mean.
        env.add_filter(
            "default",
            |value: Value, fallback: Option<Value>, _boolean: Option<bool>| {
                if value.is_undefined() || value.is_none() {
                    fallback.unwrap_or_else(|| Value::from(""))
                } else {
                    value
                }
            },
        );
        env.add_filter("d", |value: Value, fallback: Option<Value>| {
            if value.is_undefined() || value.is_none() {
                fallback.unwrap_or_else(|| Value::from(""))
            } else {
                value
            }
        });
        Self {
            env,
            fast_roots: &[],
        }
    }

    /// Like [`Templates::new`], and simple leaves that read only `roots`
    /// are also planned for evaluation without the engine (see `fast`).
    pub fn with_fast_paths(roots: &'static [&'static str]) -> Self {
        Self {
            fast_roots: roots,
            ..Self::new()
        }
    }

    /// Compiles `source` as the leaf named `name`.
    pub fn add(&mut self, name: &str, source: &str) -> Result<Leaf, SyntaxError> {
        if !has_syntax(source) {
            return Ok(Leaf::Const(source.to_string()));
        }
        let roots = self.fast_roots;
        let (wrapped, leaf) = match single_expression(source) {
            Some(expr) if !name.starts_with(URL_PATH_PREFIX) => (
                format!("{{% set {RESULT_VAR} = ({expr}) %}}"),
                Leaf::Expr(name.to_string(), fast::plan_expression(expr, roots)),
            ),
            _ => (
                source.to_string(),
                Leaf::Text(
                    name.to_string(),
                    fast::plan_text(source, roots, name.starts_with(URL_PATH_PREFIX)),
                ),
            ),
        };
        self.env
            .add_template_owned(name.to_string(), wrapped)
            .map_err(|e| SyntaxError {
                line: e.line(),
                message: e
                    .detail()
                    .map(str::to_string)
                    .unwrap_or_else(|| e.kind().to_string()),
            })?;
        Ok(leaf)
    }

    /// The variables a leaf reads that it does not define itself, as dotted
    /// paths (`params.phone`, `journey.id`, `params`).
    pub fn variables(&self, leaf: &Leaf) -> HashSet<String> {
        let Some(name) = leaf.name() else {
            return HashSet::new();
        };
        match self.env.get_template(name) {
            Ok(t) => t.undeclared_variables(true),
            Err(_) => HashSet::new(),
        }
    }

    /// Evaluates a leaf to a value; `Ok(None)` means `none`.
    pub fn eval<S: Scope + ?Sized>(
        &self,
        leaf: &Leaf,
        scope: &S,
    ) -> Result<Option<Value>, EvalError> {
        match leaf {
            Leaf::Const(s) => Ok(Some(Value::from(s.as_str()))),
            Leaf::Expr(name, fast) => match fast.as_ref().map(|lookup| lookup.eval(scope)) {
                Some(Ok(value)) => Ok(value),
                _ => self.expression(name, scope.context()),
            },
            Leaf::Text(name, fast) => Ok(Some(Value::from(self.text_of(name, fast, scope)?))),
        }
    }

    /// A leaf's value for a JSON payload: borrowed from the event when the
    /// shortcut finds it there, so that it is written as it came, with no
    /// template value made of it (the same JSON: a test holds the two to it).
    pub fn json<'a, S: Scope + ?Sized>(
        &'a self,
        leaf: &'a Leaf,
        scope: &'a S,
    ) -> Result<Json<'a>, EvalError> {
        Ok(match leaf {
            Leaf::Const(s) => Json::Text(Cow::Borrowed(s)),
            Leaf::Text(name, fast) => Json::Text(Cow::Owned(self.text_of(name, fast, scope)?)),
            Leaf::Expr(name, fast) => match fast.as_ref().map(|lookup| lookup.look(scope)) {
                Some(Ok(Looked::Json(v))) => Json::Event(v),
                Some(Ok(Looked::Str(s))) => Json::Text(Cow::Borrowed(s)),
                Some(Ok(Looked::None)) => Json::None,
                _ => self
                    .expression(name, scope.context())?
                    .map_or(Json::None, Json::Engine),
            },
        })
    }

    /// A single-expression leaf evaluated by the engine; `Ok(None)` means
    /// `none`.
    fn expression(&self, name: &str, ctx: &Value) -> Result<Option<Value>, EvalError> {
        let captured = self
            .template(name)?
            .render_captured(ctx)
            .map_err(|e| eval_error(name, &e))?;
        match captured.state().lookup(RESULT_VAR) {
            Some(v) if v.is_undefined() => Err(EvalError {
                field: name.to_string(),
                message: "the expression is undefined for this event".into(),
            }),
            Some(v) if v.is_none() => Ok(None),
            Some(v) => Ok(Some(v)),
            None => Err(EvalError {
                field: name.to_string(),
                message: "the expression produced no value".into(),
            }),
        }
    }

    /// Renders a leaf to text; `Ok(None)` means a single expression was `none`.
    pub fn text<S: Scope + ?Sized>(
        &self,
        leaf: &Leaf,
        scope: &S,
    ) -> Result<Option<String>, EvalError> {
        match leaf {
            Leaf::Const(s) => Ok(Some(s.clone())),
            Leaf::Text(name, fast) => self.text_of(name, fast, scope).map(Some),
            Leaf::Expr(..) => Ok(self.eval(leaf, scope)?.map(|v| plain_text(&v))),
        }
    }

    fn text_of<S: Scope + ?Sized>(
        &self,
        name: &str,
        fast: &Option<TextPlan>,
        scope: &S,
    ) -> Result<String, EvalError> {
        if let Some(Ok(text)) = fast.as_ref().map(|plan| plan.text(scope)) {
            return Ok(text);
        }
        self.render(name, scope.context())
    }

    fn render(&self, name: &str, ctx: &Value) -> Result<String, EvalError> {
        self.template(name)?
            .render(ctx)
            .map_err(|e| eval_error(name, &e))
    }

    fn template(&self, name: &str) -> Result<minijinja::Template<'_, '_>, EvalError> {
        self.env
            .get_template(name)
            .map_err(|e| eval_error(name, &e))
    }
}

fn eval_error(field: &str, e: &minijinja::Error) -> EvalError {
    let message = match (e.kind(), e.detail()) {
        (ErrorKind::UndefinedError, Some(d)) => format!("undefined value: {d}"),
        (ErrorKind::UndefinedError, None) => {
            "undefined value (a variable or field this event does not have)".into()
        }
        (kind, Some(d)) => format!("{kind}: {d}"),
        (kind, None) => kind.to_string(),
    };
    EvalError {
        field: field.to_string(),
        message,
    }
}

/// How a value that is not `none` prints, for the engine's formatter and
/// for the shortcut alike: percent-encoded as one path segment in a URL
/// path (`url`); booleans, lists and objects as [`plain_text`]; anything
/// else as minijinja displays it.
pub(super) fn write_value(out: &mut impl fmt::Write, value: &Value, url: bool) -> fmt::Result {
    if url {
        write!(
            out,
            "{}",
            utf8_percent_encode(&plain_text(value), PATH_SEGMENT)
        )
    } else if matches!(
        value.kind(),
        ValueKind::Bool | ValueKind::Seq | ValueKind::Map
    ) {
        out.write_str(&plain_text(value))
    } else {
        write!(out, "{value}")
    }
}

/// A value printed into text (a mixed leaf, a query value, a header, a URL
/// path segment) the way the JSON it came from writes it: `true`, not
/// Jinja's `True`; lists and objects as compact JSON, not Python reprs.
pub fn plain_text(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => value.is_true().to_string(),
        ValueKind::Seq | ValueKind::Map => {
            serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
        }
        _ => value.to_string(),
    }
}

/// Whether `source` contains template syntax at all.
pub fn has_syntax(source: &str) -> bool {
    source.contains("{{") || source.contains("{%") || source.contains("{#")
}

/// The inner expression when `source` is exactly one `{{ expr }}` (surrounding
/// whitespace allowed), else `None`.
pub fn single_expression(source: &str) -> Option<&str> {
    let inner = source.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("{#")
    {
        return None;
    }
    let inner = inner.trim();
    (!inner.is_empty()).then_some(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    #[test]
    fn single_expressions_are_recognised() {
        assert_eq!(single_expression("{{ params.a }}"), Some("params.a"));
        assert_eq!(
            single_expression("  {{- params.a | default(1) -}} "),
            Some("params.a | default(1)")
        );
        assert_eq!(single_expression("x {{ a }}"), None);
        assert_eq!(single_expression("{{ a }}{{ b }}"), None);
        assert_eq!(single_expression("{{ }}"), None);
    }

    #[test]
    fn expressions_keep_their_type_and_text_stays_text() {
        let mut t = Templates::new();
        let n = t.add("n", "{{ params.n }}").unwrap();
        let s = t.add("s", "n={{ params.n }}").unwrap();
        let ctx = Value::from_serialize(context! { params => context! { n => 42 } });
        assert_eq!(t.eval(&n, &ctx).unwrap().unwrap(), Value::from(42));
        assert_eq!(t.text(&s, &ctx).unwrap().unwrap(), "n=42");
    }

    #[test]
    fn values_in_text_print_as_json_writes_them() {
        let mut t = Templates::new();
        let s = t
            .add("s", "{{ params.b }} {{ params.l }} {{ params.o }}")
            .unwrap();
        let e = t.add("e", "{{ params.b }}").unwrap();
        let ctx = Value::from_serialize(context! { params => context! {
            b => true, l => vec![Some(false), None], o => context! { k => "v" }
        } });
        assert_eq!(
            t.text(&s, &ctx).unwrap().unwrap(),
            r#"true [false,null] {"k":"v"}"#
        );
        assert_eq!(t.text(&e, &ctx).unwrap().unwrap(), "true");
    }

    #[test]
    fn none_prints_empty_and_default_replaces_it() {
        let mut t = Templates::new();
        let a = t.add("a", "Hi {{ params.x }}!").unwrap();
        let b = t.add("b", "{{ params.x | default('there') }}").unwrap();
        let ctx = Value::from_serialize(context! { params => context! { x => () } });
        assert_eq!(t.text(&a, &ctx).unwrap().unwrap(), "Hi !");
        assert_eq!(t.text(&b, &ctx).unwrap().unwrap(), "there");
    }

    #[test]
    fn undefined_values_are_errors() {
        let mut t = Templates::new();
        let a = t.add("a", "{{ journey.id }}").unwrap();
        let b = t.add("b", "x {{ context.nope }}").unwrap();
        let ctx = Value::from_serialize(context! { context => context! {} });
        assert!(t.eval(&a, &ctx).is_err());
        assert!(t.text(&b, &ctx).is_err());
    }

    #[test]
    fn url_expressions_are_one_encoded_segment() {
        let mut t = Templates::new();
        let u = t.add("endpoint.url", "/v1/{{ params.a }}/x").unwrap();
        let ctx = Value::from_serialize(context! { params => context! { a => "a/b c?d#é" } });
        assert_eq!(
            t.text(&u, &ctx).unwrap().unwrap(),
            "/v1/a%2Fb%20c%3Fd%23%C3%A9/x"
        );
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let mut t = Templates::new();
        let err = t.add("x", "line one\n{{ params.a | }}").unwrap_err();
        assert_eq!(err.line, Some(2));
    }
}
