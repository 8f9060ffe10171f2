//! Messaging channels (`hanlin_channels`) mounted by the server: WeChat
//! Official Accounts and WeCom apps at `/wechat/{account}`.
//!
//! A callback is checked and read by its channel, then recorded once in
//! `channel_messages` (the platform retries a callback it got no answer to
//! within 5 s, three times in all, possibly at another replica). The first
//! delivery starts the answer in the background: the user's conversation
//! (one per user and account, stored like a web conversation, owned by the
//! channel user) gets the message, and [`crate::web::start_reply`] writes
//! the reply through the metered path under the account's plan. Each
//! delivery waits for the answer up to the reply budget; the answer goes
//! back passively if it is ready in time. When the last delivery's budget
//! runs out, the answer is pushed through the API when done (accounts that
//! can), or the part ready so far goes back now and the rest waits for the
//! user's next message. Long answers are paged; the pages after the first
//! wait for the user's next messages (or are pushed).

use crate::error::ApiError;
use crate::extract::AdminCaller;
use crate::web::{start_reply, Ask, Send};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hanlin_accounts::channels::MsgStatus;
use hanlin_accounts::{Caller, Db, UserStatus};
use hanlin_channels::wechat::{AccountConfig, WeChat};
use hanlin_channels::{
    plain, BoxFuture, Channel, ChannelError, Content, HttpRequest, Inbound, Received,
};
use hanlin_gateway::Endpoint;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Room kept in a page for the continuation line.
const MARKER_ROOM: usize = 96;
/// A message still being answered makes the user's next one wait at most
/// this long (seconds) before it is answered anyway.
const BUSY_SECS: i64 = 120;
/// Received messages are remembered this long for de-duplication.
const KEEP_MESSAGES_SECS: i64 = 2 * 86400;
/// How often a waiting callback looks at its message's row.
const POLL: Duration = Duration::from_millis(100);
/// How long past its budget a call that will be repeated is held.
const RETRY_HOLD: Duration = Duration::from_millis(1500);

/// The fixed replies (Chinese first: WeChat's users).
mod say {
    pub const HELP: &str = "直接发文字提问即可。\n/new 开始新话题\n/help 查看帮助\nSend any question in Chinese or English; /new starts a new topic.";
    pub const NEW_TOPIC: &str = "好的，我们开始一个新话题。";
    pub const GREETING: &str =
        "你好！我是你的 AI 助手，直接发文字向我提问吧。发送 /help 查看帮助。";
    pub const UNSUPPORTED: &str = "抱歉，我暂时只能读懂文字消息，请用文字提问。";
    pub const VOICE: &str = "抱歉，我没听清这条语音，请用文字再说一次。";
    pub const IMAGE: &str = "收到你的图片了。我暂时还看不懂图片，请用文字描述你的问题。";
    pub const BUSY: &str = "上一个问题还在回答中，请稍候再发。";
    pub const THINKING: &str = "正在思考中……";
    pub const MORE: &str = "回复任意内容查看后续";
    pub const LIMITED: &str = "你发得太快了，请稍后再试。";
    pub const QUOTA: &str = "今天的额度已用完，请明天再来。";
    pub const DISABLED: &str = "此账号已被停用，如有疑问请联系管理员。";
    pub const FAILED: &str = "抱歉，出了点问题，请稍后再试。";
    pub const EMPTY: &str = "（没有生成回答，请换个问法再试。）";
}

/// The assistant behind one account: who answers and how.
pub struct Account {
    pub name: String,
    /// The account's key in the database and in usage (`wechat/NAME`).
    pub key: String,
    pub channel: Arc<dyn Channel>,
    pub config: AccountConfig,
    /// The text generated so far per message being answered (this
    /// process's), for a part-answer when time runs out.
    partial: Mutex<HashMap<String, String>>,
}

/// Every configured account, by name.
#[derive(Default)]
pub struct Channels {
    accounts: HashMap<String, Arc<Account>>,
}

