//! The chat web app: its embedded assets (`web/`, served at `/`) and the
//! JSON API it talks to (`/api/...`), authenticated by a session cookie.
//!
//! Sign-in sets an HttpOnly, SameSite=Strict cookie holding a random secret
//! (only its hash is stored); every cookie-authenticated write must also
//! carry the session's CSRF token in `X-CSRF-Token`. Conversations are
//! stored by the server; a reply is generated through the same scheduler,
//! limiter and usage metering as `/v1/chat/completions`, and its text is
//! written to the database as it streams (every second, and when it ends),
//! so a stopped reply, a closed tab or a crash keeps what was generated,
//! marked incomplete.

use crate::admin::account_error;
use crate::api::{budget, scheduler_for};
use crate::error::ApiError;
use crate::extract::{JsonBody, WebRead, WebWrite};
use crate::guard::ClientAddr;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use hanlin_accounts::chats::{ConversationPatch, ImportConversation, Message, MAX_MESSAGE_CHARS};
use hanlin_accounts::web::{Session, SignInError, SignupPolicy, SESSION_TTL_SECS};
use hanlin_accounts::{ApiKey, Caller, NewKey, Role, UserStatus};
use hanlin_engine::Event;
use hanlin_gateway::{Endpoint, Request, Work};
use hanlin_search::answer;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

type AppResult<T> = Result<T, ApiError>;

pub const COOKIE: &str = "hanlin_session";
/// Largest `conversations.json` an import accepts.
pub const MAX_IMPORT_BYTES: usize = 64 << 20;
/// How often a streaming reply's text is written to the database.
const SAVE_EVERY: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- assets

#[derive(rust_embed::Embed)]
#[folder = "web/"]
struct Assets;

/// Scripts only from this origin, no inline script, no framing: even text
/// that slipped past the sanitiser could not run.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

fn asset(path: &str) -> Response {
    let Some(file) = Assets::get(path) else {
        return ApiError::not_found(format!("No asset {path:?}.")).into_response();
    };
    let mime = file.metadata.mimetype().to_string();
    let cache = if path == "index.html" {
        "no-cache"
    } else {
        "public, max-age=3600"
    };
    let mut r = Response::new(Body::from(file.data.into_owned()));
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&mime) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

pub async fn index() -> Response {
    asset("index.html")
}

pub async fn static_file(Path(path): Path<String>) -> Response {
    if path.split('/').any(|s| s == ".." || s.is_empty()) {
        return ApiError::not_found("No such asset.").into_response();
    }
    asset(&path)
}

// ---------------------------------------------------------------- sessions

/// The signed-in user behind the cookie; for writes, the CSRF token too.
pub(crate) async fn session(
    st: &AppState,
    jar: &CookieJar,
    headers: &HeaderMap,
    write: bool,
) -> AppResult<Session> {
    let secret = jar.get(COOKIE).map(|c| c.value().to_string());
    let Some(secret) = secret.filter(|s| !s.is_empty()) else {
        return Err(ApiError::unauthorized("Please sign in.").code("not_signed_in"));
    };
    let Some(s) = st.db.session(&secret).await? else {
        return Err(
            ApiError::unauthorized("Your session has expired; please sign in again.")
                .code("session_expired"),
        );
    };
    if write {
        let token = headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if token.is_empty() || !constant_time_eq(token.as_bytes(), s.csrf.as_bytes()) {
            return Err(
                ApiError::forbidden("Missing or wrong CSRF token (X-CSRF-Token header).")
                    .code("csrf"),
            );
        }
    }
    Ok(s)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller the web app acts as: the user, their plan, and a pseudo-key
/// `web` (usage from the web app is metered under it).
async fn web_caller(st: &AppState, s: &Session) -> AppResult<Caller> {
    let plan = st.db.plan(&s.user.plan).await?;
    Ok(Caller {
        key: ApiKey {
            id: "web".into(),
            user_id: s.user.id.clone(),
            prefix: String::new(),
            name: "web app".into(),
            models: None,
            expires_at: None,
            revoked_at: None,
            created_at: 0,
        },
        user: s.user.clone(),
        plan,
    })
}

/// Whether the cookie may be marked `Secure`: the page came over HTTPS
/// (a proxy says so) or from loopback, which browsers treat as secure.
fn secure_origin(headers: &HeaderMap) -> bool {
    let forwarded = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let name = host
        .rsplit_once(':')
        .filter(|(h, p)| p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':'))
        .map(|(h, _)| h)
        .unwrap_or(host);
    forwarded || matches!(name, "localhost" | "127.0.0.1" | "[::1]")
}

fn session_cookie(secret: String, secure: bool, max_age: i64) -> Cookie<'static> {
    Cookie::build((COOKIE, secret))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(time::Duration::seconds(max_age))
        .build()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    name: String,
    password: String,
}

