//! `hanlin train …` (tokenizer, pretrain) and `hanlin export`.

use anyhow::{Context, Result};
use clap::Subcommand;
use hanlin_train::config::RunConfig;
use hanlin_train::export::Quant;
use hanlin_train::{export, pretrain, tokenizer};
use std::path::{Path, PathBuf};

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
}

fn device() -> hanlin_train::burn::tensor::Device {
    hanlin_train::burn::tensor::Device::default().autodiff()
}

pub fn run(cmd: TrainCmd) -> Result<()> {
    match cmd {
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
            let steps = cfg.train.steps as u64;
            let pb = indicatif::ProgressBar::new(steps);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let s = pretrain::run(cfg, &corpus, &tokenizer, &output, &device(), |p| {
                pb.set_position(p.step as u64);
                let val = p
                    .val_loss
                    .map(|v| format!(" val {v:.3}"))
                    .unwrap_or_default();
                pb.set_message(format!(
                    "loss {:.3}{val} lr {:.1e} {:.0} tok/s",
                    p.loss, p.lr, p.tokens_per_sec
                ));
            })?;
            pb.finish_and_clear();
            println!(
                "{} steps: loss {:.3}, validation loss {:.3} = {:.3} bits/char (unigram baseline {:.3}); {:.0} tokens/s; {} parameters",
                s.steps, s.final_loss, s.val_loss, s.val_bpc, s.unigram_bpc, s.tokens_per_sec, s.parameters
            );
            for f in &s.skipped_files {
                eprintln!("skipped {f}");
            }
            println!(
                "wrote {} (loss.csv, loss.png, summary.json, checkpoint/)",
                output.display()
            );
        }
    }
    Ok(())
}

/// `hanlin export RUN -o FILE.gguf --quant TYPE`.
pub fn export_run(run: &Path, output: &Path, quant: Quant) -> Result<()> {
    let device = hanlin_train::burn::tensor::Device::default();
    let (cfg, model) = pretrain::load_model(run, &device)?;
    let tok = tokenizer::load(&run.join("tokenizer.json"))?;
    export::export(&model, &cfg, &tok, output, quant)?;
    println!("wrote {} ({quant:?})", output.display());
    Ok(())
}
