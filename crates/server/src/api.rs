//! The OpenAI-compatible endpoints.

use crate::chat_model::ChatModel;
use crate::error::ApiError;
use crate::extract::{ApiCaller, Body};
use crate::openai::response::{
    ChatChoice, ChatChunkChoice, ChatLogprobs, ChatMessage, Completion, Delta, EmbeddingData,
    EmbeddingList, EmbeddingUsage, EmbeddingVector, ModelCard, ModelList, TextChoice, TextLogprobs,
    TopLogprob,
};
use crate::openai::{self, ChatRequest, CompletionRequest, Prompt};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hanlin_accounts::Caller;
use hanlin_engine::{Event, FinishReason, GenerateParams, Scheduler, TokenLogprob};
use hanlin_gateway::{Endpoint, Request, Work};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

type AppResult<T> = Result<T, ApiError>;

/// `GET /health`: 200 while the replica takes work, 503 once it drains
/// (so a load balancer stops sending it requests).
pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "replica": st.db.replica()})),
        )
            .into_response();
    }
    Json(json!({"status": "ok", "replica": st.db.replica()})).into_response()
}

/// `GET /metrics` (Prometheus). With `--metrics-token`, only for
/// `Authorization: Bearer TOKEN` (the counters are per key and model).
pub async fn metrics(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(token) = &st.config.metrics_token {
        let given = crate::guard::bearer(&headers);
        if !crate::guard::constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return ApiError::unauthorized(
                "The metrics need the metrics token (Authorization: Bearer TOKEN).",
            )
            .into_response();
        }
    }
    for (name, s) in st.models.loaded() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &st.gw.metrics;
        let set = |g: &prometheus::IntGaugeVec, v: usize| {
            g.with_label_values(&[name.as_str()]).set(v as i64)
        };
        set(&m.queue_depth, s.stats.queued.load(Relaxed));
        set(&m.active, s.stats.active.load(Relaxed));
        set(&m.kv_tokens, s.stats.kv_tokens.load(Relaxed));
        set(&m.prefix_pool_tokens, s.stats.pool_tokens.load(Relaxed));
        set(&m.kv_bytes, s.stats.kv_bytes.load(Relaxed));
        let total = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed) as usize;
        set(&m.lookup_proposed, total(&s.stats.proposed_tokens));
        set(&m.lookup_accepted, total(&s.stats.accepted_tokens));
        set(&m.draft_proposed, total(&s.stats.draft_proposed_tokens));
        set(&m.draft_accepted, total(&s.stats.draft_accepted_tokens));
        set(&m.draft_caught_up, total(&s.stats.draft_caught_up_tokens));
    }
    st.upstreams.gauges(&st.gw.metrics);
    st.gw.metrics.render().into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("Unknown endpoint.").code("unknown_url")
}

/// The caller behind the request's `Authorization: Bearer` key.
pub async fn auth(st: &AppState, headers: &HeaderMap) -> AppResult<Caller> {
    if !headers.contains_key(axum::http::header::AUTHORIZATION) {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). An admin creates keys with `hanlin admin key create --user NAME`.",
        ));
    }
    let secret = crate::guard::bearer(headers);
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

/// Local models and upstream ones, with their creation times.
pub(crate) fn all_models(st: &AppState) -> Vec<(String, u64)> {
    let mut all = st.models.available();
    all.extend(st.upstreams.names().map(|n| (n.clone(), 0)));
    all.extend(st.speech.model_names().into_iter().map(|n| (n, 0)));
    all.extend(st.images.model_names().into_iter().map(|n| (n, 0)));
    all
}

pub(crate) fn visible(caller: &Caller, model: &str) -> bool {
    caller.plan.allows(model) && caller.key.allows(model)
}

pub async fn list_models(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
) -> AppResult<Json<ModelList>> {
    let data = all_models(&st)
        .into_iter()
        .filter(|(name, _)| visible(&caller, name))
        .map(|(name, created)| ModelCard::new(&name, created))
        .collect();
    Ok(Json(ModelList {
        object: "list".into(),
        data,
    }))
}

