//! Attention's speed on a long context, alone (`cargo test --release -p
//! hanlin-engine --lib attn_speed -- --ignored --nocapture`): the
//! Qwen2.5-0.5B shape (head 64, 2 KV heads of 7 query heads), one thread.

use crate::attn::{tokens_per_job, Attend, Level, Scratch};
use crate::kv::{KvCache, KvShape};
use hanlin_kernels::pool::SendPtr;
use rand::{Rng, SeedableRng};

#[test]
#[ignore = "a measurement; run it by hand"]
fn attn_speed() {
    let (hd, n_kv, group) = (64, 2, 7);
    let nh = n_kv * group;
    let kvd = n_kv * hd;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (n, t_n) in [(512, 512), (4096, 512)] {
        let p0 = n - t_n;
        let mut gen =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0f32)).collect() };
        let (k, v, q) = (gen(n * kvd), gen(n * kvd), gen(t_n * nh * hd));
        let shape = KvShape {
            n_layer: 1,
            n_kv,
            head_dim: hd,
        };
        let mut cache = KvCache::new(shape, n);
        cache.append(0, &k, &v);
        cache.commit(n);
        let mut out = vec![0f32; t_n * nh * hd];
        let a = Attend {
            hd,
            nh,
            group,
            scale: 1.0 / (hd as f32).sqrt(),
            window: None,
            li: 0,
            cache: &cache,
            q: &q,
            p0,
            t_n,
            out: SendPtr(out.as_mut_ptr()),
        };
        let mut sc = Scratch::default();
        let level = Level::detect();
        let mut times = Vec::new();
        for _ in 0..15 {
            let t = std::time::Instant::now();
            for kvh in 0..n_kv {
                for blk in 0..t_n.div_ceil(tokens_per_job(group)) {
                    a.run(level, kvh, blk, &mut sc);
                }
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{t_n} queries over {n} keys: median {:.2} ms, best {:.2} ms ({:.1} µs a token)",
            times[times.len() / 2],
            times[0],
            times[times.len() / 2] * 1e3 / t_n as f64
        );
    }
}
