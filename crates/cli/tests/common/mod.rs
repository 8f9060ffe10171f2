//! What the `hanlin` binary's tests share.

use std::process::{Command, Output};

/// Run the `hanlin` binary with `args`, as a user would.
pub fn hanlin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hanlin"))
        .args(args)
        .output()
        .expect("run hanlin")
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
