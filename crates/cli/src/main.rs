//! `hanlin`: the command-line front door (chat, run, pull, list, rm, show,
//! serve, admin, bench).

mod kb;
mod train;

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
    Serve(ServeArgs),
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
    /// Memory for loaded models in MiB (least recently used ones are evicted)
    #[arg(long, env = "HANLIN_MEMORY_BUDGET_MB", default_value_t = 4096)]
    memory_budget_mb: u64,
    /// Largest request body in KiB (beyond: 413)
    #[arg(long, env = "HANLIN_MAX_BODY_KB", default_value_t = 2048)]
    max_body_kb: usize,
    /// Hosts or IP addresses feeds may be fetched from although they are not
    /// public (loopback, private, link-local), comma-separated
    #[arg(long, env = "HANLIN_FEED_ALLOW", value_delimiter = ',')]
    feed_allow: Vec<String>,
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
}

fn parse_signup(s: &str) -> Result<hanlin_accounts::web::SignupPolicy, String> {
    hanlin_accounts::web::SignupPolicy::parse(s)
        .ok_or_else(|| format!("{s:?}: use open, approval or closed"))
}

#[derive(Subcommand)]
enum AdminCmd {
    /// API keys
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Users
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Plans (rate limits, quotas, models, priority)
    Plan {
        #[command(subcommand)]
        cmd: PlanCmd,
    },
    /// Token usage by day, user and model
    Usage {
        #[arg(long)]
        user: Option<String>,
        /// YYYY-MM-DD (UTC)
        #[arg(long)]
        day: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create a key (and the user, if needed); the key is printed alone on the last line
    Create {
        #[arg(long)]
        user: String,
        /// Plan for the user (free, plus, or one an admin made)
        #[arg(long)]
        plan: Option<String>,
        /// Make the user an admin
        #[arg(long)]
        admin: bool,
        /// A label for the key
        #[arg(long, default_value = "")]
        name: String,
        /// Limit the key to these models (comma-separated)
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Expire after this many days
        #[arg(long)]
        expires_days: Option<u32>,
    },
    /// List keys (never their secrets)
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a key by id
    Revoke { id: String },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a user or change their plan / role
    Set {
        name: String,
        #[arg(long)]
        plan: Option<String>,
        #[arg(long)]
        admin: bool,
    },
    List,
    /// Create a web-app account with a password read from standard input
    /// (`--admin`: the server's administrator)
    Create {
        name: String,
        #[arg(long)]
        plan: Option<String>,
        #[arg(long)]
        admin: bool,
    },
    /// Set a user's password for the web app (read from standard input;
    /// creates the user if needed); their other sessions end
    Passwd {
        name: String,
    },
    /// Approve a pending account, or re-enable a disabled one
    Approve {
        name: String,
    },
    /// Disable an account (its sessions end, its keys are revoked)
    Disable {
        name: String,
    },
    /// Delete an account: keys, sessions, conversations and personas go;
    /// its usage stays on record
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum PlanCmd {
    List,
    /// Create or change a plan
    Set {
        name: String,
        #[arg(long)]
        rpm: i64,
        #[arg(long)]
        tpm: i64,
        #[arg(long)]
        tpd: i64,
        #[arg(long)]
        max_context: i64,
        /// Comma-separated models, or *
        #[arg(long, default_value = "*")]
        models: String,
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// Most choices (`n`) one request may ask for
        #[arg(long, default_value_t = 4)]
        max_n: i64,
    },
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
    if let Err(e) = load_config_file().and_then(|()| run(Cli::parse())) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Settings from a TOML file (`--config FILE`, `$HANLIN_CONFIG`, or
/// `config.toml` in the store directory) become `HANLIN_*` environment
/// variables unless those are already set, so precedence is: flags, then
/// environment, then the file. Keys are the long flag names with `_` or `-`
/// (`port = 8080`, `database_url = "postgres://…"`, `max_batch = 8`).
fn load_config_file() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // `hanlin train pretrain --config RUN.toml` names a training run's
    // settings, not the server's.
    if args
        .iter()
        .skip(1)
        .take_while(|a| *a != "--config" && !a.starts_with("--config="))
        .any(|a| a == "train")
    {
        return Ok(());
    }
    let from_flag = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config=").map(PathBuf::from))
        });
    let explicit = from_flag.or_else(|| std::env::var_os("HANLIN_CONFIG").map(PathBuf::from));
    let path = match &explicit {
        Some(p) => p.clone(),
        None => Store::default_home().join("config.toml"),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for (key, value) in table {
        let var = format!("HANLIN_{}", key.to_uppercase().replace('-', "_"));
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => bail!(
                "{}: {key} must be a string, number or boolean, not {other}",
                path.display()
            ),
        };
        if std::env::var_os(&var).is_none() {
            // SAFETY: called at start-up, before any other thread exists.
            unsafe { std::env::set_var(&var, value) };
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let store = Store::open(cli.home.clone().unwrap_or_else(Store::default_home))
        .context("opening the model store")?;
    let threads = cli.threads.unwrap_or_else(hanlin_engine::default_threads);
    match cli.cmd {
        Cmd::Chat { model, gen } => chat(&store, &model, threads, &gen),
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
        Cmd::Serve(args) => serve(&store, threads, args),
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
        } => {
            let m = load(&store, &model, threads)?;
            kb::ask(&store, threads, &m, &kbs, &question, json)
        }
        Cmd::Admin { db, cmd } => {
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
            gen_tokens,
            reps,
            batch,
            json,
            ..
        } => bench(
            &store,
            &model,
            threads,
            BenchSizes {
                n_prompt: prompt_tokens,
                n_gen: gen_tokens,
                batch,
            },
            reps,
            json,
        ),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
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
    resolve(store, &a.model)?;
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
            ..Default::default()
        },
        kb_dir: kb::root(store),
        feed_allow: a.feed_allow.clone(),
        signup: a.signup,
        allowed_hosts: a.allowed_hosts.clone(),
        trusted_proxies: a.trusted_proxies.clone(),
        metrics_token: a.metrics_token.clone(),
    };
    let store = Store::open(store.home()).context("opening the model store")?;
    runtime()?.block_on(async move {
        let state = hanlin_server::AppState::new(config, store).await?;
        hanlin_server::serve(state).await?;
        Ok(())
    })
}

async fn admin(url: &str, cmd: AdminCmd) -> Result<()> {
    use hanlin_accounts::{Db, NewKey, Plan, Role};
    let db = Db::connect(url)
        .await
        .with_context(|| format!("opening the database {url}"))?;
    match cmd {
        AdminCmd::Key {
            cmd:
                KeyCmd::Create {
                    user,
                    plan,
                    admin,
                    name,
                    models,
                    expires_days,
                },
        } => {
            let role = if admin { Role::Admin } else { Role::User };
            let u = db.ensure_user(&user, role, plan.as_deref()).await?;
            let opts = NewKey {
                name,
                models: (!models.is_empty()).then_some(models),
                expires_at: expires_days.map(|d| hanlin_accounts::now() + i64::from(d) * 86_400),
            };
            let (key, secret) = db.create_key(&u.id, &opts).await?;
            eprintln!(
                "created key {} for {} (plan {}, role {:?}); it is shown only once:",
                key.id, u.name, u.plan, u.role
            );
            println!("{secret}");
        }
        AdminCmd::Key {
            cmd: KeyCmd::List { user },
        } => {
            let uid = match user {
                Some(n) => Some(
                    db.user_by_name(&n)
                        .await?
                        .with_context(|| format!("no user {n}"))?
                        .id,
                ),
                None => None,
            };
            println!(
                "{:<22} {:<24} {:<12} {:<8} name",
                "id", "user", "prefix", "status"
            );
            let users = db.users().await?;
            for k in db.keys(uid.as_deref()).await? {
                let owner = users
                    .iter()
                    .find(|u| u.id == k.user_id)
                    .map_or("?", |u| u.name.as_str());
                let status = if k.revoked_at.is_some() {
                    "revoked"
                } else if k.expires_at.is_some_and(|t| t <= hanlin_accounts::now()) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<22} {:<24} {:<12} {:<8} {}",
                    k.id, owner, k.prefix, status, k.name
                );
            }
        }
        AdminCmd::Key {
            cmd: KeyCmd::Revoke { id },
        } => {
            db.revoke_key(&id).await?;
            println!("revoked {id}");
        }
        AdminCmd::User {
            cmd: UserCmd::Set { name, plan, admin },
        } => {
            let role = if admin { Role::Admin } else { Role::User };
            let u = db.ensure_user(&name, role, plan.as_deref()).await?;
            println!("{} {:?} plan {}", u.name, u.role, u.plan);
        }
        AdminCmd::User {
            cmd: UserCmd::Passwd { name },
        } => {
            use std::io::BufRead;
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            db.ensure_user(&name, Role::User, None).await?;
            db.set_password(&name, password).await?;
            println!("password set for {name}");
        }
        AdminCmd::User {
            cmd: UserCmd::Create { name, plan, admin },
        } => {
            use std::io::BufRead;
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            let role = if admin { Role::Admin } else { Role::User };
            if db.user_by_name(&name).await?.is_some() {
                anyhow::bail!("a user {name:?} exists already (use `hanlin admin user passwd`)");
            }
            let u = db
                .register(&name, password, role, hanlin_accounts::UserStatus::Active)
                .await?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(p) = plan {
                db.ensure_user(&u.name, role, Some(&p)).await?;
            }
            println!("created {} ({})", u.name, role.as_str());
        }
        AdminCmd::User {
            cmd: UserCmd::Approve { name },
        } => {
            let u = db
                .set_user_status(&name, hanlin_accounts::UserStatus::Active)
                .await?;
            println!("{} is active", u.name);
        }
        AdminCmd::User {
            cmd: UserCmd::Disable { name },
        } => {
            let u = db
                .set_user_status(&name, hanlin_accounts::UserStatus::Disabled)
                .await?;
            println!(
                "{} is disabled; their sessions ended and keys were revoked",
                u.name
            );
        }
        AdminCmd::User {
            cmd: UserCmd::Delete { name },
        } => {
            db.delete_user(&name).await?;
            println!("{name} deleted; their usage stays on record");
        }
        AdminCmd::User { cmd: UserCmd::List } => {
            for u in db.users().await? {
                println!(
                    "{:<24} {:<6} {:<10} {}",
                    u.name,
                    u.role.as_str(),
                    u.plan,
                    u.status.as_str()
                );
            }
        }
        AdminCmd::Plan { cmd: PlanCmd::List } => {
            println!(
                "{:<10} {:>6} {:>9} {:>11} {:>8} {:>8} models",
                "plan", "rpm", "tpm", "tpd", "context", "priority"
            );
            for p in db.plans().await? {
                println!(
                    "{:<10} {:>6} {:>9} {:>11} {:>8} {:>8} {}",
                    p.name,
                    p.requests_per_minute,
                    p.tokens_per_minute,
                    p.tokens_per_day,
                    p.max_context,
                    p.priority,
                    p.models.join(",")
                );
            }
        }
        AdminCmd::Plan {
            cmd:
                PlanCmd::Set {
                    name,
                    rpm,
                    tpm,
                    tpd,
                    max_context,
                    models,
                    priority,
                    max_n,
                },
        } => {
            let plan = Plan {
                name,
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                tokens_per_day: tpd,
                max_context,
                models: models.split(',').map(|m| m.trim().to_string()).collect(),
                priority,
                max_n,
            };
            db.put_plan(&plan).await?;
            println!("plan {} saved", plan.name);
        }
        AdminCmd::Usage { user, day, json } => {
            let rows = db.usage(user.as_deref(), day.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<10} {:<20} {:<22} {:>8} {:>10} {:>10} {:>10}",
                    "day", "user", "model", "requests", "prompt", "cached", "completion"
                );
                for r in rows {
                    println!(
                        "{:<10} {:<20} {:<22} {:>8} {:>10} {:>10} {:>10}",
                        r.day,
                        r.user,
                        r.model,
                        r.requests,
                        r.prompt_tokens,
                        r.cached_tokens,
                        r.completion_tokens
                    );
                }
            }
        }
    }
    Ok(())
}

