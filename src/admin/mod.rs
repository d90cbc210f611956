//! The admin HTTP port (SPEC §7): `/metrics`, `/healthz`, `/readyz`, `/actions`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Holds the current action set (it changes on reload).
    pub dispatcher: Arc<Dispatcher>,
    /// Set once the consumer has joined its group.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/actions", get(actions))
        .with_state(state)
}

/// Binds `listen` and serves until `shutdown`; returns the bound address.
pub async fn serve(
    listen: &str,
    state: AdminState,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("admin.listen {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "admin server stopped");
        }
    });
    tracing::info!(%addr, "admin port: /metrics /healthz /readyz /actions");
    Ok(addr)
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the consumer has not joined its group yet\n",
        )
    }
}

async fn actions(State(state): State<AdminState>) -> impl IntoResponse {
    let actions = state.dispatcher.actions();
    let list: Vec<_> = actions
        .iter()
        .map(|a| serde_json::json!({ "id": a.id, "file": a.file.display().to_string(), "hash": a.hash }))
        .collect();
    Json(list)
}
