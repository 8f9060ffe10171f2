//! Conversations and their replies: stored trees of messages, and a reply
//! generated through the metered generation path and saved as it streams.

use super::*;
use crate::chat_model::ChatModel;
use hanlin_accounts::chats::{MessageRole, MessageStatus};

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

pub(crate) fn not_found() -> ApiError {
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
    let (c, messages) = owned_conversation(&st, &s.user.id, &id).await?;
    Ok(Json(json!({"conversation": c, "messages": messages})))
}

/// Conversation `id` of `user_id` with its messages (404 when it is not
/// theirs).
pub(super) async fn owned_conversation(
    st: &AppState,
    user_id: &str,
    id: &str,
) -> AppResult<(hanlin_accounts::chats::Conversation, Vec<Message>)> {
    let c = st
        .db
        .conversation(user_id, id)
        .await?
        .ok_or_else(not_found)?;
    let messages = st.db.messages(user_id, id).await?.unwrap_or_default();
    Ok((c, messages))
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
    super::images::drop_conversation_images(&st, &s.user.id, &id).await;
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
    pub content: Option<String>,
    /// Where the new message goes: the previous assistant message (None
    /// for the first), or, when regenerating, the user message to answer.
    pub parent_id: Option<String>,
}

/// The messages from the root down to `leaf`.
pub(super) fn path_to<'a>(messages: &'a [Message], leaf: &str) -> Vec<&'a Message> {
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
    let events = start_reply(
        &st,
        Ask {
            caller,
            conv,
            send: b,
            endpoint: Endpoint::Web,
            history: None,
        },
    )
    .await?;
    let stream = futures::stream::unfold(events, |mut rx| async move {
        let v = rx.recv().await?;
        Some((sse_data(v), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}

/// A reply to write: who asks, in which conversation, what.
pub(crate) struct Ask {
    pub caller: Caller,
    pub conv: hanlin_accounts::chats::Conversation,
    pub send: Send,
    /// Usage rows and metrics name it (the web app, a channel).
    pub endpoint: Endpoint,
    /// Keep at most this many earlier messages of the branch, and drop the
    /// oldest while the prompt leaves too little room for the answer
    /// (`None`: a prompt that does not fit is refused, as the web app
    /// shows the whole branch).
    pub history: Option<usize>,
}

/// Store the user's message and start the reply through the metered
/// path; the one lifecycle of a conversation reply, for the web app and
/// messaging channels alike. Everything that can refuse the message is
/// checked before anything is stored. The reply's events: `user`,
/// `assistant` (the stored records), `delta`…, then `done` or `error`;
/// dropping the receiver stops the reply (kept as incomplete).
pub(crate) async fn start_reply(st: &Arc<AppState>, ask: Ask) -> AppResult<mpsc::Receiver<Value>> {
    let Ask {
        caller,
        conv,
        send: b,
        endpoint,
        history,
    } = ask;
    let id = conv.id.clone();
    let user_id = caller.user.id.clone();
    let model = ChatModel::of(st, &caller, &conv.model).await?;
    let mut request = st.gw.admit(&caller, endpoint, &conv.model).await?;
    let mut messages = st.db.messages(&user_id, &id).await?.unwrap_or_default();
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
                role: MessageRole::User,
                content: text.clone(),
                status: MessageStatus::Done,
                model: None,
                created_at: 0,
                sources: None,
                tools: None,
            };
            messages.push(m);
            "pending".to_string()
        }
        (None, Some(p)) => match messages.iter().find(|m| &m.id == p) {
            Some(m) if m.role == MessageRole::User => p.clone(),
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
    let search_mode = !kbs.is_empty();
    if !search_mode {
        // The prompt: system prompt + the branch down to the message answered.
        if !conv.system_prompt.trim().is_empty() {
            turns.push(hanlin_tokenizer::Message::new(
                "system",
                &conv.system_prompt,
            ));
        }
        for m in path_to(&messages, &answer_to) {
            if m.role == MessageRole::User
                || (m.role == MessageRole::Assistant && !m.content.is_empty())
            {
                turns.push(hanlin_tokenizer::Message::new(m.role.as_str(), &m.content));
            }
        }
        if let Some(keep) = history {
            fit_history(&model, &caller, &mut turns, keep, &conv.params).await?;
        }
    } else {
        let question = path_to(&messages, &answer_to)
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        crate::search::check_readable(st, &caller.user, &kbs).await?;
        let passages = crate::search::retrieve(st, kbs, question.clone(), 5).await?;
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
    // Everything that can refuse the message is checked before anything is
    // stored: the sampling settings, the tools, whether the prompt fits.
    let sampling: crate::openai::Sampling = serde_json::from_value(conv.params.clone())
        .map_err(|e| ApiError::bad_request(format!("Invalid sampling settings: {e}")))?;
    let asked = conv
        .params
        .get("max_tokens")
        .and_then(Value::as_u64)
        .map(|n| n.min(u32::MAX as u64) as u32);
    // Tools on (and not search mode): the agent loop writes the reply.
    let tool_names = conversation_tools(&conv.params)?;
    let mut tool_loop = None;
    if !search_mode && !tool_names.is_empty() {
        let lp = crate::tools::prepare(
            st,
            &caller,
            &tool_names,
            &crate::openai::ToolOptions::default(),
        )
        .await?;
        let prompt = model.prompt(turns.clone(), Some(lp.tools.openai())).await?;
        model.budget(
            &caller,
            &prompt,
            asked,
            Some(crate::tools::STEP_TOKENS),
            "max_tokens",
        )?;
        let params = sampling.to_params(crate::tools::STEP_TOKENS, false, 0)?;
        tool_loop = Some((lp, params));
    }
    let mut generation = None;
    if declined.is_none() && tool_loop.is_none() {
        let prompt = model.prompt(turns.clone(), None).await?;
        let max_new = model.budget(&caller, &prompt, asked, Some(2048), "max_tokens")?;
        let mut params = sampling.to_params(max_new, false, 0)?;
        if grounding.is_some() {
            // Answers from sources are read off them, not invented.
            params.sampler.temperature = 0.0;
        }
        request.reserve(prompt.reserve_len() + max_new).await?;
        generation = Some((prompt, params));
    }
    // Now store: the user's message (if new) and the reply being written.
    let parent_of_reply = if b.content.is_some() {
        // (A failure here drops `request`, which frees its reservation.)
        let m = st
            .db
            .add_message(
                &user_id,
                &id,
                b.parent_id.as_deref(),
                MessageRole::User,
                b.content.as_deref().unwrap_or(""),
                MessageStatus::Done,
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
            &user_id,
            &id,
            Some(&parent_of_reply),
            MessageRole::Assistant,
            declined.as_deref().unwrap_or(""),
            if declined.is_some() {
                MessageStatus::Done
            } else {
                MessageStatus::Streaming
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
            let _ = st.db.update_conversation(&user_id, &id, &patch).await;
        }
    }
    let (out_tx, out_rx) = mpsc::channel::<Value>(64);
    if let Some((lp, params)) = tool_loop {
        let model = crate::tools::Metered {
            req: request.with_id(format!("{}-{}", endpoint.as_str(), reply.id)),
            model,
            caller,
            asked,
            params,
            gone: None,
        };
        let _ = out_tx.try_send(json!({"type": "user", "message": user_msg}));
        let _ = out_tx.try_send(json!({"type": "assistant", "message": reply}));
        tokio::spawn(drive_tools_reply(
            st.clone(),
            id.clone(),
            reply.id.clone(),
            model,
            lp,
            turns,
            out_tx,
        ));
    } else {
        match generation {
            Some((prompt, params)) => {
                let mut request = request.with_id(format!("{}-{}", endpoint.as_str(), reply.id));
                if let Err(e) = model.submit(&mut request, prompt, params) {
                    let _ = st
                        .db
                        .update_message(&id, &reply.id, "", MessageStatus::Error)
                        .await;
                    return Err(e);
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
    }
    Ok(out_rx)
}

/// Keep the system prompt and at most `keep` of the latest turns, and drop
/// the oldest while the prompt leaves less room than the answer may need
/// (the last turn, the question, always stays).
async fn fit_history(
    model: &ChatModel,
    caller: &Caller,
    turns: &mut Vec<hanlin_tokenizer::Message>,
    keep: usize,
    params: &Value,
) -> AppResult<()> {
    let first = usize::from(turns.first().is_some_and(|t| t.role == "system"));
    let keep = keep.max(1);
    if turns.len() - first > keep {
        turns.drain(first..turns.len() - keep);
    }
    let limit = model.context(caller);
    let room = params
        .get("max_tokens")
        .and_then(Value::as_u64)
        .map_or(512, |n| n as usize)
        .min(limit / 2);
    while turns.len() - first > 1 {
        let prompt = model.prompt(turns.clone(), None).await?;
        if prompt.fit_len() + room <= limit {
            break;
        }
        turns.remove(first);
    }
    Ok(())
}

/// The tools a conversation has switched on (`params.tools`: names as
/// `hanlin_tools` takes them).
fn conversation_tools(params: &Value) -> AppResult<Vec<String>> {
    match params.get("tools") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value::<Vec<String>>(v.clone())
            .map_err(|_| ApiError::bad_request("'tools' is a list of tool names.").param("tools")),
    }
}

/// Write a reply with the agent loop: each step's calls and results go to
/// the page as they happen, the answer as deltas; the reply is saved with
/// its steps. The page leaving does not stop it (the reply is kept).
async fn drive_tools_reply(
    st: Arc<AppState>,
    conv_id: String,
    reply_id: String,
    mut model: crate::tools::Metered,
    lp: crate::tools::Loop,
    turns: Vec<hanlin_tokenizer::Message>,
    out: mpsc::Sender<Value>,
) {
    let mut text = String::new();
    let answer = crate::tools::run_loop(&mut model, lp, turns, &mut |ev| {
        let v = match ev {
            hanlin_tools::agent::Event::Text(t) => {
                text.push_str(&t);
                json!({"type": "delta", "text": t})
            }
            hanlin_tools::agent::Event::Call { step, call } => {
                json!({"type": "tool_call", "call": {
                "step": step, "id": call.id, "name": call.name, "arguments": call.arguments}})
            }
            hanlin_tools::agent::Event::Result(o) => json!({"type": "tool_result", "result": o}),
        };
        // A page that left misses the events; the reply goes on.
        let _ = out.try_send(v);
        true
    })
    .await;
    let settled = tokio::spawn(model.req.finish());
    let (status, content, steps, error) = match answer {
        Ok(a) => (MessageStatus::Done, a.content.clone(), json!(a.steps), None),
        Err(e) => {
            let message = match e {
                hanlin_tools::agent::AgentError::Model(e) => e.message,
                hanlin_tools::agent::AgentError::Cancelled => "cancelled".into(),
            };
            (MessageStatus::Error, text, json!([]), Some(message))
        }
    };
    if let Err(e) = st.db.set_message_tools(&conv_id, &reply_id, &steps).await {
        tracing::warn!("saving the tool steps of {reply_id}: {e}");
    }
    if let Err(e) = st
        .db
        .update_message(&conv_id, &reply_id, &content, status)
        .await
    {
        tracing::warn!("saving reply {reply_id}: {e}");
    }
    let _ = out
        .send(match error {
            Some(message) => json!({"type": "error", "message": message, "id": reply_id}),
            None => json!({"type": "done", "status": status, "id": reply_id, "content": content, "tools": steps}),
        })
        .await;
    let _ = settled.await;
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
    let mut status = MessageStatus::Incomplete;
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
                        .update_message(&conv_id, &reply_id, &text, MessageStatus::Streaming)
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
                    MessageStatus::Incomplete
                } else {
                    MessageStatus::Done
                };
                break;
            }
            Event::Failed(msg) => {
                status = MessageStatus::Error;
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
    if let Some((question, passages)) = grounding.filter(|_| status != MessageStatus::Error) {
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
