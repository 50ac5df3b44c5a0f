//! The agent registration API and the admin API (`lunafront daemon --api ADDR`): the HTTP edge.
//! `compat` speaks the endpoints the CloudLunacy deployment agent already calls; `v1` is the
//! native API for administrators and tools (documented in `api/openapi.yaml`). Every change
//! becomes an agent's state fragment (`store`), is reconciled like a file edit, and is answered
//! once live.

pub mod auth;
pub mod certs;
pub mod compat;
pub mod ops;
pub mod store;
pub mod v1;

use crate::daemon::reconcile::{Request, Status, Trigger};
use crate::model::{HaproxyTarget, Model};
use crate::render::RenderOptions;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ops::{Api, ApiError, Caller};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 64 * 1024;
/// A request (headers excepted) must be answered within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The request headers must arrive within this (slow clients cannot hold connections).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ApiOptions {
    pub listen: SocketAddr,
    /// File holding the admin token; else `LUNAFRONT_ADMIN_TOKEN`; else no admin.
    pub admin_token_file: Option<PathBuf>,
    /// Tokens, the private CA and issued certificates (default `<target state_dir>/api`).
    pub data_dir: PathBuf,
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub api: Arc<Api>,
    pub requests: Arc<Mutex<Sender<Request>>>,
    pub status: Arc<Mutex<Status>>,
    pub state_path: PathBuf,
    pub target_name: String,
    pub target: Arc<HaproxyTarget>,
    pub options: RenderOptions,
}

/// The client's address, from the connection (never from a header such as X-Forwarded-For).
#[derive(Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self)).into_response()
    }
}

impl AppState {
    /// Who is calling: the admin token, or an agent's unexpired token (401 otherwise).
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("send `Authorization: Bearer <token>`"))?;
        if self.api.admin.matches(token) {
            return Ok(Caller::Admin);
        }
        self.api
            .tokens
            .verify(token, auth::Kind::Agent)
            .map(Caller::Agent)
            .ok_or_else(|| ApiError::unauthorized("the token is unknown, expired or revoked"))
    }

    pub fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.api.admin.configured() {
            return Err(ApiError::forbidden(
                "no admin token is configured (LUNAFRONT_ADMIN_TOKEN or --admin-token-file)",
            ));
        }
        self.caller(headers)?.must_be_admin()
    }

    /// Runs blocking API work off the async threads.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Api) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let api = self.api.clone();
        tokio::task::spawn_blocking(move || work(&api))
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("the request failed: {e}"))))
    }

    /// Reconciles now (no file-watch round trip) and waits until the change is live.
    pub async fn make_live(&self) -> Result<(), ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.requests
            .lock()
            .map_err(|_| ApiError::unavailable("the daemon is stopping"))?
            .send(Request {
                trigger: Trigger::Request,
                reply: Some(tx),
            })
            .map_err(|_| ApiError::unavailable("the daemon is stopping"))?;
        let outcome = rx
            .await
            .map_err(|_| ApiError::unavailable("the daemon is stopping"))?;
        match outcome.result {
            "applied" | "unchanged" | "partial" => Ok(()),
            _ => Err(ApiError::new(
                503,
                "not_live",
                format!(
                    "the change is saved but not live: {}",
                    outcome
                        .message
                        .unwrap_or_else(|| outcome.result.to_string())
                ),
            )),
        }
    }
}

/// A JSON body: 413 over the limit, 400 when it is not a JSON object.
pub fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            413,
            "payload_too_large",
            format!("the body is over {BODY_LIMIT} bytes"),
        ),
        _ => ApiError::new(400, "invalid_request", e.body_text()),
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(ApiError::new(
            400,
            "invalid_request",
            "the body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            400,
            "invalid_request",
            format!("the body is not JSON: {e}"),
        )),
    }
}

/// Reads fields of a JSON body, naming every missing or wrong one.
pub struct Fields<'a> {
    body: &'a Value,
    pub errors: std::collections::BTreeMap<String, String>,
}

