//! Files from Hugging Face repositories: `{endpoint}/{repo}/resolve/{revision}/{path}`
//! with resume (HTTP Range) and sha256 verification. The endpoint is
//! `$HF_ENDPOINT` (default `https://huggingface.co`); `$HF_TOKEN` is sent as a
//! bearer token. Tested against a local mock server.

use crate::blob::{hash_prefix, progress_bar};
use crate::{io_err, Store, StoreError};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

#[derive(Debug, Clone, PartialEq)]
pub struct HfFile {
    pub repo: String,
    pub path: String,
    pub revision: String,
}

impl HfFile {
    /// `owner/repo/path/in/repo.gguf[@revision]`.
    pub fn parse(spec: &str) -> Result<Self, StoreError> {
        let (body, revision) = match spec.rsplit_once('@') {
            Some((b, r)) if !r.is_empty() && !r.contains('/') => (b, r.to_string()),
            _ => (spec, "main".to_string()),
        };
        let parts: Vec<&str> = body.splitn(3, '/').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.is_empty() || p.contains("..")) {
            return Err(StoreError::Download(format!(
                "{spec:?} is not owner/repo/file[@revision]"
            )));
        }
        Ok(Self {
            repo: format!("{}/{}", parts[0], parts[1]),
            path: parts[2].to_string(),
            revision,
        })
    }

    /// A store name derived from the file name; a file named as every
    /// repository names its weights (`diffusion_pytorch_model`, `model`)
    /// takes the repository's name instead, and its folder's.
    pub fn local_name(&self) -> String {
        let (folder, file) = self.path.rsplit_once('/').unwrap_or(("", &self.path));
        let stem = [".gguf", ".safetensors"]
            .iter()
            .find_map(|ext| file.strip_suffix(ext))
            .unwrap_or(file);
        let generic = ["diffusion_pytorch_model", "model", "pytorch_model"]
            .contains(&stem.trim_end_matches(".fp16"));
        if !generic {
            return store_name(stem);
        }
        let repo = self.repo.rsplit('/').next().unwrap_or(&self.repo);
        let folder = folder.rsplit('/').next().unwrap_or("");
        let variant = if stem.ends_with(".fp16") { ".fp16" } else { "" };
        match folder {
            "" => store_name(&format!("{repo}{variant}")),
            f => store_name(&format!("{repo}-{f}{variant}")),
        }
    }

    pub fn url(&self, endpoint: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            endpoint.trim_end_matches('/'),
            self.repo,
            self.revision,
            self.path
        )
    }
}

/// `s` lower-cased with every character a store name cannot hold as `-`.
fn store_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// A whole repository: a diffusers pipeline (`owner/repo[@revision]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HfRepo {
    pub repo: String,
    pub revision: String,
}

impl HfRepo {
    /// `owner/repo[@revision]`: two parts, no file.
    pub fn parse(spec: &str) -> Option<Self> {
        let (body, revision) = match spec.rsplit_once('@') {
            Some((b, r)) if !r.is_empty() && !r.contains('/') => (b, r.to_string()),
            _ => (spec, "main".to_string()),
        };
        let parts: Vec<&str> = body.split('/').collect();
        let ok = parts.len() == 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && !p.contains("..") && !p.contains(char::is_whitespace));
        ok.then(|| Self {
            repo: body.to_string(),
            revision,
        })
    }

    /// A store name from the repository's name.
    pub fn local_name(&self) -> String {
        store_name(self.repo.rsplit('/').next().unwrap_or(&self.repo))
    }

    fn file(&self, path: &str) -> HfFile {
        HfFile {
            repo: self.repo.clone(),
            path: path.to_string(),
            revision: self.revision.clone(),
        }
    }
}

/// One file of a repository listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub path: String,
    /// From the listing's LFS entry, when the file is stored in LFS.
    pub sha256: Option<String>,
}

/// A repository path that is safe to recreate under a directory.
fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 512
        && !p.starts_with('/')
        && !p.contains('\\')
        && p.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// The files of a diffusers pipeline worth fetching: configs, the CLIP
