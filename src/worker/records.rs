//! The records the worker writes (SPEC §5.3, §5.4): the result record and
//! the headers of a dead-letter record. Pure functions of the outcome.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::dispatch::Outcome;
use crate::event::{ActionEvent, InvalidEvent, Object};

/// Longest `ja-error` header value.
pub const MAX_ERROR_BYTES: usize = 1024;

/// Who an outcome is about: taken from the event, or from whatever an
/// invalid record carried.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub event_id: Option<String>,
    pub action_id: Option<String>,
    pub profile_id: Option<String>,
    pub journey: Option<Object>,
}

impl Identity {
    /// The event's identity, taken from it (no copies).
    pub fn from_event(e: ActionEvent) -> Identity {
        Identity {
            event_id: Some(e.event_id),
            action_id: Some(e.action_id),
            profile_id: Some(e.profile_id),
            journey: e.journey,
        }
    }

    pub fn of_invalid(e: &InvalidEvent) -> Identity {
        Identity {
            event_id: e.event_id.clone(),
            action_id: e.action_id.clone(),
            profile_id: e.profile_id.clone(),
            journey: e.journey.clone(),
        }
    }
}

#[derive(Serialize)]
struct ResultRecord<'a> {
    event_id: &'a str,
    action_id: Option<&'a str>,
    profile_id: Option<&'a str>,
    journey: Option<&'a Object>,
    outcome: String,
    status: Option<u16>,
    attempts: u32,
    duration_ms: f64,
    response: Option<&'a Value>,
    error_response: Option<&'a Value>,
    error: Option<&'a str>,
    completed_at: String,
}

/// The result record's value, or `None` when the event id is unknown (an
/// invalid record without one goes to the DLQ only).
pub fn result_value(who: &Identity, outcome: &Outcome, duration_ms: f64) -> Option<Vec<u8>> {
    let event_id = who.event_id.as_deref()?;
    let record = ResultRecord {
        event_id,
        action_id: who.action_id.as_deref(),
        profile_id: who.profile_id.as_deref(),
        journey: who.journey.as_ref(),
        outcome: outcome.code.to_string(),
        status: outcome.last_status(),
        attempts: outcome.attempt_count(),
        duration_ms: (duration_ms * 1000.0).round() / 1000.0,
        response: outcome.response.as_ref(),
        error_response: outcome.error_response.as_ref(),
        error: outcome.error.as_deref(),
        completed_at: rfc3339(outcome.completed_at),
    };
    // Most records fit: no growth and copy on the way (serde_json's own
    // to_vec starts at 128 bytes).
    let mut value = Vec::with_capacity(RESULT_CAPACITY);
    serde_json::to_writer(&mut value, &record).ok()?;
    Some(value)
}

/// Room reserved for a result record's JSON.
const RESULT_CAPACITY: usize = 512;

/// Where a record came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// The `ja-*` headers of a dead-letter record, in order.
pub fn dlq_headers(
    who: &Identity,
    outcome: &Outcome,
    source: Source<'_>,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("ja-outcome", outcome.code.to_string()),
        (
            "ja-error",
            truncate(outcome.error.as_deref().unwrap_or(""), MAX_ERROR_BYTES),
        ),
    ];
    if let Some(action) = &who.action_id {
        headers.push(("ja-action-id", action.clone()));
    }
    headers.push(("ja-attempts", outcome.attempt_count().to_string()));
    if let Some(status) = outcome.last_status() {
        headers.push(("ja-last-status", status.to_string()));
    }
    headers.push(("ja-source-topic", source.topic.to_string()));
    headers.push(("ja-source-partition", source.partition.to_string()));
    headers.push(("ja-source-offset", source.offset.to_string()));
    if let Some(first) = outcome.first_attempt_at {
        headers.push(("ja-first-attempt-at", rfc3339(first)));
    }
    headers.push(("ja-failed-at", rfc3339(outcome.completed_at)));
    headers
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{Attempt, AttemptStatus, OutcomeCode};
    use std::time::Duration;

    fn failed() -> Outcome {
        let mut o = Outcome::early(OutcomeCode::Http(503), "the provider answered 503");
        o.attempts = vec![
            Attempt {
                status: AttemptStatus::Timeout,
                duration: Duration::from_millis(5),
            },
            Attempt {
                status: AttemptStatus::Status(503),
                duration: Duration::from_millis(5),
            },
        ];
        o.first_attempt_at = Some(Utc::now());
        o.error_response = Some(serde_json::json!({"error": "busy"}));
        o
    }

    #[test]
    fn result_records_follow_the_spec_shape() {
        let who = Identity {
            event_id: Some("e1".into()),
            action_id: Some("sms".into()),
            ..Default::default()
        };
        let v: Value =
            serde_json::from_slice(&result_value(&who, &failed(), 41.7).unwrap()).unwrap();
        assert_eq!(v["event_id"], "e1");
        assert_eq!(v["outcome"], "http_503");
        assert_eq!(v["status"], 503);
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["duration_ms"], 41.7);
        assert_eq!(v["error_response"]["error"], "busy");
        assert_eq!(v["response"], Value::Null);
        assert!(v["completed_at"].as_str().unwrap().ends_with('Z'));
        for key in ["profile_id", "journey", "error"] {
            assert!(v.get(key).is_some(), "{key} present");
        }
        assert!(result_value(&Identity::default(), &failed(), 1.0).is_none());
    }

    #[test]
    fn dlq_headers_carry_every_ja_field() {
        let who = Identity {
            event_id: Some("e1".into()),
            action_id: Some("sms".into()),
            ..Default::default()
        };
        let h = dlq_headers(
            &who,
            &failed(),
            Source {
                topic: "in",
                partition: 2,
                offset: 77,
            },
        );
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ja-outcome"), Some("http_503"));
        assert_eq!(get("ja-action-id"), Some("sms"));
        assert_eq!(get("ja-attempts"), Some("2"));
        assert_eq!(get("ja-last-status"), Some("503"));
        assert_eq!(get("ja-source-topic"), Some("in"));
        assert_eq!(get("ja-source-partition"), Some("2"));
        assert_eq!(get("ja-source-offset"), Some("77"));
        assert!(get("ja-first-attempt-at").is_some());
        assert!(get("ja-failed-at").is_some());
        let invalid = Outcome::early(OutcomeCode::InvalidEvent, "x".repeat(5000));
        let h = dlq_headers(
            &Identity::default(),
            &invalid,
            Source {
                topic: "in",
                partition: 0,
                offset: 1,
            },
        );
        assert!(h.iter().all(|(n, _)| *n != "ja-action-id"
            && *n != "ja-last-status"
            && *n != "ja-first-attempt-at"));
        assert_eq!(
            h.iter().find(|(n, _)| *n == "ja-error").unwrap().1.len(),
            MAX_ERROR_BYTES
        );
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
