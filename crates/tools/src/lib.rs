//! Tools the server runs for the model, and the agent loop that runs them.
//!
//! A [`Tool`] is a name, a description, a JSON schema for its arguments and
//! an async call; adding one is one file that implements it and one line in
//! [`Toolbox::builtin`]. The built-ins fix what small models get wrong:
//! [`calculator`] (exact arithmetic on `fend-core`, Chinese numerals in and
//! out), [`datetime`] (today, date arithmetic, weekdays, the Chinese
//! calendar) and [`knowledge`] (the caller's knowledge bases, passages
//! numbered for citation). [`agent::run`] is the loop: a model step, the
//! calls it made run in parallel (each checked against its schema, with a
//! timeout and an output cap), their results back as `tool` messages,
//! until an answer or the step limit.

pub mod agent;
pub mod calculator;
pub mod calls;
pub mod chinese;
pub mod datetime;
pub mod knowledge;
pub mod mcp;
pub mod router;
mod schema;

pub use calls::{split_calls, Call};
pub use knowledge::{Hit, Knowledge};

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a tool call gave no result. The text goes back to the model (and
/// the user) as the call's result, so it is short and says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("invalid arguments: {0}")]
    Arguments(String),
    #[error("{0}")]
    Failed(String),
    #[error("the tool took longer than {} s and was stopped", .0.as_secs_f32())]
    Timeout(Duration),
    #[error("there is no tool named {0:?}")]
    Unknown(String),
}

/// What the model is told about a tool (OpenAI's function shape).
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments object.
    pub parameters: Value,
}

impl Spec {
    /// `{"type": "function", "function": {...}}`, as chat templates and
    /// OpenAI's `tools` take it.
    pub fn openai(&self) -> Value {
        json!({"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}})
    }
}

/// One tool. `call` gets arguments already checked against
/// `spec().parameters`.
pub trait Tool: Send + Sync {
    fn spec(&self) -> Spec;
    fn call<'a>(&'a self, args: Value, cx: &'a Context)
        -> BoxFuture<'a, Result<String, ToolError>>;
    /// This tool's call limit, when not the request's ([`Limits::timeout`]).
    fn timeout(&self) -> Option<Duration> {
        None
    }
    /// This tool's output cap, when not the request's.
    fn max_output(&self) -> Option<usize> {
        None
    }
}

/// Bounds on one request's tool use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Each call's wall-clock limit.
    pub timeout: Duration,
    /// A result longer than this many bytes is cut (at a character).
    pub max_output: usize,
    /// Model steps per request, the final answer's included.
    pub max_steps: usize,
    /// Calls run per model step; more are refused with an error result.
    pub max_calls: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_output: 16 << 10,
            max_steps: 5,
            max_calls: 8,
        }
    }
}

/// What one request's tools may see: the time, the caller's knowledge
/// bases, the limits; and the passages found so far, numbered across the
/// request's searches for citation.
pub struct Context {
    pub now: chrono::DateTime<chrono::Utc>,
    pub timezone: chrono_tz::Tz,
    pub knowledge: Option<Arc<dyn Knowledge>>,
    pub limits: Limits,
    sources: Mutex<Vec<Hit>>,
}

impl Context {
    pub fn new(timezone: chrono_tz::Tz, limits: Limits) -> Self {
        Self {
            now: chrono::Utc::now(),
            timezone,
            knowledge: None,
            limits,
            sources: Mutex::new(Vec::new()),
        }
    }

    pub fn with_knowledge(mut self, k: Arc<dyn Knowledge>) -> Self {
        self.knowledge = Some(k);
        self
    }

    /// Number `hits` after the passages found before (a passage found
    /// again keeps its number); their numbers.
    pub fn cite(&self, hits: Vec<Hit>) -> Vec<(usize, Hit)> {
        let mut s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        hits.into_iter()
            .map(|h| {
                let n = match s.iter().position(|o| o.same(&h)) {
                    Some(i) => i + 1,
                    None => {
                        s.push(h.clone());
                        s.len()
                    }
                };
                (n, h)
            })
            .collect()
    }

    /// Every passage the request's searches returned, `[n]` = index + 1.
    pub fn sources(&self) -> Vec<Hit> {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The server's time zone name, from `$TZ` or `/etc/timezone`; UTC
    /// when neither names a zone.
    pub fn local_timezone() -> chrono_tz::Tz {
        let named = std::env::var("TZ").ok().or_else(|| {
            std::fs::read_to_string("/etc/timezone")
                .ok()
                .map(|s| s.trim().to_string())
        });
        named
            .and_then(|n| n.trim_start_matches(':').parse().ok())
            .unwrap_or(chrono_tz::UTC)
    }
}

/// Every tool the server knows, by name.
#[derive(Clone, Default)]
pub struct Toolbox {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl Toolbox {
    /// The built-in tools.
    pub fn builtin() -> Self {
        let mut b = Self::default();
        b.insert(Arc::new(calculator::Calculator));
        b.insert(Arc::new(datetime::DateTime));
        b.insert(Arc::new(knowledge::SearchKnowledge));
        b
    }

