#!/usr/bin/env python3
"""Reference logits for Flotilla's Hugging Face GPT-2 export, made with real PyTorch.

Implements: a GPT-2 forward in plain PyTorch, line for line the way transformers'
GPT2LMHeadModel (eager attention, inference: dropout off) computes it, reading the model
the way from_pretrained does: a safetensors file (parsed by hand here: struct + json +
torch.frombuffer, since Debian has no `safetensors` or `transformers` package) and its
config.json. Owns: test/fixtures/gpt2-tiny.logits.json. Does not own: the inputs, written
by tools/refs/gpt2_fixture.ts.

Regenerate (Debian's PyTorch; PyPI is not needed):
    apt-get install -y python3-torch python3-numpy
    export PATH=/work/main/.tools/node_modules/.bin:$PATH
    node tools/refs/gpt2_fixture.ts                 # writes gpt2-tiny.safetensors + .config.json
    /usr/bin/python3 tools/refs/gpt2_ref.py         # writes test/fixtures/gpt2-tiny.logits.json
Checked by test/safetensors.test.ts.

Reads: test/fixtures/gpt2-tiny.safetensors (HF names, `transformer.` prefix optional as
from_pretrained strips it; lm_head.weight ignored: the head is tied to wte), its
__metadata__["flotilla_tokens"] (JSON [B][T] token ids), test/fixtures/gpt2-tiny.config.json.
Writes (JSON): tokens [B][T]; logits [B][T][V], float32 values as their shortest
round-trip decimal; torch (version); float64_max_abs_diff (the same forward in float64 vs
the float32 one written: the float32 noise floor of the reference itself).
"""
import json
import math
import os
import struct

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "test", "fixtures")
WEIGHTS = os.path.join(FIXTURES, "gpt2-tiny.safetensors")
CONFIG = os.path.join(FIXTURES, "gpt2-tiny.config.json")
OUT = os.path.join(FIXTURES, "gpt2-tiny.logits.json")

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(path):
    """-> ({name: tensor}, metadata). The format: u64 LE header length N, N bytes of JSON,
    then the buffer; data_offsets are relative to the buffer start."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", {})
    buf = raw[8 + n :]
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        t = torch.frombuffer(bytearray(buf[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"]).float()
    return tensors, metadata


def gelu_new(x):
    # transformers.activations.NewGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def conv1d(x, w, b):
    # transformers.pytorch_utils.Conv1D: weight [in, out], y = x @ W + b
    size_out = x.size()[:-1] + (w.size(1),)
    return torch.addmm(b, x.reshape(-1, x.size(-1)), w).view(size_out)


def gpt2_lm_logits(sd, cfg, input_ids):
    """GPT2LMHeadModel.forward(input_ids).logits, eager attention, no cache, no dropout."""
    C, H = cfg["n_embd"], cfg["n_head"]
    D = C // H
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    assert cfg.get("activation_function", "gelu_new") == "gelu_new"
    assert cfg.get("n_inner") in (None, 4 * C)
    scale = cfg.get("scale_attn_weights", True)
    by_layer = cfg.get("scale_attn_by_inverse_layer_idx", False)
    n_pos = cfg["n_positions"]
    B, T = input_ids.shape
    bias = torch.tril(torch.ones((n_pos, n_pos), dtype=torch.bool)).view(1, 1, n_pos, n_pos)  # GPT2Attention.bias

    def ln(x, p):
        return torch.nn.functional.layer_norm(x, (C,), sd[p + ".weight"], sd[p + ".bias"], eps)

    def split_heads(t):  # (B, T, C) -> (B, H, T, D)
        return t.view(B, T, H, D).permute(0, 2, 1, 3)

    position_ids = torch.arange(0, T, dtype=torch.long).unsqueeze(0)
    hidden = sd["wte.weight"][input_ids] + sd["wpe.weight"][position_ids]  # embd_pdrop: off
    for layer in range(cfg["n_layer"]):
        p = "h.%d." % layer
        residual = hidden
        x = ln(hidden, p + "ln_1")
        query, key, value = conv1d(x, sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]).split(C, dim=2)
        query, key, value = split_heads(query), split_heads(key), split_heads(value)
        w = torch.matmul(query, key.transpose(-1, -2))
        if scale:
            w = w / torch.full([], value.size(-1) ** 0.5, dtype=w.dtype)
        if by_layer:
            w = w / float(layer + 1)
        causal_mask = bias[:, :, 0:T, :T]
        w = torch.where(causal_mask, w, torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype))
        w = torch.nn.functional.softmax(w, dim=-1)  # attn_pdrop: off
        a = torch.matmul(w, value).permute(0, 2, 1, 3).contiguous().view(B, T, C)  # _merge_heads
        a = conv1d(a, sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"])  # resid_pdrop: off
        hidden = a + residual
        residual = hidden
        x = ln(hidden, p + "ln_2")
        x = gelu_new(conv1d(x, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = conv1d(x, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        hidden = residual + x
    hidden = ln(hidden, "ln_f")
    return torch.matmul(hidden, sd["wte.weight"].t())  # lm_head, tied to wte (no bias)


def f32(values):
    """float32 array -> list of Python floats with the shortest float32 round-trip repr."""
    return [float(np.format_float_scientific(np.float32(v), unique=True)) for v in np.asarray(values, np.float32).ravel()]


def main():
    tensors, metadata = read_safetensors(WEIGHTS)
    with open(CONFIG) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "gpt2" and cfg.get("tie_word_embeddings", True)
    # from_pretrained on GPT2LMHeadModel strips the base-model prefix; buffers are not weights
    sd = {}
    for name, t in tensors.items():
        bare = name[len("transformer.") :] if name.startswith("transformer.") else name
        if bare == "lm_head.weight" or bare.endswith(".attn.bias") or bare.endswith(".attn.masked_bias"):
            continue
        sd[bare] = t
    tokens = json.loads(metadata["flotilla_tokens"])
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        logits = gpt2_lm_logits(sd, cfg, ids)
        logits64 = gpt2_lm_logits({k: v.double() for k, v in sd.items()}, cfg, ids)
    B, T, V = logits.shape
    assert V == cfg["vocab_size"]
    diff64 = float((logits.double() - logits64).abs().max())
    out = {
        "torch": torch.__version__,
        "tokens": tokens,
        "float64_max_abs_diff": diff64,
        "logits": [[f32(logits[b, t]) for t in range(T)] for b in range(B)],
    }
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print("wrote %s: logits [%d, %d, %d], max |logit| %.4f, float32 vs float64 max |diff| %.3g"
          % (OUT, B, T, V, float(logits.abs().max()), diff64))


if __name__ == "__main__":
    main()