/// tokenizer, and each of `unet/`, `vae/`, `text_encoder/`'s safetensors
/// weights (the f16 variant when the repository has one). Safety
/// checkers, `.bin`/`.ckpt` weights and other variants are left out.
pub fn diffusers_files(listing: &[Listed]) -> Result<Vec<Listed>, StoreError> {
    if !listing.iter().any(|f| f.path == "model_index.json") {
        return Err(StoreError::Download(
            "not a diffusers repository (no model_index.json); for one file use hf:owner/repo/path/file".into(),
        ));
    }
    const SMALL: [&str; 10] = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "tokenizer/vocab.txt",
    ];
    let mut out: Vec<Listed> = listing
        .iter()
        .filter(|f| SMALL.contains(&f.path.as_str()))
        .cloned()
        .collect();
    for part in ["unet", "vae", "text_encoder"] {
        let weights: Vec<&Listed> = listing
            .iter()
            .filter(|f| {
                f.path
                    .strip_prefix(part)
                    .and_then(|r| r.strip_prefix('/'))
                    .is_some_and(|r| !r.contains('/') && r.ends_with(".safetensors"))
            })
            .collect();
        let fp16: Vec<&Listed> = weights
            .iter()
            .copied()
            .filter(|f| f.path.contains(".fp16."))
            .collect();
        let plain: Vec<&Listed> = weights
            .iter()
            .copied()
            .filter(|f| f.path.matches('.').count() == 1)
            .collect();
        let chosen = if fp16.is_empty() { plain } else { fp16 };
        if chosen.is_empty() {
            return Err(StoreError::Download(format!(
                "the repository has no safetensors weights for {part}/ (Hanlin does not read .bin or .ckpt files)"
            )));
        }
        out.extend(chosen.into_iter().cloned());
    }
    if let Some(bad) = out.iter().find(|f| !safe_path(&f.path)) {
        return Err(StoreError::Download(format!(
            "unsafe path {:?} in the listing",
            bad.path
        )));
    }
    Ok(out)
}

