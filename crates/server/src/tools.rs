//! Tools in chat completions.
//!
//! - Client tools (`tools`): the calls the model writes are parsed
//!   (`hanlin_tools::split_calls`) and handed back as OpenAI `tool_calls`
//!   for the client to run.
//! - Server tools (`hanlin_tools`, an extension; also web conversations):
//!   `hanlin_tools::agent::run` runs the loop, each model step on the same
//!   gateway [`Request`] ([`Metered`]): one request id, one usage row,
//!   every step reserved against the caller's limits. The steps travel in
//!   the `hanlin_tools` field of the chunks and of the answer.

use crate::api::Header;
use crate::chat_model::ChatModel;
use crate::error::ApiError;
use crate::openai::response::{ChatChoice, ChatChunkChoice, ChatMessage, Delta, ToolCall};
use crate::openai::{ToolOptions, Usage};
use crate::AppState;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use hanlin_accounts::Caller;
use hanlin_engine::{Event, FinishReason, GenerateParams};
use hanlin_gateway::Request;
use hanlin_tokenizer::Message;
use hanlin_tools::agent::{self, AgentError, Answer, Finish, StepEnd};
use hanlin_tools::mcp::{Hub, McpError, McpTool, Origin, ServerConfig};
use hanlin_tools::{Context, Hit, Knowledge, Limits, Outcome, Toolset};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

type AppResult<T> = Result<T, ApiError>;

/// Split generated text into the content and OpenAI tool calls.
pub fn split_tool_calls(text: &str) -> (String, Vec<ToolCall>) {
    let (content, calls) = hanlin_tools::split_calls(text);
    let calls = calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| ToolCall::function(i + 1, &c.name, c.arguments))
        .collect();
    (content, calls)
}

/// New tokens per model step when the client sets no `max_tokens`: each
/// step reserves its prompt plus this against the caller's limits.
pub const STEP_TOKENS: usize = 1024;

/// Model steps on one metered request.
pub(crate) struct Metered {
    pub req: Request,
    pub model: ChatModel,
    pub caller: Caller,
    /// The client's `max_tokens` for each step (none: what the context leaves).
    pub asked: Option<u32>,
    pub params: GenerateParams,
    /// Closed when the client has gone (a stream's receiver dropped).
    pub gone: Option<mpsc::UnboundedSender<String>>,
}

impl agent::Model for Metered {
    type Error = ApiError;

