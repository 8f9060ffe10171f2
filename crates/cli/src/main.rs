//! `hanlin`: the command-line front door (chat, run, pull, list, rm, show,
//! serve, admin, bench).

mod admin;
mod batch;
mod bench;
mod chat;
mod config;
mod image;
mod kb;
mod models;
mod speech;
mod train;
mod write;

use admin::*;
use bench::*;
use chat::*;
use config::*;
use models::*;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hanlin_engine::{FinishReason, GenerateParams, LoadedModel, SamplerConfig};
use hanlin_store::{catalog, Store, DEFAULT_MODEL};
use hanlin_tokenizer::Message;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "hanlin",
    version,
    about = "Hanlin (翰林): a self-hosted ChatGPT system"
)]
struct Cli {
    /// Model store directory (default: $HANLIN_HOME or the user data dir)
    #[arg(long, global = true, env = "HANLIN_HOME")]
    home: Option<PathBuf>,
    /// Settings file (TOML; default: config.toml in the store directory)
    #[arg(long, global = true, env = "HANLIN_CONFIG")]
    config: Option<PathBuf>,
    /// Compute threads (default: all cores)
    #[arg(long, short = 't', global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Interactive multi-turn chat (fetches the model on first use)
    Chat {
        /// Model name or path to a .gguf file
        #[arg(default_value = DEFAULT_MODEL)]
        model: String,
        /// Tools the model may call, run here: calculator, datetime
        /// (comma-separated; the steps are shown on stderr)
        #[arg(long, value_delimiter = ',')]
        tools: Vec<String>,
        #[command(flatten)]
        gen: GenArgs,
    },
    /// One-shot: answer PROMPT (or --file) and stream it to stdout
    Run {
        model: String,
        prompt: Option<String>,
        /// Read the prompt from a file (must be UTF-8)
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        /// Send the prompt as-is, without the chat template
        #[arg(long)]
        raw: bool,
        /// With --raw: read special tokens written in the prompt
        /// (`<|im_start|>`) as control tokens instead of plain text
        #[arg(long, requires = "raw")]
        special: bool,
        #[command(flatten)]
        gen: GenArgs,
    },
    /// Fetch a model into the store (catalog name or hf:owner/repo/file.gguf)
    Pull { name: String },
    /// List pulled models and the catalog
    List,
    /// Remove a pulled model
    Rm { name: String },
    /// Show a model's architecture, quantization, tokenizer and template
    Show {
        model: String,
        /// Print only the path of the model file
        #[arg(long)]
        path: bool,
    },
    /// Serve the OpenAI-compatible API (continuous batching, keys, quotas)
    Serve(Box<ServeArgs>),
    /// (internal) Extract one untrusted file and print its documents as
    /// JSON: the child process `kb add` and the server read files in
    #[command(hide = true)]
    ExtractFile { path: PathBuf },
    /// Speech to text (or to English) with Whisper: text, JSON or subtitles
    Transcribe(speech::TranscribeArgs),
    /// Text to speech (espeak-ng; Chinese read from pinyin), as a WAV file
    Say(speech::SayArgs),
    /// Text to image with a Stable Diffusion pipeline, as a PNG file
    Image(image::ImageArgs),
    /// Batches on a running server: submit a JSONL file, follow, cancel, fetch results
    Batch(batch::BatchArgs),
    /// Articles from rows of data (CSV, JSONL, JSON) and a template, in
    /// one or more languages, every number, date and name checked
    Write(write::WriteArgs),
    /// Manage users, API keys, plans and usage (directly in the database)
    Admin {
        #[command(flatten)]
        db: DbArgs,
        #[command(subcommand)]
        cmd: AdminCmd,
    },
    /// Knowledge bases for grounded answers (files indexed with Chinese word segmentation)
    Kb {
        #[command(subcommand)]
        cmd: kb::KbCmd,
    },
    /// RSS/Atom feeds polled into knowledge bases (`hanlin serve` polls them)
    Feed {
        #[command(subcommand)]
        cmd: kb::FeedCmd,
    },
    /// Answer a question from knowledge bases, with checked numbered citations
    Ask {
        /// Knowledge base to search (repeatable)
        #[arg(long = "kb", required = true)]
        kbs: Vec<String>,
        question: String,
        /// Model that writes the answer
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// Print one JSON object (answer, citations, sources)
        #[arg(long)]
        json: bool,
        /// Prompt lookup: guesses copied from the retrieved passages are
        /// checked several at a time (the same answer, fewer passes when it
        /// quotes its sources; off by itself when it does not pay)
        #[arg(long, env = "HANLIN_LOOKUP", default_value_t = true, action = clap::ArgAction::Set)]
        lookup: bool,
        /// Print timing statistics to stderr after the answer
        #[arg(long)]
        verbose: bool,
    },
    /// Train your own GPT: tokenizer, pretraining, SFT, DPO, LoRA, evaluation (burn, CPU)
    Train {
        #[command(subcommand)]
        cmd: train::TrainCmd,
    },
    /// Export a training run to a GGUF file the engine serves
    Export {
        /// Run directory (from `hanlin train … -o`)
        run: PathBuf,
        /// A .gguf file, or a directory for safetensors
        #[arg(short, long)]
        output: PathBuf,
        /// Weight type: f32, f16, q8_0 or q4_k (default q8_0; safetensors: f32 or f16, default f16)
        #[arg(long)]
        quant: Option<hanlin_train::export::Quant>,
        /// gguf, or safetensors (a Hugging Face directory)
        #[arg(long, default_value = "gguf")]
        format: String,
    },
    /// Measure prefill and decode speed and peak memory
    Bench {
        #[arg(default_value = DEFAULT_MODEL)]
        model: String,
        /// Prompt tokens for the prefill measurement
        #[arg(short = 'p', long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Also prefill a prompt this long in every repetition, right after
        /// the `-p` one, and report its rate and its ratio to the `-p` rate
        /// (the median of each repetition's ratio, so a machine whose speed
        /// drifts between repetitions still gives a steady ratio)
        #[arg(long, value_name = "TOKENS")]
        long_prompt: Option<usize>,
        /// Tokens to decode
        #[arg(short = 'n', long, default_value_t = 64)]
        gen_tokens: usize,
        /// Repetitions (the median is reported)
        #[arg(short = 'r', long, default_value_t = 3)]
        reps: usize,
        /// Also decode this many sequences in lockstep (one batched forward
        /// pass per step, as the server's scheduler does) and report the
        /// aggregate rate
        #[arg(short = 'b', long, default_value_t = 0)]
        batch: usize,
        /// Also time one forward pass over each of these numbers of rows
        /// (a speculative round's verify pass: a token and its proposals,
        /// every row's logits), each as a multiple of a one-row pass timed
        /// right before it, e.g. `--rows 2,3,4,5`
        #[arg(long, value_delimiter = ',', value_name = "N,…")]
        rows: Vec<usize>,
        /// Print one JSON line instead of a table
        #[arg(long)]
        json: bool,
        /// Measure the machine's memory read bandwidth instead
        #[arg(long)]
        bandwidth: bool,
    },
}

