//! Conversations of the web app, stored per user: a conversation is a tree
//! of messages (editing a message or regenerating a reply adds a sibling,
//! so old branches stay reachable) plus the leaf whose branch it shows.
//! Every query is scoped by the owner's user id: one user can never read or
//! change another's conversations.

use crate::{now, random_token, AccountError, Db};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;

/// Longest message a user may write (characters); a longer paste is refused.
pub const MAX_MESSAGE_CHARS: usize = 100_000;
/// Most conversations one import may hold.
pub const MAX_IMPORT_CONVERSATIONS: usize = 10_000;

#[derive(Debug, Clone, Serialize)]
pub struct Conversation {
    pub id: String,
    pub title: String,
    pub system_prompt: String,
    pub model: String,
    pub params: Value,
    pub current_leaf: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    System,
    User,
    Assistant,
}

impl MessageRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "system" => Self::System,
            "user" => Self::User,
            "assistant" => Self::Assistant,
            _ => return None,
        })
    }
}

/// Where a message's text stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Done,
    /// Being generated.
    Streaming,
    /// Stopped: by the user, because the client left, or because the
    /// server died mid-reply.
    Incomplete,
    Error,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Streaming => "streaming",
            Self::Incomplete => "incomplete",
            Self::Error => "error",
        }
    }
    /// A stored status; anything unknown reads as incomplete.
    pub fn parse(s: &str) -> Self {
        match s {
            "done" => Self::Done,
            "streaming" => Self::Streaming,
            "error" => Self::Error,
            _ => Self::Incomplete,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub id: String,
    pub parent_id: Option<String>,
    pub role: MessageRole,
    pub content: String,
    pub status: MessageStatus,
    pub model: Option<String>,
    pub created_at: i64,
    /// For an answer from knowledge bases: the sources it cites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Value>,
    /// For an answer with tools: the steps the server ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Value>,
}

/// Fields of a conversation a user may change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationPatch {
    pub title: Option<String>,
    pub system_prompt: Option<String>,
    pub model: Option<String>,
    pub params: Option<Value>,
    pub current_leaf: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    pub conversation_id: String,
    pub title: String,
    pub message_id: Option<String>,
    /// Text around the first match.
    pub snippet: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Persona {
    pub id: String,
    pub name: String,
    pub prompt: String,
    /// The voice it speaks with in voice mode (`""`: the default).
    #[serde(default)]
    pub voice: String,
    /// Its avatar's look in voice mode (`""`: the default).
    #[serde(default)]
    pub look: String,
}

/// What a persona sounds and looks like (each `""` for the default, else
/// a short name the server checks against its voices and looks).
#[derive(Debug, Clone, Copy, Default)]
pub struct PersonaStyle<'a> {
    pub voice: &'a str,
    pub look: &'a str,
}

/// One conversation to import (parsed from a ChatGPT export by the server).
#[derive(Debug, Clone)]
pub struct ImportConversation {
    pub title: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Messages in an order where parents come before children; ids are
    /// the export's, mapped to new ones on import.
    pub messages: Vec<Message>,
    pub current_leaf: Option<String>,
}

/// The presets a user starts with (editable, deletable).
pub const DEFAULT_PERSONAS: &[(&str, &str, &str, &str)] = &[
    ("写作助手 Writer", "You are a skilled writer and editor. Write clear, vivid prose in the user's language, keep their voice, and explain important edits briefly. 你是一位优秀的写作助手：用用户的语言写出清晰、生动的文字。", "nova", "scholar"),
    ("翻译 Translator", "You are a professional translator between Chinese and English. Translate the user's text faithfully and idiomatically into the other language; output only the translation. 你是中英互译的专业译者：只输出译文。", "echo", "friend"),
    ("程序员 Programmer", "You are an expert programmer. Answer with correct, idiomatic code in fenced code blocks, explain briefly, and point out edge cases. 你是一名资深程序员。", "onyx", "robot"),
    ("诗人 Poet", "You are a poet versed in classical Chinese poetry (唐诗宋词) and English verse. Write poems with care for rhythm, imagery and form. 你是一位精通唐诗宋词的诗人。", "fable", "teacher"),
];

