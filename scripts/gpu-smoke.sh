#!/usr/bin/env bash
# GPU smoke checks for zoo's CUDA path: a 1-rank NCCL communicator, a CUDA training step of the
# tiny GPT-2 fixture against transformers' loss and gradients, and ZeRO-3 training on CUDA through
# NCCL. Run from the repository root on a machine with an NVIDIA GPU.
#
#   scripts/gpu-smoke.sh              # builds the test binary with --features cuda, then runs it
#   scripts/gpu-smoke.sh PATH/TO/BIN  # runs an integration-test binary built elsewhere
#
# CUDA, NVRTC and NCCL are loaded at run time (cudarc's dynamic loading). NCCL from pip
# (nvidia-nccl-cu*) lives in site-packages; its lib folder is added to LD_LIBRARY_PATH when found.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:-}"
if [[ -z "$bin" ]]; then
    bin=$(cargo test --release -p zoo-tests --features cuda --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "integration" and m.get("executable"):
        print(m["executable"])' | tail -1)
fi

source scripts/gpu-env.sh

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "test binary: $bin"
# cubecl's compilation and autotune log: each kernel as NVRTC compiles it, so a run that stalls
# says whether it is still compiling, and on what.
export CUBECL_DEBUG_LOG="${CUBECL_DEBUG_LOG:-/tmp/zoo-gpu-smoke-cubecl.log}"
echo "cubecl log: $CUBECL_DEBUG_LOG"
"$bin" --ignored --nocapture --test-threads 1 gpu_smoke
