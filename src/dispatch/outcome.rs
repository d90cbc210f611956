//! How an event ended (SPEC §5.2), with everything the result record, the
//! DLQ headers and the metrics need: attempts with their statuses and
//! durations, the captured response, and the times.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

/// The outcome code (AJO's `jo_status_code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeCode {
    Ok,
    /// A final non-2xx response.
    Http(u16),
    TimedOut,
    Error,
    Capped,
    Expired,
    InvalidEvent,
    UnknownAction,
    RenderError,
}

impl OutcomeCode {
    /// Every outcome but `ok` is also written to the DLQ.
    pub fn is_failure(self) -> bool {
        self != OutcomeCode::Ok
    }

    /// Parses the text form (`ok`, `http_503`, …), e.g. for `dlq replay --outcome`.
    pub fn parse(text: &str) -> Option<OutcomeCode> {
        Some(match text {
            "ok" => OutcomeCode::Ok,
            "timedout" => OutcomeCode::TimedOut,
            "error" => OutcomeCode::Error,
            "capped" => OutcomeCode::Capped,
            "expired" => OutcomeCode::Expired,
            "invalid_event" => OutcomeCode::InvalidEvent,
            "unknown_action" => OutcomeCode::UnknownAction,
            "render_error" => OutcomeCode::RenderError,
            other => OutcomeCode::Http(
                other
                    .strip_prefix("http_")?
                    .parse()
                    .ok()
                    .filter(|c| (100..=599).contains(c))?,
            ),
        })
    }
}

impl fmt::Display for OutcomeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutcomeCode::Ok => f.write_str("ok"),
            OutcomeCode::Http(code) => write!(f, "http_{code}"),
            OutcomeCode::TimedOut => f.write_str("timedout"),
            OutcomeCode::Error => f.write_str("error"),
            OutcomeCode::Capped => f.write_str("capped"),
            OutcomeCode::Expired => f.write_str("expired"),
            OutcomeCode::InvalidEvent => f.write_str("invalid_event"),
            OutcomeCode::UnknownAction => f.write_str("unknown_action"),
            OutcomeCode::RenderError => f.write_str("render_error"),
        }
    }
}

/// How one HTTP attempt ended (the `status` label of `http_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptStatus {
    Status(u16),
    Timeout,
    Error,
}

impl fmt::Display for AttemptStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptStatus::Status(code) => write!(f, "{code}"),
            AttemptStatus::Timeout => f.write_str("timeout"),
            AttemptStatus::Error => f.write_str("error"),
        }
    }
}

/// One HTTP call made for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub status: AttemptStatus,
    pub duration: Duration,
}

/// The final state of one event.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub code: OutcomeCode,
    /// Every HTTP call made, in order (a 401 token refresh adds one).
    pub attempts: Vec<Attempt>,
    /// A human-readable reason for a failure (secrets masked).
    pub error: Option<String>,
    /// The JSON body of a 2xx, when captured.
    pub response: Option<Value>,
    /// The JSON body of a final non-2xx, when captured.
    pub error_response: Option<Value>,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub completed_at: DateTime<Utc>,
    /// Time spent waiting for the rate limit (AJO's queue time).
    pub throttle_wait: Duration,
    /// The limits key of the action, when it has one.
    pub limits_key: Option<String>,
}

impl Outcome {
    /// An outcome reached before any HTTP call.
    pub fn early(code: OutcomeCode, error: impl Into<String>) -> Outcome {
        Outcome {
            code,
            attempts: Vec::new(),
            error: Some(error.into()),
            response: None,
            error_response: None,
            first_attempt_at: None,
            completed_at: Utc::now(),
            throttle_wait: Duration::ZERO,
            limits_key: None,
        }
    }

    pub fn attempt_count(&self) -> u32 {
        self.attempts.len() as u32
    }

    /// The status of the last attempt that had one.
    pub fn last_status(&self) -> Option<u16> {
        self.attempts.iter().rev().find_map(|a| match a.status {
            AttemptStatus::Status(s) => Some(s),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_print_and_parse_as_the_spec_names_them() {
        let table = [
            (OutcomeCode::Ok, "ok"),
            (OutcomeCode::Http(503), "http_503"),
            (OutcomeCode::TimedOut, "timedout"),
            (OutcomeCode::Error, "error"),
            (OutcomeCode::Capped, "capped"),
            (OutcomeCode::Expired, "expired"),
            (OutcomeCode::InvalidEvent, "invalid_event"),
            (OutcomeCode::UnknownAction, "unknown_action"),
            (OutcomeCode::RenderError, "render_error"),
        ];
        for (code, text) in table {
            assert_eq!(code.to_string(), text);
            assert_eq!(OutcomeCode::parse(text), Some(code));
        }
        assert_eq!(OutcomeCode::parse("http_99"), None);
        assert_eq!(OutcomeCode::parse("fine"), None);
    }
}
