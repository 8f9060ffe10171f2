//! `hanlin chat` (the interactive REPL) and `hanlin run` (one prompt).

use super::*;
use hanlin_engine::speculative::{DraftModel, LookupThenDraft, PromptLookup, Proposer};

/// The proposer `--draft` / `--lookup` ask for (speculative decoding).
fn proposer(
    store: &Store,
    target: &LoadedModel,
    target_name: &str,
    gen: &GenArgs,
) -> Result<Option<Box<dyn Proposer>>> {
    let Some(name) = &gen.draft else {
        return Ok(gen
            .lookup
            .then(|| Box::new(PromptLookup::default()) as Box<dyn Proposer>));
    };
    let path = resolve(store, name)?;
    let draft = LoadedModel::load_draft(&path, target.pool.clone())
        .with_context(|| format!("loading {name}"))?;
    let draft = DraftModel::new(&draft, name, target, target_name, gen.ctx)?;
    Ok(Some(if gen.lookup {
        Box::new(LookupThenDraft {
            lookup: PromptLookup::default(),
            draft,
        })
    } else {
        Box::new(draft)
    }))
}

pub(crate) fn chat(store: &Store, model: &str, threads: usize, gen: &GenArgs) -> Result<()> {
    let m = load(store, model, threads)?;
    let mut proposer = proposer(store, &m, model, gen)?;
    let mut session = m.new_session(gen.ctx);
    let mut history = system(gen);
    let params = gen.params();
    eprintln!(
        "Hanlin chat with {model}. Type a message; /clear starts over, /exit (or Ctrl-D) quits."
    );
    let mut out = std::io::stdout();
    repl(&mut history, |history| {
        let prompt = match m.chat_prompt(history) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return None;
            }
        };
        let g = match session.generate_with(&prompt, &params, proposer.as_deref_mut(), |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
            true
        }) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("\nerror: {e}");
                return None;
            }
        };
        println!();
        if g.finish == FinishReason::ContextFull {
            eprintln!("(the context is full; /clear to start a new conversation)");
        }
        if gen.verbose {
            stats(&g);
        }
        Some(g.text)
    })
}

/// The conversation's start: the `--system` prompt, if any.
fn system(gen: &GenArgs) -> Vec<Message> {
    gen.system
        .iter()
        .map(|s| Message::new("system", s.as_str()))
        .collect()
}