/// The repository's files, from `{endpoint}/api/models/{repo}/revision/{rev}?blobs=true`.
pub fn list_from(endpoint: &str, r: &HfRepo) -> Result<Vec<Listed>, StoreError> {
    let url = format!(
        "{}/api/models/{}/revision/{}?blobs=true",
        endpoint.trim_end_matches('/'),
        r.repo,
        r.revision
    );
    let mut req = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(30))
        .timeout_read(std::time::Duration::from_secs(60))
        .build()
        .get(&url);
    if let Ok(tok) = std::env::var("HF_TOKEN") {
        req = req.set("Authorization", &format!("Bearer {tok}"));
    }
    let resp = req
        .call()
        .map_err(|e| StoreError::Download(format!("{url}: {e}")))?;
    let mut body = Vec::new();
    resp.into_reader()
        .take(16 << 20)
        .read_to_end(&mut body)
        .map_err(|e| StoreError::Download(format!("{url}: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| StoreError::Download(format!("{url}: not JSON ({e})")))?;
    let siblings = v
        .get("siblings")
        .and_then(|s| s.as_array())
        .ok_or_else(|| StoreError::Download(format!("{url}: no file list")))?;
    Ok(siblings
        .iter()
        .filter_map(|s| {
            Some(Listed {
                path: s.get("rfilename")?.as_str()?.to_string(),
                sha256: s
                    .get("lfs")
                    .and_then(|l| l.get("sha256"))
                    .and_then(|h| h.as_str())
                    .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
                    .map(str::to_string),
            })
        })
        .collect())
}

/// A fetched repository: the blob of `model_index.json`, the total size,
/// and every fetched file as (path in the repository, blob).
pub type Fetched = (String, u64, Vec<(String, String)>);

/// Fetch a diffusers pipeline.
pub(crate) fn fetch_repo(store: &Store, r: &HfRepo, progress: bool) -> Result<Fetched, StoreError> {
    fetch_repo_from(store, &endpoint(), r, progress)
}

pub fn fetch_repo_from(
    store: &Store,
    endpoint: &str,
    r: &HfRepo,
    progress: bool,
) -> Result<Fetched, StoreError> {
    let files = diffusers_files(&list_from(endpoint, r)?)?;
    let mut total = 0;
    let mut out = Vec::with_capacity(files.len());
    let mut index = None;
    for f in &files {
        let (sha, size) = fetch_from(
            store,
            endpoint,
            &r.file(&f.path),
            f.sha256.as_deref(),
            progress,
        )?;
        total += size;
        if f.path == "model_index.json" {
            index = Some(sha.clone());
        }
        out.push((f.path.clone(), sha));
    }
    let index =
        index.ok_or_else(|| StoreError::Download("model_index.json was not fetched".into()))?;
    Ok((index, total, out))
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string())
}

/// Download (resuming a previous partial download) and store the file.
pub(crate) fn fetch(
    store: &Store,
    f: &HfFile,
    sha256: Option<&str>,
    progress: bool,
) -> Result<(String, u64), StoreError> {
    fetch_from(store, &endpoint(), f, sha256, progress)
}

pub fn fetch_from(
    store: &Store,
    endpoint: &str,
    f: &HfFile,
    sha256: Option<&str>,
    progress: bool,
) -> Result<(String, u64), StoreError> {
    let url = f.url(endpoint);
    let key = hex::encode(Sha256::digest(url.as_bytes()));
    let partial = store.tmp_dir().join(format!("hf-{}.partial", &key[..16]));
    let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(30))
        .build();
    let mut req = agent.get(&url);
    if let Ok(tok) = std::env::var("HF_TOKEN") {
        req = req.set("Authorization", &format!("Bearer {tok}"));
    }
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) if have > 0 => {
            // Already complete: verify below.
            return finish(store, &partial, sha256, None, &url);
        }
        Err(ureq::Error::Status(code, r)) => {
            return Err(StoreError::Download(format!(
                "{url}: HTTP {code} {}",
                r.status_text()
            )))
        }
        Err(e) => return Err(StoreError::Download(format!("{url}: {e}"))),
    };
    let resumed = resp.status() == 206;
    let etag = resp
        .header("x-linked-etag")
        .or_else(|| resp.header("etag"))
        .map(|s| s.trim_matches('"').to_string())
        .filter(|s| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()));
    let remaining: Option<u64> = resp.header("content-length").and_then(|v| v.parse().ok());
    let start = if resumed { have } else { 0 };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(resumed)
        .write(true)
        .truncate(!resumed)
        .open(&partial)
        .map_err(io_err(format!("opening {}", partial.display())))?;
    let pb = progress_bar(start + remaining.unwrap_or(0), &f.path, progress);
    pb.set_position(start);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| {
            StoreError::Download(format!(
                "{url}: connection lost after {} bytes ({e}); run the same command again to resume",
                start + got
            ))
        })?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .map_err(io_err(format!("writing {}", partial.display())))?;
        got += n as u64;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    file.sync_all().map_err(io_err("flushing the download"))?;
    if let Some(r) = remaining {
        if got < r {
            return Err(StoreError::Download(format!(
                "{url}: connection closed after {} of {} bytes; run the same command again to resume",
                start + got,
                start + r
            )));
        }
    }
    finish(store, &partial, sha256, etag.as_deref(), &url)
}

