//! Models served by upstream servers: fake OpenAI-compatible servers on
//! loopback (that behave, break, hang, lie) and a second Hanlin node.

use crate::common;

use crate::common::{call, MODEL};
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use hanlin_accounts::Plan;
use hanlin_upstream::UpstreamConfig;
use reqwest::Method as M;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Normal,
    Garbage,
    Hang,
    CutMidStream,
    Lie,
    /// Answers well but reports no usage.
    Silent,
}

struct Fake {
    mode: Mutex<Mode>,
    hits: AtomicUsize,
    /// Set to stop: streams in progress break off, new requests fail.
    killed: AtomicBool,
    /// Delay between streamed chunks.
    pace: Duration,
    /// (prompt, completion) tokens reported, summed.
    reported: Mutex<(i64, i64)>,
}

/// Chunks a fake streams for a request: min(max_tokens, 5), or 40 when
/// paced slowly.
fn chunks_for(body: &Value, pace: Duration) -> i64 {
    let asked = body["max_tokens"]
        .as_i64()
        .or(body["max_completion_tokens"].as_i64())
        .unwrap_or(5);
    if pace >= Duration::from_millis(50) {
        asked.min(40)
    } else {
        asked.min(5)
    }
}

async fn fake_chat(State(f): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    f.hits.fetch_add(1, Ordering::SeqCst);
    let mode = *f.mode.lock().expect("lock");
    if f.killed.load(Ordering::SeqCst) {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "stopped").into_response();
    }
    match mode {
        Mode::Garbage => return "this is not json {{{".into_response(),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        _ => {}
    }
    if let Some(r) = tool_turn(&body) {
        return r;
    }
    let n = chunks_for(&body, f.pace);
    let (prompt, completion) = if mode == Mode::Lie {
        (1_000_000, 1_000_000)
    } else {
        (7, n)
    };
    {
        let mut r = f.reported.lock().expect("lock");
        r.0 += prompt;
        r.1 += completion;
    }
    let usage = if mode == Mode::Silent {
        Value::Null
    } else {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    };
    if !body["stream"].as_bool().unwrap_or(false) {
        return Json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok ".repeat(n as usize)}, "finish_reason": "length"}],
            "usage": usage,
        }))
        .into_response();
    }
    assert_eq!(
        body["stream_options"]["include_usage"], true,
        "the gateway asks for usage"
    );
    let f2 = f.clone();
    let events = futures::stream::unfold(0i64, move |i| {
        let (f, usage) = (f2.clone(), usage.clone());
        async move {
            if i > 0 {
                tokio::time::sleep(f.pace).await;
            }
            if f.killed.load(Ordering::SeqCst) || (mode == Mode::CutMidStream && i == 2) {
                return Some((Err(std::io::Error::other("killed")), i + 1000));
            }
            if i < n {
                let c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": null}]});
                Some((Ok(Event::default().data(c.to_string())), i + 1))
            } else if i == n && !usage.is_null() {
                let c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [], "usage": usage});
                Some((Ok(Event::default().data(c.to_string())), i + 1))
            } else if i == n {
                Some((Ok(Event::default().comment("no usage")), i + 1))
            } else if i == n + 1 {
                Some((Ok(Event::default().data("[DONE]")), i + 1))
            } else {
                None
            }
        }
    });
    Sse::new(events).into_response()
}

