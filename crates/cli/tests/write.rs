//! `hanlin write` on the real default model: articles from the example
//! season in Chinese and English, each fact-checked, the index and report,
//! a second run that resumes, and a template that reads a missing field.

use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;
use common::{hanlin, text};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/write")
        .join(name)
}

#[test]
fn articles_from_rows_checked_indexed_and_resumed() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("articles");
    let data = example("football.csv");
    let template = example("football.jinja");
    let args = [
        "write",
        data.to_str().expect("path"),
        "--template",
        template.to_str().expect("path"),
        "--lang",
        "zh,en",
        "--limit",
        "2",
        "-o",
        out.to_str().expect("path"),
        "--max-tokens",
        "200",
    ];
    let run = hanlin(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let index: Vec<Value> = std::fs::read_to_string(out.join("index.jsonl"))
        .expect("index")
        .lines()
        .map(|l| serde_json::from_str(l).expect("index line"))
        .collect();
    assert_eq!(index.len(), 4, "two rows in two languages");
    for e in &index {
        let path = out.join(e["path"].as_str().expect("path"));
        let md = std::fs::read_to_string(&path).expect("article");
        match e["status"].as_str() {
            // A passed article is where the index says, a title and a body.
            Some("passed") => {
                assert!(md.starts_with("# ") && md.lines().count() >= 3, "{md}");
                assert!(e["problems"].is_null());
            }
            // A flagged one is kept apart, its problems named in the file.
            Some("flagged") => {
                assert!(path.starts_with(out.join("flagged")));
                assert!(md.starts_with("<!-- not in the data:"), "{md}");
            }
            other => panic!("status {other:?}"),
        }
    }
    let zh: Vec<&Value> = index.iter().filter(|e| e["lang"] == "zh").collect();
    assert_eq!(zh.len(), 2);
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report"))
            .expect("json");
    assert_eq!(report["articles"], 4);
    assert_eq!(
        report["passed"].as_u64().unwrap_or(0) + report["flagged"].as_u64().unwrap_or(0),
        4
    );
    let stdout = text(&run.stdout);
    assert!(stdout.contains("passed the fact check"), "{stdout}");

    // The same command again: everything is there, nothing is redone.
    let again = hanlin(&args);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("0 written, 4 already there"),
        "{}",
        text(&again.stdout)
    );
    let lines = std::fs::read_to_string(out.join("index.jsonl"))
        .expect("index")
        .lines()
        .count();
    assert_eq!(lines, 4);

    // A template that reads a field the rows lack: named, nothing written.
    let bad = dir.path().join("bad.jinja");
    std::fs::write(&bad, "{{ home_zh }} {{ coach }}").expect("write");
    let out2 = dir.path().join("bad-out");
    let run = hanlin(&[
        "write",
        data.to_str().expect("path"),
        "--template",
        bad.to_str().expect("path"),
        "--limit",
        "1",
        "-o",
        out2.to_str().expect("path"),
    ]);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("no field `coach`"),
        "{}",
        text(&run.stderr)
    );
}
