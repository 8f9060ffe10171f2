//! The agent loop: a model step → the tool calls in its text run (in
//! parallel, each bounded) → their results go back as `tool` messages →
//! the next step, until a step makes no call (the answer) or
//! `max_steps` is reached. What runs a step is a [`Model`]: the server's
//! runs it on one metered gateway request (every step reserved and
//! counted on the same request id), the CLI's on a local session.
//!
//! Text streams out as it comes, except a step's beginning that may still
//! be a call (`{`, `<tool_call>`): that is held until the step ends, so a
//! client never sees call syntax as answer text. Tool results enter the
//! prompt as message content, which the tokenizer never reads as control
//! tokens.

use crate::calls::{may_be_call, split_calls, Call};
use crate::{router, Context, Hit, Outcome, Toolset};
use hanlin_tokenizer::Message;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;

/// Why a model step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Stop,
    Length,
}

/// What one model step produced.
#[derive(Debug, Clone)]
pub struct StepEnd {
    pub text: String,
    pub finish: Finish,
}

/// Runs model steps. `on_text` gets the text as it is generated and
/// returns `false` when nobody wants it any more (the step should stop).
pub trait Model: Send {
    type Error: Send;
    fn step(
        &mut self,
        messages: &[Message],
        tools: Option<&Value>,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> impl Future<Output = Result<StepEnd, Self::Error>> + Send;
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// Answer text (streamable as the assistant's content).
    Text(String),
    /// The server is about to run a call (`step` from 1; 0: the router's).
    Call { step: usize, call: Call },
    /// A call's outcome.
    Result(Outcome),
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError<E> {
    #[error(transparent)]
    Model(E),
    /// The consumer of the events went away.
    #[error("cancelled")]
    Cancelled,
}

/// The loop's result.
#[derive(Debug, Clone)]
pub struct Answer {
    pub content: String,
    pub finish: Finish,
    /// Every call run (or refused), in order.
    pub steps: Vec<Outcome>,
    /// The passages searches found; `[n]` in the content is `sources[n-1]`.
    pub sources: Vec<Hit>,
    /// Model steps run.
    pub model_steps: usize,
}

/// What the loop may do besides the model's own calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Run a tool first when the question plainly asks for it: arithmetic,
    /// a unit conversion, a price change, a date task ([`router`]).
    pub route: bool,
}

/// The assistant message that made `calls` (arguments as objects, which
/// is what chat templates render).
fn call_message(content: &str, calls: &[Call]) -> Message {
    let list: Vec<Value> = calls
        .iter()
        .map(|c| {
            let args = serde_json::from_str::<Value>(&c.arguments)
                .unwrap_or_else(|_| Value::String(c.arguments.clone()));
            serde_json::json!({"id": c.id, "type": "function",
                "function": {"name": c.name, "arguments": args}})
        })
        .collect();
    let mut m = Message::new("assistant", content);
    m.tool_calls = Some(Value::Array(list));
    m
}

fn tool_message(o: &Outcome) -> Message {
    let mut m = Message::new("tool", o.content.as_str());
    m.name = Some(o.name.clone());
    m
}

/// Said to the model with the tools (after the caller's system prompt,
/// if any): small models otherwise call a tool again with its own result
/// instead of answering.
pub const GUIDANCE: &str = "Use a tool when it gives a more exact answer than you can (arithmetic, dates, the user's documents). When a <tool_response> arrives, answer the user in words using it; do not call the same tool again with the result.";

fn guide(messages: &mut Vec<Message>) {
    match messages.first_mut() {
        Some(m) if m.role == "system" => {
            m.content = format!("{}\n\n{GUIDANCE}", m.content);
        }
        _ => messages.insert(0, Message::new("system", GUIDANCE)),
    }
}

/// Keep the first of calls that ask the same thing; how many are left.
fn distinct(calls: &mut Vec<Call>) -> usize {
    let mut keys = Vec::new();
    calls.retain(|c| {
        let k = c.key();
        let new = !keys.contains(&k);
        keys.push(k);
        new
    });
    calls.len()
}

/// The answer when the model never gave one: the results the tools did
/// give (exact, if not in the model's words), or a plain apology.
fn composed(steps: &[Outcome], step: usize) -> String {
    results(steps).unwrap_or_else(|| {
        format!("(No answer: the model was still calling tools after {step} steps.)")
    })
}

/// The distinct results the tools gave, one per line (`None`: none did);
/// a result that only restates its input (`80779853376 = 80779853376`,
/// a model calling the calculator on an answer) is left out.
fn results(steps: &[Outcome]) -> Option<String> {
    let mut ok: Vec<String> = Vec::new();
    for o in steps.iter().filter(|o| o.ok) {
        let restated = o
            .content
            .split_once(" = ")
            .is_some_and(|(a, b)| a.trim() == b.trim());
        let line = format!("{}: {}", o.name, o.content);
        if !restated && !ok.contains(&line) {
            ok.push(line);
        }
    }
    (!ok.is_empty()).then(|| ok.join("\n"))
}

/// Run the loop on `messages` with `tools`.
pub async fn run<M: Model>(
    model: &mut M,
    tools: &Toolset,
    cx: &Context,
    mut messages: Vec<Message>,
    opts: Options,
    emit: &mut (dyn FnMut(Event) -> bool + Send),
) -> Result<Answer, AgentError<M::Error>> {
    let offered = (!tools.is_empty()).then(|| tools.openai());
    if offered.is_some() {
        guide(&mut messages);
    }
    let mut steps: Vec<Outcome> = Vec::new();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut next_id = 1usize;
    if opts.route {
        let question = messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default();
        if let Some(r) = router::route(&question).filter(|r| tools.has(r.tool)) {
            let call = Call {
                id: format!("call_{next_id}"),
                name: r.tool.into(),
                arguments: r.arguments.to_string(),
            };
            next_id += 1;
            if !emit(Event::Call {
                step: 0,
                call: call.clone(),
            }) {
                return Err(AgentError::Cancelled);
            }
            let mut o = tools.run(&call, cx).await;
            o.step = 0;
            if !emit(Event::Result(o.clone())) {
                return Err(AgentError::Cancelled);
            }
            seen.insert(call.key(), 0);
            messages.push(call_message("", std::slice::from_ref(&call)));
            messages.push(tool_message(&o));
            steps.push(o);
        }
    }
    let max_steps = cx.limits.max_steps.max(1);
    // After a step whose calls were all repeats, and on the last step, the
    // model is asked without tools: it can only answer.
    let mut force = false;
    for step in 1..=max_steps {
        let offer = if force || step == max_steps {
            None
        } else {
            offered.as_ref()
        };
        let mut held = String::new();
        let mut streaming = false;
        let mut alive = true;
        let end = {
            let mut on_text = |t: &str| -> bool {
                if streaming {
                    alive = emit(Event::Text(t.to_string()));
                    return alive;
                }
                held.push_str(t);
                if offered.is_none() || !may_be_call(&held) {
                    streaming = true;
                    alive = emit(Event::Text(std::mem::take(&mut held)));
                    return alive;
                }
                // Small models repeat a call until the step's token limit:
                // a step ends at its first repeated call or at the cap.
                if t.contains('}') {
                    let (_, mut calls) = split_calls(&held);
                    let n = calls.len();
                    if distinct(&mut calls) < n || n >= cx.limits.max_calls {
                        return false;
                    }
                }
                true
            };
            model
                .step(&messages, offer, &mut on_text)
                .await
                .map_err(AgentError::Model)?
        };
        if !alive {
            return Err(AgentError::Cancelled);
        }
        let (content, mut calls) = match offered {
            Some(_) => split_calls(&end.text),
            None => (end.text.trim().to_string(), Vec::new()),
        };
        if offer.is_none() && !calls.is_empty() {
            // Asked without tools, it still wrote calls: what is left is
            // the answer.
            let finish = Finish::Length;
            let content = if content.is_empty() {
                composed(&steps, step)
            } else {
                content
            };
            if !streaming && !emit(Event::Text(content.clone())) {
                return Err(AgentError::Cancelled);
            }
            return Ok(Answer {
                content,
                finish,
                steps,
                sources: cx.sources(),
                model_steps: step,
            });
        }
        // A call repeated within the step is one call.
        distinct(&mut calls);
        if calls.is_empty() {
            let mut content = end.text.trim().to_string();
            // A call too broken to read is not an answer either: text held
            // back to its end because it may be a call (never streamed)
            // that names a tool, or that the token limit cut off.
            let names_a_tool = content.contains("\"name\"")
                && (content.contains("\"arguments\"")
                    || tools
                        .names()
                        .iter()
                        .any(|n| content.contains(&format!("\"{n}"))));
            let broken_call = !streaming
                && offered.is_some()
                && may_be_call(&content)
                && (names_a_tool || end.finish == Finish::Length);
            if content.is_empty() || broken_call {
                // Nothing said after the calls: the tools' results are the
                // answer.
                if let Some(r) = results(&steps) {
                    content = r;
                    held = content.clone();
                }
            }
            if !held.is_empty() && !emit(Event::Text(held)) {
                return Err(AgentError::Cancelled);
            }
            return Ok(Answer {
                content,
                finish: end.finish,
                steps,
                sources: cx.sources(),
                model_steps: step,
            });
        }
        for c in &mut calls {
            c.id = format!("call_{next_id}");
            next_id += 1;
        }
        // Which calls run: not past the per-step cap, not a repeat.
        let mut outcomes: Vec<Option<Outcome>> = Vec::new();
        let mut to_run = Vec::new();
        for (i, c) in calls.iter().enumerate() {
            if !emit(Event::Call {
                step,
                call: c.clone(),
            }) {
                return Err(AgentError::Cancelled);
            }
            let refuse = if i >= cx.limits.max_calls {
                Some(format!(
                    "error: not run: at most {} calls per step",
                    cx.limits.max_calls
                ))
            } else {
                seen.get(&c.key()).map(|s| {
                    format!(
                        "error: not run again: the same call was made before (step {s}) and its result is above; answer with it"
                    )
                })
            };
            match refuse {
                Some(content) => outcomes.push(Some(Outcome {
                    step,
                    id: c.id.clone(),
                    name: c.name.clone(),
                    arguments: c.arguments.clone(),
                    ok: false,
                    content,
                    ms: 0,
                })),
                None => {
                    seen.insert(c.key(), step);
                    outcomes.push(None);
                    to_run.push(c.clone());
                }
            }
        }
        let mut ran = tools.run_all(&to_run, cx).await.into_iter();
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| o.or_else(|| ran.next()))
            .map(|o| {
                let mut o = o.unwrap_or_default();
                o.step = step;
                o
            })
            .collect();
        for o in &outcomes {
            if !emit(Event::Result(o.clone())) {
                return Err(AgentError::Cancelled);
            }
        }
        force = to_run.is_empty();
        messages.push(call_message(&content, &calls));
        messages.extend(outcomes.iter().map(tool_message));
        steps.extend(outcomes);
    }
    unreachable!("the last step returns")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, Toolbox};
    use std::collections::VecDeque;

    /// Answers each step with the next scripted text, in pieces.
    struct Script {
        replies: VecDeque<String>,
        seen: Vec<Vec<Message>>,
        offered: Vec<bool>,
        /// How the last reply ends (the others stop).
        last_finish: Finish,
    }

    impl Model for Script {
        type Error = String;
        async fn step(
            &mut self,
            messages: &[Message],
            tools: Option<&Value>,
            on_text: &mut (dyn FnMut(&str) -> bool + Send),
        ) -> Result<StepEnd, String> {
            self.offered.push(tools.is_some());
            self.seen.push(messages.to_vec());
            let text = self.replies.pop_front().ok_or("no more replies")?;
            for piece in text.split_inclusive(' ') {
                if !on_text(piece) {
                    break;
                }
            }
            let finish = if self.replies.is_empty() {
                self.last_finish
            } else {
                Finish::Stop
            };
            Ok(StepEnd { text, finish })
        }
    }

    fn script(replies: &[&str]) -> Script {
        Script {
            replies: replies.iter().map(|s| s.to_string()).collect(),
            seen: Vec::new(),
            offered: Vec::new(),
            last_finish: Finish::Stop,
        }
    }

    async fn go(
        m: &mut Script,
        question: &str,
        opts: Options,
    ) -> (Result<Answer, AgentError<String>>, Vec<Event>) {
        let tools = Toolbox::builtin()
            .select(&["calculator".into(), "datetime".into()])
            .expect("known");
        let cx = Context::new(chrono_tz::UTC, Limits::default());
        let mut events = Vec::new();
        let r = run(
            m,
            &tools,
            &cx,
            vec![Message::new("user", question)],
            opts,
            &mut |e| {
                events.push(e);
                true
            },
        )
        .await;
        (r, events)
    }

    fn text(events: &[Event]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn nothing_said_after_the_calls_answers_with_their_results() {
        let mut m = script(&[
            r#"{"name": "calculator", "arguments": {"expression": "123456 * 654321"}}"#,
            r#"{"name": "calculator", "arguments": {"expression": "80779853376"}}"#,
            "",
        ]);
        let (r, events) = go(&mut m, "What is 123456 times 654321?", Options::default()).await;
        let a = r.expect("answer");
        assert_eq!(a.content, "calculator: 123456 * 654321 = 80779853376");
        assert_eq!(text(&events), a.content);
    }

    #[tokio::test]
    async fn a_call_runs_and_its_result_reaches_the_next_step() {
        let mut m = script(&[
            r#"{"name": "calculator", "arguments": {"expression": "123456 * 654321"}}"#,
            "123456 × 654321 = 80779853376.",
        ]);
        let (r, events) = go(&mut m, "What is 123456 times 654321?", Options::default()).await;
        let a = r.expect("answer");
        assert_eq!(a.content, "123456 × 654321 = 80779853376.");
        assert_eq!(a.model_steps, 2);
        assert_eq!(a.steps.len(), 1);
        assert_eq!(
            (a.steps[0].ok, a.steps[0].content.as_str()),
            (true, "123456 * 654321 = 80779853376")
        );
        // The call's syntax never streams as text; the answer does.
        assert_eq!(text(&events), "123456 × 654321 = 80779853376.");
        let second = &m.seen[1];
        assert_eq!(second.len(), 4);
        assert_eq!(
            (second[0].role.as_str(), second[0].content.as_str()),
            ("system", GUIDANCE)
        );
        assert_eq!(second[2].role, "assistant");
        let tc = second[2].tool_calls.as_ref().expect("calls");
        assert_eq!(
            tc[0]["function"]["arguments"]["expression"],
            "123456 * 654321"
        );
        assert_eq!(
            (second[3].role.as_str(), second[3].content.as_str()),
            ("tool", "123456 * 654321 = 80779853376")
        );
    }

    #[tokio::test]
    async fn a_model_that_loops_is_stopped_and_the_request_still_ends() {
        let call = r#"{"name": "datetime", "arguments": {"operation": "now"}}"#;
        let mut m = script(&[call, call, call, call, call, call]);
        let (r, _) = go(&mut m, "What time is it?", Options::default()).await;
        let a = r.expect("ends");
        assert_eq!(a.finish, Finish::Length);
        // The repeat is refused; the next step is asked without tools.
        assert_eq!(a.model_steps, 3);
        assert_eq!(m.offered, [true, true, false]);
        assert_eq!(a.steps.len(), 2);
        assert!(a.steps[0].ok && !a.steps[1].ok, "{:?}", a.steps);
        assert!(a.steps[1].content.contains("same call"));
        // It never answered: the answer is what the tool gave.
        assert!(a.content.starts_with("datetime: Now: "), "{}", a.content);
        // Different calls every step: the last step still has no tools.
        let calls: Vec<String> = (1..=6)
            .map(|d| format!(r#"{{"name": "datetime", "arguments": {{"days": {d}}}}}"#))
            .collect();
        let refs: Vec<&str> = calls.iter().map(String::as_str).collect();
        let mut m = script(&refs);
        let (r, events) = go(&mut m, "Count days", Options::default()).await;
        let a = r.expect("ends");
        assert_eq!(m.offered, [true, true, true, true, false]);
        assert_eq!((a.model_steps, a.steps.len()), (5, 4));
        // No call syntax reached the stream.
        assert!(!text(&events).contains("\"name\""), "{}", text(&events));
    }

    /// Qwen2.5-Coder-0.5B, given the router's result, wrote a call with a
    /// quote missing; it went out as the answer, call syntax and all.
    #[tokio::test]
    async fn a_broken_call_is_not_the_answer() {
        let mut m =
            script(&[r#"{"name": "calculator", "arguments": {"expression":"250 * (1 - 0.30)}}"#]);
        let (r, events) = go(
            &mut m,
            "A 250 dollar jacket is 30% off. What does it cost?",
            Options { route: true },
        )
        .await;
        let a = r.expect("ends");
        assert_eq!(a.steps[0].content, "250 * (1 - (30/100)) = 175");
        assert_eq!(a.content, format!("calculator: {}", a.steps[0].content));
        assert!(!text(&events).contains("\"name\""), "{}", text(&events));
    }

    /// Qwen2.5-Coder-0.5B on a CI machine: after the router's
    /// result it repeated the call, then (asked without tools) began a
    /// call again and stopped after the tool's name; that half call went
    /// out as the answer.
    #[tokio::test]
    async fn a_call_cut_after_its_name_is_not_the_answer() {
        // The router multiplies; the model's last step is `m`'s last reply.
        async fn multiplied(m: &mut Script) {
            let (r, events) = go(m, "123456 乘以 654321 等于多少？", Options { route: true }).await;
            let a = r.expect("ends");
            assert!(a.content.contains("80779853376"), "{}", a.content);
            assert!(!text(&events).contains('{'), "{}", text(&events));
        }
        let mut m = script(&[
            r#"{"name": "calculator", "arguments": {"expression": "123456 * 654321"}}"#,
            "{\"name\": \"calculator\n",
        ]);
        multiplied(&mut m).await;
        assert_eq!(m.offered, [true, false]);
        // Cut by the token limit before it named anything: not the answer.
        let mut m = script(&["{\"na"]);
        m.last_finish = Finish::Length;
        multiplied(&mut m).await;
        // A JSON answer that names no tool stays the answer.
        let mut m = script(&[r#"{"name": "Alice", "age": 30}"#]);
        let (r, _) = go(&mut m, "A JSON person, please.", Options::default()).await;
        assert_eq!(r.expect("ends").content, r#"{"name": "Alice", "age": 30}"#);
    }

    #[tokio::test]
    async fn prose_streams_and_unknown_tools_are_errors_the_model_reads() {
        let mut m = script(&[
            "Let me look.\n{\"name\": \"weather\", \"arguments\": {}}",
            "I have no weather tool.",
        ]);
        let (r, events) = go(&mut m, "weather?", Options::default()).await;
        let a = r.expect("answer");
        assert!(!a.steps[0].ok && a.steps[0].content.contains("no tool named"));
        assert!(text(&events).starts_with("Let me look."));
        assert_eq!(a.content, "I have no weather tool.");
        // The consumer leaving stops the loop.
        let mut m = script(&["Hello there friend"]);
        let tools = Toolset::default();
        let cx = Context::new(chrono_tz::UTC, Limits::default());
        let r = run(&mut m, &tools, &cx, vec![], Options::default(), &mut |_| {
            false
        })
        .await;
        assert!(matches!(r, Err(AgentError::Cancelled)));
    }
}
