//! Models served by upstream servers (`[models.NAME] upstream = [...]`):
//! the request is authenticated, limited and metered here like any other
//! (`hanlin_gateway`), then forwarded to a node of the model's
//! [`Pool`](hanlin_upstream::Pool), and the answer relayed. Usage comes from
//! the node's `usage` (streams ask for `stream_options.include_usage`),
//! checked against what can be seen: the prompt cannot have more tokens
//! than bytes (byte-level BPE) plus what a chat template adds
//! (`template_tokens`), the answer no more than the `max_tokens`
//! the node was given and no fewer than the chunks that carried text.

use crate::api::Via;
use crate::error::ApiError;
use crate::AppState;
use axum::body::Bytes;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use hanlin_accounts::{Caller, Usage};
use hanlin_engine::GenerateParams;
use hanlin_gateway::{Endpoint, Request};
use hanlin_tokenizer::Tokenizer;
use hanlin_upstream::{Pool, Reply, UpstreamError};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

type AppResult<T> = Result<T, ApiError>;

/// Every upstream model's pool, by the name it is served as here.
#[derive(Default)]
pub struct Upstreams {
    pools: std::collections::BTreeMap<String, Arc<Pool>>,
    /// Tokenizers that count a model's tokens when its nodes report none
    /// (`tokenizer = "…"`: a model in the local store).
    counters: std::collections::BTreeMap<String, Arc<Tokenizer>>,
}

impl Upstreams {
    pub fn new(
        config: &std::collections::BTreeMap<String, hanlin_upstream::UpstreamConfig>,
    ) -> Result<Self, UpstreamError> {
        let mut pools = std::collections::BTreeMap::new();
        for (name, c) in config {
            pools.insert(name.clone(), Arc::new(Pool::new(name, c.clone())?));
        }
        Ok(Self {
            pools,
            counters: Default::default(),
        })
    }

    /// Load the tokenizers the pools name from `store` (each file read
    /// once, its tokenizer kept, its weights dropped).
    pub async fn load_tokenizers(
        &mut self,
        store: &hanlin_store::Store,
    ) -> Result<(), UpstreamError> {
        for (name, pool) in &self.pools {
            let Some(tok) = pool.config.tokenizer.clone() else {
                continue;
            };
            let bad = |why: String| UpstreamError::Config(name.clone(), why);
            let path = store
                .path_of(&tok)
                .map_err(|e| bad(e.to_string()))?
                .ok_or_else(|| {
                    bad(format!(
                        "tokenizer {tok:?} is not in the model store (hanlin pull {tok})"
                    ))
                })?;
            let t = tokio::task::spawn_blocking(move || {
                let f = hanlin_formats::gguf::GgufFile::open(&path).map_err(|e| e.to_string())?;
                Tokenizer::from_gguf(&f.header).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| bad(e.to_string()))?
            .map_err(|e| bad(format!("tokenizer {tok:?}: {e}")))?;
            self.counters.insert(name.clone(), Arc::new(t));
        }
        Ok(())
    }

    pub fn get(&self, model: &str) -> Option<Arc<Pool>> {
        self.pools.get(model).cloned()
    }

    /// The tokenizer that counts `model`'s tokens, when one is configured.
    pub fn counter(&self, model: &str) -> Option<Arc<Tokenizer>> {
        self.counters.get(model).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.pools.keys()
    }

    /// Check every node of every pool every `every` (a node taken out is
    /// put back when it answers again).
    pub fn spawn_health_checks(st: &Arc<AppState>, every: std::time::Duration) {
        if st.upstreams.pools.is_empty() {
            return;
        }
        let st = Arc::downgrade(st);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(st) = st.upgrade() else { return };
                for pool in st.upstreams.pools.values() {
                    pool.check_health().await;
                }
            }
        });
    }

    /// Bring the per-node gauges up to date (before `/metrics` renders).
    pub fn gauges(&self, m: &hanlin_gateway::Metrics) {
        for pool in self.pools.values() {
            for node in pool.nodes() {
                let l = [pool.model.as_str(), node.url.as_str()];
                m.upstream_outstanding
                    .with_label_values(&l)
                    .set(node.outstanding() as i64);
                m.upstream_healthy
                    .with_label_values(&l)
                    .set(i64::from(node.healthy()));
                m.upstream_failed_attempts
                    .with_label_values(&l)
                    .set(node.failed_attempts().min(i64::MAX as u64) as i64);
            }
        }
    }
}

