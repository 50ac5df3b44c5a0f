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
        .route("/api/agent/authenticate", post(authenticate))
        .route("/api/proxy/{db_type}", post(add_database_route))
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
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let client = app.client(&peer, &headers);
    app.limit_client(client)?;
    let body = json_body(body)?;
    let mut f = Fields::new(&body);
    let (agent, key, ip) = (
        f.agent_id("agentId"),
        f.text("agentKey"),
        f.text("targetIp"),
    );
    if !key.is_empty() && !super::ops::is_agent_key(&key) {
        f.errors
            .insert("agentKey".into(), super::ops::AGENT_KEY_RULE.into());
    }
    if !ip.is_empty()
        && let Err(e) = super::ops::parse_ip(&ip)
    {
        f.errors.insert("targetIp".into(), e);
    }
    // Read for its type only: the agent's display name is not kept.
    let _name = f.optional_text("agentName");
    let csr = f.optional_text("csr");
    f.done()?;
    let agent2 = agent.clone();
    let caller = Caller::Agent(agent.clone());
    let (token, ip, issued, _) = app
        .blocking(move |api| {
            api.register(&caller, &agent2, &key, &ip, csr.as_deref(), Some(client))
        })
        .await?;
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

/// `POST /api/agents/authenticate` `{agentId, agentKey}` (the installer): a new token.
/// `POST /api/agent/authenticate` is also what the agent calls at each start for its backend,
/// and it sends it here when its backend URL is unset, as `{agentToken, serverId}` (the same
/// key and id): the key is checked and the answer says there is no command channel here, so the
/// agent logs it and runs standalone, keeping the token it was installed with.
async fn authenticate(
    State(app): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    app.limit_client(app.client(&peer, &headers))?;
    let body = json_body(body)?;
    if body.get("agentId").is_none() && body.get("serverId").is_some() {
        let mut f = Fields::new(&body);
        let (agent, key) = (f.agent_id("serverId"), f.text("agentToken"));
        f.done()?;
        let agent2 = agent.clone();
        app.blocking(move |api| api.check_key(&agent2, &key))
            .await?;
        return Ok(Json(json!({
            "success": true,
            "agentId": agent,
            "message": "authenticated; this is the lunafront front server: it has no command channel (wsUrl, rabbitmq), and the agent keeps its token",
        })));
    }
    let mut f = Fields::new(&body);
    let (agent, key) = (f.agent_id("agentId"), f.text("agentKey"));
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
    super::v1::agent_id(&agent)?;
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
    let (agent, subdomain, url) = (
        f.agent_id("agentId"),
        f.text("subdomain"),
        f.text("targetUrl"),
    );
    // `options.useTls` is read (it must be a boolean) but does not decide anything: the
    // original front ignored it and the agent always sends true, also for plain-HTTP apps.
    // The scheme of `targetUrl` says how to speak to the app.
    let (_use_tls, check) = (
        f.flag(&["options", "useTls"]),
        f.flag(&["options", "check"]),
    );
    let parsed = super::ops::parse_target_url(&url);
    if let Err(e) = &parsed
        && !url.is_empty()
    {
        f.errors.insert("targetUrl".into(), e.clone());
    }
    if !subdomain.is_empty()
        && let Err(e) = super::ops::label_of(&subdomain)
    {
        f.errors.insert("subdomain".into(), e);
    }
    f.done()?;
    let (port, tls) = parsed.map_err(|e| ApiError::field("targetUrl", e))?;
    app.limit_changes(&caller)?;
    let (route, _) = app
        .blocking(move |api| {
            api.add_http_route(&caller, &agent, &subdomain, &url, port, tls, check)
        })
        .await?;
    app.make_live().await?;
    let mut answer = json!({
        "success": true,
        "agentId": route.agent_id,
        "subdomain": route.subdomain,
        "domain": route.domain,
        "targetUrl": route.target_url,
    });
    if let Some(service) = route.service_name {
        answer["serviceName"] = json!(service);
    }
    Ok(Json(answer))
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
    super::v1::agent_id(&agent)?;
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
    let agent = f.agent_id("agentId");
    let kind = match body.get("type") {
        None => "http".to_string(),
        Some(_) => f.text("type"),
    };
    // A database route is named by its agent: a subdomain, when sent, is not used.
    let subdomain = if kind == "mongodb" {
        if body.get("subdomain").is_some_and(|s| !s.is_string()) {
            f.errors
                .insert("subdomain".into(), "must be a string".into());
        }
        String::new()
    } else {
        f.text("subdomain")
    };
    if !kind.is_empty() && kind != "http" && kind != "mongodb" {
        f.errors.insert("type".into(), "`http` or `mongodb`".into());
    } else if kind == "http"
        && !subdomain.is_empty()
        && let Err(e) = super::ops::label_of(&subdomain)
    {
        f.errors.insert("subdomain".into(), e);
    }
    f.done()?;
    app.limit_changes(&caller)?;
    let (agent2, kind2) = (agent.clone(), kind.clone());
    let (domain, _) = app
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
    let (agent, ip, port) = (
        f.agent_id("agentId"),
        f.text("targetIp"),
        f.port("targetPort"),
    );
    // Absent: true (what the agent means); null: false, as for every flag.
    let use_tls = body.get("useTls").is_none() || f.flag(&["useTls"]);
    f.done()?;
    app.limit_changes(&caller)?;
    let (route, _) = app
        .blocking(move |api| api.add_mongodb(&caller, &agent, ("targetIp", &ip), port, use_tls))
        .await?;
    app.make_live().await?;
    let mut body = serde_json::to_value(&route).expect("serializes");
    body["success"] = json!(true);
    Ok(Json(body))
}

/// `POST /api/proxy/{dbType}` `{agentId, targetHost, targetPort, options: {useTls}}`: the
/// agent's database manager. MongoDB is routed like `/api/mongodb/register`; other databases
/// cannot be routed by server name and get a 422 the agent logs (not a 404, which would look
/// like a missing server).
async fn add_database_route(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(db_type): Path<String>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    let caller = app.caller(&headers)?;
    if db_type != "mongodb" {
        return Err(ApiError::new(
            422,
            "unsupported_database",
            format!(
                "lunafront routes MongoDB (by TLS server name) and HTTP apps only; `{}` databases cannot be routed through this front server: reach them directly or through a TLS listener the administrator adds",
                db_type.chars().take(40).collect::<String>().escape_debug()
            ),
        ));
    }
    let body = json_body(body)?;
    let mut f = Fields::new(&body);
    let (agent, host, port) = (
        f.agent_id("agentId"),
        f.text("targetHost"),
        f.port("targetPort"),
    );
    // Absent or null: true (the agent's database manager leaves it out for TLS).
    let use_tls = match body.pointer("/options/useTls") {
        None | Some(serde_json::Value::Null) => {
            f.flag(&["options", "useTls"]);
            true
        }
        Some(_) => f.flag(&["options", "useTls"]),
    };
    f.done()?;
    app.limit_changes(&caller)?;
    let (route, _) = app
        .blocking(move |api| api.add_mongodb(&caller, &agent, ("targetHost", &host), port, use_tls))
        .await?;
    app.make_live().await?;
    Ok(Json(json!({
        "success": true,
        "domain": route.domain,
        "useTls": route.tls_enabled,
        "connectionString": route.connection_string,
        "targetPort": route.target_port,
    })))
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
