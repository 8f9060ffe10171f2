//! The web app's image mode: `POST /api/conversations/{id}/images` draws
//! the prompt with the server's image model, or redraws a picture the user
//! sent or drew before (image-to-image), and keeps the picture in the
//! conversation. The same checks, queue and metering as
//! `/v1/images/generations` (`crate::images`); the events: `user`,
//! `assistant` (the stored records), `progress` (step, steps and a small
//! preview of the latents) …, then `done` (the message's final text, which
//! shows the image, and — when the chat model put a Chinese prompt into
//! English for an English-only model — that prompt on a line starting
//! `> 🖋`) or `error`. The image is the user's file, named after
//! the conversation, and goes with it.

use super::conversations::not_found;
use super::session::web_caller;
use crate::error::ApiError;
use crate::extract::{JsonBody, WebWrite};
use crate::images::{self, Ask, Gone};
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use hanlin_accounts::chats::{MessageRole, MessageStatus};
use hanlin_gateway::Endpoint;
use hanlin_image::picture;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

type AppResult<T> = Result<T, ApiError>;

#[derive(Deserialize)]
pub struct ImageAsk {
    prompt: String,
    parent_id: Option<String>,
    negative_prompt: Option<String>,
    size: Option<String>,
    seed: Option<u64>,
    steps: Option<usize>,
    /// A picture to redraw (image-to-image; its transparent pixels, if
    /// any, are painted and the rest kept): a PNG as a `data:` URL (the app
    /// converts other formats), or one of the user's stored pictures as
    /// `/v1/files/{id}/content`.
    image: Option<String>,
    /// How far the picture is noised before it is redrawn (above 0, at
    /// most 1; default 0.8, or 1 where transparent).
    strength: Option<f32>,
}

/// The largest body of an image-mode request: a PNG of
/// [`picture::MAX_PICTURE_BYTES`] in base64, and the rest.
pub const MAX_ASK_BYTES: usize = picture::MAX_PICTURE_BYTES / 3 * 4 + (1 << 20);

/// Where the picture to redraw comes from.
enum Source {
    /// Sent with the request: kept as the user's file once the request is
    /// admitted.
    Sent(Vec<u8>),
    /// One of the user's stored pictures, by its URL.
    Stored(String),
}

fn bad_image(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).param("image")
}

/// The picture `spec` names, decoded, and where it comes from.
async fn source_picture(
    st: &AppState,
    user_id: &str,
    spec: &str,
) -> AppResult<(picture::Picture, Source)> {
    use base64::Engine;
    // The bytes, and the stored picture's URL when it is one.
    let (bytes, stored) = if let Some(b64) = spec.strip_prefix("data:image/png;base64,") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| bad_image("The picture is not valid base64."))?;
        (bytes, None)
    } else if let Some(id) = spec
        .strip_prefix("/v1/files/")
        .and_then(|r| r.strip_suffix("/content"))
    {
        let f = st
            .db
            .file(id, Some(user_id))
            .await?
            .ok_or_else(|| bad_image(format!("No such picture: {id}.")))?;
        if f.bytes as usize > picture::MAX_PICTURE_BYTES {
            return Err(bad_image("The picture is larger than 16 MB."));
        }
        let bytes = tokio::fs::read(crate::files::path_of(st, &f.id))
            .await
            .map_err(|_| bad_image(format!("No such picture: {id}.")))?;
        (bytes, Some(spec.to_string()))
    } else if spec.starts_with("data:") {
        return Err(bad_image("Send the picture as a PNG data URL."));
    } else {
        return Err(bad_image(
            "'image' is a PNG data URL or /v1/files/{id}/content of your picture.",
        ));
    };
    if bytes.len() > picture::MAX_PICTURE_BYTES {
        return Err(bad_image("The picture is larger than 16 MB."));
    }
    let (pic, bytes) =
        tokio::task::spawn_blocking(move || picture::Picture::from_png(&bytes).map(|p| (p, bytes)))
            .await
            .map_err(|e| ApiError::internal(format!("reading the picture failed: {e}")))?
            .map_err(|e| bad_image(format!("'image': {e}.")))?;
    Ok((pic, stored.map_or(Source::Sent(bytes), Source::Stored)))
}

/// Starts the line of an image reply that gives the English prompt the
/// chat model wrote for the image model.
pub(crate) const REVISED_MARK: &str = "🖋";

/// The file name prefix of a conversation's images.
pub(crate) fn file_prefix(conv_id: &str) -> String {
    format!("conv-{conv_id}-")
}

