//! Signing in and out: the session cookie and its CSRF token, the setup
//! token, the sign-up policy, throttled sign-in; the signed-in user.

use super::*;

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

/// The caller the web app acts as: the user, their plan, and a pseudo-key
/// `web` (usage from the web app is metered under it).
pub(crate) async fn web_caller(st: &AppState, s: &Session) -> AppResult<Caller> {
    let plan = st.db.plan(&s.user.plan).await?;
    Ok(Caller::web(s.user.clone(), plan))
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
    // What a persona may speak with and look like in voice mode.
    v["voices"] = json!(hanlin_speech::tts::VOICES
        .iter()
        .map(|v| v.name)
        .collect::<Vec<_>>());
    v["looks"] = json!(super::voice::LOOKS);
    // Kokoro is pulled: the voice mode offers its natural voice.
    v["natural_voice"] = json!(st.speech.has_kokoro());
    // An image model is there: the composer offers image mode.
    v["image_model"] = json!(st.images.default_name());
    Ok(Json(v))
}

pub async fn models(
    State(st): State<Arc<AppState>>,
    WebRead(s): WebRead,
) -> AppResult<Json<Value>> {
    let plan = st.db.plan(&s.user.plan).await?;
    let data: Vec<String> = crate::api::all_models(&st)
        .into_iter()
        .map(|(name, _)| name)
        // Chat models only: the speech recognizer is not one.
        .filter(|n| plan.allows(n) && !crate::audio::Speech::is_audio_model(n))
        .collect();
    Ok(Json(
        json!({"data": data, "default": st.config.default_model}),
    ))
}

/// For the admin API: the cookie session of an admin (the web app's admin
/// screens), checked like a key: `Ok(None)` when the request has no cookie.
pub async fn admin_session(
    st: &AppState,
    headers: &HeaderMap,
    method: &Method,
) -> AppResult<Option<hanlin_accounts::User>> {
    let jar = CookieJar::from_headers(headers);
    if jar.get(COOKIE).is_none() {
        return Ok(None);
    }
    let s = session(st, &jar, headers, method != Method::GET).await?;
    if s.user.role != Role::Admin {
        return Err(ApiError::forbidden("This needs an admin account."));
    }
    Ok(Some(s.user))
}

/// `GET /api/tools`: the tools the user may switch on in a conversation.
pub async fn tools(State(st): State<Arc<AppState>>, WebRead(s): WebRead) -> Json<Value> {
    Json(crate::tools::available(&st, &s.user.name, &s.user.plan))
}