fn me_json(s_user: &hanlin_accounts::User, csrf: &str) -> Value {
    json!({"user": s_user, "csrf": csrf})
}

async fn sign_in(
    st: &AppState,
    jar: CookieJar,
    headers: &HeaderMap,
    user: hanlin_accounts::User,
) -> AppResult<(CookieJar, Json<Value>)> {
    let (secret, csrf) = st.db.create_session(&user.id).await?;
    let jar = jar.add(session_cookie(
        secret,
        secure_origin(headers),
        SESSION_TTL_SECS,
    ));
    Ok((jar, Json(me_json(&user, &csrf))))
}

fn sign_in_error(e: SignInError) -> ApiError {
    match e {
        SignInError::WrongPassword => ApiError::unauthorized(e.to_string()).code("wrong_password"),
        SignInError::NameTaken(_) => ApiError::bad_request(e.to_string()).code("name_taken"),
        SignInError::Invalid(_) => ApiError::bad_request(e.to_string()).code("invalid_value"),
        SignInError::Pending => ApiError::forbidden(e.to_string()).code("pending_approval"),
        SignInError::Disabled => ApiError::forbidden(e.to_string()).code("account_disabled"),
        SignInError::AdminExists => ApiError::forbidden(e.to_string()).code("setup_done"),
    }
}

/// Sign-in endpoints take JSON only: a form posted from another site
/// (`text/plain`, which needs no CORS preflight) cannot sign a browser in
/// to an account of the attacker's (login CSRF).
fn require_json(headers: &HeaderMap) -> AppResult<()> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::new_status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Send JSON (Content-Type: application/json).",
        )
        .code("unsupported_media_type"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    name: String,
    password: String,
    /// The one-time token `hanlin serve` prints while it has no admin.
    setup_token: Option<String>,
}

/// The effective sign-up policy: the one an admin chose, else approval.
pub(crate) async fn signup_policy(st: &AppState) -> AppResult<SignupPolicy> {
    Ok(st
        .db
        .signup_policy()
        .await?
        .unwrap_or(SignupPolicy::Approval))
}

/// `GET /api/setup`: what the sign-in page should offer.
pub async fn setup(State(st): State<Arc<AppState>>) -> AppResult<Json<Value>> {
    let needs_setup = !st.db.has_admin().await?;
    Ok(Json(json!({
        "needs_setup": needs_setup,
        "signup": signup_policy(&st).await?,
    })))
}

/// `POST /api/register`. While the server has no admin, only with the
/// setup token, and that account becomes the admin. Afterwards by the
/// sign-up policy: `open` (signed in at once), `approval` (the account
/// waits for an admin: 202 and no session) or `closed` (403).
pub async fn register(
    State(st): State<Arc<AppState>>,
    jar: CookieJar,
    headers: HeaderMap,
    JsonBody(c): JsonBody<Registration>,
) -> AppResult<Response> {
    require_json(&headers)?;
    {
        let mut token = st.setup_token.lock().await;
        if token.is_some() && st.db.has_admin().await? {
            // An admin was made another way (`hanlin admin user create`).
            *token = None;
        }
        if let Some(expected) = token.as_deref() {
            let given = c.setup_token.as_deref().unwrap_or("");
            if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                return Err(ApiError::forbidden(
                    "This server has no administrator yet. Register with the setup token printed on the server's console when it started.",
                )
                .code("setup_token_required"));
            }
            let user = st
                .db
                .register_first_admin(&c.name, &c.password)
                .await?
                .map_err(sign_in_error)?;
            *token = None;
            tracing::info!(user = %user.name, "the first admin registered with the setup token");
            return Ok(sign_in(&st, jar, &headers, user).await?.into_response());
        }
    }
    let status = match signup_policy(&st).await? {
        SignupPolicy::Closed => {
            return Err(ApiError::forbidden(
                "Sign-up is closed on this server; ask an administrator for an account.",
            )
            .code("signup_closed"))
        }
        SignupPolicy::Open => UserStatus::Active,
        SignupPolicy::Approval => UserStatus::Pending,
    };
    let user = st
        .db
        .register(&c.name, &c.password, Role::User, status)
        .await?
        .map_err(sign_in_error)?;
    tracing::info!(user = %user.name, status = ?user.status, "registered");
    if user.status == UserStatus::Pending {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"user": user, "pending": true})),
        )
            .into_response());
    }
    Ok(sign_in(&st, jar, &headers, user).await?.into_response())
}