impl<'a> Fields<'a> {
    pub fn new(body: &'a Value) -> Fields<'a> {
        Fields {
            body,
            errors: Default::default(),
        }
    }

    pub fn text(&mut self, name: &str) -> String {
        match self.body.get(name) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 4096 => s.clone(),
            Some(Value::String(s)) if s.is_empty() => {
                self.errors.insert(name.into(), "must not be empty".into());
                String::new()
            }
            Some(Value::String(_)) => {
                self.errors.insert(name.into(), "is too long".into());
                String::new()
            }
            Some(_) => {
                self.errors.insert(name.into(), "must be a string".into());
                String::new()
            }
            None => {
                self.errors.insert(name.into(), "is required".into());
                String::new()
            }
        }
    }

    pub fn port(&mut self, name: &str) -> u16 {
        match self.body.get(name) {
            Some(Value::Number(n)) if n.as_u64().is_some_and(|p| (1..=65535).contains(&p)) => {
                n.as_u64().unwrap_or(0) as u16
            }
            Some(Value::String(s)) if s.parse::<u16>().is_ok_and(|p| p > 0) => {
                s.parse().unwrap_or(0)
            }
            None => {
                self.errors.insert(name.into(), "is required".into());
                0
            }
            _ => {
                self.errors
                    .insert(name.into(), "must be a TCP port, 1-65535".into());
                0
            }
        }
    }

    /// A boolean at `path` (`options.useTls`), false when absent.
    pub fn flag(&mut self, path: &[&str]) -> bool {
        let mut v = self.body;
        for p in path {
            match v.get(p) {
                Some(next) => v = next,
                None => return false,
            }
        }
        match v {
            Value::Bool(b) => *b,
            Value::Null => false,
            _ => {
                self.errors
                    .insert(path.join("."), "must be true or false".into());
                false
            }
        }
    }

    pub fn done(self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::fields(self.errors))
        }
    }
}

pub fn router(state: AppState) -> Router {
    compat::routes()
        .merge(v1::routes())
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(timeout))
        .with_state(state)
}

async fn timeout(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(408, "timeout", "the request took too long").into_response(),
    }
}

/// The shared state the daemon builds the API from.
pub struct Shared {
    pub model: Arc<Mutex<Option<Arc<Model>>>>,
    pub requests: Sender<Request>,
    pub status: Arc<Mutex<Status>>,
}

/// Opens the API's stores (tokens, CA) and its router.
pub fn build(
    options: &ApiOptions,
    state_path: PathBuf,
    target_name: String,
    target: HaproxyTarget,
    render: RenderOptions,
    shared: Shared,
) -> Result<AppState, String> {
    use std::os::unix::fs::DirBuilderExt;
    if !state_path.is_dir() {
        return Err(format!(
            "--api needs a state folder (agents' files go into {}/agents.d)",
            state_path.display()
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&options.data_dir)
        .map_err(|e| format!("{}: {e}", options.data_dir.display()))?;
    let api = Api {
        tokens: auth::TokenStore::open(&options.data_dir).map_err(|e| e.to_string())?,
        admin: auth::AdminToken::load(options.admin_token_file.as_deref())?,
        limiter: auth::RateLimiter::new(30, 10),
        ca: certs::Ca::open_or_create(&options.data_dir)?,
        store: store::Store::new(&state_path),
        model: shared.model,
        data_dir: options.data_dir.clone(),
    };
    Ok(AppState {
        api: Arc::new(api),
        requests: Arc::new(Mutex::new(shared.requests)),
        status: shared.status,
        state_path,
        target_name,
        target: Arc::new(target),
        options: render,
    })
}

/// Serves the API on `listener` until `shutdown` resolves. Connections are HTTP/1.1 with a
/// limit on how long the headers may take to arrive.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("api accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone().layer(axum::Extension(Peer(peer))));
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = connection.await;
        });
    }
}