    async fn step(
        &mut self,
        messages: &[Message],
        tools: Option<&Value>,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> AppResult<StepEnd> {
        let prompt = self.model.prompt(messages.to_vec(), tools.cloned()).await?;
        let max_new = self.model.budget(
            &self.caller,
            &prompt,
            self.asked,
            Some(STEP_TOKENS),
            "max_tokens",
        )?;
        self.req.reserve(prompt.reserve_len() + max_new).await?;
        let mut params = self.params.clone();
        params.max_tokens = max_new;
        self.model.submit(&mut self.req, prompt, params)?;
        let mut text = String::new();
        loop {
            let ev = match &self.gone {
                Some(tx) => tokio::select! {
                    ev = self.req.next() => ev,
                    _ = tx.closed() => return Err(ApiError::internal("the client left")),
                },
                None => self.req.next().await,
            };
            match ev {
                Some((_, Event::Token { text: t, .. })) => {
                    text.push_str(&t);
                    // Enough of this step (or nobody reads it): the next
                    // submit, or the end of the request, frees the job.
                    if !on_text(&t) {
                        return Ok(StepEnd {
                            text,
                            finish: Finish::Stop,
                        });
                    }
                }
                Some((_, Event::Done { finish, .. })) => {
                    let finish = match finish {
                        FinishReason::Stop => Finish::Stop,
                        _ => Finish::Length,
                    };
                    return Ok(StepEnd { text, finish });
                }
                Some((_, Event::Failed(m))) => {
                    return Err(ApiError::internal(format!("Generation failed: {m}")))
                }
                Some(_) => {}
                None => return Err(ApiError::internal("the generation ended without an answer")),
            }
        }
    }
}

/// The knowledge bases one caller may read.
struct CallerKnowledge {
    st: Arc<AppState>,
    names: Vec<String>,
}

impl Knowledge for CallerKnowledge {
    fn search<'a>(&'a self, query: &'a str, k: usize) -> BoxFuture<'a, Result<Vec<Hit>, String>> {
        Box::pin(async move {
            let hits = crate::search::retrieve(&self.st, self.names.clone(), query.to_string(), k)
                .await
                .map_err(|e| e.message)?;
            Ok(hits
                .into_iter()
                .map(|p| Hit {
                    title: p.title,
                    source: p.source,
                    text: p.text,
                    published: p.published,
                })
                .collect())
        })
    }
}

/// One request's tools, what they may see, and how the loop runs.
pub(crate) struct Loop {
    pub tools: Toolset,
    pub cx: Context,
    pub options: agent::Options,
    /// MCP servers named but unreachable: reported as the first steps.
    pub unavailable: Vec<Outcome>,
}

/// The tools and the context for one request of `caller`.
pub(crate) async fn prepare(
    st: &Arc<AppState>,
    caller: &Caller,
    names: &[String],
    opts: &ToolOptions,
) -> AppResult<Loop> {
    if names.is_empty() || names.len() > 16 {
        return Err(
            ApiError::bad_request("'hanlin_tools' names 1 to 16 tools.").param("hanlin_tools")
        );
    }
    let (builtin, remote): (Vec<String>, Vec<String>) =
        names.iter().cloned().partition(|n| st.toolbox.has(n));
    let mut set = st.toolbox.select(&builtin).map_err(|e| unknown(st, e))?;
    // MCP servers' tools: `SERVER` (all of them) or `SERVER__TOOL`.
    let mut unavailable = Vec::new();
    for n in &remote {
        let (server, one) = st
            .mcp
            .resolve(n)
            .ok_or_else(|| unknown(st, hanlin_tools::ToolError::Unknown(n.clone())))?;
        if !server.config.allows(&caller.user.name, &caller.plan.name) {
            return Err(ApiError::forbidden(format!(
                "Your plan may not use the MCP server {:?}.",
                server.name
            ))
            .param("hanlin_tools"));
        }
        match McpTool::of(&server, one.as_deref()).await {
            Ok(tools) => tools.into_iter().for_each(|t| set.add(Arc::new(t))),
            // Down or garbled: the request goes on without its tools, and
            // the answer says why.
            Err(e @ McpError::Unreachable { .. }) => {
                tracing::warn!("{e}");
                unavailable.push(Outcome {
                    id: format!("mcp_{}", server.name),
                    name: n.clone(),
                    content: format!("error: {e}"),
                    ..Default::default()
                });
            }
            Err(e) => return Err(ApiError::bad_request(e.to_string()).param("hanlin_tools")),
        }
    }
    if set.names().len() > MAX_TOOLS {
        return Err(ApiError::bad_request(format!(
            "The tools named come to {} (at most {MAX_TOOLS}); name an MCP server's tools one by one as SERVER__TOOL.",
            set.names().len()
        ))
        .param("hanlin_tools"));
    }
    let max_steps = opts.max_steps.unwrap_or(5);
    if !(1..=10).contains(&max_steps) {
        return Err(ApiError::bad_request("'max_steps' is 1 to 10.").param("hanlin_tool_options"));
    }
    let timezone = match &opts.timezone {
        Some(tz) => tz.parse::<chrono_tz::Tz>().map_err(|_| {
            ApiError::bad_request(format!(
                "Unknown time zone {tz:?} (use an IANA name such as Asia/Shanghai)."
            ))
            .param("hanlin_tool_options")
        })?,
        None => st.timezone,
    };
    let limits = Limits {
        max_steps,
        ..Limits::default()
    };
    let mut cx = Context::new(timezone, limits);
    if set.has("search_knowledge") {
        let kbs = match &opts.kb {
            Some(names) => {
                crate::search::check_readable(st, &caller.user, names).await?;
                names.clone()
            }
            None => crate::search::readable(st, &caller.user)
                .await?
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
        };
        if !kbs.is_empty() {
            cx = cx.with_knowledge(Arc::new(CallerKnowledge {
                st: st.clone(),
                names: kbs,
            }));
        }
    }
    let options = agent::Options {
        route: opts.router.unwrap_or(true),
    };
    Ok(Loop {
        tools: set,
        cx,
        options,
        unavailable,
    })
}

/// Tools one request may have (each one's description and schema is in
/// every step's prompt).
const MAX_TOOLS: usize = 32;

fn unknown(st: &AppState, e: hanlin_tools::ToolError) -> ApiError {
    let mut known: Vec<String> = st.toolbox.names().map(str::to_string).collect();
    known.extend(st.mcp.list().iter().map(|s| s.name.clone()));
    ApiError::bad_request(format!("{e}; the server's tools are: {}", known.join(", ")))
        .param("hanlin_tools")
}

/// The MCP servers: the config file's, then those an admin registered
/// (kept in the `mcp_servers` setting). Admin-registered HTTP servers
/// must be at public addresses unless `mcp_allow` names them.
pub(crate) async fn mcp_hub(
    db: &hanlin_accounts::Db,
    config: &crate::Config,
) -> Result<Hub, crate::ServerError> {
    let policy = hanlin_search::feed::FetchPolicy::allowing(config.mcp_allow.clone());
    let hub = Hub::new(Some(Arc::new(move |host: &str, ip: std::net::IpAddr| {
        policy.allows_host(host) || policy.allows_ip(ip)
    })));
    for (name, c) in &config.mcp {
        hub.set(name, c.clone(), Origin::Config)?;
    }
    if let Some(saved) = db.setting(MCP_SETTING).await? {
        let saved: std::collections::BTreeMap<String, ServerConfig> =
            serde_json::from_str(&saved).unwrap_or_default();
        for (name, c) in saved {
            if let Err(e) = hub.set(&name, c, Origin::Admin) {
                tracing::warn!(
                    "MCP server {name:?} registered from the admin screen is skipped: {e}"
                );
            }
        }
    }
    Ok(hub)
}

/// The setting that keeps the admin-registered MCP servers.
pub(crate) const MCP_SETTING: &str = "mcp_servers";

/// Store the admin-registered MCP servers.
pub(crate) async fn save_mcp(st: &AppState) -> AppResult<()> {
    let entries = serde_json::to_string(&st.mcp.admin_entries())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    st.db.set_setting(MCP_SETTING, &entries).await?;
    Ok(())
}

/// The `hanlin_tools` record of a finished loop.
pub(crate) fn record(a: &Answer) -> Value {
    json!({"steps": a.steps, "sources": a.sources, "model_steps": a.model_steps})
}

fn finish_str(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

impl Header {
    fn chunk(&self, delta: Delta, finish: Option<&str>, include_usage: bool) -> String {
        let c = ChatChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish.map(str::to_string),
        };
        self.json(
            "chat.completion.chunk",
            vec![c],
            include_usage.then_some(None),
            None,
        )
    }

    fn event(&self, ev: Value, include_usage: bool) -> String {
        self.json::<ChatChunkChoice>(
            "chat.completion.chunk",
            Vec::new(),
            include_usage.then_some(None),
            Some(ev),
        )
    }
}

/// Run `lp`'s loop on `model`, the one way an API answer and a web reply
/// run it: the unreachable MCP servers are emitted first and come first
/// in the steps.
pub(crate) async fn run_loop(
    model: &mut Metered,
    lp: Loop,
    messages: Vec<Message>,
    emit: &mut (dyn FnMut(agent::Event) -> bool + Send),
) -> Result<Answer, AgentError<ApiError>> {
    for o in &lp.unavailable {
        if !emit(agent::Event::Result(o.clone())) {
            return Err(AgentError::Cancelled);
        }
    }
    let mut a = agent::run(model, &lp.tools, &lp.cx, messages, lp.options, emit).await?;
    a.steps.splice(0..0, lp.unavailable);
    Ok(a)
}

/// Answer a chat completion with server-run tools: the loop on `model`,
/// streamed (`stream`) or as one body.
pub(crate) async fn respond(
    head: Header,
    mut model: Metered,
    lp: Loop,
    messages: Vec<Message>,
    stream: bool,
    include_usage: bool,
) -> AppResult<Response> {
    if !stream {
        let r = run_loop(&mut model, lp, messages, &mut |_| true).await;
        let usage = Usage::from(&model.req.usage());
        // The answer does not wait for the usage row.
        tokio::spawn(model.req.finish());
        let a = match r {
            Ok(a) => a,
            Err(AgentError::Model(e)) => return Err(e),
            Err(AgentError::Cancelled) => return Err(ApiError::internal("cancelled")),
        };
        let choice = ChatChoice {
            index: 0,
            message: ChatMessage {
                role: "assistant".into(),
                content: Some(a.content.clone()),
                refusal: None,
                tool_calls: Vec::new(),
            },
            logprobs: None,
            finish_reason: finish_str(a.finish).into(),
        };
        let body = head.json(
            "chat.completion",
            vec![choice],
            Some(Some(usage)),
            Some(record(&a)),
        );
        return Ok((
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response());
    }
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    model.gone = Some(tx.clone());
    tokio::spawn(async move {
        let send = |s: String| tx.send(s).is_ok();
        send(head.chunk(
            Delta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                tool_calls: Vec::new(),
            },
            None,
            include_usage,
        ));
        let r = run_loop(&mut model, lp, messages, &mut |e| match e {
            agent::Event::Text(t) => send(head.chunk(
                Delta {
                    content: Some(t),
                    ..Default::default()
                },
                None,
                include_usage,
            )),
            agent::Event::Call { step, call } => send(head.event(
                json!({"call": {"step": step, "id": call.id, "name": call.name, "arguments": call.arguments}}),
                include_usage,
            )),
            agent::Event::Result(o) => send(head.event(json!({ "result": o }), include_usage)),
        })
        .await;
        let usage = Usage::from(&model.req.usage());
        match r {
            Ok(a) => {
                let last = ChatChunkChoice {
                    index: 0,
                    delta: Delta::default(),
                    logprobs: None,
                    finish_reason: Some(finish_str(a.finish).into()),
                };
                send(head.json(
                    "chat.completion.chunk",
                    vec![last],
                    include_usage.then_some(None),
                    Some(record(&a)),
                ));
                if include_usage {
                    send(head.json::<ChatChunkChoice>(
                        "chat.completion.chunk",
                        Vec::new(),
                        Some(Some(usage)),
                        None,
                    ));
                }
                send("[DONE]".into());
            }
            Err(AgentError::Model(e)) => {
                send(serde_json::to_string(&e.body()).unwrap_or_default());
            }
            Err(AgentError::Cancelled) => {}
        }
        drop(tx);
        model.gone = None;
        model.req.finish().await;
    });
    let s = futures::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok::<_, Infallible>(SseEvent::default().data(data)), rx))
    });
    Ok(Sse::new(s).into_response())
}

/// The tools `user` on `plan` may name in `hanlin_tools`: the built-ins
/// and the MCP servers their allow-lists let in (not connected to here).
pub(crate) fn available(st: &AppState, user: &str, plan: &str) -> Value {
    let mut data: Vec<Value> = st
        .toolbox
        .specs()
        .into_iter()
        .map(|s| json!({"name": s.name, "kind": "builtin", "description": s.description}))
        .collect();
    data.extend(
        st.mcp
            .list()
            .iter()
            .filter(|s| s.config.allows(user, plan))
            .map(|s| json!({"name": s.name, "kind": "mcp", "description": format!("Tools of the MCP server {}", s.name)})),
    );
    json!({"object": "list", "data": data})
}

/// `GET /v1/tools`: what the caller may name in `hanlin_tools`.
pub async fn list(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
    crate::extract::ApiCaller(caller): crate::extract::ApiCaller,
) -> axum::Json<Value> {
    axum::Json(available(&st, &caller.user.name, &caller.plan.name))
}
