//! The chat web app: its embedded assets (`web/`, served at `/`) and the
//! JSON API it talks to (`/api/...`), authenticated by a session cookie.
//!
//! Sign-in sets an HttpOnly, SameSite=Strict cookie holding a random secret
//! (only its hash is stored); every cookie-authenticated write must also
//! carry the session's CSRF token in `X-CSRF-Token`. Conversations are
//! stored by the server; a reply is generated on the conversation's model
//! (local or upstream: `crate::chat_model`) through the same limiter and
//! usage metering as `/v1/chat/completions`, and its text is
//! written to the database as it streams (every second, and when it ends),
//! so a stopped reply, a closed tab or a crash keeps what was generated,
//! marked incomplete.

use crate::admin::account_error;
use crate::error::ApiError;
use crate::extract::{JsonBody, WebRead, WebWrite};
use crate::guard::{constant_time_eq, ClientAddr};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use hanlin_accounts::chats::{ConversationPatch, Message, MAX_MESSAGE_CHARS};
use hanlin_accounts::web::{Session, SignInError, SignupPolicy, SESSION_TTL_SECS};
use hanlin_accounts::{Caller, NewKey, Role, UserStatus};
use hanlin_engine::Event;
use hanlin_gateway::{Endpoint, Request};
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

mod account;
mod assets;
mod conversations;
pub mod images;
mod session;
mod transfer;
pub mod voice;

pub use account::*;
pub use assets::*;
pub use conversations::*;
pub use images::conversation_image;
pub use session::*;
pub use transfer::*;
pub use voice::{speak, transcribe};
