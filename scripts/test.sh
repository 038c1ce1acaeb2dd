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

echo "== the CUDA backend compiles (feature cuda; cudarc loads CUDA at run time, none needed here)"
cargo clippy --workspace --all-targets --locked --features cluster/cuda -- -D warnings

echo "== build the dima binary the end-to-end tests run"
cargo build --locked -p cluster --bin dima

echo "== model files the tests read (cached in \${DIMA_CACHE_DIR:-~/.cache/dima}/models)"
cargo run --locked -q -p cluster --bin dima -- models fetch gemma3-270m

echo "== the Kafka broker the integration tests start (cached in \${DIMA_CACHE_DIR:-~/.cache/dima}/tools)"
DIMA_TANSU="$(scripts/tansu.sh)"
export DIMA_TANSU

echo "== reference outputs CI regenerates from the real packages (cached venv in \${DIMA_CACHE_DIR:-~/.cache/dima}/venv-ref)"
venv="${DIMA_CACHE_DIR:-$HOME/.cache/dima}/venv-ref"
if ! "$venv/bin/python" -c 'import linkedin.learner, scipy, sklearn, vowpalwabbit' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q 'lambda-learner==0.1.0' 'scipy<1.18' 'numpy<3' scikit-learn 'vowpalwabbit==9.11.9'
fi
# The anchors of `dima bench learner` (tests/learner.rs runs it once, small).
export DIMA_REF_PYTHON="$venv/bin/python"
OPENBLAS_NUM_THREADS=1 "$venv/bin/python" scripts/reference/lambda_learner_reference.py
"$venv/bin/python" scripts/reference/assignment_reference.py

echo "== the official OpenAI client the API tests drive (cached venv in \${DIMA_CACHE_DIR:-~/.cache/dima}/venv-api)"
api="${DIMA_CACHE_DIR:-$HOME/.cache/dima}/venv-api"
if ! "$api/bin/python" -c 'import openai, jsonschema, lm_eval' 2>/dev/null; then
  python3 -m venv "$api"
  "$api/bin/python" -m pip install -q 'openai>=1.40,<4' 'jsonschema>=4,<5' 'lm-eval[api]==0.4.13'
fi
export DIMA_API_PYTHON="$api/bin/python"

echo "== Confluent's Kafka client, the independent producer and consumer of the Kafka tests (cached venv in \${DIMA_CACHE_DIR:-~/.cache/dima}/venv-kafka)"
kafka="${DIMA_CACHE_DIR:-$HOME/.cache/dima}/venv-kafka"
if ! "$kafka/bin/python" -c 'import confluent_kafka' 2>/dev/null; then
  python3 -m venv "$kafka"
  "$kafka/bin/python" -m pip install -q 'confluent-kafka>=2.5,<3'
fi
export DIMA_KAFKA_PYTHON="$kafka/bin/python"

echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
# The CUDA backend's CPU-side tests (kernel sources, no-GPU errors), with
# NVRTC from PyPI so the kernels are compiled to PTX (no GPU needed).
nvrtc="${DIMA_CACHE_DIR:-$HOME/.cache/dima}/tools/nvrtc-12.8.93"
if [ ! -f "$nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
  rm -rf "$nvrtc.tmp" && mkdir -p "$nvrtc.tmp"
  python3 -m pip download -q --no-deps 'nvidia-cuda-nvrtc-cu12==12.8.93' -d "$nvrtc.tmp"
  python3 -m zipfile -e "$nvrtc.tmp"/nvidia_cuda_nvrtc_cu12-*.whl "$nvrtc.tmp/x"
  rm -rf "$nvrtc" && mv "$nvrtc.tmp/x" "$nvrtc" && rm -rf "$nvrtc.tmp"
fi
LD_LIBRARY_PATH="$nvrtc/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" DIMA_REQUIRE_NVRTC=1 \
  cargo test --locked -p kernels --features cuda --lib -- cuda:: nccl 2>&1 | tee -a "$log" || status=$?
# One closing line over every test binary and the doc tests.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
