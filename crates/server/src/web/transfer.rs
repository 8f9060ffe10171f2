//! Export (Markdown, JSON) and import (a ChatGPT data export).

use super::*;

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
    let (c, messages) = owned_conversation(&st, &s.user.id, &id).await?;
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
                use hanlin_accounts::chats::{MessageRole, MessageStatus};
                let who = match m.role {
                    MessageRole::User => "User",
                    MessageRole::Assistant => "Assistant",
                    MessageRole::System => "System",
                };
                let note = if m.status == MessageStatus::Incomplete {
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

pub async fn import(
    State(st): State<Arc<AppState>>,
    WebWrite(s): WebWrite,
    JsonBody(v): JsonBody<Value>,
) -> AppResult<Json<Value>> {
    let convs = hanlin_accounts::chatgpt::parse_chatgpt_export(&v).map_err(|e| {
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
