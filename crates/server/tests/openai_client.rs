//! The official `openai` Python package against a real server (installed by
//! scripts/test.sh; a missing package fails the test).

use crate::common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client() {
    let srv = common::start().await;
    let key = srv.user_key("py", "plus").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let python = std::env::var("HANLIN_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env("HANLIN_BASE", &srv.base)
        .env("HANLIN_KEY", &key)
        .env("HANLIN_MODEL", common::MODEL)
        .env("HANLIN_QWEN", common::QWEN)
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"));
    // Each of the 17 successful requests (12 of text, 5 of speech) is
    // metered once (usage is written
    // just after the answer goes out, so allow it a moment); the refused
    // ones are not metered.
    let mut requests = 0;
    for _ in 0..50 {
        let rows = srv.state.db.usage(Some("py"), None).await.expect("usage");
        requests = rows.iter().map(|r| r.requests).sum::<i64>();
        if requests >= 17 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(requests, 17);
}
