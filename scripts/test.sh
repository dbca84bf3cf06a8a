#!/usr/bin/env bash
# Runs every test of saida, exactly as CI does (.ci/run calls this script and nothing else).
# Tests use real files, real processes and a real tmpfs mount, so they run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo is required (Rust 1.85 or newer)" >&2
    exit 1
fi

# The end-to-end tests in tests/ run the built binaries, so build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked --no-fail-fast
