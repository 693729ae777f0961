#!/usr/bin/env python3
"""What `zoo quantize` costs and gains on one model directory, in one run: size on disk, peak and
resident memory, logits error against f32, greedy-ids agreement and decoding speed.

    python3 bench/quantize.py --model DIR [--zoo target/release/zoo] [--rounds 3] [--markdown]

For each of f32, int8, int8 --embeddings, NF4, NF4 --embeddings: `zoo quantize` writes the
directory; `zoo forward` runs a fixed 32-token prompt (logits compared with f32's: max |Δ| and
that over max |logit|); `zoo generate --greedy` continues an 8-token prompt by --new-tokens
(its ids compared with f32's position by position; tokens/s as zoo reports it, median of
--rounds; resident memory as zoo reports it with the model loaded and after generating; peak
resident from /usr/bin/time). Needs numpy and safetensors (pip) to read the logits.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file

VARIANTS = [
    ("f32", None, False),
    ("int8", 8, False),
    ("int8 + embeddings", 8, True),
    ("nf4", 4, False),
    ("nf4 + embeddings", 4, True),
]


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return done


def dir_mb(path):
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return total / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--zoo", default="target/release/zoo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    config = json.load(open(os.path.join(args.model, "config.json")))
    vocab = config["vocab_size"]
    rng = np.random.default_rng(0)
    forward_ids = ",".join(str(i) for i in rng.integers(0, vocab, 32))
    prompt_ids = ",".join(str(i) for i in rng.integers(0, vocab, 8))
    work = tempfile.mkdtemp(prefix="zoo-quantize-bench-")
    rows = []
    reference = None
    try:
        for name, bits, embeddings in VARIANTS:
            model = args.model
            if bits is not None:
                model = os.path.join(work, name.replace(" + ", "-"))
                cmd = [args.zoo, "quantize", "--from", args.model, "--out", model, "--bits", str(bits)]
                run(cmd + (["--embeddings"] if embeddings else []))
            weights = [f for f in os.listdir(model) if f.endswith(".safetensors")]
            size = sum(os.path.getsize(os.path.join(model, f)) for f in weights) / 1e6
            out = os.path.join(work, "logits.safetensors")
            run([args.zoo, "forward", "--model", model, "--ids", forward_ids, "--out", out])
            logits = load_file(out)["logits"]
            speeds, steady, after, peak, ids = [], [], [], [], None
            for _ in range(args.rounds):
                done = run(["/usr/bin/time", "-f", "PEAK %M", args.zoo, "generate", "--model", model,
                            "--prompt-ids", prompt_ids, "--max-new-tokens", str(args.new_tokens),
                            "--greedy", "--ids"])
                ids = json.loads(done.stdout.strip().splitlines()[-1])["generated"][0]
                speeds.append(float(re.search(r"\(([\d.]+) tokens/s", done.stderr).group(1)))
                steady.append(float(re.search(r"([\d.]+) MB resident with the model", done.stderr).group(1)))
                after.append(float(re.search(r"([\d.]+) MB after", done.stderr).group(1)))
                peak.append(int(re.search(r"PEAK (\d+)", done.stderr).group(1)) / 1000)
            if reference is None:
                reference = (logits, ids, statistics.median(speeds))
            diff = float(np.abs(logits - reference[0]).max())
            scale = float(np.abs(reference[0]).max())
            agree = sum(a == b for a, b in zip(ids, reference[1])) / len(reference[1])
            rows.append((name, size, statistics.median(peak), statistics.median(steady),
                         statistics.median(after), diff,
                         diff / scale, agree, statistics.median(speeds),
                         statistics.median(speeds) / reference[2]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = ["weights", "tensors MB", "peak RSS MB", "loaded RSS MB", "after RSS MB", "max abs Δlogit",
              "÷ max abs logit", "greedy ids = f32", "tokens/s", "vs f32"]
    fmt = lambda r: [r[0], f"{r[1]:.1f}", f"{r[2]:.0f}", f"{r[3]:.0f}", f"{r[4]:.0f}", f"{r[5]:.3g}",
                     f"{r[6]:.2%}", f"{r[7]:.0%}", f"{r[8]:.1f}", f"{r[9]:.2f}×"]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(fmt(r)) + " |")
    else:
        for r in rows:
            print("  ".join(f"{h}={v}" for h, v in zip(header, fmt(r))))


if __name__ == "__main__":
    main()
