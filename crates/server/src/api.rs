//! The OpenAI-compatible endpoints.

use crate::error::ApiError;
use crate::openai::{self, ChatRequest, CompletionRequest, Prompt};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hanlin_accounts::limits::Reservation;
use hanlin_accounts::{Caller, UsageRecord};
use hanlin_engine::{Event, FinishReason, GenerateParams, Job, Scheduler, TokenLogprob};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

type AppResult<T> = Result<T, ApiError>;

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> String {
    for (name, s) in st.models.loaded() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &st.metrics;
        let set = |g: &prometheus::IntGaugeVec, v: usize| {
            g.with_label_values(&[name.as_str()]).set(v as i64)
        };
        set(&m.queue_depth, s.stats.queued.load(Relaxed));
        set(&m.active, s.stats.active.load(Relaxed));
        set(&m.kv_tokens, s.stats.kv_tokens.load(Relaxed));
        set(&m.prefix_pool_tokens, s.stats.pool_tokens.load(Relaxed));
        set(&m.kv_bytes, s.stats.kv_bytes.load(Relaxed));
    }
    st.metrics.render()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("Unknown endpoint.").code("unknown_url")
}

/// The caller behind the request's `Authorization: Bearer` key.
pub async fn auth(st: &AppState, headers: &HeaderMap) -> AppResult<Caller> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). An admin creates keys with `hanlin admin key create --user NAME`.",
        ));
    };
    let secret = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if secret.is_empty() {
        return Err(ApiError::unauthorized(
            "The Authorization header must be `Bearer YOUR_KEY`.",
        ));
    }
    st.db
        .authenticate(secret)
        .await?
        .map_err(|e| ApiError::unauthorized(e.to_string()))
}

fn body_of(body: Result<Bytes, BytesRejection>, limit: usize) -> AppResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("Could not read the request body: {e}"))
        }
    })
}

/// The caller, then their request body parsed against OpenAI's `fields`.
async fn authed_request<T: serde::de::DeserializeOwned>(
    st: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    fields: &[&str],
) -> AppResult<(Caller, T)> {
    let caller = auth(st, headers).await?;
    let body = body_of(body, st.config.max_body)?;
    Ok((caller, openai::parse(&body, fields)?))
}

fn visible(caller: &Caller, model: &str) -> bool {
    caller.plan.allows(model) && caller.key.allows(model)
}

pub async fn list_models(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> AppResult<Json<Value>> {
    let caller = auth(&st, &headers).await?;
    let data: Vec<Value> = st
        .models
        .available()
        .into_iter()
        .filter(|(name, _)| visible(&caller, name))
        .map(|(name, created)| model_json(&name, created))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

fn model_json(name: &str, created: u64) -> Value {
    json!({"id": name, "object": "model", "created": created, "owned_by": "hanlin"})
}

pub async fn get_model(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> AppResult<Json<Value>> {
    let caller = auth(&st, &headers).await?;
    st.models
        .available()
        .into_iter()
        .find(|(name, _)| *name == id && visible(&caller, name))
        .map(|(name, created)| Json(model_json(&name, created)))
        .ok_or_else(|| ApiError::model_not_found(&id))
}

pub(crate) async fn scheduler_for(
    st: &AppState,
    caller: &Caller,
    model: &str,
) -> AppResult<Arc<Scheduler>> {
    if !visible(caller, model) {
        return Err(ApiError::model_not_found(model));
    }
    st.models.get(model).await
}

/// Context left for generation, checked the way OpenAI reports it.
pub(crate) fn budget(
    sched: &Scheduler,
    caller: &Caller,
    prompt_len: usize,
    asked: Option<u32>,
    default: Option<usize>,
    param: &str,
) -> AppResult<usize> {
    let limit = sched
        .config
        .ctx
        .min(caller.plan.max_context.max(1) as usize);
    let fits = |need: usize| need <= limit;
    if !fits(prompt_len + 1) {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {limit} tokens. However, your messages resulted in {prompt_len} tokens. Please reduce the length of the messages."
        ))
        .param("messages")
        .code("context_length_exceeded"));
    }
    match asked {
        Some(0) => Err(ApiError::bad_request(format!(
            "Invalid '{param}': integer below minimum value. Expected a value >= 1, but got 0 instead."
        ))
        .param(param)
        .code("integer_below_min_value")),
        Some(n) if !fits(prompt_len + n as usize) => Err(ApiError::bad_request(format!(
            "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({prompt_len} in the messages, {n} in the completion). Please reduce the length of the messages or completion.",
            prompt_len + n as usize
        ))
        .param(param)
        .code("context_length_exceeded")),
        Some(n) => Ok(n as usize),
        None => Ok(default.unwrap_or(usize::MAX).min(limit - prompt_len)),
    }
}