/// Hanlin's own request fields, which mean nothing to an upstream.
const OWN_FIELDS: &[&str] = &["hanlin_tools", "parse_special"];

/// A chat or text completion for an upstream model. `n` is the number of
/// choices (already checked against the plan).
pub(crate) async fn forward(
    st: &Arc<AppState>,
    caller: Caller,
    body: &Bytes,
    endpoint: Endpoint,
    pool: Arc<Pool>,
    n: usize,
    via: &Via,
) -> AppResult<Response> {
    let mut v = visible_body(&caller, &pool, body)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ApiError::bad_request("The body must be a JSON object."));
    };
    for f in OWN_FIELDS {
        obj.remove(*f);
    }
    let chat = endpoint != Endpoint::Completions;
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let wants_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // The node gets an explicit max_tokens: what is reserved here bounds
    // what it may generate.
    let cap = pool.config.max_tokens as u64;
    let field = if chat && obj.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_new = match obj.get(field).and_then(Value::as_u64) {
        Some(m) if m > cap => {
            return Err(ApiError::bad_request(format!(
                "'{field}' is too large: the model `{}` allows at most {cap}.",
                pool.model
            ))
            .param(field))
        }
        Some(m) => m,
        None => cap,
    };
    obj.insert(field.into(), json!(max_new));
    obj.insert("model".into(), json!(pool.upstream_model()));
    if stream {
        obj.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let counter = st.upstreams.counter(&pool.model);
    let (prompt_bound, key, prompt_count) = if chat {
        let messages = obj
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let texts: Vec<String> = messages.iter().map(|m| text_of(&m["content"])).collect();
        (
            prompt_bound(&pool, &messages),
            hanlin_upstream::affinity_key(&messages),
            counter.as_ref().and_then(|t| count_texts(t, &texts, 4)),
        )
    } else {
        let prompt = obj.get("prompt").unwrap_or(&Value::Null);
        let count = counter
            .as_ref()
            .and_then(|t| count_texts(t, &[text_of(prompt)], 0));
        (text_bytes(prompt) + 8, None, count)
    };
    let max_completion = (max_new as usize).saturating_mul(n);
    let mut request = crate::api::admit(st, &caller, endpoint, &pool.model, via).await?;
    request
        .reserve(prompt_bound.saturating_add(max_completion))
        .await?;
    let path = if chat {
        "chat/completions"
    } else {
        "completions"
    };
    let m = &st.gw.metrics;
    let sent = Instant::now();
    let reply = send(m, &pool, path, &v, stream, key)
        .await
        .map_err(upstream_error)?;
    let mut meter = Meter::new(prompt_bound, max_completion, prompt_count, counter);
    match reply {
        Reply::Json { mut body, node } => {
            let l = [pool.model.as_str(), node.node().url.as_str()];
            first_event(m, &l, sent);
            meter.chunk(&body);
            let usage = meter.finish();
            ended(m, &l, &usage, "ok");
            request.external(usage, usage.completion_tokens.max(0) as usize);
            request.finish().await;
            body["model"] = json!(pool.model);
            // What was metered is what the client is told.
            body["usage"] = usage_json(&usage);
            Ok(axum::Json(body).into_response())
        }
        Reply::Stream(s) => {
            first_event(m, &[pool.model.as_str(), s.node().url.as_str()], sent);
            let (tx, rx) = mpsc::channel::<SseEvent>(64);
            tokio::spawn(relay(
                st.clone(),
                s,
                request,
                meter,
                tx,
                pool.model.clone(),
                wants_usage,
            ));
            let out = futures::stream::unfold(rx, |mut rx| async move {
                let ev = rx.recv().await?;
                Some((Ok::<_, Infallible>(ev), rx))
            });
            Ok(Sse::new(out).into_response())
        }
    }
}

