//! The demo's mock provider: one loopback HTTP server standing in for the
//! example actions' providers, behaving like real ones: mostly 2xx, some 429
//! with `Retry-After`, some 5xx that recover on retry, one slow endpoint, and
//! the token endpoints of the OAuth2 and custom-auth examples.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Provider {
    /// Idempotency keys that already got their one simulated failure.
    failed_once: Mutex<HashSet<String>>,
    tokens_issued: AtomicU64,
    calls: AtomicU64,
}

/// Starts the provider on 127.0.0.1 (a free port); runs until `shutdown`.
pub async fn start(shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let state = Arc::new(Provider::default());
    let app = Router::new()
        .route("/auth.mailer.example.com/oauth2/token", post(oauth2_token))
        .route("/push.example.com/api/v2/auth/token", post(custom_token))
        .fallback(any(call))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(addr)
}

async fn oauth2_token(State(p): State<Arc<Provider>>, body: String) -> Response {
    if !body.contains("grant_type=client_credentials") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    let n = p.tokens_issued.fetch_add(1, Ordering::Relaxed);
    Json(json!({"access_token": format!("demo-oauth-{n}"), "token_type": "Bearer", "expires_in": 3600})).into_response()
}

async fn custom_token(State(p): State<Arc<Provider>>) -> Response {
    let n = p.tokens_issued.fetch_add(1, Ordering::Relaxed);
    Json(json!({"data": {"jwt": format!("demo-jwt-{n}"), "expiresIn": 900}})).into_response()
}

/// A stable pseudo-random number in [0, 100) for an idempotency key, so the
/// same event always gets the same treatment.
fn dice(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) % 100
}

async fn call(
    State(p): State<Arc<Provider>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = p.calls.fetch_add(1, Ordering::Relaxed);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let path = uri.path();
    if serde_json::from_slice::<serde_json::Value>(&body).is_err() && !body.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "body is not JSON"})),
        )
            .into_response();
    }
    let roll = dice(&key);
    let first_time = || {
        p.failed_once
            .lock()
            .map(|mut s| s.insert(key.clone()))
            .unwrap_or(false)
    };
    if path.starts_with("/sms.example.com") {
        // Rate-limited now and then: 429 with Retry-After, once per event.
        if roll < 3 && first_time() {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                Json(json!({"error": "slow down"})),
            )
                .into_response();
        }
        return Json(json!({"message_id": format!("m-{n}"), "status": "queued"})).into_response();
    }
    if path.starts_with("/api.mailer.example.com") {
        // A flaky backend: 503 on the first attempt of a few events.
        if roll < 4 && first_time() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "backend unavailable"})),
            )
                .into_response();
        }
        if headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| !v.starts_with("Bearer demo-oauth-"))
        {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid token"})),
            )
                .into_response();
        }
        return (
            StatusCode::ACCEPTED,
            Json(json!({"id": format!("email-{n}")})),
        )
            .into_response();
    }
    if path.starts_with("/push.example.com") {
        // The slow one.
        tokio::time::sleep(Duration::from_millis(20 + roll % 30)).await;
        return Json(json!({"notification_id": format!("push-{n}")})).into_response();
    }
    if path.starts_with("/crm.example.com") {
        // A permanent rejection for a few.
        if roll < 1 {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": "unknown stage"})),
            )
                .into_response();
        }
        return StatusCode::NO_CONTENT.into_response();
    }
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "no such endpoint"})),
    )
        .into_response()
}
