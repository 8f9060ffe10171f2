//! Embedding models for knowledge bases (`hanlin_search::dense::Embedder`):
//! the multilingual-e5-small encoder (the default), or any chat model's
//! pooled hidden states. Loaded from the model store (pulled on first use),
//! each once, on its own thread pool.

use hanlin_engine::encoder::{Encoder, Kind};
use hanlin_engine::LoadedModel;
use hanlin_search::dense::Embedder;
use hanlin_store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// multilingual-e5-small (or another `E5S1` encoder file).
pub struct E5 {
    name: String,
    enc: Encoder,
}

impl Embedder for E5 {
    fn name(&self) -> &str {
        &self.name
    }
    fn embed(&self, texts: &[&str], query: bool) -> Result<Vec<Vec<f32>>, String> {
        let kind = if query { Kind::Query } else { Kind::Passage };
        self.enc.embed(texts, kind).map_err(|e| e.to_string())
    }
}

/// A chat model's mean-pooled final hidden states.
pub struct Pooled {
    name: String,
    model: Arc<LoadedModel>,
}

impl Embedder for Pooled {
    fn name(&self) -> &str {
        &self.name
    }
    fn embed(&self, texts: &[&str], _query: bool) -> Result<Vec<Vec<f32>>, String> {
        texts
            .iter()
            .map(|t| self.model.embed_mean(t).map_err(|e| e.to_string()))
            .collect()
    }
}

/// Load embedding model `name` from `store`, pulling it when it is a
/// catalog model not fetched yet.
pub fn load(store: &Store, name: &str, threads: usize) -> Result<Arc<dyn Embedder>, String> {
    let path = match store.path_of(name).map_err(|e| e.to_string())? {
        Some(p) => p,
        None => {
            tracing::info!("pulling embedding model {name}");
            store.pull(name, false).map_err(|e| e.to_string())?;
            store
                .path_of(name)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{name} is not in the store after pulling it"))?
        }
    };
    let head = {
        use std::io::Read;
        let mut b = [0u8; 4];
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        b
    };
    if hanlin_formats::e5::is_encoder(&head) {
        let enc = Encoder::load(&path, threads).map_err(|e| e.to_string())?;
        Ok(Arc::new(E5 {
            name: name.to_string(),
            enc,
        }))
    } else {
        let model = LoadedModel::load(&path, threads).map_err(|e| e.to_string())?;
        Ok(Arc::new(Pooled {
            name: name.to_string(),
            model,
        }))
    }
}

/// The embedding models a process has loaded, by name.
pub struct Embedders {
    store: Store,
    threads: usize,
    loaded: Mutex<HashMap<String, Arc<dyn Embedder>>>,
}

impl Embedders {
    pub fn new(store: Store, threads: usize) -> Self {
        Self {
            store,
            threads,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// Model `name`, loaded (and pulled) on first use.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Embedder>, String> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = loaded.get(name) {
            return Ok(e.clone());
        }
        let e = load(&self.store, name, self.threads)?;
        loaded.insert(name.to_string(), e.clone());
        Ok(e)
    }

    /// The query vector of `text` under model `name` (for `search_all`).
    pub fn query(&self, name: &str, text: &str) -> Result<Vec<f32>, hanlin_search::SearchError> {
        let e = self
            .get(name)
            .map_err(hanlin_search::SearchError::Embedder)?;
        e.embed(&[text], true)
            .map_err(hanlin_search::SearchError::Embedder)?
            .pop()
            .ok_or_else(|| hanlin_search::SearchError::Embedder("no vector".into()))
    }
}
