//! `hanlin kb …` (knowledge bases under `$HANLIN_HOME/kb/`) and
//! `hanlin ask` (a grounded answer with checked citations).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use hanlin_embed::Embedders;
use hanlin_engine::speculative::{PromptLookup, Proposer};
use hanlin_engine::{GenerateParams, LoadedModel, SamplerConfig};
use hanlin_search::answer;
use hanlin_search::dense::Embedder;
use hanlin_search::index::KbConfig;
use hanlin_search::isolate::{extract_isolated, ChildLimits, Isolation};
use hanlin_search::{extract, feed, kb_dir, KnowledgeBase, Mode, Passage};
use hanlin_store::Store;
use hanlin_tokenizer::Message;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Subcommand)]
pub enum KbCmd {
    /// Create an empty knowledge base (hybrid search: BM25 + multilingual-e5-small vectors)
    Create {
        name: String,
        /// Embedding model for dense retrieval (an encoder, or a chat model's pooled states)
        #[arg(long, default_value = hanlin_store::E5_MODEL)]
        embedder: String,
        /// Full-text (BM25) search only, no vectors
        #[arg(long, conflicts_with = "embedder")]
        no_dense: bool,
    },
    /// Add files and directories (.txt .md .html .pdf .docx .json .jsonl)
    Add {
        name: String,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The servers' PostgreSQL database: the documents also go to its
        /// knowledge-base log, and every replica indexes them
        #[arg(long, env = "HANLIN_DATABASE_URL")]
        database_url: Option<String>,
    },
    /// List knowledge bases
    List,
    /// Show the passages a query retrieves
    Search {
        name: String,
        query: String,
        #[arg(short, long, default_value_t = 5)]
        k: usize,
        /// bm25, dense or hybrid (both, fused)
        #[arg(long, default_value = "hybrid")]
        mode: Mode,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the index from the stored documents (after it was deleted or damaged)
    Rebuild { name: String },
    /// Delete a knowledge base
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum FeedCmd {
    /// Poll an RSS/Atom feed into knowledge base NAME (created if missing);
    /// polls it once now
    Add {
        name: String,
        url: String,
        /// Poll interval (30s, 10m, 1h, …)
        #[arg(long, default_value = "10m")]
        every: String,
    },
    /// List feeds with the state of their polling
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Stop polling a feed (its documents stay)
    Rm { name: String, url: String },
    /// Poll feeds that are due now (all with --now), e.g. from cron when no server runs
    Poll {
        /// Only this knowledge base's feeds
        name: Option<String>,
        #[arg(long)]
        now: bool,
    },
}

/// Which hosts feeds may be fetched from: public addresses, and those in
/// `$HANLIN_FEED_ALLOW` (comma-separated host names or IP addresses; the
/// same setting as `hanlin serve --feed-allow`).
pub fn feed_policy() -> feed::FetchPolicy {
    let from_env: Option<Vec<String>> = std::env::var("HANLIN_FEED_ALLOW").ok().map(|v| {
        v.split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(String::from)
            .collect()
    });
    feed::FetchPolicy::allowing(
        from_env
            .or_else(|| FILE_SETTINGS.get().and_then(|s| s.1.clone()))
            .unwrap_or_default(),
    )
}

/// `kb_dir` and `feed_allow` from the settings file, for the commands that
/// are not `serve`.
static FILE_SETTINGS: std::sync::OnceLock<(Option<PathBuf>, Option<Vec<String>>)> =
    std::sync::OnceLock::new();

pub fn set_file_settings(kb_dir: Option<PathBuf>, feed_allow: Option<Vec<String>>) {
    let _ = FILE_SETTINGS.set((kb_dir, feed_allow));
}

/// Where knowledge bases live: `$HANLIN_KB_DIR`, else `kb_dir` in the
/// settings file, else `kb/` in the store.
pub fn root(store: &Store) -> PathBuf {
    std::env::var_os("HANLIN_KB_DIR")
        .map(PathBuf::from)
        .or_else(|| FILE_SETTINGS.get().and_then(|s| s.0.clone()))
        .unwrap_or_else(|| store.home().join("kb"))
}

/// A knowledge base's settings as the log carries them.
fn kb_config(kb: &KnowledgeBase) -> Option<String> {
    serde_json::to_string(kb.config()).ok()
}

fn open(store: &Store, name: &str) -> Result<KnowledgeBase> {
    Ok(KnowledgeBase::open(&kb_dir(&root(store), name)?)?)
}

/// The embedding models of this process (loaded and pulled on first use).
fn embedders(store: &Store, threads: usize) -> Result<Embedders> {
    Ok(Embedders::new(Store::open(store.home())?, threads))
}

/// The embedder of `kb` (None for BM25-only knowledge bases).
fn embedder_of(kb: &KnowledgeBase, e: &Embedders) -> Result<Option<Arc<dyn Embedder>>> {
    match &kb.config().embedder {
        None => Ok(None),
        Some(m) => Ok(Some(e.get(m).map_err(|err| {
            anyhow::anyhow!("loading the embedding model {m}: {err}")
        })?)),
    }
}

/// An embedder that advances a progress bar by the texts it embeds.
struct Counting<'a> {
    inner: &'a dyn Embedder,
    pb: &'a indicatif::ProgressBar,
}

impl Embedder for Counting<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn embed(&self, texts: &[&str], query: bool) -> Result<Vec<Vec<f32>>, String> {
        let r = self.inner.embed(texts, query);
        self.pb.inc(texts.len() as u64);
        r
    }
}

