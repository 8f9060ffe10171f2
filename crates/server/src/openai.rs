//! OpenAI request bodies, validated the way the OpenAI API validates them
//! (unknown fields, wrong types and out-of-range values are 400s naming the
//! parameter), and their conversion into engine parameters.

pub mod response;

use crate::error::ApiError;
use hanlin_engine::{GenerateParams, SamplerConfig};
use hanlin_tokenizer::Message;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

const SAMPLING_FIELDS: &[&str] = &[
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "n",
    "top_k",
    "min_p",
    "repetition_penalty",
];

pub const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "user",
    "logit_bias",
    "metadata",
    "store",
    "service_tier",
    "hanlin_tools",
    "hanlin_tool_options",
];

pub const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "suffix",
    "stream",
    "stream_options",
    "max_tokens",
    "logprobs",
    "echo",
    "best_of",
    "user",
    "logit_bias",
    "parse_special",
];

/// Parse a JSON body into `T`, refusing top-level fields outside `fields`
/// (and the sampling fields), and mapping serde's complaints to OpenAI errors.
pub fn parse<T: DeserializeOwned>(body: &[u8], fields: &[&str]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request. ({e})"
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
        ));
    }
    if let Some(obj) = value.as_object() {
        if let Some(k) = obj
            .keys()
            .find(|k| !fields.contains(&k.as_str()) && !SAMPLING_FIELDS.contains(&k.as_str()))
        {
            return Err(ApiError::bad_request(format!(
                "Unrecognized request argument supplied: {k}"
            ))
            .param(k));
        }
    }
    serde_json::from_value(value).map_err(|e| {
        let msg = e.to_string();
        let param = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"))
            .map(str::to_string);
        let msg = if msg.starts_with("unknown field") {
            format!(
                "Unrecognized request argument supplied: {}",
                param.as_deref().unwrap_or("?")
            )
        } else {
            format!("Invalid request: {msg}")
        };
        let mut err = ApiError::bad_request(msg);
        err.param = param;
        err
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Value>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub refusal: Option<String>,
}

/// Sampling fields shared by chat and text completions.
#[derive(Debug, Deserialize, Default)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    // Extensions many local servers accept (llama.cpp, vLLM).
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    pub user: Option<String>,
    pub logit_bias: Option<Value>,
    pub metadata: Option<Value>,
    pub store: Option<bool>,
    pub service_tier: Option<String>,
    /// Tools the server runs itself (an extension): `["calculator",
    /// "datetime", "search_knowledge"]`.
    pub hanlin_tools: Option<Vec<String>>,
    pub hanlin_tool_options: Option<ToolOptions>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// How the server runs `hanlin_tools`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ToolOptions {
    /// Model steps, the final answer's included (1 to 10; default 5).
    pub max_steps: Option<usize>,
    /// Run the calculator first when the question is plain arithmetic
    /// (default true).
    pub router: Option<bool>,
    /// IANA time zone for `datetime` (default: the server's).
    pub timezone: Option<String>,
    /// The knowledge bases `search_knowledge` reads (default: every one
    /// the caller may read).
    pub kb: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub suffix: Option<String>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
    pub user: Option<String>,
    pub logit_bias: Option<Value>,
    /// Hanlin's extension: recognise special tokens (`<|im_start|>`)
    /// written in the prompt. Off by default: the prompt is plain text.
    pub parse_special: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

fn range(v: Option<f32>, lo: f32, hi: f32, name: &str) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ApiError::bad_request(format!(
            "{x} is not a valid value for '{name}': it must be between {lo} and {hi}."
        ))
        .param(name)
        .code("invalid_value")),
        _ => Ok(()),
    }
}

impl Sampling {
    /// Validate and convert; OpenAI's defaults (temperature 1, top_p 1, no
    /// penalties) unless the request says otherwise.
    pub fn to_params(
        &self,
        max_tokens: usize,
        logprobs: bool,
        top_logprobs: usize,
    ) -> Result<GenerateParams, ApiError> {
        range(self.temperature, 0.0, 2.0, "temperature")?;
        range(self.top_p, 0.0, 1.0, "top_p")?;
        range(self.presence_penalty, -2.0, 2.0, "presence_penalty")?;
        range(self.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
        range(self.min_p, 0.0, 1.0, "min_p")?;
        range(self.repetition_penalty, 0.0, 10.0, "repetition_penalty")?;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(
                ApiError::bad_request("'stop' may hold at most 4 sequences.")
                    .param("stop")
                    .code("invalid_value"),
            );
        }
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let seed = match self.seed {
            Some(s) => s as u64,
            None => rand::random(),
        };
        Ok(GenerateParams {
            max_tokens,
            sampler: SamplerConfig {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: self.top_k.unwrap_or(0) as usize,
                top_p: self.top_p.unwrap_or(1.0),
                min_p: self.min_p.unwrap_or(0.0),
                repeat_penalty: self.repetition_penalty.unwrap_or(1.0),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                penalty_last_n: 0,
                seed,
            },
            stop,
            top_logprobs,
            logprobs,
        })
    }

    /// The number of choices, at most `max` (the caller's plan's `max_n`).
    pub fn n(&self, max: i64) -> Result<usize, ApiError> {
        let max = max.clamp(1, 16) as u32;
        match self.n.unwrap_or(1) {
            n if (1..=max).contains(&n) => Ok(n as usize),
            n => Err(ApiError::bad_request(format!(
                "{n} is not a valid value for 'n': your plan allows 1 to {max}."
            ))
            .param("n")
            .code("invalid_value")),
        }
    }
}

impl ChatRequest {
    /// The conversation as template messages (text parts joined).
    pub fn template_messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(
                ApiError::bad_request("'messages' must contain at least one message.")
                    .param("messages"),
            );
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant" | "tool") => r,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "Invalid value: '{other}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'."
                        ))
                        .param(&format!("messages[{i}].role"))
                        .code("invalid_value"))
                    }
                };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            if p.kind != "text" {
                                return Err(ApiError::bad_request(format!(
                                    "Content parts of type '{}' are not supported by this model; only 'text'.",
                                    p.kind
                                ))
                                .param(&format!("messages[{i}].content")));
                            }
                            s.push_str(p.text.as_deref().unwrap_or(""));
                        }
                        s
                    }
                };
                let mut msg = Message::new(role, content);
                msg.tool_calls = m.tool_calls.clone();
                msg.name = m.name.clone();
                Ok(msg)
            })
            .collect()
    }
}

pub const EMBEDDING_FIELDS: &[&str] = &["model", "input", "encoding_format", "dimensions", "user"];

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<u32>,
    pub user: Option<String>,
}

/// `usage` in OpenAI's completion responses.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: i64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: i64,
}

impl From<&hanlin_accounts::Usage> for Usage {
    fn from(u: &hanlin_accounts::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.tokens(),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
            completion_tokens_details: CompletionTokensDetails {
                reasoning_tokens: 0,
            },
        }
    }
}
