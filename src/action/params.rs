//! The `parameters` of an action (AJO's variable fields): declared types,
//! and the check of an event's `params` against them before rendering.

use serde_json::{Map, Value};

use crate::event::Object;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamType {
    String,
    Integer,
    Decimal,
    Boolean,
    /// An RFC 3339 time string.
    DateTime,
    Object,
    List(Box<ParamType>),
}

impl ParamType {
    pub fn parse(text: &str) -> Result<ParamType, String> {
        let t = text.trim();
        if let Some(inner) = t.strip_prefix("list<").and_then(|r| r.strip_suffix('>')) {
            return Ok(ParamType::List(Box::new(ParamType::parse(inner)?)));
        }
        Ok(match t.to_ascii_lowercase().as_str() {
            "string" => ParamType::String,
            "integer" => ParamType::Integer,
            "decimal" => ParamType::Decimal,
            "boolean" => ParamType::Boolean,
            "datetime" => ParamType::DateTime,
            "object" => ParamType::Object,
            _ => {
                return Err(format!(
                    "`{text}` is not a parameter type (string, integer, decimal, boolean, dateTime, object, list<…>)"
                ))
            }
        })
    }

    pub fn accepts(&self, value: &Value) -> bool {
        match (self, value) {
            (ParamType::String, Value::String(_)) => true,
            (ParamType::Integer, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (ParamType::Decimal, Value::Number(_)) => true,
            (ParamType::Boolean, Value::Bool(_)) => true,
            (ParamType::DateTime, Value::String(s)) => {
                chrono::DateTime::parse_from_rfc3339(s).is_ok()
            }
            (ParamType::Object, Value::Object(_)) => true,
            (ParamType::List(inner), Value::Array(items)) => items.iter().all(|v| inner.accepts(v)),
            _ => false,
        }
    }
}

impl std::fmt::Display for ParamType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamType::String => f.write_str("string"),
            ParamType::Integer => f.write_str("integer"),
            ParamType::Decimal => f.write_str("decimal"),
            ParamType::Boolean => f.write_str("boolean"),
            ParamType::DateTime => f.write_str("dateTime"),
            ParamType::Object => f.write_str("object"),
            ParamType::List(inner) => write!(f, "list<{inner}>"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Parameter {
    pub name: String,
    pub kind: ParamType,
    pub required: bool,
}

pub(super) fn compile(
    raw: &Map<String, Value>,
    problems: &mut Vec<(String, String)>,
) -> Vec<Parameter> {
    let mut out = Vec::new();
    for (name, value) in raw {
        let field = format!("parameters.{name}");
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            problems.push((
                field.clone(),
                "a parameter name is letters, digits and underscores".into(),
            ));
            continue;
        }
        let spec: super::spec::ParamSpec = match serde_path_to_error::deserialize(value.clone()) {
            Ok(s) => s,
            Err(e) => {
                problems.push((field, e.inner().to_string()));
                continue;
            }
        };
        match ParamType::parse(&spec.kind) {
            Ok(kind) => out.push(Parameter {
                name: name.clone(),
                kind,
                required: spec.required,
            }),
            Err(e) => problems.push((format!("{field}.type"), e)),
        }
    }
    out
}

/// Checks `params`; returns the optional parameters absent from it.
pub fn check<'a>(declared: &'a [Parameter], params: &Object) -> Result<Vec<&'a str>, String> {
    let mut missing = Vec::new();
    for p in declared {
        match params.get(&p.name) {
            None | Some(Value::Null) if p.required => {
                return Err(format!("params.{} is required", p.name))
            }
            None => missing.push(p.name.as_str()),
            Some(Value::Null) => {}
            Some(v) if !p.kind.accepts(v) => {
                return Err(format!(
                    "params.{} must be {}, got {}",
                    p.name,
                    p.kind,
                    describe(v)
                ));
            }
            Some(_) => {}
        }
    }
    Ok(missing)
}

fn describe(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 40 {
        format!("{}…", text.chars().take(40).collect::<String>())
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn types_parse_and_accept() {
        let table = [
            ("string", json!("x"), true),
            ("string", json!(1), false),
            ("integer", json!(3), true),
            ("integer", json!(3.5), false),
            ("decimal", json!(3.5), true),
            ("decimal", json!(3), true),
            ("decimal", json!("3.5"), false),
            ("boolean", json!(true), true),
            ("boolean", json!("true"), false),
            ("dateTime", json!("2026-11-23T12:00:00Z"), true),
            ("dateTime", json!("yesterday"), false),
            ("object", json!({"a": 1}), true),
            ("object", json!([1]), false),
            ("list<string>", json!(["a", "b"]), true),
            ("list<string>", json!(["a", 1]), false),
            ("list<list<integer>>", json!([[1], [2, 3]]), true),
        ];
        for (kind, value, ok) in table {
            assert_eq!(
                ParamType::parse(kind).unwrap().accepts(&value),
                ok,
                "{kind} {value}"
            );
        }
        assert!(ParamType::parse("list<>").is_err());
        assert!(ParamType::parse("money").is_err());
        assert_eq!(
            ParamType::parse("list<dateTime>").unwrap().to_string(),
            "list<dateTime>"
        );
    }

    #[test]
    fn check_reports_required_and_mistyped_and_lists_missing_optionals() {
        let declared = vec![
            Parameter {
                name: "phone".into(),
                kind: ParamType::String,
                required: true,
            },
            Parameter {
                name: "amount".into(),
                kind: ParamType::Decimal,
                required: false,
            },
            Parameter {
                name: "name".into(),
                kind: ParamType::String,
                required: false,
            },
        ];
        let params = |v: Value| serde_json::from_value::<Object>(v).unwrap();
        let ok = check(&declared, &params(json!({"phone": "+33", "name": null}))).unwrap();
        assert_eq!(ok, vec!["amount"]);
        let err = check(&declared, &params(json!({"amount": 1}))).unwrap_err();
        assert_eq!(err, "params.phone is required");
        let err = check(&declared, &params(json!({"phone": "+33", "amount": "12"}))).unwrap_err();
        assert!(err.starts_with("params.amount must be decimal"), "{err}");
    }
}
