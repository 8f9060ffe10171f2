//! The Files and Batch APIs on a real model (SmolLM2-135M): upload, run,
//! results mapped by `custom_id`, usage at the batch price, the files a
//! bad input makes, cancel, expiry, another user's files, the storage
//! quota, and a runner killed mid-batch that resumes without losing or
//! repeating a line.

use crate::common;

use crate::common::{call, MODEL};
use futures::StreamExt;
use hanlin_accounts::Plan;
use reqwest::Method as M;
use serde_json::{json, Value};
use std::time::Duration;

/// `POST /v1/files` with a multipart form, as the `openai` client sends it.
async fn upload(base: &str, key: &str, name: &str, purpose: &str, bytes: &[u8]) -> (u16, Value) {
    let req = reqwest::Client::new()
        .post(format!("{base}/v1/files"))
        .bearer_auth(key);
    upload_as(req, name, purpose, bytes).await
}

/// The same upload, authenticated as `req` is.
async fn upload_as(
    req: reqwest::RequestBuilder,
    name: &str,
    purpose: &str,
    bytes: &[u8],
) -> (u16, Value) {
    let (ty, body) = common::multipart(&[
        ("purpose", None, purpose.as_bytes()),
        ("file", Some(name), bytes),
    ]);
    let r = req
        .header("content-type", ty)
        .body(body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn chat_line(id: &str, text: &str) -> String {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "max_tokens": 6, "temperature": 0,
                 "messages": [{"role": "user", "content": text}]}})
    .to_string()
}

fn jsonl(lines: &[String]) -> Vec<u8> {
    let mut s = lines.join("\n");
    s.push('\n');
    s.into_bytes()
}

async fn create(base: &str, key: &str, file: &str, window: &str) -> (u16, Value) {
    call(
        M::POST,
        format!("{base}/v1/batches"),
        key,
        Some(
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
            "completion_window": window, "metadata": {"job": "test"}}),
        ),
    )
    .await
}