pub async fn get_model(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    Path(id): Path<String>,
) -> AppResult<Json<ModelCard>> {
    all_models(&st)
        .into_iter()
        .find(|(name, _)| *name == id && visible(&caller, name))
        .map(|(name, created)| Json(ModelCard::new(&name, created)))
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
    budget_within(limit, prompt_len, asked, default, param)
}

/// [`budget`] in a context of `limit` tokens.
pub(crate) fn budget_within(
    limit: usize,
    prompt_len: usize,
    asked: Option<u32>,
    default: Option<usize>,
    param: &str,
) -> AppResult<usize> {
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// Everything the driver needs to answer one request.
struct Run {
    head: Header,
    kind: Kind,
    n: usize,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    tools: bool,
    sched: Arc<Scheduler>,
}

pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    Body(body): Body,
) -> Response {
    let r = chat_inner(&st, caller, body, &Via::Api).await;
    finish_response(&st, "chat", r)
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    Body(body): Body,
) -> Response {
    let r = completion_inner(&st, caller, body, &Via::Api).await;
    finish_response(&st, "completions", r)
}

/// How a request came: over the API, or as a line of a batch (with the
/// line's request id).
#[derive(Debug, Clone)]
pub(crate) enum Via {
    Api,
    Batch(String),
}

/// Admit a request the way it came ([`hanlin_gateway::Gateway::admit`],
/// or `admit_batch_line`).
pub(crate) async fn admit(
    st: &AppState,
    caller: &Caller,
    endpoint: Endpoint,
    model: &str,
    via: &Via,
) -> AppResult<hanlin_gateway::Request> {
    Ok(match via {
        Via::Api => st.gw.admit(caller, endpoint, model).await?,
        Via::Batch(id) => st.gw.admit_batch_line(caller, model, id),
    })
}

pub(crate) fn finish_response(st: &AppState, endpoint: &str, r: AppResult<Response>) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    st.gw
        .metrics
        .requests
        .with_label_values(&[endpoint, resp.status().as_str()])
        .inc();
    resp
}

pub(crate) async fn chat_inner(
    st: &Arc<AppState>,
    caller: Caller,
    body: Bytes,
    via: &Via,
) -> AppResult<Response> {
    let req: ChatRequest = openai::parse(&body, openai::CHAT_FIELDS)?;
    if let Some(names) = req.hanlin_tools.clone() {
        // Server tools run on any chat model, local or upstream.
        let messages = req.template_messages()?;
        let model = ChatModel::of(st, &caller, &req.model).await?;
        let request = admit(st, &caller, Endpoint::Chat, &req.model, via).await?;
        return server_tools(st, caller, req, names, messages, model, request).await;
    }
    if let Some(pool) = st.upstreams.get(&req.model) {
        let n = req.sampling.n(caller.plan.max_n)?;
        return crate::upstream::forward(st, caller, &body, Endpoint::Chat, pool, n, via).await;
    }
    let schema = crate::grammar::Grammars::schema_of(req.response_format.as_ref())?;
    let messages = req.template_messages()?;
    let sched = scheduler_for(st, &caller, &req.model).await?;
    // Requests per minute first: a refused request costs no tokenizing.
    let request = admit(st, &caller, Endpoint::Chat, &req.model, via).await?;
    let tools = req
        .tools
        .as_ref()
        .filter(|t| !t.is_empty())
        .filter(|_| req.tool_choice.as_ref().and_then(Value::as_str) != Some("none"))
        .map(|t| Value::Array(t.clone()));
    let prompt = chat_prompt(&sched, messages, tools.clone()).await?;
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
    let n = req.sampling.n(caller.plan.max_n)?;
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
        head: Header::of(&request, &req.model),
        kind: Kind::Chat,
        n,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
        tools: tools.is_some(),
        sched,
    };
    start(run, request, prompt, params, constraints).await
}