impl Channels {
    /// The accounts of the settings file, checked (a mistake stops the
    /// server at start).
    pub fn new(db: &Db, wechat: &BTreeMap<String, AccountConfig>) -> Result<Self, String> {
        let mut accounts = HashMap::new();
        for (name, cfg) in wechat {
            let tokens: Arc<dyn hanlin_channels::wechat::api::TokenStore> =
                Arc::new(DbTokens(db.clone()));
            let ch = WeChat::new(name, cfg.clone(), tokens)?;
            accounts.insert(
                name.clone(),
                Arc::new(Account {
                    name: name.clone(),
                    key: format!("wechat/{name}"),
                    channel: Arc::new(ch),
                    config: cfg.clone(),
                    partial: Mutex::new(HashMap::new()),
                }),
            );
        }
        Ok(Self { accounts })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Account>> {
        self.accounts.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.accounts.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

/// Access tokens in the database, shared by replicas.
struct DbTokens(Db);

impl hanlin_channels::wechat::api::TokenStore for DbTokens {
    fn get<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<Option<String>, String>> {
        store(self.0.channel_token(account))
    }
    fn lease<'a>(&'a self, account: &'a str, secs: i64) -> BoxFuture<'a, Result<bool, String>> {
        store(self.0.lease_channel_token(account, secs))
    }
    fn put<'a>(
        &'a self,
        account: &'a str,
        token: &'a str,
        expires_at: i64,
    ) -> BoxFuture<'a, Result<(), String>> {
        store(self.0.put_channel_token(account, token, expires_at))
    }
    fn invalidate<'a>(
        &'a self,
        account: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        store(self.0.invalidate_channel_token(account, token))
    }
}

/// A database call as a token-store future (errors as log messages).
fn store<'a, T: 'a>(
    f: impl std::future::Future<Output = Result<T, hanlin_accounts::AccountError>>
        + std::marker::Send
        + 'a,
) -> BoxFuture<'a, Result<T, String>> {
    Box::pin(async move { f.await.map_err(|e| e.to_string()) })
}

/// What a callback gets back.
enum Answer {
    /// A passive reply.
    Text(String),
    /// Nothing to say now (`success`): an event without reply, or an
    /// answer that will be pushed.
    Nothing,
    /// No answer in time, and the platform will call again: say nothing,
    /// so it does.
    Retry,
}

/// `GET|POST /wechat/{account}`: the callback of a WeChat account.
pub async fn wechat(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    method: Method,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(acct) = st.channels.get(&name).cloned() else {
        tracing::warn!(account = %name.chars().take(64).collect::<String>(), "a WeChat callback for an unknown account");
        return (StatusCode::NOT_FOUND, "unknown account").into_response();
    };
    let now = hanlin_accounts::now();
    let req = HttpRequest {
        post: method == Method::POST,
        query: &query,
        body: &body,
    };
    let msg = match acct.channel.receive(&req, now) {
        Ok(Received::Echo(s)) => return plain_text(StatusCode::OK, s),
        Ok(Received::Message(m)) => m,
        Err(ChannelError::Forbidden(why)) => {
            tracing::warn!(account = %acct.name, "refused a WeChat callback: {why}");
            return plain_text(StatusCode::FORBIDDEN, "forbidden".into());
        }
        Err(e) => {
            tracing::warn!(account = %acct.name, "a bad WeChat callback: {e}");
            return plain_text(StatusCode::BAD_REQUEST, "bad request".into());
        }
    };
    match answer(&st, &acct, &msg, Instant::now()).await {
        Ok(Answer::Text(t)) => match acct.channel.reply(&msg, &t, hanlin_accounts::now()) {
            Ok(xml) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
                xml,
            )
                .into_response(),
            Err(e) => {
                tracing::error!(account = %acct.name, "writing a reply: {e}");
                plain_text(StatusCode::OK, "success".into())
            }
        },
        Ok(Answer::Nothing) => plain_text(StatusCode::OK, "success".into()),
        Ok(Answer::Retry) => plain_text(StatusCode::SERVICE_UNAVAILABLE, String::new()),
        Err(e) => {
            // The database failed: no answer, so the platform calls again
            // and nothing is lost.
            tracing::error!(account = %acct.name, "a WeChat message could not be recorded: {e}");
            plain_text(StatusCode::SERVICE_UNAVAILABLE, String::new())
        }
    }
}

