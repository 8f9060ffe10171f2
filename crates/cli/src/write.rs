//! `hanlin write`: articles from rows of data (`hanlin_write`), generated
//! by the local engine (continuous batching: several articles at once) or
//! by a running server's chat API.

use super::*;
use hanlin_engine::{Event, Job, Scheduler, SchedulerConfig};
use hanlin_write::{Checker, Entry, Generated, Generator, Plan, Status, Template};
use serde_json::json;
use std::sync::mpsc;

#[derive(Args)]
pub(crate) struct WriteArgs {
    /// The rows: a .csv (header line), .jsonl or .json (array of objects) file
    data: PathBuf,
    /// The minijinja template that turns a row into facts and a brief (it
    /// sees the row's fields, `lang` and `style`)
    #[arg(long)]
    template: PathBuf,
    /// Languages; one article per row in each
    #[arg(long, value_delimiter = ',', default_value = "zh,en")]
    lang: Vec<String>,
    /// The style, passed to the template: news, report, product …
    #[arg(long, default_value = "news")]
    style: String,
    /// Output directory: <lang>/<id>.md, flagged/, index.jsonl,
    /// report.json. A second run with the same directory resumes.
    #[arg(long, short = 'o', default_value = "articles")]
    out: PathBuf,
    /// The field that names a row's articles (default: `id`, else the row number)
    #[arg(long)]
    id_field: Option<String>,
    /// Only the first N rows
    #[arg(long)]
    limit: Option<usize>,
    /// Model (the local engine's; with --url, the server's model name)
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Write through a running Hanlin (or any OpenAI-compatible) server at
    /// this address instead of loading the model here; the key is
    /// $HANLIN_API_KEY
    #[arg(long)]
    url: Option<String>,
    /// Articles written at once (batched together by the engine)
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Drafts per article at most: one, then regenerations while the fact
    /// check fails; then the last is flagged
    #[arg(long, default_value_t = 5)]
    attempts: usize,
    #[arg(long, default_value_t = 400)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Seed (same seed, same articles)
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The local engine: a scheduler with one slot per parallel article.
struct Local {
    sched: Scheduler,
    max_tokens: usize,
    temperature: f32,
}

impl Generator for Local {
    fn generate(&self, messages: &[Message], seed: u64) -> Result<Generated, String> {
        let prompt = self
            .sched
            .model
            .chat_prompt(messages)
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let params = GenerateParams {
            max_tokens: self.max_tokens,
            sampler: SamplerConfig {
                temperature: self.temperature,
                seed,
                ..Default::default()
            },
            ..Default::default()
        };
        self.sched
            .submit(Job {
                prompt,
                params,
                priority: 0,
                embed: false,
                constraint: None,
                sink: Box::new(move |e| tx.send(e).is_ok()),
            })
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        for event in rx {
            match event {
                Event::Token { text: t, .. } => text.push_str(&t),
                Event::Done {
                    prompt_tokens,
                    completion_tokens,
                    ..
                } => {
                    return Ok(Generated {
                        text,
                        prompt_tokens,
                        completion_tokens,
                    })
                }
                Event::Failed(e) => return Err(e),
                _ => {}
            }
        }
        Err("the engine stopped".into())
    }
}

/// A server's chat API.
struct Remote {
    api: batch::Api,
    model: String,
    max_tokens: usize,
    temperature: f32,
}

impl Generator for Remote {
    fn generate(&self, messages: &[Message], seed: u64) -> Result<Generated, String> {
        let body = json!({
            "model": self.model,
            "messages": messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": seed % (1 << 53),
        });
        let r = self
            .api
            .post("/v1/chat/completions", body)
            .map_err(|e| format!("{e:#}"))?;
        let text = r["choices"][0]["message"]["content"]
            .as_str()
            .ok_or("the answer has no message")?
            .to_string();
        let n = |k: &str| r["usage"][k].as_u64().unwrap_or(0) as usize;
        Ok(Generated {
            text,
            prompt_tokens: n("prompt_tokens"),
            completion_tokens: n("completion_tokens"),
        })
    }
}

/// A progress bar with the articles' ETA; flagged and failed ones are
/// named above it.
struct Bar(indicatif::ProgressBar);

impl hanlin_write::run::Progress for Bar {
    fn start(&self, todo: usize, done: usize) {
        self.0.set_length(todo as u64);
        if done > 0 {
            self.0
                .suspend(|| eprintln!("resuming: {done} articles already written"));
        }
    }

    fn article(&self, e: &Entry) {
        match e.status {
            Status::Passed => {}
            Status::Flagged => self
                .0
                .suspend(|| eprintln!("flagged {} [{}]: {}", e.id, e.lang, e.problems.join("; "))),
            Status::Error => self.0.suspend(|| {
                eprintln!(
                    "failed {} [{}]: {}",
                    e.id,
                    e.lang,
                    e.error.as_deref().unwrap_or("")
                )
            }),
        }
        self.0.inc(1);
    }
}

pub(crate) fn run(store: &Store, threads: usize, a: WriteArgs) -> Result<()> {
    let mut rows = hanlin_write::rows::read(&a.data, a.id_field.as_deref())?;
    if let Some(n) = a.limit {
        rows.truncate(n);
    }
    let source = std::fs::read_to_string(&a.template)
        .with_context(|| format!("reading {}", a.template.display()))?;
    let template = Template::new(&source)?;
    let checker = Checker::new(&rows);
    let parallel = a.parallel.clamp(1, 64);
    let generator: Box<dyn Generator> = match &a.url {
        Some(url) => Box::new(Remote {
            api: batch::Api::new(
                url.clone(),
                std::env::var("HANLIN_API_KEY").context("--url needs $HANLIN_API_KEY")?,
            ),
            model: a.model.clone(),
            max_tokens: a.max_tokens,
            temperature: a.temperature,
        }),
        None => {
            let m = load(store, &a.model, threads)?;
            Box::new(Local {
                sched: Scheduler::start(
                    m,
                    SchedulerConfig {
                        max_batch: parallel,
                        max_queue: parallel * 2,
                        ctx: 4096,
                        reserved_slots: 0,
                        ..Default::default()
                    },
                ),
                max_tokens: a.max_tokens,
                temperature: a.temperature,
            })
        }
    };
    let plan = Plan {
        rows: &rows,
        template: &template,
        langs: a.lang.clone(),
        style: a.style.clone(),
        out: a.out.clone(),
        attempts: a.attempts,
        parallel,
        seed: a.seed,
    };
    let progress = Bar(batch::progress_bar(
        "[{bar:30}] {pos}/{len} articles, {elapsed} (ETA {eta})",
    ));
    let r = hanlin_write::write(&plan, generator.as_ref(), &checker, &progress)?;
    progress.0.finish_and_clear();
    println!(
        "{} articles in {}: {} passed the fact check ({:.1}%; {:.1}% on the first draft, {} redrafts), {} flagged (in flagged/), {} failed",
        r.articles,
        a.out.display(),
        r.passed,
        r.pass_rate * 100.0,
        r.first_try_rate * 100.0,
        r.regenerated,
        r.flagged,
        r.errors
    );
    println!(
        "this run: {} written, {} already there, {:.0} s; tokens: {} prompt, {} generated",
        r.written_now, r.resumed, r.seconds, r.prompt_tokens, r.completion_tokens
    );
    if r.errors > 0 {
        bail!(
            "{} articles could not be written (see above); run again to retry them",
            r.errors
        );
    }
    Ok(())
}