fn conversation_of(r: &sqlx::any::AnyRow) -> Result<Conversation, AccountError> {
    let params: String = r.try_get(4)?;
    Ok(Conversation {
        id: r.try_get(0)?,
        title: r.try_get(1)?,
        system_prompt: r.try_get(2)?,
        model: r.try_get(3)?,
        params: serde_json::from_str(&params).unwrap_or(Value::Object(Default::default())),
        current_leaf: r.try_get(5)?,
        created_at: r.try_get(6)?,
        updated_at: r.try_get(7)?,
    })
}

fn message_of(r: &sqlx::any::AnyRow) -> Result<Message, sqlx::Error> {
    let role: String = r.try_get(2)?;
    Ok(Message {
        id: r.try_get(0)?,
        parent_id: r.try_get(1)?,
        role: MessageRole::parse(&role).ok_or_else(|| sqlx::Error::ColumnDecode {
            index: "role".into(),
            source: format!("unknown message role {role:?}").into(),
        })?,
        content: r.try_get(3)?,
        status: MessageStatus::parse(&r.try_get::<String, _>(4)?),
        model: r.try_get(5)?,
        created_at: r.try_get(6)?,
        sources: r
            .try_get::<Option<String>, _>(7)?
            .and_then(|s| serde_json::from_str(&s).ok()),
        tools: r
            .try_get::<Option<String>, _>(8)?
            .and_then(|s| serde_json::from_str(&s).ok()),
    })
}

const CONV_COLS: &str =
    "id, title, system_prompt, model, params, current_leaf, created_at, updated_at";
const MSG_COLS: &str = "id, parent_id, role, content, status, model, created_at";

/// `s` cut to at most `n` characters.
fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// A title from the first user message: its first line, at most 40 characters.
pub fn title_from(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let t = cut(line, 40);
    if t.is_empty() {
        "New chat".into()
    } else if line.chars().count() > 40 {
        format!("{t}…")
    } else {
        t
    }
}

impl Db {
    pub async fn create_conversation(
        &self,
        user_id: &str,
        title: &str,
        system_prompt: &str,
        model: &str,
        params: &Value,
    ) -> Result<Conversation, AccountError> {
        let id = format!("conv-{}", random_token(20));
        let t = now();
        sqlx::query("INSERT INTO conversations (id, user_id, title, system_prompt, model, params, current_leaf, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $7)")
            .bind(&id)
            .bind(user_id)
            .bind(cut(title, 200))
            .bind(system_prompt)
            .bind(model)
            .bind(params.to_string())
            .bind(t)
            .execute(&self.pool)
            .await?;
        self.conversation(user_id, &id)
            .await?
            .ok_or_else(|| AccountError::Invalid("conversation vanished".into()))
    }

