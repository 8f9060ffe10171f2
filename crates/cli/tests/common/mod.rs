#![allow(dead_code)] // each test binary uses a different part of this module
//! What the `hanlin` binary's tests share.

use std::process::{Command, Output};

/// Run the `hanlin` binary with `args`, as a user would.
pub fn hanlin(args: &[&str]) -> Output {
    hanlin_env(args, &[])
}

/// [`hanlin`] with environment variables set.
pub fn hanlin_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hanlin"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run hanlin")
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The address `hanlin serve` prints on its console (`http://ADDR/…`); the
/// rest of its output is read and dropped, so the server never blocks on
/// a full pipe.
pub fn serving_address(stdout: std::process::ChildStdout) -> String {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = lines
        .find_map(|l| {
            let l = l.ok()?;
            let rest = l.split_once("http://")?.1;
            Some(rest.split('/').next()?.to_string())
        })
        .expect("the server's address on its console");
    std::thread::spawn(move || for _ in lines {});
    addr
}
