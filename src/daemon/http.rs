//! The daemon's HTTP endpoints (I/O edge): `GET /` (the status page), `GET /health` (liveness: the daemon runs and
//! HAProxy answers), `GET /ready` (readiness: the last reconcile succeeded too), `GET /status`,
//! `GET /metrics`, `POST /reconcile`, `POST /approve?revision=R` (a change the delete guard
//! holds), and with `--git` `POST /hooks/git` (a forge's push webhook). Handlers never touch
//! HAProxy themselves: a reconcile goes through the reconcile loop like any other change, and
//! a fetch through the git thread.

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
    /// The local HAProxy, when the daemon drives one (a fleet's members report in `/status`).
    pub target: Option<Arc<HaproxyTarget>>,
    pub git: Option<Arc<GitHook>>,
    /// ACME certificates: each one's expiry and last error.
    pub acme: Option<Arc<crate::acme::manager::Shared>>,
}

/// Largest webhook body read (forges' push events are a few KiB; 413 beyond).
pub const HOOK_BODY_LIMIT: usize = 1024 * 1024;

/// What `/hooks/git` and `/reconcile` need of the git thread.
pub struct GitHook {
    asks: Mutex<Sender<crate::git::sync::FetchRequest>>,
    /// None: the hook is off (404).
    secret: Option<String>,
    /// Failed attempts per client, and accepted hooks in all.
    failures: crate::api::auth::RateLimiter<std::net::IpAddr>,
    accepted: crate::api::auth::RateLimiter<()>,
}

/// Hooks with a wrong or missing signature, per client: 10 at once, then 10 a minute.
const HOOK_FAILURES: crate::api::auth::Rate = crate::api::auth::Rate {
    per_minute: 10.0,
    burst: 10.0,
};
/// Accepted hooks (each asks for a fetch; those that arrive during one share the next):
/// 30 at once, then 60 a minute.
const HOOKS_ACCEPTED: crate::api::auth::Rate = crate::api::auth::Rate {
    per_minute: 60.0,
    burst: 30.0,
};

impl GitHook {
    pub fn new(asks: Sender<crate::git::sync::FetchRequest>, secret: Option<String>) -> GitHook {
        GitHook {
            asks: Mutex::new(asks),
            secret,
            failures: crate::api::auth::RateLimiter::new(10_000),
            accepted: crate::api::auth::RateLimiter::new(1),
        }
    }

    /// Asks for a fetch; with `wait`, returns once it is done (and what it brought reconciled).
    async fn fetch(&self, wait: bool) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self
            .asks
            .lock()
            .ok()
            .map(|asks| {
                asks.send(crate::git::sync::FetchRequest {
                    reply: wait.then_some(tx),
                })
                .is_ok()
            })
            .unwrap_or(false);
        if sent && wait {
            let _ = rx.await;
        }
    }
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
        .route(
            "/hooks/git",
            post(git_hook).layer(axum::extract::DefaultBodyLimit::max(HOOK_BODY_LIMIT)),
        )
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

/// Whether HAProxy's runtime API answers (a fleet's members are judged by their rollouts).
async fn haproxy_answers(app: &AppState) -> bool {
    let Some(target) = app.target.clone() else {
        return true;
    };
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
    let haproxy = match app.target.clone() {
        Some(target) => Some(
            tokio::task::spawn_blocking(move || haproxy_info(&target))
                .await
                .unwrap_or_default(),
        ),
        None => None,
    };
    let status = app.status.lock().expect("status").clone();
    let mut body = serde_json::to_value(&status).expect("status serializes");
    if let Some(haproxy) = haproxy {
        body["haproxy"] = haproxy;
    }
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
        super::status_page::render(&super::status_page::collect(
            target.as_deref(),
            &status,
            acme,
        ))
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

/// With `--git`, fetches first: what the remote holds now is what gets reconciled.
async fn reconcile(State(app): State<AppState>) -> Response {
    if let Some(git) = &app.git {
        git.fetch(true).await;
    }
    answer_reconcile(&app).await
}

/// A forge's push webhook: authenticated by the shared secret (see `git::hook`), rate limited,
/// answered at once (202) while the fetch runs — forges give up after about ten seconds.
async fn git_hook(
    State(app): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let answer = |code: StatusCode, body: serde_json::Value| (code, Json(body)).into_response();
    let Some(git) = app.git.clone() else {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"error": "the daemon does not follow a git remote (--git)"}),
        );
    };
    let Some(secret) = git.secret.as_deref() else {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"error": "the git hook is off: start the daemon with --git-hook-secret-file FILE"}),
        );
    };
    let client = crate::api::auth::client_key(peer.ip());
    let too_many = |wait: std::time::Duration, what: &str| {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, wait.as_secs().max(1).to_string())],
            Json(json!({"error": what})),
        )
            .into_response()
    };
    if let Err(wait) = git.failures.peek(&client, HOOK_FAILURES) {
        return too_many(
            wait,
            "too many hooks with a wrong signature from this client",
        );
    }
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!("the body is over {HOOK_BODY_LIMIT} bytes")}),
            );
        }
        Err(e) => return answer(StatusCode::BAD_REQUEST, json!({"error": e.body_text()})),
    };
    if let Err(e) = crate::git::hook::authenticate(secret, &headers, &body) {
        let _ = git.failures.check(&client, HOOK_FAILURES);
        tracing::warn!(client = %peer.ip(), "POST /hooks/git refused: {e}");
        return answer(StatusCode::UNAUTHORIZED, json!({"error": e.to_string()}));
    }
    if let Err(wait) = git.accepted.check(&(), HOOKS_ACCEPTED) {
        return too_many(
            wait,
            "too many hooks; the next fetch is on its interval anyway",
        );
    }
    git.fetch(false).await;
    answer(StatusCode::ACCEPTED, json!({"status": "fetching"}))
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
