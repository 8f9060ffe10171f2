//! Reading untrusted files where they cannot take the caller down.
//!
//! PDF and Word parsers are large and were not written for hostile input: a
//! one-kilobyte PDF whose form draws itself recurses until the stack
//! overflows, which aborts the whole process (no `catch_unwind` helps), and
//! a crafted file can loop or allocate without end. [`Isolation::Child`]
//! runs [`crate::extract::extract`] in a child process (`hanlin
//! extract-file PATH`, which calls [`child_main`]) with an address-space
//! limit, a CPU-time limit and a wall-clock timeout, and no environment (no
//! secrets reach it). A crash, a hang or an exhausted limit becomes an
//! [`ExtractError`] for that file; the caller carries on.

use crate::extract::{extract, Document, ExtractError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How [`extract_isolated`] reads a file.
#[derive(Debug, Clone, Default)]
pub enum Isolation {
    /// In this process (trusted files, tests of the extractors).
    #[default]
    InProcess,
    /// In a child process with limits.
    Child(ChildLimits),
}

/// The child to run and what it may use.
#[derive(Debug, Clone)]
pub struct ChildLimits {
    /// The program and its leading arguments; the file's path is appended.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Wall-clock time before the child is killed.
    pub timeout: Duration,
    /// Address space the child may map (`RLIMIT_AS`).
    pub memory_bytes: u64,
}

impl ChildLimits {
    /// `program args… PATH` with the default limits: 60 s and 2 GiB.
    pub fn new(program: PathBuf, args: Vec<String>) -> Self {
        Self {
            program,
            args,
            timeout: Duration::from_secs(60),
            memory_bytes: 2 << 30,
        }
    }

    /// This executable, run as `EXE extract-file PATH`.
    pub fn this_executable() -> std::io::Result<Self> {
        Ok(Self::new(
            std::env::current_exe()?,
            vec!["extract-file".into()],
        ))
    }
}

/// What the child writes on its standard output.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Documents(Vec<Document>),
    Skipped(String),
}

