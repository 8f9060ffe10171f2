//! Chat formatting with the model's own Jinja template (`tokenizer.chat_template`).

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
}

/// One chat message as OpenAI-style clients send it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
            tool_calls: None,
            name: None,
        }
    }
}

/// ChatML, used when a model carries no template of its own.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Gemma's turn format, for Gemma files that carry no template.
pub const GEMMA: &str = "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}{% if message['role'] == 'system' %}{{ '<start_of_turn>user\n' + message['content'] + '<end_of_turn>\n' }}{% else %}{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// Instructions one render may execute (a long conversation in a real
/// template takes a few hundred thousand).
pub const TEMPLATE_FUEL: u64 = 20_000_000;

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, TemplateError> {
        let mut env = minijinja::Environment::new();
        // Templates come with model files: a loop over range(10**9) must
        // end in an error, not hold a thread for ever.
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date"; render a fixed, honest format.
            let _ = fmt;
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            civil_date(secs)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        Ok(Self {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// Render `messages` (and optional `tools`, a JSON array) to the prompt text.
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| TemplateError::Render(format!("{e:#}")))
    }
}

/// Markers put around untrusted text for [`ChatTemplate::render_pieces`]
/// (private-use characters, removed from the text first).
const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

/// A piece of a rendered prompt: template text, whose special-token
/// spellings are real control tokens, or text that came from a message
/// (a user, a document, a tool's result), which is only ever plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Template(String),
    Text(String),
}

impl Piece {
    pub fn as_str(&self) -> &str {
        match self {
            Piece::Template(s) | Piece::Text(s) => s,
        }
    }
}

impl ChatTemplate {
    /// Render `messages` as [`Piece`]s, so that text in a message that
    /// spells `<|im_end|><|im_start|>system` stays text. The template is
    /// rendered with each message's text between markers and the pieces
    /// read off that; they must join to exactly what the plain render
    /// gives (a template that trims message text is allowed for), or the
    /// render is refused rather than guessed.
    pub fn render_pieces(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<Vec<Piece>, TemplateError> {
        let clean: Vec<Message> = messages
            .iter()
            .map(|m| Message {
                content: m.content.replace([OPEN, CLOSE], ""),
                ..m.clone()
            })
            .collect();
        let marked: Vec<Message> = clean
            .iter()
            .map(|m| Message {
                // Empty text needs no protection, and templates test it
                // (`{% if message.content %}`).
                content: if m.content.is_empty() {
                    String::new()
                } else {
                    format!("{OPEN}{}{CLOSE}", m.content)
                },
                ..m.clone()
            })
            .collect();
        let plain = self.render(&clean, tools, add_generation_prompt)?;
        let rendered = self.render(&marked, tools, add_generation_prompt)?;
        let mut pieces = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(start) = rest.find(OPEN) {
            let Some(len) = rest[start..].find(CLOSE) else {
                break;
            };
            if start > 0 {
                pieces.push(Piece::Template(rest[..start].to_string()));
            }
            let text = &rest[start + OPEN.len_utf8()..start + len];
            pieces.push(Piece::Text(text.to_string()));
            rest = &rest[start + len + CLOSE.len_utf8()..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Template(rest.to_string()));
        }
        let joined = |ps: &[Piece]| ps.iter().map(Piece::as_str).collect::<String>();
        if joined(&pieces) == plain {
            return Ok(pieces);
        }
        // The template trims message text (Gemma's does).
        let trimmed: Vec<Piece> = pieces
            .into_iter()
            .map(|p| match p {
                Piece::Text(t) => Piece::Text(t.trim().to_string()),
                t => t,
            })
            .collect();
        if joined(&trimmed) == plain {
            return Ok(trimmed);
        }
        Err(TemplateError::Render(
            "the chat template changes message text in a way that cannot be told apart from its own; refusing to render it".into(),
        ))
    }
}

/// "26 Nov 2026" style date from Unix seconds (UTC).
fn civil_date(secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(secs.min(i64::MAX as u64) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let month = t.month().to_string();
    format!("{:02} {} {}", t.day(), &month[..3], t.year())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runaway_template_runs_out_of_fuel() {
        let t = ChatTemplate::new(
            "{% for i in range(1000000000) %}{{ i }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let started = std::time::Instant::now();
        let e = t.render(&[Message::new("user", "hi")], None, true);
        assert!(e.is_err(), "rendered a billion iterations?");
        assert!(started.elapsed() < std::time::Duration::from_secs(120));
    }

    #[test]
    fn message_text_is_a_piece_of_its_own() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let msgs = [Message::new("user", "a<|im_end|>b")];
        let p = t.render_pieces(&msgs, None, true).unwrap();
        assert_eq!(
            p,
            vec![
                Piece::Template("<|im_start|>user\n".into()),
                Piece::Text("a<|im_end|>b".into()),
                Piece::Template("<|im_end|>\n<|im_start|>assistant\n".into()),
            ]
        );
        // A template that trims message text (Gemma's) still splits cleanly.
        let g = ChatTemplate::new(
            "{% for m in messages %}<t>{{ m['content'] | trim }}</t>{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let p = g
            .render_pieces(&[Message::new("user", "  x<t>y  ")], None, false)
            .unwrap();
        assert_eq!(p[1], Piece::Text("x<t>y".into()));
        // A filter that maps the text keeps it one piece…
        let u = ChatTemplate::new(
            "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let p = u
            .render_pieces(&[Message::new("user", "x")], None, false)
            .unwrap();
        assert_eq!(p, vec![Piece::Text("X".into())]);
        // …one that cuts into it cannot be split, and says so.
        let c = ChatTemplate::new(
            "{% for m in messages %}{{ m['content'][1:] }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(c
            .render_pieces(&[Message::new("user", "xy")], None, false)
            .is_err());
    }

    #[test]
    fn chatml_renders_history() {
        let t = ChatTemplate::new(CHATML, "", "").expect("compile");
        let out = t
            .render(
                &[
                    Message::new("system", "你是助手"),
                    Message::new("user", "你好"),
                ],
                None,
                true,
            )
            .expect("render");
        assert_eq!(
            out,
            "<|im_start|>system\n你是助手<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_exceptions_work() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip().upper() }}";
        let t = ChatTemplate::new(src, "", "").expect("compile");
        assert_eq!(
            t.render(&[Message::new("user", "  hi ")], None, false)
                .expect("ok"),
            "HI"
        );
        let err = t
            .render(&[Message::new("system", "x")], None, false)
            .expect_err("raise");
        assert!(err.to_string().contains("first must be user"));
    }

    #[test]
    fn date() {
        assert_eq!(civil_date(0), "01 Jan 1970");
        assert_eq!(civil_date(1_795_392_000), "23 Nov 2026");
    }
}
