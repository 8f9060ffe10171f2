//! Helpers shared by the training tests.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use hanlin_train::burn;
use hanlin_train::model::Gpt;
use std::path::Path;

/// Models draw their starting weights (and LoRA adapters theirs) from the
/// device's one random generator, and the tests run in parallel: each
/// takes its turn, so a seeded run draws the same weights as another run
/// with that seed, whichever tests run beside it.
static WEIGHTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn drawing() -> std::sync::MutexGuard<'static, ()> {
    WEIGHTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The trainer's logits for `ids` (`[len × vocab]`).
pub fn logits(model: &Gpt, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(
            ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            [1, ids.len()],
        ),
        &Device::default(),
    );
    model
        .clone()
        .valid()
        .forward(input)
        .into_data()
        .try_to_vec()
        .unwrap()
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The engine running `gguf` gives the trainer's logits for `ids`, within
/// `tol` of the largest logit.
pub fn assert_same_logits(model: &Gpt, gguf: &Path, ids: &[u32], tol: f32) {
    let engine = hanlin_engine::Model::load(gguf).unwrap();
    let pool = hanlin_kernels::ThreadPool::new(2);
    let mut cache =
        hanlin_engine::KvCache::new(hanlin_engine::KvShape::of(&engine.cfg), ids.len() + 1);
    let ours = engine
        .forward(&pool, ids, &mut cache, hanlin_engine::Logits::All)
        .unwrap();
    let theirs = logits(model, ids);
    assert_eq!(ours.len(), theirs.len());
    let max = max_diff(&ours, &theirs);
    let scale = theirs.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(
        max < tol * scale.max(1.0),
        "engine vs trainer logits differ by {max} (scale {scale})"
    );
}
