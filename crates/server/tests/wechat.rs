//! The WeChat channel against a fake WeChat on loopback: the fake signs and
//! encrypts callbacks as WeChat does (plaintext, compatible and safe modes;
//! WeCom), gives up on a callback after its timeout and calls again (three
//! times in all), and plays the API (access tokens, customer-service
//! messages) — with a token it revokes mid-test. The answers come from the
//! real SmolLM2 model.

use crate::common::*;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::Json;
use hanlin_accounts::Plan;
use hanlin_channels::wechat::{crypto, xml, AccountConfig, Kind, Mode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOKEN: &str = "hanlin-test-token";
const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

// ------------------------------------------------------------ the fake API

#[derive(Default)]
struct Api {
    /// Tokens handed out, in order; the last one is valid unless revoked.
    tokens: Vec<String>,
    revoked: bool,
    /// Successful sends: (touser, content, agentid).
    sent: Vec<(String, String, Option<i64>)>,
    /// Sends refused for a bad token.
    refused: usize,
}

type SharedApi = Arc<Mutex<Api>>;

async fn fake_api() -> (String, SharedApi) {
    let api: SharedApi = Arc::default();
    async fn token(
        State(api): State<SharedApi>,
        Query(q): Query<BTreeMap<String, String>>,
    ) -> Json<Value> {
        let ok = q.get("secret").is_some_and(|s| s == "app-secret")
            || q.get("corpsecret").is_some_and(|s| s == "app-secret");
        if !ok {
            return Json(json!({"errcode": 40125, "errmsg": "invalid appsecret"}));
        }
        let mut a = api.lock().unwrap();
        let t = format!("TOKEN-{}", a.tokens.len() + 1);
        a.tokens.push(t.clone());
        a.revoked = false;
        Json(json!({"access_token": t, "expires_in": 7200}))
    }
    async fn send(
        State(api): State<SharedApi>,
        Query(q): Query<BTreeMap<String, String>>,
        Json(b): Json<Value>,
    ) -> Json<Value> {
        let mut a = api.lock().unwrap();
        let valid = !a.revoked && a.tokens.last() == q.get("access_token");
        if !valid {
            a.refused += 1;
            return Json(json!({"errcode": 40001, "errmsg": "invalid credential"}));
        }
        a.sent.push((
            b["touser"].as_str().unwrap_or("").into(),
            b["text"]["content"].as_str().unwrap_or("").into(),
            b["agentid"].as_i64(),
        ));
        Json(json!({"errcode": 0, "errmsg": "ok"}))
    }
    let app = axum::Router::new()
        .route("/cgi-bin/token", get(token))
        .route("/cgi-bin/gettoken", get(token))
        .route("/cgi-bin/message/custom/send", post(send))
        .route("/cgi-bin/message/send", post(send))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, api)
}

/// The tests of slow answers need a long answer every run. Sampled, the
/// small model now and then refuses in one short sentence ("I'm unable to
/// engage in discussions regarding political matters…" to a story about a
/// lighthouse keeper), which is done within three calls; greedy, it writes
/// the story.
const SLOW_TEMPERATURE: f32 = 0.0;

fn account(kind: Kind, mode: Mode, app_id: &str) -> AccountConfig {
    let mut cfg: AccountConfig = serde_json::from_value(json!({
        "app_id": app_id,
        "token": TOKEN,
        "max_tokens": 24,
    }))
    .unwrap();
    cfg.kind = kind;
    cfg.mode = mode;
    if mode != Mode::Plain || kind == Kind::Wecom {
        cfg.encoding_aes_key = Some(AES_KEY.into());
    }
    cfg
}

// ------------------------------------------------------- the fake callbacks

/// WeChat's side of the callbacks of one account.
struct WeChat {
    url: String,
    app_id: String,
    mode: Mode,
    wecom: bool,
    /// How long WeChat waits for an answer before calling again.
    timeout: Duration,
    http: reqwest::Client,
}

/// What one delivery (up to three calls) got.
#[derive(Debug)]
struct Delivery {
    /// Per call: the status, or None when it timed out.
    calls: Vec<Option<u16>>,
    /// The reply's text, if a call got one.
    reply: Option<String>,
}

impl WeChat {
    fn new(base: &str, name: &str, app_id: &str, mode: Mode, wecom: bool) -> Self {
        Self {
            url: format!("{base}/wechat/{name}"),
            app_id: app_id.into(),
            mode,
            wecom,
            timeout: Duration::from_secs(5),
            http: reqwest::Client::new(),
        }
    }

