//! Accounts for `hanlin serve`: users (admin / user), plans (`free`, `plus`
//! and any an admin adds), API keys (shown once, stored as sha256 hashes,
//! scoped to models, expiring, revocable) and per-request usage records.
//!
//! Storage is `sqlx`'s `Any` driver over portable SQL, so the same code and
//! migrations run on an embedded SQLite file (the default) and on
//! PostgreSQL (`postgres://…`). Rate limits and quotas live in [`limits`];
//! browser sign-in (argon2 passwords, cookie sessions) in [`web`]; the web
//! app's conversations and personas in [`chats`]; the users of messaging
//! channels (WeChat), their de-duplicated messages and the channels' API
//! tokens in [`channels`].

pub mod batches;
pub mod channels;
pub mod chatgpt;
pub mod chats;
pub mod kb;
pub mod limits;
pub mod replicas;
pub mod web;

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unknown plan {0:?}")]
    UnknownPlan(String),
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// Why a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Incorrect API key provided.")]
    Invalid,
    #[error("This API key has expired.")]
    Expired,
    #[error("This API key has been revoked.")]
    Revoked,
    #[error("This account is disabled.")]
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
    /// Someone who reaches the server through a messaging channel
    /// (WeChat): no password, no web sign-in, found through
    /// [`channels`]; listed only by the admin channel path.
    Channel,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Channel => "channel",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "admin" => Role::Admin,
            "channel" => Role::Channel,
            _ => Role::User,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
    pub tokens_per_day: i64,
    pub max_context: i64,
    /// Model names, or `["*"]` for all.
    pub models: Vec<String>,
    /// Scheduler priority: higher is admitted first under load.
    pub priority: i64,
    /// The most choices (`n`) one request may ask for.
    pub max_n: i64,
    /// What the plan's tokens cost against its limits, in thousandths of
    /// full price ([`FULL_PRICE`]: each token counts once).
    pub price_milli: i64,
    /// Bytes of files (`/v1/files`) one user may keep.
    pub file_bytes: i64,
    /// What batch lines cost, in thousandths of the plan's price.
    pub batch_price_milli: i64,
    /// Images (`/v1/images/generations`, the web app's image mode) one
    /// user may have drawn per day (UTC).
    pub images_per_day: i64,
}

/// The plan defaults for the fields added after the first plans: 1 GiB of
/// files, batch lines at half price.
pub const DEFAULT_FILE_BYTES: i64 = 1 << 30;
pub const DEFAULT_BATCH_PRICE: i64 = 500;
/// Images per day of a plan made without saying (the `free` plan has 50).
pub const DEFAULT_IMAGES_PER_DAY: i64 = 1000;

impl Plan {
    /// A plan with these limits and the defaults for the rest: every model,
    /// 4,096 tokens of context, priority 0, one choice, full price.
    pub fn limited(
        name: &str,
        requests_per_minute: i64,
        tokens_per_minute: i64,
        tokens_per_day: i64,
    ) -> Self {
        Self {
            name: name.into(),
            requests_per_minute,
            tokens_per_minute,
            tokens_per_day,
            max_context: 4096,
            models: vec!["*".into()],
            priority: 0,
            max_n: 1,
            price_milli: FULL_PRICE,
            file_bytes: DEFAULT_FILE_BYTES,
            batch_price_milli: DEFAULT_BATCH_PRICE,
            images_per_day: DEFAULT_IMAGES_PER_DAY,
        }
    }

    pub fn allows(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }
}

/// Whether an account may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    /// Registered, waiting for an admin's approval.
    Pending,
    Disabled,
    /// Deleted: kept only so usage rows keep their user.
    Deleted,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Pending => "pending",
            UserStatus::Disabled => "disabled",
            UserStatus::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => UserStatus::Active,
            "pending" => UserStatus::Pending,
            "disabled" => UserStatus::Disabled,
            "deleted" => UserStatus::Deleted,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub plan: String,
    pub created_at: i64,
    pub status: UserStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub user_id: String,
    /// The first characters of the secret, to recognise it in listings.
    pub prefix: String,
    pub name: String,
    /// Models the key is limited to (`None`: whatever the plan allows).
    pub models: Option<Vec<String>>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

