//! The action event of SPEC §5.1, parsed once at the edge.
//!
//! Parsing never panics and never drops information needed for the outcome:
//! a record that is not a valid event still yields the identifiers it did
//! carry, so the result and DLQ records can name them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

mod object;
pub use object::Object;

/// A valid action event.
#[derive(Debug, Clone, Serialize)]
pub struct ActionEvent {
    pub event_id: String,
    pub action_id: String,
    pub profile_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journey: Option<Object>,
    pub params: Object,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Object>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emitted_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// `expires_at`, parsed.
    #[serde(skip)]
    pub deadline: Option<DateTime<Utc>>,
}

/// Why a record is not a valid action event, with whatever it did identify.
#[derive(Debug, Clone, Default, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidEvent {
    pub reason: String,
    pub event_id: Option<String>,
    pub action_id: Option<String>,
    pub profile_id: Option<String>,
    pub journey: Option<Object>,
}

impl ActionEvent {
    /// Parses a record value (UTF-8 JSON).
    pub fn from_slice(bytes: &[u8]) -> Result<ActionEvent, InvalidEvent> {
        // A valid event parses straight into its fields; anything else is
        // parsed again as a JSON tree, which finds what is wrong and keeps
        // the ids the record did carry.
        if let Some(event) = Typed::parse(bytes) {
            return Ok(event);
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| InvalidEvent {
            reason: format!("not valid JSON: {e}"),
            ..Default::default()
        })?;
        Self::from_value(value)
    }

    /// Checks a JSON value against SPEC §5.1.
    pub fn from_value(value: Value) -> Result<ActionEvent, InvalidEvent> {
        let Value::Object(mut map) = value else {
            return Err(InvalidEvent {
                reason: format!("the event must be a JSON object, not {}", kind(&value)),
                ..Default::default()
            });
        };
        let partial = InvalidEvent {
            event_id: take_string(&mut map, "event_id").ok().flatten(),
            action_id: take_string(&mut map, "action_id").ok().flatten(),
            profile_id: take_string(&mut map, "profile_id").ok().flatten(),
            ..Default::default()
        };
        let fail = |mut partial: InvalidEvent, reason: String| {
            partial.reason = reason;
            Err(partial)
        };
        // Fields taken above are gone from `map`; look at what was wrong with them.
        for (field, got) in [
            ("event_id", partial.event_id.clone()),
            ("action_id", partial.action_id.clone()),
            ("profile_id", partial.profile_id.clone()),
        ] {
            match got {
                Some(s) if s.is_empty() => {
                    return fail(partial, format!("{field} must not be empty"))
                }
                Some(_) => {}
                None => {
                    let why = match map.get(field) {
                        None | Some(Value::Null) => format!("{field} is required"),
                        Some(other) => format!("{field} must be a string, not {}", kind(other)),
                    };
                    return fail(partial, why);
                }
            }
        }
        let journey = match take_object(&mut map, "journey") {
            Ok(j) => j,
            Err(e) => return fail(partial, e),
        };
        // From here on a failure also reports the journey (moved, not cloned).
        let fail = |mut partial: InvalidEvent, journey, reason| {
            partial.journey = journey;
            fail(partial, reason)
        };
        let params = match take_object(&mut map, "params") {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => return fail(partial, journey, e),
        };
        let context = match take_object(&mut map, "context") {
            Ok(c) => c,
            Err(e) => return fail(partial, journey, e),
        };
        let emitted_at = match take_time(&mut map, "emitted_at") {
            Ok(t) => t.map(|(raw, _)| raw),
            Err(e) => return fail(partial, journey, e),
        };
        let (expires_at, deadline) = match take_time(&mut map, "expires_at") {
            Ok(Some((raw, at))) => (Some(raw), Some(at)),
            Ok(None) => (None, None),
            Err(e) => return fail(partial, journey, e),
        };
        Ok(ActionEvent {
            event_id: partial.event_id.unwrap_or_default(),
            action_id: partial.action_id.unwrap_or_default(),
            profile_id: partial.profile_id.unwrap_or_default(),
            journey,
            params,
            context,
            emitted_at,
            expires_at,
            deadline,
        })
    }

    /// Whether `expires_at` has passed at `now`.
    pub fn expired_at(&self, now: DateTime<Utc>) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}

/// The fields of a valid event as JSON types them, for the direct parse.
/// Unknown fields are ignored, as `from_value` ignores them.
#[derive(serde::Deserialize)]
struct Typed {
    event_id: String,
    action_id: String,
    profile_id: String,
    journey: Option<Object>,
    params: Option<Object>,
    context: Option<Object>,
    emitted_at: Option<String>,
    expires_at: Option<String>,
}

