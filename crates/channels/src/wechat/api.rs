//! WeChat's server API, for messages sent outside a reply: the access
//! token (one per account, fetched by one process at a time: re-fetching
//! invalidates the old token) and the customer-service / WeCom send calls.

use crate::{BoxFuture, ChannelError};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Where an account's access token is kept, shared by every replica (the
/// server's database). Errors are messages for the log.
pub trait TokenStore: Send + Sync {
    /// The stored token, if it is valid for at least another minute.
    fn get<'a>(&'a self, account: &'a str) -> BoxFuture<'a, Result<Option<String>, String>>;
    /// Take the right to fetch a new token for `secs` seconds; `false`
    /// when another process holds it.
    fn lease<'a>(&'a self, account: &'a str, secs: i64) -> BoxFuture<'a, Result<bool, String>>;
    /// Store a fetched token (and end the lease).
    fn put<'a>(
        &'a self,
        account: &'a str,
        token: &'a str,
        expires_at: i64,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Forget `token` (the API called it invalid), unless a newer one has
    /// replaced it already.
    fn invalidate<'a>(
        &'a self,
        account: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// Which API the account speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Official Account: `cgi-bin/token`, `cgi-bin/message/custom/send`.
    Official,
    /// WeCom app: `cgi-bin/gettoken`, `cgi-bin/message/send` with the
    /// app's `agentid`.
    WeCom { agent_id: i64 },
}

/// The API errors that mean "the token is no good": fetch another.
const TOKEN_ERRORS: [i64; 3] = [40001, 40014, 42001];
const LEASE_SECS: i64 = 20;

pub struct Api {
    pub base: String,
    pub account: String,
    pub app_id: String,
    pub secret: String,
    pub flavor: Flavor,
    pub store: Arc<dyn TokenStore>,
    http: reqwest::Client,
    /// One fetch at a time in this process (the store's lease covers the
    /// others).
    fetching: tokio::sync::Mutex<()>,
}

impl Api {
    pub fn new(
        base: &str,
        account: &str,
        app_id: &str,
        secret: &str,
        flavor: Flavor,
        store: Arc<dyn TokenStore>,
    ) -> Self {
        // reqwest is built without a TLS crypto provider (the tree has one,
        // ring): make it the process's before building a client, which
        // would otherwise panic. Idempotent.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hanlin/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_string(),
            account: account.to_string(),
            app_id: app_id.to_string(),
            secret: secret.to_string(),
            flavor,
            store,
            http,
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// A valid access token: the stored one, or a new one fetched by
    /// whichever process takes the lease first.
    pub async fn token(&self) -> Result<String, ChannelError> {
        let store_err = ChannelError::Store;
        for _ in 0..100 {
            if let Some(t) = self.store.get(&self.account).await.map_err(store_err)? {
                return Ok(t);
            }
            let _one = self.fetching.lock().await;
            if let Some(t) = self.store.get(&self.account).await.map_err(store_err)? {
                return Ok(t);
            }
            if self
                .store
                .lease(&self.account, LEASE_SECS)
                .await
                .map_err(store_err)?
            {
                let (token, expires_in) = self.fetch_token().await?;
                let expires_at = now() + expires_in;
                self.store
                    .put(&self.account, &token, expires_at)
                    .await
                    .map_err(store_err)?;
                tracing::info!(account = %self.account, "fetched a new WeChat access token");
                return Ok(token);
            }
            drop(_one);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(ChannelError::Http(
            "no access token: another process holds the lease and has not stored one".into(),
        ))
    }

    async fn fetch_token(&self) -> Result<(String, i64), ChannelError> {
        let url = match self.flavor {
            Flavor::Official => format!("{}/cgi-bin/token", self.base),
            Flavor::WeCom { .. } => format!("{}/cgi-bin/gettoken", self.base),
        };
        let query: Vec<(&str, &str)> = match self.flavor {
            Flavor::Official => vec![
                ("grant_type", "client_credential"),
                ("appid", &self.app_id),
                ("secret", &self.secret),
            ],
            Flavor::WeCom { .. } => vec![("corpid", &self.app_id), ("corpsecret", &self.secret)],
        };
        let url = reqwest::Url::parse_with_params(&url, &query)
            .map_err(|e| ChannelError::Http(format!("the API address: {e}")))?;
        let v = self.call(self.http.get(url)).await?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| ChannelError::Http("the token answer has no access_token".into()))?;
        let expires_in = v.get("expires_in").and_then(Value::as_i64).unwrap_or(7200);
        Ok((token.to_string(), expires_in.clamp(60, 7 * 86400)))
    }

    /// One API call: the JSON answer, or its `errcode` as an error.
    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Value, ChannelError> {
        let r = req
            .send()
            .await
            .map_err(|e| ChannelError::Http(e.without_url().to_string()))?;
        if !r.status().is_success() {
            return Err(ChannelError::Http(format!("HTTP {}", r.status())));
        }
        let bytes = r
            .bytes()
            .await
            .map_err(|e| ChannelError::Http(e.without_url().to_string()))?;
        if bytes.len() > 1 << 20 {
            return Err(ChannelError::Http("the answer is too large".into()));
        }
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|_| ChannelError::Http("the answer is not JSON".into()))?;
        match v.get("errcode").and_then(Value::as_i64) {
            None | Some(0) => Ok(v),
            Some(code) => Err(ChannelError::Api {
                code,
                message: v
                    .get("errmsg")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect(),
            }),
        }
    }

    /// Send a text message to `user`; a token the API calls invalid is
    /// replaced and the call made once more.
    pub async fn send_text(&self, user: &str, text: &str) -> Result<(), ChannelError> {
        let body = match self.flavor {
            Flavor::Official => {
                json!({"touser": user, "msgtype": "text", "text": {"content": text}})
            }
            Flavor::WeCom { agent_id } => json!({
                "touser": user, "msgtype": "text", "agentid": agent_id, "text": {"content": text}
            }),
        };
        let path = match self.flavor {
            Flavor::Official => "cgi-bin/message/custom/send",
            Flavor::WeCom { .. } => "cgi-bin/message/send",
        };
        let mut last = None;
        for _ in 0..2 {
            let token = self.token().await?;
            let url = reqwest::Url::parse_with_params(
                &format!("{}/{path}", self.base),
                &[("access_token", token.as_str())],
            )
            .map_err(|e| ChannelError::Http(format!("the API address: {e}")))?;
            let req = self.http.post(url).json(&body);
            match self.call(req).await {
                Ok(_) => return Ok(()),
                Err(ChannelError::Api { code, message }) if TOKEN_ERRORS.contains(&code) => {
                    tracing::warn!(account = %self.account, code, "the WeChat access token was refused; fetching another");
                    self.store
                        .invalidate(&self.account, &token)
                        .await
                        .map_err(ChannelError::Store)?;
                    last = Some(ChannelError::Api { code, message });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ChannelError::Http("send failed".into())))
    }
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
