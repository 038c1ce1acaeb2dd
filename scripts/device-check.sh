#!/usr/bin/env bash
# The GPU checks of the CUDA issue, as one prepared run for a lent GPU
# machine (no Rust toolchain and no network there). Build the binary here
# and carry it:
#
#   cargo build --release -p cluster --bin dima --features cuda
#   # then, on the GPU machine, from the repository root:
#   DIMA=target/release/dima scripts/device-check.sh
#
# It prints what it runs and its results, one JSON line per check, and
# finishes within 8 minutes (each step has its own timeout). What is not
# built yet is listed as pending, so a reader sees exactly what ran.
set -uo pipefail
cd "$(dirname "$0")/.."
dima="${DIMA:-target/release/dima}"
status=0

step() {
  local limit=$1 name=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc"
  if [ "$rc" -ne 0 ]; then status=1; fi
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
"$dima" --version 2>&1 || true

step 60 "dima gpu info" "$dima" gpu info
step 180 "CUDA kernels against the CPU ops (dima gpu check)" "$dima" gpu check

for pending in \
  "greedy parity GPU vs CPU on gemma3-270m (needs the CUDA model forward pass)" \
  "27B random-bf16 decode at batch 1 and 16 against the bandwidth roofline" \
  "Hugging Face transformers anchor on the same card"; do
  echo "== pending: $pending"
done
exit "$status"
