//! Tool calls in model output. Qwen2.5 / Hermes-style templates ask the
//! model to answer with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//! blocks. The tags are special tokens in Qwen's vocabulary, which the
//! detokenizer does not print, so call objects standing alone on their
//! lines are read as calls too.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One call the model asked for; `arguments` is JSON text as OpenAI
/// carries it. Ids are `call_{n}`, `n` from 1 in the text's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl Call {
    /// The assistant message's `tool_calls` entry (OpenAI's shape, which
    /// chat templates render back).
    pub fn openai(&self) -> Value {
        serde_json::json!({"id": self.id, "type": "function",
            "function": {"name": self.name, "arguments": self.arguments}})
    }

    /// The name and the arguments' canonical JSON: two calls with the same
    /// key ask the same thing.
    pub fn key(&self) -> (String, String) {
        let args = serde_json::from_str::<Value>(&self.arguments)
            .map(|v| canonical(&v))
            .unwrap_or_else(|_| self.arguments.trim().to_string());
        (self.name.clone(), args)
    }
}

/// JSON text with every object's keys sorted.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        v => v.to_string(),
    }
}

fn call_json(n: usize, v: &Value) -> Option<Call> {
    let name = v.get("name").and_then(Value::as_str)?;
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
        None => "{}".to_string(),
    };
    Some(Call {
        id: format!("call_{n}"),
        name: name.to_string(),
        arguments,
    })
}

/// The call objects in `text` (anywhere: on their own lines, inside a
/// JSON code fence, several in a row): their byte spans and calls.
fn bare_calls(text: &str, first: usize) -> Vec<(usize, usize, Call)> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = text[i..].find('{') {
        let start = i + off;
        let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => {
                let end = start + stream.byte_offset();
                let is_call = v.get("arguments").or_else(|| v.get("parameters")).is_some();
                if let Some(c) = is_call.then(|| call_json(first + out.len(), &v)).flatten() {
                    out.push((start, end, c));
                }
                i = end;
            }
            // The text ends inside an object: small models stop a call
            // one or two braces short. Closed, it may be a call.
            Some(Err(e)) if e.is_eof() => {
                let tail = text[start..].trim_end();
                let closed = ["}", "}}"].iter().find_map(|close| {
                    serde_json::from_str::<Value>(&format!("{tail}{close}")).ok()
                });
                let call = closed
                    .filter(|v| v.get("arguments").or_else(|| v.get("parameters")).is_some())
                    .and_then(|v| call_json(first + out.len(), &v));
                match call {
                    Some(c) => {
                        out.push((start, text.len(), c));
                        break;
                    }
                    None => i = start + 1,
                }
            }
            _ => i = start + 1,
        }
    }
    out
}

/// `text` without the spans, and without the code fences they leave empty.
fn without(text: &str, spans: &[(usize, usize, Call)]) -> String {
    let mut rest = String::new();
    let mut at = 0;
    for (s, e, _) in spans {
        rest.push_str(&text[at..*s]);
        at = *e;
    }
    rest.push_str(&text[at..]);
    drop_empty_fences(&rest).trim().to_string()
}