#[derive(Args, Clone)]
struct DbArgs {
    /// sqlite://FILE or postgres://USER@HOST/DB (default: sqlite in the store directory)
    #[arg(long, env = "HANLIN_DATABASE_URL", global = true)]
    database_url: Option<String>,
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address to listen on
    #[arg(long, env = "HANLIN_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "HANLIN_PORT", default_value_t = 8080)]
    port: u16,
    /// Model loaded at start (others load on first request)
    #[arg(long, env = "HANLIN_MODEL", default_value = DEFAULT_MODEL)]
    model: String,
    #[command(flatten)]
    db: DbArgs,
    /// Sequences decoded together per step
    #[arg(long, env = "HANLIN_MAX_BATCH", default_value_t = 16)]
    max_batch: usize,
    /// Requests allowed to wait for a slot (beyond: 429)
    #[arg(long, env = "HANLIN_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Context per sequence in tokens (capped by the model's)
    #[arg(long, env = "HANLIN_CTX", default_value_t = 8192)]
    ctx: usize,
    /// Prompt tokens fed per step across sequences (chunked prefill)
    #[arg(long, env = "HANLIN_PREFILL_CHUNK", default_value_t = 256)]
    prefill_chunk: usize,
    /// Prompt lookup: decode steps also check guesses copied from each
    /// sequence's own prompt (same text, fewer steps when answers quote
    /// their input; off by itself when the batch is busy)
    #[arg(long, env = "HANLIN_LOOKUP", default_value_t = true, action = clap::ArgAction::Set)]
    lookup: bool,
    /// A smaller model with the same vocabulary that guesses ahead for the
    /// default model (speculative decoding inside the batch; for another
    /// model: `draft =` in its `[models.NAME]` table)
    #[arg(long, env = "HANLIN_DRAFT")]
    draft: Option<String>,
    /// Memory for loaded models in MiB (least recently used ones are evicted)
    #[arg(long, env = "HANLIN_MEMORY_BUDGET_MB", default_value_t = 4096)]
    memory_budget_mb: u64,
    /// Largest request body in KiB (beyond: 413)
    #[arg(long, env = "HANLIN_MAX_BODY_KB", default_value_t = 2048)]
    max_body_kb: usize,
    /// Where uploaded files and batch results are kept (default: beside
    /// the knowledge bases, `files/`)
    #[arg(long, env = "HANLIN_FILES_DIR")]
    files_dir: Option<PathBuf>,
    /// Batch lines run at once (they take the engine's spare slots: its
    /// `max_batch` less the 4 kept for interactive requests)
    #[arg(long, default_value_t = 12)]
    batch_parallel: usize,
    /// Days a finished batch's output and error files are kept
    #[arg(long, default_value_t = 7)]
    batch_keep_days: u64,
    /// The image model for /v1/images (and OpenAI's dall-e-*/gpt-image-*
    /// names): a pulled diffusers pipeline (default: the first one pulled)
    #[arg(long)]
    image_model: Option<String>,
    /// Days images answered by URL are kept
    #[arg(long, default_value_t = 7)]
    image_keep_days: u64,
    /// This replica's id among servers sharing one database (default: the
    /// host name and port)
    #[arg(long, env = "HANLIN_REPLICA_ID")]
    replica_id: Option<String>,
    /// Seconds without a heartbeat after which a replica counts as dead
    /// (its token holds and streaming replies are released)
    #[arg(long, default_value_t = 30)]
    replica_lease_secs: u64,
    /// On SIGTERM or Ctrl-C, seconds the requests in progress may take to
    /// finish before the server stops anyway
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// Hosts or IP addresses feeds may be fetched from although they are not
    /// public (loopback, private, link-local), comma-separated
    #[arg(long, env = "HANLIN_FEED_ALLOW", value_delimiter = ',')]
    feed_allow: Vec<String>,
    /// Hosts or IP addresses MCP servers registered from the admin screen
    /// may be at although they are not public, comma-separated
    #[arg(long, env = "HANLIN_MCP_ALLOW", value_delimiter = ',')]
    mcp_allow: Vec<String>,
    /// `[mcp.NAME]` tables of the settings file
    #[arg(skip)]
    mcp: std::collections::BTreeMap<String, hanlin_tools::mcp::ServerConfig>,
    /// `[wechat.NAME]` tables of the settings file
    #[arg(skip)]
    wechat: std::collections::BTreeMap<String, hanlin_channels::wechat::AccountConfig>,
    /// Who may register on the web app: open, approval (accounts wait for an
    /// admin) or closed (default: what an admin last chose, else approval)
    #[arg(long, env = "HANLIN_SIGNUP", value_parser = parse_signup)]
    signup: Option<hanlin_accounts::web::SignupPolicy>,
    /// Host names the web app answers for besides IP addresses and
    /// localhost, comma-separated (protects against DNS rebinding)
    #[arg(long, env = "HANLIN_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Reverse proxies whose X-Forwarded-For names the client, comma-separated
    #[arg(long, env = "HANLIN_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<std::net::IpAddr>,
    /// Bearer token /metrics requires (default: none; /metrics is open)
    #[arg(long, env = "HANLIN_METRICS_TOKEN")]
    metrics_token: Option<String>,
    /// Requests a minute one client address may make without working
    /// credentials before it is answered 429 (0: no limit)
    #[arg(long, env = "HANLIN_UNAUTHENTICATED_PER_MINUTE", default_value_t = 300)]
    unauthenticated_per_minute: u32,
    /// `[models.NAME]` tables of the settings file.
    #[arg(skip)]
    per_model: std::collections::HashMap<String, hanlin_server::models::ModelSettings>,
    /// `[models.NAME]` tables with `upstream = [...]`.
    #[arg(skip)]
    upstreams: std::collections::BTreeMap<String, hanlin_upstream::UpstreamConfig>,
}