pub(crate) async fn reserve(
    st: &AppState,
    caller: &Caller,
    needed: usize,
) -> AppResult<Reservation> {
    let day = hanlin_accounts::day_of(hanlin_accounts::now());
    let spent = if st.limiter.knows(&caller.user.id, &day) {
        0
    } else {
        st.db.tokens_on(&caller.user.id, &day).await?
    };
    st.limiter
        .admit(&caller.user.id, &caller.plan, needed as i64, || spent)
        .map_err(|e| {
            let code = match e {
                hanlin_accounts::limits::LimitError::TokensPerDay { .. } => "insufficient_quota",
                _ => "rate_limit_exceeded",
            };
            ApiError::rate_limited(e.to_string(), code, e.retry_after())
        })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// Everything the driver needs to answer one request.
struct Run {
    id: String,
    created: i64,
    model: String,
    kind: Kind,
    n: usize,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    tools: bool,
    caller: Caller,
    sched: Arc<Scheduler>,
    started: Instant,
}

pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = chat_inner(&st, &headers, body).await;
    finish_response(&st, "chat", r)
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = completion_inner(&st, &headers, body).await;
    finish_response(&st, "completions", r)
}

fn finish_response(st: &AppState, endpoint: &str, r: AppResult<Response>) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics
        .requests
        .with_label_values(&[endpoint, resp.status().as_str()])
        .inc();
    resp
}

