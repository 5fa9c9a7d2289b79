//! Skipping a test that needs something this machine lacks (Mosquitto, node, a tmpfs,
//! systemd-analyze).
//!
//! Under CI (`CI` set) a skip is a failure: CI installs everything, so `cargo test` there
//! skips nothing. Elsewhere the test returns early and says so in the normal `cargo test`
//! output: the line is written to the process's standard error directly, which the test
//! harness does not capture (it captures only `print!` and `eprint!`), so it shows without
//! `--nocapture`, next to the test's `ok`.

use std::io::Write;
use std::path::PathBuf;

/// Fail under CI; elsewhere print `SKIPPED <test>: <reason>` where `cargo test` shows it.
pub(crate) fn skip(test: &str, reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {reason} (required in CI, where nothing is skipped)");
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {test}: {reason} (not run; with CI=true this is a failure)"
    );
}

/// `name` found on PATH; `None` means "skip `test`" (see [`skip`]), `install` says where the
/// tool comes from.
pub(crate) fn tool_on_path(test: &str, name: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        skip(test, &format!("{name} is not on PATH ({install})"));
    }
    found
}