/// Pass a stream's events on, metering as they come; the request ends
/// when the node's stream does, or when the client goes away.
async fn relay(
    st: Arc<AppState>,
    mut s: hanlin_upstream::Stream,
    mut request: Request,
    mut meter: Meter,
    tx: mpsc::Sender<SseEvent>,
    model: String,
    wants_usage: bool,
) {
    let node = s.node().url.clone();
    let m = &st.gw.metrics;
    let mut outcome = "ok";
    request.external(meter.usage(), 0);
    while let Some(ev) = s.next().await {
        let mut chunk = match ev {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(model = %model, "{e}");
                outcome = "broken";
                let err = ApiError::new_status(
                    axum::http::StatusCode::BAD_GATEWAY,
                    format!("The answer was cut off: {e}."),
                );
                let _ = tx
                    .send(
                        SseEvent::default()
                            .json_data(err.body())
                            .unwrap_or_default(),
                    )
                    .await;
                break;
            }
        };
        let texts = meter.chunk(&chunk);
        request.external(meter.usage(), texts);
        let usage_only = chunk["choices"].as_array().is_some_and(|c| c.is_empty())
            && chunk.get("usage").is_some_and(|u| !u.is_null());
        if usage_only && !wants_usage {
            continue;
        }
        chunk["model"] = json!(model);
        if let Some(u) = chunk.get_mut("usage").filter(|u| !u.is_null()) {
            *u = usage_json(&meter.usage());
        }
        if tx
            .send(SseEvent::default().data(chunk.to_string()))
            .await
            .is_err()
        {
            outcome = "client_left";
            break;
        }
    }
    if outcome == "ok" {
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    }
    let usage = meter.finish();
    ended(m, &[model.as_str(), node.as_str()], &usage, outcome);
    request.external(usage, 0);
    request.finish().await;
}