async fn chat_inner(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> AppResult<Response> {
    let (caller, req): (_, ChatRequest) =
        authed_request(st, headers, body, openai::CHAT_FIELDS).await?;
    let schema = crate::grammar::Grammars::schema_of(req.response_format.as_ref())?;
    let messages = req.template_messages()?;
    let sched = scheduler_for(st, &caller, &req.model).await?;
    let tools = req
        .tools
        .as_ref()
        .filter(|t| !t.is_empty())
        .filter(|_| req.tool_choice.as_ref().and_then(Value::as_str) != Some("none"))
        .map(|t| Value::Array(t.clone()));
    let prompt = chat_prompt(&sched, &messages, tools.as_ref())?;
    let (asked, param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let max_new = budget(&sched, &caller, prompt.len(), asked, None, param)?;
    let logprobs = req.logprobs.unwrap_or(false);
    let top = req.top_logprobs.unwrap_or(0) as usize;
    if top > 20 {
        return Err(
            ApiError::bad_request("'top_logprobs' must be between 0 and 20.")
                .param("top_logprobs")
                .code("invalid_value"),
        );
    }
    if top > 0 && !logprobs {
        return Err(
            ApiError::bad_request("'top_logprobs' requires 'logprobs' to be true.")
                .param("top_logprobs"),
        );
    }
    let params = req.sampling.to_params(max_new, logprobs, top)?;
    let n = req.sampling.n()?;
    let constraints = match &schema {
        Some(schema) => (0..n)
            .map(|_| {
                st.grammars
                    .constraint(&req.model, &sched.model, schema)
                    .map(Some)
            })
            .collect::<AppResult<Vec<_>>>()?,
        None => (0..n).map(|_| None).collect(),
    };
    let run = Run {
        id: format!("chatcmpl-{}", hanlin_accounts::random_token(24)),
        created: hanlin_accounts::now(),
        model: req.model.clone(),
        kind: Kind::Chat,
        n,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
        tools: tools.is_some(),
        caller,
        sched,
        started: Instant::now(),
    };
    start(st, run, prompt, params, constraints).await
}

async fn completion_inner(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> AppResult<Response> {
    let (caller, req): (_, CompletionRequest) =
        authed_request(st, headers, body, openai::COMPLETION_FIELDS).await?;
    if req.echo.unwrap_or(false) {
        return Err(ApiError::bad_request("'echo' is not supported.").param("echo"));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::bad_request("'best_of' is not supported.").param("best_of"));
    }
    let prompt_text = match &req.prompt {
        Prompt::One(s) => s.clone(),
        Prompt::Many(v) if v.len() == 1 => v[0].clone(),
        Prompt::Many(_) => {
            return Err(ApiError::bad_request(
                "Send one prompt per request (a list of several prompts is not supported).",
            )
            .param("prompt"))
        }
    };
    let sched = scheduler_for(st, &caller, &req.model).await?;
    let m = &sched.model;
    let prompt = match &req.suffix {
        Some(suffix) => fim_prompt(m, &prompt_text, suffix).ok_or_else(|| {
            ApiError::bad_request(format!(
                "The model `{}` has no fill-in-the-middle tokens, so 'suffix' cannot be used.",
                req.model
            ))
            .param("suffix")
        })?,
        None => m
            .tokenizer
            .encode(&prompt_text, true)
            .map_err(|e| ApiError::bad_request(format!("Tokenizing the prompt failed: {e}")))?,
    };
    // OpenAI's default for completions is 16 tokens.
    let max_new = budget(
        &sched,
        &caller,
        prompt.len(),
        req.max_tokens,
        Some(16),
        "max_tokens",
    )?;
    let top = req.logprobs.unwrap_or(0) as usize;
    if top > 5 {
        return Err(ApiError::bad_request("'logprobs' must be between 0 and 5.")
            .param("logprobs")
            .code("invalid_value"));
    }
    let params = req
        .sampling
        .to_params(max_new, req.logprobs.is_some(), top)?;
    let n = req.sampling.n()?;
    let run = Run {
        id: format!("cmpl-{}", hanlin_accounts::random_token(24)),
        created: hanlin_accounts::now(),
        model: req.model.clone(),
        kind: Kind::Text,
        n,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: req.logprobs.is_some(),
        tools: false,
        caller,
        sched,
        started: Instant::now(),
    };
    let constraints = (0..n).map(|_| None).collect();
    start(st, run, prompt, params, constraints).await
}

/// Qwen2.5-Coder style fill-in-the-middle prompt, when the vocabulary has
/// the FIM tokens as single special tokens.
fn fim_prompt(m: &hanlin_engine::LoadedModel, prefix: &str, suffix: &str) -> Option<Vec<u32>> {
    let tok = &m.tokenizer;
    let special = |s: &str| -> Option<u32> {
        let ids = tok.encode(s, false).ok()?;
        (ids.len() == 1).then(|| ids[0])
    };
    let (p, s, mid) = (
        special("<|fim_prefix|>")?,
        special("<|fim_suffix|>")?,
        special("<|fim_middle|>")?,
    );
    let mut out = vec![p];
    out.extend(tok.encode(prefix, false).ok()?);
    out.push(s);
    out.extend(tok.encode(suffix, false).ok()?);
    out.push(mid);
    Some(out)
}

/// The token ids of `messages` in the model's chat template, ready for the
/// assistant's turn.
pub(crate) fn chat_prompt(
    sched: &Scheduler,
    messages: &[hanlin_tokenizer::Message],
    tools: Option<&Value>,
) -> AppResult<Vec<u32>> {
    let m = &sched.model;
    let text = m.template.render(messages, tools, true).map_err(|e| {
        ApiError::bad_request(format!("The chat template failed: {e}")).param("messages")
    })?;
    m.tokenizer
        .encode(&text, true)
        .map_err(|e| ApiError::bad_request(format!("Tokenizing the messages failed: {e}")))
}

/// A job the scheduler refused: a full queue is a 429 to retry shortly.
pub(crate) fn submit_error(e: hanlin_engine::SubmitError) -> ApiError {
    match e {
        hanlin_engine::SubmitError::QueueFull(_) => ApiError::rate_limited(
            "The server is busy: too many requests are waiting. Please retry shortly.",
            "server_busy",
            Duration::from_secs(1),
        ),
        hanlin_engine::SubmitError::Stopped => ApiError::unavailable(e.to_string()),
    }
}

/// Submit the request's jobs and answer it (stream or whole).
async fn start(
    st: &Arc<AppState>,
    run: Run,
    prompt: Vec<u32>,
    params: GenerateParams,
    constraints: Vec<Option<Box<dyn hanlin_engine::TokenConstraint>>>,
) -> AppResult<Response> {
    let needed = (prompt.len() + params.max_tokens) * run.n;
    let reservation = reserve(st, &run.caller, needed).await?;
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Event)>();
    for (i, constraint) in constraints.into_iter().enumerate() {
        let tx = tx.clone();
        let mut p = params.clone();
        // Choices differ when sampling: each gets its own seed.
        p.sampler.seed = p.sampler.seed.wrapping_add(i as u64);
        let job = Job {
            prompt: prompt.clone(),
            params: p,
            priority: run.caller.plan.priority as i32,
            embed: false,
            constraint,
            sink: Box::new(move |e| tx.send((i, e)).is_ok()),
        };
        if let Err(e) = run.sched.submit(job) {
            st.limiter.settle(reservation, 0);
            return Err(submit_error(e));
        }
    }
    drop(tx);
    let (out_tx, mut out_rx) = mpsc::channel::<Result<String, ApiError>>(64);
    let stream = run.stream;
    let st2 = st.clone();
    tokio::spawn(drive(st2, run, rx, out_tx, reservation));
    if stream {
        let s = futures::stream::unfold(out_rx, |mut rx| async move {
            let item = rx.recv().await?;
            let ev = match item {
                Ok(data) => SseEvent::default().data(data),
                Err(e) => SseEvent::default().data(
                    json!({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
                        .to_string(),
                ),
            };
            Some((Ok::<_, Infallible>(ev), rx))
        });
        Ok(Sse::new(s).into_response())
    } else {
        match out_rx.recv().await {
            Some(Ok(body)) => Ok((
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()),
            Some(Err(e)) => Err(e),
            None => Err(ApiError::internal("the generation ended without an answer")),
        }
    }
}

#[derive(Default)]
struct Choice {
    text: String,
    finish: Option<&'static str>,
    logprobs: Vec<Value>,
    completion_tokens: usize,
    sent_role: bool,
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextFull | FinishReason::Cancelled => "length",
    }
}

fn lp_json(tok: &hanlin_tokenizer::Tokenizer, lp: &TokenLogprob) -> Value {
    let bytes = tok.token_bytes(lp.id, false);
    json!({
        "token": String::from_utf8_lossy(bytes),
        "logprob": lp.logprob,
        "bytes": bytes,
    })
}

/// Consume the scheduler's events for one request and produce its answer;
/// on the way out (finished, failed or abandoned), meter it.
async fn drive(
    st: Arc<AppState>,
    run: Run,
    mut rx: mpsc::UnboundedReceiver<(usize, Event)>,
    out: mpsc::Sender<Result<String, ApiError>>,
    reservation: Reservation,
) {
    let tok = &run.sched.model.tokenizer;
    let mut choices: Vec<Choice> = (0..run.n).map(|_| Choice::default()).collect();
    let (mut prompt_tokens, mut cached_tokens, mut admitted) = (0usize, 0usize, false);
    let mut first_token: Option<Instant> = None;
    let mut last_token = Instant::now();
    let mut failed: Option<String> = None;
    let mut gone = false;
    let mut usage_writer: Option<UsageWriter> = None;
    let model_label = [run.model.as_str()];
    // Streams with tools are buffered: tool calls are parsed from the whole text.
    let stream_text = run.stream && !run.tools;
    loop {
        // A client that goes away is noticed even while nothing is generated
        // for it (queued, or in a long prefill).
        let (i, ev) = tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => ev,
                None => break,
            },
            _ = out.closed() => {
                gone = true;
                break;
            }
        };
        let mut chunk: Option<Value> = None;
        match ev {
            Event::Started {
                prompt_tokens: p,
                cached_tokens: c,
            } => {
                if !admitted {
                    admitted = true;
                    prompt_tokens = p;
                    cached_tokens = c;
                    let mut w =
                        UsageWriter::start(&st, &run.caller, &run.id, &run.model, run.created);
                    w.write([p, c, 0]);
                    usage_writer = Some(w);
                }
                if run.stream && run.kind == Kind::Chat && !choices[i].sent_role {
                    choices[i].sent_role = true;
                    chunk = Some(
                        json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
                    );
                }
            }
            Event::Token {
                text,
                tokens,
                logprobs,
            } => {
                let now = Instant::now();
                match first_token {
                    None => {
                        first_token = Some(now);
                        st.metrics
                            .ttft
                            .with_label_values(&model_label)
                            .observe((now - run.started).as_secs_f64());
                    }
                    Some(_) => st
                        .metrics
                        .inter_token
                        .with_label_values(&model_label)
                        .observe((now - last_token).as_secs_f64()),
                }
                last_token = now;
                choices[i].completion_tokens += tokens;
                if let Some(w) = usage_writer.as_mut().filter(|w| w.due()) {
                    let done: usize = choices.iter().map(|c| c.completion_tokens).sum();
                    w.write([prompt_tokens, cached_tokens, done]);
                }
                let c = &mut choices[i];
                c.text.push_str(&text);
                let lps: Vec<Value> = logprobs
                    .iter()
                    .map(|(chosen, top)| {
                        let mut v = lp_json(tok, chosen);
                        v["top_logprobs"] = top.iter().map(|t| lp_json(tok, t)).collect();
                        v
                    })
                    .collect();
                if run.logprobs {
                    c.logprobs.extend(lps.iter().cloned());
                }
                if stream_text && (!text.is_empty() || !lps.is_empty()) {
                    let lp = if run.logprobs {
                        json!({"content": lps})
                    } else {
                        Value::Null
                    };
                    chunk = Some(match run.kind {
                        Kind::Chat => {
                            json!({"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": null})
                        }
                        Kind::Text => {
                            json!({"index": i, "text": text, "logprobs": lp, "finish_reason": null})
                        }
                    });
                }
            }
            Event::Done {
                finish,
                completion_tokens,
                ..
            } => {
                let c = &mut choices[i];
                c.finish = Some(finish_str(finish));
                c.completion_tokens = completion_tokens;
                if run.stream {
                    let mut delta = json!({});
                    let mut reason = finish_str(finish);
                    if run.tools {
                        let (content, calls) = crate::tools::split_tool_calls(&c.text);
                        delta = json!({"content": content});
                        if !calls.is_empty() {
                            delta["tool_calls"] = calls
                                .into_iter()
                                .enumerate()
                                .map(|(k, mut call)| {
                                    call["index"] = json!(k);
                                    call
                                })
                                .collect();
                            reason = "tool_calls";
                        }
                    }
                    chunk = Some(match run.kind {
                        Kind::Chat => {
                            json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": reason})
                        }
                        Kind::Text => {
                            json!({"index": i, "text": "", "logprobs": null, "finish_reason": reason})
                        }
                    });
                }
            }
            Event::Failed(msg) => {
                failed = Some(msg);
                break;
            }
            Event::Embedding(_) | Event::Queued { .. } | Event::Prefill { .. } => {}
        }
        if let Some(c) = chunk {
            if out.send(Ok(stream_chunk(&run, c))).await.is_err() {
                gone = true;
                break;
            }
        }
        if choices.iter().all(|c| c.finish.is_some()) {
            break;
        }
    }
    // Abandoned or finished: free the sequences now (their sinks start failing).
    drop(rx);
    let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    });
    if !gone {
        let reply = match &failed {
            Some(msg) => Err(ApiError::internal(format!("Generation failed: {msg}"))),
            None if run.stream => {
                if run.include_usage {
                    let mut c = stream_envelope(&run, Vec::new());
                    c["usage"] = usage.clone();
                    let _ = out.send(Ok(c.to_string())).await;
                }
                Ok("[DONE]".to_string())
            }
            None => Ok(whole_response(&run, &choices, &usage).to_string()),
        };
        let _ = out.send(reply).await;
    }
    // The response ends here, whatever the database is doing.
    drop(out);
    // Meter exactly what the engine counted.
    let used = if admitted {
        prompt_tokens + completion_tokens
    } else {
        0
    };
    st.limiter.settle(reservation, used as i64);
    if let Some(w) = usage_writer {
        meter(
            &st,
            &run.caller,
            &run.model,
            w,
            [prompt_tokens, cached_tokens, completion_tokens],
        )
        .await;
    }
}