/// A chat completion whose tools the server runs (`hanlin_tools`).
async fn server_tools(
    st: &Arc<AppState>,
    caller: Caller,
    req: ChatRequest,
    names: Vec<String>,
    messages: Vec<hanlin_tokenizer::Message>,
    model: ChatModel,
    request: Request,
) -> AppResult<Response> {
    let refuse = |field: &str, why: &str| {
        Err(ApiError::bad_request(format!(
            "'hanlin_tools' cannot be combined with '{field}': {why}"
        ))
        .param(field))
    };
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return refuse("tools", "the server would run some calls and hand others to you; send one kind of tools per request");
    }
    if req.response_format.is_some() {
        return refuse(
            "response_format",
            "the steps between tool calls are not in the format",
        );
    }
    if req.logprobs.unwrap_or(false) {
        return refuse("logprobs", "they would cover only the last step");
    }
    if req.sampling.n(caller.plan.max_n)? != 1 {
        return refuse("n", "a tool loop makes one answer");
    }
    let opts = req.hanlin_tool_options.unwrap_or_default();
    let lp = crate::tools::prepare(st, &caller, &names, &opts).await?;
    let asked = req.max_completion_tokens.or(req.max_tokens);
    if asked == Some(0) {
        return Err(ApiError::bad_request("'max_tokens' must be at least 1.").param("max_tokens"));
    }
    let params = req.sampling.to_params(1, false, 0)?;
    let head = Header::of(&request, &req.model);
    let model = crate::tools::Metered {
        req: request,
        model,
        caller,
        asked,
        params,
        gone: None,
    };
    crate::tools::respond(
        head,
        model,
        lp,
        messages,
        req.stream.unwrap_or(false),
        req.stream_options.as_ref().is_some_and(|o| o.include_usage),
    )
    .await
}

pub(crate) async fn completion_inner(
    st: &Arc<AppState>,
    caller: Caller,
    body: Bytes,
    via: &Via,
) -> AppResult<Response> {
    let req: CompletionRequest = openai::parse(&body, openai::COMPLETION_FIELDS)?;
    if let Some(pool) = st.upstreams.get(&req.model) {
        let n = req.sampling.n(caller.plan.max_n)?;
        return crate::upstream::forward(st, caller, &body, Endpoint::Completions, pool, n, via)
            .await;
    }
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
    let request = admit(st, &caller, Endpoint::Completions, &req.model, via).await?;
    let m = sched.clone();
    let (suffix, model) = (req.suffix.clone(), req.model.clone());
    let parse_special = req.parse_special.unwrap_or(false);
    let prompt = blocking(move || {
        let m = &m.model;
        match &suffix {
            Some(suffix) => fim_prompt(m, &prompt_text, suffix).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "The model `{model}` has no fill-in-the-middle tokens, so 'suffix' cannot be used."
                ))
                .param("suffix")
            }),
            // Special tokens written in a raw prompt are plain text unless
            // the caller asks for them (`"parse_special": true`).
            None if parse_special => m
                .tokenizer
                .encode(&prompt_text, true)
                .map_err(|e| ApiError::bad_request(format!("Tokenizing the prompt failed: {e}"))),
            None => m
                .tokenizer
                .encode_plain(&prompt_text, true)
                .map_err(|e| ApiError::bad_request(format!("Tokenizing the prompt failed: {e}"))),
        }
    })
    .await?;
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
    let n = req.sampling.n(caller.plan.max_n)?;
    let run = Run {
        head: Header::of(&request, &req.model),
        kind: Kind::Text,
        n,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: req.logprobs.is_some(),
        tools: false,
        sched,
    };
    let constraints = (0..n).map(|_| None).collect();
    start(run, request, prompt, params, constraints).await
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

/// Run CPU work (templating, tokenizing) on the blocking pool, off the
/// threads that serve every connection.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> AppResult<T> + Send + 'static,
) -> AppResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a worker task failed: {e}")))?
}

/// The token ids of `messages` in the model's chat template, ready for the
/// assistant's turn (rendered and tokenized on the blocking pool).
pub(crate) async fn chat_prompt(
    sched: &Arc<Scheduler>,
    messages: Vec<hanlin_tokenizer::Message>,
    tools: Option<Value>,
) -> AppResult<Vec<u32>> {
    let sched = sched.clone();
    blocking(move || {
        sched
            .model
            .chat_prompt_with(&messages, tools.as_ref())
            .map_err(|e| {
                ApiError::bad_request(format!("Rendering the messages failed: {e}"))
                    .param("messages")
            })
    })
    .await
}