/// Embeddings from an upstream model: forwarded whole; the usage is the
/// node's, at most a token per byte of each input (or its token ids) and
/// a few more per input.
pub(crate) async fn forward_embeddings(
    st: &Arc<AppState>,
    caller: Caller,
    body: &Bytes,
    pool: Arc<Pool>,
    via: &Via,
) -> AppResult<Response> {
    let mut v = visible_body(&caller, &pool, body)?;
    let bound_of = |x: &Value| match x {
        Value::String(s) => Some(s.len() + 8),
        Value::Array(ids) if ids.iter().all(Value::is_u64) => Some(ids.len() + 8),
        _ => None,
    };
    let input = &v["input"];
    // A string, token ids, or a list of either.
    let bounds: Vec<usize> = match input {
        Value::Array(items) if items.is_empty() || !items.iter().all(Value::is_u64) => {
            items.iter().map(bound_of).collect::<Option<_>>()
        }
        one => bound_of(one).map(|b| vec![b]),
    }
    .ok_or_else(|| {
        ApiError::bad_request("'input' is a string, a list of strings, or token ids.")
            .param("input")
    })?;
    if bounds.is_empty() || bounds.len() > 2048 {
        return Err(ApiError::bad_request("'input' must hold 1 to 2048 items.").param("input"));
    }
    let bound: usize = bounds.iter().sum();
    let counted = st.upstreams.counter(&pool.model).and_then(|t| {
        let texts: Vec<&str> = match input {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        // Token ids count as they are (the bound); text is counted.
        (texts.len() == bounds.len())
            .then(|| count_texts(&t, &texts, 0))
            .flatten()
    });
    v["model"] = json!(pool.upstream_model());
    let mut request =
        crate::api::admit(st, &caller, Endpoint::Embeddings, &pool.model, via).await?;
    request.reserve(bound).await?;
    let m = &st.gw.metrics;
    let sent = Instant::now();
    let reply = send(m, &pool, "embeddings", &v, false, None)
        .await
        .map_err(upstream_error)?;
    let Reply::Json { mut body, node } = reply else {
        return Err(ApiError::new_status(
            axum::http::StatusCode::BAD_GATEWAY,
            "The upstream answered embeddings with a stream.",
        ));
    };
    let l = [pool.model.as_str(), node.node().url.as_str()];
    first_event(m, &l, sent);
    let mut meter = Meter::new(bound, 0, counted, None);
    if let Some(p) = body["usage"]["prompt_tokens"].as_i64() {
        meter.reported = Some((p, 0));
    }
    let usage = meter.usage();
    ended(m, &l, &usage, "ok");
    request.external(usage, 0);
    request.finish().await;
    body["model"] = json!(pool.model);
    body["usage"] =
        json!({"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens});
    Ok(axum::Json(body).into_response())
}

/// Node `l` (model, node) answered, or began to stream, a request sent
/// at `sent`.
fn first_event(m: &hanlin_gateway::Metrics, l: &[&str; 2], sent: Instant) {
    m.upstream_ttft
        .with_label_values(l)
        .observe(sent.elapsed().as_secs_f64());
}

/// A request on node `l` ended with `outcome`, having used `u`.
fn ended(m: &hanlin_gateway::Metrics, l: &[&str; 2], u: &Usage, outcome: &str) {
    for (kind, n) in [
        ("prompt", u.prompt_tokens),
        ("completion", u.completion_tokens),
    ] {
        m.upstream_tokens
            .with_label_values(&[l[0], l[1], kind])
            .inc_by(n.max(0) as u64);
    }
    m.upstream_requests
        .with_label_values(&[l[0], l[1], outcome])
        .inc();
}

/// Tokens of `texts` as `t` counts them, plus `per_text` each (a chat
/// template's markers); `None` if one cannot be encoded.
pub(crate) fn count_texts<S: AsRef<str>>(t: &Tokenizer, texts: &[S], per_text: i64) -> Option<i64> {
    texts
        .iter()
        .map(|s| {
            t.encode_plain(s.as_ref(), false)
                .ok()
                .map(|ids| ids.len() as i64 + per_text)
        })
        .sum()
}

/// The request's JSON, if `caller` may use `pool`'s model.
fn visible_body(caller: &Caller, pool: &Pool, body: &Bytes) -> AppResult<Value> {
    if !crate::api::visible(caller, &pool.model) {
        return Err(ApiError::model_not_found(&pool.model));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The body is not valid JSON: {e}")))
}

/// Send `body` to a node of `pool`; a refusal or a failure is counted.
async fn send(
    m: &hanlin_gateway::Metrics,
    pool: &Pool,
    path: &str,
    body: &Value,
    stream: bool,
    key: Option<u64>,
) -> Result<Reply, UpstreamError> {
    pool.send(path, body, stream, key).await.inspect_err(|e| {
        let outcome = if matches!(e, UpstreamError::Refused { .. }) {
            "refused"
        } else {
            "failed"
        };
        m.upstream_requests
            .with_label_values(&[pool.model.as_str(), "-", outcome])
            .inc();
    })
}

/// The most tokens chat `messages` can be on `pool`'s nodes: a token per
/// byte of text, a few per message, and what the template adds.
pub(crate) fn prompt_bound(pool: &Pool, messages: &[Value]) -> usize {
    messages
        .iter()
        .map(|m| text_bytes(&m["content"]) + 8)
        .sum::<usize>()
        + pool.config.template_tokens as usize
}

/// One generation for Hanlin's own features (the web app, channels,
/// answers from knowledge bases, server-side tools) on an upstream model:
/// a streamed chat completion whose chunks come back as engine events
/// through the gateway [`Backend`](hanlin_gateway::Backend), so the
/// request is metered as a local model's is. `Started` carries the
/// prompt's estimate at once (the usage row exists from the first chunk);
/// `Done` the node's usage, checked ([`Meter`]). Tool calls the node
/// streams as `tool_calls` come out as `<tool_call>` text, as a local
/// model writes them. The client leaving closes the node's stream.
pub(crate) struct ChatJob {
    pub gw: Arc<hanlin_gateway::Gateway>,
    pub pool: Arc<Pool>,
    pub counter: Option<Arc<Tokenizer>>,
    /// The messages (and tools) in OpenAI's shape.
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    /// The prompt's most tokens, and its tokenizer count ([`Meter`]).
    pub bound: usize,
    pub counted: Option<usize>,
}

impl ChatJob {
    /// The request body for `params`.
    fn body(&self, params: &GenerateParams) -> Value {
        let s = &params.sampler;
        let mut body = json!({
            "model": self.pool.upstream_model(),
            "messages": self.messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": params.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
        });
        if s.presence_penalty != 0.0 {
            body["presence_penalty"] = json!(s.presence_penalty);
        }
        if s.frequency_penalty != 0.0 {
            body["frequency_penalty"] = json!(s.frequency_penalty);
        }
        if !params.stop.is_empty() {
            body["stop"] = json!(params.stop);
        }
        if let Some(t) = self.tools.as_ref().filter(|t| !t.is_null()) {
            body["tools"] = t.clone();
        }
        body
    }
}

impl hanlin_gateway::Backend for ChatJob {
    fn submit(
        &self,
        work: hanlin_gateway::Work,
        _priority: i32,
        sink: hanlin_engine::Sink,
    ) -> Result<(), hanlin_gateway::GatewayError> {
        let body = self.body(&work.params);
        let meter = Meter::new(
            self.bound,
            work.params.max_tokens,
            self.counted.map(|n| n as i64),
            self.counter.clone(),
        );
        let key = hanlin_upstream::affinity_key(&self.messages);
        tokio::spawn(run_chat(
            self.gw.clone(),
            self.pool.clone(),
            body,
            key,
            meter,
            sink,
        ));
        Ok(())
    }
}

/// A tool call streamed in pieces (`delta.tool_calls[i]`).
#[derive(Default)]
struct CallParts {
    name: String,
    arguments: String,
}

async fn run_chat(
    gw: Arc<hanlin_gateway::Gateway>,
    pool: Arc<Pool>,
    body: Value,
    key: Option<u64>,
    mut meter: Meter,
    mut sink: hanlin_engine::Sink,
) {
    use hanlin_engine::{Event, FinishReason};
    let m = &gw.metrics;
    let sent = Instant::now();
    let started = |meter: &Meter| Event::Started {
        prompt_tokens: meter.usage().prompt_tokens.max(0) as usize,
        cached_tokens: 0,
    };
    let mut s = match send(m, &pool, "chat/completions", &body, true, key).await {
        Ok(Reply::Stream(s)) => s,
        Ok(Reply::Json { node, .. }) => {
            // Asked for a stream; a node that answers otherwise is broken.
            drop(node);
            sink(started(&meter));
            sink(Event::Failed(
                "The upstream answered without streaming.".into(),
            ));
            return;
        }
        Err(e) => {
            sink(Event::Failed(upstream_error(e).message));
            return;
        }
    };
    let node = s.node().url.clone();
    let l = [pool.model.as_str(), node.as_str()];
    first_event(m, &l, sent);
    let mut outcome = "ok";
    let mut failed = None;
    let mut finish = FinishReason::Stop;
    let mut calls: Vec<CallParts> = Vec::new();
    let mut alive = sink(started(&meter));
    while alive {
        let Some(ev) = s.next().await else { break };
        let chunk = match ev {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(model = %pool.model, "{e}");
                outcome = "broken";
                failed = Some(format!("The answer was cut off: {e}."));
                break;
            }
        };
        let texts = meter.chunk(&chunk);
        let mut text = String::new();
        for c in chunk["choices"].as_array().into_iter().flatten() {
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
            for tc in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let i = tc["index"].as_u64().unwrap_or(0).min(63) as usize;
                if calls.len() <= i {
                    calls.resize_with(i + 1, CallParts::default);
                }
                let f = &tc["function"];
                if let Some(n) = f["name"].as_str() {
                    calls[i].name.push_str(n);
                }
                if let Some(a) = f["arguments"].as_str() {
                    calls[i].arguments.push_str(a);
                }
            }
            match c["finish_reason"].as_str() {
                Some("length") => finish = FinishReason::Length,
                Some(_) => finish = FinishReason::Stop,
                None => {}
            }
        }
        if texts > 0 {
            alive = sink(Event::Token {
                text,
                tokens: texts,
                logprobs: Vec::new(),
            });
        }
    }
    if !alive {
        outcome = "client_left";
    }
    drop(s);
    let written: String = calls
        .iter()
        .filter(|c| !c.name.is_empty())
        .map(|c| {
            let args = serde_json::from_str::<Value>(&c.arguments)
                .unwrap_or_else(|_| Value::String(c.arguments.clone()));
            format!(
                "<tool_call>\n{}\n</tool_call>\n",
                json!({"name": c.name, "arguments": args})
            )
        })
        .collect();
    if alive && failed.is_none() && !written.is_empty() {
        alive = sink(Event::Token {
            text: written,
            tokens: 0,
            logprobs: Vec::new(),
        });
    }
    let usage = meter.finish();
    ended(m, &l, &usage, outcome);
    match failed {
        Some(msg) => {
            sink(Event::Failed(msg));
        }
        None if alive => {
            sink(Event::Done {
                finish,
                prompt_tokens: usage.prompt_tokens.max(0) as usize,
                cached_tokens: 0,
                completion_tokens: usage.completion_tokens.max(0) as usize,
            });
        }
        None => {}
    }
}

/// What a request used, from what the node reported and what was seen.
struct Meter {
    prompt_bound: i64,
    max_completion: i64,
    /// The node's `usage` (prompt, completion), the last it sent.
    reported: Option<(i64, i64)>,
    /// Choices' chunks (or choices) that carried text: each is at least a
    /// token.
    seen: i64,
    /// The prompt as the configured tokenizer counts it.
    prompt_count: Option<i64>,
    /// The answer's text, kept for the tokenizer (bounded).
    text: String,
    counter: Option<Arc<Tokenizer>>,
}

impl Meter {
    /// A meter for a prompt of at most `prompt_bound` tokens (`prompt_count`
    /// as the tokenizer counts it) and an answer of at most
    /// `max_completion`; `counter` counts the answer if the node does not.
    fn new(
        prompt_bound: usize,
        max_completion: usize,
        prompt_count: Option<i64>,
        counter: Option<Arc<Tokenizer>>,
    ) -> Self {
        Self {
            prompt_bound: prompt_bound as i64,
            max_completion: max_completion as i64,
            reported: None,
            seen: 0,
            prompt_count,
            text: String::new(),
            counter,
        }
    }

    /// Meter one chunk (or a whole answer): its usage, its text; returns
    /// how many of its choices carried text (each at least a token).
    fn chunk(&mut self, v: &Value) -> usize {
        self.read(v);
        let texts = v["choices"]
            .as_array()
            .map_or(0, |c| c.iter().filter(|c| has_text(c)).count());
        self.seen += texts as i64;
        texts
    }

    fn read(&mut self, v: &Value) {
        let u = &v["usage"];
        if let (Some(p), Some(c)) = (u["prompt_tokens"].as_i64(), u["completion_tokens"].as_i64()) {
            self.reported = Some((p, c));
        }
        if self.counter.is_some() {
            // A token is rarely more than 16 bytes: more text than that
            // cannot count for more than max_completion anyway.
            let room = (self.max_completion.max(0) as usize).saturating_mul(16);
            for c in v["choices"].as_array().into_iter().flatten() {
                for t in [&c["text"], &c["delta"]["content"], &c["message"]["content"]] {
                    if let Some(t) = t.as_str() {
                        if self.text.len() + t.len() <= room {
                            self.text.push_str(t);
                        }
                    }
                }
            }
        }
    }

    /// The usage to record at the end: [`Meter::usage`], except that when
    /// the node reported nothing and a tokenizer is configured, the answer
    /// is counted with it (at least the chunks seen, at most max_tokens).
    fn finish(&self) -> Usage {
        let mut u = self.usage();
        if self.reported.is_none() {
            if let Some(ids) = self
                .counter
                .as_ref()
                .and_then(|t| t.encode_plain(&self.text, false).ok())
            {
                u.completion_tokens = (ids.len() as i64)
                    .max(self.seen)
                    .min(self.max_completion)
                    .max(0);
            }
        }
        u
    }

    /// Prompt tokens: as reported, at most one per byte; when nothing was
    /// reported, the configured tokenizer's count, else a quarter of the
    /// bytes (a typical BPE rate). Completion
    /// tokens: as reported but at least the chunks seen and at most the
    /// `max_tokens` the node was given.
    fn usage(&self) -> Usage {
        let (prompt, completion) = match self.reported {
            Some((p, c)) => (p.clamp(0, self.prompt_bound), c.max(self.seen)),
            None => (
                self.prompt_count
                    .unwrap_or((self.prompt_bound + 3) / 4)
                    .min(self.prompt_bound),
                self.seen,
            ),
        };
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion.clamp(0, self.max_completion),
            ..Default::default()
        }
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Whether a choice (or a streamed choice's delta) carries text.
fn has_text(c: &Value) -> bool {
    let nonempty = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
    nonempty(&c["text"])
        || nonempty(&c["delta"]["content"])
        || nonempty(&c["message"]["content"])
        || c["delta"]["tool_calls"].is_array()
}

/// The text of a message's content (a string, or parts with text).
pub(crate) fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().map(text_of).collect::<Vec<_>>().join("\n"),
        Value::Object(o) => o.get("text").map(text_of).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Bytes of text in a message's content (a string, or parts with text).
fn text_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts.iter().map(text_bytes).sum(),
        Value::Object(o) => o.get("text").map(text_bytes).unwrap_or(0),
        _ => 0,
    }
}

fn upstream_error(e: UpstreamError) -> ApiError {
    use axum::http::StatusCode;
    match e {
        UpstreamError::Refused {
            status, message, ..
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            ApiError::new_status(status, message)
        }
        UpstreamError::Unavailable { .. } | UpstreamError::Broken { .. } => {
            ApiError::new_status(StatusCode::BAD_GATEWAY, e.to_string())
        }
        UpstreamError::Config(..) => ApiError::unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_checked_against_what_was_seen() {
        let mut m = Meter {
            prompt_bound: 100,
            max_completion: 16,
            reported: None,
            seen: 5,
            prompt_count: None,
            text: String::new(),
            counter: None,
        };
        // Nothing reported: a quarter of the prompt's bytes, the chunks seen.
        assert_eq!(
            (m.usage().prompt_tokens, m.usage().completion_tokens),
            (25, 5)
        );
        // A node that claims more than could be: capped.
        m.read(&json!({"usage": {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}}));
        assert_eq!(
            (m.usage().prompt_tokens, m.usage().completion_tokens),
            (100, 16)
        );
        // One that claims less than it sent: what was seen.
        m.read(&json!({"usage": {"prompt_tokens": -3, "completion_tokens": 1}}));
        assert_eq!(
            (m.usage().prompt_tokens, m.usage().completion_tokens),
            (0, 5)
        );
        m.read(&json!({"usage": {"prompt_tokens": 40, "completion_tokens": 9}}));
        assert_eq!(
            (m.usage().prompt_tokens, m.usage().completion_tokens),
            (40, 9)
        );
    }
}