fn plain_text(status: StatusCode, s: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        s,
    )
        .into_response()
}

/// The answer to one delivery of `msg`.
async fn answer(
    st: &Arc<AppState>,
    acct: &Arc<Account>,
    msg: &Inbound,
    arrived: Instant,
) -> Result<Answer, hanlin_accounts::AccountError> {
    let (first, _) = st
        .db
        .claim_channel_message(&acct.key, &msg.key, &msg.user)
        .await?;
    if first {
        match start(st, acct, msg).await? {
            Started::Now(Some(text)) => {
                settle(st, acct, msg, MsgStatus::Answered, Some(&text)).await?;
                return Ok(Answer::Text(text));
            }
            Started::Now(None) => {
                settle(st, acct, msg, MsgStatus::Done, None).await?;
                return Ok(Answer::Nothing);
            }
            Started::Later => {}
        }
    }
    wait(st, acct, msg, arrived).await
}

/// Move a message from `running` (it was answered without the model).
async fn settle(
    st: &AppState,
    acct: &Account,
    msg: &Inbound,
    to: MsgStatus,
    reply: Option<&str>,
) -> Result<(), hanlin_accounts::AccountError> {
    st.db
        .move_channel_message(&acct.key, &msg.key, MsgStatus::Running, to, reply)
        .await
        .map(|_| ())
}

enum Started {
    /// Answered at once (`None`: no reply, e.g. an unfollow).
    Now(Option<String>),
    /// The model is writing the answer.
    Later,
}

/// What the first delivery of `msg` does: a fixed reply, a command, the
/// next page of an earlier answer, or a question for the model.
async fn start(
    st: &Arc<AppState>,
    acct: &Arc<Account>,
    msg: &Inbound,
) -> Result<Started, hanlin_accounts::AccountError> {
    let question = match &msg.content {
        Content::Text(t) => t.trim().to_string(),
        Content::Voice {
            recognition: Some(t),
        } => t.trim().to_string(),
        Content::Voice { recognition: None } => return Ok(Started::Now(Some(say::VOICE.into()))),
        Content::Image { .. } => return Ok(Started::Now(Some(say::IMAGE.into()))),
        Content::Subscribe => {
            let g = acct.config.greeting.clone();
            return Ok(Started::Now(Some(
                g.unwrap_or_else(|| say::GREETING.into()),
            )));
        }
        Content::Unsubscribe => return Ok(Started::Now(None)),
        Content::Menu(key) => key.trim().to_string(),
        Content::Link {
            title,
            description,
            url,
        } => format!("{title}\n{description}\n{url}").trim().to_string(),
        Content::Location { label, .. } => {
            return Ok(Started::Now(Some(format!(
                "收到你的位置：{label}。想了解什么？直接发文字问我吧。"
            ))))
        }
        Content::Other(_) => return Ok(Started::Now(Some(say::UNSUPPORTED.into()))),
    };
    if question.is_empty() {
        return Ok(Started::Now(Some(say::HELP.into())));
    }
    let cu = st
        .db
        .channel_user(&acct.key, &msg.user, acct.plan())
        .await?;
    if cu.user.status != UserStatus::Active {
        return Ok(Started::Now(Some(say::DISABLED.into())));
    }
    match question.as_str() {
        "/help" | "帮助" => return Ok(Started::Now(Some(say::HELP.into()))),
        "/new" | "新话题" => {
            st.db
                .set_channel_conversation(&acct.key, &msg.user, None)
                .await?;
            return Ok(Started::Now(Some(say::NEW_TOPIC.into())));
        }
        _ => {}
    }
    // Pages of an earlier answer come first: any message fetches the next.
    if let Some((page, left)) = st.db.take_channel_page(&acct.key, &msg.user).await? {
        return Ok(Started::Now(Some(with_more(&page, left))));
    }
    let since = hanlin_accounts::now() - BUSY_SECS;
    if st
        .db
        .channel_user_busy(&acct.key, &msg.user, &msg.key, since)
        .await?
    {
        return Ok(Started::Now(Some(say::BUSY.into())));
    }
    let (st, acct, msg) = (st.clone(), acct.clone(), msg.clone());
    tokio::spawn(async move {
        let text = match generate(&st, &acct, &msg, cu, question).await {
            Ok(t) if t.trim().is_empty() => say::EMPTY.to_string(),
            Ok(t) => t,
            Err(t) => t,
        };
        deliver(&st, &acct, &msg, &text).await;
    });
    Ok(Started::Later)
}

