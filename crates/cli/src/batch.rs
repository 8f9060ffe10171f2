//! `hanlin batch`: the Batch API of a running server, from the shell —
//! submit a JSONL file, watch it (a progress bar), cancel it, fetch its
//! results. It speaks the OpenAI API over HTTP with an API key, like any
//! other client.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct BatchArgs {
    /// The server
    #[arg(long, env = "HANLIN_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key
    #[arg(long, env = "HANLIN_API_KEY", hide_env_values = true)]
    key: String,
    #[command(subcommand)]
    cmd: BatchCmd,
}

#[derive(Subcommand)]
enum BatchCmd {
    /// Upload a JSONL file of requests and start a batch; prints its id
    Submit {
        file: PathBuf,
        /// /v1/chat/completions, /v1/completions or /v1/embeddings
        #[arg(long, default_value = "/v1/chat/completions")]
        endpoint: String,
        /// How long it may take: 24h, or N s/m/h
        #[arg(long, default_value = "24h")]
        window: String,
        /// Wait for it, with a progress bar, and print where its results are
        #[arg(long)]
        wait: bool,
    },
    /// A batch's status and counts (--wait: follow it to the end)
    Status {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    /// Stop a batch: running lines finish, the others do not start
    Cancel { id: String },
    /// Write a finished batch's results (JSONL) to a file or stdout
    Results {
        id: String,
        /// Where the answers go (default: stdout)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where the failed lines go (default: not written)
        #[arg(long)]
        errors: Option<PathBuf>,
    },
    /// Your batches, newest first
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

pub(crate) struct Api {
    base: String,
    key: String,
    agent: ureq::Agent,
}

impl Api {
    pub(crate) fn new(base: String, key: String) -> Self {
        Self {
            base,
            key,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .build(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.trim_end_matches('/'))
    }

    fn read(r: Result<ureq::Response, ureq::Error>) -> Result<ureq::Response> {
        match r {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r
                    .into_string()
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or(Value::Null);
                let msg = body["error"]["message"].as_str().unwrap_or("(no message)");
                bail!("the server answered {code}: {msg}")
            }
            Err(e) => Err(e).context("reaching the server"),
        }
    }

    fn json(r: Result<ureq::Response, ureq::Error>) -> Result<Value> {
        let text = Self::read(r)?.into_string().context("reading the answer")?;
        serde_json::from_str(&text).context("the answer is not JSON")
    }

    fn get(&self, path: &str) -> Result<Value> {
        let r = self
            .agent
            .get(&self.url(path))
            .set("Authorization", &format!("Bearer {}", self.key))
            .call();
        Self::json(r)
    }

    pub(crate) fn post(&self, path: &str, body: Value) -> Result<Value> {
        let r = self
            .agent
            .post(&self.url(path))
            .set("Authorization", &format!("Bearer {}", self.key))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        Self::json(r)
    }

    fn upload(&self, name: &str, bytes: &[u8]) -> Result<Value> {
        let boundary = format!("hanlin-{}", hanlin_accounts::random_token(16));
        let mut body = Vec::with_capacity(bytes.len() + 512);
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\nContent-Type: application/jsonl\r\n\r\n",
            name.replace(['"', '\r', '\n'], "_")
        )?;
        body.extend_from_slice(bytes);
        write!(body, "\r\n--{boundary}--\r\n")?;
        let r = self
            .agent
            .post(&self.url("/v1/files"))
            .set("Authorization", &format!("Bearer {}", self.key))
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .send_bytes(&body);
        Self::json(r)
    }

    fn download(&self, file_id: &str, to: &mut dyn Write) -> Result<()> {
        let r = self
            .agent
            .get(&self.url(&format!("/v1/files/{file_id}/content")))
            .set("Authorization", &format!("Bearer {}", self.key))
            .call();
        std::io::copy(&mut Self::read(r)?.into_reader(), to)?;
        Ok(())
    }
}

fn summary(b: &Value) -> String {
    let c = &b["request_counts"];
    format!(
        "{} {}: {} of {} done, {} failed",
        b["id"].as_str().unwrap_or("?"),
        b["status"].as_str().unwrap_or("?"),
        c["completed"].as_i64().unwrap_or(0) + c["failed"].as_i64().unwrap_or(0),
        c["total"].as_i64().unwrap_or(0),
        c["failed"].as_i64().unwrap_or(0)
    )
}

fn running(b: &Value) -> bool {
    matches!(
        b["status"].as_str(),
        Some("validating" | "in_progress" | "finalizing" | "cancelling")
    )
}

/// A bar of work items with its ETA, drawn with `template` (the bar style
/// `hanlin batch` and `hanlin write` share).
pub(crate) fn progress_bar(template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Follow a batch with a progress bar until it ends.
fn follow(api: &Api, id: &str) -> Result<Value> {
    let bar = progress_bar("{spinner} {msg} [{bar:30}] {pos}/{len} lines, {elapsed} (ETA {eta})");
    loop {
        let b = api.get(&format!("/v1/batches/{id}"))?;
        let c = &b["request_counts"];
        bar.set_length(c["total"].as_u64().unwrap_or(0));
        bar.set_position(c["completed"].as_u64().unwrap_or(0) + c["failed"].as_u64().unwrap_or(0));
        bar.set_message(b["status"].as_str().unwrap_or("?").to_string());
        if !running(&b) {
            bar.finish_and_clear();
            return Ok(b);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn ended(b: &Value) {
    println!("{}", summary(b));
    if let Some(o) = b["output_file_id"].as_str() {
        println!("answers: {o}");
    }
    if let Some(e) = b["error_file_id"].as_str() {
        println!("failed lines: {e}");
    }
    if let Some(errs) = b["errors"]["data"].as_array() {
        for e in errs {
            println!(
                "line {}: {} ({})",
                e["line"],
                e["message"].as_str().unwrap_or(""),
                e["code"].as_str().unwrap_or("")
            );
        }
    }
}

pub(crate) fn run(a: BatchArgs) -> Result<()> {
    let api = Api::new(a.url, a.key);
    match a.cmd {
        BatchCmd::Submit {
            file,
            endpoint,
            window,
            wait,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "batch.jsonl".into());
            let f = api.upload(&name, &bytes)?;
            let file_id = f["id"].as_str().context("the upload has no id")?;
            let b = api.post(
                "/v1/batches",
                json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": window}),
            )?;
            let id = b["id"].as_str().context("the batch has no id")?.to_string();
            if wait {
                ended(&follow(&api, &id)?);
            } else if b["status"] == "failed" {
                ended(&b);
            } else {
                println!("{id}");
            }
        }
        BatchCmd::Status { id, wait } => {
            let b = if wait {
                follow(&api, &id)?
            } else {
                api.get(&format!("/v1/batches/{id}"))?
            };
            ended(&b);
        }
        BatchCmd::Cancel { id } => {
            let b = api.post(&format!("/v1/batches/{id}/cancel"), json!({}))?;
            println!("{}", summary(&b));
        }
        BatchCmd::Results { id, out, errors } => {
            let b = api.get(&format!("/v1/batches/{id}"))?;
            if running(&b) {
                bail!("{} (not finished yet)", summary(&b));
            }
            match (b["output_file_id"].as_str(), out) {
                (Some(f), Some(path)) => {
                    let mut w = std::fs::File::create(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    api.download(f, &mut w)?;
                    eprintln!("answers written to {}", path.display());
                }
                (Some(f), None) => api.download(f, &mut std::io::stdout().lock())?,
                (None, _) => eprintln!("no answers ({})", summary(&b)),
            }
            if let (Some(f), Some(path)) = (b["error_file_id"].as_str(), errors) {
                let mut w = std::fs::File::create(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                api.download(f, &mut w)?;
                eprintln!("failed lines written to {}", path.display());
            }
        }
        BatchCmd::List { limit } => {
            let l = api.get(&format!("/v1/batches?limit={limit}"))?;
            for b in l["data"].as_array().into_iter().flatten() {
                println!("{}", summary(b));
            }
        }
    }
    Ok(())
}