impl ApiKey {
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|m| m == model))
    }
}

/// Everything a request needs to know about its caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
    pub key: ApiKey,
    pub plan: Plan,
}

/// The key id the web app's work is metered under (no row in `api_keys`).
pub const WEB_KEY: &str = "web";

impl Caller {
    /// The caller the web app acts as for `user`: their plan and the
    /// pseudo-key [`WEB_KEY`].
    pub fn web(user: User, plan: Plan) -> Self {
        Caller {
            key: ApiKey {
                id: WEB_KEY.into(),
                user_id: user.id.clone(),
                prefix: String::new(),
                name: "web app".into(),
                models: None,
                expires_at: None,
                revoked_at: None,
                created_at: 0,
            },
            user,
            plan,
        }
    }

    /// The caller a messaging channel acts as for one of its users: the
    /// channel account's key as the pseudo-key (`wechat/NAME`), so usage
    /// shows where the tokens went.
    pub fn channel(user: User, plan: Plan, account: &str) -> Self {
        let mut c = Caller::web(user, plan);
        c.key.id = account.to_string();
        c.key.name = account.to_string();
        c
    }
}

/// Options for a new key.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub models: Option<Vec<String>>,
    pub expires_at: Option<i64>,
}

/// What one request used, in every unit Hanlin meters: tokens (counted by
/// the engine), audio and images. A request with several model steps (an
/// agent loop) adds its steps up into one `Usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: i64,
    /// Prompt tokens whose KV entries came from the prefix cache.
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    /// Audio heard or spoken, in milliseconds.
    pub audio_ms: i64,
    pub images: i64,
    /// Diffusion steps over all images.
    pub image_steps: i64,
}

impl Usage {
    /// Tokens counted against token limits (prompt + completion).
    pub fn tokens(&self) -> i64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub fn add(&mut self, o: &Usage) {
        self.prompt_tokens += o.prompt_tokens;
        self.cached_tokens += o.cached_tokens;
        self.completion_tokens += o.completion_tokens;
        self.audio_ms += o.audio_ms;
        self.images += o.images;
        self.image_steps += o.image_steps;
    }
}

/// Full price, as a [`UsageRecord::weight_milli`].
pub const FULL_PRICE: i64 = 1000;

