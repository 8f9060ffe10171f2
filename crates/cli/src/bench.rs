//! `hanlin bench`: prefill and decode speed, batched decode, memory bandwidth.

use super::*;

/// Multi-threaded read bandwidth over a 1 GiB buffer (median of 5 passes).
pub(crate) fn read_bandwidth(threads: usize, json: bool) -> Result<()> {
    let pool = hanlin_kernels::ThreadPool::new(threads);
    let n = (1usize << 30) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let chunk = 1 << 16;
    let mut rates = Vec::new();
    for _ in 0..5 {
        let total = std::sync::Mutex::new(0f32);
        let t = Instant::now();
        pool.for_chunks(n / chunk, 4, &|r| {
            let mut acc = [0f32; 16];
            for c in r {
                for b in buf[c * chunk..(c + 1) * chunk].chunks_exact(16) {
                    for (a, v) in acc.iter_mut().zip(b) {
                        *a += v;
                    }
                }
            }
            if let Ok(mut t) = total.lock() {
                *t += acc.iter().sum::<f32>();
            }
        });
        rates.push((n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
        std::hint::black_box(total);
    }
    let bw = median(rates);
    if json {
        println!(
            "{}",
            serde_json::json!({"read_gb_s": bw, "threads": threads})
        );
    } else {
        println!("read bandwidth {bw:.1} GB/s ({threads} threads)");
    }
    Ok(())
}

pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) struct BenchSizes {
    pub(crate) n_prompt: usize,
    /// A second, longer prompt prefilled right after `n_prompt` (0: none).
    pub(crate) n_long: usize,
    pub(crate) n_gen: usize,
    pub(crate) batch: usize,
    /// Row counts whose forward pass is timed against one row's (`--rows`).
    pub(crate) rows: Vec<usize>,
}

/// `n` fixed, ordinary token ids (like llama-bench, content does not
/// matter for speed); `seed` makes another such sequence.
fn ordinary_tokens(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7919 + seed * 104_729 + 13) % vocab.min(30000))
        .collect()
}

/// The most rows `--rows` times in one pass.
const MAX_PASS_ROWS: usize = 64;
/// One-row and `n`-row passes timed per row count and repetition.
const PASS_PAIRS: usize = 5;

/// What a forward pass over each of `rows` rows (every row's logits, as a
/// speculative round's verify pass wants them) costs in one-row passes:
/// after a 64-token prompt, a one-row pass and an `n`-row pass, each cut
/// back off the cache, [`PASS_PAIRS`] times; the median of the pairs'
/// ratios, so that a machine whose speed drifts still gives a steady one.
pub(crate) fn pass_costs(m: &LoadedModel, rows: &[usize], vocab: u32) -> Result<Vec<f64>> {
    use hanlin_engine::{KvCache, KvShape, Logits};
    let most = rows.iter().copied().max().unwrap_or(1);
    let tokens = ordinary_tokens(64 + most, 0, vocab);
    let (prompt, fed) = tokens.split_at(64);
    let mut cache = KvCache::new(KvShape::of(&m.model.cfg), 64 + most);
    m.model.forward(&m.pool, prompt, &mut cache, Logits::Last)?;
    let mut pass = |n: usize| -> Result<f64> {
        let t = Instant::now();
        m.model
            .forward(&m.pool, &fed[..n], &mut cache, Logits::All)?;
        let secs = t.elapsed().as_secs_f64();
        cache.truncate(prompt.len());
        Ok(secs)
    };
    rows.iter()
        .map(|&n| {
            let ratios = (0..PASS_PAIRS)
                .map(|_| Ok(pass(1)?.recip() * pass(n)?))
                .collect::<Result<Vec<f64>>>()?;
            Ok(median(ratios))
        })
        .collect()
}

/// Aggregate decode rate of `batch` sequences stepped together: each gets a
/// different 64-token prompt, then `n_gen` steps feed every sequence one
/// token through one `forward_batch`.
pub(crate) fn batched_decode(
    m: &LoadedModel,
    batch: usize,
    n_gen: usize,
    vocab: u32,
) -> Result<f64> {
    use hanlin_engine::{BatchSeq, KvCache, KvShape, Logits};
    let cfg = &m.model.cfg;
    let mut caches: Vec<KvCache> = (0..batch)
        .map(|_| KvCache::new(KvShape::of(cfg), 64 + n_gen + 1))
        .collect();
    // Step 0 feeds each sequence a different prompt (not timed); each later
    // step one token each.
    let mut inputs: Vec<Vec<u32>> = (0..batch as u32)
        .map(|b| ordinary_tokens(64, b, vocab))
        .collect();
    let mut logits = hanlin_engine::BatchLogits::default();
    let mut t = Instant::now();
    for step in 0..=n_gen {
        if step == 1 {
            t = Instant::now();
        }
        let mut batch_seqs: Vec<BatchSeq> = caches
            .iter_mut()
            .zip(&inputs)
            .map(|(cache, tokens)| BatchSeq {
                tokens,
                cache,
                want: Logits::Last,
            })
            .collect();
        m.model
            .forward_batch_into(&m.pool, &mut batch_seqs, &mut logits)?;
        inputs = logits
            .iter()
            .map(|l| vec![hanlin_engine::sampler::argmax(l)])
            .collect();
    }
    Ok((batch * n_gen) as f64 / t.elapsed().as_secs_f64())
}