pub async fn login(
    State(st): State<Arc<AppState>>,
    ClientAddr(addr): ClientAddr,
    jar: CookieJar,
    headers: HeaderMap,
    JsonBody(c): JsonBody<Credentials>,
) -> AppResult<(CookieJar, Json<Value>)> {
    require_json(&headers)?;
    if let Some(wait) = st.throttle.wait(&c.name, addr) {
        return Err(ApiError::rate_limited(
            format!(
                "Too many failed sign-ins; try again in {} s.",
                wait.as_secs().max(1)
            ),
            "too_many_sign_ins",
            wait,
        ));
    }
    match st.db.check_login(&c.name, &c.password).await? {
        Ok(user) => {
            st.throttle.succeeded(&c.name, addr);
            sign_in(&st, jar, &headers, user).await
        }
        Err(e) => {
            if e == SignInError::WrongPassword {
                st.throttle.failed(&c.name, addr);
            }
            Err(sign_in_error(e))
        }
    }
}

pub async fn logout(
    State(st): State<Arc<AppState>>,
    jar: CookieJar,
    headers: HeaderMap,
    _: WebWrite,
) -> AppResult<(CookieJar, Json<Value>)> {
    if let Some(c) = jar.get(COOKIE) {
        st.db.end_session(c.value()).await?;
    }
    let jar = jar.add(session_cookie(String::new(), secure_origin(&headers), 0));
    Ok((jar, Json(json!({"ok": true}))))
}

pub async fn me(State(st): State<Arc<AppState>>, WebRead(s): WebRead) -> AppResult<Json<Value>> {
    let plan = st.db.plan(&s.user.plan).await?;
    let mut v = me_json(&s.user, &s.csrf);
    v["plan"] = json!(plan);
    v["default_model"] = json!(st.config.default_model);
    v["max_message_chars"] = json!(MAX_MESSAGE_CHARS);
    Ok(Json(v))
}

pub async fn models(
    State(st): State<Arc<AppState>>,
    WebRead(s): WebRead,
) -> AppResult<Json<Value>> {
    let plan = st.db.plan(&s.user.plan).await?;
    let data: Vec<String> = st
        .models
        .available()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|n| plan.allows(n))
        .collect();
    Ok(Json(
        json!({"data": data, "default": st.config.default_model}),
    ))
}

// ---------------------------------------------------------------- conversations

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewConversation {
    title: Option<String>,
    system_prompt: Option<String>,
    model: Option<String>,
    params: Option<Value>,
}

pub async fn list_conversations(
    State(st): State<Arc<AppState>>,
    WebRead(s): WebRead,
) -> AppResult<Json<Value>> {
    Ok(Json(
        json!({"data": st.db.conversations(&s.user.id).await?}),
    ))
}

pub async fn create_conversation(
    State(st): State<Arc<AppState>>,
    WebWrite(s): WebWrite,
    JsonBody(b): JsonBody<NewConversation>,
) -> AppResult<Json<Value>> {
    let params = b.params.unwrap_or_else(|| json!({}));
    if !params.is_object() {
        return Err(ApiError::bad_request("'params' must be an object.").param("params"));
    }
    let system = b.system_prompt.unwrap_or_default();
    if system.chars().count() > MAX_MESSAGE_CHARS {
        return Err(too_long("system_prompt"));
    }
    let c = st
        .db
        .create_conversation(
            &s.user.id,
            b.title.as_deref().unwrap_or("New chat"),
            &system,
            b.model.as_deref().unwrap_or(&st.config.default_model),
            &params,
        )
        .await
        .map_err(account_error)?;
    Ok(Json(json!(c)))
}

fn not_found() -> ApiError {
    ApiError::not_found("No such conversation.").code("not_found")
}

fn too_long(param: &str) -> ApiError {
    ApiError::bad_request(format!(
        "The text is too long: at most {MAX_MESSAGE_CHARS} characters."
    ))
    .param(param)
    .code("string_above_max_length")
}

pub async fn get_conversation(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    WebRead(s): WebRead,
) -> AppResult<Json<Value>> {
    let c = st
        .db
        .conversation(&s.user.id, &id)
        .await?
        .ok_or_else(not_found)?;
    let messages = st.db.messages(&s.user.id, &id).await?.unwrap_or_default();
    Ok(Json(json!({"conversation": c, "messages": messages})))
}

pub async fn patch_conversation(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    WebWrite(s): WebWrite,
    JsonBody(p): JsonBody<ConversationPatch>,
) -> AppResult<Json<Value>> {
    let c = st
        .db
        .update_conversation(&s.user.id, &id, &p)
        .await
        .map_err(account_error)?
        .ok_or_else(not_found)?;
    Ok(Json(json!(c)))
}

pub async fn delete_conversation(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    WebWrite(s): WebWrite,
) -> AppResult<Json<Value>> {
    if !st.db.delete_conversation(&s.user.id, &id).await? {
        return Err(not_found());
    }
    Ok(Json(json!({"deleted": true, "id": id})))
}

