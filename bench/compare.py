#!/usr/bin/env python3
"""Runs `zoo bench` and bench/torch_reference.py back to back, alternating, and prints the table.

    python3 bench/compare.py [--zoo target/release/zoo] [--python /path/to/python-with-torch]
                             [--rounds 3] [--iters 3] [--warmup 2] [--cases bert-train,gpt2-train,...]
                             [--markdown]

Each round runs every case once in zoo and once in PyTorch (2 threads, as the machine has 2 cores),
each a median of --iters timed runs after --warmup untimed ones; the table reports the median over
rounds. Training steps run in zoo as one data-parallel thread rank per core (`zoo bench --ranks N`,
what `zoo finetune/pretrain --ranks N` do: the same global batch, split between the ranks) and, in the
`-1rank` cases, as one rank using every core; PyTorch runs one process with N threads in both.
"ratio" is zoo's throughput over PyTorch's (above 1: zoo is faster). GFLOP/s count the matrix
products (see zoo-cli/src/bench.rs); the machine's peak is cores × clock × 64 f32 FLOPs per cycle
(two AVX-512 FMA units × 16 lanes × 2 FLOPs per fused multiply-add), with the clock read from /proc/cpuinfo ("cpu MHz").
"""
import argparse, json, os, statistics, subprocess, sys

# case: (model, mode, batch, seq, zoo ranks: "cores" or 1)
CASES = {
    "bert-forward": ("bert-base", "forward", 8, 128, 1),
    "bert-train": ("bert-base", "train", 8, 128, "cores"),
    "bert-train-1rank": ("bert-base", "train", 8, 128, 1),
    "gpt2-forward": ("gpt2", "forward", 4, 256, 1),
    "gpt2-train": ("gpt2", "train", 4, 256, "cores"),
    "gpt2-train-1rank": ("gpt2", "train", 4, 256, 1),
    "gpt2-generate": ("gpt2", "generate", 1, 8, 1),
    "llama-forward": ("llama", "forward", 4, 256, 1),
    "llama-train": ("llama", "train", 4, 256, "cores"),
    "llama-train-1rank": ("llama", "train", 4, 256, 1),
    "llama-generate": ("llama", "generate", 1, 8, 1),
    # LoRA r 8 on the default targets (query/value), every other weight frozen (peft in PyTorch).
    "bert-lora-train": ("bert-base", "train", 8, 128, "cores", ["--lora-r", "8"]),
    "llama-lora-train": ("llama", "train", 4, 256, "cores", ["--lora-r", "8"]),
}


def peak_gflops():
    mhz = [float(l.split(":")[1]) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")]
    return len(mhz) * (sum(mhz) / len(mhz)) / 1e3 * 64, len(mhz), sum(mhz) / len(mhz)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser()
    p.add_argument("--zoo", default=os.path.join(here, "..", "target", "release", "zoo"))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    peak, cores, mhz = peak_gflops()
    results = {c: {"zoo": [], "torch": []} for c in a.cases.split(",")}
    for r in range(a.rounds):
        for case in results:
            model, mode, batch, seq, ranks, *extra = CASES[case]
            common = ["--model", model, "--mode", mode, "--batch", str(batch), "--seq", str(seq),
                      "--iters", str(a.iters), "--warmup", str(a.warmup),
                      "--new-tokens", str(a.new_tokens), "--json"] + (extra[0] if extra else [])
            zoo_ranks = cores if ranks == "cores" else ranks
            for engine in ("zoo", "torch"):
                cmd = ([a.zoo, "bench", "--ranks", str(zoo_ranks)] + common if engine == "zoo"
                       else [a.python, os.path.join(here, "torch_reference.py"), "--threads", str(cores)] + common)
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{' '.join(cmd)}\n{out.stdout}{out.stderr}")
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                results[case][engine].append(rec)
                print(f"round {r + 1} {case} {engine}: {rec['median_ms']:.1f} ms", file=sys.stderr, flush=True)
    head = ("case", "shape", "zoo ranks", "zoo ms", "torch ms", "zoo tok/s", "torch tok/s", "ratio", "zoo GFLOP/s (% peak)", "torch GFLOP/s (% peak)")
    rows = []
    for case, r in results.items():
        model, mode, batch, seq, ranks, *_ = CASES[case]
        med = lambda e, k: statistics.median(x[k] for x in r[e])
        zms, tms = med("zoo", "median_ms"), med("torch", "median_ms")
        shape = f"{batch}×{seq}" + (f" +{a.new_tokens}" if mode == "generate" else "")
        rows.append((case, shape, str(r["zoo"][0].get("ranks", 1)), f"{zms:.0f}", f"{tms:.0f}", f"{med('zoo', 'tokens_per_s'):.1f}",
                     f"{med('torch', 'tokens_per_s'):.1f}", f"{tms / zms:.2f}×",
                     f"{med('zoo', 'gflops'):.1f} ({med('zoo', 'gflops') / peak:.0%})",
                     f"{med('torch', 'gflops'):.1f} ({med('torch', 'gflops') / peak:.0%})"))
    torch_version = results[next(iter(results))]["torch"][0].get("torch", "?")
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        for row in [head] + rows:
            print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    print(f"\n{a.rounds} rounds × {a.iters} timed runs after {a.warmup} warm-ups; torch {torch_version}, {cores} threads; "
          f"peak {peak:.0f} GFLOP/s = {cores} cores × {mhz:.0f} MHz × 64 FLOP/cycle")


if __name__ == "__main__":
    main()
