//! `hanlin serve`: an OpenAI-compatible HTTP API (axum) in front of the
//! engine's continuous-batching schedulers, with API keys, plans, rate
//! limits, quotas and per-request usage metering (hanlin-accounts).
//!
//! Flow of a chat request: [`api`] authenticates the key, parses and
//! validates the body, renders the chat template, reserves the worst-case
//! tokens with the limiter, and submits one engine job per choice to the
//! model's scheduler ([`models`]). A driver task turns the scheduler's
//! events into SSE chunks or one JSON body, and when the request ends (or
//! the client goes away) records usage and settles the reservation.
//!
//! The same router serves the chat web app ([`web`]: embedded page, cookie
//! sessions, stored conversations), knowledge-base search and grounded
//! answers ([`search`]) and messaging channels ([`channel`]: WeChat).

pub mod admin;
pub mod api;
pub mod audio;
pub mod batch;
pub mod channel;
mod chat_model;
pub mod error;
pub mod extract;
pub mod files;
pub mod grammar;
pub mod guard;
pub mod images;
pub mod models;
pub mod openai;
pub mod search;
mod tools;
pub mod upstream;
pub mod web;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::Router;
use hanlin_accounts::limits::SharedLimiter;
use hanlin_accounts::Db;
use hanlin_engine::SchedulerConfig;
use hanlin_gateway::{Gateway, Limits, Metrics};
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// `sqlite://path` (created if missing) or `postgres://…`.
    pub database_url: String,
    /// Model loaded at start.
    pub default_model: String,
    pub threads: usize,
    /// Models are evicted least-recently-used beyond this many bytes.
    pub memory_budget: u64,
    /// Request bodies larger than this are refused with 413.
    pub max_body: usize,
    pub sched: SchedulerConfig,
    /// Where knowledge bases live (`hanlin kb` uses the same directory).
    pub kb_dir: std::path::PathBuf,
    /// Hosts feeds may be fetched from although not public.
    pub feed_allow: Vec<String>,
    /// Who may register on the web app (`None`: whatever an admin last
    /// chose, else approval).
    pub signup: Option<hanlin_accounts::web::SignupPolicy>,
    /// Host names the web app answers for besides IP literals and
    /// `localhost` (DNS-rebinding protection).
    pub allowed_hosts: Vec<String>,
    /// Proxies whose `X-Forwarded-For` gives the client's address.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// When set, `GET /metrics` needs `Authorization: Bearer TOKEN`.
    pub metrics_token: Option<String>,
    /// Requests a minute one client address may make without credentials
    /// that work (0: no limit); see [`guard::AnonLimit`].
    pub unauthenticated_per_minute: u32,
    /// Per-model scheduler settings (`[models.NAME]`), by model name.
    pub per_model: std::collections::HashMap<String, models::ModelSettings>,
    /// How uploaded files are read. `hanlin serve` uses a child process
    /// with limits (a hostile PDF can crash its parser); the default, in
    /// this process, is for tests and embedders that trust their files.
    pub extract: hanlin_search::isolate::Isolation,
    /// MCP servers from the config file (`[mcp.NAME]`), trusted: they may
    /// be stdio commands and private addresses.
    pub mcp: std::collections::BTreeMap<String, hanlin_tools::mcp::ServerConfig>,
    /// Hosts MCP servers registered from the admin screen may be at
    /// although not public.
    pub mcp_allow: Vec<String>,
    /// Where the Files API keeps file bytes (shared by replicas, if several).
    pub files_dir: std::path::PathBuf,
    /// Batch lines run at once.
    pub batch_parallel: usize,
    /// How long a finished batch's output and error files are kept.
    pub batch_keep: std::time::Duration,
    /// The image model OpenAI's image model names mean (default: the first
    /// pulled one).
    pub image_model: Option<String>,
    /// How long images answered by URL are kept.
    pub image_keep: std::time::Duration,
    /// WeChat accounts (`[wechat.NAME]`), served at `/wechat/NAME`.
    pub wechat: std::collections::BTreeMap<String, hanlin_channels::wechat::AccountConfig>,
    /// This replica's id among the servers on one database (`None`: the
    /// host name and port, which stay the same across restarts).
    pub replica_id: Option<String>,
    /// A replica silent for this long is dead: its token holds stop
    /// counting and its streaming replies are marked incomplete.
    pub replica_lease: std::time::Duration,
    /// On shutdown, how long streams in progress may run before the
    /// replica stops anyway.
    pub drain_deadline: std::time::Duration,
    /// Models served by upstream servers (`[models.NAME] upstream = …`).
    pub upstreams: std::collections::BTreeMap<String, hanlin_upstream::UpstreamConfig>,
}

