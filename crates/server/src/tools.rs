//! Tool calls in model output. Qwen2.5 / Hermes-style templates ask the model
//! to answer with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//! blocks; they become OpenAI `tool_calls`.

use crate::openai::response::ToolCall;
use serde_json::Value;

fn call_json(index: usize, v: &Value) -> Option<ToolCall> {
    let name = v.get("name").and_then(Value::as_str)?;
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
        None => "{}".to_string(),
    };
    Some(ToolCall::function(index + 1, name, args))
}

/// Split generated text into the plain content and the parsed tool calls.
/// Blocks that are not valid JSON with a `name` stay in the content. The
/// tags are special tokens in Qwen's vocabulary, which the detokenizer does
/// not print: an answer that is nothing but call objects (one per line) is
/// read as calls too.
pub fn split_tool_calls(text: &str) -> (String, Vec<ToolCall>) {
    if !text.contains("<tool_call>") {
        let bare: Option<Vec<ToolCall>> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                let v: Value = serde_json::from_str(l.trim()).ok()?;
                v.get("arguments").or_else(|| v.get("parameters"))?;
                call_json(i, &v)
            })
            .collect();
        if let Some(calls) = bare.filter(|c| !c.is_empty()) {
            return (String::new(), calls);
        }
    }
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
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
            .and_then(|v| call_json(calls.len(), &v))
        {
            Some(call) => calls.push(call),
            None => content.push_str(&rest[start..start + OPEN.len() + body.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    (content.trim().to_string(), calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qwen_tool_calls_and_keeps_plain_text() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>";
        let (content, calls) = split_tool_calls(text);
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].function.arguments).expect("json");
        assert_eq!(args["city"], "北京");
        let (content, calls) = split_tool_calls("no tools <tool_call>not json</tool_call>");
        assert!(calls.is_empty());
        assert!(content.contains("not json"));
        // Tags decoded away (special tokens): bare call objects, one per line.
        let (content, calls) = split_tool_calls(
            "{\"name\": \"a\", \"arguments\": {}}\n{\"name\": \"b\", \"arguments\": {\"x\": 1}}",
        );
        assert_eq!((content.as_str(), calls.len()), ("", 2));
        assert_eq!(calls[1].function.arguments, "{\"x\":1}");
        // A JSON answer that is not a call stays content.
        let (content, calls) = split_tool_calls("{\"name\": \"Ann\", \"age\": 3}");
        assert!(calls.is_empty() && content.contains("Ann"));
    }
}