/// A model argument: an existing file, a pulled model, or a catalog name (pulled now).
pub(crate) fn resolve(store: &Store, model: &str) -> Result<PathBuf> {
    let p = PathBuf::from(model);
    if p.is_file() || p.join("config.json").is_file() {
        return Ok(p);
    }
    if model.ends_with(".gguf")
        || model.contains(std::path::MAIN_SEPARATOR) && !model.starts_with("hf:")
    {
        bail!("model file {model} does not exist");
    }
    let name = match model.strip_prefix("hf:") {
        Some(spec) => hanlin_store::hf::HfFile::parse(spec)?.local_name(),
        None => model.to_string(),
    };
    if let Some(p) = store.path_of(&name)? {
        return Ok(p);
    }
    if model.starts_with("hf:") || catalog().iter().any(|e| e.name == model) {
        eprintln!("{model} is not in the store yet; fetching it…");
    }
    let m = store.pull(model, true)?;
    Ok(store.blob_path(&m.sha256))
}

pub(crate) fn load(store: &Store, model: &str, threads: usize) -> Result<Arc<LoadedModel>> {
    let path = resolve(store, model)?;
    LoadedModel::load(&path, threads).with_context(|| format!("loading {model}"))
}

fn chat(store: &Store, model: &str, threads: usize, gen: &GenArgs) -> Result<()> {
    let m = load(store, model, threads)?;
    let mut session = m.new_session(gen.ctx);
    let mut history: Vec<Message> = gen
        .system
        .iter()
        .map(|s| Message::new("system", s.as_str()))
        .collect();
    let params = gen.params();
    eprintln!(
        "Hanlin chat with {model}. Type a message; /clear starts over, /exit (or Ctrl-D) quits."
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!(">>> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" | "/bye" => break,
            "/clear" => {
                history.retain(|m| m.role == "system");
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let prompt = m.chat_prompt(&history)?;
        let g = match session.generate(&prompt, &params, |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
            true
        }) {
            Ok(g) => g,
            Err(e) => {
                history.pop();
                eprintln!("\nerror: {e}");
                continue;
            }
        };
        println!();
        if g.finish == FinishReason::ContextFull {
            eprintln!("(the context is full; /clear to start a new conversation)");
        }
        if gen.verbose {
            stats(&g);
        }
        history.push(Message::new("assistant", g.text));
    }
    Ok(())
}

/// How `hanlin run` turns its text into a prompt.
#[derive(Clone, Copy)]
enum Prompt {
    /// A user message in the model's chat template.
    Chat,
    /// As it is, special-token spellings as plain text.
    Raw,
    /// As it is, special-token spellings as control tokens.
    RawSpecial,
}

fn one_shot(
    store: &Store,
    model: &str,
    threads: usize,
    text: &str,
    mode: Prompt,
    gen: &GenArgs,
) -> Result<()> {
    let m = load(store, model, threads)?;
    let prompt = if let Prompt::RawSpecial = mode {
        m.tokenizer.encode(text, true)?
    } else if let Prompt::Raw = mode {
        m.tokenizer.encode_plain(text, true)?
    } else {
        let mut msgs: Vec<Message> = gen
            .system
            .iter()
            .map(|s| Message::new("system", s.as_str()))
            .collect();
        msgs.push(Message::new("user", text));
        m.chat_prompt(&msgs)?
    };
    let mut session = m.new_session(gen.ctx);
    let mut out = std::io::stdout();
    let g = session.generate(&prompt, &gen.params(), |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
        true
    })?;
    println!();
    if gen.verbose {
        stats(&g);
    }
    Ok(())
}

