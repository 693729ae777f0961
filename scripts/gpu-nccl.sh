#!/usr/bin/env bash
# Multi-GPU NCCL check (issue 14, item 4), for a machine with two or more NVIDIA GPUs: two ranks
# train the tiny GPT on the shipped corpus (ZeRO-3, bf16, checkpointing) twice, from the same seed:
#   in-place      NCCL on the tensors' GPU buffers, communication overlapping computation (default)
#   through-host  every collective staged through host memory (ZOO_NCCL_THROUGH_HOST=1)
# and compares their losses (the same NCCL reductions of the same values, so they should agree
# to the last bits or nearly) and their median tokens/s. With fewer than two GPUs it says so and
# exits 0.
#
#   scripts/gpu-nccl.sh [PATH/TO/zoo built with --features cuda] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
zoo="${1:-target/release/zoo}"
out="${2:-/tmp/zoo-gpu-nccl}"
mkdir -p "$out"
source scripts/gpu-env.sh

gpus=$( (nvidia-smi --list-gpus 2>/dev/null || true) | grep -c '^GPU' || true)
if (( gpus < 2 )); then
    echo "gpu-nccl: ${gpus} GPU(s) visible; two NCCL ranks need two: skipped"
    exit 0
fi

for mode in in-place through-host; do
    echo "== 2 ranks, NCCL $mode"
    through_host=0
    [[ "$mode" == through-host ]] && through_host=1
    rm -rf "${out:?}/$mode"
    ZOO_NCCL_THROUGH_HOST=$through_host timeout 240 "$zoo" launch --nproc-per-node 2 -- \
        "$zoo" pretrain --device cuda --steps 40 --seq 64 --batch 16 --dtype bf16 --zero-stage 3 \
        --checkpointing --log-every 1 --eval-every 0 --save-every 0 --sample-tokens 0 --no-progress \
        --out "$out/$mode"
done

python3 - "$out/in-place/metrics.jsonl" "$out/through-host/metrics.jsonl" <<'PY'
import json, statistics, sys

def steps(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if "loss" in r and "step" in r]

in_place, staged = steps(sys.argv[1]), steps(sys.argv[2])
if len(in_place) != len(staged) or not in_place:
    sys.exit(f"gpu-nccl: {len(in_place)} logged steps in place, {len(staged)} through the host")
diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(in_place, staged))
# The first steps include NVRTC compilation and autotuning.
speed = lambda rows: statistics.median(r["tokens_per_s"] for r in rows[5:])
print(f"gpu-nccl: {len(in_place)} steps, largest loss difference {diff:.3g}; "
      f"median tokens/s in place {speed(in_place):.0f}, through the host {speed(staged):.0f} "
      f"(×{speed(in_place) / speed(staged):.2f})")
if diff > 1e-2:
    sys.exit("gpu-nccl: the two paths' losses differ by more than 1e-2")
PY