fn parse_signup(s: &str) -> Result<hanlin_accounts::web::SignupPolicy, String> {
    hanlin_accounts::web::SignupPolicy::parse(s)
        .ok_or_else(|| format!("{s:?}: use open, approval or closed"))
}

#[derive(Args, Clone)]
struct GenArgs {
    /// System prompt
    #[arg(long, short = 's')]
    system: Option<String>,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.1)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Random seed (same seed, same text)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Maximum tokens to generate per answer
    #[arg(long, short = 'n', default_value_t = 1024)]
    max_tokens: usize,
    /// Stop when this string is generated (repeatable)
    #[arg(long)]
    stop: Vec<String>,
    /// Context length in tokens (capped by the model's)
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Print timing statistics to stderr after each answer
    #[arg(long)]
    verbose: bool,
    /// Speculative decoding with this smaller model (same tokenizer) as the
    /// draft: same text, fewer passes over the big model's weights
    #[arg(long)]
    draft: Option<String>,
    /// Speculative decoding with drafts copied from the prompt (prompt
    /// lookup; no draft model): the same text, several tokens a pass when
    /// an answer quotes its input; off by itself while it does not pay.
    /// On by default; with `--draft`, lookup's guess is taken where it has
    /// one and the draft's where not; `--lookup false` turns it off
    #[arg(long, env = "HANLIN_LOOKUP", num_args = 0..=1,
          default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    lookup: bool,
}