impl Account {
    fn plan(&self) -> &str {
        self.config.plan.as_deref().unwrap_or("free")
    }

    fn budget(&self) -> Duration {
        Duration::from_millis(self.config.reply_budget_ms)
    }

    fn partial(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.partial.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `page`, with a line saying how to get the rest when `left` pages remain.
fn with_more(page: &str, left: usize) -> String {
    if left == 0 {
        page.to_string()
    } else {
        format!("{page}\n\n（{}，还有 {left} 段）", say::MORE)
    }
}

/// Wait for the answer to `msg` within this delivery's budget.
async fn wait(
    st: &Arc<AppState>,
    acct: &Arc<Account>,
    msg: &Inbound,
    arrived: Instant,
) -> Result<Answer, hanlin_accounts::AccountError> {
    let deadline = arrived + acct.budget();
    // A call the platform will repeat is held a little past the budget (an
    // answer ready before the platform gives up still goes back on it).
    let hold = deadline + RETRY_HOLD;
    loop {
        let Some(row) = st.db.channel_message(&acct.key, &msg.key).await? else {
            return Ok(Answer::Nothing);
        };
        match row.status {
            MsgStatus::Answered => return Ok(Answer::Text(row.reply.unwrap_or_default())),
            // Handed over already (a later delivery of an answer this
            // one could not wait for): say what was said.
            MsgStatus::Partial => {
                let part = row.reply.unwrap_or_default();
                return Ok(Answer::Text(format!("{part}\n\n（{}）", say::MORE)));
            }
            MsgStatus::Pushing | MsgStatus::Done => return Ok(Answer::Nothing),
            MsgStatus::Running => {}
        }
        let last = row.attempts >= i64::from(acct.config.attempts);
        let now = Instant::now();
        if now < deadline || (!last && now < hold) {
            tokio::time::sleep(POLL).await;
            continue;
        }
        if !last {
            // The platform calls again; a later call carries the answer.
            return Ok(Answer::Retry);
        }
        // The last call: hand over now.
        if acct.channel.can_push() {
            if st
                .db
                .move_channel_message(
                    &acct.key,
                    &msg.key,
                    MsgStatus::Running,
                    MsgStatus::Pushing,
                    None,
                )
                .await?
            {
                tracing::info!(account = %acct.name, "an answer not ready in time will be pushed");
                return Ok(Answer::Nothing);
            }
        } else {
            let so_far = acct.partial().get(&msg.key).cloned().unwrap_or_default();
            let part = ready_part(&so_far, acct.channel.max_bytes() - MARKER_ROOM);
            if st
                .db
                .move_channel_message(
                    &acct.key,
                    &msg.key,
                    MsgStatus::Running,
                    MsgStatus::Partial,
                    Some(&part),
                )
                .await?
            {
                let shown = if part.is_empty() {
                    say::THINKING
                } else {
                    &part
                };
                return Ok(Answer::Text(format!("{shown}\n\n（{}）", say::MORE)));
            }
        }
        // The answer arrived meanwhile: look again.
    }
}

/// The complete sentences of `text` (plain text of the Markdown so far)
/// that fit in `max` bytes.
fn ready_part(markdown: &str, max: usize) -> String {
    let text = plain::from_markdown(markdown);
    let first = plain::pages(&text, max)
        .into_iter()
        .next()
        .unwrap_or_default();
    // Keep whole sentences only: the rest follows later.
    let end = first
        .char_indices()
        .filter(|&(_, c)| matches!(c, '。' | '！' | '？' | '.' | '!' | '?' | '\n' | '；'))
        .map(|(i, c)| i + c.len_utf8())
        .next_back();
    match end {
        Some(e) => first[..e].trim_end().to_string(),
        None => String::new(),
    }
}

/// Ask the model: the user's conversation gets the question, and the
/// reply is written through the one reply lifecycle. The answer's
/// Markdown, or a friendly message when it cannot be given.
async fn generate(
    st: &Arc<AppState>,
    acct: &Arc<Account>,
    msg: &Inbound,
    cu: hanlin_accounts::channels::ChannelUser,
    question: String,
) -> Result<String, String> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!(account = %acct.name, "{what}: {e}");
        say::FAILED.to_string()
    };
    let plan = st
        .db
        .plan(&cu.user.plan)
        .await
        .map_err(|e| failed("reading the plan", &e))?;
    let user_id = cu.user.id.clone();
    let caller = Caller::channel(cu.user, plan, &acct.key);
    let conv = match &cu.conversation_id {
        Some(id) => st
            .db
            .conversation(&user_id, id)
            .await
            .map_err(|e| failed("reading the conversation", &e))?,
        None => None,
    };
    let conv = match conv {
        Some(c) => c,
        None => {
            let mut params = json!({});
            if !acct.config.kb.is_empty() {
                params["kb"] = json!(acct.config.kb);
            }
            if !acct.config.tools.is_empty() {
                params["tools"] = json!(acct.config.tools);
            }
            if let Some(n) = acct.config.max_tokens {
                params["max_tokens"] = json!(n);
            }
            if let Some(t) = acct.config.temperature {
                params["temperature"] = json!(t);
            }
            let model = acct
                .config
                .model
                .clone()
                .unwrap_or_else(|| st.config.default_model.clone());
            let c = st
                .db
                .create_conversation(
                    &user_id,
                    &hanlin_accounts::chats::title_from(&question),
                    acct.config.system_prompt.as_deref().unwrap_or(""),
                    &model,
                    &params,
                )
                .await
                .map_err(|e| failed("starting a conversation", &e))?;
            st.db
                .set_channel_conversation(&acct.key, &msg.user, Some(&c.id))
                .await
                .map_err(|e| failed("starting a conversation", &e))?;
            c
        }
    };
    let parent = conv.current_leaf.clone();
    let mut events = start_reply(
        st,
        Ask {
            caller,
            conv,
            send: Send {
                content: Some(
                    question
                        .chars()
                        .take(hanlin_accounts::chats::MAX_MESSAGE_CHARS)
                        .collect(),
                ),
                parent_id: parent,
            },
            endpoint: Endpoint::Channel,
            history: Some(acct.config.history_messages),
        },
    )
    .await
    .map_err(|e| refused(acct, &e))?;
    let mut text = String::new();
    let _forget = Forget(acct.clone(), msg.key.clone());
    while let Some(ev) = events.recv().await {
        match ev.get("type").and_then(Value::as_str) {
            Some("delta") => {
                text.push_str(ev.get("text").and_then(Value::as_str).unwrap_or(""));
                acct.partial().insert(msg.key.clone(), text.clone());
            }
            Some("done") => {
                if let Some(c) = ev.get("content").and_then(Value::as_str) {
                    text = c.to_string();
                }
                if let Some(sources) = ev.get("sources").and_then(Value::as_array) {
                    text.push_str(&sources_text(sources));
                }
                return Ok(text);
            }
            Some("error") => {
                let m = ev.get("message").and_then(Value::as_str).unwrap_or("");
                return Err(failed("writing the answer", &m));
            }
            _ => {}
        }
    }
    Err(failed(
        "writing the answer",
        &"the reply ended without a result",
    ))
}

