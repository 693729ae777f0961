#!/usr/bin/env python3
"""Checks `zoo memory` against measured peaks on CPU.

For each shape, runs `zoo pretrain --report-memory` (two steps of a GPT from a config.json on the
shipped corpus; the measured training peak is the peak resident set of the steps minus the resident
set before the model was built) and `zoo memory --json` for the same setup, and prints both and the
relative error (with thread ranks, the process holds every rank's share: ranks × the per-rank
estimate). Shapes differ from the ones the constants were fitted on (see zoo-cli/src/memory.rs).

    python3 bench/memory_check.py [path/to/zoo]
"""
import json, subprocess, sys, tempfile, re, os, statistics

ZOO = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target", "release", "zoo")

# (n_embd, n_head, n_layer, seq, batch, checkpointing, ranks)
SHAPES = [
    (96, 4, 6, 128, 8, False, 1),
    (96, 4, 6, 128, 8, True, 1),
    (192, 6, 3, 256, 4, False, 1),
    (192, 6, 3, 256, 4, True, 1),
    (128, 8, 4, 96, 16, True, 1),
    (320, 5, 2, 64, 8, False, 1),
    (128, 4, 4, 128, 8, False, 2),
]

def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (h, a, l, t, b, ck, ranks) in enumerate(SHAPES):
            cfg = os.path.join(tmp, "config.json")
            json.dump({"model_type": "gpt2", "vocab_size": 257, "n_positions": max(t, 128),
                       "n_embd": h, "n_layer": l, "n_head": a}, open(cfg, "w"))
            common = ["--seq", str(t), "--batch", str(b), "--ranks", str(ranks)] + (["--checkpointing"] if ck else [])
            run = subprocess.run([ZOO, "pretrain", "--model", cfg, "--out", os.path.join(tmp, f"run{i}"), "--steps", "2",
                                  "--sample-tokens", "0", "--eval-every", "0", "--eval-batches", "1", "--save-every", "0",
                                  "--no-progress", "--report-memory"] + common, capture_output=True, text=True)
            m = re.search(r"MEASURED_TRAINING_PEAK_BYTES=(\d+)", run.stdout)
            if not m:
                sys.exit(run.stdout + run.stderr)
            measured = int(m.group(1))
            est = json.loads(subprocess.run([ZOO, "memory", "--model", cfg, "--json", "--mem", "100GB"] + common,
                                            capture_output=True, text=True, check=True).stdout)
            # Thread ranks share one process: it holds every rank's share.
            predicted = est["peak_bytes"] * ranks
            err = predicted / measured - 1
            rows.append(err)
            print(f"H={h:<4} heads={a:<2} L={l} T={t:<4} B={b:<3} ckpt={str(ck):<5} ranks={ranks}: "
                  f"measured {measured/1e6:7.1f} MB, estimated {predicted/1e6:7.1f} MB, error {err:+.0%}", flush=True)
    print(f"median absolute error {statistics.median(abs(e) for e in rows):.0%}, worst {max(rows, key=abs):+.0%}")

if __name__ == "__main__":
    main()