/// A request that offers tools: the first step calls the calculator (the
/// call streamed in two pieces, as OpenAI's servers do); once a result
/// is there, the answer quotes it. `None`: no tools offered.
fn tool_turn(body: &Value) -> Option<Response> {
    let messages = body["messages"].as_array()?;
    let result = messages.iter().rev().find(|m| m["role"] == "tool");
    if !body["tools"].is_array() && result.is_none() {
        return None;
    }
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let chunks = match result {
        None => vec![
            chunk(
                json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_f1", "type": "function",
                    "function": {"name": "calculator", "arguments": "{\"expression\": "}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"12345 * 6789\"}"}}]}),
                json!("tool_calls"),
            ),
        ],
        // As OpenAI does, a result that names no call made before it is
        // refused.
        Some(m)
            if !messages.iter().any(|a| {
                a["tool_calls"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["id"] == m["tool_call_id"]))
            }) =>
        {
            return Some(
                (
                    axum::http::StatusCode::BAD_REQUEST,
                    Json(json!({"error": {"message": "tool_call_id is missing"}})),
                )
                    .into_response(),
            )
        }
        Some(m) => vec![
            chunk(json!({"content": "The product is "}), Value::Null),
            chunk(json!({"content": m["content"]}), json!("stop")),
        ],
    };
    let usage = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}});
    let events = chunks
        .into_iter()
        .chain([usage])
        .map(|c| Ok::<_, std::convert::Infallible>(Event::default().data(c.to_string())))
        .chain([Ok(Event::default().data("[DONE]"))]);
    Some(Sse::new(futures::stream::iter(events)).into_response())
}

async fn fake(pace: Duration) -> (String, Arc<Fake>) {
    let f = Arc::new(Fake {
        mode: Mutex::new(Mode::Normal),
        hits: AtomicUsize::new(0),
        killed: AtomicBool::new(false),
        pace,
        reported: Mutex::new((0, 0)),
    });
    let app = Router::new()
        .route(
            "/v1/models",
            get(|State(f): State<Arc<Fake>>| async move {
                if f.killed.load(Ordering::SeqCst) {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "stopped").into_response()
                } else {
                    Json(json!({"object": "list", "data": []})).into_response()
                }
            }),
        )
        .route("/v1/chat/completions", post(fake_chat))
        .route("/v1/completions", post(fake_chat))
        .route(
            "/v1/embeddings",
            post(|Json(body): Json<Value>| async move {
                let n = body["input"].as_array().map_or(1, Vec::len);
                let data: Vec<Value> = (0..n)
                    .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.6, 0.8]}))
                    .collect();
                Json(
                    json!({"object": "list", "data": data, "model": body["model"],
                    "usage": {"prompt_tokens": 3 * n, "total_tokens": 3 * n}}),
                )
            }),
        )
        .with_state(f.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, f)
}

fn pool(urls: Vec<String>) -> UpstreamConfig {
    let mut c = UpstreamConfig::new(urls);
    c.first_byte_secs = 2;
    c.idle_secs = 2;
    c.cooldown_secs = 60;
    c.max_tokens = 64;
    c
}

fn small_plan(tokens_per_day: i64) -> Plan {
    Plan::limited("up", 10_000, 10_000_000, tokens_per_day)
}

/// Read an SSE response to its end: the data payloads.
async fn sse(r: reqwest::Response) -> Vec<String> {
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while let Some(Ok(b)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&b));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect()
}

