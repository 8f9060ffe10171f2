//! The models a server can serve: every model in the store, loaded on first
//! use (one scheduler each) and evicted least-recently-used when loading
//! another would exceed the memory budget (weights and live KV cache).

use crate::error::ApiError;
use hanlin_engine::{Draft, LoadedModel, Scheduler, SchedulerConfig};
use hanlin_store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Settings for one model that differ from the server's (`[models.NAME]`
/// in the settings file). Unset fields keep the server-wide value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelSettings {
    pub ctx: Option<usize>,
    pub max_batch: Option<usize>,
    pub max_queue: Option<usize>,
    pub prefill_chunk: Option<usize>,
    pub lookup: Option<bool>,
    /// A model in the store (same vocabulary) that guesses ahead for this
    /// one: speculative decoding inside the batch.
    pub draft: Option<String>,
}

impl ModelSettings {
    /// `base` with this model's overrides.
    pub fn apply(&self, base: &SchedulerConfig) -> SchedulerConfig {
        let mut c = base.clone();
        if let Some(v) = self.ctx {
            c.ctx = v;
        }
        if let Some(v) = self.max_batch {
            c.max_batch = v;
        }
        if let Some(v) = self.max_queue {
            c.max_queue = v;
        }
        if let Some(v) = self.prefill_chunk {
            c.prefill_chunk = v;
        }
        if let Some(v) = self.lookup {
            c.lookup = v.into();
        }
        c
    }
}

struct Loaded {
    name: String,
    sched: Arc<Scheduler>,
    bytes: u64,
    last_used: Instant,
}

impl Loaded {
    /// Weights plus the KV blocks its scheduler holds (running sequences
    /// and the prefix pool).
    fn memory(&self) -> u64 {
        self.bytes
            + self
                .sched
                .stats
                .kv_bytes
                .load(std::sync::atomic::Ordering::Relaxed) as u64
    }
}

pub struct Models {
    store: Store,
    threads: usize,
    budget_bytes: u64,
    sched: SchedulerConfig,
    per_model: HashMap<String, ModelSettings>,
    loaded: Mutex<Vec<Loaded>>,
    /// Serialises loading so two requests for a cold model load it once.
    loading: tokio::sync::Mutex<()>,
}

impl Models {
    pub fn new(
        store: Store,
        threads: usize,
        budget_bytes: u64,
        sched: SchedulerConfig,
        per_model: HashMap<String, ModelSettings>,
    ) -> Self {
        Self {
            store,
            threads,
            budget_bytes,
            sched,
            per_model,
            loaded: Mutex::new(Vec::new()),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// Names of the chat models that can be served (pulled into the store;
    /// encoders, which only embed knowledge-base passages, are left out).
    pub fn available(&self) -> Vec<(String, u64)> {
        let encoder = |sha: &str| {
            use std::io::Read;
            let mut b = [0u8; 4];
            std::fs::File::open(self.store.blob_path(sha))
                .and_then(|mut f| f.read_exact(&mut b))
                .is_ok_and(|_| hanlin_formats::e5::is_encoder(&b))
        };
        match self.store.list() {
            Ok(list) => list
                .into_iter()
                .filter(|m| !encoder(&m.sha256))
                .map(|m| (m.name, m.pulled_at))
                .collect(),
            Err(e) => {
                tracing::error!("listing the model store: {e}");
                Vec::new()
            }
        }
    }

    /// Schedulers of the models loaded now (for metrics).
    pub fn loaded(&self) -> Vec<(String, Arc<Scheduler>)> {
        self.lock()
            .iter()
            .map(|l| (l.name.clone(), l.sched.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Loaded>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hit(&self, name: &str) -> Option<Arc<Scheduler>> {
        let mut loaded = self.lock();
        let l = loaded.iter_mut().find(|l| l.name == name)?;
        l.last_used = Instant::now();
        Some(l.sched.clone())
    }

    /// The scheduler for `name`, loading the model if needed.
    pub async fn get(&self, name: &str) -> Result<Arc<Scheduler>, ApiError> {
        if let Some(s) = self.hit(name) {
            return Ok(s);
        }
        let _guard = self.loading.lock().await;
        if let Some(s) = self.hit(name) {
            return Ok(s);
        }
        let manifest = self
            .store
            .get(name)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .ok_or_else(|| ApiError::model_not_found(name))?;
        let path = self.store.blob_path(&manifest.sha256);
        let threads = self.threads;
        let settings = self.per_model.get(name).cloned().unwrap_or_default();
        let cfg = settings.apply(&self.sched);
        // The draft's weights count toward the memory budget with its
        // target's (its KV caches count in the scheduler's KV bytes).
        let draft = match &settings.draft {
            Some(d) => {
                let m = self
                    .store
                    .get(d)
                    .map_err(|e| ApiError::internal(e.to_string()))?
                    .ok_or_else(|| {
                        ApiError::internal(format!(
                            "the draft model {d} of {name} is not in the store (hanlin pull {d})"
                        ))
                    })?;
                Some((d.clone(), self.store.blob_path(&m.sha256), m.size))
            }
            None => None,
        };
        let bytes = manifest.size + draft.as_ref().map_or(0, |d| d.2);
        let model_name = name.to_string();
        let started = Instant::now();
        let sched = tokio::task::spawn_blocking(move || {
            let target = LoadedModel::load(&path, threads)?;
            let draft = match draft {
                Some((d, path, _)) => {
                    // The draft runs on the target's threads, between its
                    // steps.
                    let dm = LoadedModel::load_draft(&path, target.pool.clone())?;
                    Some(Draft::new(dm, &d, &target, &model_name)?)
                }
                None => None,
            };
            Ok::<_, hanlin_engine::EngineError>(Arc::new(Scheduler::start_with_draft(
                target, draft, cfg,
            )))
        })
        .await
        .map_err(|e| ApiError::internal(format!("loading {name}: {e}")))?
        .map_err(|e| ApiError::internal(format!("loading {name}: {e}")))?;
        tracing::info!(
            model = name,
            secs = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        // Only now that the new model is known to load (header, shapes,
        // tokenizer, template) do the least recently used ones make room:
        // a broken file costs nobody their loaded model.
        {
            let mut loaded = self.lock();
            loaded.sort_by_key(|l| l.last_used);
            while !loaded.is_empty()
                && loaded.iter().map(Loaded::memory).sum::<u64>() + bytes > self.budget_bytes
            {
                let gone = loaded.remove(0);
                tracing::info!(model = %gone.name, "evicting model (memory budget)");
            }
        }
        self.lock().push(Loaded {
            name: name.to_string(),
            sched: sched.clone(),
            bytes,
            last_used: Instant::now(),
        });
        Ok(sched)
    }
}
