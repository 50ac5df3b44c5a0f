//! The native API, for administrators and tools: agents, their routes, domains, the pending
//! plan and the daemon's status, JSON in and out (documented in `api/openapi.yaml`).

use super::auth::Kind;
use super::auth::hash_secret;
use super::ops::{ApiError, Caller, judge_address};
use super::store::AgentEntry;
use super::{AppState, Fields, json_body};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::time::Duration;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/agents", get(list_agents).post(put_agent))
        .route("/v1/agents/{id}", get(get_agent).delete(delete_agent))
        .route("/v1/agents/{id}/enroll", post(enroll))
        .route("/v1/agents/{id}/revoke", post(revoke))
        .route("/v1/agents/{id}/routes", get(list_routes).post(add_route))
        .route(
            "/v1/agents/{id}/routes/{domain}",
            axum::routing::delete(delete_route),
        )
        .route("/v1/domains", get(domains))
        .route("/v1/plan", get(plan))
        .route("/v1/status", get(status))
}

type Result<T> = std::result::Result<T, ApiError>;

/// An agent id from a path, checked like every other input (`%2F..%2Fx` is not an id).
pub fn agent_id(id: &str) -> Result<()> {
    if crate::model::names::is_identifier(id) {
        Ok(())
    } else {
        Err(ApiError::field(
            "id",
            crate::model::names::IDENTIFIER_RULE.to_string(),
        ))
    }
}

fn agent_json(id: &str, address: &str, source: &str, routes: usize) -> Value {
    json!({"id": id, "address": address, "source": source, "routes": routes})
}

async fn list_agents(State(app): State<AppState>, headers: HeaderMap) -> Result<Json<Value>> {
    app.admin(&headers)?;
    let agents = app
        .blocking(|api| {
            let (model, _) = api.settings()?;
            let fragments = api
                .store
                .read_all()
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let mut out: Vec<Value> = Vec::new();
            for (id, agent) in &model.agents {
                let api_owned = fragments.get(id).is_some_and(|f| f.agents.contains_key(id));
                let routes = fragments.get(id).map(|f| f.domains.len()).unwrap_or(0);
                out.push(agent_json(
                    id,
                    &agent.address.to_string(),
                    if api_owned { "api" } else { "state" },
                    routes,
                ));
            }
            // Registered but not reconciled yet.
            for (id, f) in &fragments {
                if !model.agents.contains_key(id)
                    && let Some(a) = f.agents.get(id)
                {
                    out.push(agent_json(id, &a.address, "api", f.domains.len()));
                }
            }
            Ok(out)
        })
        .await?;
    Ok(Json(json!({"agents": agents})))
}

async fn get_agent(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    app.caller(&headers)?.must_act_for(&id)?;
    agent_id(&id)?;
    let agent = app
        .blocking(move |api| {
            let (model, _) = api.settings()?;
            let fragment = api
                .store
                .read(&id)
                .map_err(|e| ApiError::internal(e.to_string()))?
                .unwrap_or_default();
            let address = fragment
                .agents
                .get(&id)
                .map(|a| a.address.clone())
                .or_else(|| model.agents.get(&id).map(|a| a.address.to_string()))
                .ok_or_else(|| ApiError::not_found(format!("agent `{id}` is not registered")))?;
            let source = if fragment.agents.contains_key(&id) {
                "api"
            } else {
                "state"
            };
            Ok(agent_json(&id, &address, source, fragment.domains.len()))
        })
        .await?;
    Ok(Json(agent))
}

