//! The admin API (`/v1/admin/...`): users, keys, plans and usage. Every
//! route needs a key whose user has the admin role.

use crate::api::auth;
use crate::error::ApiError;
use crate::extract::{AdminCaller, Body, JsonBody};
use crate::openai::parse;
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use hanlin_accounts::web::SignupPolicy;
use hanlin_accounts::{NewKey, Plan, Role, UserStatus};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

type AppResult<T> = Result<T, ApiError>;

/// An admin key (`Authorization: Bearer`), or an admin's web-app session
/// cookie (with its CSRF token when `write`).
pub(crate) async fn admin(
    st: &AppState,
    headers: &HeaderMap,
    write: bool,
) -> AppResult<hanlin_accounts::User> {
    if !headers.contains_key(axum::http::header::AUTHORIZATION) {
        let method = if write {
            axum::http::Method::POST
        } else {
            axum::http::Method::GET
        };
        if let Some(user) = crate::web::admin_session(st, headers, &method).await? {
            return Ok(user);
        }
    }
    let caller = auth(st, headers).await?;
    if caller.user.role != Role::Admin {
        return Err(ApiError::forbidden("This endpoint needs an admin key."));
    }
    Ok(caller.user)
}

pub async fn users(State(st): State<Arc<AppState>>, _: AdminCaller) -> AppResult<Json<Value>> {
    Ok(Json(
        json!({"object": "list", "data": st.db.users().await?}),
    ))
}

#[derive(Deserialize)]
struct NewUser {
    name: String,
    role: Option<String>,
    plan: Option<String>,
}

fn role_of(s: Option<&str>) -> AppResult<Role> {
    match s.unwrap_or("user") {
        "user" => Ok(Role::User),
        "admin" => Ok(Role::Admin),
        other => Err(ApiError::bad_request(format!(
            "Unknown role '{other}'; use 'user' or 'admin'."
        ))
        .param("role")),
    }
}

pub(crate) fn account_error(e: hanlin_accounts::AccountError) -> ApiError {
    use hanlin_accounts::AccountError as E;
    match e {
        E::UnknownPlan(_) | E::UnknownUser(_) | E::Invalid(_) => {
            ApiError::bad_request(e.to_string())
        }
        E::UnknownKey(_) => ApiError::not_found(e.to_string()),
        other => other.into(),
    }
}

pub async fn create_user(
    State(st): State<Arc<AppState>>,
    _: AdminCaller,
    Body(b): Body,
) -> AppResult<Json<Value>> {
    let req: NewUser = parse(&b, &["name", "role", "plan"])?;
    let role = role_of(req.role.as_deref())?;
    let u = st
        .db
        .ensure_user(&req.name, role, req.plan.as_deref())
        .await
        .map_err(account_error)?;
    Ok(Json(json!(u)))
}

pub async fn keys(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
    _: AdminCaller,
) -> AppResult<Json<Value>> {
    let user_id = match q.get("user") {
        Some(name) => Some(
            st.db
                .user_by_name(name)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("unknown user {name:?}")))?
                .id,
        ),
        None => None,
    };
    Ok(Json(
        json!({"object": "list", "data": st.db.keys(user_id.as_deref()).await?}),
    ))
}

#[derive(Deserialize)]
struct CreateKey {
    user: String,
    plan: Option<String>,
    role: Option<String>,
    name: Option<String>,
    models: Option<Vec<String>>,
    expires_in_days: Option<u32>,
}

pub async fn create_key(
    State(st): State<Arc<AppState>>,
    _: AdminCaller,
    Body(b): Body,
) -> AppResult<Json<Value>> {
    let req: CreateKey = parse(
        &b,
        &["user", "plan", "role", "name", "models", "expires_in_days"],
    )?;
    let role = role_of(req.role.as_deref())?;
    let user = st
        .db
        .ensure_user(&req.user, role, req.plan.as_deref())
        .await
        .map_err(account_error)?;
    let opts = NewKey {
        name: req.name.unwrap_or_default(),
        models: req.models,
        expires_at: req
            .expires_in_days
            .map(|d| hanlin_accounts::now() + i64::from(d) * 86_400),
    };
    let (key, secret) = st.db.create_key(&user.id, &opts).await?;
    Ok(Json(
        json!({"key": secret, "id": key.id, "user": user.name, "plan": user.plan, "expires_at": key.expires_at, "models": key.models}),
    ))
}

