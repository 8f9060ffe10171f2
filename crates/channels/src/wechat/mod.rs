//! WeChat Official Accounts (公众号) and WeCom (企业微信) apps.
//!
//! Callbacks: `GET ?signature&timestamp&nonce&echostr` verifies the URL
//! (WeCom: `msg_signature` and an encrypted `echostr`); `POST` brings a
//! message as XML, in plaintext, compatible (both) or safe (encrypted)
//! mode. Every callback's signature is checked, and one whose timestamp is
//! further from now than the account's window is refused (a replay).
//! Passive replies are XML in the body of the answer, encrypted when the
//! callback was; pushes go through the API ([`api`]).

pub mod api;
pub mod crypto;
pub mod xml;

use crate::{BoxFuture, Channel, ChannelError, Content, HttpRequest, Inbound, Received, ReplyTo};
use serde::Deserialize;
use std::sync::Arc;

/// The most UTF-8 bytes of text WeChat shows in one message.
pub const MAX_TEXT_BYTES: usize = 2048;
const MIN_PAGE_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An Official Account (公众号).
    #[default]
    Official,
    /// A WeCom (企业微信) app.
    Wecom,
}

/// How callbacks are sent (an Official Account's 消息加解密方式; WeCom
/// always encrypts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// 明文模式: plaintext.
    #[default]
    Plain,
    /// 兼容模式: plaintext and ciphertext side by side.
    Compatible,
    /// 安全模式: ciphertext only.
    Safe,
}

/// `[wechat.NAME]` in the settings file: one account, served at
/// `/wechat/NAME`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    #[serde(default)]
    pub kind: Kind,
    /// The AppID (WeCom: the CorpID).
    pub app_id: String,
    /// The AppSecret (WeCom: the app's Secret), for the API; empty when
    /// the account only answers passively.
    #[serde(default)]
    pub app_secret: String,
    /// The Token set on the platform's server settings page.
    pub token: String,
    /// The 43-character EncodingAESKey (compatible and safe modes, WeCom).
    #[serde(default)]
    pub encoding_aes_key: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// WeCom: the app's AgentId.
    #[serde(default)]
    pub agent_id: Option<i64>,
    /// The account may send customer-service messages (verified service
    /// accounts): an answer not ready in time is pushed when it is.
    /// Without it, a slow answer is given in part and the rest on the
    /// user's next message. WeCom apps can always push.
    #[serde(default)]
    pub customer_service: bool,
    /// The model that answers (default: the server's).
    #[serde(default)]
    pub model: Option<String>,
    /// The persona: the system prompt of every conversation.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Knowledge bases the answers come from (search mode, with citations).
    #[serde(default)]
    pub kb: Vec<String>,
    /// Tools the model may call (`calculator`, `datetime`, …).
    #[serde(default)]
    pub tools: Vec<String>,
    /// The plan WeChat users are metered under (default `free`).
    #[serde(default)]
    pub plan: Option<String>,
    /// Sent to a user who follows the account.
    #[serde(default)]
    pub greeting: Option<String>,
    /// The API's address (tests point it at a fake server).
    #[serde(default)]
    pub api_base: Option<String>,
    /// Callbacks further than this from now are refused (seconds).
    #[serde(default = "default_window")]
    pub timestamp_window_secs: i64,
    /// How long one callback may wait for its answer before WeChat gives
    /// up on it (5 s) — leave room for the trip back.
    #[serde(default = "default_budget")]
    pub reply_budget_ms: u64,
    /// How many times WeChat sends a callback that gets no answer.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Earlier messages of the conversation the model sees (the oldest go
    /// first when the prompt would not fit).
    #[serde(default = "default_history")]
    pub history_messages: usize,
    /// The longest answer, in tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0: always the likeliest answer).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// The longest message, in UTF-8 bytes: WeChat's 2,048 by default;
    /// less makes shorter pages, easier to read on a phone.
    #[serde(default)]
    pub page_bytes: Option<usize>,
}

fn default_window() -> i64 {
    300
}
fn default_budget() -> u64 {
    4500
}
fn default_attempts() -> u32 {
    3
}
fn default_history() -> usize {
    16
}

/// One account's channel.
pub struct WeChat {
    pub name: String,
    pub config: AccountConfig,
    key: Option<crypto::Key>,
    api: Option<api::Api>,
}

impl std::fmt::Debug for WeChat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeChat").field("name", &self.name).finish()
    }
}