    /// Add (or replace) a tool under its spec's name.
    pub fn insert(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.spec().name, tool);
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    pub fn specs(&self) -> Vec<Spec> {
        self.tools.values().map(|t| t.spec()).collect()
    }

    /// The tools `names` names, in that order (each once).
    pub fn select(&self, names: &[String]) -> Result<Toolset, ToolError> {
        let mut tools: Vec<(String, Arc<dyn Tool>)> = Vec::new();
        for n in names {
            let t = self
                .tools
                .get(n)
                .ok_or_else(|| ToolError::Unknown(n.clone()))?;
            if !tools.iter().any(|(m, _)| m == n) {
                tools.push((n.clone(), t.clone()));
            }
        }
        Ok(Toolset { tools })
    }
}

/// The tools one request may use.
#[derive(Clone, Default)]
pub struct Toolset {
    tools: Vec<(String, Arc<dyn Tool>)>,
}

/// One call's outcome, as the loop reports and records it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Outcome {
    /// The model step that made the call (from 1; 0: the server's router).
    pub step: usize,
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them (JSON text).
    pub arguments: String,
    pub ok: bool,
    /// The result, or a short error (`ok` false).
    pub content: String,
    pub ms: u64,
}

impl Toolset {
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// Add a tool (one the toolbox does not hold: an MCP server's); a
    /// name already there is kept.
    pub fn add(&mut self, tool: Arc<dyn Tool>) {
        let name = tool.spec().name;
        if !self.has(&name) {
            self.tools.push((name, tool));
        }
    }

    pub fn names(&self) -> Vec<&str> {
        self.tools.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn has(&self, name: &str) -> bool {
        self.tools.iter().any(|(n, _)| n == name)
    }

    /// The tool a call's `name` means: the one of that name, else the one
    /// MCP tool (`SERVER__TOOL`) whose own name it is, when exactly one
    /// offered server has it — small models often drop the server's
    /// prefix (the 0.5B model called `order_status` for
    /// `shop__order_status`).
    fn resolve(&self, name: &str) -> Option<(&str, &Arc<dyn Tool>)> {
        if let Some((n, t)) = self.tools.iter().find(|(n, _)| n == name) {
            return Some((n.as_str(), t));
        }
        if name.is_empty() || name.contains(mcp::SEP) {
            return None;
        }
        let suffix = format!("{}{name}", mcp::SEP);
        let mut found = self.tools.iter().filter(|(n, _)| n.ends_with(&suffix));
        match (found.next(), found.next()) {
            (Some((n, t)), None) => Some((n.as_str(), t)),
            _ => None,
        }
    }

    /// The tools in OpenAI's `tools` shape, for the chat template.
    pub fn openai(&self) -> Value {
        Value::Array(self.tools.iter().map(|(_, t)| t.spec().openai()).collect())
    }

    /// Run one call: arguments parsed and checked against the schema, the
    /// tool under the time limit, the result cut to the output cap. Never
    /// fails: an error is an `ok: false` outcome the model reads.
    pub async fn run(&self, call: &Call, cx: &Context) -> Outcome {
        let start = Instant::now();
        let (name, tool) = match self.resolve(&call.name) {
            Some((n, t)) => (n.to_string(), Some(t)),
            None => (call.name.clone(), None),
        };
        let max = tool
            .and_then(|t| t.max_output())
            .unwrap_or(cx.limits.max_output);
        let (ok, content) = match self.run_inner(tool, call, cx).await {
            Ok(s) => (true, cap(s, max)),
            Err(e) => (false, cap(format!("error: {e}"), max)),
        };
        Outcome {
            step: 0,
            id: call.id.clone(),
            name,
            arguments: call.arguments.clone(),
            ok,
            content,
            ms: start.elapsed().as_millis() as u64,
        }
    }

    async fn run_inner(
        &self,
        tool: Option<&Arc<dyn Tool>>,
        call: &Call,
        cx: &Context,
    ) -> Result<String, ToolError> {
        let tool = tool.ok_or_else(|| {
            ToolError::Unknown(format!(
                "{}; the tools are: {}",
                call.name,
                self.names().join(", ")
            ))
        })?;
        let args: Value = if call.arguments.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(&call.arguments)
                .map_err(|e| ToolError::Arguments(format!("not JSON ({e})")))?
        };
        schema::check(&tool.spec().parameters, &args).map_err(ToolError::Arguments)?;
        let limit = tool.timeout().unwrap_or(cx.limits.timeout);
        match tokio::time::timeout(limit, tool.call(args, cx)).await {
            Ok(r) => r,
            Err(_) => Err(ToolError::Timeout(limit)),
        }
    }

