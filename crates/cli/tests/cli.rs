//! The `hanlin` binary as a user runs it (models from the store that
//! scripts/test.sh fills; a missing model fails, never skips).

use std::process::{Command, Output};

fn hanlin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hanlin"))
        .args(args)
        .output()
        .expect("run hanlin")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

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
