//! `hanlin train` from the command line, where the operating system fails
//! it: a disk that fills while a checkpoint is written (the file-size limit
//! of `ulimit -f`, so writes fail with EFBIG) leaves the previous
//! checkpoint whole and the run resumable; a loss that becomes infinite
//! stops the run with its step. Also a whole pipeline — tokenizer,
//! pretraining, SFT with a malformed line, DPO, evaluation, export — run
//! through the binary.

use std::path::Path;
use std::process::{Command, Output};

fn hanlin(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hanlin"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run hanlin")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn setup(dir: &Path) {
    std::fs::create_dir_all(dir.join("corpus")).unwrap();
    let text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n你好！写一首诗。好的。\n";
    for i in 0..4 {
        std::fs::write(dir.join(format!("corpus/{i}.txt")), text.repeat(30)).unwrap();
    }
    ok(hanlin(
        dir,
        &[
            "train",
            "tokenizer",
            "--corpus",
            "corpus",
            "--vocab",
            "300",
            "-o",
            "tok.json",
        ],
    ));
}

fn config(dir: &Path, steps: usize, lr: &str) {
    std::fs::write(
        dir.join("c.toml"),
        format!(
            "[model]\nn_layer=2\nd_model=64\nn_head=4\nd_ff=128\ncontext=96\n\
             [train]\nsteps={steps}\nbatch_size=4\nlr={lr}\nwarmup=2\neval_every=5\ncheckpoint_every=10\nval_fraction=0.1\n"
        ),
    )
    .unwrap();
}

fn pretrain(dir: &Path, limit_kb: Option<usize>) -> Output {
    let exe = env!("CARGO_BIN_EXE_hanlin");
    let args = "train pretrain --config c.toml --corpus corpus --tokenizer tok.json -o run";
    let script = match limit_kb {
        // Ignore SIGXFSZ so that a write past the limit fails with EFBIG,
        // as a write to a full disk fails with ENOSPC.
        Some(kb) => format!("trap '' XFSZ; ulimit -f {kb}; exec '{exe}' {args}"),
        None => format!("exec '{exe}' {args}"),
    };
    Command::new("bash")
        .current_dir(dir)
        .args(["-c", &script])
        .output()
        .expect("bash")
}

fn checkpoint_step(dir: &Path) -> u64 {
    let s: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("run/checkpoint/state.json")).expect("state.json"),
    )
    .expect("json");
    s["step"].as_u64().expect("step")
}

#[test]
fn a_full_disk_while_checkpointing_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    config(dir, 10, "3e-3");
    ok(pretrain(dir, None));
    assert_eq!(checkpoint_step(dir), 10);
    let model = std::fs::read(dir.join("run/checkpoint/model.bpk")).unwrap();
    assert!(
        model.len() > 200 * 1024,
        "the model file outgrows the limit: {}",
        model.len()
    );

    // Twenty steps with a 64 KB file-size limit: the step-20 checkpoint
    // cannot be written.
    config(dir, 20, "3e-3");
    let o = pretrain(dir, Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("checkpoint"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The step-10 checkpoint is still the one, byte for byte.
    assert_eq!(checkpoint_step(dir), 10);
    assert_eq!(
        std::fs::read(dir.join("run/checkpoint/model.bpk")).unwrap(),
        model
    );

    // With space again the run resumes from step 10 and finishes.
    let out = ok(pretrain(dir, None));
    assert!(out.contains("20 steps"), "{out}");
    assert_eq!(checkpoint_step(dir), 20);
    let rows = std::fs::read_to_string(dir.join("run/loss.csv")).unwrap();
    assert_eq!(rows.lines().count(), 21, "{rows}");
}

#[test]
fn a_diverging_loss_stops_the_run_with_its_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    config(dir, 30, "1e12");
    let o = pretrain(dir, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("the loss became") && err.contains("at step"),
        "{err}"
    );
}