async fn user_tokens(s: &common::TestServer, user: &str) -> (i64, i64) {
    let rows = s.state.db.usage(Some(user), None).await.expect("usage");
    (
        rows.iter().map(|r| r.prompt_tokens).sum(),
        rows.iter().map(|r| r.completion_tokens).sum(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_balanced_metered_and_retried_when_a_node_dies() {
    let (url_a, a) = fake(Duration::from_millis(5)).await;
    let (url_b, b) = fake(Duration::from_millis(5)).await;
    let s = common::start_with(|c| {
        c.upstreams
            .insert("remote".into(), pool(vec![url_a.clone(), url_b.clone()]));
    })
    .await;
    s.plan(small_plan(1_000_000)).await;
    let key = s.user_key("ups", "up").await;
    let base = s.base.clone();

    // The model is listed beside the local ones.
    let (st, models) = call(M::GET, format!("{base}/v1/models"), &key, None).await;
    assert_eq!(st, 200);
    assert!(models["data"]
        .as_array()
        .expect("list")
        .iter()
        .any(|m| m["id"] == "remote"));

    // 24 requests at once, half streamed: spread over both nodes, every
    // one answered, usage as the nodes reported it.
    let client = reqwest::Client::new();
    let answers = futures::future::join_all((0..24).map(|i| {
        let (client, base, key) = (client.clone(), base.clone(), key.clone());
        async move {
            let body = json!({"model": "remote", "messages": [{"role": "user", "content": format!("question {i}")}], "max_tokens": 4, "stream": i % 2 == 0});
            let r = client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            if i % 2 == 0 {
                let events = sse(r).await;
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                // No usage chunk unless the client asked for one.
                assert!(events.iter().all(|e| !e.contains("\"usage\"")), "{events:?}");
                assert!(events[0].contains("\"model\":\"remote\""), "{}", events[0]);
                (7, 4)
            } else {
                let v: Value = r.json().await.expect("json");
                assert_eq!(v["model"], "remote");
                (
                    v["usage"]["prompt_tokens"].as_i64().expect("usage"),
                    v["usage"]["completion_tokens"].as_i64().expect("usage"),
                )
            }
        }
    }))
    .await;
    let (ha, hb) = (a.hits.load(Ordering::SeqCst), b.hits.load(Ordering::SeqCst));
    assert_eq!(ha + hb, 24);
    assert!(ha >= 6 && hb >= 6, "balanced: {ha} and {hb}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let want: (i64, i64) = answers
        .iter()
        .fold((0, 0), |acc, (p, c)| (acc.0 + p, acc.1 + c));
    assert_eq!(user_tokens(&s, "ups").await, want);
    let ra = *a.reported.lock().expect("lock");
    let rb = *b.reported.lock().expect("lock");
    assert_eq!(want, (ra.0 + rb.0, ra.1 + rb.1), "what the nodes reported");

    // Prefix affinity: turns of one conversation go to the node that
    // answered it first (its prefix cache).
    let (ha0, hb0) = (a.hits.load(Ordering::SeqCst), b.hits.load(Ordering::SeqCst));
    let mut history = vec![
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "first question"}),
    ];
    for turn in 0..6 {
        let (st, v) = call(
            M::POST,
            format!("{base}/v1/chat/completions"),
            &key,
            Some(json!({"model": "remote", "messages": history, "max_tokens": 2})),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        history.push(v["choices"][0]["message"].clone());
        history.push(json!({"role": "user", "content": format!("follow-up {turn}")}));
    }
    let (da, db) = (
        a.hits.load(Ordering::SeqCst) - ha0,
        b.hits.load(Ordering::SeqCst) - hb0,
    );
    assert!(
        (da, db) == (6, 0) || (da, db) == (0, 6),
        "one node: {da} and {db}"
    );

    // With usage asked for, the last chunk carries it.
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .expect("send");
    let events = sse(r).await;
    let last: Value = serde_json::from_str(&events[events.len() - 2]).expect("usage chunk");
    assert_eq!(last["usage"]["completion_tokens"], 3);

    // A node dies while streaming: its stream ends with an error, the
    // other's goes on; later requests go to the living node.
    let (url_c, c) = fake(Duration::from_millis(60)).await;
    let (url_d, d) = fake(Duration::from_millis(60)).await;
    drop(s);
    let s = common::start_with(|cfg| {
        cfg.upstreams
            .insert("remote".into(), pool(vec![url_c.clone(), url_d.clone()]));
    })
    .await;
    s.plan(small_plan(1_000_000)).await;
    let key = s.user_key("ups", "up").await;
    let base = s.base.clone();
    let open = |key: String, base: String, q: &'static str| async move {
        reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "remote", "messages": [{"role": "user", "content": q}], "max_tokens": 40, "stream": true}))
            .send()
            .await
            .expect("send")
    };
    let (r1, r2) = tokio::join!(
        open(key.clone(), base.clone(), "count"),
        open(key.clone(), base.clone(), "count again")
    );
    assert_eq!(
        (c.hits.load(Ordering::SeqCst), d.hits.load(Ordering::SeqCst)),
        (1, 1)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.killed.store(true, Ordering::SeqCst);
    let (e1, e2) = tokio::join!(sse(r1), sse(r2));
    let (done, cut) = if e1.last().map(String::as_str) == Some("[DONE]") {
        (e1, e2)
    } else {
        (e2, e1)
    };
    assert_eq!(done.last().map(String::as_str), Some("[DONE]"), "{done:?}");
    assert_eq!(done.len(), 41, "40 chunks and [DONE]: {done:?}");
    let err: Value = serde_json::from_str(cut.last().expect("an event")).expect("json");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cut off")),
        "{cut:?}"
    );
    // The cut stream is metered for what reached its client.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, completion) = user_tokens(&s, "ups").await;
    assert_eq!(completion, 40 + (cut.len() as i64 - 1));
    // Every later request is answered by c (d answers 503 until it is
    // taken out, and each such request is retried on c).
    for i in 0..8 {
        let (st, v) = call(
            M::POST,
            format!("{base}/v1/chat/completions"),
            &key,
            Some(json!({"model": "remote", "messages": [{"role": "user", "content": format!("again {i}")}], "max_tokens": 2})),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
    let before = d.hits.load(Ordering::SeqCst);
    assert!(before >= 3, "d was tried and failed: {before}");
    for i in 0..4 {
        let (st, _) = call(
            M::POST,
            format!("{base}/v1/chat/completions"),
            &key,
            Some(json!({"model": "remote", "messages": [{"role": "user", "content": format!("more {i}")}], "max_tokens": 2})),
        )
        .await;
        assert_eq!(st, 200);
    }
    assert_eq!(
        d.hits.load(Ordering::SeqCst),
        before,
        "a node taken out gets no requests"
    );
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(&format!(
            "hanlin_upstream_healthy{{model=\"remote\",node=\"{url_d}\"}} 0"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("hanlin_upstream_requests_total{model=\"remote\""));
    // Its failed attempts are counted (with the failed health checks they
    // took it out).
    let failed = metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "hanlin_upstream_failed_attempts{{model=\"remote\",node=\"{url_d}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(failed.is_some_and(|n| n >= 1), "{metrics}");
}

/// The most prompt tokens a node may claim for one message of ten bytes:
/// ten, eight for the message's markers, the template's 128.
const BOUND: i64 = 10 + 8 + 128;

/// Upstreams that misbehave: clear errors, no usage that did not happen,
/// none beyond what was reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misbehaving_upstreams_get_clear_errors_and_honest_metering() {
    let (url, f) = fake(Duration::from_millis(5)).await;
    let s = common::start_with(|c| {
        c.upstreams.insert("bad".into(), pool(vec![url.clone()]));
    })
    .await;
    s.plan(small_plan(1_000_000)).await;
    let key = s.user_key("victim", "up").await;
    let chat = |stream: bool| json!({"model": "bad", "messages": [{"role": "user", "content": "0123456789"}], "max_tokens": 8, "stream": stream});
    let url_chat = format!("{}/v1/chat/completions", s.base);

    *f.mode.lock().expect("lock") = Mode::Garbage;
    let (st, v) = call(M::POST, url_chat.clone(), &key, Some(chat(false))).await;
    assert_eq!(st, 502, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not JSON")),
        "{v}"
    );

    *f.mode.lock().expect("lock") = Mode::Hang;
    let t = std::time::Instant::now();
    let (st, v) = call(M::POST, url_chat.clone(), &key, Some(chat(true))).await;
    assert_eq!(st, 502, "{v}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("within 2 s")),
        "{v}"
    );
    assert_eq!(
        user_tokens(&s, "victim").await,
        (0, 0),
        "nothing ran, nothing metered"
    );

    // The node was taken out after those failures; it is put back by hand
    // here (a health check would after the cool-down).
    let pool = s.state.upstreams.get("bad").expect("pool");
    pool.check_health().await;

    *f.mode.lock().expect("lock") = Mode::CutMidStream;
    let r = reqwest::Client::new()
        .post(&url_chat)
        .bearer_auth(&key)
        .json(&chat(true))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let events = sse(r).await;
    assert_eq!(events.len(), 3, "two chunks, then the error: {events:?}");
    assert!(events[2].contains("\"error\""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Two chunks reached the client; the prompt is estimated from its bytes.
    let (p, c) = user_tokens(&s, "victim").await;
    assert_eq!(c, 2);
    assert!(p > 0 && p <= BOUND, "{p}");

    pool.check_health().await;
    *f.mode.lock().expect("lock") = Mode::Lie;
    let (st, v) = call(M::POST, url_chat.clone(), &key, Some(chat(false))).await;
    assert_eq!(st, 200, "{v}");
    // At most one token per prompt byte (+ the template's), at most max_tokens.
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["usage"]["prompt_tokens"].as_i64().expect("n"), BOUND);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (p2, c2) = user_tokens(&s, "victim").await;
    assert_eq!(c2 - c, 8);
    assert_eq!(p2 - p, BOUND);

    // A request larger than the model allows is refused here.
    let (st, v) = call(
        M::POST,
        url_chat.clone(),
        &key,
        Some(json!({"model": "bad", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000})),
    )
    .await;
    assert_eq!(st, 400, "{v}");

    // Quotas hold through upstreams: 16 at once against room for 5.
    *f.mode.lock().expect("lock") = Mode::Normal;
    pool.check_health().await;
    let (p0, c0) = user_tokens(&s, "victim").await;
    let room = 5 * (BOUND + 8);
    s.plan(small_plan(p0 + c0 + room)).await;
    let results = futures::future::join_all(
        (0..16).map(|_| call(M::POST, url_chat.clone(), &key, Some(chat(false)))),
    )
    .await;
    assert!(results.iter().all(|(st, _)| *st == 200 || *st == 429));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (p1, c1) = user_tokens(&s, "victim").await;
    assert!(p1 + c1 - p0 - c0 <= room, "over the quota");
    assert!(results.iter().filter(|(st, _)| *st == 200).count() >= 5);
}

/// Another Hanlin node as the upstream: its key, its model, its usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_hanlin_node_serves_as_upstream() {
    let node = common::start().await;
    let node_url = format!("{}/v1", node.base);
    let node_key = node.admin_key.clone();
    let gw = common::start_with(|c| {
        let mut p = pool(vec![node_url.clone()]);
        p.api_key = Some(node_key.clone());
        p.model = Some(MODEL.into());
        p.first_byte_secs = 60;
        p.idle_secs = 60;
        c.upstreams.insert("far".into(), p);
    })
    .await;
    gw.plan(small_plan(1_000_000)).await;
    let key = gw.user_key("far-user", "up").await;
    let (st, v) = call(
        M::POST,
        format!("{}/v1/chat/completions", gw.base),
        &key,
        Some(json!({"model": "far", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "far");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let here = user_tokens(&gw, "far-user").await;
    assert_eq!(
        here,
        (
            v["usage"]["prompt_tokens"].as_i64().expect("usage"),
            v["usage"]["completion_tokens"].as_i64().expect("usage")
        )
    );
    // The node metered the same request for the gateway's key.
    let rows = node
        .state
        .db
        .usage(Some("root"), None)
        .await
        .expect("usage");
    let there = (
        rows.iter().map(|r| r.prompt_tokens).sum::<i64>(),
        rows.iter().map(|r| r.completion_tokens).sum::<i64>(),
    );
    assert_eq!(here, there);
}

/// A node that reports no usage: the tokenizer configured for its model
/// counts the prompt and the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_configured_tokenizer_counts_what_a_silent_upstream_does_not_report() {
    let (url, f) = fake(Duration::from_millis(5)).await;
    *f.mode.lock().expect("lock") = Mode::Silent;
    let s = common::start_with(|c| {
        let mut p = pool(vec![url.clone()]);
        p.tokenizer = Some(MODEL.into());
        c.upstreams.insert("quiet".into(), p);
    })
    .await;
    s.plan(small_plan(1_000_000)).await;
    let key = s.user_key("q", "up").await;
    let store = hanlin_store::Store::open(hanlin_store::Store::default_home()).expect("store");
    let path = store.path_of(MODEL).expect("store").expect("model");
    let file = hanlin_formats::gguf::GgufFile::open(&path).expect("gguf");
    let tok = hanlin_tokenizer::Tokenizer::from_gguf(&file.header).expect("tokenizer");
    let count = |t: &str| tok.encode_plain(t, false).expect("encode").len() as i64;
    let question = "请用一句话介绍杭州。";
    let want = (count(question) + 4, count(&"tok ".repeat(5)));
    for stream in [false, true] {
        let before = user_tokens(&s, "q").await;
        let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", s.base))
            .bearer_auth(&key)
            .json(&json!({"model": "quiet", "messages": [{"role": "user", "content": question}], "max_tokens": 8, "stream": stream}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        if stream {
            let events = sse(r).await;
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        } else {
            let v: Value = r.json().await.expect("json");
            assert_eq!(v["usage"]["prompt_tokens"], want.0, "{v}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = user_tokens(&s, "q").await;
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            want,
            "stream: {stream}"
        );
    }
}

/// The web app and server-side tools run on an upstream model as on a
/// local one: the reply streams and is saved, the tool loop calls the
/// node's tool calls, and the usage rows are the node's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_web_app_and_server_tools_run_on_an_upstream_model() {
    let (url, f) = fake(Duration::from_millis(5)).await;
    let s = common::start_with(|c| {
        c.upstreams.insert("remote".into(), pool(vec![url.clone()]));
    })
    .await;
    // The web app: the model is offered, a conversation on it answers.
    let (b, _) = common::Browser::register(&s.base, "webber", "correct horse battery").await;
    let (st, models) = b.json(M::GET, "/api/models", None).await;
    assert_eq!(st, 200);
    assert!(
        models["data"]
            .as_array()
            .expect("models")
            .contains(&json!("remote")),
        "{models}"
    );
    let (st, conv) = b
        .json(
            M::POST,
            "/api/conversations",
            Some(json!({"model": "remote"})),
        )
        .await;
    assert_eq!(st, 200, "{conv}");
    let id = conv["id"].as_str().expect("id");
    let events = b
        .send(id, json!({"content": "你好，请介绍一下你自己。"}))
        .await;
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "delta")
        .map(|e| e["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(text, "tok ".repeat(5));
    assert_eq!(events.last().expect("events")["type"], "done", "{events:?}");
    let (_, conv) = b
        .json(M::GET, &format!("/api/conversations/{id}"), None)
        .await;
    let reply = conv["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["role"] == "assistant")
        .expect("a reply")
        .clone();
    assert_eq!(reply["content"], "tok ".repeat(5));
    assert_eq!(reply["status"], "done");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(user_tokens(&s, "webber").await, (7, 5), "the node's usage");

    // Server tools through the API: the node's streamed call runs here,
    // its result goes back to the node with the call's id.
    s.plan(small_plan(1_000_000)).await;
    let key = s.user_key("tooler", "up").await;
    let before = f.hits.load(Ordering::SeqCst);
    let (st, v) = call(
        M::POST,
        format!("{}/v1/chat/completions", s.base),
        &key,
        Some(json!({"model": "remote", "messages": [{"role": "user", "content": "What is 12345 times 6789?"}],
            "hanlin_tools": ["calculator"], "hanlin_tool_options": {"router": false}})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(f.hits.load(Ordering::SeqCst) - before, 2, "two model steps");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(content.contains("83810205"), "{v}");
    let steps = v["hanlin_tools"]["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 1, "{v}");
    assert_eq!(steps[0]["name"], "calculator");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One request, one usage row: both steps' usage as the node reported it.
    let rows = s.state.db.usage(Some("tooler"), None).await.expect("usage");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].requests,
            rows[0].prompt_tokens,
            rows[0].completion_tokens
        ),
        (1, 60, 18)
    );
    assert_eq!(v["usage"]["total_tokens"], 78, "{v}");

    // Embeddings are forwarded and metered from the node's usage.
    let (st, v) = call(
        M::POST,
        format!("{}/v1/embeddings", s.base),
        &key,
        Some(json!({"model": "remote", "input": ["杭州", "West Lake"]})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "remote");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = s.state.db.usage(Some("tooler"), None).await.expect("usage");
    assert_eq!(
        (
            rows[0].requests,
            rows[0].prompt_tokens,
            rows[0].completion_tokens
        ),
        (2, 66, 18)
    );
    let (st, v) = call(
        M::POST,
        format!("{}/v1/embeddings", s.base),
        &key,
        Some(json!({"model": "remote", "input": {"not": "text"}})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
}