fn stats(g: &hanlin_engine::Generation) {
    let pf = g.prompt_tokens - g.cached_tokens;
    eprintln!(
        "[prompt {} tokens ({} cached) in {:.2}s = {:.1} tok/s; {} tokens in {:.2}s = {:.1} tok/s; finish {:?}]",
        g.prompt_tokens,
        g.cached_tokens,
        g.prefill_time.as_secs_f64(),
        pf as f64 / g.prefill_time.as_secs_f64().max(1e-9),
        g.tokens.len(),
        g.decode_time.as_secs_f64(),
        g.tokens.len() as f64 / g.decode_time.as_secs_f64().max(1e-9),
        g.finish
    );
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{bytes} B")
    }
}

fn list(store: &Store) -> Result<()> {
    let pulled = store.list()?;
    println!("{:<24} {:>10}  {:<16} SOURCE", "NAME", "SIZE", "SHA256");
    for m in &pulled {
        println!(
            "{:<24} {:>10}  {:<16} {}",
            m.name,
            human(m.size),
            &m.sha256[..12.min(m.sha256.len())],
            m.source
        );
    }
    if pulled.is_empty() {
        println!("(no models pulled yet)");
    }
    println!("\navailable to pull:");
    for e in catalog() {
        let mark = if pulled.iter().any(|m| m.name == e.name) {
            "*"
        } else {
            " "
        };
        let default = if e.name == DEFAULT_MODEL {
            " [default]"
        } else {
            ""
        };
        println!(" {mark} {:<22} {}{default}", e.name, e.description);
    }
    Ok(())
}

