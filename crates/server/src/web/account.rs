//! What a signed-in user manages for themselves: personas, API keys, usage.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonaBody {
    name: String,
    prompt: String,
    #[serde(default)]
    voice: String,
    #[serde(default)]
    look: String,
}

impl PersonaBody {
    /// Its voice and look, each empty or one the voice mode has.
    fn style(&self) -> AppResult<hanlin_accounts::chats::PersonaStyle<'_>> {
        if !self.voice.is_empty() && hanlin_speech::tts::voice(&self.voice).is_none() {
            return Err(
                ApiError::bad_request(format!("Unknown voice {:?}.", self.voice)).param("voice"),
            );
        }
        if !self.look.is_empty() && !super::voice::LOOKS.contains(&self.look.as_str()) {
            return Err(
                ApiError::bad_request(format!("Unknown look {:?}.", self.look)).param("look"),
            );
        }
        Ok(hanlin_accounts::chats::PersonaStyle {
            voice: &self.voice,
            look: &self.look,
        })
    }
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
        .put_persona(&s.user.id, None, &b.name, &b.prompt, b.style()?)
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
        .put_persona(&s.user.id, Some(&id), &b.name, &b.prompt, b.style()?)
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
    let spent = st.db.spent_on(&s.user.id, &today).await?;
    Ok(Json(json!({
        "plan": plan,
        "today": today,
        "tokens_today": spent.tokens,
        "images_today": spent.images,
        "data": rows,
    })))
}
