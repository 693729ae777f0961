#!/usr/bin/env python3
"""The table of scripts/gpu-bench.sh: its runs' JSON records (runs/zoo-NAME.json beside
runs/torch-NAME.json, from `zoo bench --json` and bench/torch_reference.py --json) as one JSON
file and one Markdown table, with MFU against the card's dense peak and zoo ÷ PyTorch.

    python3 scripts/gpu_bench_table.py --runs DIR --env env.json --gpu "NVIDIA H100 80GB HBM3" --out PREFIX

MFU is the run's achieved matrix FLOP/s (both engines count them alike: per token 2 · the linear
and head weights plus 4 · layers · seq · width for attention, three times that for a training
step) over the card's dense bf16/f16 tensor peak, from the table below (`--peak-tflops` overrides
it; an unknown card gets no MFU). Standard library only.
"""
import argparse, datetime, json, os

# Dense (no sparsity) bf16/f16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets.
PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0), ("H100", 756.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0),
    ("T4", 65.0),
]


def peak_of(card, override):
    if override:
        return override
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in card.lower():
            return tflops
    return None


def load(runs):
    records = {}
    for file in sorted(os.listdir(runs)):
        if file.endswith(".json"):
            with open(os.path.join(runs, file)) as f:
                record = json.load(f)
            records[record.get("name", file[:-5])] = record
    return records


def gb(value):
    return f"{value / 1e9:.2f}" if isinstance(value, (int, float)) else "–"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True)
    p.add_argument("--env", required=True)
    p.add_argument("--gpu", default="unknown")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--out", required=True, help="writes PREFIX.json and PREFIX.md")
    a = p.parse_args()
    records = load(a.runs)
    with open(a.env) as f:
        env = json.load(f)
    peak = peak_of(a.gpu, a.peak_tflops)
    rows = []
    for name, zoo in records.items():
        if not name.startswith("zoo-"):
            continue
        case = name[len("zoo-"):]
        torch = records.get("torch-" + case)
        row = {"case": case, "zoo": zoo, "torch": torch}
        for engine in ("zoo", "torch"):
            r = row[engine]
            if r and "gflops" in r and peak:
                r["mfu"] = r["gflops"] / (peak * 1e3)
        if torch and "tokens_per_s" in zoo and "tokens_per_s" in torch:
            row["zoo_over_torch"] = zoo["tokens_per_s"] / torch["tokens_per_s"]
        rows.append(row)

    result = {"date": datetime.date.today().isoformat(), "card": a.gpu, "peak_tflops": peak,
              "env": env, "rows": rows}
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)

    lines = [f"GPU benchmark, {result['date']}, {a.gpu} (dense bf16/f16 peak: "
             f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown'}), zoo {env.get('version', '?')}, "
             f"device {env.get('device', '?')}", "",
             "| case | dtype | zoo tokens/s | zoo MFU | zoo GPU peak in use / reserved (GB) "
             "| PyTorch tokens/s | PyTorch MFU | PyTorch peak allocated / reserved (GB) | zoo ÷ PyTorch |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cells(r, zoo):
        if not r:
            return ["not run", "–", "–"]
        if "error" in r:
            return [f"failed: {r['error'][:80]}", "–", "–"]
        mfu = f"{r['mfu'] * 100:.1f}%" if "mfu" in r else "–"
        memory = (f"{gb(r.get('gpu_mem_in_use_peak'))} / {gb(r.get('gpu_mem_reserved_peak'))}" if zoo
                  else f"{gb(r.get('peak_allocated_bytes'))} / {gb(r.get('peak_reserved_bytes'))}")
        return [f"{r['tokens_per_s']:.0f}", mfu, memory]

    for row in rows:
        ratio = f"{row['zoo_over_torch']:.2f}" if "zoo_over_torch" in row else "–"
        dtype = row["zoo"].get("dtype") or (row["torch"] or {}).get("dtype", "?")
        zoo_cells, torch_cells = cells(row["zoo"], True), cells(row["torch"], False)
        lines.append(f"| {row['case']} | {dtype} | {zoo_cells[0]} | {zoo_cells[1]} | {zoo_cells[2]} | "
                     f"{torch_cells[0]} | {torch_cells[1]} | {torch_cells[2]} | {ratio} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