pub async fn conversation_image(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    WebWrite(s): WebWrite,
    JsonBody(b): JsonBody<ImageAsk>,
) -> AppResult<Response> {
    let conv = st
        .db
        .conversation(&s.user.id, &id)
        .await?
        .ok_or_else(not_found)?;
    let caller = web_caller(&st, &s).await?;
    let source = match b.image.as_deref().map(str::trim).filter(|i| !i.is_empty()) {
        Some(spec) => Some(source_picture(&st, &s.user.id, spec).await?),
        None => None,
    };
    let (start, source) = match source {
        Some((pic, source)) => (
            Some(picture::Start::new(pic, None, b.strength).map_err(|e| {
                ApiError::bad_request(format!("'strength': {e}.")).param("strength")
            })?),
            Some(source),
        ),
        None => (None, None),
    };
    if let Some(p) = &b.parent_id {
        let known = st.db.messages(&s.user.id, &id).await?.unwrap_or_default();
        if !known.iter().any(|m| &m.id == p) {
            return Err(ApiError::bad_request("Unknown parent message.").param("parent_id"));
        }
    }
    let ask = Ask {
        prompt: b.prompt,
        negative: b.negative_prompt,
        n: 1,
        size: b.size,
        quality: None,
        steps: b.steps,
        guidance: None,
        sampler: None,
        seed: b.seed,
        revise: true,
        start,
    };
    let images::Prepared {
        mut request,
        queue,
        model,
        requests,
        revised,
    } = images::prepare(&st, &caller, None, &ask, Endpoint::Images).await?;
    let prompt = ask.prompt.trim().to_string();
    // The user's message shows the picture redrawn, then the prompt.
    let shown = match source {
        Some(Source::Sent(png)) => {
            let name = format!(
                "{}source-{}.png",
                file_prefix(&conv.id),
                hanlin_accounts::random_token(12)
            );
            let id = images::keep_image(&st, &s.user.id, &name, &png).await?;
            format!("![picture](/v1/files/{id}/content)\n\n{prompt}")
        }
        Some(Source::Stored(url)) => format!("![picture]({url})\n\n{prompt}"),
        None => prompt.clone(),
    };
    let user_msg = st
        .db
        .add_message(
            &s.user.id,
            &conv.id,
            b.parent_id.as_deref(),
            MessageRole::User,
            &shown,
            MessageStatus::Done,
            None,
        )
        .await?;
    let reply = st
        .db
        .add_message(
            &s.user.id,
            &conv.id,
            Some(&user_msg.id),
            MessageRole::Assistant,
            "",
            MessageStatus::Streaming,
            Some(&model),
        )
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(16);
    let user_id = s.user.id.clone();
    tokio::spawn(async move {
        let _ = tx.send(json!({"type": "user", "message": user_msg})).await;
        let _ = tx
            .send(json!({"type": "assistant", "message": reply}))
            .await;
        let gone = Gone(Arc::new(AtomicBool::new(false)));
        let Some(r) = requests.into_iter().next() else {
            return;
        };
        let (seed, w, h, steps) = (r.seed, r.width, r.height, r.steps);
        let made = tokio::select! {
            m = images::generate(&queue, &mut request, caller.plan.priority, r, &gone.0, Some(tx.clone())) => Some(m),
            _ = tx.closed() => None,
        };
        // The client left: the job stops at its next step (`gone`).
        drop(gone);
        let (content, status, error) = match made {
            Some(Ok(png)) => {
                let name = format!("{}{}.png", file_prefix(&conv.id), reply.id);
                match images::keep_image(&st, &user_id, &name, &png).await {
                    Ok(file) => {
                        let alt: String = prompt
                            .chars()
                            .filter(|c| !matches!(c, '[' | ']' | '\n' | '\r'))
                            .take(100)
                            .collect();
                        // The chat model's English prompt (one line), on a
                        // line of its own the app recognises (to offer
                        // editing it).
                        let used = revised
                            .as_deref()
                            .map(|r| format!("\n\n> {REVISED_MARK} {r}"))
                            .unwrap_or_default();
                        (
                            format!(
                                "![{alt}](/v1/files/{file}/content)\n\n*seed {seed} · {w}×{h} · {} steps · {}*{used}",
                                steps, model
                            ),
                            MessageStatus::Done,
                            None,
                        )
                    }
                    Err(e) => (String::new(), MessageStatus::Error, Some(e.message.clone())),
                }
            }
            Some(Err(e)) => (String::new(), MessageStatus::Error, Some(e.message.clone())),
            None => (String::new(), MessageStatus::Incomplete, None),
        };
        if let Err(e) = st
            .db
            .update_message(&conv.id, &reply.id, &content, status)
            .await
        {
            tracing::warn!("saving image reply {}: {e}", reply.id);
        }
        let _ = tx
            .send(match error {
                Some(msg) => json!({"type": "error", "message": msg}),
                None => {
                    json!({"type": "done", "status": status, "id": reply.id, "content": content})
                }
            })
            .await;
        request.finish().await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        Some((
            Ok::<_, Infallible>(SseEvent::default().data(v.to_string())),
            rx,
        ))
    });
    Ok(Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}

/// Delete the images a conversation kept (when it is deleted).
pub(crate) async fn drop_conversation_images(st: &AppState, user_id: &str, conv_id: &str) {
    let prefix = file_prefix(conv_id);
    match st
        .db
        .files(user_id, Some(images::IMAGE_PURPOSE), None, true, 100_000)
        .await
    {
        Ok(files) => {
            for f in files.iter().filter(|f| f.filename.starts_with(&prefix)) {
                if let Err(e) = crate::files::remove(st, &f.id).await {
                    tracing::warn!("deleting image {}: {}", f.id, e.message);
                }
            }
        }
        Err(e) => tracing::warn!("listing the images of {conv_id}: {e}"),
    }
}
