#!/usr/bin/env bash
# One device run on a GPU machine (issue 14), from binaries that scripts/gpu-pack.sh made
# elsewhere: the CUDA environment, the GPU smoke tests (transformers parity of a CUDA training
# step, NCCL; bounded), then scripts/gpu-bench.sh, then scripts/gpu-nccl.sh (two GPUs or more). Everything lands in OUT (default $OUT, else
# /tmp/zoo-gpu-run), the bench folder as bench.tgz.
#
#   scripts/gpu-run.sh [DIR] [OUT]    # DIR: gpu-pack.sh's folder (default .gpu-pack)
#   SMOKE_S=150 BENCH_S=380: the smoke tests' and the benchmark's bounds in seconds
set -uo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.gpu-pack}"
out="${2:-${OUT:-/tmp/zoo-gpu-run}}"
mkdir -p "$out" /tmp/zoo-bin
exec > >(tee "$out/gpu-run.log") 2>&1
start_s=$(date +%s)
since() { echo "$(($(date +%s) - start_s)) s"; }
for name in zoo integration; do
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$dir/$name.xz" "/tmp/zoo-bin/$name" && chmod +x "/tmp/zoo-bin/$name"
done
echo "== $(date -u), binaries of commit $(cat "$dir/commit" 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ls -d /usr/local/cuda* 2>&1
ldd /tmp/zoo-bin/zoo | grep 'not found'

echo "== smoke ($(since))"
(
    source scripts/gpu-env.sh
    export CUBECL_DEBUG_LOG="$out/cubecl-smoke.log"
    timeout --kill-after=5 "${SMOKE_S:-150}" /tmp/zoo-bin/integration --ignored --nocapture \
        --test-threads 1 gpu_smoke
    echo "smoke exit $?"
) >"$out/smoke.log" 2>&1
grep -E 'GPU SMOKE|gpu smoke|test result|panicked|exit|^test ' "$out/smoke.log"
# The compilation log's size says how much cubecl compiled before the bound.
ls -la "$out/cubecl-smoke.log" 2>/dev/null && xz -f -T2 "$out/cubecl-smoke.log"

echo "== bench ($(since))"
ZOO_BENCH_SECONDS="${BENCH_S:-380}" bash scripts/gpu-bench.sh /tmp/zoo-bin/zoo "$out/bench"
tar -czf "$out/bench.tgz" -C "$out" bench && rm -rf "$out/bench"

echo "== nccl ($(since))"
bash scripts/gpu-nccl.sh /tmp/zoo-bin/zoo "$out/nccl" 2>&1 | tail -20
echo "== done ($(since))"