impl Config {
    /// Settings for a server on `database_url` with the default model,
    /// listening on loopback: the defaults `hanlin serve` starts from.
    pub fn new(database_url: String, default_model: String, kb_dir: std::path::PathBuf) -> Self {
        let files_dir = kb_dir.with_file_name("files");
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            database_url,
            default_model,
            threads: hanlin_engine::default_threads(),
            memory_budget: 4 << 30,
            max_body: 2 << 20,
            sched: SchedulerConfig::default(),
            kb_dir,
            feed_allow: Vec::new(),
            signup: None,
            allowed_hosts: Vec::new(),
            trusted_proxies: Vec::new(),
            metrics_token: None,
            unauthenticated_per_minute: 300,
            per_model: Default::default(),
            extract: Default::default(),
            mcp: Default::default(),
            mcp_allow: Vec::new(),
            files_dir,
            batch_parallel: 12,
            batch_keep: std::time::Duration::from_secs(7 * 24 * 3600),
            image_model: None,
            image_keep: std::time::Duration::from_secs(7 * 24 * 3600),
            wechat: Default::default(),
            replica_id: None,
            replica_lease: std::time::Duration::from_secs(30),
            drain_deadline: std::time::Duration::from_secs(30),
            upstreams: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Accounts(#[from] hanlin_accounts::AccountError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("loading the default model: {0}")]
    Model(String),
    #[error("MCP server settings: {0}")]
    Mcp(#[from] hanlin_tools::mcp::McpError),
    #[error("channel settings: {0}")]
    Channel(String),
    #[error(transparent)]
    Upstream(#[from] hanlin_upstream::UpstreamError),
}

pub struct AppState {
    pub db: Db,
    /// The one metered generation path (limits, usage, metrics).
    pub gw: Arc<Gateway>,
    pub models: models::Models,
    pub grammars: grammar::Grammars,
    pub kbs: search::Kbs,
    pub embedders: hanlin_embed::Embedders,
    /// Speech recognition (Whisper), loaded on first use.
    pub speech: audio::Speech,
    /// Image models; the pipeline loads on first use.
    pub images: images::Images,
    pub config: Config,
    /// While the server has no admin: the one-time token the first web
    /// registration needs (printed on the console). Held locked while that
    /// registration runs, so two cannot both become admin.
    pub setup_token: tokio::sync::Mutex<Option<String>>,
    pub throttle: guard::Throttle,
    pub anon: guard::AnonLimit,
    /// The tools the server runs for `hanlin_tools` and web conversations.
    pub toolbox: hanlin_tools::Toolbox,
    /// The MCP servers whose tools join the toolbox's.
    pub mcp: Arc<hanlin_tools::mcp::Hub>,
    /// The server's time zone (`$TZ` or `/etc/timezone`, read at start):
    /// `datetime`'s default.
    pub timezone: chrono_tz::Tz,
    /// Wakes the batch runner when a batch is created or cancelled.
    pub batch_wake: tokio::sync::Notify,
    /// Messaging channel accounts (WeChat).
    pub channels: channel::Channels,
    /// Set when the replica was told to stop: `/health` says so (load
    /// balancers take it out) and background work starts nothing new.
    pub draining: std::sync::atomic::AtomicBool,
    /// Models served by upstream servers, by name.
    pub upstreams: upstream::Upstreams,
    /// The task that renews this replica's row; stopped before the row is
    /// retired, so that a late renewal cannot bring the row back.
    heartbeat: Heartbeat,
}

/// The heartbeat task and the switch that stops it between renewals.
struct Heartbeat {
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Heartbeat {
    fn start(db: Db, lease: std::time::Duration) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(heartbeat(db, lease, rx));
        Self {
            stop,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Stop renewing, and wait for a renewal under way to finish.
    async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl AppState {
    pub async fn new(config: Config, store: hanlin_store::Store) -> Result<Arc<Self>, ServerError> {
        hanlin_tools::mcp::install_tls();
        let mut db = Db::connect(&config.database_url).await?;
        let replica = config.replica_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "hanlin".into());
            if config.port == 0 {
                format!("{host}-{}", hanlin_accounts::random_token(8))
            } else {
                format!("{host}:{}", config.port)
            }
        });
        db.set_replica(&replica);
        db.register_replica().await?;
        match db.clock_skew_ms().await {
            Ok(skew) if skew.abs() > 2000 => tracing::warn!(
                "this machine's clock is {skew} ms off the database's; limits and leases use the database's"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("reading the database's clock: {e}"),
        }
        let heartbeat = Heartbeat::start(db.clone(), config.replica_lease);
        if let Some(p) = config.signup {
            db.set_signup_policy(p).await?;
        }
        let setup_token = if db.has_admin().await? {
            None
        } else {
            Some(hanlin_accounts::random_token(32))
        };
        // Replies a previous run was writing when it stopped are kept, as incomplete.
        let interrupted = db.mark_interrupted_replies().await?;
        if interrupted > 0 {
            tracing::warn!(
                "{interrupted} replies were cut off by the last shutdown; kept as incomplete"
            );
        }
        let mut upstreams = upstream::Upstreams::new(&config.upstreams)?;
        upstreams.load_tokenizers(&store).await?;
        let embedders = hanlin_embed::Embedders::new(
            hanlin_store::Store::open(store.home())
                .map_err(|e| ServerError::Model(e.to_string()))?,
            config.threads,
        );
        let speech = audio::Speech::new(
            hanlin_store::Store::open(store.home())
                .map_err(|e| ServerError::Model(e.to_string()))?,
            config.threads,
        );
        let images = images::Images::new(
            hanlin_store::Store::open(store.home())
                .map_err(|e| ServerError::Model(e.to_string()))?,
            config.threads,
            config.image_model.clone(),
        );
        let models = models::Models::new(
            store,
            config.threads,
            config.memory_budget,
            config.sched.clone(),
            config.per_model.clone(),
        );
        let mcp = Arc::new(tools::mcp_hub(&db, &config).await?);
        let channels = channel::Channels::new(&db, &config.wechat).map_err(ServerError::Channel)?;
        let kbs = if db.postgres {
            search::Kbs::replicated(config.kb_dir.clone(), db.clone())
        } else {
            search::Kbs::new(config.kb_dir.clone())
        };
        let state = Arc::new(Self {
            gw: Gateway::with_limits(
                db.clone(),
                Metrics::new()?,
                if db.postgres {
                    // Replicas may share this database: limits live in it.
                    Limits::Shared(SharedLimiter::new(db.clone(), config.replica_lease))
                } else {
                    Limits::Local(Default::default())
                },
            ),
            db,
            models,
            grammars: grammar::Grammars::default(),
            kbs,
            embedders,
            speech,
            images,
            setup_token: tokio::sync::Mutex::new(setup_token),
            throttle: guard::Throttle::default(),
            anon: guard::AnonLimit::new(config.unauthenticated_per_minute),
            toolbox: hanlin_tools::Toolbox::builtin(),
            mcp,
            timezone: hanlin_tools::Context::local_timezone(),
            batch_wake: tokio::sync::Notify::new(),
            channels,
            config,
            draining: Default::default(),
            heartbeat,
            upstreams,
        });
        upstream::Upstreams::spawn_health_checks(&state, std::time::Duration::from_secs(5));
        Ok(state)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.config.max_body;
    // The web app and its API (cookie sessions), for allowed host names only.
    let web_app = Router::new()
        .route("/", get(web::index))
        .route("/c/{id}", get(web::index))
        .route("/assets/{*path}", get(web::static_file))
        .route("/api/register", post(web::register))
        .route("/api/login", post(web::login))
        .route("/api/setup", get(web::setup))
        .route("/api/logout", post(web::logout))
        .route("/api/me", get(web::me))
        .route("/api/models", get(web::models))
        .route("/api/tools", get(web::tools))
        .route(
            "/api/conversations",
            get(web::list_conversations).post(web::create_conversation),
        )
        .route(
            "/api/conversations/{id}",
            get(web::get_conversation)
                .patch(web::patch_conversation)
                .delete(web::delete_conversation),
        )
        .route("/api/conversations/{id}/messages", post(web::send_message))
        .route(
            "/api/conversations/{id}/images",
            post(web::conversation_image).layer(DefaultBodyLimit::max(web::images::MAX_ASK_BYTES)),
        )
        .route(
            "/api/conversations/{id}/export",
            get(web::export_conversation),
        )
        .route(
            "/api/import",
            post(web::import).layer(DefaultBodyLimit::max(web::MAX_IMPORT_BYTES)),
        )
        .route(
            "/api/voice/transcribe",
            post(web::transcribe).layer(DefaultBodyLimit::max(web::voice::MAX_UTTERANCE_BYTES)),
        )
        .route("/api/voice/speak", post(web::speak))
        .route("/api/search", get(web::search))
        .route("/api/kb", get(web::knowledge_bases))
        .route(
            "/api/personas",
            get(web::personas).post(web::create_persona),
        )
        .route(
            "/api/personas/{id}",
            put(web::put_persona).delete(web::delete_persona),
        )
        .route("/api/keys", get(web::my_keys).post(web::create_my_key))
        .route("/api/keys/{id}", delete(web::revoke_my_key))
        .route("/api/usage", get(web::my_usage))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::check_host,
        ));
    Router::new()
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/v1/models", get(api::list_models))
        .route("/v1/models/{id}", get(api::get_model))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/embeddings", post(api::embeddings))
        .route(
            "/v1/audio/transcriptions",
            post(audio::transcriptions)
                .layer(DefaultBodyLimit::max(audio::MAX_AUDIO_BYTES + (1 << 20))),
        )
        .route("/v1/audio/speech", post(audio::speech))
        .route("/v1/images/generations", post(images::generations))
        .route(
            "/v1/images/edits",
            post(images::edits).layer(DefaultBodyLimit::max(images::MAX_EDIT_BYTES)),
        )
        .route(
            "/v1/audio/translations",
            post(audio::translations)
                .layer(DefaultBodyLimit::max(audio::MAX_AUDIO_BYTES + (1 << 20))),
        )
        .route("/v1/search", post(search::search))
        .route("/v1/ask", post(search::ask))
        .route("/v1/kb", get(search::list_kbs))
        .route("/v1/kb/{name}", put(search::create_kb))
        .route("/v1/kb/{name}/feeds", post(search::add_feed))
        .route("/v1/kb/{name}/readers", put(search::put_readers))
        .route(
            "/v1/kb/{name}/files",
            post(search::upload_file).layer(DefaultBodyLimit::max(search::MAX_UPLOAD_BYTES)),
        )
        .route("/v1/kb/{name}/documents", post(search::add_documents))
        .route(
            "/v1/admin/users",
            get(admin::users).post(admin::create_user),
        )
        .route("/v1/admin/keys", get(admin::keys).post(admin::create_key))
        .route("/v1/admin/keys/{id}", delete(admin::revoke_key))
        .route("/v1/admin/plans", get(admin::plans))
        .route("/v1/admin/plans/{name}", put(admin::put_plan))
        .route("/v1/admin/usage", get(admin::usage))
        .route(
            "/v1/admin/users/{name}",
            axum::routing::patch(admin::patch_user).delete(admin::delete_user),
        )
        .route(
            "/v1/admin/settings",
            get(admin::settings).put(admin::put_settings),
        )
        .route("/v1/admin/mcp", get(admin::mcp_servers))
        .route(
            "/v1/admin/mcp/{name}",
            put(admin::put_mcp_server).delete(admin::delete_mcp_server),
        )
        .route("/v1/admin/mcp/{name}/tools", get(admin::mcp_server_tools))
        .route("/v1/tools", get(tools::list))
        .route(
            "/v1/files",
            get(files::list)
                .post(files::upload)
                .layer(DefaultBodyLimit::max(files::MAX_FILE_BYTES + (1 << 20))),
        )
        .route("/v1/files/{id}", get(files::get).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", get(batch::list).post(batch::create))
        .route("/v1/batches/{id}", get(batch::get))
        .route("/v1/batches/{id}/cancel", post(batch::cancel))
        .route(
            "/wechat/{account}",
            get(channel::wechat)
                .post(channel::wechat)
                .layer(DefaultBodyLimit::max(
                    hanlin_channels::wechat::xml::MAX_BODY,
                )),
        )
        .route("/v1/admin/channels", get(channel::admin_accounts))
        .route(
            "/v1/admin/channels/{account}/users",
            get(channel::admin_users),
        )
        .route(
            "/v1/admin/channels/{account}/users/{external_id}/conversations",
            get(channel::admin_conversations),
        )
        .merge(web_app)
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(max_body))
        // A body must arrive within this time once the handler reads it.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_secs(60),
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::limit_anonymous,
        ))
        .layer(axum::middleware::from_fn(guard::hold_busy))
        .layer(axum::middleware::from_fn(guard::close_if_body_unread))
        .with_state(state)
}

/// Bind, load the default model, and serve until Ctrl-C.
pub async fn serve(state: Arc<AppState>) -> Result<(), ServerError> {
    let addr = format!("{}:{}", state.config.host, state.config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.clone(),
            source,
        })?;
    // A gateway in front of upstream servers may load no model itself.
    if state.upstreams.get(&state.config.default_model).is_none() {
        state
            .models
            .get(&state.config.default_model)
            .await
            .map_err(|e| ServerError::Model(e.message))?;
    }
    let local: SocketAddr = listener.local_addr()?;
    tokio::spawn(search::poll_feeds(
        state.clone(),
        std::time::Duration::from_secs(2),
    ));
    if state.db.postgres {
        tokio::spawn(search::follow_log(
            state.clone(),
            std::time::Duration::from_secs(1),
        ));
    }
    tokio::spawn(prune_sessions(state.clone()));
    batch::spawn_runner(state.clone());
    tracing::info!(
        "serving the web app on http://{local}/ and the OpenAI-compatible API on http://{local}/v1"
    );
    println!(
        "Hanlin is serving the chat app on http://{local}/ and the API on http://{local}/v1 (default model {})",
        state.config.default_model
    );
    for name in state.channels.names() {
        println!("WeChat account {name} takes callbacks at http://{local}/wechat/{name} (put it behind your HTTPS proxy)");
    }
    if let Some(token) = state.setup_token.lock().await.as_deref() {
        println!(
            "This server has no administrator yet. Open http://{local}/ and register with the setup token\n\n    {token}\n\n(or create one with `hanlin admin user create NAME --admin`)."
        );
    }
    let st = state.clone();
    let app = router(state).into_make_service_with_connect_info::<guard::PeerAddr>();
    let listener = guard::CappedListener::new(listener, guard::ConnLimits::default());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })
            .await
    });
    tokio::select! {
        r = &mut server => {
            r.map_err(std::io::Error::other)??;
            st.heartbeat.stop().await;
            st.db.retire_replica().await?;
            return Ok(());
        }
        _ = stop_signal() => {}
    }
    // Drain: `/health` turns 503 (a load balancer stops sending), no new
    // connection is taken, streams in progress finish within the deadline;
    // then this replica's holds, leases and row go at once.
    st.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Err(e) = st.db.set_draining().await {
        tracing::warn!("marking this replica as draining: {e}");
    }
    let deadline = st.config.drain_deadline;
    println!(
        "Stopping: finishing the requests in progress (at most {} s)",
        deadline.as_secs()
    );
    let _ = stop_tx.send(true);
    match tokio::time::timeout(deadline, &mut server).await {
        Ok(r) => {
            r.map_err(std::io::Error::other)??;
        }
        Err(_) => {
            tracing::warn!("requests still running after the drain deadline are cut off");
            server.abort();
        }
    }
    st.heartbeat.stop().await;
    st.db.retire_replica().await?;
    Ok(())
}