/// Forgets a message's partial text when its answer is done.
struct Forget(Arc<Account>, String);

impl Drop for Forget {
    fn drop(&mut self) {
        self.0.partial().remove(&self.1);
    }
}

/// The cited sources as lines `[n] title`.
fn sources_text(sources: &[Value]) -> String {
    let mut s = String::new();
    for src in sources {
        let n = src.get("index").and_then(Value::as_u64).unwrap_or(0);
        let title = src.get("title").and_then(Value::as_str).unwrap_or("");
        if s.is_empty() {
            s.push_str("\n\n");
        } else {
            s.push('\n');
        }
        s.push_str(&format!("[{n}] {title}"));
    }
    s
}

/// A refusal of the metered path as something to tell the user.
fn refused(acct: &Account, e: &ApiError) -> String {
    tracing::info!(account = %acct.name, "a WeChat message was refused: {}", e.message);
    if e.code == Some("insufficient_quota") {
        say::QUOTA.into()
    } else if e.status == StatusCode::TOO_MANY_REQUESTS {
        say::LIMITED.into()
    } else if e.status == StatusCode::FORBIDDEN {
        say::DISABLED.into()
    } else {
        say::FAILED.into()
    }
}

/// The answer is written: hand it to whoever should deliver it.
async fn deliver(st: &Arc<AppState>, acct: &Arc<Account>, msg: &Inbound, markdown: &str) {
    let text = plain::from_markdown(markdown);
    let max = acct.channel.max_bytes() - MARKER_ROOM;
    let pages = plain::pages(&text, max);
    let first = with_more(
        pages.first().map_or("", String::as_str),
        pages.len().saturating_sub(1),
    );
    for attempt in 0..8u32 {
        let r = deliver_once(st, acct, msg, &text, &pages, &first).await;
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(account = %acct.name, attempt, "delivering an answer: {e}");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
    tracing::error!(account = %acct.name, "an answer could not be delivered; it is kept in the user's conversation");
}

async fn deliver_once(
    st: &Arc<AppState>,
    acct: &Arc<Account>,
    msg: &Inbound,
    text: &str,
    pages: &[String],
    first: &str,
) -> Result<(), hanlin_accounts::AccountError> {
    let (db, key, user) = (&st.db, &acct.key, &msg.user);
    if db
        .move_channel_message(
            key,
            &msg.key,
            MsgStatus::Running,
            MsgStatus::Answered,
            Some(first),
        )
        .await?
    {
        // A waiting callback gives the first page; the rest wait.
        return db
            .push_channel_pages(key, user, pages.get(1..).unwrap_or(&[]))
            .await;
    }
    let Some(row) = db.channel_message(key, &msg.key).await? else {
        return Ok(());
    };
    match row.status {
        MsgStatus::Pushing => {
            for (i, page) in pages.iter().enumerate() {
                if let Err(e) = push(acct, user, page).await {
                    tracing::error!(account = %acct.name, "pushing an answer failed ({e}); the rest waits for the user's next message");
                    db.push_channel_pages(key, user, &pages[i..]).await?;
                    break;
                }
            }
            db.move_channel_message(key, &msg.key, MsgStatus::Pushing, MsgStatus::Done, None)
                .await?;
        }
        MsgStatus::Partial => {
            let given = row.reply.unwrap_or_default();
            let rest = text.strip_prefix(given.as_str()).unwrap_or(text);
            let max = acct.channel.max_bytes() - MARKER_ROOM;
            db.push_channel_pages(key, user, &plain::pages(rest, max))
                .await?;
            db.move_channel_message(key, &msg.key, MsgStatus::Partial, MsgStatus::Done, None)
                .await?;
        }
        _ => {}
    }
    Ok(())
}

/// Push one page, retried a few times when the API is unreachable.
async fn push(acct: &Account, user: &str, page: &str) -> Result<(), ChannelError> {
    let mut delay = Duration::from_millis(500);
    let mut last = None;
    for _ in 0..3 {
        match acct.channel.push(user, page).await {
            Ok(()) => return Ok(()),
            Err(e @ ChannelError::Http(_)) => {
                tracing::warn!(account = %acct.name, "pushing a message: {e}");
                last = Some(e);
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ChannelError::Http("push failed".into())))
}

/// Forget old received messages (hourly, with the sessions).
pub async fn prune(db: &Db) {
    match db
        .prune_channel_messages(hanlin_accounts::now() - KEEP_MESSAGES_SECS)
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!("{n} old channel messages forgotten"),
        Err(e) => tracing::warn!("pruning channel messages: {e}"),
    }
}

/// `GET /v1/admin/channels`: the accounts, with their users' count.
pub async fn admin_accounts(
    State(st): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
) -> Result<Json<Value>, ApiError> {
    let mut data = Vec::new();
    for name in st.channels.names() {
        let users = st.db.channel_users(&format!("wechat/{name}")).await?;
        data.push(json!({"name": name, "kind": "wechat", "users": users.len()}));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

fn admin_account<'a>(st: &'a AppState, name: &str) -> Result<&'a Arc<Account>, ApiError> {
    st.channels
        .get(name)
        .ok_or_else(|| ApiError::not_found("No such channel account."))
}

/// `GET /v1/admin/channels/{account}/users`.
pub async fn admin_users(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    AdminCaller(_): AdminCaller,
) -> Result<Json<Value>, ApiError> {
    let acct = admin_account(&st, &name)?;
    let users = st.db.channel_users(&acct.key).await?;
    let data: Vec<Value> = users
        .iter()
        .map(|u| json!({"external_id": u.external_id, "name": u.user.name, "status": u.user.status, "plan": u.user.plan, "created_at": u.created_at}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /v1/admin/channels/{account}/users/{external_id}/conversations`:
/// an admin reads a channel user's conversations. This is the one way to
/// them (conversations stay scoped to their owner everywhere else), and
/// every read is logged.
pub async fn admin_conversations(
    State(st): State<Arc<AppState>>,
    Path((name, external_id)): Path<(String, String)>,
    AdminCaller(admin): AdminCaller,
) -> Result<Json<Value>, ApiError> {
    let acct = admin_account(&st, &name)?;
    let u = st
        .db
        .find_channel_user(&acct.key, &external_id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such channel user."))?;
    tracing::warn!(
        admin = %admin.name,
        account = %acct.key,
        channel_user = %u.external_id,
        "an administrator read a channel user's conversations"
    );
    let mut out = Vec::new();
    for c in st.db.conversations(&u.user.id).await? {
        let messages = st.db.messages(&u.user.id, &c.id).await?.unwrap_or_default();
        out.push(json!({"conversation": c, "messages": messages}));
    }
    Ok(Json(json!({"object": "list", "data": out})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_part_is_whole_sentences() {
        assert_eq!(ready_part("第一句。第二句还没写完", 500), "第一句。");
        assert_eq!(ready_part("no sentence yet", 500), "");
        assert_eq!(ready_part("**粗体**句子。", 500), "粗体句子。");
    }

    #[test]
    fn cited_sources_become_lines() {
        let s = sources_text(&[
            json!({"index": 1, "title": "员工手册"}),
            json!({"index": 3, "title": "Handbook"}),
        ]);
        assert_eq!(s, "\n\n[1] 员工手册\n[3] Handbook");
        assert_eq!(sources_text(&[]), "");
    }

    #[test]
    fn pages_say_how_many_remain() {
        assert_eq!(with_more("a", 0), "a");
        assert!(with_more("a", 2).contains("还有 2 段"));
    }
}
