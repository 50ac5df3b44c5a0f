//! The agent registration API and the admin API (`lunafront daemon --api ADDR`): the HTTP edge.
//! `compat` speaks the endpoints the CloudLunacy deployment agent already calls; `v1` is the
//! native API for administrators and tools (documented in `api/openapi.yaml`). Every change
//! becomes an agent's state fragment (`store`), is reconciled like a file edit, and is answered
//! once live.

pub mod auth;
pub mod batch;
pub mod certs;
pub mod compat;
pub mod ops;
pub mod store;
pub mod v1;

use crate::daemon::reconcile::{Request, Status, Trigger};
use crate::model::address::Cidr;
use crate::model::{Model, Target};
use crate::render::RenderOptions;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ops::{Api, ApiError, Caller};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
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
    pub target: Arc<Target>,
    pub options: RenderOptions,
}

/// Who is at the other end of a connection: the TCP peer, or — when a trusted proxy sent a
/// PROXY protocol header — the client that header names.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The address came from a PROXY protocol header of a trusted proxy.
    pub proxy_protocol: bool,
}

/// The real client of a request: the peer, unless the peer is a trusted proxy (`api.trusted_proxies`)
/// — then the address its PROXY protocol header named, or the rightmost address of
/// `X-Forwarded-For` that is not itself a trusted proxy. A header from anyone else is never
/// believed.
pub fn client_address(peer: &Peer, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let ip = peer.addr.ip();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if peer.proxy_protocol || !is_trusted(ip) {
        return ip;
    }
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else {
            return ip;
        };
        for hop in value.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(hop) => hops.push(hop),
                Err(_) => return ip,
            }
        }
    }
    hops.iter()
        .rev()
        .find(|hop| !is_trusted(**hop))
        .or(hops.first())
        .copied()
        .unwrap_or(ip)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match self.retry_after {
            Some(seconds) => (
                status,
                [(axum::http::header::RETRY_AFTER, seconds.to_string())],
                axum::Json(self),
            )
                .into_response(),
            None => (status, axum::Json(self)).into_response(),
        }
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
        // Each use keeps the token valid for another `token_ttl`.
        let ttl = self
            .api
            .settings()
            .map(|(_, s)| s.token_ttl)
            .unwrap_or(auth::DEFAULT_TOKEN_TTL);
        self.api
            .tokens
            .verify(token, auth::Kind::Agent, Some(ttl))
            .map(Caller::Agent)
            .ok_or_else(|| ApiError::unauthorized("the token is unknown, expired or revoked"))
    }

    /// The real client of a request (see `client_address`).
    pub fn client(&self, peer: &Peer, headers: &HeaderMap) -> IpAddr {
        let trusted = self
            .api
            .settings()
            .map(|(_, s)| s.trusted_proxies)
            .unwrap_or_default();
        client_address(peer, headers, &trusted)
    }

    /// Registration and authentication attempts are limited per client
    /// (`api.limits.client_attempt_burst` at once, `client_attempts_per_minute` a minute; 10
    /// and 30 by default, also while no state has validated yet).
    pub fn limit_client(&self, client: IpAddr) -> Result<(), ApiError> {
        let rate = self
            .api
            .settings()
            .map(|(_, s)| s.limits.client_attempts)
            .unwrap_or_else(|_| ops::Limits::default().client_attempts);
        self.api
            .clients
            .check(&auth::client_key(client), rate)
            .map_err(|wait| {
                ApiError::too_many(
                    format!(
                        "too many registration or authentication attempts from this client ({} at once, {} a minute: api.limits.client_attempt_burst and client_attempts_per_minute)",
                        rate.burst, rate.per_minute
                    ),
                    wait,
                )
            })
    }

    /// An agent's changes are limited (`api.limits`); the administrator's are not.
    pub fn limit_changes(&self, caller: &Caller) -> Result<(), ApiError> {
        let Caller::Agent(agent) = caller else {
            return Ok(());
        };
        let (_, settings) = self.api.settings()?;
        let rate = settings.limits.changes;
        self.api.changes.check(agent, rate).map_err(|wait| {
            ApiError::too_many(
                format!(
                    "agent `{agent}` may make {} changes at once and {} a minute",
                    rate.burst, rate.per_minute
                ),
                wait,
            )
        })
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
                trigger: Trigger::Api,
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

/// The longest string field (characters).
pub const MAX_TEXT: usize = 4096;

/// Reads fields of a JSON body, naming every missing or wrong one. Each rule here is the one
/// `api/openapi.yaml` states (`tests/openapi_grammar.rs` checks the two agree).
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

    /// A required string of 1 to 4096 characters (the document's `minLength`/`maxLength`
    /// count characters, so this does too).
    pub fn text(&mut self, name: &str) -> String {
        match self.body.get(name) {
            None => {
                self.errors.insert(name.into(), "is required".into());
                String::new()
            }
            Some(_) => self.optional_text(name).unwrap_or_default(),
        }
    }

    /// A required agent id (`names::is_identifier`).
    pub fn agent_id(&mut self, name: &str) -> String {
        let id = self.text(name);
        if !id.is_empty() && !crate::model::names::is_identifier(&id) {
            self.errors
                .insert(name.into(), crate::model::names::IDENTIFIER_RULE.into());
        }
        id
    }

    /// An optional string of 1 to 4096 characters: None when absent (or refused, with the
    /// error recorded).
    pub fn optional_text(&mut self, name: &str) -> Option<String> {
        let problem = match self.body.get(name)? {
            Value::String(s) if s.is_empty() => "must not be empty",
            Value::String(s) if s.chars().count() > MAX_TEXT => {
                "is too long (4096 characters at most)"
            }
            Value::String(s) => return Some(s.clone()),
            _ => "must be a string",
        };
        self.errors.insert(name.into(), problem.into());
        None
    }

    /// A TCP port, 1-65535: a JSON integer (`3000`, or `3000.0`, the same number), or a
    /// string of decimal digits (`"3000"`, as Rust reads a `u16`: a leading `+` and zeros too).
    pub fn port(&mut self, name: &str) -> u16 {
        let port = match self.body.get(name) {
            None => {
                self.errors.insert(name.into(), "is required".into());
                return 0;
            }
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= 65535.0)
                        .map(|f| f as u64)
                })
                .filter(|p| (1..=65535).contains(p)),
            Some(Value::String(s)) => s.parse::<u16>().ok().filter(|p| *p > 0).map(u64::from),
            Some(_) => None,
        };
        match port {
            Some(p) => p as u16,
            None => {
                self.errors
                    .insert(name.into(), "must be a TCP port, 1-65535".into());
                0
            }
        }
    }

    /// A boolean at `path` (`options.useTls`): false when absent or null; every object on the
    /// way must be an object (or absent or null).
    pub fn flag(&mut self, path: &[&str]) -> bool {
        let mut v = self.body;
        for (i, p) in path.iter().enumerate() {
            match v {
                Value::Object(map) => match map.get(*p) {
                    Some(next) => v = next,
                    None => return false,
                },
                Value::Null if i > 0 => return false,
                _ => {
                    self.errors
                        .insert(path[..i].join("."), "must be an object".into());
                    return false;
                }
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

/// Renews the certificates the front presents (and warns about agents' own) on the
/// controllable clock: at start, then hourly. A renewed certificate goes live at once.
pub async fn renew_certificates(state: AppState) {
    let mut next = 0.0;
    loop {
        if crate::clock::unix_now() >= next {
            next = crate::clock::unix_now() + 3600.0;
            match state.blocking(|api| api.renew_certificates()).await {
                Ok(true) => {
                    if let Err(e) = state.make_live().await {
                        tracing::error!("renewed certificates: {}", e.message);
                    }
                }
                Ok(false) => {}
                Err(e) if e.status == 503 => next = 0.0, // the state is not loaded yet
                Err(e) => tracing::error!("renewing certificates: {}", e.message),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
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
    /// The daemon's own HTTP listener (health, metrics): never a route target.
    pub daemon_listen: SocketAddr,
    /// With `--git`: changes are committed and pushed through this clone.
    pub git: Option<Arc<crate::git::Repo>>,
    /// Where a change's validated state is handed to the reconcile it asks for.
    pub prevalidated: crate::daemon::reconcile::Prevalidated,
    /// Held by the store while a change is checked and written, and by the reconcile while it
    /// reads the state folder (with `--git`, the clone's lock): a reconcile never reads a batch
    /// of fragments half written.
    pub state_lock: Arc<Mutex<()>>,
}

/// Opens the API's stores (tokens, CA) and its router.
pub fn build(
    options: &ApiOptions,
    state_path: PathBuf,
    target_name: String,
    target: Target,
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
        clients: auth::RateLimiter::new(10_000),
        changes: auth::RateLimiter::new(10_000),
        reloads: auth::RateLimiter::new(10_000),
        ca: certs::Ca::open_or_create(&options.data_dir)?,
        // The store shares the reconcile's lock (with git, the clone's: a change is written,
        // committed and pushed while the clone stays where it is).
        store: store::Store::with_lock(&state_path, shared.state_lock),
        model: shared.model,
        prevalidated: shared.prevalidated,
        batches: Default::default(),
        agent_locks: Default::default(),
        data_dir: options.data_dir.clone(),
        front: vec![options.listen, shared.daemon_listen],
        binds: target.fleet().binds.clone(),
        git: shared.git,
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

/// Reads the PROXY protocol header (v1 or v2) a trusted proxy starts its connection with, if
/// it sends one: the client it names. Anything else is left unread for HTTP.
async fn proxy_header(stream: &mut tokio::net::TcpStream) -> Result<Option<SocketAddr>, String> {
    use ppp::{HeaderResult, PartialResult};
    use tokio::io::AsyncReadExt;
    const V1: &[u8] = b"PROXY ";
    const V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
    let mut buf = [0u8; 536];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| "the PROXY protocol header did not arrive in time".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before its first request".into());
        }
        let seen = &buf[..n];
        let maybe = |sig: &[u8]| sig.starts_with(&seen[..seen.len().min(sig.len())]);
        if !maybe(V1) && !maybe(V2) {
            return Ok(None);
        }
        let header = HeaderResult::parse(seen);
        if header.is_incomplete() && n < buf.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let (len, source) = match header {
            HeaderResult::V1(Ok(h)) => (
                h.header.len(),
                match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Unknown => None,
                },
            ),
            HeaderResult::V2(Ok(h)) => (
                h.len(),
                match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v2::Addresses::IPv6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    _ => None,
                },
            ),
            _ => return Err("a malformed PROXY protocol header".into()),
        };
        let mut header = vec![0u8; len];
        stream
            .read_exact(&mut header)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(source);
    }
}

/// Serves the API on `listener` until `shutdown` resolves. Connections are HTTP/1.1 with a
/// limit on how long the headers may take to arrive. A connection from a trusted proxy may
/// start with a PROXY protocol header naming the real client.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    // Every task here holds the reconcile loop's sender: all end with the API, or the daemon
    // would wait for them forever when it stops.
    let renew = tokio::spawn(renew_certificates(state.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    let api = state.api.clone();
    let app = router(state);
    tokio::pin!(shutdown);
    loop {
        // Connections that ended are forgotten as they go.
        while tasks.try_join_next().is_some() {}
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
        let app = app.clone();
        let trusted = api
            .settings()
            .map(|(_, s)| s.trusted_proxies)
            .unwrap_or_default();
        tasks.spawn(async move {
            let mut stream = stream;
            let mut peer = Peer {
                addr: peer,
                proxy_protocol: false,
            };
            if trusted.iter().any(|n| n.contains(peer.addr.ip())) {
                match proxy_header(&mut stream).await {
                    Ok(Some(client)) => {
                        peer = Peer {
                            addr: client,
                            proxy_protocol: true,
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("api connection from {}: {e}", peer.addr);
                        return;
                    }
                }
            }
            let service = TowerToHyperService::new(app.layer(axum::Extension(peer)));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = connection.await;
        });
    }
    renew.abort();
    // Requests under way get a moment to be answered; idle connections are then closed.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}
