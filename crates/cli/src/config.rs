//! The settings file (`config.toml`), read into typed settings.
//!
//! `--config FILE`, `$HANLIN_CONFIG`, or `config.toml` in the store
//! directory. Keys are the long flag names of `hanlin serve` (and
//! `database_url`, `kb_dir`); lists are TOML arrays. A flag beats the
//! environment, which beats the file. Values stay in this process's memory:
//! nothing from the file is put into the environment, so secrets in it
//! (`database_url`, `metrics_token`) do not reach child processes. An
//! unknown key is an error, not a silently ignored typo.

use super::*;
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::Deserialize;

/// Every key the settings file may hold (README: "Configuration file").
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSettings {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub model: Option<String>,
    pub database_url: Option<String>,
    pub max_batch: Option<usize>,
    pub max_queue: Option<usize>,
    pub ctx: Option<usize>,
    pub prefill_chunk: Option<usize>,
    pub lookup: Option<bool>,
    pub draft: Option<String>,
    pub memory_budget_mb: Option<u64>,
    pub max_body_kb: Option<usize>,
    pub feed_allow: Option<Vec<String>>,
    pub signup: Option<String>,
    pub allowed_hosts: Option<Vec<String>>,
    pub trusted_proxies: Option<Vec<std::net::IpAddr>>,
    pub metrics_token: Option<String>,
    pub unauthenticated_per_minute: Option<u32>,
    /// Where knowledge bases live (default: `kb/` in the store).
    pub kb_dir: Option<PathBuf>,
    /// Where the Files API keeps its bytes.
    pub files_dir: Option<PathBuf>,
    pub batch_parallel: Option<usize>,
    pub batch_keep_days: Option<u64>,
    pub image_model: Option<String>,
    pub image_keep_days: Option<u64>,
    pub replica_id: Option<String>,
    pub replica_lease_secs: Option<u64>,
    pub drain_secs: Option<u64>,
    /// `[models.NAME]`: settings for one model that differ from the
    /// server-wide ones.
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, ModelTable>,
    /// Hosts MCP servers registered from the admin screen may be at
    /// although not public.
    pub mcp_allow: Option<Vec<String>>,
    /// `[mcp.NAME]`: an MCP server whose tools the server runs (`url`, or
    /// `command` with `env`; the file is the only place for commands).
    #[serde(default)]
    pub mcp: std::collections::BTreeMap<String, hanlin_tools::mcp::ServerConfig>,
    /// `[wechat.NAME]`: a WeChat Official Account or WeCom app answered at
    /// `/wechat/NAME` (README: "WeChat").
    #[serde(default)]
    pub wechat: std::collections::BTreeMap<String, hanlin_channels::wechat::AccountConfig>,
}

/// `[models.NAME]` (README: "Configuration file").
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelTable {
    pub ctx: Option<usize>,
    pub max_batch: Option<usize>,
    pub max_queue: Option<usize>,
    pub prefill_chunk: Option<usize>,
    pub lookup: Option<bool>,
    /// A model in the store that guesses ahead for this one.
    pub draft: Option<String>,
    /// OpenAI-compatible servers that serve this model instead of this
    /// process (README: "Running at scale").
    pub upstream: Option<Vec<String>>,
    /// Bearer token for the upstream servers.
    pub api_key: Option<String>,
    /// The model's name on the upstream servers.
    pub upstream_model: Option<String>,
    /// Default and largest `max_tokens` of an upstream model.
    pub max_tokens: Option<u32>,
    pub first_byte_secs: Option<u64>,
    pub idle_secs: Option<u64>,
    pub cooldown_secs: Option<u64>,
    pub template_tokens: Option<u32>,
    /// A model in the store whose tokenizer counts an upstream model's
    /// tokens when its servers report none.
    pub tokenizer: Option<String>,
}

impl ModelTable {
    /// The upstream pool's settings, when the table names servers.
    pub(crate) fn upstream(&self) -> Option<hanlin_upstream::UpstreamConfig> {
        let urls = self.upstream.clone()?;
        let mut c = hanlin_upstream::UpstreamConfig::new(urls);
        c.api_key = self.api_key.clone();
        c.model = self.upstream_model.clone();
        if let Some(v) = self.max_tokens {
            c.max_tokens = v;
        }
        if let Some(v) = self.first_byte_secs {
            c.first_byte_secs = v;
        }
        if let Some(v) = self.idle_secs {
            c.idle_secs = v;
        }
        if let Some(v) = self.cooldown_secs {
            c.cooldown_secs = v;
        }
        if let Some(v) = self.template_tokens {
            c.template_tokens = v;
        }
        c.tokenizer = self.tokenizer.clone();
        Some(c)
    }