pub async fn revoke_key(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    _: AdminCaller,
) -> AppResult<Json<Value>> {
    st.db.revoke_key(&id).await.map_err(account_error)?;
    Ok(Json(json!({"id": id, "revoked": true})))
}

pub async fn plans(State(st): State<Arc<AppState>>, _: AdminCaller) -> AppResult<Json<Value>> {
    Ok(Json(
        json!({"object": "list", "data": st.db.plans().await?}),
    ))
}

#[derive(Deserialize)]
struct PlanBody {
    requests_per_minute: i64,
    tokens_per_minute: i64,
    tokens_per_day: i64,
    max_context: i64,
    models: Vec<String>,
    priority: i64,
    #[serde(default = "default_max_n")]
    max_n: i64,
    #[serde(default = "full_price")]
    price_milli: i64,
    #[serde(default = "default_file_bytes")]
    file_bytes: i64,
    #[serde(default = "default_batch_price")]
    batch_price_milli: i64,
    #[serde(default = "default_images_per_day")]
    images_per_day: i64,
}

fn default_images_per_day() -> i64 {
    hanlin_accounts::DEFAULT_IMAGES_PER_DAY
}

fn default_file_bytes() -> i64 {
    hanlin_accounts::DEFAULT_FILE_BYTES
}

fn default_batch_price() -> i64 {
    hanlin_accounts::DEFAULT_BATCH_PRICE
}

fn full_price() -> i64 {
    hanlin_accounts::FULL_PRICE
}

fn default_max_n() -> i64 {
    4
}

pub async fn put_plan(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    _: AdminCaller,
    Body(b): Body,
) -> AppResult<Json<Value>> {
    let p: PlanBody = parse(
        &b,
        &[
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_day",
            "max_context",
            "models",
            "priority",
            "max_n",
            "price_milli",
            "file_bytes",
            "batch_price_milli",
            "images_per_day",
        ],
    )?;
    let plan = Plan {
        name,
        requests_per_minute: p.requests_per_minute,
        tokens_per_minute: p.tokens_per_minute,
        tokens_per_day: p.tokens_per_day,
        max_context: p.max_context,
        models: p.models,
        priority: p.priority,
        max_n: p.max_n,
        price_milli: p.price_milli,
        file_bytes: p.file_bytes,
        batch_price_milli: p.batch_price_milli,
        images_per_day: p.images_per_day,
    };
    st.db.put_plan(&plan).await.map_err(account_error)?;
    Ok(Json(json!(plan)))
}

pub async fn usage(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
    _: AdminCaller,
) -> AppResult<Json<Value>> {
    let rows = st
        .db
        .usage(
            q.get("user").map(String::as_str),
            q.get("day").map(String::as_str),
        )
        .await?;
    Ok(Json(json!({"object": "list", "data": rows})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// `active` (approve, re-enable) or `disabled`.
    status: Option<UserStatus>,
    plan: Option<String>,
}

/// `PATCH /v1/admin/users/{name}`: approve a pending account, disable or
/// re-enable one (disabling ends its sessions and revokes its keys), or
/// change its plan.
pub async fn patch_user(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    _: AdminCaller,
    JsonBody(p): JsonBody<UserPatch>,
) -> AppResult<Json<Value>> {
    let Some(user) = st
        .db
        .user_by_name(&name)
        .await?
        .filter(|u| u.status != UserStatus::Deleted)
    else {
        return Err(ApiError::not_found(format!("unknown user {name:?}")));
    };
    if let Some(plan) = &p.plan {
        st.db
            .ensure_user(&user.name, user.role, Some(plan))
            .await
            .map_err(account_error)?;
    }
    let user = match p.status {
        Some(UserStatus::Active | UserStatus::Disabled) => st
            .db
            .set_user_status(&name, p.status.unwrap_or(UserStatus::Active))
            .await
            .map_err(account_error)?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'status' is active or disabled, not {}; DELETE the user to delete it.",
                other.as_str()
            ))
            .param("status"))
        }
        None => st.db.user_by_name(&name).await?.unwrap_or(user),
    };
    tracing::info!(user = %user.name, status = ?user.status, "user changed by an admin");
    Ok(Json(json!(user)))
}

