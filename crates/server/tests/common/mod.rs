#![allow(dead_code)] // each test binary uses a different part of this module
//! A real server on a free loopback port, over the real models in the store
//! and a fresh SQLite database (or PostgreSQL when
//! `HANLIN_TEST_POSTGRES_URL` is set: `.ci/run` runs the suite both ways).

use hanlin_accounts::{NewKey, Plan, Role};
use hanlin_server::{AppState, Config};
use std::sync::Arc;

pub struct TestServer {
    pub base: String,
    pub state: Arc<AppState>,
    pub admin_key: String,
    _dir: tempfile::TempDir,
}

pub const MODEL: &str = "smollm2-135m";

/// One API call with a key: the status and the JSON body (null if none).
pub async fn call(
    method: reqwest::Method,
    url: String,
    key: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut r = reqwest::Client::new().request(method, url).bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}
pub const QWEN: &str = "qwen2.5-coder-0.5b";

pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
    start_inner(tweak, |url| async move { url }).await
}

/// A server whose database URL is first passed through `map` (e.g. to
/// reach the database through a proxy).
pub async fn start_with_async<F, Fut>(map: F) -> TestServer
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    start_inner(|_| {}, map).await
}

async fn start_inner<F, Fut>(tweak: impl FnOnce(&mut Config), map: F) -> TestServer
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let home = hanlin_store::Store::default_home();
    let store = hanlin_store::Store::open(&home).expect("open the model store");
    for m in [MODEL, QWEN] {
        assert!(
            store.get(m).expect("store").is_some(),
            "model {m} is not in the store at {}; run `cargo run --release -- pull {m}` first (CI does this)",
            home.display()
        );
    }
    let dir = tempfile::tempdir().expect("tmp");
    let database_url = match std::env::var("HANLIN_TEST_POSTGRES_URL") {
        Ok(url) => fresh_postgres_database(&url).await,
        Err(_) => format!("sqlite://{}", dir.path().join("hanlin.db").display()),
    };
    let database_url = map(database_url).await;
    let mut config = Config::new(database_url, MODEL.into(), dir.path().join("kb"));
    config.port = 0;
    config.max_body = 256 * 1024;
    // The tests register web users freely; tests/security.rs checks the
    // policies themselves.
    config.signup = Some(hanlin_accounts::web::SignupPolicy::Open);
    config.sched = hanlin_engine::SchedulerConfig {
        ctx: 4096,
        ..Default::default()
    };
    tweak(&mut config);
    let state = AppState::new(config, store).await.expect("server state");
    let base = serve(state.clone()).await;
    let admin = state
        .db
        .ensure_user("root", Role::Admin, None)
        .await
        .expect("admin");
    let (_, admin_key) = state
        .db
        .create_key(&admin.id, &NewKey::default())
        .await
        .expect("key");
    TestServer {
        base,
        state,
        admin_key,
        _dir: dir,
    }
}

/// Serve `state` on a free loopback port (with client addresses, as
/// `hanlin serve` does); returns the base URL.
pub async fn serve(state: Arc<AppState>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = hanlin_server::router(state);
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<hanlin_server::guard::PeerAddr>();
        axum::serve(listener, app).await.expect("serve");
    });
    base
}

/// A new, empty database on the PostgreSQL server at `url`, so tests can
/// run in parallel.
pub async fn fresh_postgres_database(url: &str) -> String {
    hanlin_accounts::Db::create_test_database(url)
        .await
        .expect("create a test database")
}

impl TestServer {
    /// A new user on `plan` and a key for them.
    pub async fn user_key(&self, name: &str, plan: &str) -> String {
        let u = self
            .state
            .db
            .ensure_user(name, Role::User, Some(plan))
            .await
            .expect("user");
        self.state
            .db
            .create_key(&u.id, &NewKey::default())
            .await
            .expect("key")
            .1
    }

    pub async fn plan(&self, p: Plan) {
        self.state.db.put_plan(&p).await.expect("plan");
    }
}

/// A browser's view of the server: its session cookie and CSRF token.
pub struct Browser {
    pub base: String,
    pub http: reqwest::Client,
    pub cookie: String,
    pub csrf: String,
}

impl Browser {
    pub async fn register(base: &str, name: &str, password: &str) -> (Self, reqwest::Response) {
        Self::sign_in(base, "/api/register", name, password).await
    }

    pub async fn sign_in(
        base: &str,
        path: &str,
        name: &str,
        password: &str,
    ) -> (Self, reqwest::Response) {
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{base}{path}"))
            .json(&serde_json::json!({"name": name, "password": password}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        let set = r
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .expect("a session cookie")
            .to_string();
        let cookie = set.split(';').next().expect("cookie").to_string();
        let me: serde_json::Value = http
            .get(format!("{base}/api/me"))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("me")
            .json()
            .await
            .expect("json");
        let b = Browser {
            base: base.into(),
            http,
            cookie,
            csrf: me["csrf"].as_str().expect("csrf").into(),
        };
        (b, r)
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("x-csrf-token", &self.csrf)
    }

    pub async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.expect("send");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Send a message (or regenerate) and read the whole event stream.
    pub async fn send(&self, conv: &str, body: serde_json::Value) -> Vec<serde_json::Value> {
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("/api/conversations/{conv}/messages"),
            )
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        let text = r.text().await.expect("body");
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).expect("event json"))
            .collect()
    }
}

/// A multipart form by hand: `(name, filename, bytes)` parts.
pub fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "hanlin-test-boundary-7d41";
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
