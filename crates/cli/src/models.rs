//! `hanlin list` and `hanlin show`: what the model store holds.

use super::*;

pub(crate) fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{bytes} B")
    }
}

pub(crate) fn list(store: &Store) -> Result<()> {
    let pulled = store.list()?;
    println!("{:<24} {:>10}  {:<16} SOURCE", "NAME", "SIZE", "SHA256");
    for m in &pulled {
        println!(
            "{:<24} {:>10}  {:<16} {}",
            m.name,
            human(m.size),
            &m.sha256[..12.min(m.sha256.len())],
            m.source
        );
    }
    if pulled.is_empty() {
        println!("(no models pulled yet)");
    }
    println!("\navailable to pull:");
    for e in catalog() {
        let mark = if pulled.iter().any(|m| m.name == e.name) {
            "*"
        } else {
            " "
        };
        let default = if e.name == DEFAULT_MODEL {
            " [default]"
        } else {
            ""
        };
        println!(" {mark} {:<22} {}{default}", e.name, e.description);
    }
    Ok(())
}

pub(crate) fn show(store: &Store, model: &str) -> Result<()> {
    let path = resolve(store, model)?;
    let f = hanlin_formats::GgufFile::open(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    let h = &f.header;
    println!("file         {}", path.display());
    println!(
        "format       GGUF v{}, {} tensors, {}",
        h.version,
        h.tensors.len(),
        human(f.bytes().len() as u64)
    );
    match hanlin_arch::ModelConfig::from_gguf(h) {
        Ok(c) => {
            let params: u64 = h.tensors.iter().map(|t| t.n_elements()).sum();
            println!(
                "architecture {} ({:.0}M parameters)",
                c.arch.name(),
                params as f64 / 1e6
            );
            println!(
                "shape        {} layers, d_model {}, heads {}/{} (kv), head_dim {}, ffn {}, vocab {}",
                c.n_layer, c.d_model, c.n_head, c.n_head_kv, c.head_dim, c.d_ff, c.vocab_size
            );
            println!(
                "context      {} tokens, rope base {}",
                c.context_length, c.rope_base
            );
            if let Some(m) = c.moe {
                println!(
                    "experts      {} ({} per token, ffn {})",
                    m.n_expert, m.n_expert_used, m.d_ff_expert
                );
            }
        }
        Err(e) => println!("architecture unsupported: {e}"),
    }
    let mut types: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in &h.tensors {
        let e = types.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.size as u64;
    }
    let q: Vec<String> = types
        .iter()
        .map(|(k, (n, b))| format!("{k}×{n} ({})", human(*b)))
        .collect();
    println!("tensors      {}", q.join(", "));
    println!(
        "tokenizer    {} (pre {}), {} tokens",
        h.get_str("tokenizer.ggml.model").unwrap_or("?"),
        h.get_str("tokenizer.ggml.pre").unwrap_or("-"),
        h.get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len())
            .unwrap_or(0)
    );
    for k in ["general.name", "general.license", "general.size_label"] {
        if let Some(v) = h.get(k) {
            println!("{:<12} {}", k.trim_start_matches("general."), v.summary());
        }
    }
    if let Some(t) = h.get_str("tokenizer.chat_template") {
        let first: String = t.lines().take(3).collect::<Vec<_>>().join(" ⏎ ");
        println!(
            "template     {} chars: {}…",
            t.len(),
            first.chars().take(100).collect::<String>()
        );
    }
    Ok(())
}
