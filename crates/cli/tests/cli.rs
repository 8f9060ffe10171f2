//! The `hanlin` binary as a user runs it (models from the store that
//! scripts/test.sh fills; a missing model fails, never skips).

use std::process::Command;

mod common;
use common::{hanlin, text};

#[test]
fn run_answers_in_english_and_chinese() {
    let o = hanlin(&[
        "run",
        "smollm2-135m",
        "What is the capital of France?",
        "--temperature",
        "0",
        "-n",
        "30",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("Paris"), "{}", text(&o.stdout));
    let o = hanlin(&[
        "run",
        "qwen2.5-coder-0.5b",
        "用中文介绍一下长城",
        "--temperature",
        "0",
        "-n",
        "40",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("长城"), "{}", text(&o.stdout));
}

#[test]
fn list_and_show_describe_the_store() {
    let o = hanlin(&["list"]);
    assert!(o.status.success());
    let out = text(&o.stdout);
    assert!(
        out.contains("qwen2.5-coder-0.5b") && out.contains("[default]"),
        "{out}"
    );
    let o = hanlin(&["show", "qwen2.5-coder-0.5b"]);
    let out = text(&o.stdout);
    assert!(
        out.contains("architecture qwen2") && out.contains("24 layers"),
        "{out}"
    );
    let o = hanlin(&["show", "--path", "smollm2-135m"]);
    assert!(std::path::Path::new(text(&o.stdout).trim()).is_file());
}

/// `bench --long-prompt` prefills both prompts in every repetition and
/// reports the long one's rate and its ratio to the short one's.
#[test]
fn bench_measures_a_long_prompt_beside_the_short_one() {
    let bench = |more: &[&str]| {
        let short_and_long = ["bench", "smollm2-135m", "-p", "32", "--long-prompt", "96"];
        hanlin(&[&short_and_long[..], more].concat())
    };
    let o = bench(&["-n", "2", "-r", "2", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).expect("one JSON line");
    let rate = |k: &str| v[k].as_f64().unwrap_or(0.0);
    assert_eq!(v["long_prompt"], 96, "{v}");
    assert!(
        rate("prefill_tok_s") > 0.0 && rate("long_prefill_tok_s") > 0.0,
        "{v}"
    );
    assert!(
        rate("long_ratio") > 0.0 && rate("long_ratio").is_finite(),
        "{v}"
    );
    let o = bench(&["-n", "0", "-r", "1"]);
    let out = text(&o.stdout);
    assert!(
        o.status.success() && out.contains("96 tokens") && out.contains("the 32-token rate"),
        "{out}"
    );
}

/// `bench --rows` times a pass over each number of rows against a
/// one-row pass and reports the ratios in the order asked; a number of
/// rows out of range is refused before the model loads.
#[test]
fn bench_times_passes_over_several_rows() {
    let o = hanlin(&[
        "bench",
        "smollm2-135m",
        "-p",
        "0",
        "-n",
        "0",
        "-r",
        "1",
        "--rows",
        "3,1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).expect("one JSON line");
    assert_eq!(v["pass_rows"], serde_json::json!([3, 1]), "{v}");
    let costs: Vec<f64> = v["pass_cost"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_f64()).collect())
        .unwrap_or_default();
    assert!(
        costs.len() == 2 && costs.iter().all(|c| c.is_finite() && *c > 0.0),
        "{v}"
    );
    let o = hanlin(&["bench", "smollm2-135m", "-p", "0", "-n", "0", "--rows", "2"]);
    assert!(
        o.status.success() && text(&o.stdout).contains("2 rows"),
        "{}",
        text(&o.stdout)
    );
    for bad in ["0", "65"] {
        let o = hanlin(&["bench", "no-such-model", "--rows", bad]);
        let err = text(&o.stderr);
        assert!(
            !o.status.success() && err.contains(&format!("--rows {bad}")),
            "{err}"
        );
    }
}

#[test]
fn bad_input_gets_one_clear_error_and_nonzero_exit() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"\xff\xfe not utf-8").expect("write");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\x7f").expect("write");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "no-such-model", "hi"], "unknown model"),
        (
            vec!["run", "smollm2-135m", "-f", bad.to_str().expect("path")],
            "not valid UTF-8",
        ),
        (
            vec!["run", junk.to_str().expect("path"), "hi"],
            "impossible",
        ),
        (
            vec!["run", "/nonexistent/model.gguf", "hi"],
            "does not exist",
        ),
        (vec!["rm", "never-pulled"], "not in the local store"),
    ];
    for (args, want) in cases {
        let o = hanlin(&args);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let long = "长城 ".repeat(400);
    let o = hanlin(&["run", "smollm2-135m", &long, "--ctx", "256"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("context holds 256"),
        "{}",
        text(&o.stderr)
    );
}

/// `hanlin admin`: the key is printed alone on the last line; settings come
/// from a TOML file unless the environment or a flag says otherwise.
#[test]
fn admin_keys_and_config_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("from-config.db");
    let cfg = dir.path().join("hanlin.toml");
    std::fs::write(
        &cfg,
        format!("database_url = \"sqlite://{}\"\n", db.display()),
    )
    .expect("write config");
    let cfg_s = cfg.to_str().expect("utf-8 path");
    let out = hanlin(&[
        "--config", cfg_s, "admin", "key", "create", "--user", "张三", "--plan", "plus",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let key = stdout.lines().last().expect("a line");
    assert!(key.starts_with("sk-hl-") && !key.contains(' '), "{stdout}");
    assert!(
        db.exists(),
        "the database named by the config file was created"
    );
    let out = hanlin(&["--config", cfg_s, "admin", "key", "list"]);
    let listing = text(&out.stdout);
    assert!(
        listing.contains("张三") && listing.contains("active"),
        "{listing}"
    );
    assert!(!listing.contains(key), "secrets are never listed");
    let out = hanlin(&["--config", cfg_s, "admin", "user", "list"]);
    assert!(text(&out.stdout).contains("plus"));
    // A password for the web app, from standard input.
    let set_password = |pw: &str| {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_hanlin"))
            .args(["--config", cfg_s, "admin", "user", "passwd", "张三"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run hanlin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(pw.as_bytes())
            .expect("write");
        child.wait_with_output().expect("wait")
    };
    let out = set_password("长城万里长城万里\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = set_password("short\n");
    assert!(!out.status.success() && text(&out.stderr).contains("8 to 256"));
    // A flag beats the file.
    let other = dir.path().join("flag.db");
    let url = format!("sqlite://{}", other.display());
    let out = hanlin(&[
        "--config",
        cfg_s,
        "admin",
        "--database-url",
        &url,
        "plan",
        "list",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(other.exists());
    // Unknown plan, missing config file, bad TOML: clear errors.
    let out = hanlin(&[
        "--config", cfg_s, "admin", "key", "create", "--user", "x", "--plan", "gold",
    ]);
    assert!(!out.status.success() && text(&out.stderr).contains("gold"));
    let out = hanlin(&["--config", "/nonexistent/hanlin.toml", "list"]);
    assert!(!out.status.success() && text(&out.stderr).contains("/nonexistent/hanlin.toml"));
    std::fs::write(&cfg, "port = [1, 2]\n").expect("write");
    let out = hanlin(&["--config", cfg_s, "list"]);
    assert!(!out.status.success() && text(&out.stderr).contains("port"));
    // Lists are TOML arrays; a key that is not a setting is an error (a
    // typo used to pass silently).
    std::fs::write(
        &cfg,
        format!(
            "database_url = \"sqlite://{}\"\nallowed_hosts = [\"chat.example.com\"]\nfeed_allow = [\"10.0.0.5\"]\n",
            db.display()
        ),
    )
    .expect("write");
    let out = hanlin(&["--config", cfg_s, "admin", "user", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(&cfg, "prot = 8080\n").expect("write");
    let out = hanlin(&["--config", cfg_s, "list"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("prot"),
        "{}",
        text(&out.stderr)
    );
    // Per-model tables: known keys pass, a typo inside one is an error too.
    std::fs::write(
        &cfg,
        format!(
            "database_url = \"sqlite://{}\"\n[models.\"qwen2.5-coder-0.5b\"]\nctx = 2048\nmax_batch = 4\ndraft = \"smollm2-135m\"\n",
            db.display()
        ),
    )
    .expect("write");
    let out = hanlin(&["--config", cfg_s, "admin", "user", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(&cfg, "[models.x]\nctxx = 1\n").expect("write");
    let out = hanlin(&["--config", cfg_s, "list"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("ctxx"),
        "{}",
        text(&out.stderr)
    );
    // MCP servers: the tables are read, a typo in one is an error too.
    std::fs::write(
        &cfg,
        format!(
            "database_url = \"sqlite://{}\"\nmcp_allow = [\"10.0.0.7\"]\n[mcp.parcels]\nurl = \"http://127.0.0.1:9/mcp\"\nplans = [\"plus\"]\n[mcp.files]\ncommand = [\"/bin/true\"]\nenv = {{ PATH = \"/bin\" }}\n",
            db.display()
        ),
    )
    .expect("write");
    let out = hanlin(&["--config", cfg_s, "admin", "user", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(&cfg, "[mcp.parcels]\nurl = \"http://x/\"\ntimeout = 5\n").expect("write");
    let out = hanlin(&["--config", cfg_s, "list"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("timeout"),
        "{}",
        text(&out.stderr)
    );
}

/// A database that cannot be reached at start is one clear error, not a hang.
#[test]
fn serve_with_an_unreachable_database_exits_with_a_clear_error() {
    let out = hanlin(&[
        "serve",
        "--model",
        "smollm2-135m",
        "--port",
        "0",
        "--database-url",
        "postgres://hanlin@127.0.0.1:9/none",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("database") || err.contains("127.0.0.1:9"),
        "{err}"
    );
}

/// `serve --draft` with a draft of another vocabulary stops at start with
/// one error naming both models.
#[test]
fn serve_refuses_a_draft_with_another_vocabulary_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = format!("sqlite://{}", dir.path().join("h.db").display());
    let out = hanlin(&[
        "serve",
        "--model",
        "smollm2-135m",
        "--draft",
        "qwen2.5-coder-0.5b",
        "--port",
        "0",
        "--database-url",
        &db,
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("smollm2-135m")
            && err.contains("qwen2.5-coder-0.5b")
            && err.contains("vocabulary"),
        "{err}"
    );
}

/// Prompt lookup (on by default) and `--draft` change the speed, never the
/// text; a draft with another vocabulary is refused, naming both models.
#[test]
fn speculative_decoding_from_the_command_line() {
    let prompt =
        "Repeat this list exactly: apples, pears, plums, cherries, apples, pears, plums, cherries.";
    let args = [
        "run",
        "qwen2.5-coder-0.5b",
        prompt,
        "--temperature",
        "0",
        "-n",
        "40",
    ];
    let mut plain = args.to_vec();
    plain.extend(["--lookup", "false", "--verbose"]);
    let plain = hanlin(&plain);
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    assert!(!text(&plain.stderr).contains("[speculative: "));
    for lookup in [&["--lookup"][..], &[]] {
        let mut with_lookup = args.to_vec();
        with_lookup.extend(lookup);
        with_lookup.push("--verbose");
        let o = hanlin(&with_lookup);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_eq!(text(&o.stdout), text(&plain.stdout));
        assert!(
            text(&o.stderr).contains("[speculative: "),
            "{}",
            text(&o.stderr)
        );
    }
    let mut bad = args.to_vec();
    bad.extend(["--draft", "smollm2-135m"]);
    // `HANLIN_LOOKUP` (set for `serve`, say) does not stand in the way of a
    // draft: this is the draft's own error, not a clash of options.
    let o = common::hanlin_env(&bad, &[("HANLIN_LOOKUP", "true")]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("smollm2-135m")
            && err.contains("qwen2.5-coder-0.5b")
            && err.contains("vocabulary"),
        "{err}"
    );
}

#[test]
fn image_writes_a_png_that_its_seed_reproduces() {
    let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/tests/data/tiny-sd");
    let dir = tempfile::tempdir().expect("tmp");
    let out = |name: &str| dir.path().join(name).display().to_string();
    let tiny = tiny.display().to_string();
    let args = |o: &str, seed: &str| {
        vec![
            "image".to_string(),
            "画一只在西湖边的猫".into(),
            "-m".into(),
            tiny.clone(),
            "--size".into(),
            "32x48".into(),
            "--steps".into(),
            "3".into(),
            "--seed".into(),
            seed.into(),
            "-o".into(),
            o.into(),
        ]
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        hanlin(&a)
    };
    let o = run(args(&out("a.png"), "5"));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("seed 5"), "{}", text(&o.stderr));
    let a = std::fs::read(out("a.png")).expect("a PNG");
    assert_eq!(&a[1..4], b"PNG");
    // With each step's preview written beside it: the same image.
    let mut with_previews = args(&out("b.png"), "5");
    with_previews.extend(["--previews".to_string(), out("steps")]);
    let o = run(with_previews);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        std::fs::read(out("b.png")).expect("PNG"),
        a,
        "same seed, same image"
    );
    let mut steps: Vec<String> = std::fs::read_dir(out("steps"))
        .expect("previews")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    steps.sort();
    assert_eq!(steps, ["b-step-01.png", "b-step-02.png", "b-step-03.png"]);
    let first = std::fs::read(dir.path().join("steps/b-step-01.png")).expect("preview");
    // Width and height from the PNG header: one pixel per latent without a TAESD.
    let side =
        |at: usize| u32::from_be_bytes([first[at], first[at + 1], first[at + 2], first[at + 3]]);
    assert_eq!((side(16), side(20)), (16, 24), "one pixel per latent");
    assert!(
        text(&o.stderr).contains("previews: 3 steps"),
        "{}",
        text(&o.stderr)
    );
    // Bad input: a clear error, nothing written.
    let mut bad = args(&out("c.png"), "5");
    bad[5] = "30x30".into();
    let o = run(bad);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("multiple of 4"),
        "{}",
        text(&o.stderr)
    );
    assert!(!dir.path().join("c.png").exists());
    let o = run(vec![
        "image".into(),
        "a cat".into(),
        "-m".into(),
        dir.path().display().to_string(),
    ]);
    assert!(
        text(&o.stderr).contains("not a diffusion model"),
        "{}",
        text(&o.stderr)
    );

    // An edit of the first picture: drawn at its size; a mask that is not
    // a PNG or a strength out of range is refused before anything runs.
    let edit = |extra: &[&str], o: &str| {
        let mut a = vec![
            "image".to_string(),
            "a red circle".into(),
            "-m".into(),
            tiny.clone(),
            "--init".into(),
            out("a.png"),
            "--steps".into(),
            "4".into(),
            "--seed".into(),
            "2".into(),
            "-o".into(),
            o.into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        run(a)
    };
    let o = edit(&["--strength", "0.5"], &out("d.png"));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let d = std::fs::read(out("d.png")).expect("PNG");
    let be = |b: &[u8], i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    assert_eq!((be(&d, 16), be(&d, 20)), (32, 48), "the picture's size");
    assert_ne!(d, a);
    std::fs::write(out("m.png"), "not a png").expect("write");
    let o = edit(&["--mask", &out("m.png")], &out("e.png"));
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("not a PNG"), "{}", text(&o.stderr));
    let o = edit(&["--strength", "1.5"], &out("e.png"));
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("strength"), "{}", text(&o.stderr));
    assert!(!dir.path().join("e.png").exists());
}