/// Reserve the request's worst case, then submit its choices (stream or
/// whole answer).
async fn start(
    run: Run,
    mut request: Request,
    prompt: Vec<u32>,
    params: GenerateParams,
    constraints: Vec<Option<Box<dyn hanlin_engine::TokenConstraint>>>,
) -> AppResult<Response> {
    request
        .reserve((prompt.len() + params.max_tokens) * run.n)
        .await?;
    let work = constraints
        .into_iter()
        .enumerate()
        .map(|(i, constraint)| {
            let mut p = params.clone();
            // Choices differ when sampling: each gets its own seed.
            p.sampler.seed = p.sampler.seed.wrapping_add(i as u64);
            Work {
                constraint,
                ..Work::generate(prompt.clone(), p)
            }
        })
        .collect();
    request.submit(&*run.sched, work)?;
    let (out_tx, mut out_rx) = mpsc::channel::<Result<String, ApiError>>(64);
    let stream = run.stream;
    tokio::spawn(drive(run, request, out_tx));
    if stream {
        let s = futures::stream::unfold(out_rx, |mut rx| async move {
            let item = rx.recv().await?;
            let ev = match item {
                Ok(data) => SseEvent::default().data(data),
                Err(e) => SseEvent::default().json_data(e.body()).unwrap_or_default(),
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
    logprobs: Vec<openai::response::TokenLogprob>,
    sent_role: bool,
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextFull | FinishReason::Cancelled => "length",
    }
}

fn top_logprob(tok: &hanlin_tokenizer::Tokenizer, lp: &TokenLogprob) -> TopLogprob {
    let bytes = tok.token_bytes(lp.id, false);
    TopLogprob {
        token: String::from_utf8_lossy(bytes).into_owned(),
        logprob: lp.logprob,
        bytes: bytes.to_vec(),
    }
}

/// One streamed choice.
enum Chunk {
    Chat(ChatChunkChoice),
    Text(TextChoice),
}

/// The choice's text and tool calls, with the finish reason they imply.
fn tool_split(
    run: &Run,
    text: &str,
    reason: &'static str,
) -> (String, Vec<openai::response::ToolCall>, &'static str) {
    let (content, calls) = match run.tools {
        true => crate::tools::split_tool_calls(text),
        false => (String::new(), Vec::new()),
    };
    if calls.is_empty() {
        return (text.to_string(), calls, reason);
    }
    (content, calls, "tool_calls")
}

/// Turn the request's events into its answer; on the way out (finished,
/// failed or abandoned) the request settles its usage.
async fn drive(run: Run, mut req: Request, out: mpsc::Sender<Result<String, ApiError>>) {
    let tok = &run.sched.model.tokenizer;
    let mut choices: Vec<Choice> = (0..run.n).map(|_| Choice::default()).collect();
    let mut failed: Option<String> = None;
    let mut gone = false;
    // Streams with tools are buffered: tool calls are parsed from the whole text.
    let stream_text = run.stream && !run.tools;
    loop {
        // A client that goes away is noticed even while nothing is generated
        // for it (queued, or in a long prefill).
        let (i, ev) = tokio::select! {
            ev = req.next() => match ev {
                Some(ev) => ev,
                None => break,
            },
            _ = out.closed() => {
                gone = true;
                break;
            }
        };
        let mut chunk: Option<Chunk> = None;
        match ev {
            Event::Started { .. } => {
                if run.stream && run.kind == Kind::Chat && !choices[i].sent_role {
                    choices[i].sent_role = true;
                    chunk = Some(Chunk::Chat(ChatChunkChoice {
                        index: i,
                        delta: Delta {
                            role: Some("assistant".into()),
                            content: Some(String::new()),
                            tool_calls: Vec::new(),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }));
                }
            }
            Event::Token { text, logprobs, .. } => {
                let c = &mut choices[i];
                c.text.push_str(&text);
                let lps: Vec<openai::response::TokenLogprob> = if run.logprobs {
                    logprobs
                        .iter()
                        .map(|(chosen, top)| {
                            let t = top_logprob(tok, chosen);
                            openai::response::TokenLogprob {
                                token: t.token,
                                logprob: t.logprob,
                                bytes: t.bytes,
                                top_logprobs: top.iter().map(|x| top_logprob(tok, x)).collect(),
                            }
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                c.logprobs.extend(lps.iter().cloned());
                if stream_text && (!text.is_empty() || !lps.is_empty()) {
                    chunk = Some(match run.kind {
                        Kind::Chat => Chunk::Chat(ChatChunkChoice {
                            index: i,
                            delta: Delta {
                                content: Some(text),
                                ..Default::default()
                            },
                            logprobs: run.logprobs.then_some(ChatLogprobs {
                                content: lps,
                                refusal: None,
                            }),
                            finish_reason: None,
                        }),
                        Kind::Text => Chunk::Text(TextChoice {
                            index: i,
                            text,
                            logprobs: run.logprobs.then(|| TextLogprobs::of(&lps)),
                            finish_reason: None,
                        }),
                    });
                }
            }
            Event::Done { finish, .. } => {
                let c = &mut choices[i];
                c.finish = Some(finish_str(finish));
                if run.stream {
                    chunk = Some(match run.kind {
                        Kind::Chat => {
                            let mut delta = Delta::default();
                            let mut reason = finish_str(finish);
                            if run.tools {
                                let (content, mut calls, r) = tool_split(&run, &c.text, reason);
                                for (k, call) in calls.iter_mut().enumerate() {
                                    call.index = Some(k);
                                }
                                delta.content = Some(content);
                                delta.tool_calls = calls;
                                reason = r;
                            }
                            Chunk::Chat(ChatChunkChoice {
                                index: i,
                                delta,
                                logprobs: None,
                                finish_reason: Some(reason.into()),
                            })
                        }
                        Kind::Text => Chunk::Text(TextChoice {
                            index: i,
                            text: String::new(),
                            logprobs: None,
                            finish_reason: Some(finish_str(finish).into()),
                        }),
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
            let data = match c {
                Chunk::Chat(c) => envelope(&run, vec![c], run.include_usage.then_some(None)),
                Chunk::Text(c) => envelope(&run, vec![c], run.include_usage.then_some(None)),
            };
            if out.send(Ok(data)).await.is_err() {
                gone = true;
                break;
            }
        }
        if choices.iter().all(|c| c.finish.is_some()) {
            break;
        }
    }
    let usage = crate::openai::Usage::from(&req.usage());
    if !gone {
        let reply = match &failed {
            Some(msg) => Err(ApiError::internal(format!("Generation failed: {msg}"))),
            None if run.stream => {
                if run.include_usage {
                    let last = envelope::<ChatChunkChoice>(&run, Vec::new(), Some(Some(usage)));
                    let _ = out.send(Ok(last)).await;
                }
                Ok("[DONE]".to_string())
            }
            None => Ok(whole_response(&run, &choices, usage)),
        };
        let _ = out.send(reply).await;
    }
    // The response ends here, whatever the database is doing; then the
    // usage is settled to exactly what the engine counted.
    drop(out);
    req.finish().await;
}

pub async fn embeddings(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    Body(body): Body,
) -> Response {
    let r = embeddings_inner(&st, caller, body, &Via::Api).await;
    finish_response(&st, "embeddings", r)
}

pub(crate) async fn embeddings_inner(
    st: &Arc<AppState>,
    caller: Caller,
    body: Bytes,
    via: &Via,
) -> AppResult<Response> {
    use base64::Engine as _;
    let req: openai::EmbeddingRequest = openai::parse(&body, openai::EMBEDDING_FIELDS)?;
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
    if let Some(pool) = st.upstreams.get(&req.model) {
        return crate::upstream::forward_embeddings(st, caller, &body, pool, via).await;
    }
    let sched = scheduler_for(st, &caller, &req.model).await?;
    let mut request = admit(st, &caller, Endpoint::Embeddings, &req.model, via).await?;
    let n_inputs = match &req.input {
        openai::EmbeddingInput::One(_) | openai::EmbeddingInput::Tokens(_) => 1,
        openai::EmbeddingInput::Many(v) => v.len(),
        openai::EmbeddingInput::ManyTokens(t) => t.len(),
    };
    if n_inputs == 0 || n_inputs > 2048 {
        return Err(ApiError::bad_request("'input' must hold 1 to 2048 items.").param("input"));
    }
    let s2 = sched.clone();
    let input = req.input;
    let inputs: Vec<Vec<u32>> = blocking(move || {
        let tok = &s2.model.tokenizer;
        Ok(match input {
            openai::EmbeddingInput::One(s) => vec![encode_input(tok, &s)?],
            openai::EmbeddingInput::Many(v) => v
                .iter()
                .map(|s| encode_input(tok, s))
                .collect::<AppResult<_>>()?,
            openai::EmbeddingInput::Tokens(t) => vec![t],
            openai::EmbeddingInput::ManyTokens(t) => t,
        })
    })
    .await?;
    let request_len = inputs.len();
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
    request.reserve(total).await?;
    request.submit(&*sched, inputs.into_iter().map(Work::embed).collect())?;
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; request_len];
    let mut failed = None;
    while let Some((i, ev)) = request.next().await {
        match ev {
            Event::Embedding(v) => vectors[i] = Some(v),
            Event::Failed(m) => failed = Some(m),
            _ => {}
        }
    }
    // Settled in the background: the answer does not wait for the database.
    tokio::spawn(request.finish());
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
            EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            EmbeddingVector::Float(v)
        };
        data.push(EmbeddingData {
            object: "embedding".into(),
            index: i,
            embedding,
        });
    }
    Ok(Json(EmbeddingList {
        object: "list".into(),
        data,
        model: req.model,
        usage: EmbeddingUsage {
            prompt_tokens: total as i64,
            total_tokens: total as i64,
        },
    })
    .into_response())
}

fn encode_input(tok: &hanlin_tokenizer::Tokenizer, s: &str) -> AppResult<Vec<u32>> {
    tok.encode_plain(s, true).map_err(|e| {
        ApiError::bad_request(format!("Tokenizing the input failed: {e}")).param("input")
    })
}

/// What one answer is called and when it was made: the envelope every
/// completion and chunk of it carries.
pub(crate) struct Header {
    pub id: String,
    pub created: i64,
    pub model: String,
}

impl Header {
    pub fn of(request: &Request, model: &str) -> Self {
        Self {
            id: request.id().to_string(),
            created: request.created(),
            model: model.to_string(),
        }
    }

    /// A completion (or a chunk of one) of kind `object` with `choices`,
    /// as JSON text.
    pub fn json<C: serde::Serialize>(
        &self,
        object: &str,
        choices: Vec<C>,
        usage: Option<Option<openai::Usage>>,
        hanlin_tools: Option<Value>,
    ) -> String {
        serde_json::to_string(&Completion {
            id: self.id.clone(),
            object: object.into(),
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage,
            hanlin_tools,
        })
        .unwrap_or_default()
    }
}

/// A completion (or a chunk of one) with `choices`, as JSON text.
fn envelope<C: serde::Serialize>(
    run: &Run,
    choices: Vec<C>,
    usage: Option<Option<openai::Usage>>,
) -> String {
    let object = match (run.kind, run.stream) {
        (Kind::Chat, true) => "chat.completion.chunk",
        (Kind::Chat, false) => "chat.completion",
        (Kind::Text, _) => "text_completion",
    };
    run.head.json(object, choices, usage, None)
}

fn whole_response(run: &Run, choices: &[Choice], usage: openai::Usage) -> String {
    let usage = Some(Some(usage));
    match run.kind {
        Kind::Chat => {
            let list = choices
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (content, tool_calls, reason) =
                        tool_split(run, &c.text, c.finish.unwrap_or("length"));
                    ChatChoice {
                        index: i,
                        message: ChatMessage {
                            role: "assistant".into(),
                            // With tool calls and no text, `null` (as OpenAI).
                            content: (!content.is_empty() || tool_calls.is_empty())
                                .then_some(content),
                            refusal: None,
                            tool_calls,
                        },
                        logprobs: run.logprobs.then(|| ChatLogprobs {
                            content: c.logprobs.clone(),
                            refusal: None,
                        }),
                        finish_reason: reason.into(),
                    }
                })
                .collect();
            envelope(run, list, usage)
        }
        Kind::Text => {
            let list = choices
                .iter()
                .enumerate()
                .map(|(i, c)| TextChoice {
                    index: i,
                    text: c.text.clone(),
                    logprobs: run.logprobs.then(|| TextLogprobs::of(&c.logprobs)),
                    finish_reason: Some(c.finish.unwrap_or("length").into()),
                })
                .collect();
            envelope(run, list, usage)
        }
    }
}