    /// A user's conversations, most recently updated first.
    pub async fn conversations(&self, user_id: &str) -> Result<Vec<Conversation>, AccountError> {
        let rows = sqlx::query(&format!(
            "SELECT {CONV_COLS} FROM conversations WHERE user_id = $1 ORDER BY updated_at DESC, created_at DESC, id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(conversation_of).collect()
    }

    /// One of the user's conversations (`None` if absent or someone else's).
    pub async fn conversation(
        &self,
        user_id: &str,
        id: &str,
    ) -> Result<Option<Conversation>, AccountError> {
        let row = sqlx::query(&format!(
            "SELECT {CONV_COLS} FROM conversations WHERE id = $1 AND user_id = $2"
        ))
        .bind(id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(conversation_of).transpose()
    }

    /// Every message of one of the user's conversations, in creation order.
    pub async fn messages(
        &self,
        user_id: &str,
        conversation_id: &str,
    ) -> Result<Option<Vec<Message>>, AccountError> {
        if self.conversation(user_id, conversation_id).await?.is_none() {
            return Ok(None);
        }
        let rows = sqlx::query(&format!(
            "SELECT {MSG_COLS}, sources, tools FROM messages WHERE conversation_id = $1 ORDER BY seq"
        ))
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(rows.iter().map(message_of).collect::<Result<_, _>>()?))
    }

    pub async fn update_conversation(
        &self,
        user_id: &str,
        id: &str,
        p: &ConversationPatch,
    ) -> Result<Option<Conversation>, AccountError> {
        let Some(mut c) = self.conversation(user_id, id).await? else {
            return Ok(None);
        };
        if let Some(t) = &p.title {
            let t = t.trim();
            if t.is_empty() {
                return Err(AccountError::Invalid("a title cannot be empty".into()));
            }
            c.title = cut(t, 200);
        }
        if let Some(s) = &p.system_prompt {
            if s.chars().count() > MAX_MESSAGE_CHARS {
                return Err(AccountError::Invalid(format!(
                    "a system prompt is at most {MAX_MESSAGE_CHARS} characters"
                )));
            }
            c.system_prompt = s.clone();
        }
        if let Some(m) = &p.model {
            c.model = m.clone();
        }
        if let Some(v) = &p.params {
            if !v.is_object() {
                return Err(AccountError::Invalid("params must be a JSON object".into()));
            }
            c.params = v.clone();
        }
        if let Some(leaf) = &p.current_leaf {
            if !self.message_in(id, leaf).await? {
                return Err(AccountError::Invalid(format!(
                    "message {leaf:?} is not in this conversation"
                )));
            }
            c.current_leaf = Some(leaf.clone());
        }
        c.updated_at = now();
        sqlx::query("UPDATE conversations SET title = $1, system_prompt = $2, model = $3, params = $4, current_leaf = $5, updated_at = $6 WHERE id = $7 AND user_id = $8")
            .bind(&c.title)
            .bind(&c.system_prompt)
            .bind(&c.model)
            .bind(c.params.to_string())
            .bind(&c.current_leaf)
            .bind(c.updated_at)
            .bind(id)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(Some(c))
    }

    /// Delete one of the user's conversations with its messages; false if
    /// there was none.
    pub async fn delete_conversation(&self, user_id: &str, id: &str) -> Result<bool, AccountError> {
        if self.conversation(user_id, id).await?.is_none() {
            return Ok(false);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM messages WHERE conversation_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM conversations WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn message_in(&self, conversation_id: &str, id: &str) -> Result<bool, AccountError> {
        Ok(
            sqlx::query("SELECT id FROM messages WHERE id = $1 AND conversation_id = $2")
                .bind(id)
                .bind(conversation_id)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// Add a message under `parent_id` (None: a new root) in one of the
    /// user's conversations, and make it the conversation's current leaf.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_message(
        &self,
        user_id: &str,
        conversation_id: &str,
        parent_id: Option<&str>,
        role: MessageRole,
        content: &str,
        status: MessageStatus,
        model: Option<&str>,
    ) -> Result<Message, AccountError> {
        if content.chars().count() > MAX_MESSAGE_CHARS {
            return Err(AccountError::Invalid(format!(
                "a message is at most {MAX_MESSAGE_CHARS} characters"
            )));
        }
        if self.conversation(user_id, conversation_id).await?.is_none() {
            return Err(AccountError::Invalid("no such conversation".into()));
        }
        if let Some(p) = parent_id {
            if !self.message_in(conversation_id, p).await? {
                return Err(AccountError::Invalid(format!(
                    "message {p:?} is not in this conversation"
                )));
            }
        }
        let id = format!("msg-{}", random_token(20));
        let t = now();
        let mut tx = self.begin_write().await?;
        let seq: i64 = sqlx::query(
            "SELECT CAST(COALESCE(MAX(seq), 0) + 1 AS BIGINT) FROM messages WHERE conversation_id = $1",
        )
        .bind(conversation_id)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        // A streaming reply belongs to this replica: only its restart, or
        // its death, marks the reply interrupted.
        sqlx::query(&format!(
            "INSERT INTO messages ({MSG_COLS}, conversation_id, seq, replica_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(&id)
        .bind(parent_id)
        .bind(role.as_str())
        .bind(content)
        .bind(status.as_str())
        .bind(model)
        .bind(t)
        .bind(conversation_id)
        .bind(seq)
        .bind((status == MessageStatus::Streaming).then(|| self.replica().to_string()))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE conversations SET current_leaf = $1, updated_at = $2 WHERE id = $3")
            .bind(&id)
            .bind(t)
            .bind(conversation_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Message {
            id,
            parent_id: parent_id.map(String::from),
            role,
            content: content.into(),
            status,
            model: model.map(String::from),
            created_at: t,
            sources: None,
            tools: None,
        })
    }

    /// Bring a (generating) message's text and status up to date.
    pub async fn update_message(
        &self,
        conversation_id: &str,
        id: &str,
        content: &str,
        status: MessageStatus,
    ) -> Result<(), AccountError> {
        sqlx::query(
            "UPDATE messages SET content = $1, status = $2 WHERE id = $3 AND conversation_id = $4",
        )
        .bind(content)
        .bind(status.as_str())
        .bind(id)
        .bind(conversation_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Keep the sources an answer cites with it.
    pub async fn set_message_sources(
        &self,
        conversation_id: &str,
        id: &str,
        sources: &Value,
    ) -> Result<(), AccountError> {
        self.set_message_json("sources", conversation_id, id, sources)
            .await
    }

    /// Keep the steps of the tools an answer used with it.
    pub async fn set_message_tools(
        &self,
        conversation_id: &str,
        id: &str,
        tools: &Value,
    ) -> Result<(), AccountError> {
        self.set_message_json("tools", conversation_id, id, tools)
            .await
    }

    /// Set one of a message's JSON columns (`sources`, `tools`).
    async fn set_message_json(
        &self,
        column: &'static str,
        conversation_id: &str,
        id: &str,
        value: &Value,
    ) -> Result<(), AccountError> {
        sqlx::query(&format!(
            "UPDATE messages SET {column} = $1 WHERE id = $2 AND conversation_id = $3"
        ))
        .bind(value.to_string())
        .bind(id)
        .bind(conversation_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replies this replica's previous run was generating when it died
    /// (and replies of no replica, written before replicas had ids): kept,
    /// marked incomplete. Other replicas' replies are theirs; a dead
    /// replica's are swept after its lease
    /// ([`Db::sweep_dead_replicas`]). Returns how many.
    pub async fn mark_interrupted_replies(&self) -> Result<u64, AccountError> {
        Ok(sqlx::query(
            "UPDATE messages SET status = 'incomplete' WHERE status = 'streaming' AND (replica_id = $1 OR replica_id IS NULL)",
        )
        .bind(self.replica())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Conversations of the user whose title or any message contains
    /// `query` (case-insensitive substring: works for Chinese, which has no
    /// spaces between words), newest first, at most `limit`.
    pub async fn search_conversations(
        &self,
        user_id: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<SearchHit>, AccountError> {
        let q = query.trim();
        if q.is_empty() {
            return Ok(Vec::new());
        }
        let escaped: String = q
            .chars()
            .flat_map(|c| match c {
                '%' | '_' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let pattern = format!("%{}%", escaped.to_lowercase());
        let rows = sqlx::query(
            "SELECT c.id, c.title, m.id, m.content, c.updated_at FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id AND LOWER(m.content) LIKE $2 ESCAPE '\\' WHERE c.user_id = $1 AND (LOWER(c.title) LIKE $2 ESCAPE '\\' OR m.id IS NOT NULL) ORDER BY c.updated_at DESC, c.id, m.seq",
        )
        .bind(user_id)
        .bind(&pattern)
        .fetch_all(&self.pool)
        .await?;
        let mut hits: Vec<SearchHit> = Vec::new();
        for r in &rows {
            let id: String = r.try_get(0)?;
            if hits.iter().any(|h| h.conversation_id == id) {
                continue;
            }
            let title: String = r.try_get(1)?;
            let message_id: Option<String> = r.try_get(2)?;
            let content: Option<String> = r.try_get(3)?;
            let snippet = snippet_of(content.as_deref().unwrap_or(&title), q);
            hits.push(SearchHit {
                conversation_id: id,
                title,
                message_id,
                snippet,
                updated_at: r.try_get(4)?,
            });
            if hits.len() >= limit {
                break;
            }
        }
        Ok(hits)
    }

    /// Import conversations all at once: either every one is stored or,
    /// on any error, none is.
    pub async fn import_conversations(
        &self,
        user_id: &str,
        model: &str,
        convs: &[ImportConversation],
    ) -> Result<usize, AccountError> {
        if convs.len() > MAX_IMPORT_CONVERSATIONS {
            return Err(AccountError::Invalid(format!(
                "an import holds at most {MAX_IMPORT_CONVERSATIONS} conversations"
            )));
        }
        let mut tx = self.pool.begin().await?;
        for c in convs {
            let cid = format!("conv-{}", random_token(20));
            // The conversation first (its messages refer to it), its leaf last.
            sqlx::query("INSERT INTO conversations (id, user_id, title, system_prompt, model, params, current_leaf, created_at, updated_at) VALUES ($1, $2, $3, '', $4, '{}', NULL, $5, $6)")
                .bind(&cid)
                .bind(user_id)
                .bind(cut(&c.title, 200))
                .bind(model)
                .bind(c.created_at)
                .bind(c.updated_at)
                .execute(&mut *tx)
                .await?;
            let mut ids = std::collections::HashMap::new();
            for (seq, m) in c.messages.iter().enumerate() {
                if m.content.chars().count() > MAX_MESSAGE_CHARS {
                    return Err(AccountError::Invalid(format!(
                        "a message in {:?} is longer than {MAX_MESSAGE_CHARS} characters",
                        c.title
                    )));
                }
                let parent = match &m.parent_id {
                    Some(p) => Some(ids.get(p).cloned().ok_or_else(|| {
                        AccountError::Invalid(format!(
                            "in {:?}, message {:?} comes before its parent",
                            c.title, m.id
                        ))
                    })?),
                    None => None,
                };
                let id = format!("msg-{}", random_token(20));
                ids.insert(m.id.clone(), id.clone());
                sqlx::query(&format!(
                    "INSERT INTO messages ({MSG_COLS}, conversation_id, seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                ))
                .bind(&id)
                .bind(parent)
                .bind(m.role.as_str())
                .bind(&m.content)
                .bind(MessageStatus::Done.as_str())
                .bind(m.model.as_deref())
                .bind(m.created_at)
                .bind(&cid)
                .bind(seq as i64 + 1)
                .execute(&mut *tx)
                .await?;
            }
            let leaf = c
                .current_leaf
                .as_ref()
                .and_then(|l| ids.get(l))
                .or_else(|| c.messages.last().and_then(|m| ids.get(&m.id)));
            sqlx::query("UPDATE conversations SET current_leaf = $1 WHERE id = $2")
                .bind(leaf)
                .bind(&cid)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(convs.len())
    }

    /// The user's personas, oldest first.
    async fn persona_rows(&self, user_id: &str) -> Result<Vec<Persona>, AccountError> {
        let rows = sqlx::query(
            "SELECT id, name, prompt, voice, look FROM personas WHERE user_id = $1 ORDER BY created_at, id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Persona {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    prompt: r.try_get(2)?,
                    voice: r.try_get(3)?,
                    look: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// The user's personas; a user who has none gets the presets.
    pub async fn personas(&self, user_id: &str) -> Result<Vec<Persona>, AccountError> {
        let have = self.persona_rows(user_id).await?;
        if !have.is_empty() {
            return Ok(have);
        }
        let t = now();
        for (i, (name, prompt, voice, look)) in DEFAULT_PERSONAS.iter().enumerate() {
            // A fixed id per user and preset: concurrent first visits
            // cannot seed twice.
            let id = format!("seeded-{i}-{user_id}");
            let _ = sqlx::query("INSERT INTO personas (id, user_id, name, prompt, created_at, voice, look) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                .bind(&id)
                .bind(user_id)
                .bind(name)
                .bind(prompt)
                .bind(t + i as i64)
                .bind(voice)
                .bind(look)
                .execute(&self.pool)
                .await;
        }
        self.persona_rows(user_id).await
    }

    /// Create (`id` None) or change one of the user's personas.
    pub async fn put_persona(
        &self,
        user_id: &str,
        id: Option<&str>,
        name: &str,
        prompt: &str,
        style: PersonaStyle<'_>,
    ) -> Result<Option<Persona>, AccountError> {
        let name = name.trim();
        for (what, v) in [("voice", style.voice), ("look", style.look)] {
            if v.len() > 32
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(AccountError::Invalid(format!(
                    "a persona's {what} is a short name of letters, digits, '-' and '_'"
                )));
            }
        }
        if name.is_empty() || name.chars().count() > 100 {
            return Err(AccountError::Invalid(
                "a persona's name is 1 to 100 characters".into(),
            ));
        }
        if prompt.chars().count() > MAX_MESSAGE_CHARS {
            return Err(AccountError::Invalid(format!(
                "a persona's prompt is at most {MAX_MESSAGE_CHARS} characters"
            )));
        }
        // Seed the presets first, so that editing one does not bring them back.
        self.personas(user_id).await?;
        let id = match id {
            Some(id) => {
                let r = sqlx::query(
                    "UPDATE personas SET name = $1, prompt = $2, voice = $3, look = $4 WHERE id = $5 AND user_id = $6",
                )
                .bind(name)
                .bind(prompt)
                .bind(style.voice)
                .bind(style.look)
                .bind(id)
                .bind(user_id)
                .execute(&self.pool)
                .await?;
                if r.rows_affected() == 0 {
                    return Ok(None);
                }
                id.to_string()
            }
            None => {
                let id = format!("persona-{}", random_token(16));
                sqlx::query("INSERT INTO personas (id, user_id, name, prompt, created_at, voice, look) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                    .bind(&id)
                    .bind(user_id)
                    .bind(name)
                    .bind(prompt)
                    .bind(now())
                    .bind(style.voice)
                    .bind(style.look)
                    .execute(&self.pool)
                    .await?;
                id
            }
        };
        Ok(Some(Persona {
            id,
            name: name.into(),
            prompt: prompt.into(),
            voice: style.voice.into(),
            look: style.look.into(),
        }))
    }

    pub async fn delete_persona(&self, user_id: &str, id: &str) -> Result<bool, AccountError> {
        self.personas(user_id).await?;
        Ok(
            sqlx::query("DELETE FROM personas WHERE id = $1 AND user_id = $2")
                .bind(id)
                .bind(user_id)
                .execute(&self.pool)
                .await?
                .rows_affected()
                > 0,
        )
    }
}

/// Up to ~120 characters of `text` around the first case-insensitive match of `q`.
fn snippet_of(text: &str, q: &str) -> String {
    let lower = text.to_lowercase();
    let ql = q.to_lowercase();
    // Character index of the match (lowercasing can change byte lengths).
    let at = lower
        .find(&ql)
        .map(|b| lower[..b].chars().count())
        .unwrap_or(0);
    let start = at.saturating_sub(40);
    let s: String = text.chars().skip(start).take(120).collect();
    let mut out = String::new();
    if start > 0 {
        out.push('…');
    }
    out.push_str(&s);
    if text.chars().count() > start + 120 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_come_from_the_first_line() {
        assert_eq!(title_from("\n  你好，世界\n第二行"), "你好，世界");
        assert_eq!(title_from("   "), "New chat");
        let long = "长".repeat(50);
        assert_eq!(title_from(&long), format!("{}…", "长".repeat(40)));
    }

    #[test]
    fn snippets_surround_the_match() {
        let text = format!("{}李白的诗{}", "前".repeat(100), "后".repeat(100));
        let s = snippet_of(&text, "李白");
        assert!(s.contains("李白的诗"), "{s}");
        assert!(s.starts_with('…') && s.ends_with('…'));
        assert_eq!(snippet_of("Hello World", "world"), "Hello World");
    }
}
