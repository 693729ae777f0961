#!/usr/bin/env bash
# GPU checks of the training jobs: `zoo pretrain` and `zoo finetune` on CUDA, and GPT-2 (124M) with
# bf16 + checkpointing, whose GPU memory (sampled with nvidia-smi) is printed beside `zoo memory`'s
# estimate. Run from the repository root on a machine with an NVIDIA GPU.
#
#   scripts/gpu-train.sh [PATH/TO/zoo built with --features cuda] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
zoo="${1:-target/release/zoo}"
out="${2:-/tmp/zoo-gpu-train}"
mkdir -p "$out"
source scripts/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== tiny GPT on the shipped corpus, cuda:0"
"$zoo" pretrain --device cuda:0 --steps 60 --seq 64 --batch 16 --eval-every 30 --sample-tokens 60 \
    --no-progress --out "$out/tiny"

echo "== tiny BERT fine-tuned on cuda:0"
python3 - "$out/train.tsv" <<'PY'
import random, sys
r = random.Random(0)
words = "the and token model from is world to com la do wor".split()
with open(sys.argv[1], "w") as f:
    f.write("sentence\tlabel\n")
    for _ in range(256):
        ws = [r.choice(words) for _ in range(r.randint(3, 8))]
        label = r.randint(0, 1)
        if label:
            ws.insert(r.randint(0, len(ws)), "hello")
        f.write(" ".join(ws) + "\t" + str(label) + "\n")
PY
"$zoo" finetune --device cuda:0 --model tests/fixtures/bert --train "$out/train.tsv" --valid "$out/train.tsv" \
    --num-labels 2 --lr 1e-3 --epochs 3 --no-progress --out "$out/finetune"

echo "== GPT-2 124M, 8 × 512 tokens, bf16, checkpointing: measured GPU memory vs zoo memory"
"$zoo" memory --model gpt2 --seq 512 --batch 8 --dtype bf16 --checkpointing --gpu-mem 80GB
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/gpu-mem.csv" &
sampler=$!
"$zoo" pretrain --model gpt2 --device cuda:0 --seq 512 --batch 8 --steps 6 --log-every 1 --eval-every 0 \
    --eval-batches 1 --save-every 0 --sample-tokens 0 --dtype bf16 --checkpointing --no-progress \
    --out "$out/gpt2"
kill $sampler
python3 - "$out/gpu-mem.csv" <<'PY'
import sys
values = [int(l) for l in open(sys.argv[1]) if l.strip().isdigit()]
print(f"GPU memory used: baseline {values[0]} MiB, peak {max(values)} MiB "
      f"({(max(values) - values[0]) * 2**20 / 1e9:.3f} GB above the baseline)")
PY