/// Creates or updates an agent (admin): its address, and its key (stored as a hash).
async fn put_agent(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    app.admin(&headers)?;
    let body = json_body(body)?;
    let mut f = Fields::new(&body);
    let (id, address) = (f.agent_id("id"), f.text("address"));
    let key = f.optional_text("key");
    if let Some(k) = &key
        && !super::ops::is_agent_key(k)
    {
        f.errors
            .insert("key".into(), super::ops::AGENT_KEY_RULE.into());
    }
    let ip = match super::ops::parse_ip(&address) {
        Ok(ip) => Some(ip),
        Err(e) => {
            if !address.is_empty() {
                f.errors.insert("address".into(), e);
            }
            None
        }
    };
    f.done()?;
    let ip = ip.expect("checked");
    let id2 = id.clone();
    let address = app
        .blocking(move |api| {
            let (model, settings) = api.settings()?;
            let ip =
                judge_address(ip, &settings).map_err(|e| ApiError::not_allowed("address", e))?;
            let _guard = api.store.lock();
            if let Some(other) = api.agent_at(&id2, ip, &model)? {
                return Err(ApiError::conflict(format!(
                    "{ip} is the address of agent `{other}`"
                )));
            }
            let mut fragment = api
                .store
                .read(&id2)
                .map_err(|e| ApiError::internal(e.to_string()))?
                .unwrap_or_default();
            let old = fragment.agents.get(&id2).cloned();
            fragment.agents.insert(
                id2.clone(),
                AgentEntry {
                    address: ip.to_string(),
                    key_sha256: key
                        .as_deref()
                        .map(hash_secret)
                        .or(old.as_ref().and_then(|o| o.key_sha256.clone())),
                    owner: Some(id2.clone()),
                    other: old.map(|o| o.other).unwrap_or_default(),
                },
            );
            api.save(
                &Caller::Admin,
                &id2,
                &fragment,
                &model,
                &settings,
                format!("admin sets agent {id2} at {ip}"),
            )?;
            Ok(ip.to_string())
        })
        .await?;
    app.make_live().await?;
    Ok((
        StatusCode::CREATED,
        Json(agent_json(&id, &address, "api", 0)),
    )
        .into_response())
}

async fn delete_agent(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    app.admin(&headers)?;
    agent_id(&id)?;
    let id2 = id.clone();
    let removed = app.blocking(move |api| api.remove_agent(&id2)).await?;
    if removed {
        app.make_live().await?;
    }
    Ok(Json(json!({"id": id, "removed": removed})))
}

/// A one-time enrollment token: the agent registers with it as its key (admin).
async fn enroll(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response> {
    app.admin(&headers)?;
    agent_id(&id)?;
    let token = app
        .api
        .tokens
        .issue(&id, Kind::Enrollment, Duration::from_secs(7 * 86_400))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "enrollmentToken": token, "expiresInSeconds": 7 * 86_400})),
    )
        .into_response())
}

async fn revoke(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    app.admin(&headers)?;
    agent_id(&id)?;
    let id2 = id.clone();
    let revoked = app.blocking(move |api| api.revoke(&id2)).await?;
    Ok(Json(json!({"id": id, "revoked": revoked})))
}

async fn list_routes(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    app.caller(&headers)?.must_act_for(&id)?;
    agent_id(&id)?;
    let routes = app.blocking(move |api| api.routes(Some(&id))).await?;
    Ok(Json(json!({"routes": routes})))
}

