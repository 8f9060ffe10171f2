//! Chat and preference data (JSONL), rendered in ChatML the way the engine
//! renders a conversation (`<|im_start|>role\ncontent<|im_end|>\n`), with a
//! mask that is 1 on the tokens an assistant wrote (its text and the
//! `<|im_end|>` that ends it) and 0 elsewhere.
//!
//! Chat lines: `{"messages": [{"role": "user", "content": "…"}, …]}` or
//! `{"prompt": "…", "completion": "…"}`. Preference lines:
//! `{"prompt": "…" | [messages], "chosen": "…", "rejected": "…"}`.
//! A malformed line is reported with its file and line number; it is
//! skipped, or fatal when the caller asks for strictness.

use crate::tokenizer::Tok;
use crate::TrainError;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preference {
    pub prompt: Vec<Turn>,
    pub chosen: String,
    pub rejected: String,
}

/// The parsed lines of a file, and the ones that could not be used.
#[derive(Debug)]
pub struct Parsed<T> {
    pub items: Vec<T>,
    /// `file:line: reason`.
    pub rejected: Vec<String>,
}

fn jsonl_files(path: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let meta = std::fs::metadata(path).map_err(crate::io_err(path))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(crate::io_err(path))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(TrainError::Corpus(format!(
            "no .jsonl files under {}",
            path.display()
        )));
    }
    Ok(out)
}

fn parse_lines<T>(
    path: &Path,
    strict: bool,
    what: &str,
    parse: impl Fn(&Value) -> Result<T, String>,
) -> Result<Parsed<T>, TrainError> {
    let mut items = Vec::new();
    let mut rejected = Vec::new();
    for f in jsonl_files(path)? {
        let bytes = std::fs::read(&f).map_err(crate::io_err(&f))?;
        let text = String::from_utf8_lossy(&bytes);
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let r = serde_json::from_str::<Value>(line)
                .map_err(|e| format!("not JSON ({e})"))
                .and_then(|v| parse(&v));
            match r {
                Ok(t) => items.push(t),
                Err(e) => {
                    let msg = format!("{}:{}: {e}", f.display(), i + 1);
                    if strict {
                        return Err(TrainError::Corpus(msg));
                    }
                    rejected.push(msg);
                }
            }
        }
    }
    if items.is_empty() {
        return Err(TrainError::Corpus(format!(
            "no usable {what} in {}{}",
            path.display(),
            rejected
                .first()
                .map(|r| format!(" (first problem: {r})"))
                .unwrap_or_default()
        )));
    }
    Ok(Parsed { items, rejected })
}

fn text(v: &Value, field: &str) -> Result<String, String> {
    match v.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("\"{field}\" is empty")),
        Some(_) => Err(format!("\"{field}\" is not a string")),
        None => Err(format!("no \"{field}\"")),
    }
}

fn messages(v: &Value) -> Result<Vec<Turn>, String> {
    let arr = v.as_array().ok_or("\"messages\" is not a list")?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or(format!("message {i} has no role"))?;
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(format!("message {i} has role {role:?}"));
        }
        let content = m
            .get("content")
            .and_then(Value::as_str)
            .ok_or(format!("message {i} has no text content"))?;
        out.push(Turn {
            role: role.into(),
            content: content.into(),
        });
    }
    Ok(out)
}

/// One chat line.
pub fn parse_chat(v: &Value) -> Result<Vec<Turn>, String> {
    let turns = match v.get("messages") {
        Some(m) => messages(m)?,
        None => vec![
            Turn {
                role: "user".into(),
                content: text(v, "prompt")?,
            },
            Turn {
                role: "assistant".into(),
                content: text(v, "completion")?,
            },
        ],
    };
    if !turns
        .iter()
        .any(|t| t.role == "assistant" && !t.content.trim().is_empty())
    {
        return Err("no assistant message to learn from".into());
    }
    Ok(turns)
}

/// One preference line.
pub fn parse_preference(v: &Value) -> Result<Preference, String> {
    let prompt = match v.get("prompt") {
        Some(Value::String(s)) if !s.trim().is_empty() => vec![Turn {
            role: "user".into(),
            content: s.clone(),
        }],
        Some(m @ Value::Array(_)) => messages(m)?,
        Some(_) => return Err("\"prompt\" is neither text nor messages".into()),
        None => return Err("no \"prompt\"".into()),
    };
    let answer = |f: &str| -> Result<String, String> {
        match v.get(f) {
            Some(Value::Array(a)) => a
                .last()
                .and_then(|m| m.get("content"))
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or(format!("\"{f}\" has no assistant text")),
            _ => text(v, f),
        }
    };
    let (chosen, rejected) = (answer("chosen")?, answer("rejected")?);
    if chosen == rejected {
        return Err("\"chosen\" and \"rejected\" are the same".into());
    }
    Ok(Preference {
        prompt,
        chosen,
        rejected,
    })
}

