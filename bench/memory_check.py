#!/usr/bin/env python3
"""Checks `zoo memory` against measured peaks on CPU, and refits its constants.

Each case is a real training run: `zoo pretrain` of a GPT from a config.json on the shipped corpus,
or `zoo finetune` of a random BERT classifier (a directory written here with transformers, whose
vocabulary size is the case's and whose tokenizer is the test fixture's), two optimizer steps
with `--report-memory`. The measured peak is the peak resident set of the training steps minus the
resident set before the model was built; the estimate is `zoo memory --json`'s `process_bytes`
for the same setup (thread ranks share one process: every rank's share).

The cases come in two sets: "fit" (what the constants in zoo-cli/src/memory.rs were fitted on,
with `--fit`) and "report" (other shapes, sizes, rank counts and checkpointing choices, never
fitted on). The table of the report set goes in the README.

    python3 bench/memory_check.py [--zoo target/release/zoo] [--set report|fit|all] [--fit]
                                  [--markdown] [--only gpt,bert,t5,mlm]

`--fit` runs the fit set and prints least-squares constants for the feature model below (which
mirrors `estimate` in zoo-cli/src/memory.rs). Needs torch + transformers for the BERT cases.
"""
import argparse, json, os, re, shutil, statistics, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "bert_cls")

# (set, family, width, heads, blocks, seq, batch, checkpointing, ranks, vocab[, FFN width / width])
CASES = [
    ("fit", "gpt", 96, 4, 6, 128, 8, False, 1, 257),
    ("fit", "gpt", 96, 4, 6, 128, 8, True, 1, 257),
    ("fit", "gpt", 192, 6, 3, 256, 4, False, 1, 257),
    ("fit", "gpt", 192, 6, 3, 256, 4, True, 1, 257),
    ("fit", "gpt", 384, 6, 6, 64, 4, False, 1, 8192),
    ("fit", "gpt", 384, 6, 6, 64, 4, True, 2, 8192),
    ("fit", "gpt", 256, 4, 8, 256, 8, True, 1, 257),
    ("fit", "gpt", 512, 8, 4, 128, 4, False, 2, 257),
    ("fit", "gpt", 768, 12, 6, 64, 2, True, 1, 50257),
    ("fit", "bert", 256, 4, 4, 128, 8, False, 1, 8000),
    ("fit", "bert", 256, 4, 4, 128, 8, True, 1, 8000),
    ("fit", "bert", 512, 8, 6, 256, 4, True, 2, 30522),
    ("fit", "bert", 384, 6, 4, 64, 16, False, 1, 30522),
    ("fit", "gpt", 256, 4, 6, 128, 8, False, 1, 257, 1),
    ("fit", "gpt", 256, 4, 6, 128, 8, True, 1, 257, 8),
    ("fit", "bert", 256, 4, 6, 128, 8, False, 1, 8000, 8),
    ("fit", "gpt", 128, 4, 4, 512, 4, False, 1, 257),
    ("report", "gpt", 128, 8, 4, 96, 16, True, 1, 257),
    ("report", "gpt", 320, 5, 2, 64, 8, False, 1, 257),
    ("report", "gpt", 128, 4, 4, 128, 8, False, 2, 257),
    ("report", "gpt", 256, 8, 6, 192, 8, False, 1, 257),
    ("report", "gpt", 256, 8, 6, 192, 8, True, 4, 257),
    ("report", "gpt", 512, 8, 8, 128, 4, True, 1, 16384),
    ("report", "gpt", 640, 10, 4, 256, 2, False, 1, 257),
    ("report", "gpt", 768, 12, 12, 64, 2, False, 1, 50257),
    ("report", "gpt", 768, 12, 12, 128, 4, True, 2, 50257),
    ("report", "bert", 128, 4, 6, 256, 8, False, 1, 8000),
    ("report", "bert", 320, 5, 4, 128, 8, True, 4, 8000),
    ("report", "bert", 512, 8, 8, 128, 8, False, 1, 30522),
    ("report", "bert", 768, 12, 12, 128, 4, True, 1, 30522),
    ("report", "bert", 768, 12, 4, 512, 2, True, 2, 30522),
    ("report", "gpt", 384, 6, 4, 128, 8, False, 1, 257, 2),
    ("report", "bert", 384, 6, 4, 256, 4, False, 2, 8000, 2),
    # Objectives added later: T5 span corruption (blocks = encoder and decoder layers each; never
    # fitted on) and BERT masked LM (its head's constant fitted on the two fit cases), both
    # pretrained on the shipped corpus.
    ("report", "t5", 256, 4, 4, 128, 8, False, 1, 320),
    ("report", "t5", 256, 4, 4, 128, 8, True, 1, 320),
    ("report", "t5", 512, 8, 6, 256, 4, True, 2, 32128),
    ("fit", "mlm", 512, 8, 6, 256, 4, True, 1, 30522),
    ("fit", "mlm", 384, 6, 4, 128, 8, False, 2, 8000),
    ("report", "mlm", 256, 4, 4, 128, 8, False, 1, 320),
    ("report", "mlm", 768, 12, 4, 128, 8, True, 1, 30522),
    ("report", "mlm", 256, 4, 6, 256, 8, False, 2, 16000),
]