impl Typed {
    /// The event, if the record is a valid one (`None`: let `from_value`
    /// say what is wrong).
    fn parse(bytes: &[u8]) -> Option<ActionEvent> {
        // A derived Deserialize also takes a JSON array of the fields in
        // order; an event is an object (SPEC §5.1).
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        let t: Typed = json_from_bytes(bytes)?;
        if t.event_id.is_empty() || t.action_id.is_empty() || t.profile_id.is_empty() {
            return None;
        }
        let time = |raw: &Option<String>| match raw {
            None => Some(None),
            Some(s) => parse_time(s).ok().map(Some),
        };
        time(&t.emitted_at)?;
        let deadline = time(&t.expires_at)?;
        Some(ActionEvent {
            event_id: t.event_id,
            action_id: t.action_id,
            profile_id: t.profile_id,
            journey: t.journey,
            params: t.params.unwrap_or_default(),
            context: t.context,
            emitted_at: t.emitted_at,
            expires_at: t.expires_at,
            deadline,
        })
    }
}

/// JSON from bytes that must be UTF-8, or `None`. The bytes are checked as
/// UTF-8 once and parsed as a `str`: from a byte slice, serde_json checks
/// every string it reads again (~2.5 of an event's ~14 thousand
/// instructions of parsing).
pub fn json_from_bytes<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_str(std::str::from_utf8(bytes).ok()?).ok()
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Takes a string field out of `map`; leaves any non-string in place.
fn take_string(map: &mut Map<String, Value>, field: &str) -> Result<Option<String>, ()> {
    match map.get(field) {
        Some(Value::String(_)) => match map.remove(field) {
            Some(Value::String(s)) => Ok(Some(s)),
            _ => Err(()),
        },
        _ => Ok(None),
    }
}

fn take_object(map: &mut Map<String, Value>, field: &str) -> Result<Option<Object>, String> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(Object::from(o))),
        Some(other) => Err(format!("{field} must be an object, not {}", kind(&other))),
    }
}