pub fn read_chats(path: &Path, strict: bool) -> Result<Parsed<Vec<Turn>>, TrainError> {
    parse_lines(path, strict, "conversations", parse_chat)
}

pub fn read_preferences(path: &Path, strict: bool) -> Result<Parsed<Preference>, TrainError> {
    parse_lines(path, strict, "preference pairs", parse_preference)
}

/// Tokens and loss mask of a conversation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// `mask[i]` is 1 when `tokens[i]` is to be learnt.
    pub mask: Vec<u8>,
}

/// Render `turns` in ChatML; the assistant's tokens are learnt.
pub fn encode(tok: &Tok, turns: &[Turn]) -> Result<Example, TrainError> {
    let mut ex = Example::default();
    let mut push = |ids: Vec<u32>, m: u8| {
        ex.mask.extend(std::iter::repeat_n(m, ids.len()));
        ex.tokens.extend(ids);
    };
    for t in turns {
        let learn = u8::from(t.role == "assistant");
        push(tok.encode(&format!("<|im_start|>{}\n", t.role))?, 0);
        push(tok.encode(&t.content)?, learn);
        push(tok.encode("<|im_end|>")?, learn);
        push(tok.encode("\n")?, 0);
    }
    Ok(ex)
}

/// A prompt ready for the assistant's answer, and that answer.
pub fn encode_pair(tok: &Tok, prompt: &[Turn], answer: &str) -> Result<Example, TrainError> {
    let mut ex = encode(tok, prompt)?;
    ex.mask.iter_mut().for_each(|m| *m = 0);
    let head = tok.encode("<|im_start|>assistant\n")?;
    ex.mask.extend(std::iter::repeat_n(0, head.len()));
    ex.tokens.extend(head);
    let mut body = tok.encode(answer)?;
    body.extend(tok.encode("<|im_end|>")?);
    ex.mask.extend(std::iter::repeat_n(1, body.len()));
    ex.tokens.extend(body);
    Ok(ex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_are_checked() {
        assert!(parse_chat(&json!({"messages": [{"role": "user", "content": "hi"}]})).is_err());
        assert!(parse_chat(&json!({"messages": [{"role": "bot", "content": "hi"}]})).is_err());
        assert!(parse_chat(&json!({"messages": "hi"})).is_err());
        assert!(parse_chat(&json!({"prompt": "hi", "completion": 3})).is_err());
        let ok = parse_chat(&json!({"prompt": "你好", "completion": "你好！"})).unwrap();
        assert_eq!(ok[1].role, "assistant");
        assert!(parse_preference(&json!({"prompt": "q", "chosen": "a", "rejected": "a"})).is_err());
        assert!(parse_preference(&json!({"prompt": "q", "chosen": "a"})).is_err());
        let p = parse_preference(&json!({"prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"}))
        .unwrap();
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("good", "bad"));
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("chat.jsonl");
        std::fs::write(
            &f,
            "{\"prompt\":\"a\",\"completion\":\"b\"}\n{oops\n\n{\"messages\":[]}\n{\"prompt\":\"c\",\"completion\":\"d\"}\n",
        )
        .unwrap();
        let p = read_chats(&f, false).unwrap();
        assert_eq!(p.items.len(), 2);
        assert_eq!(p.rejected.len(), 2);
        assert!(
            p.rejected[0].contains("chat.jsonl:2: not JSON"),
            "{:?}",
            p.rejected
        );
        assert!(
            p.rejected[1].contains("chat.jsonl:4: no assistant"),
            "{:?}",
            p.rejected
        );
        let e = read_chats(&f, true).unwrap_err().to_string();
        assert!(e.contains("chat.jsonl:2"), "{e}");
        std::fs::write(&f, "garbage\n").unwrap();
        let e = read_chats(&f, false).unwrap_err().to_string();
        assert!(
            e.contains("no usable conversations") && e.contains(":1:"),
            "{e}"
        );
    }
}
