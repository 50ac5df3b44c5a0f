//! The endpoints the CloudLunacy deployment agent already calls: same paths, fields and status
//! codes, answered from lunafront's state.

use super::ops::{ApiError, Caller};
use super::{AppState, Fields, Peer, json_body};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use serde_json::json;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/agent/register", post(register))
        .route("/api/agents/register", post(register))
        .route("/api/agents/authenticate", post(authenticate))
        .route("/api/config/{agent_id}", get(config))
        .route("/api/proxy/http", post(add_http_route))
        .route("/api/proxy/routes", get(own_routes))
        .route("/api/proxy/agents/{agent_id}", get(agent_routes))
        .route("/api/proxy", get(all_routes).delete(delete_route))
        .route("/api/mongodb/register", post(register_mongodb))
        .route("/api/certificates/mongodb-ca", get(mongodb_ca))
        .route("/health", get(health))
}

type Result<T> = std::result::Result<T, ApiError>;

fn rate_limited(app: &AppState, peer: Peer) -> Result<()> {
    if app.api.limiter.allow(peer.0.ip()) {
        Ok(())
    } else {
        Err(ApiError::new(
            429,
            "rate_limited",
            "too many registration or authentication attempts from this address; wait a minute",
        ))
    }
}

fn certificates(app: &AppState, issued: Option<&super::certs::Issued>) -> serde_json::Value {
    json!({
        "caCert": app.api.ca.cert_pem,
        "serverCert": issued.map(|i| i.cert_pem.clone()),
        "serverKey": issued.and_then(|i| i.key_pem.clone()),
    })
}

async fn register(
    State(app): State<AppState>,
    Extension(peer): Extension<Peer>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    rate_limited(&app, peer)?;
    let body = json_body(body)?;
    let mut f = Fields::new(&body);
    let (agent, key, ip) = (f.text("agentId"), f.text("agentKey"), f.text("targetIp"));
    let csr = body.get("csr").and_then(|v| v.as_str()).map(str::to_string);
    f.done()?;
    let agent2 = agent.clone();
    let (token, ip, mut issued) = app
        .blocking(move |api| api.register(&agent2, &key, &ip))
        .await?;
    if let Some(csr) = csr {
        let (_, settings) = app.api.settings()?;
        let domain = settings
            .mongodb_domain
            .ok_or_else(|| ApiError::unavailable("the state sets no `api.mongodb_domain`"))?;
        let signed = app
            .api
            .ca
            .sign_csr(&csr, &format!("{agent}.{domain}"))
            .map_err(|e| ApiError::fields([("csr".to_string(), e)].into()))?;
        app.api
            .ca
            .keep(&agent, &signed)
            .map_err(ApiError::internal)?;
        issued = Some(signed);
    }
    app.make_live().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "success": true,
            "agentId": agent,
            "token": token,
            "targetIp": ip.to_string(),
            "certificates": certificates(&app, issued.as_ref()),
        })),
    )
        .into_response())
}

async fn authenticate(
    State(app): State<AppState>,
    Extension(peer): Extension<Peer>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    rate_limited(&app, peer)?;
    let body = json_body(body)?;
    let mut f = Fields::new(&body);
    let (agent, key) = (f.text("agentId"), f.text("agentKey"));
    f.done()?;
    let token = app
        .blocking(move |api| api.authenticate(&agent, &key))
        .await?;
    Ok(Json(json!({"success": true, "token": token})))
}

async fn config(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let caller = app.caller(&headers)?;
    caller.must_act_for(&agent)?;
    let agent2 = agent.clone();
    let (settings, issued) = app
        .blocking(move |api| {
            let (model, settings) = api.settings()?;
            let known = model.agents.contains_key(&agent2)
                || api
                    .store
                    .read(&agent2)
                    .ok()
                    .flatten()
                    .is_some_and(|f| f.agents.contains_key(&agent2));
            if !known {
                return Err(ApiError::not_found(format!(
                    "agent `{agent2}` is not registered"
                )));
            }
            let issued = api.certificate(&agent2, &settings)?;
            Ok((settings, issued))
        })
        .await?;
    Ok(Json(json!({
        "success": true,
        "agentId": agent,
        "domains": { "app": settings.apps_domain, "mongodb": settings.mongodb_domain },
        "certificates": certificates(&app, issued.as_ref()),
    })))
}

async fn add_http_route(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    let caller = app.caller(&headers)?;
    let body = json_body(body)?;
    let mut f = Fields::new(&body);
    let (agent, subdomain, url) = (f.text("agentId"), f.text("subdomain"), f.text("targetUrl"));
    let (use_tls, check) = (
        f.flag(&["options", "useTls"]),
        f.flag(&["options", "check"]),
    );
    f.done()?;
    let route = app
        .blocking(move |api| api.add_http_route(&caller, &agent, &subdomain, &url, use_tls, check))
        .await?;
    app.make_live().await?;
    Ok(Json(json!({
        "success": true,
        "agentId": route.agent_id,
        "subdomain": route.subdomain,
        "domain": route.domain,
        "targetUrl": route.target_url,
    })))
}

async fn routes_of(app: &AppState, agent: Option<String>) -> Result<Json<serde_json::Value>> {
    let routes = app
        .blocking(move |api| api.routes(agent.as_deref()))
        .await?;
    Ok(Json(json!({"success": true, "routes": routes})))
}

async fn own_routes(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>> {
    match app.caller(&headers)? {
        Caller::Agent(agent) => routes_of(&app, Some(agent)).await,
        Caller::Admin => routes_of(&app, None).await,
    }
}

async fn agent_routes(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> Result<Json<serde_json::Value>> {
    app.caller(&headers)?.must_act_for(&agent)?;
    routes_of(&app, Some(agent)).await
}

async fn all_routes(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>> {
    app.admin(&headers)?;
    routes_of(&app, None).await
}

async fn delete_route(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    let caller = app.caller(&headers)?;
    let body = json_body(body)?;
    let mut f = Fields::new(&body);
    let agent = f.text("agentId");
    let kind = body
        .get("type")
        .and_then(|v| v.as_str())
        .unwrap_or("http")
        .to_string();
    let subdomain = if kind == "mongodb" {
        body.get("subdomain")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    } else {
        f.text("subdomain")
    };
    f.done()?;
    let (agent2, kind2) = (agent.clone(), kind.clone());
    let domain = app
        .blocking(move |api| api.delete_route(&caller, &agent2, &subdomain, &kind2))
        .await?;
    app.make_live().await?;
    Ok(Json(
        json!({"success": true, "agentId": agent, "domain": domain, "type": kind, "message": format!("route {domain} removed")}),
    ))
}

async fn register_mongodb(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    let caller = app.caller(&headers)?;
    let body = json_body(body)?;
    let mut f = Fields::new(&body);
    let (agent, ip, port) = (f.text("agentId"), f.text("targetIp"), f.port("targetPort"));
    let use_tls = body
        .get("useTls")
        .map(|v| v.as_bool().unwrap_or(false))
        .unwrap_or(true);
    f.done()?;
    let route = app
        .blocking(move |api| api.add_mongodb(&caller, &agent, &ip, port, use_tls))
        .await?;
    app.make_live().await?;
    let mut body = serde_json::to_value(&route).expect("serializes");
    body["success"] = json!(true);
    Ok(Json(body))
}

async fn mongodb_ca(State(app): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        app.api.ca.cert_pem.clone(),
    )
        .into_response()
}

async fn health(State(app): State<AppState>) -> Json<serde_json::Value> {
    let model = app.api.model.lock().expect("model").is_some();
    Json(json!({"success": true, "status": "ok", "stateLoaded": model}))
}