/// The REPL both chats share: a line at a time until `/exit` or end of
/// input; `/clear` keeps only the system prompt; any other line is a user
/// message, answered by `turn` (which prints the answer and returns its
/// text, or `None` after an error, when the message is taken back).
fn repl(
    history: &mut Vec<Message>,
    mut turn: impl FnMut(&[Message]) -> Option<String>,
) -> Result<()> {
    let stdin = std::io::stdin();
    loop {
        eprint!(">>> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" | "/bye" => break,
            "/clear" => {
                history.retain(|m| m.role == "system");
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        match turn(history) {
            Some(answer) => history.push(Message::new("assistant", answer)),
            None => {
                history.pop();
            }
        }
    }
    Ok(())
}

/// Model steps for the agent loop on this process's session.
struct Local<'a> {
    m: &'a LoadedModel,
    session: &'a mut hanlin_engine::Session,
    params: GenerateParams,
}

impl hanlin_tools::agent::Model for Local<'_> {
    type Error = hanlin_engine::EngineError;

    async fn step(
        &mut self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<hanlin_tools::agent::StepEnd, Self::Error> {
        let prompt = self.m.chat_prompt_with(messages, tools)?;
        let g = self
            .session
            .generate_with(&prompt, &self.params, None, |t| on_text(t))?;
        Ok(hanlin_tools::agent::StepEnd {
            text: g.text,
            finish: match g.finish {
                FinishReason::Stop => hanlin_tools::agent::Finish::Stop,
                _ => hanlin_tools::agent::Finish::Length,
            },
        })
    }
}

/// `hanlin chat --tools calculator,datetime`: the server's agent loop,
/// run here; each call and its result on stderr, the answer on stdout.
pub(crate) fn chat_with_tools(
    store: &Store,
    model: &str,
    threads: usize,
    gen: &GenArgs,
    names: &[String],
) -> Result<()> {
    use hanlin_tools::agent::{self, Event};
    let toolbox = hanlin_tools::Toolbox::builtin();
    let tools = toolbox.select(names).map_err(|e| {
        anyhow::anyhow!(
            "{e}; the tools here are: {}",
            toolbox
                .names()
                .filter(|n| *n != "search_knowledge")
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    if tools.has("search_knowledge") {
        bail!("search_knowledge needs the server's knowledge bases: use `hanlin ask --kb NAME` or the web app");
    }
    let m = load(store, model, threads)?;
    let mut session = m.new_session(gen.ctx);
    let mut history = system(gen);
    let rt = runtime()?;
    eprintln!(
        "Hanlin chat with {model}, tools: {}. Type a message; /clear starts over, /exit (or Ctrl-D) quits.",
        tools.names().join(", ")
    );
    repl(&mut history, |history| {
        let cx = hanlin_tools::Context::new(
            hanlin_tools::Context::local_timezone(),
            hanlin_tools::Limits::default(),
        );
        let mut local = Local {
            m: &m,
            session: &mut session,
            params: gen.params(),
        };
        let mut out = std::io::stdout();
        let r = rt.block_on(agent::run(
            &mut local,
            &tools,
            &cx,
            history.to_vec(),
            agent::Options { route: true },
            &mut |e| {
                match e {
                    Event::Text(t) => {
                        let _ = out.write_all(t.as_bytes());
                        let _ = out.flush();
                    }
                    Event::Call { call, .. } => {
                        eprintln!("  [{}] {}", call.name, call.arguments)
                    }
                    Event::Result(o) => eprintln!("  [{}] → {}", o.name, o.content),
                }
                true
            },
        ));
        println!();
        match r {
            Ok(a) => Some(a.content),
            Err(e) => {
                eprintln!("error: {e}");
                None
            }
        }
    })
}

/// How `hanlin run` turns its text into a prompt.
#[derive(Clone, Copy)]
pub(crate) enum Prompt {
    /// A user message in the model's chat template.
    Chat,
    /// As it is, special-token spellings as plain text.
    Raw,
    /// As it is, special-token spellings as control tokens.
    RawSpecial,
}

pub(crate) fn one_shot(
    store: &Store,
    model: &str,
    threads: usize,
    text: &str,
    mode: Prompt,
    gen: &GenArgs,
) -> Result<()> {
    let m = load(store, model, threads)?;
    let prompt = if let Prompt::RawSpecial = mode {
        m.tokenizer.encode(text, true)?
    } else if let Prompt::Raw = mode {
        m.tokenizer.encode_plain(text, true)?
    } else {
        let mut msgs = system(gen);
        msgs.push(Message::new("user", text));
        m.chat_prompt(&msgs)?
    };
    let mut proposer = proposer(store, &m, model, gen)?;
    let mut session = m.new_session(gen.ctx);
    let mut out = std::io::stdout();
    let g = session.generate_with(&prompt, &gen.params(), proposer.as_deref_mut(), |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
        true
    })?;
    println!();
    if gen.verbose {
        stats(&g);
    }
    Ok(())
}

pub(crate) fn stats(g: &hanlin_engine::Generation) {
    let pf = g.prompt_tokens - g.cached_tokens;
    eprintln!(
        "[prompt {} tokens ({} cached) in {:.2}s = {:.1} tok/s; {} tokens in {:.2}s = {:.1} tok/s; finish {:?}]",
        g.prompt_tokens,
        g.cached_tokens,
        g.prefill_time.as_secs_f64(),
        pf as f64 / g.prefill_time.as_secs_f64().max(1e-9),
        g.tokens.len(),
        g.decode_time.as_secs_f64(),
        g.tokens.len() as f64 / g.decode_time.as_secs_f64().max(1e-9),
        g.finish
    );
    if g.proposed > 0 {
        eprintln!(
            "[speculative: {} of {} proposed tokens accepted ({:.0}%)]",
            g.accepted,
            g.proposed,
            100.0 * g.accepted as f64 / g.proposed as f64
        );
    }
}