    pub(crate) fn settings(&self) -> hanlin_server::models::ModelSettings {
        hanlin_server::models::ModelSettings {
            ctx: self.ctx,
            max_batch: self.max_batch,
            max_queue: self.max_queue,
            prefill_chunk: self.prefill_chunk,
            lookup: self.lookup,
            draft: self.draft.clone(),
        }
    }
}

/// The settings file named on the command line or in `$HANLIN_CONFIG`, or
/// the store's `config.toml` when it exists.
pub(crate) fn load_settings(m: &ArgMatches) -> Result<FileSettings> {
    // `hanlin train pretrain --config RUN.toml` names a training run's
    // settings, not the server's.
    if matches!(m.subcommand_name(), Some("train" | "extract-file")) {
        return Ok(FileSettings::default());
    }
    let explicit = m.get_one::<PathBuf>("config").cloned();
    let path = match &explicit {
        Some(p) => p.clone(),
        None => m
            .get_one::<PathBuf>("home")
            .cloned()
            .unwrap_or_else(Store::default_home)
            .join("config.toml"),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
            return Ok(FileSettings::default())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Whether `id` was given on the command line or in the environment.
fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Fill `slot` from the file when neither a flag nor the environment set it.
fn fill<T>(m: &ArgMatches, id: &str, slot: &mut T, from_file: Option<T>) {
    if let Some(v) = from_file.filter(|_| !given(m, id)) {
        *slot = v;
    }
}

impl FileSettings {
    /// `hanlin serve`'s settings: the file where flags and environment say
    /// nothing.
    pub(crate) fn apply_serve(self, m: &ArgMatches, a: &mut ServeArgs) -> Result<()> {
        fill(m, "host", &mut a.host, self.host);
        fill(m, "port", &mut a.port, self.port);
        fill(m, "model", &mut a.model, self.model);
        fill(
            m,
            "database_url",
            &mut a.db.database_url,
            self.database_url.map(Some),
        );
        fill(m, "max_batch", &mut a.max_batch, self.max_batch);
        fill(m, "max_queue", &mut a.max_queue, self.max_queue);
        fill(m, "ctx", &mut a.ctx, self.ctx);
        fill(m, "prefill_chunk", &mut a.prefill_chunk, self.prefill_chunk);
        fill(m, "lookup", &mut a.lookup, self.lookup);
        fill(m, "draft", &mut a.draft, self.draft.map(Some));
        fill(
            m,
            "memory_budget_mb",
            &mut a.memory_budget_mb,
            self.memory_budget_mb,
        );
        fill(m, "max_body_kb", &mut a.max_body_kb, self.max_body_kb);
        fill(m, "feed_allow", &mut a.feed_allow, self.feed_allow);
        fill(m, "allowed_hosts", &mut a.allowed_hosts, self.allowed_hosts);
        fill(
            m,
            "trusted_proxies",
            &mut a.trusted_proxies,
            self.trusted_proxies,
        );
        fill(
            m,
            "metrics_token",
            &mut a.metrics_token,
            self.metrics_token.map(Some),
        );
        fill(
            m,
            "unauthenticated_per_minute",
            &mut a.unauthenticated_per_minute,
            self.unauthenticated_per_minute,
        );
        let signup = match self.signup {
            Some(s) => Some(Some(
                parse_signup(&s).map_err(|e| anyhow::anyhow!("signup: {e}"))?,
            )),
            None => None,
        };
        fill(m, "signup", &mut a.signup, signup);
        fill(m, "mcp_allow", &mut a.mcp_allow, self.mcp_allow);
        fill(m, "files_dir", &mut a.files_dir, self.files_dir.map(Some));
        fill(
            m,
            "batch_parallel",
            &mut a.batch_parallel,
            self.batch_parallel,
        );
        fill(
            m,
            "batch_keep_days",
            &mut a.batch_keep_days,
            self.batch_keep_days,
        );
        fill(
            m,
            "image_model",
            &mut a.image_model,
            self.image_model.map(Some),
        );
        fill(
            m,
            "image_keep_days",
            &mut a.image_keep_days,
            self.image_keep_days,
        );
        fill(
            m,
            "replica_id",
            &mut a.replica_id,
            self.replica_id.map(Some),
        );
        fill(
            m,
            "replica_lease_secs",
            &mut a.replica_lease_secs,
            self.replica_lease_secs,
        );
        fill(m, "drain_secs", &mut a.drain_secs, self.drain_secs);
        a.mcp = self.mcp;
        a.wechat = self.wechat;
        a.upstreams = self
            .models
            .iter()
            .filter_map(|(name, t)| Some((name.clone(), t.upstream()?)))
            .collect();
        a.per_model = self
            .models
            .iter()
            .map(|(name, t)| (name.clone(), t.settings()))
            .collect();
        Ok(())
    }
}