#[derive(Deserialize)]
pub struct SearchQuery {
    q: String,
}

pub async fn search(
    State(st): State<Arc<AppState>>,
    Query(q): Query<SearchQuery>,
    WebRead(s): WebRead,
) -> AppResult<Json<Value>> {
    let hits = st.db.search_conversations(&s.user.id, &q.q, 50).await?;
    Ok(Json(json!({"data": hits})))
}

// ---------------------------------------------------------------- replies

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Send {
    /// The new user message (absent: regenerate the reply to `parent_id`).
    content: Option<String>,
    /// Where the new message goes: the previous assistant message (None
    /// for the first), or, when regenerating, the user message to answer.
    parent_id: Option<String>,
}

/// The messages from the root down to `leaf`.
fn path_to<'a>(messages: &'a [Message], leaf: &str) -> Vec<&'a Message> {
    let by_id: HashMap<&str, &Message> = messages.iter().map(|m| (m.id.as_str(), m)).collect();
    let mut path = Vec::new();
    let mut cur = by_id.get(leaf).copied();
    while let Some(m) = cur {
        if path.len() > messages.len() {
            break; // a cycle cannot come from add_message; be safe anyway
        }
        path.push(m);
        cur = m.parent_id.as_deref().and_then(|p| by_id.get(p).copied());
    }
    path.reverse();
    path
}