impl WeChat {
    /// The channel of account `name`; its settings are checked here, so a
    /// mistake stops the server at start, not at the first message.
    pub fn new(
        name: &str,
        config: AccountConfig,
        tokens: Arc<dyn api::TokenStore>,
    ) -> Result<Self, String> {
        let bad = |m: &str| Err(format!("[wechat.{name}]: {m}"));
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad("an account name is 1 to 64 letters, digits, '-' or '_'");
        }
        if config.token.is_empty() || config.app_id.is_empty() {
            return bad("token and app_id are required");
        }
        let encrypted = config.kind == Kind::Wecom || config.mode != Mode::Plain;
        let key = match &config.encoding_aes_key {
            Some(k) => Some(
                crypto::Key::from_encoding_aes_key(k)
                    .map_err(|e| format!("[wechat.{name}]: {e}"))?,
            ),
            None if encrypted => {
                return bad(
                    "encoding_aes_key is required in compatible and safe modes and for WeCom",
                )
            }
            None => None,
        };
        if config.attempts == 0 || config.reply_budget_ms == 0 {
            return bad("attempts and reply_budget_ms must be positive");
        }
        if config
            .page_bytes
            .is_some_and(|n| !(MIN_PAGE_BYTES..=MAX_TEXT_BYTES).contains(&n))
        {
            return bad("page_bytes is 256 to 2048");
        }
        let flavor = match config.kind {
            Kind::Official => api::Flavor::Official,
            Kind::Wecom => match config.agent_id {
                Some(agent_id) => api::Flavor::WeCom { agent_id },
                None => return bad("agent_id is required for WeCom"),
            },
        };
        let api = (!config.app_secret.is_empty()).then(|| {
            let base = config.api_base.clone().unwrap_or_else(|| {
                match config.kind {
                    Kind::Official => "https://api.weixin.qq.com",
                    Kind::Wecom => "https://qyapi.weixin.qq.com",
                }
                .to_string()
            });
            api::Api::new(
                &base,
                &format!("wechat/{name}"),
                &config.app_id,
                &config.app_secret,
                flavor,
                tokens,
            )
        });
        if config.kind == Kind::Wecom && api.is_none() {
            return bad("app_secret is required for WeCom (answers are sent through its API)");
        }
        if config.customer_service && api.is_none() {
            return bad("customer_service needs app_secret");
        }
        Ok(Self {
            name: name.to_string(),
            config,
            key,
            api,
        })
    }

    fn key(&self) -> Result<&crypto::Key, ChannelError> {
        self.key.as_ref().ok_or_else(|| {
            ChannelError::BadRequest("an encrypted message, but no encoding_aes_key is set".into())
        })
    }

    fn decrypt_checked(
        &self,
        q: &std::collections::BTreeMap<String, String>,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
    ) -> Result<String, ChannelError> {
        let sig = q
            .get("msg_signature")
            .ok_or_else(|| ChannelError::Forbidden("no msg_signature".into()))?;
        let want = crypto::signature(&[&self.config.token, timestamp, nonce, encrypt]);
        if !crypto::same(sig, &want) {
            return Err(ChannelError::Forbidden("bad msg_signature".into()));
        }
        self.key()?.decrypt(encrypt, &self.config.app_id)
    }
}

impl Channel for WeChat {
    fn receive(&self, req: &HttpRequest<'_>, now: i64) -> Result<Received, ChannelError> {
        let q = req.query;
        let forbid = |m: &str| ChannelError::Forbidden(m.to_string());
        let timestamp = q.get("timestamp").ok_or_else(|| forbid("no timestamp"))?;
        let nonce = q.get("nonce").ok_or_else(|| forbid("no nonce"))?;
        let ts: i64 = timestamp.parse().map_err(|_| forbid("bad timestamp"))?;
        if (now - ts).abs() > self.config.timestamp_window_secs {
            return Err(forbid("the timestamp is outside the window (a replay?)"));
        }
        let wecom = self.config.kind == Kind::Wecom;
        if !wecom {
            let sig = q.get("signature").ok_or_else(|| forbid("no signature"))?;
            let want = crypto::signature(&[&self.config.token, timestamp, nonce]);
            if !crypto::same(sig, &want) {
                return Err(forbid("bad signature"));
            }
        }
        if !req.post {
            let echo = q.get("echostr").ok_or_else(|| forbid("no echostr"))?;
            return Ok(Received::Echo(if wecom {
                self.decrypt_checked(q, timestamp, nonce, echo)?
            } else {
                echo.clone()
            }));
        }
        let outer = xml::parse(req.body)?;
        let encrypted_call = q.get("encrypt_type").is_some_and(|t| t == "aes") || wecom;
        let (fields, encrypted) = match outer.get("Encrypt") {
            Some(enc) if encrypted_call && (wecom || self.config.mode != Mode::Plain) => {
                let inner = self.decrypt_checked(q, timestamp, nonce, enc)?;
                (xml::parse(inner.as_bytes())?, true)
            }
            _ if wecom || self.config.mode == Mode::Safe => {
                return Err(ChannelError::BadRequest(
                    "this account takes encrypted messages only".into(),
                ))
            }
            _ => (outer, false),
        };
        message(fields, encrypted).map(Received::Message)
    }

