//! The model a web conversation, a messaging channel, an answer from
//! knowledge bases or a server-side tool loop runs on: a model this
//! process loads ([`Scheduler`]) or one served by upstream nodes
//! ([`Pool`]). Both go through the same gateway [`Request`] (limits,
//! reservation, usage row): a local model's prompt is token ids and its
//! work runs on the scheduler; an upstream model's prompt is the messages
//! in OpenAI's shape and its work is a streamed chat completion on a node,
//! whose chunks come back as the same engine events
//! (`crate::upstream::ChatJob`). What builds on chat is written once.

use crate::api::{blocking, budget, chat_prompt};
use crate::error::ApiError;
use crate::AppState;
use hanlin_accounts::Caller;
use hanlin_engine::{GenerateParams, Scheduler};
use hanlin_gateway::{Request, Work};
use hanlin_tokenizer::{Message, Tokenizer};
use hanlin_upstream::Pool;
use serde_json::{json, Value};
use std::sync::Arc;

type AppResult<T> = Result<T, ApiError>;

#[derive(Clone)]
pub(crate) enum ChatModel {
    Local(Arc<Scheduler>),
    Upstream {
        pool: Arc<Pool>,
        /// Counts the model's tokens (`tokenizer = …`), when configured.
        counter: Option<Arc<Tokenizer>>,
        /// Its metrics.
        gw: Arc<hanlin_gateway::Gateway>,
    },
}

/// A rendered prompt.
pub(crate) enum Prompt {
    /// A local model's token ids.
    Tokens(Vec<u32>),
    /// An upstream model's messages (and tools), in OpenAI's shape.
    Messages {
        messages: Vec<Value>,
        tools: Option<Value>,
        /// The most tokens it can be: bytes plus what a template adds.
        bound: usize,
        /// Tokens as the configured tokenizer counts them.
        counted: Option<usize>,
    },
}

impl Prompt {
    /// Tokens to reserve: exact, or the most it can be.
    pub fn reserve_len(&self) -> usize {
        match self {
            Prompt::Tokens(t) => t.len(),
            Prompt::Messages { bound, .. } => *bound,
        }
    }

    /// Tokens to fit into a context: exact, or the best estimate (the
    /// tokenizer's count, else a quarter of the bound).
    pub fn fit_len(&self) -> usize {
        match self {
            Prompt::Tokens(t) => t.len(),
            Prompt::Messages { bound, counted, .. } => counted.unwrap_or(bound.div_ceil(4)),
        }
    }
}

impl ChatModel {
    /// The model `model` as `caller` may use it: loaded here, or an
    /// upstream pool's.
    pub async fn of(st: &AppState, caller: &Caller, model: &str) -> AppResult<Self> {
        match st.upstreams.get(model) {
            Some(pool) => {
                if !crate::api::visible(caller, model) {
                    return Err(ApiError::model_not_found(model));
                }
                Ok(Self::Upstream {
                    counter: st.upstreams.counter(model),
                    pool,
                    gw: st.gw.clone(),
                })
            }
            None => Ok(Self::Local(
                crate::api::scheduler_for(st, caller, model).await?,
            )),
        }
    }

    /// Render `messages` (and `tools`, OpenAI's function list) for the
    /// assistant's turn.
    pub async fn prompt(&self, messages: Vec<Message>, tools: Option<Value>) -> AppResult<Prompt> {
        match self {
            Self::Local(sched) => Ok(Prompt::Tokens(chat_prompt(sched, messages, tools).await?)),
            Self::Upstream { pool, counter, .. } => {
                let messages = openai_messages(&messages);
                let tools_bytes = tools.as_ref().map_or(0, |t| t.to_string().len());
                let bound = crate::upstream::prompt_bound(pool, &messages) + tools_bytes;
                let counted = match counter {
                    Some(t) => {
                        let t = t.clone();
                        let mut texts: Vec<String> = messages
                            .iter()
                            .map(|m| crate::upstream::text_of(&m["content"]))
                            .collect();
                        texts.extend(tools.as_ref().map(Value::to_string));
                        blocking(move || Ok(crate::upstream::count_texts(&t, &texts, 4)))
                            .await?
                            .map(|n| n as usize)
                    }
                    None => None,
                };
                Ok(Prompt::Messages {
                    messages,
                    tools,
                    bound,
                    counted,
                })
            }
        }
    }

    /// The new tokens a step may generate: what the client `asked` (or
    /// `default`, or all the context leaves), checked against the context
    /// (a local model's, the plan's) and an upstream model's `max_tokens`.
    pub fn budget(
        &self,
        caller: &Caller,
        prompt: &Prompt,
        asked: Option<u32>,
        default: Option<usize>,
        param: &str,
    ) -> AppResult<usize> {
        match self {
            Self::Local(sched) => budget(sched, caller, prompt.fit_len(), asked, default, param),
            Self::Upstream { pool, .. } => {
                let cap = pool.config.max_tokens as usize;
                if asked.is_some_and(|n| n as usize > cap) {
                    return Err(ApiError::bad_request(format!(
                        "'{param}' is too large: the model `{}` allows at most {cap}.",
                        pool.model
                    ))
                    .param(param));
                }
                // The context is the plan's: the node's own is not known
                // here (an answer that does not fit ends early there).
                let limit = caller.plan.max_context.max(1) as usize;
                let default = default.unwrap_or(cap).min(cap);
                crate::api::budget_within(limit, prompt.fit_len(), asked, Some(default), param)
            }
        }
    }

