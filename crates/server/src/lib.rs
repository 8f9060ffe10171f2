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

pub mod admin;
pub mod api;
pub mod error;
pub mod grammar;
pub mod metrics;
pub mod models;
pub mod openai;
mod tools;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::Router;
use hanlin_accounts::limits::Limiter;
use hanlin_accounts::Db;
use hanlin_engine::SchedulerConfig;
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
}

pub struct AppState {
    pub db: Db,
    pub models: models::Models,
    pub limiter: Limiter,
    pub metrics: metrics::Metrics,
    pub grammars: grammar::Grammars,
    pub config: Config,
}

impl AppState {
    pub async fn new(config: Config, store: hanlin_store::Store) -> Result<Arc<Self>, ServerError> {
        let db = Db::connect(&config.database_url).await?;
        let models = models::Models::new(
            store,
            config.threads,
            config.memory_budget,
            config.sched.clone(),
        );
        Ok(Arc::new(Self {
            db,
            models,
            limiter: Limiter::default(),
            metrics: metrics::Metrics::new()?,
            grammars: grammar::Grammars::default(),
            config,
        }))
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.config.max_body;
    Router::new()
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/v1/models", get(api::list_models))
        .route("/v1/models/{id}", get(api::get_model))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/embeddings", post(api::embeddings))
        .route(
            "/v1/admin/users",
            get(admin::users).post(admin::create_user),
        )
        .route("/v1/admin/keys", get(admin::keys).post(admin::create_key))
        .route("/v1/admin/keys/{id}", delete(admin::revoke_key))
        .route("/v1/admin/plans", get(admin::plans))
        .route("/v1/admin/plans/{name}", put(admin::put_plan))
        .route("/v1/admin/usage", get(admin::usage))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(max_body))
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
    state
        .models
        .get(&state.config.default_model)
        .await
        .map_err(|e| ServerError::Model(e.message))?;
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!("serving the OpenAI-compatible API on http://{local}/v1");
    println!(
        "Hanlin is serving on http://{local}/v1 (default model {})",
        state.config.default_model
    );
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