def gpt_case(tmp, i, h, a, l, t, v, ffn):
    cfg = os.path.join(tmp, f"gpt{i}.json")
    json.dump({"model_type": "gpt2", "vocab_size": v, "n_positions": max(t, 128), "n_embd": h,
               "n_layer": l, "n_head": a, "n_inner": ffn * h}, open(cfg, "w"))
    return cfg


def t5_case(tmp, i, h, a, l, t, v, ffn):
    cfg = os.path.join(tmp, f"t5{i}.json")
    json.dump({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": v,
               "d_model": h, "d_kv": h // a, "d_ff": ffn * h, "num_layers": l, "num_decoder_layers": l,
               "num_heads": a, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
               "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 256}, open(cfg, "w"))
    return cfg


def mlm_case(tmp, i, h, a, l, t, v, ffn):
    cfg = os.path.join(tmp, f"mlm{i}.json")
    json.dump({"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": v,
               "hidden_size": h, "num_hidden_layers": l, "num_attention_heads": a,
               "intermediate_size": ffn * h, "max_position_embeddings": max(t, 128)}, open(cfg, "w"))
    return cfg


def bert_case(tmp, i, h, a, l, t, v, ffn):
    """A random BertForSequenceClassification directory with the fixture's tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    out = os.path.join(tmp, f"bert{i}")
    config = BertConfig(vocab_size=v, hidden_size=h, num_hidden_layers=l, num_attention_heads=a,
                        intermediate_size=ffn * h, max_position_embeddings=max(t, 128), num_labels=2)
    BertForSequenceClassification(config).save_pretrained(out)
    for name in ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]:
        shutil.copy(os.path.join(FIXTURE, name), out)
    return out


def examples(tmp, rows, seq):
    """TSV rows long enough to fill --max-seq (every batch is batch × seq tokens)."""
    words = [w for w in open(os.path.join(FIXTURE, "vocab.txt")).read().split() if w.isalpha()]
    path = os.path.join(tmp, f"train{rows}x{seq}.tsv")
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for r in range(rows):
            f.write(" ".join(words[(r * 7 + k) % len(words)] for k in range(seq + 8)) + f"\t{r % 2}\n")
    return path


def run_case(zoo, tmp, i, case):
    _, family, h, a, l, t, b, ck, ranks, v, ffn = (tuple(case) + (4,))[:11]
    common = ["--batch", str(b), "--ranks", str(ranks)] + (["--checkpointing"] if ck else [])
    if family in ("gpt", "t5", "mlm"):
        model = {"gpt": gpt_case, "t5": t5_case, "mlm": mlm_case}[family](tmp, i, h, a, l, t, v, ffn)
        cmd = [zoo, "pretrain", "--model", model, "--seq", str(t), "--steps", "2", "--sample-tokens", "0",
               "--eval-every", "0", "--eval-batches", "1", "--save-every", "0"]
    else:
        model = bert_case(tmp, i, h, a, l, t, v, ffn)
        cmd = [zoo, "finetune", "--model", model, "--train", examples(tmp, 2 * b, t), "--num-labels", "2",
               "--max-seq", str(t), "--epochs", "1"]
    run = subprocess.run(cmd + common + ["--out", os.path.join(tmp, f"run{i}"), "--no-progress",
                                         "--report-memory"], capture_output=True, text=True)
    m = re.search(r"MEASURED_TRAINING_PEAK_BYTES=(\d+)", run.stdout)
    if not m:
        sys.exit(" ".join(cmd) + "\n" + run.stdout + run.stderr)
    est = json.loads(subprocess.run([zoo, "memory", "--model", model, "--seq", str(t), "--json", "--mem", "100GB"]
                                    + common, capture_output=True, text=True, check=True).stdout)
    shutil.rmtree(os.path.join(tmp, f"run{i}"), ignore_errors=True)
    return int(m.group(1)), est


def features(est):
    """The terms of zoo memory's CPU model whose constants are fitted, for the whole process."""
    f = est["features"]
    return [f["state"], f["kept"], f["working"], f["act_width"], f["act_ffn"], f["act_scores"],
            f["saved_inputs"], f["head_logits"], f["ranks"]]


NAMES = ["state", "kept", "working", "c_width", "c_ffn", "c_scores", "saved", "c_logits", "per_rank"]


def least_squares(rows, targets):
    """Non-negative least squares of the relative error (rows and targets divided by the target)
    by projected coordinate descent (small, dependency-free). The first feature, the sharded
    state, is exact (every byte of it is resident) and keeps its multiplier 1."""
    rows = [[f / y for f in r] for r, y in zip(rows, targets)]
    targets = [1.0 - r[0] for r in rows]
    rows = [r[1:] for r in rows]
    return [1.0] + _nnls(rows, targets)


def _nnls(rows, targets):
    n = len(rows[0])
    x = [0.0] * n
    scale = [max(1e-9, max(abs(r[j]) for r in rows)) for j in range(n)]
    a = [[r[j] / scale[j] for j in range(n)] for r in rows]
    for _ in range(20000):
        for j in range(n):
            num = sum((targets[k] - sum(a[k][i] * x[i] for i in range(n) if i != j)) * a[k][j] for k in range(len(a)))
            den = sum(a[k][j] ** 2 for k in range(len(a)))
            x[j] = max(0.0, num / den) if den else 0.0
    return [x[j] / scale[j] for j in range(n)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--zoo", default=os.path.join(ROOT, "target", "release", "zoo"))
    p.add_argument("--set", choices=["report", "fit", "all"], default="report")
    p.add_argument("--fit", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--only", help="comma-separated families to run (gpt, bert, t5, mlm)")
    args = p.parse_args()
    chosen = [c for c in CASES if args.set == "all" or c[0] == args.set or (args.fit and c[0] == "fit")]
    if args.only:
        chosen = [c for c in chosen if c[1] in args.only.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(chosen):
            measured, est = run_case(args.zoo, tmp, i, case)
            predicted = est["process_bytes"]
            err = predicted / measured - 1
            results.append((case, measured, predicted, err, est))
            s, family, h, a, l, t, b, ck, ranks, v, ffn = (tuple(case) + (4,))[:11]
            print(f"[{s}] {family} H={h} F={ffn}H heads={a} L={l} T={t} B={b} V={v} ckpt={ck} ranks={ranks}: "
                  f"measured {measured / 1e6:.1f} MB, estimated {predicted / 1e6:.1f} MB, error {err:+.0%}",
                  flush=True)
    for which in ["fit", "report"]:
        errs = [r[3] for r in results if r[0][0] == which]
        if errs:
            print(f"{which} set: {len(errs)} cases, median absolute error {statistics.median(abs(e) for e in errs):.1%}, "
                  f"worst {max(errs, key=abs):+.1%}")
    if args.fit:
        fit = [r for r in results if r[0][0] == "fit"]
        coefficients = least_squares([features(r[4]) for r in fit], [r[1] for r in fit])
        print("fitted multipliers of the current constants:",
              ", ".join(f"{n} {c:.3f}" for n, c in zip(NAMES, coefficients)))
    if args.markdown:
        print("\n| set | model | width, FFN, heads, blocks | seq × batch | vocab | checkpointing | ranks | measured | estimated | error |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for case, measured, predicted, err, _ in results:
            s, family, h, a, l, t, b, ck, ranks, v, ffn = (tuple(case) + (4,))[:11]
            kind = {"gpt": "GPT (pretrain)", "t5": "T5 span corruption (pretrain)",
                    "mlm": "BERT masked LM (pretrain)"}.get(family, "BERT classifier (finetune)")
            print(f"| {s} | {kind} | {h}, {ffn * h}, {a}, {l} | "
                  f"{t} × {b} | {v} | {'yes' if ck else 'no'} | {ranks} | {measured / 1e6:.1f} MB | "
                  f"{predicted / 1e6:.1f} MB | {err:+.0%} |")


if __name__ == "__main__":
    main()