/// Poll until the batch leaves the running states.
async fn wait(base: &str, key: &str, id: &str) -> Value {
    for _ in 0..600 {
        let (_, b) = call(M::GET, format!("{base}/v1/batches/{id}"), key, None).await;
        let s = b["status"].as_str().unwrap_or("").to_string();
        if !["validating", "in_progress", "finalizing", "cancelling"].contains(&s.as_str()) {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("batch {id} did not finish");
}

async fn content(base: &str, key: &str, id: &Value) -> Vec<Value> {
    let r = reqwest::Client::new()
        .get(format!(
            "{base}/v1/files/{}/content",
            id.as_str().expect("file id")
        ))
        .bearer_auth(key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    r.text()
        .await
        .expect("text")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_its_lines_and_bad_input_gets_openai_errors() {
    let s = common::start().await;
    let runner = hanlin_server::batch::spawn_runner(s.state.clone());
    let base = &s.base;
    let key = s.user_key("bea", "free").await;
    let other = s.user_key("olaf", "free").await;

    // Six good lines and one the handler refuses (an unknown parameter).
    let mut lines: Vec<String> = (0..6)
        .map(|i| chat_line(&format!("q{i}"), &format!("Count to {i}.")))
        .collect();
    let mut bad: Value = serde_json::from_str(&chat_line("bad", "hi")).expect("json");
    bad["body"]["temperature"] = json!(7);
    lines.push(bad.to_string());
    let (st, f) = upload(base, &key, "in.jsonl", "batch", &jsonl(&lines)).await;
    assert_eq!(st, 200, "{f}");
    assert_eq!(f["object"], "file");
    assert_eq!(f["purpose"], "batch");
    assert!(f["expires_at"].as_i64().is_some());
    let file_id = f["id"].as_str().expect("id").to_string();

    // Another user sees nothing of it.
    let (st, _) = call(M::GET, format!("{base}/v1/files/{file_id}"), &other, None).await;
    assert_eq!(st, 404);
    let (st, _) = create(base, &other, &file_id, "24h").await;
    assert_eq!(st, 404);

    let (st, b) = create(base, &key, &file_id, "24h").await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["object"], "batch");
    assert_eq!(b["status"], "validating");
    assert_eq!(b["request_counts"]["total"], 7);
    assert_eq!(b["metadata"]["job"], "test");
    let id = b["id"].as_str().expect("id").to_string();
    let (_, other_view) = call(M::GET, format!("{base}/v1/batches/{id}"), &other, None).await;
    assert_eq!(other_view["error"]["param"], "batch_id");

    // The input file can go now: the batch keeps its lines.
    let (st, d) = call(M::DELETE, format!("{base}/v1/files/{file_id}"), &key, None).await;
    assert_eq!((st, d["deleted"].clone()), (200, json!(true)));

    let done = wait(base, &key, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 7, "completed": 6, "failed": 1})
    );
    for k in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[k].as_i64().is_some(), "{k}: {done}");
    }
    let out = content(base, &key, &done["output_file_id"]).await;
    assert_eq!(out.len(), 6);
    let mut prompt_tokens = 0;
    let mut completion_tokens = 0;
    for (i, l) in out.iter().enumerate() {
        assert_eq!(l["custom_id"], format!("q{i}"));
        assert_eq!(l["response"]["status_code"], 200);
        let body = &l["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert!(!body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .is_empty());
        prompt_tokens += body["usage"]["prompt_tokens"].as_i64().expect("usage");
        completion_tokens += body["usage"]["completion_tokens"].as_i64().expect("usage");
    }
    let errors = content(base, &key, &done["error_file_id"]).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "bad");
    assert_eq!(errors[0]["response"]["status_code"], 400);
    assert_eq!(
        errors[0]["response"]["body"]["error"]["param"],
        "temperature"
    );

    // Metered as batch lines, at half price, one usage row per line.
    let u = s
        .state
        .db
        .user_by_name("bea")
        .await
        .expect("db")
        .expect("user");
    let lines_rows = s.state.db.usage(Some("bea"), None).await.expect("usage");
    // Summed over the days the lines were metered on (a run can cross midnight).
    let mut days: Vec<&str> = lines_rows.iter().map(|r| r.day.as_str()).collect();
    days.dedup();
    let mut spent = 0;
    for day in days {
        spent += s.state.db.tokens_on(&u.id, day).await.expect("usage");
    }
    assert_eq!(lines_rows.iter().map(|r| r.requests).sum::<i64>(), 6);
    assert_eq!(
        lines_rows.iter().map(|r| r.prompt_tokens).sum::<i64>(),
        prompt_tokens
    );
    assert!(
        (spent - (prompt_tokens + completion_tokens) / 2).abs() <= 6,
        "{spent} vs {}",
        prompt_tokens + completion_tokens
    );

    // The output file is the user's, listed, and another user cannot read it.
    let (_, list) = call(
        M::GET,
        format!("{base}/v1/files?purpose=batch_output"),
        &key,
        None,
    )
    .await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2));
    let (st, _) = call(
        M::GET,
        format!(
            "{base}/v1/files/{}/content",
            done["output_file_id"].as_str().unwrap_or("")
        ),
        &other,
        None,
    )
    .await;
    assert_eq!(st, 404);
    let (_, mine) = call(M::GET, format!("{base}/v1/batches?limit=5"), &key, None).await;
    assert_eq!(mine["data"][0]["id"], id.as_str());
    assert_eq!(mine["has_more"], false);

    // A file with a malformed line, a duplicate custom_id, another
    // endpoint and another model fails validation, line by line.
    let mut wrong_url: Value = serde_json::from_str(&chat_line("w", "x")).expect("json");
    wrong_url["url"] = json!("/v1/embeddings");
    let mut wrong_model: Value = serde_json::from_str(&chat_line("m", "x")).expect("json");
    wrong_model["body"]["model"] = json!(common::QWEN);
    // A line larger than a request body may be (the test server takes
    // 256 KiB) would have bypassed the API's body limit.
    let huge = chat_line("h", &"字".repeat(100_000));
    let bad_file = jsonl(&[
        chat_line("a", "x"),
        "{not json".into(),
        chat_line("a", "y"),
        wrong_url.to_string(),
        wrong_model.to_string(),
        huge,
    ]);
    let (_, f) = upload(base, &key, "bad.jsonl", "batch", &bad_file).await;
    let (st, b) = create(base, &key, f["id"].as_str().expect("id"), "24h").await;
    assert_eq!(st, 200);
    assert_eq!(b["status"], "failed");
    let errs: Vec<(i64, String)> = b["errors"]["data"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            (
                e["line"].as_i64().unwrap_or(0),
                e["code"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        errs,
        vec![
            (2, "invalid_json_line".to_string()),
            (3, "duplicate_custom_id".to_string()),
            (4, "mismatched_endpoint".to_string()),
            (5, "mismatched_model".to_string()),
            (6, "request_too_large".to_string()),
        ]
    );
    // A file uploaded for something else, an unknown endpoint or window.
    let (_, notes) = upload(base, &key, "notes.txt", "user_data", b"hello").await;
    let (st, e) = create(base, &key, notes["id"].as_str().expect("id"), "24h").await;
    assert_eq!(
        (st, e["error"]["param"].clone()),
        (400, json!("input_file_id"))
    );
    let (st, e) = create(base, &key, &file_id, "2 days").await;
    assert_eq!(st, 400, "{e}");
    let (st, e) = upload(base, &key, "x.jsonl", "launch", b"{}").await;
    assert_eq!((st, e["error"]["param"].clone()), (400, json!("purpose")));

    // Cancelled before it runs: every line says so in the error file.
    let many: Vec<String> = (0..40)
        .map(|i| chat_line(&format!("c{i}"), "Hello"))
        .collect();
    let (_, f) = upload(base, &key, "many.jsonl", "batch", &jsonl(&many)).await;
    let many_id = f["id"].as_str().expect("id").to_string();
    let (_, b) = create(base, &key, &many_id, "24h").await;
    let cid = b["id"].as_str().expect("id").to_string();
    let (st, c) = call(
        M::POST,
        format!("{base}/v1/batches/{cid}/cancel"),
        &key,
        None,
    )
    .await;
    assert_eq!(st, 200, "{c}");
    assert!(["cancelling", "cancelled"].contains(&c["status"].as_str().unwrap_or("")));
    let done = wait(base, &key, &cid).await;
    assert_eq!(done["status"], "cancelled");
    let counts = &done["request_counts"];
    assert_eq!(
        counts["completed"].as_i64().unwrap_or(0) + counts["failed"].as_i64().unwrap_or(0),
        40
    );
    let errs = content(base, &key, &done["error_file_id"]).await;
    assert!(errs.iter().all(|e| e["error"]["code"] == "batch_cancelled"));
    let (st, _) = call(
        M::POST,
        format!("{base}/v1/batches/{cid}/cancel"),
        &key,
        None,
    )
    .await;
    assert_eq!(st, 409);

    // A one-second window: what did not run is `batch_expired`.
    let lots: Vec<String> = (0..200)
        .map(|i| chat_line(&format!("e{i}"), "Hello"))
        .collect();
    let (_, f) = upload(base, &key, "lots.jsonl", "batch", &jsonl(&lots)).await;
    let (_, b) = create(base, &key, f["id"].as_str().expect("id"), "1s").await;
    let done = wait(base, &key, b["id"].as_str().expect("id")).await;
    assert_eq!(done["status"], "expired", "{done}");
    let errs = content(base, &key, &done["error_file_id"]).await;
    assert!(errs.iter().any(|e| e["error"]["code"] == "batch_expired"));

    // The plan's storage quota.
    s.plan(Plan {
        name: "tiny".into(),
        requests_per_minute: 100,
        tokens_per_minute: 100_000,
        tokens_per_day: 1_000_000,
        max_context: 4096,
        models: vec!["*".into()],
        priority: 0,
        max_n: 1,
        price_milli: 1000,
        file_bytes: 1000,
        batch_price_milli: 500,
        images_per_day: hanlin_accounts::DEFAULT_IMAGES_PER_DAY,
    })
    .await;
    let small = s.user_key("tim", "tiny").await;
    let (st, _) = upload(base, &small, "a.txt", "user_data", &[b'a'; 600]).await;
    assert_eq!(st, 200);
    let (st, e) = upload(base, &small, "b.txt", "user_data", &[b'b'; 600]).await;
    assert_eq!(
        (st, e["error"]["code"].clone()),
        (400, json!("storage_quota_exceeded"))
    );

    // Two uploads at once, each fitting the empty quota alone: both pass
    // the check made before their bodies are read (their bodies arrive
    // slowly), and only one may be kept.
    let tam = s.user_key("tam", "tiny").await;
    let (a, b) = tokio::join!(
        slow_upload(base, &tam, &[b'x'; 600]),
        slow_upload(base, &tam, &[b'y'; 600])
    );
    let mut codes = vec![a, b];
    codes.sort_by_key(|c| c.0);
    assert_eq!(
        codes,
        vec![(200, Value::Null), (400, json!("storage_quota_exceeded"))]
    );
    let (_, list) = call(M::GET, format!("{base}/v1/files"), &tam, None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1), "{list}");
    runner.abort();
}