fn show(store: &Store, model: &str) -> Result<()> {
    let path = resolve(store, model)?;
    let f = hanlin_formats::GgufFile::open(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    let h = &f.header;
    println!("file         {}", path.display());
    println!(
        "format       GGUF v{}, {} tensors, {}",
        h.version,
        h.tensors.len(),
        human(f.bytes().len() as u64)
    );
    match hanlin_arch::ModelConfig::from_gguf(h) {
        Ok(c) => {
            let params: u64 = h.tensors.iter().map(|t| t.n_elements()).sum();
            println!(
                "architecture {} ({:.0}M parameters)",
                c.arch.name(),
                params as f64 / 1e6
            );
            println!(
                "shape        {} layers, d_model {}, heads {}/{} (kv), head_dim {}, ffn {}, vocab {}",
                c.n_layer, c.d_model, c.n_head, c.n_head_kv, c.head_dim, c.d_ff, c.vocab_size
            );
            println!(
                "context      {} tokens, rope base {}",
                c.context_length, c.rope_base
            );
            if let Some(m) = c.moe {
                println!(
                    "experts      {} ({} per token, ffn {})",
                    m.n_expert, m.n_expert_used, m.d_ff_expert
                );
            }
        }
        Err(e) => println!("architecture unsupported: {e}"),
    }
    let mut types: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in &h.tensors {
        let e = types.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.size as u64;
    }
    let q: Vec<String> = types
        .iter()
        .map(|(k, (n, b))| format!("{k}×{n} ({})", human(*b)))
        .collect();
    println!("tensors      {}", q.join(", "));
    println!(
        "tokenizer    {} (pre {}), {} tokens",
        h.get_str("tokenizer.ggml.model").unwrap_or("?"),
        h.get_str("tokenizer.ggml.pre").unwrap_or("-"),
        h.get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len())
            .unwrap_or(0)
    );
    for k in ["general.name", "general.license", "general.size_label"] {
        if let Some(v) = h.get(k) {
            println!("{:<12} {}", k.trim_start_matches("general."), v.summary());
        }
    }
    if let Some(t) = h.get_str("tokenizer.chat_template") {
        let first: String = t.lines().take(3).collect::<Vec<_>>().join(" ⏎ ");
        println!(
            "template     {} chars: {}…",
            t.len(),
            first.chars().take(100).collect::<String>()
        );
    }
    Ok(())
}

