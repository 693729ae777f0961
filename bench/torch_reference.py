#!/usr/bin/env python3
"""PyTorch's side of `zoo bench`: the same models, shapes and steps, with torch on the CPU or a GPU.

    python3 bench/torch_reference.py --model bert-base|bert-large|gpt2|llama --mode forward|train|generate \
        --batch B --seq S [--iters N] [--warmup W] [--new-tokens T] [--threads 2] \
        [--device cpu|cuda] [--dtype f32|f16|bf16] [--json]

`--dtype f16|bf16` is mixed precision as zoo's: f32 weights and AdamW state, the forward and
backward under `torch.autocast` in that dtype, and (f16, on a GPU) dynamic loss scaling with
`torch.amp.GradScaler`. On a GPU every timed run ends with `torch.cuda.synchronize()`, and the
record gains the allocator's peak (`peak_allocated_bytes`, `peak_reserved_bytes`) and the card's name.
bert-large is BertForSequenceClassification(BertConfig(hidden_size=1024, 24 layers, 16 heads,
intermediate 4096, num_labels=2)).

Models are transformers' BertForSequenceClassification(BertConfig(num_labels=2)) and
GPT2LMHeadModel(GPT2Config()) and a Llama-shaped LlamaForCausalLM (width 768, 12 blocks, 12 heads over 4
kv heads, SwiGLU 2048, vocabulary 32000, as `zoo bench --model llama`) with random weights, fp32, default
attention (sdpa). A training step is
forward, backward and torch.optim.AdamW, in train mode (dropout 0.1 as in zoo); forward runs in eval
mode under no_grad; generate is greedy `generate` with the KV cache and no early stop. The timed
figure is the median of --iters runs after --warmup runs; FLOPs are counted as `zoo bench` counts
them. Needs torch and transformers (tests/fixtures/generate.py's environment).
"""
import argparse, contextlib, json, statistics, time

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def flops(model, mode, batch, seq, new_tokens):
    if model == "bert-base":
        layers, width, attention, mlp, head = 12, 768, 4 * 768 * 768, 2 * 768 * 3072, 0
    elif model == "bert-large":
        layers, width, attention, mlp, head = 24, 1024, 4 * 1024 * 1024, 2 * 1024 * 4096, 0
    elif model == "gpt2":
        layers, width, attention, mlp, head = 12, 768, 4 * 768 * 768, 2 * 768 * 3072, 50257
    else:
        layers, width, attention, mlp, head = 12, 768, 2 * 768 * 768 + 2 * 768 * 256, 3 * 768 * 2048, 32000
    linear = layers * (attention + mlp) + width * head
    per_token = lambda context: 2 * linear + 4 * layers * context * width
    if mode == "forward":
        return batch * seq * per_token(seq)
    if mode == "train":
        return 3 * batch * seq * per_token(seq)
    return batch * seq * per_token(seq) + sum(batch * per_token(seq + 1 + i) for i in range(new_tokens - 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["bert-base", "bert-large", "gpt2", "llama"], required=True)
    p.add_argument("--mode", choices=["forward", "train", "generate"], required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=0,
                   help="train LoRA (peft, its default targets, alpha 2r) on a frozen model (train)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32",
                   help="compute dtype (mixed precision: f32 weights and optimizer state)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    if a.model == "bert-base":
        model = BertForSequenceClassification(BertConfig(num_labels=2))
        vocab = 30522
    elif a.model == "bert-large":
        model = BertForSequenceClassification(BertConfig(hidden_size=1024, num_hidden_layers=24,
                                                         num_attention_heads=16, intermediate_size=4096,
                                                         num_labels=2))
        vocab = 30522
    elif a.model == "gpt2":
        model = GPT2LMHeadModel(GPT2Config())
        vocab = 50257
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                             num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                             max_position_embeddings=2048))
        vocab = 32000
    ids = torch.randint(0, vocab, (a.batch, a.seq))
    model, ids = model.to(device), ids.to(device)
    compute = DTYPES[a.dtype]
    # Mixed precision as zoo's (f32 master weights): autocast for the compute dtype.
    autocast = (lambda: torch.autocast(device.type, dtype=compute)) if a.dtype != "f32" \
        else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=gpu and a.dtype == "f16")

    if a.mode == "train":
        if a.lora_r:
            import peft
            task = "SEQ_CLS" if a.model == "bert-base" else "CAUSAL_LM"
            model = peft.get_peft_model(model, peft.LoraConfig(task_type=task, r=a.lora_r,
                                                               lora_alpha=2 * a.lora_r))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        labels = torch.randint(0, 2, (a.batch,), device=device) if a.model.startswith("bert") else ids

        def run():
            with autocast():
                loss = model(input_ids=ids, labels=labels).loss
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    elif a.mode == "forward":
        model.eval()

        def run():
            with torch.no_grad(), autocast():
                model(input_ids=ids).logits.sum().item()
    else:
        model.eval()
        mask = torch.ones_like(ids)

        def run():
            with torch.no_grad(), autocast():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                               min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(a.warmup):
        run()
    sync()
    if gpu:
        # The peak of the timed runs (warm-up's autotuning and caching excluded).
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(a.iters):
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    tokens = a.batch * (a.new_tokens if a.mode == "generate" else a.seq)
    record = {
        "engine": "torch", "torch": torch.__version__, "model": a.model.replace("-", ""), "mode": a.mode,
        "batch": a.batch, "seq": a.seq, "iters": a.iters, "median_ms": median * 1e3,
        "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "times_ms": [t * 1e3 for t in times],
        "tokens_per_s": tokens / median, "gflops": flops(a.model, a.mode, a.batch, a.seq, a.new_tokens) / median / 1e9,
        "threads": a.threads, "device": str(device), "dtype": a.dtype,
    }
    if gpu:
        record["card"] = torch.cuda.get_device_name(device)
        record["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    if a.json:
        print(json.dumps(record))
    else:
        print(f"torch {a.model} {a.mode} ({a.device}, {a.dtype}), {a.batch} × {a.seq}: median {median*1e3:.1f} ms, "
              f"{record['tokens_per_s']:.1f} tokens/s, {record['gflops']:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
