//! `hanlin chat` (the interactive REPL) and `hanlin run` (one prompt).

use super::*;
use hanlin_engine::speculative::{DraftModel, PromptLookup, Proposer};

/// The proposer `--draft` / `--lookup` ask for (speculative decoding).
fn proposer(
    store: &Store,
    target: &LoadedModel,
    target_name: &str,
    threads: usize,
    gen: &GenArgs,
) -> Result<Option<Box<dyn Proposer>>> {
    if gen.lookup {
        return Ok(Some(Box::new(PromptLookup::default())));
    }
    let Some(name) = &gen.draft else {
        return Ok(None);
    };
    let draft = load(store, name, threads)?;
    Ok(Some(Box::new(DraftModel::new(
        &draft,
        name,
        target,
        target_name,
        gen.ctx,
    )?)))
}

pub(crate) fn chat(store: &Store, model: &str, threads: usize, gen: &GenArgs) -> Result<()> {
    let m = load(store, model, threads)?;
    let mut proposer = proposer(store, &m, model, threads, gen)?;
    let mut session = m.new_session(gen.ctx);
    let mut history: Vec<Message> = gen
        .system
        .iter()
        .map(|s| Message::new("system", s.as_str()))
        .collect();
    let params = gen.params();
    eprintln!(
        "Hanlin chat with {model}. Type a message; /clear starts over, /exit (or Ctrl-D) quits."
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
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
        let prompt = m.chat_prompt(&history)?;
        let g = match session.generate_with(&prompt, &params, proposer.as_deref_mut(), |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
            true
        }) {
            Ok(g) => g,
            Err(e) => {
                history.pop();
                eprintln!("\nerror: {e}");
                continue;
            }
        };
        println!();
        if g.finish == FinishReason::ContextFull {
            eprintln!("(the context is full; /clear to start a new conversation)");
        }
        if gen.verbose {
            stats(&g);
        }
        history.push(Message::new("assistant", g.text));
    }
    Ok(())
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
        let mut msgs: Vec<Message> = gen
            .system
            .iter()
            .map(|s| Message::new("system", s.as_str()))
            .collect();
        msgs.push(Message::new("user", text));
        m.chat_prompt(&msgs)?
    };
    let mut proposer = proposer(store, &m, model, threads, gen)?;
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
