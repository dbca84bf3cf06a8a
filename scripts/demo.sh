#!/usr/bin/env bash
# The main job on embedded defaults: today, the spool demo (append, commit, kill -9, recover,
# check every acknowledged message). Extra arguments go to `saida demo` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p saida
exec ./target/release/saida demo "$@"
