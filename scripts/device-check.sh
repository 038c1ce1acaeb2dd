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
# finishes within 8 minutes when steps are quick (each has its own
# timeout, 9 minutes at worst). The benchmark uses 12B by default (the
# issue allows it when 27B does not fit the time); DIMA_PRESET=gemma3-27b
# runs 27B.
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

source scripts/device-env.sh

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
"$dima" --version 2>&1 || true

step 30 "dima gpu info" "$dima" gpu info
step 60 "CUDA kernels against the CPU ops (dima gpu check)" "$dima" gpu check

step 60 "GPU vs CPU on gemma3-270m shapes, random bf16 weights (dima gpu parity)" \
  "$dima" gpu parity --model gemma3-270m --random-weights --steps 16
preset="${DIMA_PRESET:-gemma3-12b}"
step 200 "decode, $preset random bf16 weights, batch 1 and 16, against the bandwidth roofline" \
  "$dima" bench decode --backend cuda --model "$preset" --random-weights --weight-type bf16 \
  --batch 16 --prompt-tokens 64 --steps 32
step 150 "Hugging Face transformers anchor, same preset and batches (eager)" \
  python3 scripts/bench/hf_decode.py --preset "${preset#gemma3-}" --batch 1,16 --prompt-tokens 64 --steps 32
if "$dima" models inspect gemma3-270m >/dev/null 2>&1; then
  step 90 "GPU vs CPU on the real gemma3-270m (dima gpu parity)" "$dima" gpu parity --model gemma3-270m --steps 32
  step 90 "greedy text on the real gemma3-270m, CPU and GPU (dima generate)" \
    python3 scripts/device-generate.py "$dima" gemma3-270m 32
  step 120 "serving the real gemma3-270m from the GPU (dima bench serve --backend cuda)" \
    "$dima" bench serve --backend cuda --model gemma3-270m --streams 1,4,16 --requests 2 --max-tokens 32
else
  echo "== skipped: the real gemma3-270m file is not on this machine (too large to carry)"
fi
step 60 "one decode step's matrix products, $preset shapes, cuBLAS and gemv_bf16 (dima gpu gemm)" \
  "$dima" gpu gemm --model "$preset"
exit "$status"