/// Multi-threaded read bandwidth over a 1 GiB buffer (median of 5 passes).
fn read_bandwidth(threads: usize, json: bool) -> Result<()> {
    let pool = hanlin_kernels::ThreadPool::new(threads);
    let n = (1usize << 30) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let chunk = 1 << 16;
    let mut rates = Vec::new();
    for _ in 0..5 {
        let total = std::sync::Mutex::new(0f32);
        let t = Instant::now();
        pool.for_chunks(n / chunk, 4, &|r| {
            let mut acc = [0f32; 16];
            for c in r {
                for b in buf[c * chunk..(c + 1) * chunk].chunks_exact(16) {
                    for (a, v) in acc.iter_mut().zip(b) {
                        *a += v;
                    }
                }
            }
            if let Ok(mut t) = total.lock() {
                *t += acc.iter().sum::<f32>();
            }
        });
        rates.push((n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
        std::hint::black_box(total);
    }
    let bw = median(rates);
    if json {
        println!(
            "{}",
            serde_json::json!({"read_gb_s": bw, "threads": threads})
        );
    } else {
        println!("read bandwidth {bw:.1} GB/s ({threads} threads)");
    }
    Ok(())
}

fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct BenchSizes {
    n_prompt: usize,
    n_gen: usize,
    batch: usize,
}

/// Aggregate decode rate of `batch` sequences stepped together: each gets a
/// different 64-token prompt, then `n_gen` steps feed every sequence one
/// token through one `forward_batch`.
fn batched_decode(m: &LoadedModel, batch: usize, n_gen: usize, vocab: u32) -> Result<f64> {
    use hanlin_engine::{BatchSeq, KvCache, Logits};
    let cfg = &m.model.cfg;
    let mut caches: Vec<KvCache> = (0..batch)
        .map(|_| KvCache::new(cfg.n_layer, cfg.kv_dim(), 64 + n_gen + 1))
        .collect();
    // Step 0 feeds each sequence a different prompt (not timed); each later
    // step one token each.
    let mut inputs: Vec<Vec<u32>> = (0..batch as u32)
        .map(|b| {
            (0..64u32)
                .map(|i| (i * 7919 + b * 104_729 + 13) % vocab.min(30000))
                .collect()
        })
        .collect();
    let mut t = Instant::now();
    for step in 0..=n_gen {
        if step == 1 {
            t = Instant::now();
        }
        let mut batch_seqs: Vec<BatchSeq> = caches
            .iter_mut()
            .zip(&inputs)
            .map(|(cache, tokens)| BatchSeq {
                tokens,
                cache,
                want: Logits::Last,
            })
            .collect();
        inputs = m
            .model
            .forward_batch(&m.pool, &mut batch_seqs)?
            .iter()
            .map(|l| vec![hanlin_engine::sampler::argmax(l)])
            .collect();
    }
    Ok((batch * n_gen) as f64 / t.elapsed().as_secs_f64())
}

fn bench(
    store: &Store,
    model: &str,
    threads: usize,
    sizes: BenchSizes,
    reps: usize,
    json: bool,
) -> Result<()> {
    let BenchSizes {
        n_prompt,
        n_gen,
        batch,
    } = sizes;
    let m = load(store, model, threads)?;
    let vocab = m.model.cfg.vocab_size as u32;
    // A fixed, ordinary token sequence (like llama-bench, content does not matter for speed).
    let prompt: Vec<u32> = (0..n_prompt as u32)
        .map(|i| (i * 7919 + 13) % vocab.min(30000))
        .collect();
    let reps = reps.max(1);
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    let mut bg = Vec::new();
    for _ in 0..reps {
        let mut s = m.new_session(n_prompt + n_gen + 1);
        if n_prompt > 0 {
            let t = Instant::now();
            s.prefill(&prompt)?;
            pp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
        }
        if n_gen > 0 {
            let mut s = m.new_session(n_gen + 2);
            s.prefill(&[prompt.first().copied().unwrap_or(1)])?;
            let t = Instant::now();
            let mut tok = 1u32;
            for _ in 0..n_gen {
                let logits = s.step(tok)?;
                tok = hanlin_engine::sampler::argmax(&logits);
            }
            tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
        }
        if batch > 0 && n_gen > 0 {
            bg.push(batched_decode(&m, batch, n_gen, vocab)?);
        }
    }
    let pp = if pp.is_empty() { 0.0 } else { median(pp) };
    let tg = if tg.is_empty() { 0.0 } else { median(tg) };
    let bg = if bg.is_empty() { 0.0 } else { median(bg) };
    let rss = peak_rss_bytes().unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({"model": model, "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen,
                "prefill_tok_s": pp, "decode_tok_s": tg, "batch": batch,
                "batched_decode_tok_s": bg, "peak_rss_bytes": rss,
                "simd": format!("{:?}", hanlin_engine::simd_level())})
        );
    } else {
        println!(
            "model    {model} ({threads} threads, {:?})",
            hanlin_engine::simd_level()
        );
        println!("prefill  {pp:8.1} tok/s  ({n_prompt} tokens, median of {reps})");
        println!("decode   {tg:8.1} tok/s  ({n_gen} tokens, median of {reps})");
        if batch > 0 {
            println!(
                "batched  {bg:8.1} tok/s  ({batch} sequences × {n_gen} tokens, aggregate, {:.2}× one sequence)",
                bg / tg.max(f64::MIN_POSITIVE)
            );
        }
        println!("peak RSS {}", human(rss));
    }
    Ok(())
}
