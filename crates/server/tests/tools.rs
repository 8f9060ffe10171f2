//! Server-run tools (`hanlin_tools`) over the real default model: the
//! agent loop on one metered request, its steps in the extension field of
//! the answer and of the stream (never as standard `tool_calls`), and the
//! requests it refuses.

mod common;

use common::QWEN;
use serde_json::{json, Value};

async fn post(base: &str, key: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("send");
    (r.status().as_u16(), r.text().await.expect("body"))
}

fn question(extra: Value) -> Value {
    let mut b = json!({
        "model": QWEN,
        "temperature": 0,
        "max_tokens": 96,
        "messages": [{"role": "user", "content": "What is 123456 multiplied by 654321?"}],
        "hanlin_tools": ["calculator", "datetime"]
    });
    for (k, v) in extra.as_object().expect("object") {
        b[k] = v.clone();
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_the_calculator_on_one_metered_request() {
    let srv = common::start().await;
    let key = srv.user_key("tina", "plus").await;

    // The router runs the calculator before the model's first step; the
    // exact product is in the steps, and the answer ends.
    let (status, body) = post(&srv.base, &key, question(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let steps = v["hanlin_tools"]["steps"].as_array().expect("steps");
    assert_eq!(steps[0]["name"], "calculator");
    assert_eq!(steps[0]["step"], 0);
    assert_eq!(steps[0]["ok"], true);
    assert!(
        steps[0]["content"]
            .as_str()
            .is_some_and(|c| c.ends_with("= 80779853376")),
        "{steps:?}"
    );
    let msg = &v["choices"][0]["message"];
    assert!(
        msg["tool_calls"].is_null(),
        "server-run calls are not the client's: {msg}"
    );
    assert!(!msg["content"].as_str().unwrap_or("").trim().is_empty());
    let model_steps = v["hanlin_tools"]["model_steps"].as_i64().expect("steps");
    assert!(model_steps >= 1);
    // Every model step's tokens are in the one answer's usage.
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_i64().expect("prompt") > 300 * model_steps);

    // Streamed: the call and its result as extension events, then the
    // answer as ordinary content; no standard tool_calls anywhere.
    let (status, body) = post(&srv.base, &key, question(json!({"stream": true}))).await;
    assert_eq!(status, 200, "{body}");
    let chunks: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk"))
        .collect();
    assert!(body.trim_end().ends_with("data: [DONE]"));
    let call = chunks
        .iter()
        .position(|c| c["hanlin_tools"]["call"]["name"] == "calculator")
        .expect("a call event");
    let result = chunks
        .iter()
        .position(|c| c["hanlin_tools"]["result"]["ok"] == true)
        .expect("a result event");
    assert!(call < result);
    assert!(!body.contains("\"tool_calls\":[{"), "{body}");
    let last = chunks.last().expect("chunks");
    assert!(last["choices"][0]["finish_reason"].is_string());
    assert!(last["hanlin_tools"]["steps"].is_array());

    // Two requests, two usage rows: each loop is metered once.
    let mut requests = 0;
    for _ in 0..50 {
        let rows = srv.state.db.usage(Some("tina"), None).await.expect("usage");
        requests = rows.iter().map(|r| r.requests).sum::<i64>();
        if requests >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(requests, 2);

    // Refused before any work.
    for (extra, param) in [
        (json!({"hanlin_tools": ["rm_rf"]}), "hanlin_tools"),
        (json!({"hanlin_tools": []}), "hanlin_tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
            "tools",
        ),
        (json!({"n": 2}), "n"),
        (
            json!({"hanlin_tool_options": {"max_steps": 50}}),
            "hanlin_tool_options",
        ),
        (
            json!({"hanlin_tool_options": {"timezone": "Mars/Base"}}),
            "hanlin_tool_options",
        ),
    ] {
        let (status, body) = post(&srv.base, &key, question(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["error"]["param"], param, "{extra}: {body}");
    }
    let rows = srv.state.db.usage(Some("tina"), None).await.expect("usage");
    assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), 2);
}