/// An RFC 3339 time, in UTC.
fn parse_time(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

fn take_time(
    map: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<(String, DateTime<Utc>)>, String> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match parse_time(&s) {
            Ok(t) => Ok(Some((s, t))),
            Err(e) => Err(format!(
                "{field} must be an RFC 3339 time such as 2026-11-23T18:00:00Z: `{s}`: {e}"
            )),
        },
        Some(other) => Err(format!(
            "{field} must be an RFC 3339 time string, not {}",
            kind(&other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_event_parses() {
        let e = ActionEvent::from_value(json!({
            "event_id": "e1", "action_id": "a", "profile_id": "p",
            "journey": {"id": "j"}, "params": {"x": 1}, "context": {"locale": "fr"},
            "emitted_at": "2026-11-23T12:00:00Z", "expires_at": "2026-11-23T18:00:00+02:00"
        }))
        .unwrap();
        assert_eq!(e.event_id, "e1");
        assert_eq!(e.params.get("x"), Some(&json!(1)));
        assert_eq!(
            e.deadline.unwrap().to_rfc3339(),
            "2026-11-23T16:00:00+00:00"
        );
    }

    #[test]
    fn the_direct_parse_and_the_json_tree_agree() {
        let valid = [
            json!({"event_id": "e", "action_id": "a", "profile_id": "p"}),
            json!({"event_id": "e", "action_id": "a", "profile_id": "p", "journey": null,
                   "params": null, "context": null, "emitted_at": null, "expires_at": null}),
            json!({"event_id": "é", "action_id": "a", "profile_id": "p", "extra": [1, {"x": 2}],
                   "journey": {"id": "j", "v": 3}, "params": {"z": 1, "a": [true, null], "m": {"k": 1.5}},
                   "context": {"locale": "fr"}, "emitted_at": "2026-11-23T12:00:00Z",
                   "expires_at": "2026-11-23T18:00:00+02:00"}),
        ];
        for event in valid {
            let bytes = serde_json::to_vec(&event).unwrap();
            let direct = Typed::parse(&bytes).expect("valid");
            let tree = ActionEvent::from_value(event.clone()).unwrap();
            assert_eq!(
                serde_json::to_value(&direct).unwrap(),
                serde_json::to_value(&tree).unwrap(),
                "{event}"
            );
            assert_eq!(direct.deadline, tree.deadline);
        }
        // Whatever is not valid goes to the tree, which says why.
        for invalid in [
            &br#"{"event_id": "", "action_id": "a", "profile_id": "p"}"#[..],
            br#"{"event_id": "e", "action_id": "a", "profile_id": "p", "expires_at": "soon"}"#,
            br#"{"event_id": "e", "action_id": "a", "profile_id": "p", "params": []}"#,
            br#"{"event_id": "e", "event_id": "f", "action_id": "a", "profile_id": "p"}"#,
            br#"[1]"#,
        ] {
            assert!(Typed::parse(invalid).is_none());
        }
        let twice = br#"{"event_id": "e", "event_id": "f", "action_id": "a", "profile_id": "p"}"#;
        assert_eq!(ActionEvent::from_slice(twice).unwrap().event_id, "f");
    }

    #[test]
    fn an_event_invalid_after_its_journey_still_reports_the_journey() {
        for bad in [
            json!({"params": 1}),
            json!({"context": "x"}),
            json!({"emitted_at": "yesterday"}),
            json!({"expires_at": 5}),
        ] {
            let mut event = json!({"event_id": "e", "action_id": "a", "profile_id": "p",
                                   "journey": {"id": "j"}});
            event
                .as_object_mut()
                .unwrap()
                .extend(bad.as_object().unwrap().clone());
            let invalid = ActionEvent::from_value(event).unwrap_err();
            assert_eq!(
                invalid.journey.unwrap().get("id"),
                Some(&json!("j")),
                "{bad}"
            );
        }
    }

    #[test]
    fn invalid_events_keep_the_ids_they_had() {
        let table = [
            (json!([1]), "must be a JSON object", None),
            (
                json!({"action_id": "a", "profile_id": "p"}),
                "event_id is required",
                None,
            ),
            (
                json!({"event_id": 5, "action_id": "a", "profile_id": "p"}),
                "event_id must be a string",
                None,
            ),
            (
                json!({"event_id": "e", "action_id": "a"}),
                "profile_id is required",
                Some("e"),
            ),
            (
                json!({"event_id": "e", "action_id": "a", "profile_id": "p", "params": [1]}),
                "params must be an object",
                Some("e"),
            ),
            (
                json!({"event_id": "e", "action_id": "a", "profile_id": "p", "journey": "j"}),
                "journey must be an object",
                Some("e"),
            ),
            (
                json!({"event_id": "e", "action_id": "a", "profile_id": "p", "expires_at": "tomorrow"}),
                "RFC 3339",
                Some("e"),
            ),
            (
                json!({"event_id": "", "action_id": "a", "profile_id": "p"}),
                "must not be empty",
                Some(""),
            ),
        ];
        let table = table.into_iter().chain([(
            // Every field of a valid event, in order, as an array.
            json!(["e", "a", "p", null, null, null, null, null]),
            "must be a JSON object",
            None,
        )]);
        for (value, reason, id) in table {
            // As a JSON value, and as the bytes of a record (the worker's path).
            let bytes = serde_json::to_vec(&value).expect("serialises");
            for err in [
                ActionEvent::from_value(value.clone()).unwrap_err(),
                ActionEvent::from_slice(&bytes).unwrap_err(),
            ] {
                assert!(err.reason.contains(reason), "{value}: {}", err.reason);
                assert_eq!(err.event_id.as_deref(), id, "{value}");
            }
        }
        let err = ActionEvent::from_slice(b"{not json").unwrap_err();
        assert!(err.reason.starts_with("not valid JSON"));
        // Bytes that are not UTF-8 inside a string of an otherwise valid event.
        let err = ActionEvent::from_slice(
            b"{\"event_id\":\"e\",\"action_id\":\"a\",\"profile_id\":\"p\xff\",\"params\":{}}",
        )
        .unwrap_err();
        assert!(err.reason.starts_with("not valid JSON"), "{}", err.reason);
        // ... and the same event in UTF-8 parses, non-ASCII and escapes included.
        let e = ActionEvent::from_slice(
            "{\"event_id\":\"é\\u00e9\",\"action_id\":\"a\",\"profile_id\":\"p✓\",\"params\":{}}"
                .as_bytes(),
        )
        .unwrap();
        assert_eq!((e.event_id.as_str(), e.profile_id.as_str()), ("éé", "p✓"));
    }

    #[test]
    fn expiry_is_checked_against_now() {
        let e = ActionEvent::from_value(json!({
            "event_id": "e", "action_id": "a", "profile_id": "p", "expires_at": "2020-01-01T00:00:00Z"
        }))
        .unwrap();
        assert!(e.expired_at(Utc::now()));
    }
}
