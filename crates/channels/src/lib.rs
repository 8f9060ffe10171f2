//! Messaging channels for `hanlin serve`: where people talk to the
//! assistant from another app. A channel turns the platform's HTTP
//! callbacks into [`Inbound`] messages (after checking they come from the
//! platform), renders a passive reply into the platform's response body,
//! and pushes messages outside a reply where the platform allows it. What
//! happens between — de-duplication, conversations, quotas, the model —
//! is the server's (`hanlin_server::channel`), the same for every channel,
//! so Feishu, DingTalk or Slack can follow as one file each.
//!
//! [`wechat`] implements WeChat Official Accounts (公众号; plaintext,
//! compatible and safe modes) and WeCom (企业微信) apps; [`plain`] turns the
//! model's Markdown into the plain text such apps show, in pages.

pub mod plain;
pub mod wechat;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a callback was refused or a push failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Not from the platform: a bad signature, a stale timestamp, the wrong
    /// app id inside a ciphertext (HTTP 403).
    #[error("refused: {0}")]
    Forbidden(String),
    /// Malformed: bad XML, bad base64 or padding, too large (HTTP 400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The platform's API answered with an error code.
    #[error("the platform refused: {code} {message}")]
    Api { code: i64, message: String },
    /// The platform's API could not be reached or answered nonsense.
    #[error("the platform's API: {0}")]
    Http(String),
    /// Where access tokens are kept (the database) failed.
    #[error("token store: {0}")]
    Store(String),
    /// The channel cannot do this (e.g. push without a customer-service API).
    #[error("{0}")]
    Unsupported(String),
}

/// An HTTP callback as a channel sees it.
pub struct HttpRequest<'a> {
    /// `POST` (a message) or `GET` (URL verification).
    pub post: bool,
    pub query: &'a BTreeMap<String, String>,
    pub body: &'a [u8],
}

/// What a callback carried.
#[derive(Debug)]
pub enum Received {
    /// URL verification: answer with this body and do nothing else.
    Echo(String),
    /// A message or event from a user.
    Message(Inbound),
}

/// A message from a user of a channel.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The user's id on the platform (WeChat: the OpenID, or WeCom's UserID).
    pub user: String,
    /// The same for every delivery of this message (WeChat retries an
    /// unanswered callback): `MsgId`, or for events user + `CreateTime`.
    pub key: String,
    /// When the platform says it was sent (seconds since the epoch).
    pub created: i64,
    pub content: Content,
    /// What a passive reply needs: who it comes from, whether to encrypt.
    pub reply_to: ReplyTo,
}

#[derive(Debug, Clone, Default)]
pub struct ReplyTo {
    /// The account's own id on the platform (the callback's `ToUserName`).
    pub account: String,
    /// The callback was encrypted, so the reply is too.
    pub encrypted: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    /// A voice message, with the platform's speech recognition when on.
    Voice {
        recognition: Option<String>,
    },
    Image {
        url: Option<String>,
    },
    Link {
        title: String,
        description: String,
        url: String,
    },
    Location {
        label: String,
        latitude: f64,
        longitude: f64,
    },
    /// The user followed the account.
    Subscribe,
    /// The user unfollowed it (no reply reaches them).
    Unsubscribe,
    /// A custom menu item (`CLICK`) with its key.
    Menu(String),
    /// Any other message or event type, by its platform name.
    Other(String),
}

/// One platform: callbacks in, replies and pushes out.
pub trait Channel: Send + Sync {
    /// Check a callback came from the platform and read it. `now` is the
    /// current time in seconds (callbacks older than the window are refused).
    fn receive(&self, req: &HttpRequest<'_>, now: i64) -> Result<Received, ChannelError>;
    /// The response body that answers `to` with `text` (at most
    /// [`Channel::max_bytes`]).
    fn reply(&self, to: &Inbound, text: &str, now: i64) -> Result<String, ChannelError>;
    /// Whether [`Channel::push`] works: the account may send messages
    /// outside a reply.
    fn can_push(&self) -> bool;
    /// Send `text` to `user` outside a reply.
    fn push<'a>(&'a self, user: &'a str, text: &'a str) -> BoxFuture<'a, Result<(), ChannelError>>;
    /// The longest text one message may carry, in UTF-8 bytes.
    fn max_bytes(&self) -> usize;
}
