//! The web app's image mode: `POST /api/conversations/{id}/images` draws
//! the prompt with the server's image model and keeps the picture in the
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
        start: None,
    };
    let images::Prepared {
        mut request,
        queue,
        model,
        requests,
        revised,
    } = images::prepare(&st, &caller, None, &ask, Endpoint::Images).await?;
    let prompt = ask.prompt.trim().to_string();
    let user_msg = st
        .db
        .add_message(
            &s.user.id,
            &conv.id,
            b.parent_id.as_deref(),
            MessageRole::User,
            &prompt,
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
