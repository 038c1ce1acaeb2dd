#!/usr/bin/env bash
# Dima's whole test suite, exactly as CI runs it (.ci/run calls this script):
# formatting, lints, then unit, doc and end-to-end tests. The end-to-end tests
# start real `dima` processes, so the binary is built first, in the same
# profile as the tests (dev: our crates at opt-level 1, dependencies at 3).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build the dima binary the end-to-end tests run"
cargo build --locked -p cluster --bin dima

echo "== tests"
cargo test --workspace --locked