    fn key(&self) -> crypto::Key {
        crypto::Key::from_encoding_aes_key(AES_KEY).unwrap()
    }

    /// The query and body of a callback carrying `inner` (a message's XML).
    fn sign(&self, inner: &str, ts: i64) -> (String, String) {
        let ts = ts.to_string();
        let nonce = format!("{}", rand::random::<u32>());
        let sig = crypto::signature(&[TOKEN, &ts, &nonce]);
        if self.mode == Mode::Plain && !self.wecom {
            return (
                format!("signature={sig}&timestamp={ts}&nonce={nonce}&openid=o"),
                inner.into(),
            );
        }
        let enc = self.key().encrypt(inner, &self.app_id);
        let msig = crypto::signature(&[TOKEN, &ts, &nonce, &enc]);
        let body = if self.mode == Mode::Compatible {
            // Compatible mode: the plaintext fields and the ciphertext.
            inner.replacen(
                "</xml>",
                &format!("<Encrypt>{}</Encrypt></xml>", xml::cdata(&enc)),
                1,
            )
        } else {
            format!(
                "<xml><ToUserName>{}</ToUserName><Encrypt>{}</Encrypt></xml>",
                xml::cdata("gh_test"),
                xml::cdata(&enc)
            )
        };
        let q = if self.wecom {
            format!("msg_signature={msig}&timestamp={ts}&nonce={nonce}")
        } else {
            format!("signature={sig}&timestamp={ts}&nonce={nonce}&openid=o&encrypt_type=aes&msg_signature={msig}")
        };
        (q, body)
    }

    /// The text of a reply body, checking the signature of an encrypted one.
    fn read_reply(&self, body: &str) -> String {
        let f = xml::parse(body.as_bytes()).expect("the reply is XML");
        let f = match f.get("Encrypt") {
            Some(enc) => {
                let ts = &f["TimeStamp"];
                let nonce = &f["Nonce"];
                assert_eq!(
                    f["MsgSignature"],
                    crypto::signature(&[TOKEN, ts, nonce, enc])
                );
                let inner = self.key().decrypt(enc, &self.app_id).expect("decrypts");
                xml::parse(inner.as_bytes()).unwrap()
            }
            None => {
                assert!(
                    self.mode == Mode::Plain || self.mode == Mode::Compatible,
                    "an encrypted account answered in plaintext"
                );
                f
            }
        };
        assert_eq!(f["MsgType"], "text");
        assert_eq!(f["FromUserName"], "gh_test");
        f["Content"].clone()
    }

    /// Deliver `inner` as WeChat does: call, and call again (at most three
    /// times) while no answer comes within the timeout.
    async fn deliver(&self, inner: &str) -> Delivery {
        let mut calls = Vec::new();
        for _ in 0..3 {
            let (q, body) = self.sign(inner, hanlin_accounts::now());
            let r = self
                .http
                .post(format!("{}?{q}", self.url))
                .body(body)
                .timeout(self.timeout)
                .send()
                .await;
            match r {
                Ok(r) => {
                    let status = r.status().as_u16();
                    calls.push(Some(status));
                    let text = r.text().await.unwrap_or_default();
                    if status == 200 {
                        let reply =
                            (text != "success" && !text.is_empty()).then(|| self.read_reply(&text));
                        return Delivery { calls, reply };
                    }
                }
                Err(e) => {
                    assert!(e.is_timeout(), "{e}");
                    calls.push(None);
                }
            }
        }
        Delivery { calls, reply: None }
    }

    async fn text(&self, user: &str, msg_id: u64, content: &str) -> Delivery {
        self.deliver(&text_xml(user, msg_id, content)).await
    }
}

fn text_xml(user: &str, msg_id: u64, content: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_test]]></ToUserName><FromUserName>{}</FromUserName><CreateTime>{}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content>{}</Content><MsgId>{msg_id}</MsgId></xml>",
        xml::cdata(user),
        hanlin_accounts::now(),
        xml::cdata(content)
    )
}

fn event_xml(user: &str, event: &str, at: i64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_test]]></ToUserName><FromUserName>{}</FromUserName><CreateTime>{at}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event>{}</Event></xml>",
        xml::cdata(user),
        xml::cdata(event)
    )
}