#[test]
fn pretrain_sft_dpo_eval_and_export_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    config(dir, 10, "3e-3");
    ok(pretrain(dir, None));
    let mut chat = String::new();
    for i in 0..20 {
        chat.push_str(&format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"写一首诗{i}\"}},{{\"role\":\"assistant\",\"content\":\"床前明月光。\"}}]}}\n"
        ));
    }
    chat.push_str("{\"messages\": 42}\n");
    std::fs::write(dir.join("chat.jsonl"), &chat).unwrap();
    let o = hanlin(
        dir,
        &[
            "train",
            "sft",
            "--from",
            "run",
            "--data",
            "chat.jsonl",
            "-o",
            "sft",
            "--steps",
            "10",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = ok(o);
    assert!(out.contains("sft 10 steps"), "{out}");
    assert!(
        err.contains("chat.jsonl:21: \"messages\" is not a list"),
        "{err}"
    );
    let o = hanlin(
        dir,
        &[
            "train",
            "sft",
            "--from",
            "run",
            "--data",
            "chat.jsonl",
            "-o",
            "strict",
            "--strict",
        ],
    );
    assert!(!o.status.success());
    let prefs: String = (0..20)
        .map(|i| format!("{{\"prompt\":\"写一首诗{i}\",\"chosen\":\"床前明月光。\",\"rejected\":\"好好好好。\"}}\n"))
        .collect();
    std::fs::write(dir.join("prefs.jsonl"), prefs).unwrap();
    let out = ok(hanlin(
        dir,
        &[
            "train",
            "dpo",
            "--from",
            "sft",
            "--data",
            "prefs.jsonl",
            "-o",
            "dpo",
            "--steps",
            "5",
        ],
    ));
    assert!(out.contains("held-out preference accuracy"), "{out}");
    let out = ok(hanlin(
        dir,
        &[
            "train",
            "eval",
            "dpo",
            "--data",
            "chat.jsonl",
            "--json",
            "--max-tokens",
            "4",
        ],
    ));
    let e: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(e["perplexity"].as_f64().expect("perplexity") > 1.0, "{e}");
    assert_eq!(e["samples"].as_array().expect("samples").len(), 3);
    ok(hanlin(
        dir,
        &["export", "dpo", "-o", "m.gguf", "--quant", "q8_0"],
    ));
    assert!(std::fs::metadata(dir.join("m.gguf")).unwrap().len() > 10_000);
    // A run directory that is not one.
    let o = hanlin(
        dir,
        &[
            "train",
            "sft",
            "--from",
            "corpus",
            "--data",
            "chat.jsonl",
            "-o",
            "x",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not a training run"), "{err}");
}

/// Distillation: the real SmolLM2 answers prompts through the engine; a
/// tiny trained student's answers become the rejected side of preference
/// pairs; a rerun skips what is done; the data trains with `sft` and `dpo`.
#[test]
fn distill_from_a_served_teacher_into_sft_and_dpo_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    config(dir, 10, "3e-3");
    ok(pretrain(dir, None));
    std::fs::write(
        dir.join("prompts.txt"),
        "What is the capital of France?\n\nName a colour.\n",
    )
    .unwrap();
    let args = [
        "train",
        "distill",
        "--teacher",
        "smollm2-135m",
        "--prompts",
        "prompts.txt",
        "-o",
        "distilled.jsonl",
        "--student",
        "run",
        "--prefs",
        "prefs.jsonl",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ];
    let out = ok(hanlin(dir, &args));
    assert!(out.contains("2 answers from smollm2-135m"), "{out}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("distilled.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]["messages"][0]["content"],
        "What is the capital of France?"
    );
    let answer = lines[0]["messages"][1]["content"].as_str().expect("answer");
    assert!(answer.contains("Paris"), "{answer}");
    let prefs = std::fs::read_to_string(dir.join("prefs.jsonl")).unwrap();
    assert_eq!(prefs.lines().count(), 2, "{prefs}");
    let p: serde_json::Value = serde_json::from_str(prefs.lines().next().unwrap()).unwrap();
    assert_eq!(p["chosen"], answer);
    assert_ne!(p["rejected"], p["chosen"]);
    // A rerun has nothing left to do.
    let out = ok(hanlin(dir, &args));
    assert!(out.contains("0 answers"), "{out}");
    // The files are training data as they are.
    ok(hanlin(
        dir,
        &[
            "train",
            "sft",
            "--from",
            "run",
            "--data",
            "distilled.jsonl",
            "-o",
            "sft",
            "--steps",
            "2",
            "--strict",
        ],
    ));
    ok(hanlin(
        dir,
        &[
            "train",
            "dpo",
            "--from",
            "sft",
            "--data",
            "prefs.jsonl",
            "-o",
            "dpo",
            "--steps",
            "2",
            "--strict",
        ],
    ));
}

/// The smoke test of `hanlin train image`: a few steps of a small model on
/// the generated pictures, resumed once, exported as a diffusers directory
/// that `hanlin image` draws with — from a Chinese prompt, since the model
/// learns both languages — and the generator's data for the evaluator.
#[test]
fn train_image_then_draw_with_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("image.toml"),
        "vocab = 600\n[model]\nside = 16\nchannels = [16, 32]\nattention = [false, true]\ntext_dim = 32\n\
         [train]\nsteps = 4\nbatch_size = 4\nlr = 1e-3\nwarmup = 1\ncheckpoint_every = 2\neval_every = 2\n",
    )
    .unwrap();
    let train = |steps: &str| {
        hanlin(
            d,
            &[
                "train",
                "image",
                "--config",
                "image.toml",
                "--steps",
                steps,
                "-o",
                "run",
            ],
        )
    };
    ok(train("2"));
    let out = ok(train("4"));
    assert!(out.contains("resumed at step 2"), "{out}");
    let rows = std::fs::read_to_string(d.join("run/loss.csv")).unwrap();
    assert_eq!(rows.lines().count(), 5, "a header and four steps: {rows}");
    for f in [
        "loss.png",
        "samples.png",
        "model/unet/config.json",
        "model/tokenizer/vocab.json",
    ] {
        assert!(d.join("run").join(f).exists(), "{f}");
    }
    let o = hanlin(
        d,
        &[
            "image",
            "--model",
            "run/model",
            "黑色背景上左边的红色圆形",
            "--seed",
            "5",
            "--steps",
            "4",
            "-o",
            "a.png",
        ],
    );
    ok(o);
    let png = std::fs::read(d.join("a.png")).unwrap();
    let be = |i: usize| u32::from_be_bytes([png[i], png[i + 1], png[i + 2], png[i + 3]]);
    assert_eq!(
        (be(16), be(20)),
        (16, 16),
        "the model's own size by default"
    );

    ok(hanlin(
        d,
        &[
            "train",
            "image-data",
            "-n",
            "6",
            "--side",
            "16",
            "-o",
            "data",
        ],
    ));
    let labels = std::fs::read_to_string(d.join("data/labels.jsonl")).unwrap();
    assert_eq!(labels.lines().count(), 6);
    assert!(labels.contains("\"shape\"") && d.join("data/00005.png").exists());

    // A run of another shape in the same directory is refused.
    std::fs::write(
        d.join("other.toml"),
        "[model]\nside = 16\nchannels = [32, 64]\nattention = [false, true]\n[train]\nsteps = 6\n",
    )
    .unwrap();
    let o = hanlin(
        d,
        &["train", "image", "--config", "other.toml", "-o", "run"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("another model shape"));
}
