#!/usr/bin/env bash
# One prepared GPU run (issue 14): zoo against PyTorch on the same card, in one go, from a `zoo`
# built elsewhere with `--features cuda` (no Rust and no CUDA toolkit needed here).
#
#   scripts/gpu-bench.sh [ZOO] [OUT_DIR]        # on a GPU machine
#   ZOO_BENCH_CPU=1 scripts/gpu-bench.sh [ZOO]  # the same pipeline on the CPU, tiny shapes: checks
#                                               # the script's parts on a machine without a GPU
#
# 1. CUDA's run-time pieces: NVRTC (cubecl compiles its kernels with it at run time, against
#    $CUDA_PATH/include), the runtime and CCCL headers, and NCCL. Whatever the system lacks comes
#    from PyPI's nvidia-* wheels for the CUDA major version the driver supports, merged under one
#    CUDA_PATH ($OUT/cuda); wheels already installed (torch brings most) are used as they are.
# 2. `zoo env --device cuda --json`: what the rank resolves to and what was found.
# 3. Benchmarks, after warm-up (NVRTC compilation and autotuning happen in the warm-up steps;
#    `zoo bench` prints each step's seconds on stderr, into runs/NAME.log), in this order:
#    - a probe: GPT-2, one row of 64 tokens, f32, with cubecl's compilation and autotune log;
#    - GPT-2 124M, bf16, pretraining steps at 8 × 1024 tokens;
#    - BERT-Large (340M), seq 512, f16, fine-tuning steps with block checkpointing under
#      --gpu-mem-limit 11GB, at half the largest batch `zoo memory` promises for an 11 GB card,
#      then at that batch;
#    - PyTorch on the same shapes and dtypes (transformers, torch.optim.AdamW, sdpa attention,
#      autocast; bench/torch_reference.py), no memory limit, no checkpointing.
#    Each zoo run but the last gets at most half of what is left of $ZOO_BENCH_SECONDS (480: the
#    whole script stays within 8 minutes; the probe 150 s), and a run that fails or runs out of
#    time is recorded as such, not fatal. cubecl's own settings pass through (for instance
#    CUBECL_AUTOTUNE_LEVEL=minimal: fewer candidates tried on first use).
# 4. $OUT/gpu-bench.json and $OUT/gpu-bench.md: tokens/s, MFU (the run's matrix FLOPs — 6 · N ·
#    tokens plus attention's — over the card's dense bf16/f16 peak, which the table names), the
#    allocator's peak, and zoo ÷ PyTorch.
set -uo pipefail
cd "$(dirname "$0")/.."
zoo="$(realpath "${1:-target/release/zoo}")"
out="${2:-/tmp/zoo-gpu-bench}"
cpu_check="${ZOO_BENCH_CPU:-0}"
budget_s="${ZOO_BENCH_SECONDS:-480}"
start_s=$(date +%s)
mkdir -p "$out/runs"
[[ -x "$zoo" ]] || { echo "gpu-bench: no zoo binary at $zoo (build it with --features cuda)" >&2; exit 2; }

left() { echo $((budget_s - ($(date +%s) - start_s))); }

