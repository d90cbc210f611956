//! journey-actions: executes the custom actions of customer-journey
//! orchestration. An action event names an action definition; the
//! definition says how to render and send the provider call.
//!
//! The path of one event, in module order: [`event`] (parse) →
//! [`action`] (the definition it names) → [`render`] (the HTTP request) →
//! [`dispatch`] (limits, auth, calls, retries → [`dispatch::Outcome`]).

pub mod action;
pub mod cli;
pub mod dispatch;
pub mod event;
pub mod render;
pub mod settings;
pub mod telemetry;
pub mod units;