fn sse_data(v: Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// Add a user message (or take the one to answer again) and stream the
/// assistant's reply as server-sent events: `user`, `assistant` (the new
/// message's record), `delta` (text), then `done` or `error`.
pub async fn send_message(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    WebWrite(s): WebWrite,
    JsonBody(b): JsonBody<Send>,
) -> AppResult<Response> {
    let conv = st
        .db
        .conversation(&s.user.id, &id)
        .await?
        .ok_or_else(not_found)?;
    let caller = web_caller(&st, &s).await?;
    let sched = scheduler_for(&st, &caller, &conv.model).await?;
    let mut request = st.gw.admit(&caller, Endpoint::Web, &conv.model)?;
    let mut messages = st.db.messages(&s.user.id, &id).await?.unwrap_or_default();
    let mut user_msg: Option<Message> = None;
    let answer_to = match (&b.content, &b.parent_id) {
        (Some(text), parent) => {
            if text.trim().is_empty() {
                return Err(ApiError::bad_request("The message is empty.").param("content"));
            }
            if text.chars().count() > MAX_MESSAGE_CHARS {
                return Err(too_long("content"));
            }
            if let Some(p) = parent {
                if !messages.iter().any(|m| &m.id == p) {
                    return Err(ApiError::bad_request("Unknown parent message.").param("parent_id"));
                }
            }
            // Render before storing, so a prompt that cannot fit is refused
            // without leaving an unanswered message behind.
            let m = Message {
                id: "pending".into(),
                parent_id: parent.clone(),
                role: "user".into(),
                content: text.clone(),
                status: "done".into(),
                model: None,
                created_at: 0,
                sources: None,
            };
            messages.push(m);
            "pending".to_string()
        }
        (None, Some(p)) => match messages.iter().find(|m| &m.id == p) {
            Some(m) if m.role == "user" => p.clone(),
            _ => {
                return Err(ApiError::bad_request(
                    "To regenerate, give the user message to answer as parent_id.",
                )
                .param("parent_id"))
            }
        },
        (None, None) => {
            return Err(
                ApiError::bad_request("Give 'content', or 'parent_id' to regenerate.")
                    .param("content"),
            )
        }
    };
    // Search mode: the conversation answers from knowledge bases, one
    // question at a time, with checked citations (`crate::search`).
    let kbs = crate::search::conversation_kbs(&conv.params)?;
    let mut grounding = None;
    let mut declined = None;
    let mut turns = Vec::new();
    if kbs.is_empty() {
        // The prompt: system prompt + the branch down to the message answered.
        if !conv.system_prompt.trim().is_empty() {
            turns.push(hanlin_tokenizer::Message::new(
                "system",
                &conv.system_prompt,
            ));
        }
        for m in path_to(&messages, &answer_to) {
            if m.role == "user" || (m.role == "assistant" && !m.content.is_empty()) {
                turns.push(hanlin_tokenizer::Message::new(&m.role, &m.content));
            }
        }
    } else {
        let question = path_to(&messages, &answer_to)
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        crate::search::check_readable(&st, &s.user, &kbs).await?;
        let passages = crate::search::retrieve(&st, kbs, question.clone(), 5).await?;
        match answer::plan(&question, passages, hanlin_accounts::now()) {
            answer::Plan::Decline(g) => declined = Some(g.checked.text),
            answer::Plan::Generate {
                system,
                user,
                passages,
            } => {
                turns.push(hanlin_tokenizer::Message::new("system", system));
                turns.push(hanlin_tokenizer::Message::new("user", user));
                grounding = Some((question, passages));
            }
        }
    }
    let mut generation = None;
    if declined.is_none() {
        let prompt = crate::api::chat_prompt(&sched, turns, None).await?;
        let sampling: crate::openai::Sampling = serde_json::from_value(conv.params.clone())
            .map_err(|e| ApiError::bad_request(format!("Invalid sampling settings: {e}")))?;
        let asked = conv
            .params
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map(|n| n.min(u32::MAX as u64) as u32);
        let max_new = budget(
            &sched,
            &caller,
            prompt.len(),
            asked,
            Some(2048),
            "max_tokens",
        )?;
        let mut params = sampling.to_params(max_new, false, 0)?;
        if grounding.is_some() {
            // Answers from sources are read off them, not invented.
            params.sampler.temperature = 0.0;
        }
        request.reserve(prompt.len() + max_new).await?;
        generation = Some((prompt, params));
    }
    // Now store: the user's message (if new) and the reply being written.
    let parent_of_reply = if b.content.is_some() {
        // (A failure here drops `request`, which frees its reservation.)
        let m = st
            .db
            .add_message(
                &s.user.id,
                &id,
                b.parent_id.as_deref(),
                "user",
                b.content.as_deref().unwrap_or(""),
                "done",
                None,
            )
            .await
            .map_err(account_error)?;
        let id = m.id.clone();
        user_msg = Some(m);
        id
    } else {
        answer_to.clone()
    };
    let first_turn = b.content.is_some() && b.parent_id.is_none();
    let reply = st
        .db
        .add_message(
            &s.user.id,
            &id,
            Some(&parent_of_reply),
            "assistant",
            declined.as_deref().unwrap_or(""),
            if declined.is_some() {
                "done"
            } else {
                "streaming"
            },
            Some(&conv.model),
        )
        .await
        .map_err(account_error)?;
    if first_turn && (conv.title == "New chat" || conv.title.is_empty()) {
        if let Some(u) = &user_msg {
            let patch = ConversationPatch {
                title: Some(hanlin_accounts::chats::title_from(&u.content)),
                ..Default::default()
            };
            let _ = st.db.update_conversation(&s.user.id, &id, &patch).await;
        }
    }
    let (out_tx, out_rx) = mpsc::channel::<Value>(64);
    match generation {
        Some((prompt, params)) => {
            let mut request = request.with_id(format!("web-{}", reply.id));
            if let Err(e) = request.submit(&*sched, vec![Work::generate(prompt, params)]) {
                let _ = st.db.update_message(&id, &reply.id, "", "error").await;
                return Err(e.into());
            }
            let _ = out_tx.try_send(json!({"type": "user", "message": user_msg}));
            let _ = out_tx.try_send(json!({"type": "assistant", "message": reply}));
            tokio::spawn(drive_reply(
                st.clone(),
                Reply {
                    conv_id: id,
                    reply_id: reply.id.clone(),
                    grounding,
                },
                request,
                out_tx,
            ));
        }
        None => {
            // Declined (nothing in the knowledge bases covers the question):
            // the reply is already complete. The request is recorded.
            request.record(Default::default());
            request.finish().await;
            let sources = json!([]);
            let _ = st.db.set_message_sources(&id, &reply.id, &sources).await;
            let _ = out_tx.try_send(json!({"type": "user", "message": user_msg}));
            let _ = out_tx.try_send(json!({"type": "assistant", "message": reply}));
            let _ = out_tx.try_send(json!({"type": "done", "status": "done", "id": reply.id, "content": reply.content, "sources": sources}));
        }
    }
    let stream = futures::stream::unfold(out_rx, |mut rx| async move {
        let v = rx.recv().await?;
        Some((sse_data(v), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}

/// The reply a [`drive_reply`] writes.
struct Reply {
    conv_id: String,
    reply_id: String,
    /// Search mode: the question and the passages the prompt numbered;
    /// the citations are checked against them when the reply ends.
    grounding: Option<(String, Vec<hanlin_search::Passage>)>,
}

/// Turn the request's events into `delta`s for the page, keep the
/// database's copy of the reply current; the request meters itself.
async fn drive_reply(
    st: Arc<AppState>,
    reply: Reply,
    mut request: Request,
    out: mpsc::Sender<Value>,
) {
    let Reply {
        conv_id,
        reply_id,
        grounding,
    } = reply;
    let mut text = String::new();
    let mut status = "incomplete";
    let mut error: Option<String> = None;
    let mut saved = Instant::now();
    let mut saved_len = 0usize;
    loop {
        let (_, ev) = tokio::select! {
            ev = request.next() => match ev {
                Some(ev) => ev,
                None => break,
            },
            _ = out.closed() => break,
        };
        match ev {
            Event::Token { text: t, .. } => {
                text.push_str(&t);
                if !t.is_empty() && out.send(json!({"type": "delta", "text": t})).await.is_err() {
                    break;
                }
                if saved.elapsed() >= SAVE_EVERY && text.len() != saved_len {
                    if let Err(e) = st
                        .db
                        .update_message(&conv_id, &reply_id, &text, "streaming")
                        .await
                    {
                        tracing::warn!("saving reply {reply_id}: {e}");
                    }
                    saved = Instant::now();
                    saved_len = text.len();
                }
            }
            Event::Done { finish, .. } => {
                status = if finish == hanlin_engine::FinishReason::Cancelled {
                    "incomplete"
                } else {
                    "done"
                };
                break;
            }
            Event::Failed(msg) => {
                status = "error";
                error = Some(msg);
                break;
            }
            Event::Started { .. }
            | Event::Embedding(_)
            | Event::Queued { .. }
            | Event::Prefill { .. } => {}
        }
    }
    // Free the sequence now if it still runs (the client left), and settle
    // the usage while the reply is saved.
    let settled = tokio::spawn(request.finish());
    // Search mode: unsupported citations go, supported sentences get theirs.
    let mut sources = None;
    if let Some((question, passages)) = grounding.filter(|_| status != "error") {
        let g = answer::finish(&question, &text, passages);
        sources = Some(Value::Array(crate::search::cited_sources(&g)));
        text = g.checked.text;
    }
    // The final text, retried: what the user saw must not be lost.
    let mut delay = Duration::from_millis(100);
    for attempt in 0..8 {
        match st
            .db
            .update_message(&conv_id, &reply_id, &text, status)
            .await
        {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(attempt, "saving reply {reply_id}: {e}");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    if let Some(v) = &sources {
        if let Err(e) = st.db.set_message_sources(&conv_id, &reply_id, v).await {
            tracing::warn!("saving the sources of {reply_id}: {e}");
        }
    }
    let _ = out
        .send(match (&error, sources) {
            (Some(msg), _) => json!({"type": "error", "message": msg}),
            (None, None) => json!({"type": "done", "status": status, "id": reply_id}),
            (None, Some(sources)) => {
                json!({"type": "done", "status": status, "id": reply_id, "content": text, "sources": sources})
            }
        })
        .await;
    drop(out);
    if let Err(e) = settled.await {
        tracing::error!("settling reply {reply_id}: {e}");
    }
}

/// `GET /api/kb`: the knowledge bases a conversation can search.
pub async fn knowledge_bases(
    State(st): State<Arc<AppState>>,
    WebRead(s): WebRead,
) -> AppResult<Json<Value>> {
    Ok(Json(
        json!({"object": "list", "data": crate::search::kb_list(&st, &s.user).await?}),
    ))
}

// ---------------------------------------------------------------- export / import

#[derive(Deserialize)]
pub struct ExportQuery {
    format: Option<String>,
}

pub async fn export_conversation(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<ExportQuery>,
    WebRead(s): WebRead,
) -> AppResult<Response> {
    let c = st
        .db
        .conversation(&s.user.id, &id)
        .await?
        .ok_or_else(not_found)?;
    let messages = st.db.messages(&s.user.id, &id).await?.unwrap_or_default();
    let safe_name: String = c
        .title
        .chars()
        .map(|ch| if ch.is_alphanumeric() { ch } else { '_' })
        .take(60)
        .collect();
    let (body, mime, ext) = match q.format.as_deref().unwrap_or("markdown") {
        "json" => (
            serde_json::to_string_pretty(&json!({"conversation": c, "messages": messages}))
                .map_err(|e| ApiError::internal(e.to_string()))?,
            "application/json",
            "json",
        ),
        "markdown" | "md" => {
            let leaf = c
                .current_leaf
                .clone()
                .or_else(|| messages.last().map(|m| m.id.clone()))
                .unwrap_or_default();
            let mut md = format!("# {}\n\n", c.title);
            if !c.system_prompt.is_empty() {
                md.push_str(&format!("**System:** {}\n\n", c.system_prompt));
            }
            for m in path_to(&messages, &leaf) {
                let who = match m.role.as_str() {
                    "user" => "User",
                    "assistant" => "Assistant",
                    _ => "System",
                };
                let note = if m.status == "incomplete" {
                    " (incomplete)"
                } else {
                    ""
                };
                md.push_str(&format!("## {who}{note}\n\n{}\n\n", m.content));
            }
            (md, "text/markdown; charset=utf-8", "md")
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "Unknown format {other:?}: use markdown or json."
            ))
            .param("format"))
        }
    };
    let disposition = format!("attachment; filename=\"{safe_name}.{ext}\"");
    let mut r = Response::new(Body::from(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

/// Conversations from a ChatGPT data export (`conversations.json`): an
/// array of `{title, create_time, update_time, mapping: {id: {message,
/// parent, children}}, current_node}`. Everything is checked before
/// anything is stored, and stored in one transaction.
pub fn parse_chatgpt_export(v: &Value) -> Result<Vec<ImportConversation>, String> {
    let list = v
        .as_array()
        .ok_or("conversations.json must be a JSON array of conversations")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let at = |what: &str| format!("conversation {i}: {what}");
        let mapping = c
            .get("mapping")
            .and_then(Value::as_object)
            .ok_or_else(|| at("no 'mapping' object"))?;
        let title = c
            .get("title")
            .and_then(Value::as_str)
            .filter(|t| !t.trim().is_empty())
            .unwrap_or("Imported chat")
            .to_string();
        let time = |k: &str| c.get(k).and_then(Value::as_f64).map(|t| t as i64);
        let created_at = time("create_time").unwrap_or_else(hanlin_accounts::now);
        let updated_at = time("update_time").unwrap_or(created_at);
        // Walk from the roots so parents come first; nodes without a
        // message (ChatGPT's root) are skipped and their children attach
        // to the nearest kept ancestor.
        let mut roots: Vec<&String> = mapping
            .iter()
            .filter(|(_, n)| {
                n.get("parent")
                    .and_then(Value::as_str)
                    .is_none_or(|p| !mapping.contains_key(p))
            })
            .map(|(k, _)| k)
            .collect();
        roots.sort();
        let mut messages = Vec::new();
        let mut stack: Vec<(&String, Option<String>)> =
            roots.into_iter().rev().map(|r| (r, None)).collect();
        let mut seen = std::collections::HashSet::new();
        while let Some((node_id, parent)) = stack.pop() {
            if !seen.insert(node_id.clone()) {
                return Err(at("the message tree has a cycle"));
            }
            let node = &mapping[node_id];
            let mut kept_parent = parent.clone();
            if let Some(m) = node.get("message").filter(|m| !m.is_null()) {
                let role = m
                    .pointer("/author/role")
                    .and_then(Value::as_str)
                    .ok_or_else(|| at("a message without author.role"))?;
                let parts = m.pointer("/content/parts").and_then(Value::as_array);
                let text = match parts {
                    Some(ps) => ps
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    None => m
                        .pointer("/content/text")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                };
                let role = match role {
                    "user" | "assistant" | "system" => role,
                    _ => "",
                };
                // Tool output and empty system stubs are not conversation turns.
                let stub = role == "system" && text.trim().is_empty();
                if !role.is_empty() && !stub {
                    if text.chars().count() > MAX_MESSAGE_CHARS {
                        return Err(at("a message is longer than the limit"));
                    }
                    messages.push(Message {
                        id: node_id.clone(),
                        parent_id: parent,
                        role: role.to_string(),
                        content: text,
                        status: "done".into(),
                        model: m
                            .pointer("/metadata/model_slug")
                            .and_then(Value::as_str)
                            .map(String::from),
                        created_at: m
                            .get("create_time")
                            .and_then(Value::as_f64)
                            .map(|t| t as i64)
                            .unwrap_or(created_at),
                        sources: None,
                    });
                    kept_parent = Some(node_id.clone());
                }
            }
            let children = node
                .get("children")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>())
                .unwrap_or_default();
            for ch in children.into_iter().rev() {
                let Some((k, _)) = mapping.get_key_value(ch) else {
                    return Err(at(&format!("child {ch:?} is not in the mapping")));
                };
                stack.push((k, kept_parent.clone()));
            }
        }
        // The shown branch ends at current_node, or at its nearest kept ancestor.
        let mut leaf = c
            .get("current_node")
            .and_then(Value::as_str)
            .map(String::from);
        while let Some(l) = leaf.clone() {
            if messages.iter().any(|m| m.id == l) {
                break;
            }
            leaf = mapping
                .get(&l)
                .and_then(|n| n.get("parent"))
                .and_then(Value::as_str)
                .map(String::from);
        }
        out.push(ImportConversation {
            title,
            created_at,
            updated_at,
            messages,
            current_leaf: leaf,
        });
    }
    Ok(out)
}

pub async fn import(
    State(st): State<Arc<AppState>>,
    WebWrite(s): WebWrite,
    JsonBody(v): JsonBody<Value>,
) -> AppResult<Json<Value>> {
    let convs = parse_chatgpt_export(&v).map_err(|e| {
        ApiError::bad_request(format!(
            "This is not a ChatGPT export we can read: {e}. Nothing was imported."
        ))
        .code("invalid_import")
    })?;
    let n = st
        .db
        .import_conversations(&s.user.id, &st.config.default_model, &convs)
        .await
        .map_err(|e| match e {
            hanlin_accounts::AccountError::Invalid(m) => {
                ApiError::bad_request(format!("{m}. Nothing was imported.")).code("invalid_import")
            }
            other => other.into(),
        })?;
    Ok(Json(json!({"imported": n})))
}

// ---------------------------------------------------------------- personas, keys, usage

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonaBody {
    name: String,
    prompt: String,
}

pub async fn personas(
    State(st): State<Arc<AppState>>,
    WebRead(s): WebRead,
) -> AppResult<Json<Value>> {
    Ok(Json(json!({"data": st.db.personas(&s.user.id).await?})))
}

pub async fn create_persona(
    State(st): State<Arc<AppState>>,
    WebWrite(s): WebWrite,
    JsonBody(b): JsonBody<PersonaBody>,
) -> AppResult<Json<Value>> {
    let p = st
        .db
        .put_persona(&s.user.id, None, &b.name, &b.prompt)
        .await
        .map_err(account_error)?;
    Ok(Json(json!(p)))
}

pub async fn put_persona(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    WebWrite(s): WebWrite,
    JsonBody(b): JsonBody<PersonaBody>,
) -> AppResult<Json<Value>> {
    let p = st
        .db
        .put_persona(&s.user.id, Some(&id), &b.name, &b.prompt)
        .await
        .map_err(account_error)?
        .ok_or_else(|| ApiError::not_found("No such persona."))?;
    Ok(Json(json!(p)))
}

pub async fn delete_persona(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    WebWrite(s): WebWrite,
) -> AppResult<Json<Value>> {
    if !st.db.delete_persona(&s.user.id, &id).await? {
        return Err(ApiError::not_found("No such persona."));
    }
    Ok(Json(json!({"deleted": true})))
}

pub async fn my_keys(
    State(st): State<Arc<AppState>>,
    WebRead(s): WebRead,
) -> AppResult<Json<Value>> {
    Ok(Json(json!({"data": st.db.keys(Some(&s.user.id)).await?})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    name: Option<String>,
    expires_in_days: Option<i64>,
}

pub async fn create_my_key(
    State(st): State<Arc<AppState>>,
    WebWrite(s): WebWrite,
    JsonBody(b): JsonBody<KeyBody>,
) -> AppResult<Json<Value>> {
    if b.expires_in_days.is_some_and(|d| d <= 0 || d > 36_500) {
        return Err(
            ApiError::bad_request("expires_in_days is 1 to 36500.").param("expires_in_days")
        );
    }
    let opts = NewKey {
        name: b.name.unwrap_or_default().chars().take(100).collect(),
        models: None,
        expires_at: b
            .expires_in_days
            .map(|d| hanlin_accounts::now() + d * 86_400),
    };
    let (key, secret) = st.db.create_key(&s.user.id, &opts).await?;
    Ok(Json(json!({"key": key, "secret": secret})))
}

pub async fn revoke_my_key(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    WebWrite(s): WebWrite,
) -> AppResult<Json<Value>> {
    match st.db.key(&id).await? {
        Some(k) if k.user_id == s.user.id => {
            st.db.revoke_key(&id).await.map_err(account_error)?;
            Ok(Json(json!({"revoked": true, "id": id})))
        }
        _ => Err(ApiError::not_found("No such key.")),
    }
}

pub async fn my_usage(
    State(st): State<Arc<AppState>>,
    WebRead(s): WebRead,
) -> AppResult<Json<Value>> {
    let plan = st.db.plan(&s.user.plan).await?;
    let rows = st.db.usage(Some(&s.user.name), None).await?;
    let today = hanlin_accounts::day_of(hanlin_accounts::now());
    let spent = st.db.tokens_on(&s.user.id, &today).await?;
    Ok(Json(
        json!({"plan": plan, "today": today, "tokens_today": spent, "data": rows}),
    ))
}

/// For the admin API: the cookie session of an admin (the web app's admin
/// screens), checked like a key: `Ok(None)` when the request has no cookie.
pub async fn admin_session(
    st: &AppState,
    headers: &HeaderMap,
    method: &Method,
) -> AppResult<Option<()>> {
    let jar = CookieJar::from_headers(headers);
    if jar.get(COOKIE).is_none() {
        return Ok(None);
    }
    let s = session(st, &jar, headers, method != Method::GET).await?;
    if s.user.role != Role::Admin {
        return Err(ApiError::forbidden("This needs an admin account."));
    }
    Ok(Some(()))
}
