//! A WeChat callback's body and query on arbitrary bytes, through every
//! mode (plaintext, compatible, safe; WeCom): a message or a clear refusal,
//! never a panic. The input's first byte picks the mode; a valid signature
//! is computed for the rest, so the XML parser and the decryption are
//! reached, not only the signature check.
#![no_main]

use hanlin_channels::wechat::{api, crypto, AccountConfig, Kind, Mode, WeChat};
use hanlin_channels::{BoxFuture, Channel, HttpRequest};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::Arc;

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

const TOKEN: &str = "t";
const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (kind, mode) = match pick % 4 {
        0 => (Kind::Official, Mode::Plain),
        1 => (Kind::Official, Mode::Compatible),
        2 => (Kind::Official, Mode::Safe),
        _ => (Kind::Wecom, Mode::Safe),
    };
    let mut cfg: AccountConfig =
        serde_json::from_str(r#"{"app_id": "wxfuzz", "token": "t", "app_secret": "s", "agent_id": 1}"#)
            .expect("settings");
    cfg.kind = kind;
    cfg.mode = mode;
    cfg.encoding_aes_key = Some(KEY.into());
    let Ok(ch) = WeChat::new("fuzz", cfg, Arc::new(NoTokens)) else {
        return;
    };
    // Half the inputs are the body as is; the other half the Encrypt field
    // of a well-formed envelope, signed.
    let (body, encrypt) = if pick & 4 == 0 {
        (rest.to_vec(), String::new())
    } else {
        let enc = String::from_utf8_lossy(rest).into_owned();
        let xml = format!("<xml><ToUserName>gh</ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt></xml>");
        (xml.into_bytes(), enc)
    };
    let mut q = BTreeMap::new();
    q.insert("timestamp".to_string(), "1000".to_string());
    q.insert("nonce".to_string(), "n".to_string());
    q.insert("signature".to_string(), crypto::signature(&[TOKEN, "1000", "n"]));
    q.insert("encrypt_type".to_string(), "aes".to_string());
    q.insert("msg_signature".to_string(), crypto::signature(&[TOKEN, "1000", "n", &encrypt]));
    let req = HttpRequest {
        post: true,
        query: &q,
        body: &body,
    };
    if let Ok(hanlin_channels::Received::Message(m)) = ch.receive(&req, 1000) {
        let _ = ch.reply(&m, "ok", 1000);
    }
    let _ = hanlin_channels::plain::from_markdown(&String::from_utf8_lossy(rest));
});