/// The conversations of a channel user, through the admin path.
async fn conversations(srv: &TestServer, account: &str, user: &str) -> Vec<Value> {
    let (status, v) = call(
        reqwest::Method::GET,
        format!(
            "{}/v1/admin/channels/{account}/users/{user}/conversations",
            srv.base
        ),
        &srv.admin_key,
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["data"].as_array().cloned().unwrap_or_default()
}

/// The assistant messages of all a user's conversations.
async fn answers(srv: &TestServer, account: &str, user: &str) -> Vec<String> {
    let mut out = Vec::new();
    for c in conversations(srv, account, user).await {
        for m in c["messages"].as_array().unwrap() {
            if m["role"] == "assistant" {
                out.push(m["content"].as_str().unwrap().to_string());
            }
        }
    }
    out
}

/// Wait until message `key` has been delivered one way or another.
async fn settled(srv: &TestServer, account: &str, key: &str) {
    use hanlin_accounts::channels::MsgStatus;
    for _ in 0..3600 {
        let m = srv.state.db.channel_message(account, key).await.unwrap();
        if m.is_some_and(|m| m.status == MsgStatus::Done) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{key} was never settled");
}

// ------------------------------------------------------------------- tests

#[tokio::test]
async fn url_verification_modes_and_bad_callbacks() {
    let srv = start_with(|c| {
        c.wechat.insert(
            "plain".into(),
            account(Kind::Official, Mode::Plain, "wxplain"),
        );
        c.wechat.insert(
            "compat".into(),
            account(Kind::Official, Mode::Compatible, "wxcompat"),
        );
        c.wechat
            .insert("safe".into(), account(Kind::Official, Mode::Safe, "wxsafe"));
        let mut w = account(Kind::Wecom, Mode::Safe, "wwcorp");
        w.agent_id = Some(1000002);
        w.app_secret = "app-secret".into();
        c.wechat.insert("wecom".into(), w);
    })
    .await;
    let http = reqwest::Client::new();
    let now = hanlin_accounts::now();
    // URL verification: the echo comes back verbatim; anything else is 403.
    let ts = now.to_string();
    let sig = crypto::signature(&[TOKEN, &ts, "n1"]);
    let url = |name: &str, q: &str| format!("{}/wechat/{name}?{q}", srv.base);
    let r = http
        .get(url(
            "plain",
            &format!("signature={sig}&timestamp={ts}&nonce=n1&echostr=E-123_x"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (200, "E-123_x".to_string())
    );
    let r = http
        .get(url(
            "plain",
            &format!(
                "signature={}&timestamp={ts}&nonce=n1&echostr=E",
                "0".repeat(40)
            ),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let old = (now - 3600).to_string();
    let osig = crypto::signature(&[TOKEN, &old, "n1"]);
    let r = http
        .get(url(
            "plain",
            &format!("signature={osig}&timestamp={old}&nonce=n1&echostr=E"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a stale timestamp is a replay");
    let r = http
        .get(url(
            "nobody",
            &format!("signature={sig}&timestamp={ts}&nonce=n1&echostr=E"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // WeCom: the echo is encrypted for the CorpID and signed with it.
    let key = crypto::Key::from_encoding_aes_key(AES_KEY).unwrap();
    let echo = key.encrypt("plain-echo-42", "wwcorp");
    let msig = crypto::signature(&[TOKEN, &ts, "n2", &echo]);
    let q = format!(
        "msg_signature={msig}&timestamp={ts}&nonce=n2&echostr={}",
        urlencode(&echo)
    );
    let r = http.get(url("wecom", &q)).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (200, "plain-echo-42".to_string())
    );

    // A text message in each mode gets an answer from the model, encrypted
    // where the callback was, and stored in the user's conversation.
    for (name, app, mode) in [
        ("plain", "wxplain", Mode::Plain),
        ("compat", "wxcompat", Mode::Compatible),
        ("safe", "wxsafe", Mode::Safe),
    ] {
        let wx = WeChat::new(&srv.base, name, app, mode, false);
        let d = wx.text("o-mode-user", 1000, "Say hello.").await;
        assert_eq!(d.calls, vec![Some(200)], "{name}");
        let reply = d.reply.expect("a passive reply");
        assert!(!reply.trim().is_empty(), "{name}");
        let stored = answers(&srv, name, "o-mode-user").await;
        assert_eq!(stored.len(), 1, "{name}");
        assert_eq!(
            hanlin_channels::plain::from_markdown(&stored[0]),
            reply,
            "{name}"
        );
    }

    // Bad input: each refused with the right status, nothing answered.
    let wx = WeChat::new(&srv.base, "safe", "wxsafe", Mode::Safe, false);
    let post = |q: String, body: String| {
        let http = http.clone();
        let u = url("safe", &q);
        async move {
            let r = http.post(u).body(body).send().await.unwrap();
            r.status().as_u16()
        }
    };
    let (q, body) = wx.sign(&text_xml("o-bad", 2000, "hi"), now);
    assert_eq!(
        post(q.replace("msg_signature=", "msg_signature=0"), body.clone()).await,
        403,
        "bad msg_signature"
    );
    assert_eq!(
        post(q.replacen("signature=", "signature=f", 1), body.clone()).await,
        403,
        "bad signature"
    );
    // Encrypted for another app id.
    let other = WeChat {
        app_id: "wxother".into(),
        ..WeChat::new(&srv.base, "safe", "wxsafe", Mode::Safe, false)
    };
    let (q2, body2) = other.sign(&text_xml("o-bad", 2001, "hi"), now);
    assert_eq!(post(q2, body2).await, 403, "wrong AppID after decryption");
    // Bad padding: a ciphertext whose last plaintext byte is 0 (signed, so
    // only the padding is wrong).
    let bad = {
        use base64::Engine;
        let k = crypto::Key::from_encoding_aes_key(AES_KEY).unwrap();
        // Encrypt a plaintext that decrypts to a zero pad byte: take a
        // valid ciphertext and corrupt its last block.
        let good = k.encrypt("x", "wxsafe");
        let mut b = base64::engine::general_purpose::STANDARD
            .decode(good)
            .unwrap();
        let n = b.len();
        b[n - 17] ^= 0x5a;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let ts = now.to_string();
    let sig = crypto::signature(&[TOKEN, &ts, "n3"]);
    let msig = crypto::signature(&[TOKEN, &ts, "n3", &bad]);
    let q =
        format!("signature={sig}&timestamp={ts}&nonce=n3&encrypt_type=aes&msg_signature={msig}");
    let body = format!(
        "<xml><ToUserName>gh_test</ToUserName><Encrypt>{}</Encrypt></xml>",
        xml::cdata(&bad)
    );
    assert_eq!(post(q, body).await, 400, "bad padding");
    // Malformed, hostile and huge XML; plaintext to a safe-mode account.
    let plain_q = format!("signature={sig}&timestamp={ts}&nonce=n3");
    assert_eq!(post(plain_q.clone(), "<xml><Content>".into()).await, 400);
    let bomb = "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;\">]><xml><Content>&b;</Content></xml>";
    assert_eq!(post(plain_q.clone(), bomb.into()).await, 400);
    assert_eq!(
        post(plain_q.clone(), text_xml("o-bad", 2002, "hi")).await,
        400,
        "plaintext to a safe-mode account"
    );
    assert_eq!(post(plain_q, "x".repeat(200 * 1024)).await, 413);
    let users = srv.state.db.channel_users("wechat/safe").await.unwrap();
    assert!(
        users.iter().all(|u| u.external_id != "o-bad"),
        "a refused callback reached the model"
    );

    // WeCom: a message in, the answer back encrypted for the CorpID.
    let wc = WeChat::new(&srv.base, "wecom", "wwcorp", Mode::Safe, true);
    let d = wc.text("zhangsan", 3000, "Say hi.").await;
    assert_eq!(d.calls, vec![Some(200)]);
    assert!(!d.reply.unwrap().is_empty());
}

#[tokio::test]
async fn signed_callbacks_do_not_spend_the_anonymous_allowance_refused_ones_do() {
    let srv = start_with(|c| {
        c.unauthenticated_per_minute = 3;
        c.wechat.insert(
            "plain".into(),
            account(Kind::Official, Mode::Plain, "wxplain"),
        );
    })
    .await;
    let http = reqwest::Client::new();
    let ts = hanlin_accounts::now().to_string();
    let sig = crypto::signature(&[TOKEN, &ts, "n"]);
    let good = format!(
        "{}/wechat/plain?signature={sig}&timestamp={ts}&nonce=n&echostr=ok",
        srv.base
    );
    for _ in 0..6 {
        assert_eq!(http.get(&good).send().await.unwrap().status(), 200);
    }
    let bad = good.replace("signature=", "signature=0");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(http.get(&bad).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, vec![403, 403, 403, 429, 429]);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn events_commands_voice_and_odd_messages() {
    let srv = start_with(|c| {
        let mut a = account(Kind::Official, Mode::Plain, "wxplain");
        a.greeting = Some("欢迎关注！".into());
        c.wechat.insert("plain".into(), a);
    })
    .await;
    let wx = WeChat::new(&srv.base, "plain", "wxplain", Mode::Plain, false);
    let now = hanlin_accounts::now();
    let d = wx.deliver(&event_xml("o-ev", "subscribe", now)).await;
    assert_eq!(d.reply.as_deref(), Some("欢迎关注！"));
    // The same event again (a retry: same user and CreateTime) is answered
    // from the record, not run again.
    let d = wx.deliver(&event_xml("o-ev", "subscribe", now)).await;
    assert_eq!(d.reply.as_deref(), Some("欢迎关注！"));
    let d = wx.deliver(&event_xml("o-ev", "unsubscribe", now + 1)).await;
    assert_eq!((d.calls, d.reply), (vec![Some(200)], None));
    // A voice message with WeChat's recognition is a question.
    let voice = format!("<xml><ToUserName>gh_test</ToUserName><FromUserName>o-ev</FromUserName><CreateTime>{now}</CreateTime><MsgType>voice</MsgType><MediaId>m</MediaId><Format>amr</Format><Recognition><![CDATA[Say hello.]]></Recognition><MsgId>77</MsgId></xml>");
    let d = wx.deliver(&voice).await;
    let reply = d.reply.expect("an answer");
    assert_eq!(answers(&srv, "plain", "o-ev").await.len(), 1);
    assert!(!reply.is_empty());
    // Without recognition, an image, an unknown type: polite fixed replies.
    let novoice = voice
        .replace("<Recognition><![CDATA[Say hello.]]></Recognition>", "")
        .replace(">77<", ">78<");
    assert!(wx.deliver(&novoice).await.reply.unwrap().contains("语音"));
    let image = format!("<xml><ToUserName>gh_test</ToUserName><FromUserName>o-ev</FromUserName><CreateTime>{now}</CreateTime><MsgType>image</MsgType><PicUrl>http://x/y.jpg</PicUrl><MsgId>79</MsgId></xml>");
    assert!(wx.deliver(&image).await.reply.unwrap().contains("图片"));
    let odd = image
        .replace(">image<", ">shortvideo<")
        .replace(">79<", ">80<");
    assert!(wx.deliver(&odd).await.reply.unwrap().contains("文字"));
    // /help and /new; a question after /new starts a second conversation.
    assert!(wx
        .text("o-ev", 81, "/help")
        .await
        .reply
        .unwrap()
        .contains("/new"));
    assert_eq!(
        wx.text("o-ev", 82, "/new").await.reply.unwrap(),
        "好的，我们开始一个新话题。"
    );
    wx.text("o-ev", 83, "Say goodbye.").await.reply.unwrap();
    assert_eq!(conversations(&srv, "plain", "o-ev").await.len(), 2);
    // A location is acknowledged; a menu click asks its key.
    let loc = format!("<xml><ToUserName>gh_test</ToUserName><FromUserName>o-ev</FromUserName><CreateTime>{now}</CreateTime><MsgType>location</MsgType><Location_X>39.9</Location_X><Location_Y>116.4</Location_Y><Scale>15</Scale><Label><![CDATA[北京市东城区]]></Label><MsgId>84</MsgId></xml>");
    let r = wx.deliver(&loc).await.reply.unwrap();
    assert!(r.contains("北京市东城区"), "{r}");
    let click = format!("<xml><ToUserName>gh_test</ToUserName><FromUserName>o-ev</FromUserName><CreateTime>{}</CreateTime><MsgType>event</MsgType><Event>CLICK</Event><EventKey><![CDATA[Say hi.]]></EventKey></xml>", now + 2);
    assert!(!wx.deliver(&click).await.reply.unwrap().is_empty());
    assert_eq!(answers(&srv, "plain", "o-ev").await.len(), 3);
    // Channel users stay out of the web users list.
    let (_, users) = call(
        reqwest::Method::GET,
        format!("{}/v1/admin/users", srv.base),
        &srv.admin_key,
        None,
    )
    .await;
    assert!(users["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|u| u["role"] != "channel"));
}

#[tokio::test]
async fn a_slow_answer_is_answered_once_and_pushed_with_a_rotated_token() {
    let (api_base, api) = fake_api().await;
    let srv = start_with(|c| {
        let mut a = account(Kind::Official, Mode::Safe, "wxsafe");
        a.app_secret = "app-secret".into();
        a.customer_service = true;
        a.api_base = Some(api_base.clone());
        a.reply_budget_ms = 100;
        a.max_tokens = Some(200);
        // The larger model, loaded on first use: slower than three calls.
        a.model = Some(QWEN.into());
        a.temperature = Some(SLOW_TEMPERATURE);
        c.wechat.insert("svc".into(), a);
    })
    .await;
    // A token fetched earlier, then revoked by WeChat (someone fetched a
    // new one elsewhere): the push must notice and fetch again.
    let acct = "wechat/svc";
    srv.state.db.lease_channel_token(acct, 5).await.unwrap();
    srv.state
        .db
        .put_channel_token(acct, "TOKEN-stale", hanlin_accounts::now() + 7200)
        .await
        .unwrap();
    let mut wx = WeChat::new(&srv.base, "svc", "wxsafe", Mode::Safe, false);
    wx.timeout = Duration::from_millis(400);
    let d = wx
        .text(
            "o-slow",
            5000,
            "Write a long story about a dragon who learns to cook.",
        )
        .await;
    // Retried until the last call, which says `success` (answer to come).
    assert_eq!(d.calls.len(), 3, "{d:?}");
    assert_eq!(d.calls.last(), Some(&Some(200)));
    assert_eq!(d.reply, None);
    // The answer arrives by push, once, page by page.
    settled(&srv, "wechat/svc", "msg:5000").await;
    let pushed = api.lock().unwrap().sent.clone();
    let stored = answers(&srv, "svc", "o-slow").await;
    assert_eq!(stored.len(), 1);
    let pages = hanlin_channels::plain::pages(
        &hanlin_channels::plain::from_markdown(&stored[0]),
        2048 - 96,
    );
    let got: Vec<&str> = pushed.iter().map(|p| p.1.as_str()).collect();
    assert_eq!(got, pages);
    assert!(pushed.iter().all(|p| p.0 == "o-slow" && p.2.is_none()));
    let (refused, tokens) = {
        let a = api.lock().unwrap();
        (a.refused, a.tokens.clone())
    };
    assert_eq!(refused, 1, "the stale token was tried once");
    assert_eq!(tokens, vec!["TOKEN-1".to_string()], "one new token fetched");
    // One conversation, one question, one answer: the retries ran nothing twice.
    let convs = conversations(&srv, "svc", "o-slow").await;
    assert_eq!(convs.len(), 1);
    assert_eq!(convs[0]["messages"].as_array().unwrap().len(), 2);
    // A retry arriving after all that changes nothing.
    let d = wx
        .text(
            "o-slow",
            5000,
            "Write a long story about a dragon who learns to cook.",
        )
        .await;
    assert_eq!((d.calls, d.reply), (vec![Some(200)], None));
    assert_eq!(api.lock().unwrap().sent.len(), pushed.len());
}

#[tokio::test]
async fn wecom_pushes_through_message_send_with_its_agent_id() {
    let (api_base, api) = fake_api().await;
    let srv = start_with(|c| {
        let mut w = account(Kind::Wecom, Mode::Safe, "wwcorp");
        w.agent_id = Some(1000002);
        w.app_secret = "app-secret".into();
        w.api_base = Some(api_base.clone());
        w.reply_budget_ms = 100;
        w.max_tokens = Some(150);
        w.model = Some(QWEN.into());
        w.temperature = Some(SLOW_TEMPERATURE);
        c.wechat.insert("office".into(), w);
    })
    .await;
    let mut wc = WeChat::new(&srv.base, "office", "wwcorp", Mode::Safe, true);
    wc.timeout = Duration::from_millis(400);
    let d = wc
        .text("lisi", 4000, "Write a long story about a mountain village.")
        .await;
    assert_eq!((d.calls.len(), &d.reply), (3, &None), "{d:?}");
    settled(&srv, "wechat/office", "msg:4000").await;
    let sent = api.lock().unwrap().sent.clone();
    assert!(!sent.is_empty());
    assert!(sent
        .iter()
        .all(|(to, _, agent)| to == "lisi" && *agent == Some(1000002)));
    let stored = hanlin_channels::plain::from_markdown(&answers(&srv, "office", "lisi").await[0]);
    let got: String = sent.iter().map(|s| s.1.as_str()).collect();
    let squash = |s: &str| s.split_whitespace().collect::<String>();
    assert_eq!(squash(&got), squash(&stored));
}

#[tokio::test]
async fn long_answers_are_paged_and_slow_ones_given_in_part() {
    let (api_base, _api) = fake_api().await;
    let srv = start_with(|c| {
        let mut a = account(Kind::Official, Mode::Plain, "wxplain");
        a.max_tokens = Some(400);
        // Short pages, so that the small model's answer needs several.
        a.page_bytes = Some(512);
        // The likeliest answer: the same, long one every run.
        a.temperature = Some(0.0);
        // Time enough to answer in the first call, however busy the machine.
        a.reply_budget_ms = 60_000;
        c.wechat.insert("plain".into(), a);
        // No customer-service API and a short budget: the fast-first-answer way.
        let mut b = account(Kind::Official, Mode::Plain, "wxfast");
        b.max_tokens = Some(200);
        b.reply_budget_ms = 300;
        b.model = Some(QWEN.into());
        b.temperature = Some(SLOW_TEMPERATURE);
        c.wechat.insert("fast".into(), b);
        // Pushes to an API that is not there: the answer waits instead.
        let mut d = account(Kind::Official, Mode::Plain, "wxdown");
        d.app_secret = "app-secret".into();
        d.customer_service = true;
        d.api_base = Some("http://127.0.0.1:9".into());
        d.reply_budget_ms = 100;
        d.max_tokens = Some(100);
        d.model = Some(QWEN.into());
        d.temperature = Some(SLOW_TEMPERATURE);
        c.wechat.insert("down".into(), d);
        drop(api_base);
    })
    .await;
    // Paging: a long answer comes back in pages of at most `page_bytes`,
    // the next page on each next message.
    let mut wx = WeChat::new(&srv.base, "plain", "wxplain", Mode::Plain, false);
    wx.timeout = Duration::from_secs(90);
    let mut id = 6000;
    let first = wx
        .text(
            "o-long",
            id,
            "Write a very long essay about the history of tea, with many paragraphs.",
        )
        .await;
    let mut pages = vec![first.reply.expect("a first page")];
    while pages.last().unwrap().contains("回复任意内容查看后续") {
        id += 1;
        let next = wx
            .text("o-long", id, "more")
            .await
            .reply
            .expect("the next page");
        pages.push(next);
        assert!(pages.len() < 20);
    }
    assert!(
        pages.len() >= 2,
        "the answer was meant to be long: {pages:?}"
    );
    assert!(pages.iter().all(|p| p.len() <= 512), "{pages:?}");
    let stored = answers(&srv, "plain", "o-long").await;
    assert_eq!(stored.len(), 1, "the 'more' messages asked nothing");
    let strip = |p: &str| {
        p.split("\n\n（回复任意内容查看后续")
            .next()
            .unwrap()
            .to_string()
    };
    let joined: String = pages.iter().map(|p| strip(p)).collect();
    let want: String =
        hanlin_channels::plain::pages(&hanlin_channels::plain::from_markdown(&stored[0]), 512 - 96)
            .concat();
    assert_eq!(joined, want);

    // Too slow for three calls, no push: the part ready now, the rest on
    // the next message.
    let mut wf = WeChat::new(&srv.base, "fast", "wxfast", Mode::Plain, false);
    wf.timeout = Duration::from_millis(600);
    let d = wf
        .text(
            "o-fast",
            7000,
            "Write a long story about a brave little robot.",
        )
        .await;
    assert_eq!(d.calls.len(), 3, "{d:?}");
    let part = d.reply.expect("a part answer");
    assert!(part.contains("回复任意内容查看后续"), "{part}");
    // Wait for the answer to finish, then fetch the rest.
    settled(&srv, "wechat/fast", "msg:7000").await;
    let mut rest = String::new();
    let mut id = 7001;
    loop {
        let r = wf.text("o-fast", id, "more").await.reply.unwrap();
        id += 1;
        rest.push_str(&strip(&r));
        if !r.contains("回复任意内容查看后续") {
            break;
        }
    }
    let stored = hanlin_channels::plain::from_markdown(&answers(&srv, "fast", "o-fast").await[0]);
    let given = strip(&part);
    let given = if given == "正在思考中……" {
        String::new()
    } else {
        given
    };
    let squash = |s: &str| s.split_whitespace().collect::<String>();
    assert_eq!(squash(&format!("{given}{rest}")), squash(&stored));

    // The API is unreachable: a clear log line, no crash, and the answer
    // waits for the user's next message.
    let mut wd = WeChat::new(&srv.base, "down", "wxdown", Mode::Plain, false);
    wd.timeout = Duration::from_millis(300);
    let d = wd
        .text(
            "o-down",
            8000,
            "Write a long story about a lighthouse keeper.",
        )
        .await;
    assert_eq!(
        (d.calls.len(), d.calls.last(), &d.reply),
        (3, Some(&Some(200)), &None),
        "the push path"
    );
    settled(&srv, "wechat/down", "msg:8000").await;
    let got = wd.text("o-down", 8001, "?").await.reply;
    let stored = hanlin_channels::plain::from_markdown(&answers(&srv, "down", "o-down").await[0]);
    assert_eq!(got.map(|g| strip(&g)), Some(stored));
}

#[tokio::test]
async fn the_prompt_keeps_only_the_newest_turns() {
    let srv = start_with(|c| {
        let mut a = account(Kind::Official, Mode::Plain, "wxplain");
        // Only the question itself: earlier turns never reach the prompt.
        a.history_messages = 1;
        c.wechat.insert("plain".into(), a);
    })
    .await;
    let wx = WeChat::new(&srv.base, "plain", "wxplain", Mode::Plain, false);
    // The usage of the user's requests so far, once all are recorded.
    let usage = |srv: &TestServer, user: String, n: i64| {
        let db = srv.state.db.clone();
        async move {
            for _ in 0..200 {
                let rows = db.usage(Some(&user), None).await.unwrap();
                let (reqs, prompt): (i64, i64) = rows
                    .iter()
                    .fold((0, 0), |a, r| (a.0 + r.requests, a.1 + r.prompt_tokens));
                if reqs == n {
                    return prompt;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{n} requests were never recorded");
        }
    };
    wx.text("o-hist", 1, "Name a colour.").await.reply.unwrap();
    let user = srv.state.db.channel_users("wechat/plain").await.unwrap()[0]
        .user
        .name
        .clone();
    let first = usage(&srv, user.clone(), 1).await;
    wx.text("o-hist", 2, "Name a colour.").await.reply.unwrap();
    wx.text("o-hist", 3, "Name a colour.").await.reply.unwrap();
    assert_eq!(usage(&srv, user, 3).await, 3 * first);
    // The conversation itself keeps everything.
    let c = conversations(&srv, "plain", "o-hist").await;
    assert_eq!(c[0]["messages"].as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn quota_and_disabled_users_get_friendly_replies() {
    let srv = start_with(|c| {
        let mut a = account(Kind::Official, Mode::Plain, "wxplain");
        a.plan = Some("wx-tiny".into());
        c.wechat.insert("plain".into(), a);
    })
    .await;
    srv.plan(Plan {
        name: "wx-tiny".into(),
        requests_per_minute: 100,
        tokens_per_minute: 1_000_000,
        tokens_per_day: 120,
        max_context: 2048,
        models: vec!["*".into()],
        priority: 0,
        max_n: 1,
        price_milli: 1000,
        file_bytes: hanlin_accounts::DEFAULT_FILE_BYTES,
        batch_price_milli: hanlin_accounts::DEFAULT_BATCH_PRICE,
        images_per_day: hanlin_accounts::DEFAULT_IMAGES_PER_DAY,
    })
    .await;
    let wx = WeChat::new(&srv.base, "plain", "wxplain", Mode::Plain, false);
    let mut replies = Vec::new();
    for i in 0..4 {
        replies.push(
            wx.text("o-quota", 9000 + i, "Say hello.")
                .await
                .reply
                .unwrap(),
        );
    }
    assert!(
        replies
            .iter()
            .any(|r| r == "今天的额度已用完，请明天再来。"),
        "{replies:?}"
    );
    // An admin disables the user: a friendly message, no model run.
    let users = srv.state.db.channel_users("wechat/plain").await.unwrap();
    let name = users[0].user.name.clone();
    srv.state
        .db
        .set_user_status(&name, hanlin_accounts::UserStatus::Disabled)
        .await
        .unwrap();
    let r = wx.text("o-quota", 9100, "Say hello.").await.reply.unwrap();
    assert_eq!(r, "此账号已被停用，如有疑问请联系管理员。");
}