/// Drop code fences with nothing but whitespace inside.
fn drop_empty_fences(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let lang_end = after.find('\n').unwrap_or(after.len());
        let body = &after[lang_end..];
        match body.find("```") {
            Some(close) if body[..close].trim().is_empty() => {
                out.push_str(&rest[..open]);
                rest = &body[close + 3..];
            }
            Some(close) => {
                let end = open + 3 + lang_end + close + 3;
                out.push_str(&rest[..end]);
                rest = &rest[end..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// Split generated text into the plain content and the parsed tool calls.
/// Tagged blocks that are not valid JSON with a `name` stay in the
/// content; without tags, the lines that are call objects are calls and
/// the other lines content.
pub fn split_calls(text: &str) -> (String, Vec<Call>) {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    if !text.contains(OPEN) {
        let spans = bare_calls(text, 1);
        if spans.is_empty() {
            return (text.trim().to_string(), Vec::new());
        }
        let content = without(text, &spans);
        return (content, spans.into_iter().map(|(_, _, c)| c).collect());
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        match serde_json::from_str::<Value>(body.trim())
            .ok()
            .and_then(|v| call_json(calls.len() + 1, &v))
        {
            Some(call) => calls.push(call),
            None => content.push_str(&rest[start..start + OPEN.len() + body.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    (content.trim().to_string(), calls)
}

/// Whether text that begins like `start` may still turn out to be a call
/// (so a stream holds it back until the step ends).
pub fn may_be_call(start: &str) -> bool {
    let t = start.trim_start();
    if let Some(fenced) = t.strip_prefix("```") {
        // A fence: held while it may hold a JSON call object.
        return match fenced.split_once('\n') {
            None => "json".starts_with(fenced.trim()) || fenced.trim().is_empty(),
            Some((lang, body)) => {
                matches!(lang.trim(), "" | "json") && {
                    let b = body.trim_start();
                    b.is_empty() || b.starts_with('{')
                }
            }
        };
    }
    t.is_empty()
        || t.starts_with('{')
        || "<tool_call>".starts_with(t)
        || t.starts_with("<tool_call>")
        || "```".starts_with(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qwen_tool_calls_and_keeps_plain_text() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>";
        let (content, calls) = split_calls(text);
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str()),
            ("call_1", "get_weather")
        );
        let args: Value = serde_json::from_str(&calls[0].arguments).expect("json");
        assert_eq!(args["city"], "北京");
        let (content, calls) = split_calls("no tools <tool_call>not json</tool_call>");
        assert!(calls.is_empty());
        assert!(content.contains("not json"));
        // Tags decoded away (special tokens): bare call objects, one per line.
        let (content, calls) = split_calls(
            "{\"name\": \"a\", \"arguments\": {}}\n{\"name\": \"b\", \"arguments\": {\"x\": 1}}",
        );
        assert_eq!((content.as_str(), calls.len()), ("", 2));
        assert_eq!(calls[1].arguments, "{\"x\":1}");
        assert_eq!(calls[1].id, "call_2");
        // Prose before a bare call.
        let (content, calls) =
            split_calls("I will compute it.\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2*3\"}}");
        assert_eq!((content.as_str(), calls.len()), ("I will compute it.", 1));
        // A fenced, pretty-printed call (what Qwen2.5-Coder-0.5B writes).
        let (content, calls) = split_calls(
            "```json\n{\n  \"name\": \"calculator\",\n  \"arguments\": {\n    \"expression\": \"1 + 2\"\n  }\n}\n```",
        );
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0].arguments, "{\"expression\":\"1 + 2\"}");
        // Code that is not a call keeps its fence.
        let (content, calls) = split_calls("```python\nprint({'a': 1})\n```");
        assert!(calls.is_empty() && content.starts_with("```python"));
        // A call one brace short, at the end of the text (Qwen2.5-Coder-0.5B).
        let (content, calls) = split_calls(
            "{\"name\": \"calculator\", \"arguments\": {\"expression\": \"0.12 * 45000\"}",
        );
        assert_eq!((content.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0].arguments, "{\"expression\":\"0.12 * 45000\"}");
        let (_, calls) =
            split_calls("{\"name\": \"calculator\", \"arguments\": {\"expression\": \"1 +");
        assert!(calls.is_empty());
        // A JSON answer that is not a call stays content.
        let (content, calls) = split_calls("{\"name\": \"Ann\", \"age\": 3}");
        assert!(calls.is_empty() && content.contains("Ann"));
    }

    #[test]
    fn the_same_call_has_the_same_key_however_it_is_spaced() {
        let a = Call {
            id: "call_1".into(),
            name: "c".into(),
            arguments: "{\"a\": 1, \"b\": 2}".into(),
        };
        let b = Call {
            id: "call_2".into(),
            name: "c".into(),
            arguments: "{\"b\":2,\"a\":1}".into(),
        };
        assert_eq!(a.key(), b.key());
        assert!(may_be_call("  {\"na") && may_be_call("<tool") && may_be_call(""));
        assert!(!may_be_call("The answer") && !may_be_call("答案"));
        assert!(may_be_call("```") && may_be_call("```js") && may_be_call("```json\n  {"));
        assert!(!may_be_call("```python\n") && !may_be_call("```json\n[1]"));
    }
}