/// How often a running request's usage row is brought up to date, bounding
/// what a killed process leaves unrecorded.
const USAGE_CHECKPOINT: Duration = Duration::from_secs(2);

/// One request's usage row, written in order by its own task: the row is
/// created when the engine admits the request (so even a process killed
/// mid-answer leaves the prompt and the tokens up to the last checkpoint on
/// record), updated every [`USAGE_CHECKPOINT`] and settled at the end.
/// Writes are keyed by the request id (idempotent) and retried until the
/// database accepts them; queued checkpoints are coalesced to the newest.
pub(crate) struct UsageWriter {
    tx: mpsc::UnboundedSender<UsageRecord>,
    task: tokio::task::JoinHandle<()>,
    rec: UsageRecord,
    last: Instant,
}

impl UsageWriter {
    pub(crate) fn start(
        st: &AppState,
        caller: &Caller,
        request_id: &str,
        model: &str,
        ts: i64,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<UsageRecord>();
        let db = st.db.clone();
        let task = tokio::spawn(async move {
            while let Some(mut rec) = rx.recv().await {
                while let Ok(newer) = rx.try_recv() {
                    rec = newer;
                }
                let mut delay = Duration::from_millis(100);
                let mut attempt = 0u32;
                while let Err(e) = db.record_usage(&rec).await {
                    attempt += 1;
                    tracing::warn!(attempt, "recording usage for {}: {e}", rec.request_id);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        });
        Self {
            tx,
            task,
            rec: UsageRecord {
                request_id: request_id.to_string(),
                key_id: caller.key.id.clone(),
                user_id: caller.user.id.clone(),
                model: model.to_string(),
                ts,
                prompt_tokens: 0,
                cached_tokens: 0,
                completion_tokens: 0,
            },
            last: Instant::now(),
        }
    }

    pub(crate) fn write(&mut self, [prompt, cached, completion]: [usize; 3]) {
        self.rec.prompt_tokens = prompt as i64;
        self.rec.cached_tokens = cached as i64;
        self.rec.completion_tokens = completion as i64;
        self.last = Instant::now();
        // The task lives until this sender is dropped.
        let _ = self.tx.send(self.rec.clone());
    }

    /// Whether the last write is older than [`USAGE_CHECKPOINT`].
    pub(crate) fn due(&self) -> bool {
        self.last.elapsed() >= USAGE_CHECKPOINT
    }

    /// The final counts, then wait until every write is in the database.
    async fn settle(mut self, counts: [usize; 3]) {
        self.write(counts);
        drop(self.tx);
        if let Err(e) = self.task.await {
            tracing::error!("usage writer for {}: {e}", self.rec.request_id);
        }
    }
}

/// Count a finished request in the metrics and settle its usage row.
pub(crate) async fn meter(
    st: &AppState,
    caller: &Caller,
    model: &str,
    writer: UsageWriter,
    counts: [usize; 3],
) {
    for (kind, n) in ["prompt", "cached", "completion"].into_iter().zip(counts) {
        st.metrics
            .tokens
            .with_label_values(&[caller.key.id.as_str(), model, kind])
            .inc_by(n as u64);
    }
    writer.settle(counts).await;
}

pub async fn embeddings(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = embeddings_inner(&st, &headers, body).await;
    finish_response(&st, "embeddings", r)
}

async fn embeddings_inner(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> AppResult<Response> {
    use base64::Engine as _;
    let (caller, req): (_, openai::EmbeddingRequest) =
        authed_request(st, headers, body, openai::EMBEDDING_FIELDS).await?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid encoding_format '{other}': use 'float' or 'base64'."
            ))
            .param("encoding_format"))
        }
    };
    let sched = scheduler_for(st, &caller, &req.model).await?;
    let tok = &sched.model.tokenizer;
    let inputs: Vec<Vec<u32>> = match req.input {
        openai::EmbeddingInput::One(s) => vec![encode_input(tok, &s)?],
        openai::EmbeddingInput::Many(v) => v
            .iter()
            .map(|s| encode_input(tok, s))
            .collect::<AppResult<_>>()?,
        openai::EmbeddingInput::Tokens(t) => vec![t],
        openai::EmbeddingInput::ManyTokens(t) => t,
    };
    if inputs.is_empty() || inputs.len() > 2048 {
        return Err(ApiError::bad_request("'input' must hold 1 to 2048 items.").param("input"));
    }
    let vocab = sched.model.model.cfg.vocab_size as u32;
    let limit = sched
        .config
        .ctx
        .min(caller.plan.max_context.max(1) as usize);
    for (i, t) in inputs.iter().enumerate() {
        if t.is_empty() {
            return Err(ApiError::bad_request(format!("input[{i}] is empty.")).param("input"));
        }
        if t.len() > limit {
            return Err(ApiError::bad_request(format!(
                "This model's maximum context length is {limit} tokens, however input[{i}] has {} tokens.",
                t.len()
            ))
            .param("input")
            .code("context_length_exceeded"));
        }
        if t.iter().any(|&id| id >= vocab) {
            return Err(ApiError::bad_request(format!(
                "input[{i}] has a token id outside the vocabulary."
            ))
            .param("input"));
        }
    }
    let total: usize = inputs.iter().map(Vec::len).sum();
    let reservation = reserve(st, &caller, total).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Event)>();
    for (i, prompt) in inputs.iter().enumerate() {
        let tx = tx.clone();
        let job = Job {
            prompt: prompt.clone(),
            params: GenerateParams::default(),
            priority: caller.plan.priority as i32,
            embed: true,
            constraint: None,
            sink: Box::new(move |e| tx.send((i, e)).is_ok()),
        };
        if let Err(e) = sched.submit(job) {
            st.limiter.settle(reservation, 0);
            return Err(ApiError::rate_limited(
                format!("The server is busy ({e}). Please retry shortly."),
                "server_busy",
                Duration::from_secs(1),
            ));
        }
    }
    drop(tx);
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
    let mut failed = None;
    let mut done_tokens = 0;
    while let Some((i, ev)) = rx.recv().await {
        match ev {
            Event::Embedding(v) => vectors[i] = Some(v),
            Event::Done { prompt_tokens, .. } => done_tokens += prompt_tokens,
            Event::Failed(m) => failed = Some(m),
            _ => {}
        }
    }
    st.limiter.settle(reservation, done_tokens as i64);
    let id = format!("emb-{}", hanlin_accounts::random_token(24));
    if done_tokens > 0 {
        let w = UsageWriter::start(st, &caller, &id, &req.model, hanlin_accounts::now());
        // Settled in the background: the answer does not wait for the database.
        let (st, caller, model) = (st.clone(), caller.clone(), req.model.clone());
        tokio::spawn(async move { meter(&st, &caller, &model, w, [done_tokens, 0, 0]).await });
    }
    if let Some(m) = failed {
        return Err(ApiError::internal(format!("Embedding failed: {m}")));
    }
    let mut data = Vec::with_capacity(vectors.len());
    for (i, v) in vectors.into_iter().enumerate() {
        let mut v = v.ok_or_else(|| ApiError::internal("an embedding is missing"))?;
        if let Some(d) = req.dimensions {
            // Matryoshka-style truncation, renormalised.
            v.truncate((d as usize).clamp(1, v.len()));
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= n);
        }
        let embedding = if base64 {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            json!(v)
        };
        data.push(json!({"object": "embedding", "index": i, "embedding": embedding}));
    }
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }))
    .into_response())
}

