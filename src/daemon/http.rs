//! The daemon's HTTP endpoints (I/O edge): `GET /health`, `GET /status`, `GET /metrics`,
//! `POST /reconcile`. Handlers never touch HAProxy themselves: a reconcile goes through the
//! reconcile loop like any other change.

use super::metrics::Metrics;
use super::reconcile::{Outcome, Request, Status, Trigger};
use crate::model::HaproxyTarget;
use crate::target::haproxy::{process, socket::RuntimeApi};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct AppState {
    pub status: Arc<Mutex<Status>>,
    pub metrics: Arc<Metrics>,
    pub requests: Arc<Mutex<Sender<Request>>>,
    pub target: Arc<HaproxyTarget>,
    /// ACME certificates: each one's expiry and last error.
    pub acme: Option<Arc<crate::acme::manager::Shared>>,
}

impl AppState {
    /// Asks the reconcile loop for a reconcile and waits for its outcome.
    pub async fn reconcile(&self, trigger: Trigger) -> Option<Outcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.requests
            .lock()
            .ok()?
            .send(Request {
                trigger,
                reply: Some(tx),
            })
            .ok()?;
        rx.await.ok()
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reconcile", post(reconcile))
        .with_state(state)
}

/// What HAProxy reports: its master and workers, and whether the runtime API answers.
fn haproxy_info(target: &HaproxyTarget) -> serde_json::Value {
    let proc = process::running(target);
    let worker = RuntimeApi::new(&target.runtime_socket).worker_pid().ok();
    json!({
        "running": proc.is_some() && worker.is_some(),
        "master_pid": proc.as_ref().map(|p| p.master_pid),
        "workers": proc.as_ref().map(|p| p.workers.iter().map(|w| json!({"pid": w.pid, "reloads": w.reloads})).collect::<Vec<_>>()),
        "reloads": proc.as_ref().map(|p| p.reloads),
        "failed_reloads": proc.as_ref().map(|p| p.failed),
        "runtime_api_worker": worker,
    })
}

async fn health(State(app): State<AppState>) -> Response {
    let target = app.target.clone();
    let answers = tokio::task::spawn_blocking(move || {
        RuntimeApi::new(&target.runtime_socket).worker_pid().is_ok()
    })
    .await
    .unwrap_or(false);
    let last = app.status.lock().expect("status").last_reconcile.clone();
    let mut reasons = Vec::new();
    match &last {
        None => reasons.push("no reconcile has finished yet".to_string()),
        Some(o) if !o.ok() => reasons.push(format!(
            "last reconcile: {}: {}",
            o.result,
            o.message.clone().unwrap_or_default()
        )),
        Some(_) => {}
    }
    if !answers {
        reasons.push("HAProxy's runtime API does not answer".to_string());
    }
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unhealthy", "reasons": reasons})),
        )
            .into_response()
    }
}

async fn status(State(app): State<AppState>) -> Response {
    let target = app.target.clone();
    let haproxy = tokio::task::spawn_blocking(move || haproxy_info(&target))
        .await
        .unwrap_or_default();
    let status = app.status.lock().expect("status").clone();
    let mut body = serde_json::to_value(&status).expect("status serializes");
    body["haproxy"] = haproxy;
    if let Some(acme) = &app.acme {
        body["acme"] = acme.status_json();
    }
    Json(body).into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render() + &app.acme.as_ref().map(|a| a.metrics()).unwrap_or_default(),
    )
        .into_response()
}

async fn reconcile(State(app): State<AppState>) -> Response {
    match app.reconcile(Trigger::Request).await {
        Some(outcome) => {
            let code = match outcome.result {
                "applied" | "unchanged" => StatusCode::OK,
                "invalid" | "partial" => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (code, Json(outcome)).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "the daemon is shutting down"})),
        )
            .into_response(),
    }
}
