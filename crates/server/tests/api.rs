//! The HTTP API over a real model: OpenAI-shaped errors for bad input,
//! exact rate limits and quotas under concurrency, exact metering, the admin
//! API, metrics, and a vanished client freeing its sequence.

use crate::common;

use crate::common::{start, MODEL};
use hanlin_accounts::Plan;
use serde_json::{json, Value};
use std::time::Duration;

/// The server's `/metrics` page.
async fn metrics(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text")
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(base: &str, path: &str, key: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_json(base: &str, path: &str, key: &str) -> Value {
    client()
        .get(format!("{base}{path}"))
        .bearer_auth(key)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}

fn chat(max_tokens: u32) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens, "temperature": 0})
}

fn err_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_and_the_server_stays_up() {
    let srv = start().await;
    let base = &srv.base;
    let key = srv.user_key("eve", "free").await;
    let url = format!("{base}/v1/chat/completions");

    // Keys: missing, wrong, revoked, expired.
    let r = client()
        .post(&url)
        .json(&chat(4))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        post(base, "/v1/chat/completions", "sk-hl-bogus", chat(4))
            .await
            .0,
        401
    );
    let u = srv
        .state
        .db
        .user_by_name("eve")
        .await
        .expect("db")
        .expect("eve");
    let (k, revoked) = srv
        .state
        .db
        .create_key(&u.id, &Default::default())
        .await
        .expect("key");
    srv.state.db.revoke_key(&k.id).await.expect("revoke");
    let (s, v) = post(base, "/v1/chat/completions", &revoked, chat(4)).await;
    assert_eq!(
        (
            s,
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("revoked")
        ),
        (401, true)
    );
    let (_, expired) = srv
        .state
        .db
        .create_key(
            &u.id,
            &hanlin_accounts::NewKey {
                expires_at: Some(hanlin_accounts::now() - 5),
                ..Default::default()
            },
        )
        .await
        .expect("key");
    let (s, v) = post(base, "/v1/chat/completions", &expired, chat(4)).await;
    assert_eq!(
        (
            s,
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("expired")
        ),
        (401, true)
    );

    // Malformed JSON, wrong types, unknown fields, bad values.
    let r = client()
        .post(&url)
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &key,
        json!({"model": MODEL, "messages": "hi"}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(base, "/v1/chat/completions", &key, json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frobnicate": true})).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("frobnicate")));
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &key,
        json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
    )
    .await;
    assert_eq!((s, err_code(&v)), (400, "invalid_value"));
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &key,
        json!({"model": MODEL, "messages": []}),
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("messages")));
    let (s, v) = post(base, "/v1/chat/completions", &key, json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000})).await;
    assert_eq!((s, err_code(&v)), (400, "context_length_exceeded"));
    let (s, v) = post(base, "/v1/chat/completions", &key, json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})).await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("response_format"))
    );

    // A prompt longer than the plan's context (free: 4096 tokens).
    let long = "长城 ".repeat(5000);
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &key,
        json!({"model": MODEL, "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!((s, err_code(&v)), (400, "context_length_exceeded"));

    // Bodies over the limit (256 KiB in these tests).
    let huge = "x".repeat(300 * 1024);
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &key,
        json!({"model": MODEL, "messages": [{"role": "user", "content": huge}]}),
    )
    .await;
    assert_eq!((s, err_code(&v)), (413, "request_too_large"));

    // Unknown model, unknown endpoint.
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &key,
        json!({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!((s, err_code(&v)), (404, "model_not_found"));
    let r = client()
        .get(format!("{base}/v1/nope"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);

    // A key scoped to one model cannot use another.
    let (_, scoped) = srv
        .state
        .db
        .create_key(
            &u.id,
            &hanlin_accounts::NewKey {
                models: Some(vec![common::QWEN.into()]),
                ..Default::default()
            },
        )
        .await
        .expect("key");
    let (s, v) = post(base, "/v1/chat/completions", &scoped, chat(4)).await;
    assert_eq!((s, err_code(&v)), (404, "model_not_found"));
    let models = get_json(base, "/v1/models", &scoped).await;
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1));

    // After all that, the server still answers.
    let (s, v) = post(base, "/v1/chat/completions", &key, chat(4)).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_quotas_are_exact_under_concurrency() {
    let srv = start().await;
    srv.plan(Plan {
        name: "tiny".into(),
        requests_per_minute: 5,
        tokens_per_minute: 1_000_000,
        tokens_per_day: 1_000_000,
        max_context: 2048,
        models: vec!["*".into()],
        priority: 0,
        max_n: 4,
        price_milli: 1000,
        file_bytes: hanlin_accounts::DEFAULT_FILE_BYTES,
        batch_price_milli: hanlin_accounts::DEFAULT_BATCH_PRICE,
        images_per_day: hanlin_accounts::DEFAULT_IMAGES_PER_DAY,
    })
    .await;
    let key = srv.user_key("burst", "tiny").await;
    // 64 concurrent clients against a limit of 5 requests per minute.
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (base, key) = (srv.base.clone(), key.clone());
            tokio::spawn(async move {
                let r = client()
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&chat(2))
                    .send()
                    .await
                    .expect("send");
                let retry = r.headers().get("retry-after").is_some();
                (r.status().as_u16(), retry)
            })
        })
        .collect();
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.expect("task") {
            (200, _) => ok += 1,
            (429, true) => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, limited), (5, 59));

    // Daily token quota: a reservation that cannot fit is refused with
    // insufficient_quota; what was admitted is metered exactly.
    srv.plan(Plan {
        name: "daily".into(),
        requests_per_minute: 1000,
        tokens_per_minute: 1_000_000,
        tokens_per_day: 400,
        max_context: 2048,
        models: vec!["*".into()],
        priority: 0,
        max_n: 4,
        price_milli: 1000,
        file_bytes: hanlin_accounts::DEFAULT_FILE_BYTES,
        batch_price_milli: hanlin_accounts::DEFAULT_BATCH_PRICE,
        images_per_day: hanlin_accounts::DEFAULT_IMAGES_PER_DAY,
    })
    .await;
    let key = srv.user_key("saver", "daily").await;
    let mut spent = 0u64;
    let mut refused = None;
    for _ in 0..20 {
        let (s, v) = post(&srv.base, "/v1/chat/completions", &key, chat(40)).await;
        match s {
            200 => spent += v["usage"]["total_tokens"].as_u64().expect("usage"),
            429 => {
                refused = Some(v);
                break;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    let refused = refused.expect("the daily quota ran out");
    assert_eq!(err_code(&refused), "insufficient_quota");
    assert!(spent > 0 && spent <= 400, "spent {spent}");
    // The database has exactly what the responses reported.
    let mut metered = 0;
    for _ in 0..50 {
        let rows = srv
            .state
            .db
            .usage(Some("saver"), None)
            .await
            .expect("usage");
        metered = rows
            .iter()
            .map(|r| (r.prompt_tokens + r.completion_tokens) as u64)
            .sum();
        if metered == spent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metered, spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_metrics_and_vanished_clients() {
    let srv = start().await;
    let base = &srv.base;
    let user_key = srv.user_key("carol", "free").await;
    // Non-admins are refused.
    let r = client()
        .get(format!("{base}/v1/admin/users"))
        .bearer_auth(&user_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    // The admin creates a plus user and key through the API.
    let (s, v) = post(
        base,
        "/v1/admin/keys",
        &srv.admin_key,
        json!({"user": "dave", "plan": "plus"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let dave = v["key"].as_str().expect("key").to_string();
    assert_eq!(v["plan"], "plus");
    let (s, _) = post(base, "/v1/chat/completions", &dave, chat(3)).await;
    assert_eq!(s, 200);
    // Usage is written just after the answer goes out: allow it a moment.
    let mut usage = Value::Null;
    for _ in 0..50 {
        usage = get_json(base, "/v1/admin/usage?user=dave", &srv.admin_key).await;
        if usage["data"][0]["user"] == "dave" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(usage["data"][0]["user"], "dave", "{usage}");
    // Revoking through the API takes effect at once.
    let id = v["id"].as_str().expect("id");
    let r = client()
        .delete(format!("{base}/v1/admin/keys/{id}"))
        .bearer_auth(&srv.admin_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(
        post(base, "/v1/chat/completions", &dave, chat(3)).await.0,
        401
    );

    // A streaming client that goes away frees its sequence.
    let mut r = client()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(&user_key)
        .json(&json!({"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 2000, "temperature": 0, "stream": true}))
        .send()
        .await
        .expect("send");
    let first = r.chunk().await.expect("chunk");
    assert!(first.is_some());
    // Its usage is on record while it runs (recorded at admission, then
    // checkpointed every 2 s), so a server killed mid-answer loses at most
    // the tokens since the last checkpoint.
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(2600) {
        assert!(
            r.chunk().await.expect("chunk").is_some(),
            "the count ended early"
        );
    }
    let mut rows = Vec::new();
    for _ in 0..50 {
        rows = srv
            .state
            .db
            .usage(Some("carol"), None)
            .await
            .expect("usage");
        if rows.first().is_some_and(|u| u.completion_tokens > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].requests, 1);
    assert!(rows[0].prompt_tokens > 0, "{rows:?}");
    assert!(rows[0].completion_tokens > 0, "{rows:?}");
    drop(r);
    let sched = srv.state.models.get(MODEL).await.expect("model");
    let mut freed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if sched
            .stats
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            freed = true;
            break;
        }
    }
    assert!(freed, "the abandoned sequence is still running");

    let text = metrics(base).await;
    for m in [
        "hanlin_requests_total",
        "hanlin_time_to_first_token_seconds",
        "hanlin_inter_token_latency_seconds",
        "hanlin_tokens_total",
        "hanlin_queue_depth",
        "hanlin_kv_cache_tokens",
        "hanlin_kv_cache_bytes",
        "hanlin_lookup_proposed_tokens",
        "hanlin_lookup_accepted_tokens",
    ] {
        assert!(text.contains(m), "{m} missing from /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_load_on_demand_and_the_least_recently_used_is_evicted() {
    // Room for the default model (491 MB) or SmolLM2 (~100 MB) with
    // Gemma 3 (253 MB), but not for the default model with another.
    let srv = common::start_with(|c| c.memory_budget = 520 << 20).await;
    let key = srv.user_key("multi", "plus").await;
    let loaded = || {
        let mut v: Vec<String> = srv
            .state
            .models
            .loaded()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        v.sort();
        v
    };
    assert!(
        loaded().is_empty(),
        "nothing is loaded before the first request"
    );
    let ask = |model: &'static str| {
        let (base, key) = (srv.base.clone(), key.clone());
        async move {
            let body = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0});
            post(&base, "/v1/chat/completions", &key, body).await
        }
    };
    for m in [MODEL, "gemma3-270m"] {
        let (s, v) = ask(m).await;
        assert_eq!(s, 200, "{m}: {v}");
    }
    assert_eq!(loaded(), ["gemma3-270m", MODEL]);
    // The default model does not fit beside either: both go.
    let (s, v) = ask(common::QWEN).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(loaded(), [common::QWEN]);
    // Every pulled model is listed whether loaded or not.
    let models = get_json(&srv.base, "/v1/models", &key).await;
    assert!(
        models["data"].as_array().map_or(0, Vec::len) >= 3,
        "{models}"
    );
    // A model whose file does not load evicts nobody: the loaded model
    // stays (it used to be evicted before the load was tried).
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("broken.gguf");
    let mut junk = b"GGUF".to_vec();
    // 40 MB: with the 491 MB default model that is over the 520 MB budget.
    junk.extend(std::iter::repeat_n(0xA5u8, 40 << 20));
    std::fs::write(&bad, &junk).expect("write");
    let name = format!("broken-{}", std::process::id());
    let store = hanlin_store::Store::open(hanlin_store::Store::default_home()).expect("store");
    store.import_file(&name, &bad).expect("import");
    let (s, v) = ask_named(&srv.base, &key, &name).await;
    store.remove(&name).expect("remove");
    assert!(s >= 500, "{v}");
    assert_eq!(loaded(), [common::QWEN], "the loaded model stayed");
}

async fn ask_named(base: &str, key: &str, model: &str) -> (u16, Value) {
    let body =
        json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    post(base, "/v1/chat/completions", key, body).await
}

/// The same API from `curl`, as a shell user would call it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_streaming_and_plain() {
    let srv = start().await;
    let key = srv.user_key("shell", "free").await;
    let url = format!("{}/v1/chat/completions", srv.base);
    let auth = format!("Authorization: Bearer {key}");
    let run = |body: String| {
        let (url, auth) = (url.clone(), auth.clone());
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["-sN", "--fail-with-body", &url, "-H", &auth, "-H"])
                .arg("Content-Type: application/json")
                .args(["-d", &body])
                .output()
                .await
                .expect("curl is installed (.ci/run installs it)");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        }
    };
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0});
    let (ok, text) = run(body.to_string()).await;
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["object"], "chat.completion");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (ok, text) = run(streamed.to_string()).await;
    assert!(ok, "{text}");
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk JSON"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(
        content,
        v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
    );
    // curl sees the HTTP error and OpenAI's error body.
    let (ok, text) = run("{not json".into()).await;
    assert!(!ok && text.contains("invalid_request_error"), "{text}");
}

/// `[models.NAME] draft`: the model gets a draft that guesses ahead in
/// its batch (the same text as without, the guesses counted in /metrics),
/// and the draft's weights count toward the memory budget; a draft with
/// another vocabulary makes loading fail with an error naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_a_draft_gives_the_same_text_and_counts_its_guesses() {
    let ask = json!({"model": MODEL, "messages": [{"role": "user", "content": "Write a short poem about the sea."}], "max_tokens": 40, "temperature": 0});
    let plain = common::start().await;
    let (st, v) = post(
        &plain.base,
        "/v1/chat/completions",
        &plain.admin_key,
        ask.clone(),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let want = v["choices"][0]["message"]["content"].clone();
    let s = common::start_with(|c| {
        c.per_model.insert(
            MODEL.to_string(),
            hanlin_server::models::ModelSettings {
                draft: Some(MODEL.to_string()),
                ..Default::default()
            },
        );
        // Lookup off: every guess is the draft's.
        c.sched.lookup = hanlin_engine::Lookup::Off;
    })
    .await;
    let (st, v) = post(&s.base, "/v1/chat/completions", &s.admin_key, ask.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], want);
    let sched = s.state.models.get(MODEL).await.expect("loaded");
    assert!(sched.draft.is_some());
    let metrics = metrics(&s.base).await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(MODEL))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    let (proposed, accepted) = (
        value("hanlin_draft_proposed_tokens"),
        value("hanlin_draft_accepted_tokens"),
    );
    assert!(
        proposed > 0.0 && accepted > 0.0 && accepted <= proposed,
        "draft guesses {accepted} of {proposed} kept\n{metrics}"
    );

    let bad = common::start_with(|c| {
        c.per_model.insert(
            MODEL.to_string(),
            hanlin_server::models::ModelSettings {
                draft: Some(common::QWEN.to_string()),
                ..Default::default()
            },
        );
    })
    .await;
    let e = bad.state.models.get(MODEL).await.err().expect("refused");
    assert!(
        e.message.contains(common::QWEN)
            && e.message.contains(MODEL)
            && e.message.contains("vocabulary"),
        "{}",
        e.message
    );
}

/// `[models.NAME]` settings reach that model's scheduler only: a context
/// of 64 tokens there refuses what the server-wide context allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_settings_apply_to_their_model() {
    let s = common::start_with(|c| {
        c.per_model.insert(
            MODEL.to_string(),
            hanlin_server::models::ModelSettings {
                ctx: Some(64),
                ..Default::default()
            },
        );
    })
    .await;
    let key = s.admin_key.clone();
    let ask = |max_tokens: usize, model: &'static str| {
        let (base, key) = (s.base.clone(), key.clone());
        async move {
            post(&base, "/v1/chat/completions", &key, json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})).await
        }
    };
    let (st, v) = ask(100, MODEL).await;
    assert_eq!((st, err_code(&v)), (400, "context_length_exceeded"), "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap_or("").contains("64"),
        "{v}"
    );
    let (st, v) = ask(4, MODEL).await;
    assert_eq!(st, 200, "{v}");
    // Another model keeps the server-wide context.
    let (st, v) = ask(100, common::QWEN).await;
    assert_eq!(st, 200, "{v}");
}