fn spinner(msg: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} {pos} passages {elapsed} ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Passages for `query` from `kbs`, fused ([`hanlin_search::search_all`]).
fn retrieve(
    kbs: &[KnowledgeBase],
    e: &Embedders,
    query: &str,
    k: usize,
    mode: Mode,
) -> Result<Vec<Passage>> {
    Ok(hanlin_search::search_all(
        kbs,
        query,
        k,
        hanlin_accounts::now(),
        mode,
        &mut |model, text| e.query(model, text),
    )?)
}

fn bar(len: u64, msg: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

pub fn run(store: &Store, threads: usize, cmd: KbCmd) -> Result<()> {
    let emb = embedders(store, threads)?;
    match cmd {
        KbCmd::Create {
            name,
            embedder,
            no_dense,
        } => {
            let dir = kb_dir(&root(store), &name)?;
            let embedder = (!no_dense).then_some(embedder);
            if let Some(m) = &embedder {
                // Fetch (and check) the model now rather than at the first `add`.
                emb.get(m)
                    .map_err(|e| anyhow::anyhow!("embedding model {m}: {e}"))?;
            }
            KnowledgeBase::create_with(
                &dir,
                KbConfig {
                    embedder: embedder.clone(),
                },
            )?;
            let how = match &embedder {
                Some(m) => format!("BM25 + {m} vectors"),
                None => "BM25 only".into(),
            };
            println!("created knowledge base {name} ({how}; {})", dir.display());
        }
        KbCmd::Add {
            name,
            paths,
            database_url,
        } => {
            let mut kb = open(store, &name)?;
            let (files, mut skipped) = extract::walk(&paths);
            let pb = bar(files.len() as u64, "reading");
            let mut docs = Vec::new();
            // Each file is read in a child process: a hostile PDF that
            // crashes its parser costs that file, not the whole run.
            let how = Isolation::Child(
                ChildLimits::this_executable().context("finding this executable")?,
            );
            for f in &files {
                match extract_isolated(f, &how) {
                    Ok(d) => docs.extend(d),
                    Err(e) => skipped.push(e),
                }
                pb.inc(1);
            }
            pb.finish_and_clear();
            let embedder = embedder_of(&kb, &emb)?;
            let pb = bar(docs.len() as u64, "indexing");
            let sp = match embedder {
                Some(_) => spinner("embedding"),
                None => indicatif::ProgressBar::hidden(),
            };
            let counting = embedder.as_deref().map(|inner| Counting { inner, pb: &sp });
            let logged = database_url
                .as_deref()
                .filter(|u| u.starts_with("postgres"))
                .map(|u| (u.to_string(), docs.clone()));
            let r = kb.add_with(docs, counting.as_ref().map(|c| c as &dyn Embedder), |n| {
                pb.set_position(n as u64)
            })?;
            pb.finish_and_clear();
            sp.finish_and_clear();
            if let Some((url, docs)) = logged.filter(|_| r.added > 0) {
                let body = serde_json::to_string(&docs)?;
                crate::runtime()?.block_on(async {
                    let db = hanlin_accounts::Db::connect(&url).await?;
                    if let Some(config) = kb_config(&kb) {
                        // Replicas that do not have the knowledge base yet
                        // create it first (a no-op where it exists).
                        db.log_kb_change(&name, "create", &config).await?;
                    }
                    db.log_kb_change(&name, "add", &body).await?;
                    anyhow::Ok(())
                })?;
                println!("{name}: sent to the replicas on the database");
            }
            for e in &skipped {
                eprintln!("skipped {e}");
            }
            println!(
                "{name}: added {} documents ({} passages); {} duplicates skipped; {} files skipped",
                r.added,
                r.passages,
                r.duplicates,
                skipped.len()
            );
        }
        KbCmd::List => {
            for name in hanlin_search::list(&root(store)) {
                match open(store, &name) {
                    Ok(kb) => println!(
                        "{name:<24} {:>6} documents {:>8} passages  {}",
                        kb.documents()?.len(),
                        kb.passages(),
                        match &kb.config().embedder {
                            Some(m) => format!("{} vectors ({m})", kb.vectors()),
                            None => "BM25 only".into(),
                        }
                    ),
                    Err(e) => println!("{name:<24} unusable: {e}"),
                }
            }
        }
        KbCmd::Search {
            name,
            query,
            k,
            mode,
            json,
        } => {
            let kb = open(store, &name)?;
            let hits = retrieve(std::slice::from_ref(&kb), &emb, &query, k, mode)?;
            if json {
                let v: Vec<_> = hits
                    .iter()
                    .map(|p| json!({"kb": p.kb, "doc_id": p.doc_id, "chunk": p.chunk, "title": p.title, "source": p.source, "published": p.published, "text": p.text}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
                return Ok(());
            }
            for (i, p) in hits.iter().enumerate() {
                println!(
                    "[{}] {:.2} {} — {}\n    {}",
                    i + 1,
                    p.score,
                    p.title,
                    p.source,
                    p.text
                );
            }
        }
        KbCmd::Rebuild { name } => {
            let dir = kb_dir(&root(store), &name)?;
            let config: KbConfig = std::fs::read(dir.join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let embedder = match &config.embedder {
                Some(m) => Some(
                    emb.get(m)
                        .map_err(|e| anyhow::anyhow!("loading the embedding model {m}: {e}"))?,
                ),
                None => None,
            };
            let pb = bar(0, "rebuilding");
            let sp = match embedder {
                Some(_) => spinner("embedding"),
                None => indicatif::ProgressBar::hidden(),
            };
            let counting = embedder.as_deref().map(|inner| Counting { inner, pb: &sp });
            let kb = KnowledgeBase::rebuild_with(
                &dir,
                counting.as_ref().map(|c| c as &dyn Embedder),
                |n, total| {
                    pb.set_length(total as u64);
                    pb.set_position(n as u64);
                },
            )?;
            pb.finish_and_clear();
            sp.finish_and_clear();
            println!(
                "{name}: rebuilt, {} passages, {} vectors",
                kb.passages(),
                kb.vectors()
            );
        }
        KbCmd::Rm { name } => {
            let dir = kb_dir(&root(store), &name)?;
            if !dir.join("docs.jsonl").exists() {
                bail!("no knowledge base {name}");
            }
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            println!("removed knowledge base {name}");
        }
    }
    Ok(())
}

/// Poll due feeds (of `only`, or all), adding their entries; prints one
/// line per feed and fails when every polled feed failed.
fn poll(store: &Store, threads: usize, only: Option<&str>, force: bool) -> Result<()> {
    let root = root(store);
    let emb = embedders(store, threads)?;
    let outcomes = feed::poll_due(
        &root,
        only,
        hanlin_accounts::now(),
        force,
        Duration::from_secs(30),
        &feed_policy(),
        |name, docs| {
            let mut kb = KnowledgeBase::open(&kb_dir(&root, name)?)?;
            let embedder = embedder_of(&kb, &emb)
                .map_err(|e| hanlin_search::SearchError::Embedder(e.to_string()))?;
            kb.add_with(docs, embedder.as_deref(), |_| {})
        },
    );
    for o in &outcomes {
        match &o.error {
            None => println!("{}: {} new documents from {}", o.kb, o.added, o.url),
            Some(e) => eprintln!("{}: {e} (will retry with back-off)", o.kb),
        }
    }
    if !outcomes.is_empty() && outcomes.iter().all(|o| o.error.is_some()) {
        bail!("every feed polled failed");
    }
    Ok(())
}

fn ago(t: Option<i64>, now: i64) -> String {
    match t {
        None => "never".into(),
        Some(t) => format!("{}s ago", (now - t).max(0)),
    }
}

pub fn feed(store: &Store, threads: usize, cmd: FeedCmd) -> Result<()> {
    let root = root(store);
    match cmd {
        FeedCmd::Add { name, url, every } => {
            let dir = kb_dir(&root, &name)?;
            if !dir.join("docs.jsonl").exists() {
                KnowledgeBase::create_with(
                    &dir,
                    KbConfig {
                        embedder: Some(hanlin_store::E5_MODEL.into()),
                    },
                )?;
                println!("created knowledge base {name}");
            }
            let every = feed::parse_every(&every)?;
            feed::add(&dir, feed::Feed::new(&url, every, hanlin_accounts::now())?)?;
            println!("{name}: polling {url} every {}", humantime_secs(every));
            poll(store, threads, Some(&name), false)?;
        }
        FeedCmd::List { json } => {
            let now = hanlin_accounts::now();
            let mut all = Vec::new();
            for name in hanlin_search::list(&root) {
                for f in feed::load(&root.join(&name))? {
                    all.push((name.clone(), f));
                }
            }
            if json {
                let v: Vec<_> = all
                    .iter()
                    .map(|(kb, f)| json!({"kb": kb, "feed": f}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
                return Ok(());
            }
            for (kb, f) in all {
                let state = match &f.last_error {
                    Some(e) => format!("FAILING ×{}: {e}", f.failures),
                    None => "ok".into(),
                };
                println!(
                    "{kb:<16} {}  every {}  last ok {}  {} documents  next in {}s  {state}",
                    f.url,
                    humantime_secs(f.every),
                    ago(f.last_ok, now),
                    f.items_added,
                    (f.next_at - now).max(0),
                );
            }
        }
        FeedCmd::Rm { name, url } => {
            if !feed::remove(&kb_dir(&root, &name)?, &url)? {
                bail!("{name} has no feed {url}");
            }
            println!("{name}: no longer polling {url}");
        }
        FeedCmd::Poll { name, now } => poll(store, threads, name.as_deref(), now)?,
    }
    Ok(())
}

fn humantime_secs(s: u64) -> String {
    humantime::format_duration(Duration::from_secs(s)).to_string()
}

/// How `hanlin ask` answers and reports.
pub struct How {
    /// One JSON object instead of text.
    pub json: bool,
    /// Prompt lookup (speculative decoding from the passages).
    pub lookup: bool,
    /// Timing statistics on stderr.
    pub verbose: bool,
}

/// Answer `question` from `passages` with `model` (greedy), with prompt
/// lookup when `lookup` (the same answer: greedy tokens do not depend on
/// the guesses); see [`answer::plan`] and [`answer::finish`]. The
/// generation's statistics come back too, unless the question was declined
/// without one.
pub fn answer(
    model: &Arc<LoadedModel>,
    question: &str,
    passages: Vec<Passage>,
    lookup: bool,
) -> Result<(answer::Grounded, Option<hanlin_engine::Generation>)> {
    let (system, user, passages) = match answer::plan(question, passages, hanlin_accounts::now()) {
        answer::Plan::Decline(g) => return Ok((g, None)),
        answer::Plan::Generate {
            system,
            user,
            passages,
        } => (system, user, passages),
    };
    tracing::debug!("grounded prompt:\n{system}\n---\n{user}");
    let prompt =
        model.chat_prompt(&[Message::new("system", system), Message::new("user", user)])?;
    let mut session = model.new_session(prompt.len() + 400);
    let params = GenerateParams {
        max_tokens: 300,
        sampler: SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut guess = lookup.then(PromptLookup::default);
    let proposer = guess.as_mut().map(|p| p as &mut dyn Proposer);
    let g = session.generate_with(&prompt, &params, proposer, |_| true)?;
    Ok((answer::finish(question, &g.text, passages), Some(g)))
}

pub fn ask(
    store: &Store,
    threads: usize,
    model: &Arc<LoadedModel>,
    kbs: &[String],
    question: &str,
    how: How,
) -> Result<()> {
    if kbs.is_empty() {
        bail!("name at least one knowledge base with --kb NAME");
    }
    let opened = kbs
        .iter()
        .map(|n| open(store, n))
        .collect::<Result<Vec<_>>>()?;
    let emb = embedders(store, threads)?;
    let passages = retrieve(&opened, &emb, question, 5, Mode::Hybrid)?;
    let retrieved: Vec<_> = passages
        .iter()
        .map(|p| json!({"kb": p.kb, "title": p.title, "doc_id": p.doc_id, "score": p.score}))
        .collect();
    let (a, g) = answer(model, question, passages, how.lookup)?;
    if let (true, Some(g)) = (how.verbose, &g) {
        crate::chat::stats(g);
    }
    let cited = a.checked.cited();
    if how.json {
        let sources: Vec<_> = cited
            .iter()
            .filter_map(|n| a.sources.get(n - 1).map(|p| (n, p)))
            .map(|(n, p)| json!({"n": n, "kb": p.kb, "title": p.title, "source": p.source, "published": p.published, "doc_id": p.doc_id, "passage": p.text}))
            .collect();
        println!(
            "{}",
            json!({"question": question, "answer": a.checked.text, "answered": a.answered, "sources": sources, "citations": a.checked.citations, "retrieved": retrieved})
        );
        return Ok(());
    }
    println!("{}", a.checked.text);
    if !cited.is_empty() {
        println!();
        for n in cited {
            if let Some(p) = a.sources.get(n - 1) {
                let when = p
                    .published
                    .map(|t| format!(" ({})", answer::date(t)))
                    .unwrap_or_default();
                println!("[{n}] {}{when} — {}", p.title, p.source);
                let excerpt: String = p.text.chars().take(160).collect();
                println!("    {excerpt}");
            }
        }
    }
    Ok(())
}