    /// The most context a prompt and its answer may take.
    pub fn context(&self, caller: &Caller) -> usize {
        let plan = caller.plan.max_context.max(1) as usize;
        match self {
            Self::Local(sched) => sched.config.ctx.min(plan),
            Self::Upstream { .. } => plan,
        }
    }

    /// Start one generation of `prompt` on `request` (already reserved);
    /// its events come out of `request.next()`.
    pub fn submit(
        &self,
        request: &mut Request,
        prompt: Prompt,
        params: GenerateParams,
    ) -> AppResult<()> {
        match (self, prompt) {
            (Self::Local(sched), Prompt::Tokens(ids)) => {
                request.submit(&**sched, vec![Work::generate(ids, params)])?;
            }
            (
                Self::Upstream { pool, counter, gw },
                Prompt::Messages {
                    messages,
                    tools,
                    bound,
                    counted,
                },
            ) => {
                let job = crate::upstream::ChatJob {
                    gw: gw.clone(),
                    pool: pool.clone(),
                    counter: counter.clone(),
                    messages,
                    tools,
                    bound,
                    counted,
                };
                request.submit(&job, vec![Work::generate(Vec::new(), params)])?;
            }
            _ => return Err(ApiError::internal("a prompt rendered for another model")),
        }
        Ok(())
    }
}

/// Messages as an OpenAI-compatible server takes them: an assistant's
/// tool calls carry their arguments as JSON text, and each tool result
/// names the call it answers (the calls of the assistant message before
/// it, in order).
pub(crate) fn openai_messages(messages: &[Message]) -> Vec<Value> {
    let mut out = Vec::with_capacity(messages.len());
    let mut pending: std::collections::VecDeque<String> = Default::default();
    for m in messages {
        let mut v = json!({"role": m.role, "content": m.content});
        if let Some(Value::Array(calls)) = &m.tool_calls {
            pending.clear();
            let calls: Vec<Value> = calls
                .iter()
                .map(|c| {
                    let id = c["id"].as_str().unwrap_or("call").to_string();
                    pending.push_back(id.clone());
                    let args = match &c["function"]["arguments"] {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    json!({"id": id, "type": "function",
                        "function": {"name": c["function"]["name"], "arguments": args}})
                })
                .collect();
            v["tool_calls"] = Value::Array(calls);
        }
        if m.role == "tool" {
            v["tool_call_id"] = json!(pending.pop_front().unwrap_or_else(|| "call".into()));
            if let Some(n) = &m.name {
                v["name"] = json!(n);
            }
        }
        out.push(v);
    }
    out
}

/// One greedy chat completion of `system` + `user` (at most `max_tokens`
/// new tokens) on `model`, through `request` (admitted by the caller: the
/// plan's limits, priority and metering apply as to any request).
pub(crate) async fn complete(
    st: &AppState,
    mut request: Request,
    model: &str,
    system: &str,
    user: &str,
    max_tokens: u32,
) -> AppResult<String> {
    let chat = ChatModel::of(st, request.caller(), model).await?;
    let msgs = vec![Message::new("system", system), Message::new("user", user)];
    let prompt = chat.prompt(msgs, None).await?;
    let max_new = chat.budget(request.caller(), &prompt, Some(max_tokens), None, "prompt")?;
    let mut params = GenerateParams {
        max_tokens: max_new,
        ..Default::default()
    };
    params.sampler.temperature = 0.0;
    request.reserve(prompt.reserve_len() + max_new).await?;
    chat.submit(&mut request, prompt, params)?;
    let mut out = String::new();
    let mut failed = None;
    while let Some((_, ev)) = request.next().await {
        match ev {
            hanlin_engine::Event::Token { text, .. } => out.push_str(&text),
            hanlin_engine::Event::Failed(msg) => failed = Some(msg),
            _ => {}
        }
    }
    request.finish().await;
    match failed {
        Some(msg) => Err(ApiError::internal(format!("Generation failed: {msg}"))),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_results_name_the_calls_they_answer() {
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(json!([
            {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": {"expr": "1+1"}}},
            {"id": "call_2", "type": "function", "function": {"name": "date", "arguments": "{}"}},
        ]));
        let mut r1 = Message::new("tool", "2");
        r1.name = Some("calc".into());
        let r2 = Message::new("tool", "2026-11-29");
        let v = openai_messages(&[Message::new("user", "hi"), call, r1, r2]);
        assert_eq!(
            v[1]["tool_calls"][0]["function"]["arguments"],
            "{\"expr\":\"1+1\"}"
        );
        assert_eq!(v[1]["tool_calls"][1]["function"]["arguments"], "{}");
        assert_eq!(v[2]["tool_call_id"], "call_1");
        assert_eq!(v[2]["name"], "calc");
        assert_eq!(v[3]["tool_call_id"], "call_2");
        assert!(v[0].get("tool_call_id").is_none());
    }
}
