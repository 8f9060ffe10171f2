//! Embedding models for knowledge bases (`hanlin_search::dense::Embedder`):
//! the multilingual-e5-small encoder (the default), or any chat model's
//! pooled hidden states. Loaded from the model store (pulled on first use),
//! each once, on its own thread pool. Used by the server and by `hanlin kb`
//! / `hanlin ask`, which do not need the server for it.

use hanlin_engine::encoder::{Encoder, Kind};
use hanlin_engine::LoadedModel;
use hanlin_search::dense::Embedder;
use hanlin_store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why an embedding model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedding model {name}: {source}")]
    Store {
        name: String,
        #[source]
        source: hanlin_store::StoreError,
    },
    #[error("{name} is not in the store after pulling it")]
    NotPulled { name: String },
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading embedding model {name}: {message}")]
    Load { name: String, message: String },
}

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
pub fn load(store: &Store, name: &str, threads: usize) -> Result<Arc<dyn Embedder>, EmbedError> {
    let store_err = |source| EmbedError::Store {
        name: name.to_string(),
        source,
    };
    let load_err = |e: &dyn std::fmt::Display| EmbedError::Load {
        name: name.to_string(),
        message: e.to_string(),
    };
    let path = match store.path_of(name).map_err(store_err)? {
        Some(p) => p,
        None => {
            tracing::info!("pulling embedding model {name}");
            store.pull(name, false).map_err(store_err)?;
            store
                .path_of(name)
                .map_err(store_err)?
                .ok_or_else(|| EmbedError::NotPulled {
                    name: name.to_string(),
                })?
        }
    };
    let head = {
        use std::io::Read;
        let mut b = [0u8; 4];
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|source| EmbedError::Read {
                path: path.display().to_string(),
                source,
            })?;
        b
    };
    if hanlin_formats::e5::is_encoder(&head) {
        let enc = Encoder::load(&path, threads).map_err(|e| load_err(&e))?;
        Ok(Arc::new(E5 {
            name: name.to_string(),
            enc,
        }))
    } else {
        let model = LoadedModel::load(&path, threads).map_err(|e| load_err(&e))?;
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
    pub fn get(&self, name: &str) -> Result<Arc<dyn Embedder>, EmbedError> {
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
            .map_err(|e| hanlin_search::SearchError::Embedder(e.to_string()))?;
        e.embed(&[text], true)
            .map_err(hanlin_search::SearchError::Embedder)?
            .pop()
            .ok_or_else(|| hanlin_search::SearchError::Embedder("no vector".into()))
    }
}