    fn reply(&self, to: &Inbound, text: &str, now: i64) -> Result<String, ChannelError> {
        let body = xml::text_reply(&to.user, &to.reply_to.account, now, text);
        if !to.reply_to.encrypted {
            return Ok(body);
        }
        let enc = self.key()?.encrypt(&body, &self.config.app_id);
        let nonce = format!("{}", rand::random::<u32>());
        let ts = now.to_string();
        let sig = crypto::signature(&[&self.config.token, &ts, &nonce, &enc]);
        Ok(xml::encrypted_reply(&enc, &sig, now, &nonce))
    }

    fn can_push(&self) -> bool {
        self.api.is_some() && (self.config.customer_service || self.config.kind == Kind::Wecom)
    }

    fn push<'a>(&'a self, user: &'a str, text: &'a str) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async move {
            match &self.api {
                Some(api) if self.can_push() => api.send_text(user, text).await,
                _ => Err(ChannelError::Unsupported(
                    "this account cannot send messages outside a reply".into(),
                )),
            }
        })
    }

    fn max_bytes(&self) -> usize {
        self.config.page_bytes.unwrap_or(MAX_TEXT_BYTES)
    }
}

/// A callback's fields as a message.
fn message(f: xml::Fields, encrypted: bool) -> Result<Inbound, ChannelError> {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    let user = get("FromUserName");
    if user.is_empty() || user.len() > 128 {
        return Err(ChannelError::BadRequest("no FromUserName".into()));
    }
    let created: i64 = get("CreateTime").parse().unwrap_or(0);
    let kind = get("MsgType");
    let content = match kind.as_str() {
        "text" => Content::Text(get("Content")),
        "voice" => Content::Voice {
            recognition: f
                .get("Recognition")
                .filter(|r| !r.trim().is_empty())
                .cloned(),
        },
        "image" => Content::Image {
            url: f.get("PicUrl").cloned(),
        },
        "link" => Content::Link {
            title: get("Title"),
            description: get("Description"),
            url: get("Url"),
        },
        "location" => Content::Location {
            label: get("Label"),
            latitude: get("Location_X").parse().unwrap_or(0.0),
            longitude: get("Location_Y").parse().unwrap_or(0.0),
        },
        "event" => match get("Event").to_ascii_lowercase().as_str() {
            "subscribe" => Content::Subscribe,
            "unsubscribe" => Content::Unsubscribe,
            "click" => Content::Menu(get("EventKey")),
            e => Content::Other(format!("event:{e}")),
        },
        other => Content::Other(other.chars().take(32).collect()),
    };
    let key = match f.get("MsgId").or_else(|| f.get("MsgID")) {
        Some(id) if !id.is_empty() => format!("msg:{id}"),
        _ => format!("event:{user}:{created}:{}", get("Event")),
    };
    Ok(Inbound {
        user,
        key,
        created,
        content,
        reply_to: ReplyTo {
            account: get("ToUserName"),
            encrypted,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    struct NoTokens;

    impl api::TokenStore for NoTokens {
        fn get<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<String>, String>> {
            Box::pin(async { Ok(None) })
        }
        fn lease<'a>(&'a self, _: &'a str, _: i64) -> BoxFuture<'a, Result<bool, String>> {
            Box::pin(async { Ok(false) })
        }
        fn put<'a>(&'a self, _: &'a str, _: &'a str, _: i64) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
        fn invalidate<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
    }

    const EAK: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

    fn channel(mode: Mode) -> WeChat {
        let mut cfg: AccountConfig =
            serde_json::from_str(r#"{"app_id": "wxapp", "token": "tok"}"#).unwrap();
        cfg.mode = mode;
        cfg.encoding_aes_key = Some(EAK.into());
        WeChat::new("t", cfg, Arc::new(NoTokens)).unwrap()
    }

    /// A signed, encrypted callback carrying `inner`.
    fn callback(inner: &str, ts: i64) -> (std::collections::BTreeMap<String, String>, String) {
        let key = crypto::Key::from_encoding_aes_key(EAK).unwrap();
        let enc = key.encrypt(inner, "wxapp");
        let t = ts.to_string();
        let mut q = std::collections::BTreeMap::new();
        q.insert("timestamp".into(), t.clone());
        q.insert("nonce".into(), "n".into());
        q.insert("signature".into(), crypto::signature(&["tok", &t, "n"]));
        q.insert("encrypt_type".into(), "aes".into());
        q.insert(
            "msg_signature".into(),
            crypto::signature(&["tok", &t, "n", &enc]),
        );
        (
            q,
            format!(
                "<xml><ToUserName>gh</ToUserName><Encrypt>{}</Encrypt></xml>",
                xml::cdata(&enc)
            ),
        )
    }

    const TEXT: &str = "<xml><ToUserName><![CDATA[gh]]></ToUserName><FromUserName><![CDATA[o-1]]></FromUserName><CreateTime>1000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[你好]]></Content><MsgId>42</MsgId></xml>";

    #[test]
    fn a_safe_mode_callback_reads_and_its_reply_decrypts() {
        let ch = channel(Mode::Safe);
        let (q, body) = callback(TEXT, 1000);
        let req = HttpRequest {
            post: true,
            query: &q,
            body: body.as_bytes(),
        };
        let Ok(Received::Message(m)) = ch.receive(&req, 1010) else {
            panic!("not read");
        };
        assert_eq!((m.user.as_str(), m.key.as_str()), ("o-1", "msg:42"));
        assert_eq!(m.content, Content::Text("你好".into()));
        assert!(m.reply_to.encrypted);
        // Outside the window: refused.
        assert!(matches!(
            ch.receive(&req, 1000 + 301),
            Err(ChannelError::Forbidden(_))
        ));
        let reply = ch.reply(&m, "好的", 1010).unwrap();
        let f = xml::parse(reply.as_bytes()).unwrap();
        assert_eq!(
            f["MsgSignature"],
            crypto::signature(&["tok", &f["TimeStamp"], &f["Nonce"], &f["Encrypt"]])
        );
        let inner = crypto::Key::from_encoding_aes_key(EAK)
            .unwrap()
            .decrypt(&f["Encrypt"], "wxapp")
            .unwrap();
        let r = xml::parse(inner.as_bytes()).unwrap();
        assert_eq!(
            (
                r["ToUserName"].as_str(),
                r["FromUserName"].as_str(),
                r["Content"].as_str()
            ),
            ("o-1", "gh", "好的")
        );
    }

    /// An account that pushes builds its API client at start: that must not
    /// depend on the embedding program having installed a TLS provider
    /// (reqwest panics without one; the fuzz target found it).
    #[test]
    fn an_account_with_an_api_builds_without_a_provider_installed_first() {
        let mut cfg: AccountConfig = serde_json::from_str(
            r#"{"app_id": "wxapp", "token": "tok", "app_secret": "s", "customer_service": true}"#,
        )
        .unwrap();
        cfg.api_base = Some("https://api.example.com".into());
        let ch = WeChat::new("t", cfg, Arc::new(NoTokens)).unwrap();
        assert!(ch.can_push());
    }

    /// Callbacks with random bytes changed, in the body or inside the
    /// ciphertext (signed again, so decryption and the inner XML are
    /// reached): an answer or an error, never a panic.
    #[test]
    fn mutated_callbacks_never_panic() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for mode in [Mode::Plain, Mode::Compatible, Mode::Safe] {
            let ch = channel(mode);
            for round in 0..3000 {
                let mut inner = TEXT.as_bytes().to_vec();
                let mut outer = None;
                for _ in 0..rng.random_range(1..6) {
                    let at = rng.random_range(0..inner.len());
                    match rng.random_range(0..3) {
                        0 => inner[at] = rng.random(),
                        1 => {
                            inner.remove(at);
                        }
                        _ => inner.insert(at, b"<>&;![]/\"x\xe4"[rng.random_range(0..11)]),
                    }
                }
                let inner = String::from_utf8_lossy(&inner).into_owned();
                let (q, mut body) = callback(&inner, 1000);
                if round % 2 == 1 {
                    let mut b = body.into_bytes();
                    let at = rng.random_range(0..b.len());
                    b[at] = rng.random();
                    outer = Some(b);
                    body = String::new();
                }
                let bytes = outer.unwrap_or_else(|| body.into_bytes());
                let req = HttpRequest {
                    post: true,
                    query: &q,
                    body: &bytes,
                };
                if let Ok(Received::Message(m)) = ch.receive(&req, 1000) {
                    let _ = ch.reply(&m, "ok", 1000);
                }
                let plain = HttpRequest {
                    post: true,
                    query: &q,
                    body: inner.as_bytes(),
                };
                let _ = ch.receive(&plain, 1000);
            }
        }
    }
}