/// An upload whose body arrives in two parts 400 ms apart; the status and
/// the error code.
async fn slow_upload(base: &str, key: &str, bytes: &[u8]) -> (u16, Value) {
    let boundary = "hanlin-slow-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nuser_data\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.txt\"\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let tail = body.split_off(body.len() / 2);
    let parts = futures::stream::iter([body, tail]).then(|part| async move {
        if part.ends_with(b"--\r\n") {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        Ok::<_, std::io::Error>(part)
    });
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/files"))
        .bearer_auth(key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(reqwest::Body::wrap_stream(parts))
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v["error"]["code"].clone())
}

/// A runner killed mid-batch: a new one finishes it, every line once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resumes_after_its_runner_dies() {
    // Two lines at a time, so the runner dies with lines left.
    let s = common::start_with(|c| c.batch_parallel = 2).await;
    let base = &s.base;
    let key = s.user_key("rex", "free").await;
    let n = 12;
    // Long answers (about a second each), so the kill lands mid-batch.
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let mut l: Value = serde_json::from_str(&chat_line(
                &format!("r{i}"),
                &format!("Count from {i} to 200, one number per line."),
            ))
            .expect("json");
            l["body"]["max_tokens"] = json!(128);
            l.to_string()
        })
        .collect();
    let (_, f) = upload(base, &key, "r.jsonl", "batch", &jsonl(&lines)).await;
    let (_, b) = create(base, &key, f["id"].as_str().expect("id"), "24h").await;
    let id = b["id"].as_str().expect("id").to_string();
    let first = hanlin_server::batch::spawn_runner(s.state.clone());
    // Kill it once some lines are done.
    for _ in 0..600 {
        let (_, b) = call(M::GET, format!("{base}/v1/batches/{id}"), &key, None).await;
        if b["request_counts"]["completed"].as_i64().unwrap_or(0) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.abort();
    let _ = first.await;
    let (_, mid) = call(M::GET, format!("{base}/v1/batches/{id}"), &key, None).await;
    assert_eq!(mid["status"], "in_progress", "{mid}");
    assert!(mid["request_counts"]["completed"].as_i64().unwrap_or(0) < n);
    let second = hanlin_server::batch::spawn_runner(s.state.clone());
    let done = wait(base, &key, &id).await;
    second.abort();
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["request_counts"],
        json!({"total": n, "completed": n, "failed": 0})
    );
    let out = content(base, &key, &done["output_file_id"]).await;
    let ids: Vec<String> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap_or("").to_string())
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    assert_eq!(ids, want);
    // One usage row per line, however often a line was started.
    let rows = s.state.db.usage(Some("rex"), None).await.expect("usage");
    assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_app_runs_batches_with_its_session() {
    let s = common::start().await;
    let runner = hanlin_server::batch::spawn_runner(s.state.clone());
    let base = &s.base;
    let (web, _) = common::Browser::register(base, "wen", "a long enough password 7").await;
    let lines = jsonl(&[chat_line("w1", "你好"), chat_line("w2", "Hello")]);
    let post = || web.http.post(format!("{base}/v1/files"));

    // A session without its CSRF token uploads nothing; nor does no
    // session at all.
    let (st, _) = upload_as(
        post().header("cookie", &web.cookie),
        "w.jsonl",
        "batch",
        &lines,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _) = upload_as(post(), "w.jsonl", "batch", &lines).await;
    assert_eq!(st, 401);
    let (st, f) = upload_as(web.req(M::POST, "/v1/files"), "w.jsonl", "batch", &lines).await;
    assert_eq!(st, 200, "{f}");
    let (st, b) = web
        .json(
            M::POST,
            "/v1/batches",
            Some(json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})),
        )
        .await;
    assert_eq!((st, b["status"].clone()), (200, json!("validating")), "{b}");
    let id = b["id"].as_str().expect("id").to_string();
    let done = loop {
        let (_, b) = web.json(M::GET, &format!("/v1/batches/{id}"), None).await;
        if !["validating", "in_progress", "finalizing"]
            .contains(&b["status"].as_str().unwrap_or(""))
        {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The runner acted as the web app for this user: both lines answered.
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 2, "{done}");
    let out = web
        .req(
            M::GET,
            &format!(
                "/v1/files/{}/content",
                done["output_file_id"].as_str().expect("output")
            ),
        )
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert_eq!(out.lines().count(), 2, "{out}");
    // Metered to the user, under the web app's pseudo-key.
    let (_, usage) = web.json(M::GET, "/api/usage", None).await;
    let requests: i64 = usage["data"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["requests"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(requests, 2, "{usage}");
    runner.abort();
}