/// Ctrl-C, or SIGTERM (what `systemctl stop`, Docker and Kubernetes send).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Renew this replica's heartbeat, and release what dead replicas held, a
/// few times per lease, until `stop` turns true (checked between renewals:
/// a renewal under way finishes first).
async fn heartbeat(
    db: Db,
    lease: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval((lease / 6).max(std::time::Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if *stop.borrow() {
            return;
        }
        if let Err(e) = db.heartbeat().await {
            tracing::warn!("replica heartbeat: {e}");
            continue;
        }
        match db.sweep_dead_replicas(lease.as_millis() as i64).await {
            Ok(s) if s.replies > 0 || s.holds > 0 => tracing::warn!(
                "released what stopped replicas held: {} streaming replies marked incomplete, {} token holds",
                s.replies,
                s.holds
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("sweeping stopped replicas: {e}"),
        }
    }
}

/// Delete expired browser sessions (and channel messages past their
/// retry window) every hour.
async fn prune_sessions(st: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        channel::prune(&st.db).await;
        match st.db.prune_sessions().await {
            Ok(0) => {}
            Ok(n) => tracing::info!("{n} expired sessions deleted"),
            Err(e) => tracing::warn!("pruning sessions: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A replica that stops cleanly stays retired: its heartbeat is
    /// stopped before the row goes. (The heartbeat used to run on, and a
    /// renewal that raced the retirement put the row back, so a stopped
    /// replica was listed as live until its lease ran out.)
    #[tokio::test]
    async fn a_retired_replica_stays_retired() {
        let dir = tempfile::tempdir().expect("tmp");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let mut db = Db::connect(&url).await.expect("db");
        db.set_replica("r");
        db.register_replica().await.expect("register");
        // A renewal every 100 ms.
        let beat = Heartbeat::start(db.clone(), Duration::from_millis(600));
        tokio::time::sleep(Duration::from_millis(250)).await;
        beat.stop().await;
        db.retire_replica().await.expect("retire");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let live = db.live_replicas(60_000).await.expect("replicas");
        assert!(live.is_empty(), "{live:?}");
    }
}
