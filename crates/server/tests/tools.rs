//! Server-run tools (`hanlin_tools`) over the real default model: the
//! agent loop on one metered request, its steps in the extension field of
//! the answer and of the stream (never as standard `tool_calls`), and the
//! requests it refuses.

use crate::common;

use crate::common::{call, QWEN};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_servers_tools_run_for_the_callers_their_allow_lists_name() {
    use reqwest::Method as M;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/tests/mcp_stdio.py");
    let srv = common::start_with(|c| {
        let mut shop =
            hanlin_tools::mcp::ServerConfig::stdio(vec!["python3".into(), script.into()]);
        shop.env
            .insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
        shop.plans = vec!["plus".into()];
        c.mcp.insert("shop".into(), shop);
    })
    .await;
    let key = srv.user_key("mia", "plus").await;
    let free = srv.user_key("fred", "free").await;
    let admin = srv.admin_key.clone();

    // The admin screen registers URLs, never programs.
    let (status, v) = call(
        M::PUT,
        format!("{}/v1/admin/mcp/evil", srv.base),
        &admin,
        Some(json!({"command": ["/bin/sh", "-c", "id"]})),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    // A URL on this machine registers, but is not reachable from the
    // admin screen's registrations without --mcp-allow.
    let (status, v) = call(
        M::PUT,
        format!("{}/v1/admin/mcp/local", srv.base),
        &admin,
        Some(json!({"url": "http://127.0.0.1:9/mcp", "timeout_s": 3})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (_, v) = call(M::GET, format!("{}/v1/admin/mcp", srv.base), &admin, None).await;
    let origins: Vec<(&str, &str)> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or(""),
                s["origin"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(origins, [("local", "admin"), ("shop", "config")]);
    // Kept in the database.
    let saved = srv.state.db.setting("mcp_servers").await.expect("setting");
    assert!(saved.is_some_and(|s| s.contains("127.0.0.1:9")));
    let (_, v) = call(
        M::GET,
        format!("{}/v1/admin/mcp/shop/tools", srv.base),
        &admin,
        None,
    )
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert!(v.to_string().contains("shop__order_status"), "{v}");
    let (status, _) = call(
        M::DELETE,
        format!("{}/v1/admin/mcp/shop", srv.base),
        &admin,
        None,
    )
    .await;
    assert_eq!(status, 400, "the config file's servers stay");

    // Who may use what.
    let (_, v) = call(M::GET, format!("{}/v1/tools", srv.base), &free, None).await;
    assert!(!v.to_string().contains("\"shop\""), "{v}");
    let (_, v) = call(M::GET, format!("{}/v1/tools", srv.base), &key, None).await;
    assert!(v.to_string().contains("\"shop\""), "{v}");
    let order = |tools: Value| {
        json!({
            "model": QWEN,
            "temperature": 0,
            "max_tokens": 96,
            "messages": [{"role": "user", "content": "Where is my order 8812? Look it up."}],
            "hanlin_tools": tools,
        })
    };
    let (status, body) = post(&srv.base, &free, order(json!(["shop"]))).await;
    assert_eq!(status, 403, "{body}");

    // The model calls the stdio server's tool; its result is in the steps.
    // One tool of the server, named `server__tool`: the test server's other
    // tools (its environment, a broken transport) are there for other
    // checks, and offering them only invites a 0.5B model to wander.
    let (status, body) = post(
        &srv.base,
        &key,
        order(json!(["shop__order_status", "local"])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let steps = v["hanlin_tools"]["steps"].as_array().expect("steps");
    // The unreachable server is the first step, a short error.
    assert_eq!(steps[0]["name"], "local");
    assert_eq!(steps[0]["ok"], false);
    assert!(
        steps[0]["content"]
            .as_str()
            .unwrap_or("")
            .contains("not a public address"),
        "{steps:?}"
    );
    let call = steps
        .iter()
        .find(|s| s["name"] == "shop__order_status")
        .unwrap_or_else(|| panic!("the model called the MCP tool: {body}"));
    assert_eq!(call["ok"], true, "{call}");
    assert!(call["content"]
        .as_str()
        .unwrap_or("")
        .contains("SF Express"));
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(
        answer.contains("SF") || answer.contains("2026-11-20"),
        "{answer}"
    );
}