/// `DELETE /v1/admin/users/{name}`: sessions end, keys are revoked,
/// conversations and personas are deleted; usage rows stay for accounting.
pub async fn delete_user(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    _: AdminCaller,
) -> AppResult<Json<Value>> {
    let u = st.db.delete_user(&name).await.map_err(account_error)?;
    tracing::info!(user = %name, "user deleted by an admin");
    Ok(Json(json!({"deleted": name, "id": u.id})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    signup: SignupPolicy,
}

/// `GET /v1/admin/settings`: server-wide settings an admin can change.
pub async fn settings(State(st): State<Arc<AppState>>, _: AdminCaller) -> AppResult<Json<Value>> {
    Ok(Json(
        json!({"signup": crate::web::signup_policy(&st).await?}),
    ))
}

/// `PUT /v1/admin/settings` `{"signup": "open" | "approval" | "closed"}`.
pub async fn put_settings(
    State(st): State<Arc<AppState>>,
    _: AdminCaller,
    JsonBody(s): JsonBody<Settings>,
) -> AppResult<Json<Value>> {
    st.db.set_signup_policy(s.signup).await?;
    Ok(Json(json!({"signup": s.signup})))
}

/// One MCP server as the admin API shows it (the bearer token is never
/// shown back).
fn mcp_json(s: &hanlin_tools::mcp::Server) -> Value {
    let c = &s.config;
    json!({
        "name": s.name,
        "origin": s.origin,
        "url": c.url,
        "command": (!c.command.is_empty()).then(|| c.command.join(" ")),
        "has_token": c.bearer_token.is_some(),
        "timeout_s": c.timeout_s,
        "max_output_kb": c.max_output_kb,
        "plans": c.plans,
        "users": c.users,
    })
}

/// `GET /v1/admin/mcp`: the MCP servers, the config file's and the admin's.
pub async fn mcp_servers(
    State(st): State<Arc<AppState>>,
    _: AdminCaller,
) -> AppResult<Json<Value>> {
    let data: Vec<Value> = st.mcp.list().iter().map(|s| mcp_json(s)).collect();
    Ok(Json(json!({ "data": data })))
}

/// `PUT /v1/admin/mcp/{name}` `{"url": "https://…/mcp", "timeout_s",
/// "max_output_kb", "plans", "users", "bearer_token"}`: register (or
/// replace) a streamable-HTTP server. Programs (`command`) are set in the
/// config file only.
pub async fn put_mcp_server(
    State(st): State<Arc<AppState>>,
    _: AdminCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> AppResult<Json<Value>> {
    if body.get("command").is_some() || body.get("env").is_some() {
        return Err(ApiError::forbidden(
            "MCP servers that run a program ('command') are set in the config file only.",
        ));
    }
    let config: hanlin_tools::mcp::ServerConfig =
        serde_json::from_value(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    st.mcp
        .set(&name, config, hanlin_tools::mcp::Origin::Admin)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    crate::tools::save_mcp(&st).await?;
    tracing::info!(server = %name, "MCP server registered by an admin");
    let s = st
        .mcp
        .get(&name)
        .ok_or_else(|| ApiError::internal("the server was just registered"))?;
    Ok(Json(mcp_json(&s)))
}

/// `DELETE /v1/admin/mcp/{name}`.
pub async fn delete_mcp_server(
    State(st): State<Arc<AppState>>,
    _: AdminCaller,
    Path(name): Path<String>,
) -> AppResult<Json<Value>> {
    st.mcp.remove(&name).map_err(|e| match e {
        hanlin_tools::mcp::McpError::Unknown(_) => ApiError::not_found(e.to_string()),
        _ => ApiError::bad_request(e.to_string()),
    })?;
    crate::tools::save_mcp(&st).await?;
    Ok(Json(json!({ "deleted": name })))
}

/// `GET /v1/admin/mcp/{name}/tools`: connect and list the server's tools
/// (or say why not).
pub async fn mcp_server_tools(
    State(st): State<Arc<AppState>>,
    _: AdminCaller,
    Path(name): Path<String>,
) -> AppResult<Json<Value>> {
    let s = st
        .mcp
        .get(&name)
        .ok_or_else(|| ApiError::not_found(format!("There is no MCP server named {name:?}.")))?;
    Ok(Json(match s.tools().await {
        Ok(tools) => json!({"ok": true, "tools": tools}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }))
}
