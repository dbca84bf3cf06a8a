//! Helpers for saida's end-to-end tests: finding the workspace's built binaries.
//!
//! The tests run the real `saida` and tool binaries as separate processes. They are built by
//! `cargo build --workspace --bins`, which `scripts/test.sh` runs before `cargo test`.

use std::path::PathBuf;

/// Path of the workspace binary `name`, built in the same profile as this test.
///
/// Panics with the command to run when the binary has not been built: a missing binary is a
/// broken test setup, never a reason to pass.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile> directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}
