"""PEFT's view of a zoo QLoRA adapter (GPT-2): transformers' model with every block projection
replaced by its NF4 round trip through bitsandbytes' codes (`quantize_4bit`, blocks of 64), the
adapter a `zoo finetune --lora-r R --quantize-base 4` checkpoint wrote loaded with
`peft.PeftModel.from_pretrained`, and its logits against `zoo forward --model Q4 --adapter CKPT
--text "The cat sat on the mat" --out ZOO.safetensors` (Q4 = `zoo quantize --bits 4` of the base).

    python3 bench/peft_qlora.py BASE CKPT ZOO.safetensors

Needs torch, transformers, peft and bitsandbytes (`pip install --no-deps bitsandbytes`).
"""
import sys, torch, transformers, peft, bitsandbytes.functional as F
from safetensors.torch import load_file
base, adapter, zoo_out = sys.argv[1:4]
model = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
count = 0
for block in model.transformer.h:
    for layer in [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]:
        w = layer.weight.data.t().contiguous()  # Conv1D stores [in, out]; bnb quantizes nn.Linear's [out, in]
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        # Decoded from bnb's codes by its definition (NF4 table × block absmax, high nibble
        # first): this machine's CPU dequantize_4bit (no `kernels` package) decodes otherwise.
        table = F.get_4bit_type("nf4", device="cpu")
        b = q.flatten()
        idx = torch.stack([(b >> 4).long(), (b & 15).long()], 1).flatten()
        layer.weight.data = (table[idx].reshape(-1, 64) * state.absmax[:, None]).reshape(w.shape).t().contiguous()
        count += 1
model = peft.PeftModel.from_pretrained(model, adapter).eval()
tok = transformers.AutoTokenizer.from_pretrained(base)
ids = tok("The cat sat on the mat", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits[0]
zoo = load_file(zoo_out)["logits"].reshape(logits.shape)
print(f"{count} layers NF4; max |logits| {logits.abs().max():.3f}; max |zoo - peft| {(zoo - logits).abs().max():.2e}")