    /// Run `calls` at once (they are independent: one step's calls see
    /// none of each other's results); outcomes in the calls' order.
    pub async fn run_all(&self, calls: &[Call], cx: &Context) -> Vec<Outcome> {
        futures::future::join_all(calls.iter().map(|c| self.run(c, cx))).await
    }
}

/// `s` cut to at most `max` bytes at a character boundary, saying so.
pub fn cap(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let total = s.len();
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(&format!("… [cut: {total} bytes in all]"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test tool's spec: a name, a description, no arguments.
    fn no_arguments(name: &str, description: &str) -> Spec {
        Spec {
            name: name.into(),
            description: description.into(),
            parameters: json!({"type": "object", "properties": {}}),
        }
    }

    struct Slow;
    impl Tool for Slow {
        fn spec(&self) -> Spec {
            no_arguments("slow", "sleeps")
        }
        fn call<'a>(
            &'a self,
            _: Value,
            _: &'a Context,
        ) -> BoxFuture<'a, Result<String, ToolError>> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok("late".into())
            })
        }
    }

    struct Big;
    impl Tool for Big {
        fn spec(&self) -> Spec {
            no_arguments("big", "10 MB")
        }
        fn call<'a>(
            &'a self,
            _: Value,
            _: &'a Context,
        ) -> BoxFuture<'a, Result<String, ToolError>> {
            Box::pin(async { Ok("数".repeat(10 << 20)) })
        }
    }

    /// A tool of any name, answering with its name.
    struct Named(&'static str);
    impl Tool for Named {
        fn spec(&self) -> Spec {
            no_arguments(self.0, "names itself")
        }
        fn call<'a>(
            &'a self,
            _: Value,
            _: &'a Context,
        ) -> BoxFuture<'a, Result<String, ToolError>> {
            Box::pin(async { Ok(self.0.to_string()) })
        }
    }

    /// A call that drops an MCP tool's server prefix runs that tool when
    /// one offered server has it, and is an error when two do.
    #[tokio::test]
    async fn a_tool_named_without_its_servers_prefix_runs_when_one_server_has_it() {
        let mut b = Toolbox::builtin();
        for n in ["shop__order_status", "shop__refund", "bank__refund"] {
            b.insert(Arc::new(Named(n)));
        }
        let names = [
            "shop__order_status",
            "shop__refund",
            "bank__refund",
            "calculator",
        ];
        let set = b.select(&names.map(String::from)).expect("known");
        let cx = Context::new(chrono_tz::Asia::Shanghai, Limits::default());
        let out = set
            .run_all(
                &[
                    call("order_status", "{}"),
                    call("refund", "{}"),
                    call("shop__order_status", "{}"),
                    call("status", "{}"),
                ],
                &cx,
            )
            .await;
        assert_eq!(
            (out[0].ok, out[0].name.as_str(), out[0].content.as_str()),
            (true, "shop__order_status", "shop__order_status")
        );
        assert!(
            !out[1].ok && out[1].content.contains("no tool named"),
            "{:?}",
            out[1]
        );
        assert!(out[2].ok, "{:?}", out[2]);
        assert!(!out[3].ok, "{:?}", out[3]);
    }

    fn call(name: &str, args: &str) -> Call {
        Call {
            id: "call_1".into(),
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[tokio::test]
    async fn a_hanging_tool_times_out_a_huge_one_is_cut_and_bad_calls_are_errors() {
        let mut b = Toolbox::builtin();
        b.insert(Arc::new(Slow));
        b.insert(Arc::new(Big));
        let set = b
            .select(&["slow".into(), "big".into(), "calculator".into()])
            .expect("known");
        let limits = Limits {
            timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let cx = Context::new(chrono_tz::Asia::Shanghai, limits);
        let start = Instant::now();
        let out = set
            .run_all(
                &[
                    call("slow", "{}"),
                    call("big", "{}"),
                    call("calculator", "not json"),
                    call("calculator", r#"{"expr": "1+1"}"#),
                    call("rm_rf", "{}"),
                    call("calculator", r#"{"expression": "2+2"}"#),
                ],
                &cx,
            )
            .await;
        // All at once: the slow one's limit bounds the whole step.
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            !out[0].ok && out[0].content.contains("longer than"),
            "{:?}",
            out[0]
        );
        assert!(out[1].ok && out[1].content.len() < limits.max_output + 64);
        assert!(out[1].content.ends_with("bytes in all]"));
        assert!(!out[2].ok && out[2].content.contains("not JSON"));
        assert!(
            !out[3].ok && out[3].content.contains("expression"),
            "{:?}",
            out[3]
        );
        assert!(!out[4].ok && out[4].content.contains("no tool named"));
        assert_eq!((out[5].ok, out[5].content.as_str()), (true, "2+2 = 4"));
        assert!(b.select(&["nope".into()]).is_err());
    }

    #[test]
    fn passages_are_numbered_across_searches() {
        let cx = Context::new(chrono_tz::UTC, Limits::default());
        let hit = |t: &str| Hit {
            title: t.into(),
            source: format!("{t}.md"),
            text: format!("about {t}"),
            published: None,
        };
        let a = cx.cite(vec![hit("a"), hit("b")]);
        let b = cx.cite(vec![hit("c"), hit("a")]);
        assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(b.iter().map(|x| x.0).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(cx.sources().len(), 3);
    }
}
