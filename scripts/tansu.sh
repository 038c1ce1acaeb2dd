#!/usr/bin/env bash
# Installs the tansu Kafka-compatible broker (crates.io, version pinned) that
# the Kafka integration tests start on loopback, unless it is already in the
# cache, and prints the binary's path. A cold install compiles for about
# 20 minutes on 2 cores; the binary is cached under
# ${DIMA_CACHE_DIR:-~/.cache/dima}/tools/tansu-$VERSION, its build directory is
# removed afterwards (about 1.4 GB).
#
# Features: `libsql` gives the sqlite:// storage the tests use (its memory://
# storage was seen to lose records when a consumer resumes mid-batch).
set -euo pipefail
VERSION=0.6.0
root="${DIMA_CACHE_DIR:-$HOME/.cache/dima}/tools/tansu-$VERSION"
bin="$root/bin/tansu"
if [ ! -x "$bin" ]; then
  echo "== installing tansu $VERSION into $root (cached; first time ~20 min)" >&2
  build="$(mktemp -d)"
  trap 'rm -rf "$build"' EXIT
  CARGO_TARGET_DIR="$build" cargo install --locked --quiet \
    --root "$root" tansu --version "$VERSION" --features dynostore,libsql >&2
fi
echo "$bin"