fn finish(
    store: &Store,
    partial: &std::path::Path,
    sha256: Option<&str>,
    etag: Option<&str>,
    url: &str,
) -> Result<(String, u64), StoreError> {
    let (h, size) = hash_prefix(partial)?;
    let actual = hex::encode(h.finalize());
    if let Some(exp) = sha256.or(etag) {
        if !exp.eq_ignore_ascii_case(&actual) {
            let _ = std::fs::remove_file(partial);
            return Err(StoreError::HashMismatch {
                what: url.to_string(),
                expected: exp.to_string(),
                actual,
            });
        }
    }
    let dest = store.blob_path(&actual);
    std::fs::rename(partial, &dest).map_err(io_err(format!(
        "moving the download into {}",
        dest.display()
    )))?;
    Ok((actual, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A tiny HTTP/1.1 server for `/{repo}/resolve/main/{file}` that honours
    /// Range requests; the first `cut_first` response is cut short.
    fn serve(body: Vec<u8>, cut_first: bool, requests: Arc<Mutex<Vec<String>>>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            let mut first = cut_first;
            for s in l.incoming().take(4) {
                let Ok(mut s) = s else { continue };
                let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                requests.lock().expect("lock").push(head.clone());
                let path_ok = head.starts_with("GET /org/model/resolve/main/m.gguf ");
                if !path_ok {
                    let _ = s.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let from = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("range: bytes=")
                            .map(|v| v.trim_end_matches('-').trim().to_string())
                    })
                    .and_then(|v| v.trim_end_matches('-').parse::<usize>().ok());
                let etag = hex::encode(Sha256::digest(&body));
                let (status, part) = match from {
                    Some(f) => ("206 Partial Content", &body[f..]),
                    None => ("200 OK", &body[..]),
                };
                let hdr = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nX-Linked-Etag: \"{etag}\"\r\nConnection: close\r\n\r\n",
                    part.len()
                );
                let _ = s.write_all(hdr.as_bytes());
                if first {
                    first = false;
                    let _ = s.write_all(&part[..part.len() / 2]);
                } else {
                    let _ = s.write_all(part);
                }
                let _ = s.flush();
            }
        });
        format!("http://{addr}")
    }

    /// A mock Hub serving a listing and files by path.
    fn serve_repo(listing: String, files: Vec<(String, Vec<u8>)>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
                let mut first = String::new();
                let _ = r.read_line(&mut first);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let path = first.split(' ').nth(1).unwrap_or("").to_string();
                let body = if path == "/api/models/org/pipe/revision/main?blobs=true" {
                    Some(listing.clone().into_bytes())
                } else {
                    path.strip_prefix("/org/pipe/resolve/main/")
                        .and_then(|p| files.iter().find(|(n, _)| n == p))
                        .map(|(_, b)| b.clone())
                };
                let hdr = match &body {
                    Some(b) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        b.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .into()
                    }
                };
                let _ = s.write_all(hdr.as_bytes());
                if let Some(b) = body {
                    let _ = s.write_all(&b);
                }
                let _ = s.flush();
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn a_diffusers_repository_is_pulled_into_a_directory() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        let files: Vec<(String, Vec<u8>)> = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "safety_checker/model.safetensors",
        ]
        .iter()
        .map(|p| (p.to_string(), format!("contents of {p}").into_bytes()))
        .collect();
        let entry = |p: &str, b: &[u8]| {
            if p.ends_with(".safetensors") {
                format!(
                    r#"{{"rfilename":"{p}","lfs":{{"sha256":"{}"}}}}"#,
                    hex::encode(Sha256::digest(b))
                )
            } else {
                format!(r#"{{"rfilename":"{p}"}}"#)
            }
        };
        let listing = format!(
            r#"{{"id":"org/pipe","siblings":[{}]}}"#,
            files
                .iter()
                .map(|(p, b)| entry(p, b))
                .collect::<Vec<_>>()
                .join(",")
        );
        let ep = serve_repo(listing, files.clone());
        let repo = HfRepo::parse("org/pipe").expect("a repository");
        assert_eq!(repo.local_name(), "pipe");
        assert!(HfRepo::parse("org/pipe/file.gguf").is_none());
        let (index, size, got) = fetch_repo_from(&store, &ep, &repo, false).expect("fetched");
        let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        assert!(paths.contains(&"unet/diffusion_pytorch_model.fp16.safetensors"));
        assert!(
            !paths.contains(&"unet/diffusion_pytorch_model.safetensors"),
            "one variant"
        );
        assert!(!paths
            .iter()
            .any(|p| p.ends_with(".bin") || p.starts_with("safety_checker")));
        assert_eq!(paths.len(), 10);
        assert!(size > 0);
        store
            .record("pipe".into(), index, size, "hf:org/pipe@main".into(), got)
            .expect("recorded");
        let view = store.dir_of("pipe").expect("view").expect("a directory");
        assert_eq!(
            std::fs::read(view.join("vae/diffusion_pytorch_model.safetensors")).expect("linked"),
            b"contents of vae/diffusion_pytorch_model.safetensors"
        );
        assert!(view.join("model_index.json").exists());
        store.remove("pipe").expect("removed");
        assert!(!view.exists(), "the view goes with the model");
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs"))
                .expect("blobs")
                .count(),
            0
        );
    }

    #[test]
    fn a_repository_listing_is_checked() {
        let l = |p: &str| Listed {
            path: p.into(),
            sha256: None,
        };
        let base = [
            "model_index.json",
            "vae/a.safetensors",
            "text_encoder/model.safetensors",
        ];
        let mut v: Vec<Listed> = base.iter().map(|p| l(p)).collect();
        let err = diffusers_files(&v).expect_err("no unet weights");
        assert!(err.to_string().contains("unet/"), "{err}");
        v.push(l("unet/../../x.safetensors"));
        assert!(diffusers_files(&v).is_err(), "a path leaving the directory");
        v.pop();
        v.push(l("unet/model.safetensors"));
        assert_eq!(diffusers_files(&v).expect("complete").len(), 4);
        let err = diffusers_files(&v[1..]).expect_err("no model_index.json");
        assert!(
            err.to_string().contains("not a diffusers repository"),
            "{err}"
        );
    }

    #[test]
    fn parse_specs() {
        let f =
            HfFile::parse("Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf@abc")
                .expect("parse");
        assert_eq!(f.repo, "Qwen/Qwen2.5-0.5B-Instruct-GGUF");
        assert_eq!(f.revision, "abc");
        assert_eq!(f.local_name(), "qwen2.5-0.5b-instruct-q4_k_m");
        assert!(HfFile::parse("just-a-name").is_err());
        let sd = HfFile::parse("org/sd/v1-5-pruned-emaonly.safetensors").expect("parse");
        assert_eq!(sd.local_name(), "v1-5-pruned-emaonly");
        // Weights named as every repository names them take the repository's name.
        let tiny =
            HfFile::parse("madebyollin/taesd/diffusion_pytorch_model.safetensors").expect("parse");
        assert_eq!(tiny.local_name(), "taesd");
        let vae = HfFile::parse("org/SD-Turbo/vae/diffusion_pytorch_model.fp16.safetensors")
            .expect("parse");
        assert_eq!(vae.local_name(), "sd-turbo-vae.fp16");
        assert!(HfFile::parse("a/../b").is_err());
    }

    #[test]
    fn interrupted_download_resumes_and_verifies() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        let body: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let reqs = Arc::new(Mutex::new(Vec::new()));
        let ep = serve(body.clone(), true, reqs.clone());
        let f = HfFile::parse("org/model/m.gguf").expect("spec");
        let sha = hex::encode(Sha256::digest(&body));
        let err = fetch_from(&store, &ep, &f, Some(&sha), false).expect_err("cut short");
        assert!(err.to_string().contains("resume"), "{err}");
        assert!(
            !store.blob_path(&sha).exists(),
            "no blob from a partial download"
        );
        let (got, size) = fetch_from(&store, &ep, &f, Some(&sha), false).expect("resumed");
        assert_eq!((got.as_str(), size), (sha.as_str(), body.len() as u64));
        assert_eq!(std::fs::read(store.blob_path(&sha)).expect("blob"), body);
        let reqs = reqs.lock().expect("lock");
        assert!(
            reqs[1]
                .to_ascii_lowercase()
                .contains(&format!("range: bytes={}-", body.len() / 2)),
            "{}",
            reqs[1]
        );
    }

    #[test]
    fn wrong_hash_and_missing_file_leave_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        let body = b"hello gguf".to_vec();
        let ep = serve(body, false, Arc::new(Mutex::new(Vec::new())));
        let f = HfFile::parse("org/model/m.gguf").expect("spec");
        let err = fetch_from(&store, &ep, &f, Some(&"0".repeat(64)), false).expect_err("mismatch");
        assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .expect("dir")
            .count();
        let tmp = std::fs::read_dir(dir.path().join("tmp"))
            .expect("dir")
            .count();
        assert_eq!((blobs, tmp), (0, 0));
        let missing = HfFile::parse("org/model/other.gguf").expect("spec");
        let err = fetch_from(&store, &ep, &missing, None, false).expect_err("404");
        assert!(err.to_string().contains("404"), "{err}");
    }
}