/// The child's side: extract `path` and return the reply to print on
/// standard output.
pub fn child_main(path: &Path) -> String {
    let reply = match extract(path) {
        Ok(d) => Reply::Documents(d),
        Err(ExtractError::Skipped { reason, .. }) => Reply::Skipped(reason),
    };
    serde_json::to_string(&reply)
        .unwrap_or_else(|_| r#"{"skipped":"the extractor could not encode its reply"}"#.into())
}

fn skip(path: &Path, reason: impl Into<String>) -> ExtractError {
    ExtractError::Skipped {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The documents in `path`, read as `how` says.
pub fn extract_isolated(path: &Path, how: &Isolation) -> Result<Vec<Document>, ExtractError> {
    match how {
        Isolation::InProcess => extract(path),
        Isolation::Child(limits) => in_child(path, limits),
    }
}

/// Largest reply read from a child (its text is at most a few times the
/// file, which is at most `MAX_FILE_BYTES`).
const MAX_REPLY_BYTES: u64 = 512 << 20;

fn in_child(path: &Path, limits: &ChildLimits) -> Result<Vec<Document>, ExtractError> {
    let mut cmd = Command::new(&limits.program);
    cmd.args(&limits.args)
        .arg(path)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let memory = limits.memory_bytes;
        let cpu = limits.timeout.as_secs().max(1) + 1;
        // Its own process group, so a kill reaches anything it started.
        cmd.process_group(0);
        // SAFETY: only async-signal-safe calls (setrlimit) run between fork
        // and exec.
        unsafe {
            cmd.pre_exec(move || {
                let set = |what, n: u64| {
                    let l = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(what, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                };
                set(libc::RLIMIT_AS, memory)?;
                set(libc::RLIMIT_CPU, cpu)?;
                set(libc::RLIMIT_CORE, 0)
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| {
        skip(
            path,
            format!(
                "could not start the extractor {}: {e}",
                limits.program.display()
            ),
        )
    })?;
    let Some(stdout) = child.stdout.take() else {
        kill_all(&mut child);
        return Err(skip(path, "the extractor has no output"));
    };
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        stdout
            .take(MAX_REPLY_BYTES)
            .read_to_end(&mut out)
            .map(|_| out)
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if started.elapsed() >= limits.timeout => {
                kill_all(&mut child);
                break Err(format!(
                    "reading it took longer than {} s; stopped",
                    limits.timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                kill_all(&mut child);
                break Err(format!("waiting for the extractor: {e}"));
            }
        }
    };
    let out = reader.join();
    let status = status.map_err(|r| skip(path, r))?;
    if !status.success() {
        return Err(skip(path, failure(status, limits)));
    }
    let out = match out {
        Ok(Ok(o)) => o,
        _ => return Err(skip(path, "reading the extractor's output failed")),
    };
    match serde_json::from_slice::<Reply>(&out) {
        Ok(Reply::Documents(d)) => Ok(d),
        Ok(Reply::Skipped(reason)) => Err(skip(path, reason)),
        Err(e) => Err(skip(
            path,
            format!("the extractor's output is not a reply: {e}"),
        )),
    }
}

/// Kill the child and its process group, and reap it.
fn kill_all(child: &mut std::process::Child) {
    #[cfg(unix)]
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: a plain syscall on the group the child leads.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn failure(status: std::process::ExitStatus, limits: &ChildLimits) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return match sig {
                libc::SIGXCPU => format!(
                    "reading it used more than {} s of CPU; stopped",
                    limits.timeout.as_secs()
                ),
                _ => format!(
                    "the file crashed the extractor (signal {sig}); it is malformed or hostile"
                ),
            };
        }
    }
    let _ = limits;
    match status.code() {
        // A Rust abort after a failed allocation or a stack overflow.
        Some(134) => {
            "the file crashed the extractor (out of memory or stack); it is malformed or hostile"
                .into()
        }
        Some(c) => format!("the extractor failed (exit status {c})"),
        None => "the extractor failed".into(),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A stand-in extractor: `sh -c SCRIPT` (the file's path is `$1`).
    fn sh(script: &str, timeout_ms: u64) -> Isolation {
        let mut l = ChildLimits::new(
            "/bin/sh".into(),
            vec!["-c".into(), script.into(), "sh".into()],
        );
        l.timeout = Duration::from_millis(timeout_ms);
        Isolation::Child(l)
    }

    fn reason(r: Result<Vec<Document>, ExtractError>) -> String {
        match r {
            Err(ExtractError::Skipped { reason, .. }) => reason,
            Ok(d) => panic!("extracted {d:?}"),
        }
    }

    #[test]
    fn a_child_that_crashes_or_hangs_costs_only_its_file() {
        let p = Path::new("/tmp/x.pdf");
        let crashed = reason(extract_isolated(p, &sh("kill -SEGV $$", 10_000)));
        assert!(crashed.contains("crashed"), "{crashed}");
        let started = Instant::now();
        let hung = reason(extract_isolated(p, &sh("sleep 30", 300)));
        assert!(hung.contains("longer than"), "{hung}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let failed = reason(extract_isolated(p, &sh("exit 3", 10_000)));
        assert!(failed.contains("exit status 3"), "{failed}");
        let garbage = reason(extract_isolated(p, &sh("echo not json", 10_000)));
        assert!(garbage.contains("not a reply"), "{garbage}");
    }

    #[test]
    fn the_child_gets_the_path_no_environment_and_a_memory_limit() {
        std::env::set_var("HANLIN_TEST_SECRET", "s3cret");
        let script = r#"printf '{"documents":[{"title":"%s","source":"%s","text":"%s","published":null}]}' "$1" "${HANLIN_TEST_SECRET:-none}" "$(ulimit -v)""#;
        let docs =
            extract_isolated(Path::new("/tmp/a b.pdf"), &sh(script, 10_000)).expect("documents");
        assert_eq!(docs[0].title, "/tmp/a b.pdf");
        assert_eq!(docs[0].source, "none", "the environment reached the child");
        // `ulimit -v` is in KiB.
        assert_eq!(docs[0].text, ((2u64 << 30) / 1024).to_string());
        let skipped = reason(extract_isolated(
            Path::new("/tmp/a.pdf"),
            &sh(r#"echo '{"skipped":"no text in it"}'"#, 10_000),
        ));
        assert_eq!(skipped, "no text in it");
    }
}