fn encode_input(tok: &hanlin_tokenizer::Tokenizer, s: &str) -> AppResult<Vec<u32>> {
    tok.encode(s, true).map_err(|e| {
        ApiError::bad_request(format!("Tokenizing the input failed: {e}")).param("input")
    })
}

fn stream_envelope(run: &Run, choices: Vec<Value>) -> Value {
    let object = match run.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    let mut v = json!({
        "id": run.id,
        "object": object,
        "created": run.created,
        "model": run.model,
        "system_fingerprint": null,
        "choices": choices,
    });
    if run.include_usage {
        v["usage"] = Value::Null;
    }
    v
}

fn stream_chunk(run: &Run, choice: Value) -> String {
    stream_envelope(run, vec![choice]).to_string()
}

fn whole_response(run: &Run, choices: &[Choice], usage: &Value) -> Value {
    let list: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let reason = c.finish.unwrap_or("length");
            match run.kind {
                Kind::Chat => {
                    let lp = if run.logprobs {
                        json!({"content": c.logprobs, "refusal": null})
                    } else {
                        Value::Null
                    };
                    let mut message = json!({"role": "assistant", "content": c.text, "refusal": null});
                    let mut reason = reason;
                    if run.tools {
                        let (content, calls) = crate::tools::split_tool_calls(&c.text);
                        if !calls.is_empty() {
                            message["content"] = if content.is_empty() {
                                Value::Null
                            } else {
                                json!(content)
                            };
                            message["tool_calls"] = json!(calls);
                            reason = "tool_calls";
                        }
                    }
                    json!({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
                }
                Kind::Text => {
                    let lp = if run.logprobs {
                        json!({
                            "tokens": c.logprobs.iter().map(|l| l["token"].clone()).collect::<Vec<_>>(),
                            "token_logprobs": c.logprobs.iter().map(|l| l["logprob"].clone()).collect::<Vec<_>>(),
                            "top_logprobs": c.logprobs.iter().map(|l| {
                                let mut m = serde_json::Map::new();
                                for t in l["top_logprobs"].as_array().into_iter().flatten() {
                                    if let Some(s) = t["token"].as_str() {
                                        m.insert(s.to_string(), t["logprob"].clone());
                                    }
                                }
                                Value::Object(m)
                            }).collect::<Vec<_>>(),
                        })
                    } else {
                        Value::Null
                    };
                    json!({"index": i, "text": c.text, "logprobs": lp, "finish_reason": reason})
                }
            }
        })
        .collect();
    let object = match run.kind {
        Kind::Chat => "chat.completion",
        Kind::Text => "text_completion",
    };
    json!({
        "id": run.id,
        "object": object,
        "created": run.created,
        "model": run.model,
        "system_fingerprint": null,
        "choices": list,
        "usage": usage,
    })
}
