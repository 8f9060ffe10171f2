//! `hanlin train …` (tokenizer, pretrain, sft, dpo, lora, eval) and
//! `hanlin export`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hanlin_engine::{GenerateParams, LoadedModel, SamplerConfig};
use hanlin_store::Store;
use hanlin_tokenizer::Message;
use hanlin_train::config::{Optimizer, RunConfig, TrainConfig};
use hanlin_train::export::Quant;
use hanlin_train::finetune::{self, LoraOptions, Options};
use hanlin_train::trainer::Progress;
use hanlin_train::{export, pretrain, tokenizer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Subcommand)]
pub enum TrainCmd {
    /// Train a byte-level BPE tokenizer on a corpus (.txt/.md files)
    Tokenizer {
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long, default_value_t = 8000)]
        vocab: usize,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Pretrain a GPT from scratch (resumes from OUTPUT's checkpoint)
    Pretrain {
        /// Model and training settings (TOML: [model] and [train])
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        corpus: PathBuf,
        /// Tokenizer from `hanlin train tokenizer`
        #[arg(long)]
        tokenizer: PathBuf,
        /// Run directory (checkpoint, loss.csv, loss.png, summary.json)
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Supervised fine-tuning on conversations (JSONL "messages"); the loss
    /// is on the assistant's turns only
    Sft {
        /// The run to start from
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        opts: FinetuneArgs,
    },
    /// Preference tuning (DPO) on JSONL pairs {"prompt", "chosen",
    /// "rejected"}, against the starting model frozen as the reference
    Dpo {
        #[arg(long)]
        from: PathBuf,
        /// Strength of the KL constraint to the reference
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        #[command(flatten)]
        opts: FinetuneArgs,
    },
    /// Adapt a GGUF foundation model with LoRA on text files or chat JSONL
    /// (base weights frozen; the adapters are checkpointed on their own and
    /// merged on export)
    Lora {
        /// A model name (pulled if needed) or GGUF file (llama architecture)
        #[arg(long)]
        base: String,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// Projections to adapt (wq wk wv wo gate up down)
        #[arg(long, value_delimiter = ',', default_value = "wq,wk,wv,wo")]
        targets: Vec<String>,
        #[command(flatten)]
        opts: FinetuneArgs,
    },
    /// Distil a served teacher: answer prompts through the engine and write
    /// the conversations as SFT data; with a student, also preference pairs
    /// (teacher's answer chosen, student's rejected) for DPO
    Distill {
        /// The teacher: a model name (pulled if needed) or GGUF file
        #[arg(long)]
        teacher: String,
        /// Prompts: a text file (one per line) or JSONL ({"prompt"} or {"messages"})
        #[arg(long)]
        prompts: PathBuf,
        /// Conversations (JSONL, appended to; prompts already there are skipped)
        #[arg(short, long)]
        output: PathBuf,
        /// The student: a model, GGUF file or training run
        #[arg(long, requires = "prefs")]
        student: Option<String>,
        /// Preference pairs written here (JSONL, appended to)
        #[arg(long, requires = "student")]
        prefs: Option<PathBuf>,
        /// A system prompt for the teacher
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Train a small text-to-image model from nothing on generated pictures
    /// of coloured shapes captioned in English and Chinese (resumes from
    /// OUTPUT's checkpoint); it ends with OUTPUT/model, which `hanlin image
    /// --model` and `hanlin serve --image-model` use, and samples.png
    Image {
        /// Settings (TOML: [model], [train], uncond, vocab); default: the
        /// recipe in recipes/image-shapes.toml
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the number of steps
        #[arg(long)]
        steps: Option<usize>,
        /// Run directory (checkpoint, loss.csv, loss.png, model/, samples.png)
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write generated pictures of the image recipe's kind with their
    /// captions and labels (NNNNN.png, labels.jsonl), e.g. for
    /// bench/image_eval.py
    ImageData {
        #[arg(short, default_value_t = 500)]
        n: usize,
        #[arg(long, default_value_t = 32)]
        side: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Evaluate a run on held-out data: perplexity and bits per byte on text
    /// files, loss on the assistant's turns for chat JSONL; then samples
    Eval {
        run: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Prompts to continue (default: the start of the first documents)
        #[arg(long)]
        prompt: Vec<String>,
        #[arg(long, default_value_t = 48)]
        max_tokens: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the figures as JSON
        #[arg(long)]
        json: bool,
    },
}

/// Data and settings of a fine-tuning run.
#[derive(Args)]
pub struct FinetuneArgs {
    /// A .jsonl file or a directory of them (LoRA: text files too)
    #[arg(long)]
    data: PathBuf,
    /// Run directory
    #[arg(short, long)]
    output: PathBuf,
    /// Stop at the first malformed line instead of skipping it
    #[arg(long)]
    strict: bool,
    /// Training settings (TOML with a [train] table); the flags override it
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    /// adamw or muon
    #[arg(long)]
    optimizer: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// SFT: pack several conversations into each sequence of --seq-len
    /// tokens (each sees only itself) instead of one per row
    #[arg(long)]
    pack: bool,
}

impl FinetuneArgs {
    fn train_config(&self, default_steps: usize, default_lr: f64) -> Result<TrainConfig> {
        let mut t = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                TrainConfig::from_toml(&text).with_context(|| format!("{}", p.display()))?
            }
            None => {
                let mut t = TrainConfig::new(default_steps);
                t.lr = default_lr;
                t.warmup = (default_steps / 10).max(1);
                t.eval_every = (default_steps / 8).max(1);
                t.checkpoint_every = (default_steps / 4).max(1);
                t.val_fraction = 0.1;
                t.weight_decay = 0.0;
                t
            }
        };
        if let Some(s) = self.steps {
            t.steps = s;
            if self.config.is_none() {
                t.warmup = (s / 10).max(1);
                t.eval_every = (s / 8).max(1);
                t.checkpoint_every = (s / 4).max(1);
            }
        }
        if let Some(v) = self.lr {
            t.lr = v;
        }
        if let Some(v) = self.batch_size {
            t.batch_size = v;
        }
        if let Some(v) = self.seq_len {
            t.seq_len = Some(v);
        }
        if let Some(v) = self.grad_accum {
            t.grad_accum = v;
        }
        if let Some(v) = self.seed {
            t.seed = v;
        }
        if self.pack {
            t.pack = true;
        }
        if let Some(o) = &self.optimizer {
            t.optimizer = match o.as_str() {
                "adamw" => Optimizer::AdamW,
                "muon" => Optimizer::Muon,
                _ => bail!("unknown optimizer {o:?} (adamw, muon)"),
            };
        }
        if t.steps == 0 || t.batch_size == 0 {
            bail!("steps and batch size must be positive");
        }
        Ok(t)
    }

    fn options(&self, steps: usize, lr: f64) -> Result<Options<'_>> {
        Ok(Options {
            data: &self.data,
            strict: self.strict,
            train: self.train_config(steps, lr)?,
        })
    }
}

fn device() -> hanlin_train::burn::tensor::Device {
    hanlin_train::burn::tensor::Device::default().autodiff()
}

/// A progress bar fed by the training loop.
fn bar(steps: usize) -> (indicatif::ProgressBar, impl FnMut(&Progress)) {
    let pb = indicatif::ProgressBar::new(steps as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let p2 = pb.clone();
    let f = move |p: &Progress| {
        p2.set_position(p.step as u64);
        let val = p
            .val_loss
            .map(|v| format!(" val {v:.3}"))
            .unwrap_or_default();
        let extra: String = p
            .extra
            .iter()
            .map(|(k, v)| format!(" {k} {v:.3}"))
            .collect();
        p2.set_message(format!(
            "loss {:.3}{val}{extra} lr {:.1e} {:.0} tok/s",
            p.loss, p.lr, p.tokens_per_sec
        ));
    };
    (pb, f)
}

fn report_rejected(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    eprintln!("skipped {} malformed line(s):", lines.len());
    for l in lines.iter().take(10) {
        eprintln!("  {l}");
    }
    if lines.len() > 10 {
        eprintln!("  … (all in summary.json)");
    }
}

fn finish(s: &finetune::Summary, out: &Path) {
    report_rejected(&s.rejected_lines);
    println!(
        "{} {} steps: loss {:.3}, held-out loss {:.3} ({} examples, {} held out); {:.0} tokens/s",
        s.kind, s.steps, s.final_loss, s.val_loss, s.examples, s.held_out, s.tokens_per_sec
    );
    if s.truncated > 0 {
        println!(
            "{} example(s) longer than the sequence length were cut or left out",
            s.truncated
        );
    }
    if let Some(d) = &s.dpo {
        println!(
            "held-out preference accuracy {:.1}% → {:.1}%, mean reward margin {:.3} → {:.3} (beta {})",
            d.accuracy_before * 100.0,
            d.accuracy_after * 100.0,
            d.margin_before,
            d.margin_after,
            d.beta
        );
    }
    if let Some(l) = &s.lora {
        println!(
            "held-out perplexity {:.2} → {:.2} (loss {:.3} → {:.3}); {} trainable parameters",
            l.perplexity_before,
            l.perplexity_after,
            l.val_loss_before,
            l.val_loss_after,
            l.trainable_parameters
        );
    }
    println!(
        "wrote {} (loss.csv, loss.png, summary.json, checkpoint/)",
        out.display()
    );
}

/// The prompts of a distillation file: a user message each (with any
/// earlier turns of a JSONL `messages` line).
fn read_prompts(path: &Path) -> Result<Vec<Vec<Message>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !jsonl {
            out.push(vec![Message::new("user", line)]);
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(at)?;
        let msgs = match (v.get("prompt"), v.get("messages")) {
            (Some(serde_json::Value::String(p)), _) => vec![Message::new("user", p.as_str())],
            (_, Some(m)) => {
                let turns = hanlin_train::chat::parse_chat(&serde_json::json!({"messages": m}))
                    .or_else(|_| {
                        // A conversation that ends with the user's turn.
                        let mut m = m.clone();
                        if let Some(a) = m.as_array_mut() {
                            a.push(serde_json::json!({"role": "assistant", "content": "-"}));
                        }
                        hanlin_train::chat::parse_chat(&serde_json::json!({"messages": m}))
                    })
                    .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
                let mut turns: Vec<Message> = turns
                    .iter()
                    .map(|t| Message::new(t.role.as_str(), t.content.as_str()))
                    .collect();
                // The prompt is everything up to the last user turn.
                while turns.last().is_some_and(|t| t.role != "user") {
                    turns.pop();
                }
                turns
            }
            _ => bail!("{}: no \"prompt\" or \"messages\"", at()),
        };
        if msgs.is_empty() {
            bail!("{}: no user turn", at());
        }
        out.push(msgs);
    }
    if out.is_empty() {
        bail!("no prompts in {}", path.display());
    }
    Ok(out)
}

/// Answer `msgs` with `m` (`None` when the prompt leaves no room in the
/// model's context).
fn answer(m: &Arc<LoadedModel>, msgs: &[Message], p: &GenerateParams) -> Result<Option<String>> {
    let prompt = m.chat_prompt(msgs)?;
    let ctx = m.model.cfg.context_length;
    if prompt.len() + 1 >= ctx {
        return Ok(None);
    }
    let mut p = p.clone();
    p.max_tokens = p.max_tokens.min(ctx - prompt.len() - 1);
    let mut s = m.new_session(prompt.len() + p.max_tokens + 1);
    Ok(Some(
        s.generate(&prompt, &p, |_| true)?.text.trim().to_string(),
    ))
}

#[allow(clippy::too_many_arguments)]
fn distill(
    store: &Store,
    threads: usize,
    teacher: &str,
    prompts: &Path,
    output: &Path,
    student: Option<(&str, &Path)>,
    system: Option<&str>,
    params: GenerateParams,
) -> Result<()> {
    use std::io::Write;
    let prompts = read_prompts(prompts)?;
    // Prompts already answered (a rerun continues).
    let done: std::collections::HashSet<String> = std::fs::read_to_string(output)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let m = v.get("messages")?.as_array()?;
            let last_user = m.iter().rev().find(|t| t["role"] == "user")?;
            Some(last_user["content"].as_str()?.to_string())
        })
        .collect();
    let t = crate::load(store, teacher, threads)?;
    let s = match student {
        None => None,
        Some((name, prefs)) => {
            let p = Path::new(name);
            if p.join("config.toml").is_file() {
                // A training run: exported next to the pairs, then loaded.
                let g = prefs.with_extension("student.gguf");
                export::export_run(p, &g, Quant::F32)?;
                let m = LoadedModel::load(&g, threads);
                let _ = std::fs::remove_file(&g);
                Some(m.with_context(|| format!("loading {name}"))?)
            } else {
                Some(crate::load(store, name, threads)?)
            }
        }
    };
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))
    };
    let mut out = open(output)?;
    let mut prefs = match student {
        Some((_, p)) => Some(open(p)?),
        None => None,
    };
    let todo: Vec<&Vec<Message>> = prompts
        .iter()
        .filter(|m| !m.last().is_some_and(|u| done.contains(&u.content)))
        .collect();
    let pb = indicatif::ProgressBar::new(todo.len() as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} prompts [{elapsed} < {eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (mut written, mut too_long) = (0, 0);
    for msgs in todo {
        let mut full: Vec<Message> = system
            .map(|s| Message::new("system", s))
            .into_iter()
            .collect();
        full.extend(msgs.iter().cloned());
        let Some(a) = answer(&t, &full, &params)?.filter(|a| !a.is_empty()) else {
            too_long += 1;
            pb.inc(1);
            continue;
        };
        let turns = |answer: &str| -> Vec<serde_json::Value> {
            msgs.iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .chain([serde_json::json!({"role": "assistant", "content": answer})])
                .collect()
        };
        writeln!(out, "{}", serde_json::json!({ "messages": turns(&a) }))?;
        if let (Some(sm), Some(pf)) = (&s, &mut prefs) {
            let b = answer(sm, msgs, &params)?;
            if b.is_none() {
                too_long += 1;
            }
            if let Some(b) = b.filter(|b| *b != a) {
                let prompt: Vec<serde_json::Value> = msgs
                    .iter()
                    .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                    .collect();
                writeln!(
                    pf,
                    "{}",
                    serde_json::json!({"prompt": prompt, "chosen": a, "rejected": b})
                )?;
            }
        }
        written += 1;
        pb.inc(1);
    }
    pb.finish_and_clear();
    if too_long > 0 {
        eprintln!("{too_long} prompt(s) did not fit a model's context or got an empty answer");
    }
    println!(
        "{written} answers from {teacher} appended to {}{}",
        output.display(),
        student
            .map(|(n, p)| format!("; preference pairs against {n} in {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

pub fn run(store: &Store, threads: usize, cmd: TrainCmd) -> Result<()> {
    match cmd {
        TrainCmd::Distill {
            teacher,
            prompts,
            output,
            student,
            prefs,
            system,
            max_tokens,
            temperature,
            seed,
        } => {
            let params = GenerateParams {
                max_tokens,
                sampler: SamplerConfig {
                    temperature,
                    seed,
                    ..SamplerConfig::default()
                },
                ..GenerateParams::default()
            };
            let st = match (&student, &prefs) {
                (Some(s), Some(p)) => Some((s.as_str(), p.as_path())),
                _ => None,
            };
            distill(
                store,
                threads,
                &teacher,
                &prompts,
                &output,
                st,
                system.as_deref(),
                params,
            )?;
        }
        TrainCmd::Tokenizer {
            corpus,
            vocab,
            output,
        } => {
            let t = tokenizer::train(&corpus, vocab)?;
            tokenizer::save(&t, &output)?;
            println!(
                "tokenizer with {} tokens written to {}",
                t.get_vocab_size(true),
                output.display()
            );
        }
        TrainCmd::Pretrain {
            config,
            corpus,
            tokenizer,
            output,
        } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let cfg = RunConfig::from_toml(&text)?;
            let (pb, f) = bar(cfg.train.steps);
            let s = pretrain::run(cfg, &corpus, &tokenizer, &output, &device(), f)?;
            pb.finish_and_clear();
            println!(
                "{} steps: loss {:.3}, validation loss {:.3} = {:.3} bits/char (unigram baseline {:.3}); {:.0} tokens/s; {} parameters",
                s.steps, s.final_loss, s.val_loss, s.val_bpc, s.unigram_bpc, s.tokens_per_sec, s.parameters
            );
            for (i, l) in s.expert_load.iter().enumerate() {
                let l: Vec<String> = l.iter().map(|v| format!("{:.0}%", v * 100.0)).collect();
                println!("layer {i} expert load: {}", l.join(" "));
            }
            for f in &s.skipped_files {
                eprintln!("skipped {f}");
            }
            println!(
                "wrote {} (loss.csv, loss.png, summary.json, checkpoint/)",
                output.display()
            );
        }
        TrainCmd::Image {
            config,
            steps,
            output,
        } => {
            let text = match &config {
                Some(c) => std::fs::read_to_string(c)
                    .with_context(|| format!("reading {}", c.display()))?,
                None => hanlin_train::image::RECIPE.to_owned(),
            };
            let mut cfg = hanlin_train::image::ImageRunConfig::from_toml(&text)?;
            if let Some(n) = steps {
                anyhow::ensure!(n > 0, "--steps must be positive");
                cfg.train.steps = n;
            }
            let (pb, f) = bar(cfg.train.steps);
            let t0 = std::time::Instant::now();
            let o = hanlin_train::image::train(&cfg, &output, &device(), f)?;
            pb.finish_and_clear();
            println!(
                "{} steps in {:.1} min{}: loss {:.4}, validation loss {:.4}; {:.1} images/s",
                cfg.train.steps,
                t0.elapsed().as_secs_f64() / 60.0,
                if o.resumed_from > 0 {
                    format!(" (resumed at step {})", o.resumed_from)
                } else {
                    String::new()
                },
                o.final_loss,
                o.val_loss,
                o.images_per_sec
            );
            println!(
                "wrote {} (loss.csv, loss.png, checkpoint/) and {}; samples in {}",
                output.display(),
                o.model_dir.display(),
                o.samples.display()
            );
            println!(
                "draw with: hanlin image --model {} \"a red circle on the left, black background\"",
                o.model_dir.display()
            );
        }
        TrainCmd::ImageData {
            n,
            side,
            seed,
            output,
        } => {
            anyhow::ensure!(
                (1..=100_000).contains(&n) && (8..=256).contains(&side),
                "-n must be 1–100000 and --side 8–256"
            );
            hanlin_train::image::write_dataset(&output, n, side, seed)?;
            println!(
                "wrote {n} pictures and labels.jsonl to {}",
                output.display()
            );
        }
        TrainCmd::Sft { from, opts } => {
            let o = opts.options(200, 1e-3)?;
            let (pb, f) = bar(o.train.steps);
            let s = finetune::sft(&from, &o, &opts.output, &device(), f)?;
            pb.finish_and_clear();
            finish(&s, &opts.output);
        }
        TrainCmd::Dpo { from, beta, opts } => {
            let o = opts.options(100, 2e-4)?;
            let (pb, f) = bar(o.train.steps);
            let s = finetune::dpo(&from, &o, beta, &opts.output, &device(), f)?;
            pb.finish_and_clear();
            finish(&s, &opts.output);
        }
        TrainCmd::Lora {
            base,
            rank,
            alpha,
            targets,
            opts,
        } => {
            let path = crate::resolve(store, &base)?;
            let mut o = opts.options(100, 1e-3)?;
            if opts.seq_len.is_none() && o.train.seq_len.is_none() {
                o.train.seq_len = Some(256);
            }
            if opts.batch_size.is_none() && opts.config.is_none() {
                o.train.batch_size = 4;
            }
            let lo = LoraOptions {
                rank,
                alpha,
                targets,
            };
            let name = Path::new(&base)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or(base.clone());
            let (pb, f) = bar(o.train.steps);
            let s = finetune::lora(&path, &name, &lo, &o, &opts.output, &device(), f)?;
            pb.finish_and_clear();
            finish(&s, &opts.output);
        }
        TrainCmd::Eval {
            run,
            data,
            prompt,
            max_tokens,
            seed,
            json,
        } => {
            let e = finetune::evaluate(&run, &data, &prompt, max_tokens, seed)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
                return Ok(());
            }
            print!(
                "{} tokens: loss {:.4}, perplexity {:.2}",
                e.tokens, e.loss, e.perplexity
            );
            if let (Some(b), Some(c)) = (e.bits_per_byte, e.bits_per_char) {
                print!(", {b:.3} bits/byte, {c:.3} bits/char");
            }
            println!();
            for (p, s) in &e.samples {
                println!("--- {}\n{s}", p.trim_end());
            }
        }
    }
    Ok(())
}

/// `hanlin export RUN -o FILE.gguf --quant TYPE [--format safetensors]`.
pub fn export_run(run: &Path, output: &Path, quant: Option<Quant>, format: &str) -> Result<()> {
    match format {
        "gguf" => {
            let q = quant.unwrap_or(Quant::Q8_0);
            export::export_run(run, output, q)?;
            println!("wrote {} ({q:?})", output.display());
        }
        "safetensors" => {
            let q = quant.unwrap_or(Quant::F16);
            export::export_safetensors(run, output, q)?;
            println!(
                "wrote {} (config.json, model.safetensors {q:?}, tokenizer.json, tokenizer_config.json)",
                output.display()
            );
        }
        other => bail!("unknown export format {other:?} (gguf, safetensors)"),
    }
    Ok(())
}