impl GenArgs {
    fn params(&self) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampler: SamplerConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                penalty_last_n: 64,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            ..Default::default()
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HANLIN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = parse().and_then(|(cli, settings)| run(cli, settings)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The command line, and the settings file it names, with the file's values
/// already filled in where `hanlin serve` takes them.
fn parse() -> Result<(Cli, FileSettings)> {
    use clap::{CommandFactory, FromArgMatches};
    let m = Cli::command().get_matches();
    let settings = load_settings(&m)?;
    let mut cli = Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit());
    if let (Cmd::Serve(a), Some(sm)) = (&mut cli.cmd, m.subcommand_matches("serve")) {
        // `kb_dir` and `feed_allow` are read again by `run` (kb and feeds).
        settings.clone().apply_serve(sm, a)?;
    }
    Ok((cli, settings))
}

fn run(cli: Cli, settings: FileSettings) -> Result<()> {
    // The extraction child needs neither the store nor the settings.
    let cmd = match cli.cmd {
        Cmd::ExtractFile { path } => {
            println!("{}", hanlin_search::isolate::child_main(&path));
            return Ok(());
        }
        cmd => cmd,
    };
    kb::set_file_settings(settings.kb_dir.clone(), settings.feed_allow.clone());
    let store = Store::open(cli.home.clone().unwrap_or_else(Store::default_home))
        .context("opening the model store")?;
    let threads = cli.threads.unwrap_or_else(hanlin_engine::default_threads);
    match cmd {
        // Answered above, before the store was opened.
        Cmd::ExtractFile { .. } => Ok(()),
        Cmd::Chat { model, tools, gen } if !tools.is_empty() => {
            chat_with_tools(&store, &model, threads, &gen, &tools)
        }
        Cmd::Chat { model, gen, .. } => chat(&store, &model, threads, &gen),
        Cmd::Run {
            model,
            prompt,
            file,
            raw,
            special,
            gen,
        } => {
            let text = match (prompt, file) {
                (Some(p), None) => p,
                (None, Some(f)) => {
                    let bytes =
                        std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
                    String::from_utf8(bytes).map_err(|e| {
                        anyhow::anyhow!(
                            "{} is not valid UTF-8 (invalid byte at offset {})",
                            f.display(),
                            e.utf8_error().valid_up_to()
                        )
                    })?
                }
                (Some(_), Some(_)) => {
                    bail!("give the prompt either as an argument or with --file, not both")
                }
                (None, None) => bail!("no prompt: give it as an argument or with --file"),
            };
            let mode = match (raw, special) {
                (false, _) => Prompt::Chat,
                (true, false) => Prompt::Raw,
                (true, true) => Prompt::RawSpecial,
            };
            one_shot(&store, &model, threads, &text, mode, &gen)
        }
        Cmd::Pull { name } => {
            let m = store.pull(&name, true)?;
            println!("pulled {} ({}, sha256 {})", m.name, human(m.size), m.sha256);
            Ok(())
        }
        Cmd::List => list(&store),
        Cmd::Rm { name } => {
            let m = store.remove(&name)?;
            println!("removed {} ({})", m.name, human(m.size));
            Ok(())
        }
        Cmd::Show { model, path: true } => {
            println!("{}", resolve(&store, &model)?.display());
            Ok(())
        }
        Cmd::Show { model, path: false } => show(&store, &model),
        Cmd::Serve(args) => serve(&store, threads, *args),
        Cmd::Kb { cmd } => kb::run(&store, threads, cmd),
        Cmd::Feed { cmd } => kb::feed(&store, threads, cmd),
        Cmd::Train { cmd } => train::run(&store, threads, cmd),
        Cmd::Export {
            run,
            output,
            quant,
            format,
        } => train::export_run(&run, &output, quant, &format),
        Cmd::Ask {
            kbs,
            question,
            model,
            json,
            lookup,
            verbose,
        } => {
            let m = load(&store, &model, threads)?;
            let how = kb::How {
                json,
                lookup,
                verbose,
            };
            kb::ask(&store, threads, &m, &kbs, &question, how)
        }
        Cmd::Batch(a) => batch::run(a),
        Cmd::Transcribe(a) => speech::transcribe(&store, threads, a),
        Cmd::Say(a) => speech::say(&store, threads, a),
        Cmd::Image(a) => image::run(&store, threads, a),
        Cmd::Write(a) => write::run(&store, threads, a),
        Cmd::Admin { mut db, cmd } => {
            if db.database_url.is_none() {
                db.database_url = settings.database_url.clone();
            }
            let url = database_url(&store, &db);
            runtime()?.block_on(admin(&url, cmd))
        }
        Cmd::Bench {
            bandwidth: true,
            json,
            ..
        } => read_bandwidth(threads, json),
        Cmd::Bench {
            model,
            prompt_tokens,
            long_prompt,
            gen_tokens,
            reps,
            batch,
            rows,
            json,
            ..
        } => bench(
            &store,
            &model,
            threads,
            BenchSizes {
                n_prompt: prompt_tokens,
                n_long: long_prompt.unwrap_or(0),
                n_gen: gen_tokens,
                batch,
                rows,
            },
            reps,
            json,
        ),
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn database_url(store: &Store, db: &DbArgs) -> String {
    db.database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", store.home().join("hanlin.db").display()))
}

fn serve(store: &Store, threads: usize, mut a: ServeArgs) -> Result<()> {
    // A model file (e.g. from `hanlin export`) is copied into the store and
    // served under its file name; a catalog model is fetched on first run.
    let file = std::path::Path::new(&a.model);
    if file.is_file() {
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let m = store.import_file(&name, file)?;
        eprintln!("serving {} as model {:?}", file.display(), m.name);
        a.model = m.name;
    }
    if !a.upstreams.contains_key(&a.model) {
        resolve(store, &a.model)?;
    }
    if let Some(d) = a.draft.clone() {
        a.per_model.entry(a.model.clone()).or_default().draft = Some(d);
    }
    // Drafts are fetched like the models they guess for.
    let drafts: std::collections::BTreeSet<String> = a
        .per_model
        .values()
        .filter_map(|m| m.draft.clone())
        .collect();
    for d in drafts {
        resolve(store, &d).with_context(|| format!("the draft model {d}"))?;
    }
    let config = hanlin_server::Config {
        host: a.host.clone(),
        port: a.port,
        database_url: database_url(store, &a.db),
        default_model: a.model.clone(),
        threads,
        memory_budget: a.memory_budget_mb * 1024 * 1024,
        max_body: a.max_body_kb * 1024,
        sched: hanlin_engine::SchedulerConfig {
            max_batch: a.max_batch,
            prefill_chunk: a.prefill_chunk,
            max_queue: a.max_queue,
            ctx: a.ctx,
            lookup: a.lookup.into(),
            ..Default::default()
        },
        kb_dir: kb::root(store),
        files_dir: a
            .files_dir
            .clone()
            .unwrap_or_else(|| kb::root(store).with_file_name("files")),
        batch_parallel: a.batch_parallel,
        batch_keep: std::time::Duration::from_secs(a.batch_keep_days.saturating_mul(86_400)),
        image_model: a.image_model.clone(),
        image_keep: std::time::Duration::from_secs(a.image_keep_days.saturating_mul(86_400)),
        feed_allow: a.feed_allow.clone(),
        signup: a.signup,
        allowed_hosts: a.allowed_hosts.clone(),
        trusted_proxies: a.trusted_proxies.clone(),
        metrics_token: a.metrics_token.clone(),
        unauthenticated_per_minute: a.unauthenticated_per_minute,
        per_model: a.per_model.clone(),
        mcp: a.mcp.clone(),
        mcp_allow: a.mcp_allow.clone(),
        wechat: a.wechat.clone(),
        replica_id: a.replica_id.clone(),
        replica_lease: std::time::Duration::from_secs(a.replica_lease_secs.max(1)),
        drain_deadline: std::time::Duration::from_secs(a.drain_secs),
        upstreams: a.upstreams.clone(),
        extract: hanlin_search::isolate::Isolation::Child(
            hanlin_search::isolate::ChildLimits::this_executable()
                .context("finding this executable (to read uploads in a child process)")?,
        ),
    };
    let store = Store::open(store.home()).context("opening the model store")?;
    runtime()?.block_on(async move {
        let state = hanlin_server::AppState::new(config, store).await?;
        hanlin_server::serve(state).await?;
        Ok(())
    })
}
