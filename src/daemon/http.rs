//! The daemon's HTTP endpoints (I/O edge): `GET /` (the status page), `GET /health` (liveness: the daemon runs and
//! HAProxy answers), `GET /ready` (readiness: the last reconcile succeeded too), `GET /status`,
//! `GET /metrics`, `POST /reconcile`, `POST /approve?revision=R` (a change the delete guard
//! holds). Handlers never touch HAProxy themselves: a reconcile goes through the reconcile loop
//! like any other change.

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
        .route("/", get(status_page))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reconcile", post(reconcile))
        .route("/approve", post(approve))
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

/// Whether HAProxy's runtime API answers.
async fn haproxy_answers(app: &AppState) -> bool {
    let target = app.target.clone();
    tokio::task::spawn_blocking(move || {
        RuntimeApi::new(&target.runtime_socket).worker_pid().is_ok()
    })
    .await
    .unwrap_or(false)
}

fn verdict(reasons: Vec<String>, bad: &str) -> Response {
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": bad, "reasons": reasons})),
        )
            .into_response()
    }
}

/// Liveness: the daemon answers and HAProxy answers. A state that does not validate is not a
/// reason to restart a daemon that keeps serving the last good one: that is `/ready`'s job.
async fn health(State(app): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    if !haproxy_answers(&app).await {
        reasons.push("HAProxy's runtime API does not answer".to_string());
    }
    verdict(reasons, "unhealthy")
}

/// Readiness: HAProxy answers and the last reconcile succeeded (it serves the desired state).
async fn ready(State(app): State<AppState>) -> Response {
    let last = app.status.lock().expect("status").last_reconcile.clone();
    let mut reasons = Vec::new();
    match &last {
        None => reasons.push("no reconcile has finished yet".to_string()),
        // A held change is waiting for confirmation, not a failure: HAProxy serves the last
        // applied state as it should (and a probe restarting the daemon would only restart
        // the wait).
        Some(o) if !o.ok() && o.result != "held" => reasons.push(format!(
            "last reconcile: {}: {}",
            o.result,
            o.message.clone().unwrap_or_default()
        )),
        Some(_) => {}
    }
    if !haproxy_answers(&app).await {
        reasons.push("HAProxy's runtime API does not answer".to_string());
    }
    verdict(reasons, "not ready")
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

/// The HTML status page (`status_page`): read off the request thread, HAProxy's socket and
/// the files being blocking I/O.
async fn status_page(State(app): State<AppState>) -> Response {
    let status = app.status.lock().expect("status").clone();
    let acme = app.acme.as_ref().map(|a| a.status_json());
    let target = app.target.clone();
    let html = tokio::task::spawn_blocking(move || {
        super::status_page::render(&super::status_page::collect(&target, &status, acme))
    })
    .await
    .unwrap_or_else(|e| format!("status page: {e}"));
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render() + &app.acme.as_ref().map(|a| a.metrics()).unwrap_or_default(),
    )
        .into_response()
}

async fn reconcile(State(app): State<AppState>) -> Response {
    answer_reconcile(&app).await
}

#[derive(serde::Deserialize)]
struct Approval {
    revision: Option<String>,
}

/// Approves the change the delete guard holds, named by its revision (from `/status`, so that
/// what is approved is what was looked at), and applies it at once.
async fn approve(
    State(app): State<AppState>,
    axum::extract::Query(approval): axum::extract::Query<Approval>,
) -> Response {
    let conflict =
        |error: String| (StatusCode::CONFLICT, Json(json!({ "error": error }))).into_response();
    let Some(revision) = approval.revision else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "name the change you approve: POST /approve?revision=<held.revision from /status>"})),
        )
            .into_response();
    };
    {
        let mut status = app.status.lock().expect("status");
        match &status.held {
            None => return conflict("no change is held".into()),
            Some(held) if held.revision != revision => {
                return conflict(format!(
                    "the change held is revision {}, not {revision}: the state changed since; read /status again",
                    held.revision
                ));
            }
            Some(_) => status.approved = Some(revision.clone()),
        }
    }
    tracing::info!(revision, "POST /approve: the held change is approved");
    answer_reconcile(&app).await
}

async fn answer_reconcile(app: &AppState) -> Response {
    match app.reconcile(Trigger::Request).await {
        Some(outcome) => {
            let code = match outcome.result {
                "applied" | "unchanged" => StatusCode::OK,
                "invalid" | "partial" => StatusCode::UNPROCESSABLE_ENTITY,
                "held" => StatusCode::CONFLICT,
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
