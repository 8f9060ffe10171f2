//! A component's weights: every `*.safetensors` file of a directory (or
//! one file), memory-mapped, with tensors read by name as f32.

use crate::{bad, ImageError};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where one tensor lies.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

pub struct Weights {
    path: PathBuf,
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
}

impl Weights {
    /// The safetensors files of `dir` (diffusers' `diffusion_pytorch_model`
    /// or `model`, sharded or not; a `.fp16` variant when it is the only
    /// one).
    pub fn open_dir(dir: &Path) -> Result<Self, ImageError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ImageError::Io {
                path: dir.display().to_string(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        // Prefer full-precision files when both variants are present.
        let plain: Vec<PathBuf> = files
            .iter()
            .filter(|p| !p.to_string_lossy().contains(".fp16."))
            .cloned()
            .collect();
        if !plain.is_empty() {
            files = plain;
        }
        if files.is_empty() {
            return Err(bad(dir, "no .safetensors weights"));
        }
        Self::open(dir, &files)
    }

    /// One or more safetensors files read as one set of tensors.
    pub fn open(path: &Path, files: &[PathBuf]) -> Result<Self, ImageError> {
        Self::open_with(path, files, &|n| Some(n.to_string()))
    }

    /// As [`Weights::open`], keeping only the tensors `rename` maps, under
    /// the names it gives (a single-file checkpoint seen as one component).
    pub fn open_with(
        path: &Path,
        files: &[PathBuf],
        rename: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ImageError> {
        let mut maps = Vec::new();
        let mut entries = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let file = std::fs::File::open(f).map_err(|source| ImageError::Io {
                path: f.display().to_string(),
                source,
            })?;
            // SAFETY: the file is only read; a file changed under a running
            // process is outside what the program can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| ImageError::Io {
                path: f.display().to_string(),
                source,
            })?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| bad(f, format!("not a safetensors file: {e}")))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let Some(name) = rename(&name) else { continue };
                let (a, b) = info.data_offsets;
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: base + a..base + b,
                    },
                );
            }
            maps.push(map);
        }
        Ok(Self {
            path: path.to_path_buf(),
            maps,
            entries,
        })
    }

    /// Every tensor's name.
    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        self.entries.keys().map(String::as_str)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Result<&[usize], ImageError> {
        self.entries
            .get(name)
            .map(|e| e.shape.as_slice())
            .ok_or_else(|| bad(&self.path, format!("tensor {name} is missing")))
    }

    /// Tensor `name` as f32 values.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>, ImageError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| bad(&self.path, format!("tensor {name} is missing")))?;
        let bytes = self.maps[e.file]
            .get(e.range.clone())
            .ok_or_else(|| bad(&self.path, format!("tensor {name} lies outside its file")))?;
        let n: usize = e.shape.iter().product();
        let width = match e.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(bad(
                    &self.path,
                    format!("tensor {name} has type {other:?} (f32, f16 or bf16 expected)"),
                ))
            }
        };
        if bytes.len() != n * width {
            return Err(bad(
                &self.path,
                format!(
                    "tensor {name}: {} bytes for shape {:?}",
                    bytes.len(),
                    e.shape
                ),
            ));
        }
        Ok(match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }

    /// Tensor `name`, checked to have `n` values.
    pub fn vec(&self, name: &str, n: usize) -> Result<Vec<f32>, ImageError> {
        let v = self.f32(name)?;
        if v.len() != n {
            return Err(bad(
                &self.path,
                format!("tensor {name} has {} values, expected {n}", v.len()),
            ));
        }
        Ok(v)
    }
}

/// A component's `config.json`.
pub fn read_config(dir: &Path) -> Result<serde_json::Value, ImageError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ImageError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| bad(&path, format!("not JSON: {e}")))
}