/// Adds a route: `{type: http, subdomain, port, tls?, check?}` or `{type: mongodb, port, tls?}`.
async fn add_route(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let caller = app.caller(&headers)?;
    caller.must_act_for(&id)?;
    agent_id(&id)?;
    let body = json_body(body)?;
    let mut f = Fields::new(&body);
    let kind = match body.get("type") {
        None => "http".to_string(),
        Some(_) => f.text("type"),
    };
    let port = f.port("port");
    let tls = f.flag(&["tls"]);
    let check = f.flag(&["check"]);
    // The subdomain names an HTTP route; a MongoDB route is named by its agent.
    let subdomain = if kind == "http" {
        f.text("subdomain")
    } else {
        f.optional_text("subdomain").unwrap_or_default()
    };
    if !subdomain.is_empty()
        && let Err(e) = super::ops::label_of(&subdomain)
    {
        f.errors.insert("subdomain".into(), e);
    }
    if !kind.is_empty() && kind != "http" && kind != "mongodb" {
        f.errors.insert("type".into(), "`http` or `mongodb`".into());
    }
    f.done()?;
    app.limit_changes(&caller)?;
    let route = app
        .blocking(move |api| match kind.as_str() {
            "http" => api
                .add_http_route(
                    &caller,
                    &id,
                    &subdomain,
                    &format!("{}://agent:{port}", if tls { "https" } else { "http" }),
                    port,
                    tls,
                    check,
                )
                .map(|(r, _)| serde_json::to_value(r).expect("serializes")),
            _ => {
                let (model, _) = api.settings()?;
                let address = api
                    .store
                    .read(&id)
                    .ok()
                    .flatten()
                    .and_then(|f| f.agents.get(&id).map(|a| a.address.clone()))
                    .or_else(|| model.agents.get(&id).map(|a| a.address.to_string()))
                    .ok_or_else(|| {
                        ApiError::not_found(format!("agent `{id}` is not registered"))
                    })?;
                api.add_mongodb(&caller, &id, ("address", &address), port, tls)
                    .map(|(r, _)| serde_json::to_value(r).expect("serializes"))
            }
        })
        .await?;
    app.make_live().await?;
    Ok((StatusCode::CREATED, Json(route)).into_response())
}

async fn delete_route(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((id, domain)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let caller = app.caller(&headers)?;
    caller.must_act_for(&id)?;
    agent_id(&id)?;
    app.limit_changes(&caller)?;
    let (removed, _) = app
        .blocking(move |api| {
            let (model, settings) = api.settings()?;
            api.delete_domain(&caller, &id, &domain, &model, &settings)
        })
        .await?;
    app.make_live().await?;
    Ok(Json(json!({"removed": removed})))
}

async fn domains(State(app): State<AppState>, headers: HeaderMap) -> Result<Json<Value>> {
    app.admin(&headers)?;
    let domains = app
        .blocking(|api| {
            let (model, _) = api.settings()?;
            let document = model.document();
            Ok(model
                .domains
                .iter()
                .map(|(host, d)| {
                    let owner = document.pointer(&format!("/domains/{host}/owner")).cloned().unwrap_or(Value::Null);
                    json!({"domain": host, "backend": d.backend, "listener": d.listener, "owner": owner})
                })
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(Json(json!({"domains": domains})))
}

/// What applying the current state would change (the `plan --json` document).
async fn plan(State(app): State<AppState>, headers: HeaderMap) -> Result<Response> {
    app.admin(&headers)?;
    let (state, target, name) = (
        app.state_path.clone(),
        app.target.clone(),
        app.target_name.clone(),
    );
    let text = tokio::task::spawn_blocking(move || -> Result<String> {
        let source =
            crate::spec::load::load_path(&state).map_err(|e| ApiError::internal(e.to_string()))?;
        let validation = crate::model::validate(&source);
        let fields: std::collections::BTreeMap<String, String> = validation
            .errors()
            .map(|d| (d.pointer.clone(), d.to_string()))
            .collect();
        let model = validation.model.ok_or_else(|| {
            let mut e = ApiError::new(422, "invalid_state", "the state does not validate");
            e.fields = fields;
            e
        })?;
        // The plan `lunafront plan` makes: ACME certificates, slots, a Data Plane API's files.
        let prepared = crate::pipeline::prepare(&model, &name, &target)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(crate::plan::json::render(&prepared.plan))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response())
}

async fn status(State(app): State<AppState>, headers: HeaderMap) -> Result<Json<Value>> {
    let caller = app.caller(&headers)?;
    if caller != Caller::Admin {
        return Err(ApiError::forbidden(
            "this endpoint is for the administrator",
        ));
    }
    let status = app.status.lock().expect("status").clone();
    Ok(Json(serde_json::to_value(status).expect("serializes")))
}
