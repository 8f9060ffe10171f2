//! Writing a blob: bytes go to a temporary file in `tmp/` while being hashed;
//! only a file whose hash matches is moved into `blobs/`. Dropping an
//! unfinished writer deletes the temporary file.

use crate::{io_err, Store, StoreError};
use sha2::{Digest, Sha256};
use std::io::Write;

pub(crate) struct BlobWriter {
    file: Option<tempfile::NamedTempFile>,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    pub fn new(store: &Store) -> Result<Self, StoreError> {
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .suffix(".partial")
            .tempfile_in(store.tmp_dir())
            .map_err(io_err("creating a temporary file in the model store"))?;
        Ok(Self {
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    pub fn write(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| StoreError::Download("writer closed".into()))?;
        f.write_all(buf).map_err(io_err("writing the model file"))?;
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Verify the hash and move the file into `blobs/`; returns (sha256, size).
    pub fn finish(
        mut self,
        store: &Store,
        expected: Option<&str>,
        what: &str,
    ) -> Result<(String, u64), StoreError> {
        let actual = hex::encode(self.hasher.clone().finalize());
        if let Some(exp) = expected {
            if !exp.eq_ignore_ascii_case(&actual) {
                return Err(StoreError::HashMismatch {
                    what: what.to_string(),
                    expected: exp.to_string(),
                    actual,
                });
            }
        }
        let f = self
            .file
            .take()
            .ok_or_else(|| StoreError::Download("writer closed".into()))?;
        f.as_file()
            .sync_all()
            .map_err(io_err("flushing the model file"))?;
        let dest = store.blob_path(&actual);
        f.persist(&dest)
            .map_err(|e| io_err(format!("moving the model into {}", dest.display()))(e.error))?;
        Ok((actual, self.size))
    }
}

/// Hash an existing file (for resumed downloads).
pub(crate) fn hash_prefix(path: &std::path::Path) -> Result<(Sha256, u64), StoreError> {
    let mut f = std::fs::File::open(path).map_err(io_err(format!("reading {}", path.display())))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).map_err(io_err(format!("reading {}", path.display())))?;
    Ok((h, n))
}

pub(crate) fn progress_bar(len: u64, msg: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}