# --- 1. CUDA libraries and headers -------------------------------------------------------------
cuda_setup() {
    local major
    major=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -1)
    major="${major:-12}"
    # Wheel names: -cuNN suffixes up to CUDA 12; from 13 on NVIDIA names them without one.
    local suffix="-cu$major" version=""
    if ((major >= 13)); then suffix="" version="==$major.*"; fi
    # Each piece is looked for in the system's CUDA and in the nvidia-* wheels (CUDA 13's wheels
    # put theirs under nvidia/cu13/); pip is asked only for what neither has, and gives up at once
    # on a machine with no network.
    roots_now() { # the system's CUDA, then every installed nvidia-* wheel's folder
        roots=(/usr/local/cuda $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, d) for p in nvidia.__path__ for d in sorted(os.listdir(p))))' 2>/dev/null))
    }
    local roots
    roots_now
    found() { # found GLOB: some root holds GLOB
        local root
        for root in "${roots[@]}"; do compgen -G "$root/$1" >/dev/null && return 0; done
        return 1
    }
    local missing=()
    found 'lib*/libnvrtc.so*' || missing+=("nvidia-cuda-nvrtc$suffix$version")
    found 'include/cuda_runtime.h' || missing+=("nvidia-cuda-runtime$suffix$version")
    found 'include/cuda/std/*' || found 'include/cccl/cuda/std/*' ||
        missing+=("nvidia-cuda-cccl$suffix$version")
    found 'lib*/libnccl.so*' || missing+=("nvidia-nccl-cu$major")
    if ((${#missing[@]})); then
        echo "== pip install ${missing[*]}"
        python3 -m pip install --quiet --disable-pip-version-check --retries 0 --timeout 15 \
            "${missing[@]}" ||
            echo "gpu-bench: pip could not install ${missing[*]}; using what the system has" >&2
        roots_now
    fi
    # One CUDA_PATH: every wheel's include/ and lib/ linked side by side, system CUDA first.
    export CUDA_PATH="$out/cuda"
    mkdir -p "$CUDA_PATH/include" "$CUDA_PATH/lib64"
    for root in "${roots[@]}"; do
        [[ -d "$root/include" ]] && cp -rsn "$root/include/." "$CUDA_PATH/include/" 2>/dev/null
        for lib in "$root/lib" "$root/lib64"; do
            [[ -d "$lib" ]] && cp -rsn "$lib/." "$CUDA_PATH/lib64/" 2>/dev/null
        done
    done
    # cudarc opens the unversioned names; wheels ship only the versioned ones.
    for versioned in "$CUDA_PATH"/lib64/lib{nvrtc,nccl,cudart}.so.*; do
        [[ -e "$versioned" ]] || continue
        local plain="${versioned%%.so.*}.so"
        [[ -e "$plain" ]] || ln -s "$versioned" "$plain"
    done
    export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
    export CUDA_HOME="$CUDA_PATH"
}

# --- 3. one benchmark run, bounded by the time left ---------------------------------------------
# run NAME COMMAND...: the command's last JSON line goes to runs/NAME.json, its output to
# runs/NAME.log; a failure or a timeout is recorded in the JSON instead.
run() {
    local name=$1
    shift
    local limit
    limit=$(left)
    # RUN_CAP=S bounds one run below what is left, so that one slow case leaves time to the rest.
    if [[ -n "${RUN_CAP:-}" ]] && ((RUN_CAP < limit)); then limit=$RUN_CAP; fi
    if ((limit < 20)); then
        echo "{\"name\":\"$name\",\"error\":\"not run: the time budget was spent\"}" >"$out/runs/$name.json"
        echo "== $name: skipped (time budget spent)"
        return
    fi
    echo "== $name ($limit s left): $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/runs/$name.log" 2>&1
    local rc=$?
    local json
    json=$(grep '^{' "$out/runs/$name.log" | tail -1)
    if ((rc == 0)) && [[ -n "$json" ]]; then
        python3 -c 'import json, sys; r = json.loads(sys.argv[1]); r["name"] = sys.argv[2]; print(json.dumps(r))' \
            "$json" "$name" >"$out/runs/$name.json"
    else
        local why
        why=$( ((rc == 124 || rc == 137)) && echo "timed out" || tail -3 "$out/runs/$name.log" | tr '"\\\n' "'/ ")
        echo "{\"name\":\"$name\",\"error\":\"exit $rc: ${why}\"}" >"$out/runs/$name.json"
        echo "   failed (exit $rc): see $out/runs/$name.log"
    fi
}

if [[ "$cpu_check" == 1 ]]; then
    device=cpu
    bert=(bert-base 32) gpt=(2 32) dtype_bert=f32 dtype_gpt=f32 limit=() iters=(--warmup 1 --iters 2)
else
    cuda_setup
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    device=cuda
    bert=(bert-large 512) gpt=(8 1024) dtype_bert=f16 dtype_gpt=bf16 limit=(--gpu-mem-limit 11GB)
    iters=(--warmup 2 --iters 5)
fi

# --- 2. zoo env -----------------------------------------------------------------------------------
echo "== zoo env"
"$zoo" env --device "$device" | tee "$out/env.txt"
"$zoo" env --device "$device" --json >"$out/env.json"

# The largest BERT-Large batch `zoo memory` promises on an 11 GB card (the classifier, f16,
# checkpointing), and half of it.
cat >"$out/bert-large.json" <<'JSON'
{"architectures": ["BertForSequenceClassification"], "model_type": "bert", "vocab_size": 30522,
 "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
 "intermediate_size": 4096, "max_position_embeddings": 512, "type_vocab_size": 2,
 "num_labels": 2}
JSON
if [[ "$cpu_check" == 1 ]]; then
    full=4
else
    full=$("$zoo" memory --model "$out/bert-large.json" --seq 512 --dtype f16 --checkpointing \
        --gpu-mem 11GB --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["max_batch"] or 1)')
fi
half=$(((full + 1) / 2))
echo "== zoo memory: BERT-Large seq 512 f16 on 11 GB: largest batch $full, half $half"

torch=(python3 bench/torch_reference.py --device "$device" --json "${iters[@]}")
python3 -c 'import torch, transformers' 2>/dev/null || torch=()
[[ ${#torch[@]} -gt 0 ]] || echo "gpu-bench: torch/transformers not importable: PyTorch runs skipped" >&2

# First a small run (GPT-2, one row of 64 tokens, f32), on a GPU with cubecl's compilation and
# autotune log (runs/cubecl-probe.log): it tells a CUDA path that is slow to warm up (kernels are
# compiled by NVRTC and autotuned on first use) from one that does not run, and fills the autotune
# cache the later runs read (target/ beside Cargo.toml). Then GPT-2 (and again with burn's composed
# attention), then BERT-Large at half the batch and at the full one, each zoo run bounded by half
# of what is left (the composed-attention run by a third).
if [[ "$cpu_check" != 1 ]]; then
    CUBECL_DEBUG_LOG="$out/runs/cubecl-probe.log" RUN_CAP=150 run zoo-probe-gpt2-1x64 "$zoo" bench \
        --model gpt2 --mode train --batch 1 --seq 64 --dtype f32 --device cuda --warmup 1 --iters 2 \
        --json
fi
RUN_CAP=$(($(left) / 2)) run "zoo-gpt2-${gpt[0]}x${gpt[1]}" "$zoo" bench --model gpt2 --mode train \
    --batch "${gpt[0]}" --seq "${gpt[1]}" --dtype "$dtype_gpt" --device "$device" "${iters[@]}" --json
if [[ ${#torch[@]} -gt 0 ]]; then
    run "torch-gpt2-${gpt[0]}x${gpt[1]}" "${torch[@]}" --model gpt2 --mode train \
        --batch "${gpt[0]}" --seq "${gpt[1]}" --dtype "$dtype_gpt"
fi
# The same GPT-2 run with burn's composed attention in place of zoo's flash kernels (every zoo
# kernel but flash_attention): what the flash kernels cost or save in time and memory.
RUN_CAP=$(($(left) / 3)) run "zoo-gpt2-${gpt[0]}x${gpt[1]}-composed-attention" \
    env ZOO_KERNELS=-flash_attention \
    "$zoo" bench --model gpt2 --mode train \
    --batch "${gpt[0]}" --seq "${gpt[1]}" --dtype "$dtype_gpt" --device "$device" "${iters[@]}" --json
batches=("$half")
((full != half)) && batches+=("$full")
for batch in "${batches[@]}"; do
    # The last zoo run may take all that is left.
    cap=$(($(left) / 2))
    [[ "$batch" == "${batches[-1]}" ]] && cap=
    RUN_CAP=$cap run "zoo-${bert[0]}-b$batch" "$zoo" bench --model "${bert[0]}" --mode train \
        --batch "$batch" --seq "${bert[1]}" --dtype "$dtype_bert" --checkpointing --device "$device" "${limit[@]}" \
        "${iters[@]}" --json
    if [[ ${#torch[@]} -gt 0 ]]; then
        run "torch-${bert[0]}-b$batch" "${torch[@]}" --model "${bert[0]}" --mode train \
            --batch "$batch" --seq "${bert[1]}" --dtype "$dtype_bert"
    fi
done

# --- 4. the table -----------------------------------------------------------------------------------
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
python3 scripts/gpu_bench_table.py --runs "$out/runs" --env "$out/env.json" \
    --gpu "${gpu_name:-cpu}" --out "$out/gpu-bench"
echo "== $(($(date +%s) - start_s)) s; wrote $out/gpu-bench.json and $out/gpu-bench.md"
cat "$out/gpu-bench.md"
# The CPU check (CI) fails when any run did.
if [[ "$cpu_check" == 1 ]] && grep -l '"error"' "$out"/runs/*.json; then
    echo "gpu-bench: the runs above failed" >&2
    exit 1
fi
