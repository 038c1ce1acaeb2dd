#!/usr/bin/env python3
"""Writes actors/testdata/float64_gemma3_270m.json: the top-20 logits after each
prompt of the llama.cpp fixture, from an independent float64 NumPy forward
pass over the GGUF weights as the `gguf` package dequantizes them.

This is the exact-arithmetic reference: llama.cpp quantizes activations for
its dot products and sits a few tenths away from it, so our f32 forward pass
is compared with both. Regenerate with:

    pip install 'gguf==0.19.0' 'numpy<3'
    python3 scripts/reference/numpy_gemma3.py "$(dima models fetch gemma3-270m)"

The architecture, written out from the Gemma 3 description (HF
modeling_gemma3 / llama.cpp's gemma3 graph):
- x = embedding[ids] * sqrt(hidden)
- per layer: h = rms(x)·w_attn_norm; q,k,v = projections; q,k = rms per head
  · w_q_norm / w_k_norm; NeoX RoPE (base 10,000 on local layers, 1,000,000 on
  every sixth layer); scores = q·k / sqrt(256); causal mask, local layers
  keep key j for query i iff i - j < 512; x += rms(o_proj(attn))·w_post_attn;
  x += rms(down(gelu_tanh(gate(h')) * up(h')))·w_post_ffw with h' = rms(x)·w_ffn_norm
- logits = embedding · (rms(x)·w_output_norm)
GGUF norm weights already hold 1 + w.
"""
import json
import pathlib
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "actors" / "testdata" / "llama_cpp_gemma3_270m.json"
OUT = ROOT / "actors" / "testdata" / "float64_gemma3_270m.json"

reader = GGUFReader(sys.argv[1])
W = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
fields = reader.fields


def scalar(key):
    f = fields[key]
    return f.parts[f.data[0]].tolist()[0]


HIDDEN = scalar("gemma3.embedding_length")
LAYERS = scalar("gemma3.block_count")
HEADS = scalar("gemma3.attention.head_count")
KV_HEADS = scalar("gemma3.attention.head_count_kv")
HEAD_DIM = scalar("gemma3.attention.key_length")
EPS = scalar("gemma3.attention.layer_norm_rms_epsilon")
WINDOW = scalar("gemma3.attention.sliding_window")
GLOBAL_BASE = scalar("gemma3.rope.freq_base")
LOCAL_BASE = 10_000.0


def rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def rope(x, positions, base):
    half = x.shape[-1] // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
    ang = positions[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def forward(ids):
    T = len(ids)
    emb = W["token_embd.weight"]
    x = emb[ids] * np.sqrt(HIDDEN)
    pos = np.arange(T, dtype=np.float64)
    i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    causal = j <= i
    local = causal & (i - j < WINDOW)
    for l in range(LAYERS):
        p = f"blk.{l}."
        is_global = (l + 1) % 6 == 0
        h = rms(x, W[p + "attn_norm.weight"])
        q = (h @ W[p + "attn_q.weight"].T).reshape(T, HEADS, HEAD_DIM)
        k = (h @ W[p + "attn_k.weight"].T).reshape(T, KV_HEADS, HEAD_DIM)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, KV_HEADS, HEAD_DIM)
        q = rms(q, W[p + "attn_q_norm.weight"])
        k = rms(k, W[p + "attn_k_norm.weight"])
        base = GLOBAL_BASE if is_global else LOCAL_BASE
        q = rope(q, pos, base) / np.sqrt(HEAD_DIM)
        k = rope(k, pos, base)
        mask = causal if is_global else local
        out = np.zeros((T, HEADS, HEAD_DIM))
        for hd in range(HEADS):
            kv = hd // (HEADS // KV_HEADS)
            s = q[:, hd, :] @ k[:, kv, :].T
            s = np.where(mask, s, -np.inf)
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            out[:, hd, :] = s @ v[:, kv, :]
        o = out.reshape(T, HEADS * HEAD_DIM) @ W[p + "attn_output.weight"].T
        x = x + rms(o, W[p + "post_attention_norm.weight"])
        h = rms(x, W[p + "ffn_norm.weight"])
        a = gelu_tanh(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)
        d = a @ W[p + "ffn_down.weight"].T
        x = x + rms(d, W[p + "post_ffw_norm.weight"])
    last = rms(x[-1], W["output_norm.weight"])
    return emb @ last


if __name__ == "__main__":
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    out = []
    for prompt in prompts:
        logits = forward(prompt["prompt_ids"])
        top = np.argsort(-logits, kind="stable")[:20]
        out.append({"prompt_ids": prompt["prompt_ids"], "top20": [[int(t), float(logits[t])] for t in top]})
        print(f"{len(prompt['prompt_ids'])} tokens: top-1 {int(top[0])} at {logits[top[0]]:.4f}")
    OUT.write_text(json.dumps({"reference": "numpy float64 over gguf-dequantized weights", "prompts": out}) + "\n")
    print(f"wrote {OUT}")