pub(crate) fn bench(
    store: &Store,
    model: &str,
    threads: usize,
    sizes: BenchSizes,
    reps: usize,
    json: bool,
) -> Result<()> {
    let BenchSizes {
        n_prompt,
        n_long,
        n_gen,
        batch,
        rows,
    } = sizes;
    if let Some(&n) = rows.iter().find(|&&n| n == 0 || n > MAX_PASS_ROWS) {
        bail!("--rows {n}: each number of rows must be 1 to {MAX_PASS_ROWS}");
    }
    let m = load(store, model, threads)?;
    let vocab = m.model.cfg.vocab_size as u32;
    let prompt = ordinary_tokens(n_prompt, 0, vocab);
    let long = ordinary_tokens(n_long, 0, vocab);
    let reps = reps.max(1);
    let mut pp = Vec::new();
    let mut lp = Vec::new();
    let mut ratios = Vec::new();
    let mut tg = Vec::new();
    let mut bg = Vec::new();
    // Per row count, each repetition's cost in one-row passes.
    let mut costs: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    for _ in 0..reps {
        let mut s = m.new_session(n_prompt + n_gen + 1);
        if n_prompt > 0 {
            let t = Instant::now();
            s.prefill(&prompt)?;
            pp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
        }
        if n_long > 0 {
            drop(s);
            s = m.new_session(n_long + 1);
            let t = Instant::now();
            s.prefill(&long)?;
            lp.push(n_long as f64 / t.elapsed().as_secs_f64());
            if let (Some(&l), Some(&p)) = (lp.last(), pp.last()) {
                ratios.push(l / p);
            }
        }
        if n_gen > 0 {
            let mut s = m.new_session(n_gen + 2);
            s.prefill(&[prompt.first().copied().unwrap_or(1)])?;
            let t = Instant::now();
            let mut tok = 1u32;
            for _ in 0..n_gen {
                let logits = s.step(tok)?;
                tok = hanlin_engine::sampler::argmax(&logits);
            }
            tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
        }
        if batch > 0 && n_gen > 0 {
            bg.push(batched_decode(&m, batch, n_gen, vocab)?);
        }
        if !rows.is_empty() {
            for (c, x) in costs.iter_mut().zip(pass_costs(&m, &rows, vocab)?) {
                c.push(x);
            }
        }
    }
    let costs: Vec<f64> = costs.into_iter().map(median).collect();
    let pp = if pp.is_empty() { 0.0 } else { median(pp) };
    let lp = if lp.is_empty() { 0.0 } else { median(lp) };
    let ratio = if ratios.is_empty() {
        0.0
    } else {
        median(ratios)
    };
    let tg = if tg.is_empty() { 0.0 } else { median(tg) };
    let bg = if bg.is_empty() { 0.0 } else { median(bg) };
    let rss = peak_rss_bytes().unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({"model": model, "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen,
                "prefill_tok_s": pp, "decode_tok_s": tg, "batch": batch,
                "long_prompt": n_long, "long_prefill_tok_s": lp, "long_ratio": ratio,
                "batched_decode_tok_s": bg, "peak_rss_bytes": rss,
                "pass_rows": rows, "pass_cost": costs,
                "simd": hanlin_engine::simd_name()})
        );
    } else {
        println!(
            "model    {model} ({threads} threads, {})",
            hanlin_engine::simd_name()
        );
        if n_prompt > 0 {
            println!("prefill  {pp:8.1} tok/s  ({n_prompt} tokens, median of {reps})");
        }
        if n_long > 0 {
            println!(
                "prefill  {lp:8.1} tok/s  ({n_long} tokens, median of {reps}; {ratio:.2}× the {n_prompt}-token rate, median of each repetition's ratio)"
            );
        }
        if n_gen > 0 {
            println!("decode   {tg:8.1} tok/s  ({n_gen} tokens, median of {reps})");
        }
        if batch > 0 {
            println!(
                "batched  {bg:8.1} tok/s  ({batch} sequences × {n_gen} tokens, aggregate, {:.2}× one sequence)",
                bg / tg.max(f64::MIN_POSITIVE)
            );
        }
        if !rows.is_empty() {
            let each: Vec<String> = rows
                .iter()
                .zip(&costs)
                .map(|(n, c)| format!("{n} rows {c:.2}×"))
                .collect();
            println!(
                "passes   {} one row's time (all logits; median of {reps})",
                each.join(", ")
            );
        }
        println!("peak RSS {}", human(rss));
    }
    Ok(())
}