/// One request's usage row.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    pub request_id: String,
    pub key_id: String,
    pub user_id: String,
    pub model: String,
    /// The endpoint it came through (`chat`, `completions`, `embeddings`,
    /// `ask`, `search`, `web`, …).
    pub endpoint: String,
    pub ts: i64,
    pub usage: Usage,
    /// Price weight in thousandths ([`FULL_PRICE`] = 1000).
    pub weight_milli: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UsageRow {
    pub day: String,
    pub user: String,
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub audio_ms: i64,
    pub images: i64,
    /// Denoising steps of those images.
    pub image_steps: i64,
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DD` (UTC) of a unix time.
pub fn day_of(ts: i64) -> String {
    let d = time::OffsetDateTime::from_unix_timestamp(ts)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// `len` random ASCII letters and digits (ids, key secrets).
pub fn random_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

pub fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(String::from)
        .collect()
}

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    pub postgres: bool,
    /// The replica this handle writes for (streaming replies, token holds,
    /// leases); see [`replicas`].
    replica: Arc<str>,
}

impl Db {
    /// A transaction that will write. On SQLite it takes the write lock at
    /// once (`BEGIN IMMEDIATE`): a transaction that reads first and writes
    /// later fails with "database is locked" when another writer got in
    /// between, whatever the busy timeout.
    pub(crate) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, AccountError> {
        Ok(if self.postgres {
            self.pool.begin().await?
        } else {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        })
    }

    /// Open (creating if needed) and migrate the database at `url`:
    /// `sqlite://path` or `postgres://…`.
    pub async fn connect(url: &str) -> Result<Self, AccountError> {
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres");
        let url = if !postgres && !url.contains("mode=") && !url.contains(":memory:") {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rwc")
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if postgres { 16 } else { 4 })
            // A PostgreSQL server that is down fails a request in seconds (a
            // 503) instead of holding it for the default 30. An SQLite file
            // cannot be down, but a writer waits up to `busy_timeout` for
            // the lock while holding its connection: the others must be able
            // to wait as long, or a burst of writes under load turns into 503s.
            .acquire_timeout(std::time::Duration::from_secs(if postgres {
                3
            } else {
                15
            }))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if !postgres {
                        // Concurrent writers wait instead of failing with SQLITE_BUSY.
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self {
            pool,
            postgres,
            replica: Arc::from("local"),
        })
    }

    /// A new, empty database on the PostgreSQL server of `url` (tests
    /// only: each test on a database of its own); its URL.
    #[doc(hidden)]
    pub async fn create_test_database(url: &str) -> Result<String, AccountError> {
        use sqlx::Connection;
        let name = format!("hanlin_t_{}", random_token(16).to_lowercase());
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        let (server, _) = url
            .rsplit_once('/')
            .ok_or_else(|| AccountError::Invalid(format!("{url} names no database")))?;
        Ok(format!("{server}/{name}"))
    }

    /// Drop every table (tests only: gives a PostgreSQL test database a
    /// fresh schema on the next connect).
    #[doc(hidden)]
    pub async fn reset_for_tests(&self) -> Result<(), AccountError> {
        for t in [
            "channel_users",
            "channel_messages",
            "channel_tokens",
            "replicas",
            "limit_requests",
            "limit_holds",
            "leases",
            "kb_log",
            "messages",
            "conversations",
            "personas",
            "sessions",
            "usage",
            "api_keys",
            "users",
            "plans",
            "settings",
            "kb_readers",
            "batch_lines",
            "batches",
            "files",
            "_sqlx_migrations",
        ] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    pub async fn plan(&self, name: &str) -> Result<Plan, AccountError> {
        let row = sqlx::query("SELECT name, requests_per_minute, tokens_per_minute, tokens_per_day, max_context, models, priority, max_n, price_milli, file_bytes, batch_price_milli, images_per_day FROM plans WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| AccountError::UnknownPlan(name.to_string()))?;
        plan_of(&row)
    }

    pub async fn plans(&self) -> Result<Vec<Plan>, AccountError> {
        let rows = sqlx::query("SELECT name, requests_per_minute, tokens_per_minute, tokens_per_day, max_context, models, priority, max_n, price_milli, file_bytes, batch_price_milli, images_per_day FROM plans ORDER BY priority, name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(plan_of).collect()
    }

    /// Create or replace a plan.
    pub async fn put_plan(&self, p: &Plan) -> Result<(), AccountError> {
        if p.name.is_empty() || p.models.is_empty() {
            return Err(AccountError::Invalid(
                "a plan needs a name and at least one model (or *)".into(),
            ));
        }
        sqlx::query("INSERT INTO plans (name, requests_per_minute, tokens_per_minute, tokens_per_day, max_context, models, priority, max_n, price_milli, file_bytes, batch_price_milli, images_per_day) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (name) DO UPDATE SET requests_per_minute = excluded.requests_per_minute, tokens_per_minute = excluded.tokens_per_minute, tokens_per_day = excluded.tokens_per_day, max_context = excluded.max_context, models = excluded.models, priority = excluded.priority, max_n = excluded.max_n, price_milli = excluded.price_milli, file_bytes = excluded.file_bytes, batch_price_milli = excluded.batch_price_milli, images_per_day = excluded.images_per_day")
            .bind(&p.name)
            .bind(p.requests_per_minute)
            .bind(p.tokens_per_minute)
            .bind(p.tokens_per_day)
            .bind(p.max_context)
            .bind(p.models.join(","))
            .bind(p.priority)
            .bind(p.max_n.max(1))
            .bind(p.price_milli.max(0))
            .bind(p.file_bytes.max(0))
            .bind(p.batch_price_milli.max(0))
            .bind(p.images_per_day.max(0))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>, AccountError> {
        let row = sqlx::query(
            "SELECT id, name, role, plan, created_at, status FROM users WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(user_of).transpose()?)
    }

    pub async fn users(&self) -> Result<Vec<User>, AccountError> {
        let rows = sqlx::query("SELECT id, name, role, plan, created_at, status FROM users WHERE status <> 'deleted' AND role <> 'channel' ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(user_of).collect::<Result<_, _>>()?)
    }

    /// The user called `name`, created with `role` and `plan` if missing;
    /// an existing user's plan is changed when `plan` is given.
    pub async fn ensure_user(
        &self,
        name: &str,
        role: Role,
        plan: Option<&str>,
    ) -> Result<User, AccountError> {
        let name = &web::normalize_name(name).map_err(|e| AccountError::Invalid(e.to_string()))?;
        if let Some(p) = plan {
            self.plan(p).await?;
        }
        if let Some(u) = self.user_by_name(name).await? {
            if let Some(p) = plan.filter(|p| *p != u.plan) {
                sqlx::query("UPDATE users SET plan = $1 WHERE id = $2")
                    .bind(p)
                    .bind(&u.id)
                    .execute(&self.pool)
                    .await?;
            }
            if role == Role::Admin && u.role != Role::Admin {
                sqlx::query("UPDATE users SET role = 'admin' WHERE id = $1")
                    .bind(&u.id)
                    .execute(&self.pool)
                    .await?;
            }
            return self
                .user_by_name(name)
                .await?
                .ok_or_else(|| AccountError::UnknownUser(name.into()));
        }
        let id = format!("user-{}", random_token(16));
        let res = sqlx::query(
            "INSERT INTO users (id, name, role, plan, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(name)
        .bind(role.as_str())
        .bind(plan.unwrap_or("free"))
        .bind(now())
        .execute(&self.pool)
        .await;
        if let Err(e) = res {
            // Lost a race with another creator of the same name: use theirs.
            if let Some(u) = self.user_by_name(name).await? {
                return Ok(u);
            }
            return Err(e.into());
        }
        self.user_by_name(name)
            .await?
            .ok_or_else(|| AccountError::UnknownUser(name.into()))
    }

    /// Create a key; returns its record and the secret (shown once).
    pub async fn create_key(
        &self,
        user_id: &str,
        opts: &NewKey,
    ) -> Result<(ApiKey, String), AccountError> {
        let secret = format!("sk-hl-{}", random_token(40));
        let id = format!("key-{}", random_token(16));
        sqlx::query("INSERT INTO api_keys (id, user_id, hash, prefix, name, models, expires_at, revoked_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8)")
            .bind(&id)
            .bind(user_id)
            .bind(hash_key(&secret))
            .bind(&secret[..10])
            .bind(&opts.name)
            .bind(opts.models.as_ref().map(|m| m.join(",")))
            .bind(opts.expires_at)
            .bind(now())
            .execute(&self.pool)
            .await?;
        let key = self
            .key(&id)
            .await?
            .ok_or_else(|| AccountError::UnknownKey(id.clone()))?;
        Ok((key, secret))
    }

    pub async fn key(&self, id: &str) -> Result<Option<ApiKey>, AccountError> {
        let row = sqlx::query("SELECT id, user_id, prefix, name, models, expires_at, revoked_at, created_at FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(key_of).transpose()?)
    }

    pub async fn keys(&self, user_id: Option<&str>) -> Result<Vec<ApiKey>, AccountError> {
        let rows = sqlx::query("SELECT id, user_id, prefix, name, models, expires_at, revoked_at, created_at FROM api_keys WHERE ($1 = '' OR user_id = $1) ORDER BY created_at, id")
            .bind(user_id.unwrap_or(""))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(key_of).collect::<Result<_, _>>()?)
    }

    pub async fn revoke_key(&self, id: &str) -> Result<(), AccountError> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now())
                .bind(id)
                .execute(&self.pool)
                .await?;
        if r.rows_affected() == 0 && self.key(id).await?.is_none() {
            return Err(AccountError::UnknownKey(id.into()));
        }
        Ok(())
    }

    /// Who holds `secret`, with their plan; `Ok(Err(..))` when the key is refused.
    pub async fn authenticate(
        &self,
        secret: &str,
    ) -> Result<Result<Caller, AuthError>, AccountError> {
        self.caller_where("k.hash", &hash_key(secret)).await
    }

    /// The caller behind key `key_id` as it stands now (work done later
    /// for a key, such as batch lines, checks it again each time).
    pub async fn caller_of_key(
        &self,
        key_id: &str,
    ) -> Result<Result<Caller, AuthError>, AccountError> {
        self.caller_where("k.id", key_id).await
    }

    /// The caller behind work stored under `key_id` for `user_id` (a
    /// batch): the key's, or the web app's for [`WEB_KEY`] — checked as
    /// it stands now.
    pub async fn caller_for(
        &self,
        key_id: &str,
        user_id: &str,
    ) -> Result<Result<Caller, AuthError>, AccountError> {
        if key_id != WEB_KEY {
            return self.caller_of_key(key_id).await;
        }
        let row =
            sqlx::query("SELECT id, name, role, plan, created_at, status FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        let Some(user) = row.as_ref().map(user_of).transpose()? else {
            return Ok(Err(AuthError::Invalid));
        };
        if user.status != UserStatus::Active {
            return Ok(Err(AuthError::Disabled));
        }
        let plan = self.plan(&user.plan).await?;
        Ok(Ok(Caller::web(user, plan)))
    }

    async fn caller_where(
        &self,
        column: &'static str,
        value: &str,
    ) -> Result<Result<Caller, AuthError>, AccountError> {
        let row = sqlx::query(&format!("SELECT k.id, k.user_id, k.prefix, k.name, k.models, k.expires_at, k.revoked_at, k.created_at, u.id, u.name, u.role, u.plan, u.created_at, u.status FROM api_keys k JOIN users u ON u.id = k.user_id WHERE {column} = $1"))
            .bind(value)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(Err(AuthError::Invalid));
        };
        let key = key_of(&row)?;
        if key.revoked_at.is_some() {
            return Ok(Err(AuthError::Revoked));
        }
        if key.expires_at.is_some_and(|t| t <= now()) {
            return Ok(Err(AuthError::Expired));
        }
        let user = User {
            id: row.try_get(8)?,
            name: row.try_get(9)?,
            role: Role::parse(&row.try_get::<String, _>(10)?),
            plan: row.try_get(11)?,
            created_at: row.try_get(12)?,
            status: status_of(&row.try_get::<String, _>(13)?),
        };
        if user.status != UserStatus::Active {
            return Ok(Err(AuthError::Disabled));
        }
        let plan = self.plan(&user.plan).await?;
        Ok(Ok(Caller { user, key, plan }))
    }

    /// Store one request's usage, keyed by its id: a later record for the
    /// same request replaces the counts (a running request is recorded when
    /// it starts, checkpointed while it generates and settled when it ends),
    /// so retries and checkpoints never count a request twice.
    pub async fn record_usage(&self, u: &UsageRecord) -> Result<(), AccountError> {
        let sql = "INSERT INTO usage (request_id, key_id, user_id, model, day, ts, prompt_tokens, cached_tokens, completion_tokens, endpoint, audio_ms, images, image_steps, weight_milli) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ON CONFLICT (request_id) DO UPDATE SET prompt_tokens = excluded.prompt_tokens, cached_tokens = excluded.cached_tokens, completion_tokens = excluded.completion_tokens, audio_ms = excluded.audio_ms, images = excluded.images, image_steps = excluded.image_steps";
        let n = &u.usage;
        sqlx::query(sql)
            .bind(&u.request_id)
            .bind(&u.key_id)
            .bind(&u.user_id)
            .bind(&u.model)
            .bind(day_of(u.ts))
            .bind(u.ts)
            .bind(n.prompt_tokens)
            .bind(n.cached_tokens)
            .bind(n.completion_tokens)
            .bind(&u.endpoint)
            .bind(n.audio_ms)
            .bind(n.images)
            .bind(n.image_steps)
            .bind(u.weight_milli)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Tokens (prompt + completion, times each request's price weight) a
    /// user spent on day `day`.
    pub async fn tokens_on(&self, user_id: &str, day: &str) -> Result<i64, AccountError> {
        Ok(self.spent_on(user_id, day).await?.tokens)
    }

    /// What a user spent on day `day` as the plan's limits count it:
    /// tokens as [`Db::tokens_on`] counts them, and images drawn.
    pub async fn spent_on(&self, user_id: &str, day: &str) -> Result<limits::Spend, AccountError> {
        let row = sqlx::query("SELECT CAST(COALESCE(SUM((prompt_tokens + completion_tokens) * weight_milli / 1000), 0) AS BIGINT), CAST(COALESCE(SUM(images), 0) AS BIGINT) FROM usage WHERE user_id = $1 AND day = $2")
            .bind(user_id)
            .bind(day)
            .fetch_one(&self.pool)
            .await?;
        Ok(limits::Spend {
            tokens: row.try_get(0)?,
            images: row.try_get(1)?,
        })
    }

    /// Usage summed by day, user and model; optionally for one user / day.
    pub async fn usage(
        &self,
        user: Option<&str>,
        day: Option<&str>,
    ) -> Result<Vec<UsageRow>, AccountError> {
        let rows = sqlx::query("SELECT s.day, u.name, s.model, CAST(COUNT(*) AS BIGINT), CAST(SUM(s.prompt_tokens) AS BIGINT), CAST(SUM(s.cached_tokens) AS BIGINT), CAST(SUM(s.completion_tokens) AS BIGINT), CAST(SUM(s.audio_ms) AS BIGINT), CAST(SUM(s.images) AS BIGINT), CAST(SUM(s.image_steps) AS BIGINT) FROM usage s JOIN users u ON u.id = s.user_id WHERE ($1 = '' OR u.name = $1) AND ($2 = '' OR s.day = $2) GROUP BY s.day, u.name, s.model ORDER BY s.day, u.name, s.model")
            .bind(user.unwrap_or(""))
            .bind(day.unwrap_or(""))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    day: r.try_get(0)?,
                    user: r.try_get(1)?,
                    model: r.try_get(2)?,
                    requests: r.try_get(3)?,
                    prompt_tokens: r.try_get(4)?,
                    cached_tokens: r.try_get(5)?,
                    completion_tokens: r.try_get(6)?,
                    audio_ms: r.try_get(7)?,
                    images: r.try_get(8)?,
                    image_steps: r.try_get(9)?,
                })
            })
            .collect()
    }
}

fn plan_of(row: &sqlx::any::AnyRow) -> Result<Plan, AccountError> {
    Ok(Plan {
        name: row.try_get(0)?,
        requests_per_minute: row.try_get(1)?,
        tokens_per_minute: row.try_get(2)?,
        tokens_per_day: row.try_get(3)?,
        max_context: row.try_get(4)?,
        models: split_list(&row.try_get::<String, _>(5)?),
        priority: row.try_get(6)?,
        max_n: row.try_get(7)?,
        price_milli: row.try_get(8)?,
        file_bytes: row.try_get(9)?,
        batch_price_milli: row.try_get(10)?,
        images_per_day: row.try_get(11)?,
    })
}

/// A status column; anything unknown counts as disabled.
pub(crate) fn status_of(s: &str) -> UserStatus {
    UserStatus::parse(s).unwrap_or(UserStatus::Disabled)
}

/// A user from the columns `id, name, role, plan, created_at, status`.
pub(crate) fn user_of(row: &sqlx::any::AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        role: Role::parse(&row.try_get::<String, _>(2)?),
        plan: row.try_get(3)?,
        created_at: row.try_get(4)?,
        status: status_of(&row.try_get::<String, _>(5)?),
    })
}

fn key_of(row: &sqlx::any::AnyRow) -> Result<ApiKey, sqlx::Error> {
    Ok(ApiKey {
        id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        prefix: row.try_get(2)?,
        name: row.try_get(3)?,
        models: row.try_get::<Option<String>, _>(4)?.map(|s| split_list(&s)),
        expires_at: row.try_get(5)?,
        revoked_at: row.try_get(6)?,
        created_at: row.try_get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400), "2000-02-29");
        assert_eq!(day_of(1_795_392_000), "2026-11-23");
    }
}
