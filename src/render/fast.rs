//! A shortcut past the template engine for the commonest leaves: a path into
//! the event (`{{ params.phone }}`), optionally with a literal default
//! (`{{ context.locale | default('en') }}`), alone or inside plain text
//! (`Hello {{ params.firstName | default('there') }}!`).
//!
//! Such a leaf is planned at load, next to its compiled template, and
//! evaluated per event by looking the path up in the event itself: no
//! template state, no conversion of the whole event into template values.
//! The shortcut only ever answers when the answer is certain: whenever the
//! path is not there (and no default applies) or leads through anything but
//! objects, it gives up and the template engine evaluates the leaf, so every
//! error (and its wording) still comes from the engine.

use minijinja::Value;

use super::template::write_value;

/// A text leaf without the template engine: literal text around lookups.
/// `url`: each value printed is percent-encoded as one URL path segment (the
/// `endpoint.url` leaf).
#[derive(Debug, Clone, PartialEq)]
pub struct TextPlan {
    pub pieces: Vec<Piece>,
    pub url: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Literal(String),
    Lookup(Lookup),
}

/// A dotted path into the event, and the literal `default(...)` if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    pub path: Vec<String>,
    pub default: Option<String>,
}

/// What a path names in the event.
#[derive(Debug)]
pub enum Found<'a> {
    Json(&'a serde_json::Value),
    Str(&'a str),
    /// `none`: a declared optional parameter the event does not carry.
    None,
    /// The last key is not in its object: undefined.
    Missing,
    /// Anything else: left to the template engine.
    Unknown,
}

/// What leaves are evaluated against: the event for the shortcut, and the
/// template context (built only if a leaf needs the engine).
pub trait Scope {
    fn find(&self, path: &[String]) -> Found<'_>;
    fn context(&self) -> &Value;
}

/// A plain template context: every leaf goes through the engine.
impl Scope for Value {
    fn find(&self, _path: &[String]) -> Found<'_> {
        Found::Unknown
    }

    fn context(&self) -> &Value {
        self
    }
}

/// Why the shortcut gave up: the engine must evaluate the leaf.
pub struct Unsure;

/// What a planned path gives for one event, borrowed from the event (or
/// from the plan's default), before any conversion to a template value.
#[derive(Debug)]
pub enum Looked<'a> {
    /// Any JSON value but `null`.
    Json(&'a serde_json::Value),
    Str(&'a str),
    /// `none`.
    None,
}

impl Lookup {
    /// What the path gives, the default applied.
    pub fn look<'a, S: Scope + ?Sized>(&'a self, scope: &'a S) -> Result<Looked<'a>, Unsure> {
        let found = match scope.find(&self.path) {
            Found::Json(serde_json::Value::Null) | Found::None => None,
            Found::Json(v) => Some(Looked::Json(v)),
            Found::Str(s) => Some(Looked::Str(s)),
            Found::Missing if self.default.is_some() => None,
            Found::Missing | Found::Unknown => return Err(Unsure),
        };
        // Our `default` replaces undefined and none alike (see Templates::new).
        Ok(match (found, &self.default) {
            (Some(found), _) => found,
            (None, Some(text)) => Looked::Str(text),
            (None, None) => Looked::None,
        })
    }

    /// The value (`None` for `none`).
    pub fn eval<S: Scope + ?Sized>(&self, scope: &S) -> Result<Option<Value>, Unsure> {
        Ok(match self.look(scope)? {
            Looked::Json(v) => Some(Value::from_serialize(v)),
            Looked::Str(s) => Some(Value::from(s)),
            Looked::None => None,
        })
    }
}

impl TextPlan {
    /// The text, with values printed as the environment's formatter prints
    /// them.
    pub fn text<S: Scope + ?Sized>(&self, scope: &S) -> Result<String, Unsure> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Lookup(lookup) => {
                    if let Some(value) = lookup.eval(scope)? {
                        let _ = write_value(&mut out, &value, self.url);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The plan for a single expression's inner text, if it is a path into one
/// of `roots` with at most a literal default.
pub fn plan_expression(expr: &str, roots: &[&str]) -> Option<Lookup> {
    let (path, default) = match expr.split_once('|') {
        None => (expr, None),
        Some((path, filter)) => (path, Some(literal_default(filter.trim())?)),
    };
    let path: Vec<String> = path.trim().split('.').map(str::to_string).collect();
    if !path.iter().all(|s| is_identifier(s)) || !roots.contains(&path[0].as_str()) {
        return None;
    }
    Some(Lookup { path, default })
}

/// The plan for a text leaf made of literal text and planned expressions.
pub fn plan_text(source: &str, roots: &[&str], url: bool) -> Option<TextPlan> {
    // Statements, comments and a trailing newline or carriage return (the
    // engine drops one of each at the end) are the engine's business.
    if source.contains("{%") || source.contains("{#") || source.ends_with(['\n', '\r']) {
        return None;
    }
    let mut pieces = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            pieces.push(Piece::Literal(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let end = after.find("}}")?;
        pieces.push(Piece::Lookup(plan_expression(&after[..end], roots)?));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest.to_string()));
    }
    Some(TextPlan { pieces, url })
}

/// `default('text')` or `d("text")` (no escapes, no quote inside).
fn literal_default(filter: &str) -> Option<String> {
    let args = filter
        .strip_prefix("default")
        .or_else(|| filter.strip_prefix('d'))?
        .trim_start()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .trim();
    let quote = args.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let text = args.strip_prefix(quote)?.strip_suffix(quote)?;
    (!text.contains(quote) && !text.contains('\\')).then(|| text.to_string())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOTS: &[&str] = &["params", "journey", "context", "event_id"];

    #[test]
    fn paths_with_literal_defaults_are_planned_and_the_rest_is_not() {
        let p = |e| plan_expression(e, ROOTS);
        assert_eq!(
            p(" params.phone "),
            Some(Lookup {
                path: vec!["params".into(), "phone".into()],
                default: None
            })
        );
        assert_eq!(
            p("context.locale | default('en')").unwrap().default,
            Some("en".into())
        );
        assert_eq!(
            p("context.locale|d(\"en\")").unwrap().default,
            Some("en".into())
        );
        for refused in [
            "params.tags.0",
            "params['phone']",
            "params.phone | upper",
            "params.phone | default(params.other)",
            "params.phone | default('it\\'s')",
            "params.phone ~ 'x'",
            "secrets.token",
            "none",
            "params.",
            "- params.phone",
        ] {
            assert_eq!(p(refused), None, "{refused}");
        }
    }

    #[test]
    fn text_is_split_into_literals_and_lookups() {
        let plan = plan_text(
            "Hi {{ params.a }}, {{ journey.id | default('x') }}!",
            ROOTS,
            false,
        )
        .unwrap();
        let TextPlan { pieces, url } = plan;
        assert!(!url);
        assert_eq!(pieces.len(), 5);
        assert_eq!(pieces[0], Piece::Literal("Hi ".into()));
        assert_eq!(pieces[4], Piece::Literal("!".into()));
        for refused in [
            "{% if params.a %}x{% endif %}",
            "a {# note #}",
            "line\n",
            "x{{ params.a }}\r",
            "{{ params.a }",
            "{{- params.a }}",
            "{{ params.a | upper }}",
        ] {
            assert_eq!(plan_text(refused, ROOTS, false), None, "{refused}");
        }
    }
}
