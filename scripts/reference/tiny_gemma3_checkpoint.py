#!/usr/bin/env python3
"""Writes tiny random Gemma 3 checkpoints in the three Hugging Face layouts,
and a float64 NumPy forward pass over them as the reference.

    python3 scripts/reference/tiny_gemma3_checkpoint.py   # needs numpy only

Outputs (committed; the tests read them, CI need not rerun this):
- actors/testdata/tiny-gemma3/bf16/          text-only (Gemma3ForCausalLM), flat
  config (sliding_window_pattern, rope_scaling), one model.safetensors in
  bf16, tensors under `model.`
- actors/testdata/tiny-gemma3/sharded-f32/   the newer config form
  (layer_types, rope_parameters), f32, two shards with
  model.safetensors.index.json, plus a tied lm_head.weight copy
- actors/testdata/tiny-gemma3/multimodal/    Gemma3ForConditionalGeneration:
  `text_config`, tensors under `language_model.model.`, and vision tensors
  that must be ignored
- each directory has a SentencePiece tokenizer.model (protobuf written here)
- actors/testdata/tiny_gemma3_reference.json: the logits at every position
  of a fixed id sequence, in float64, for each layout

All layouts hold the same weight values (drawn in f32, rounded to bf16, so
f32 storage is exact). They differ in the embedding scale, which Hugging
Face rounds to the weights' dtype before multiplying: bf16(sqrt(40)) = 6.3125
against f32 sqrt(40) = 6.32456, so the reference differs per layout.

The shape is chosen to catch the known traps: hidden (40) != heads x head_dim
(32); query_pre_attn_scalar (24) != head_dim (8); GQA (4 query heads, 2 KV
heads); a window of 4 crossed by a 13-token sequence; 7 layers so layer 5 is
global and 6 local again; linear RoPE scaling (factor 8) on global layers only;
an embedding with more rows than the tokenizer has pieces (as Gemma 3's 262,208
rows against 262,144 pieces). Norm weights are stored as w, used as 1 + w.
"""
import json
import pathlib
import struct

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "actors" / "testdata" / "tiny-gemma3"
REFERENCE = ROOT / "actors" / "testdata" / "tiny_gemma3_reference.json"

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 40, 64, 4, 2, 8, 7
WINDOW, QPAS, EPS = 4, 24.0, 1e-6
GLOBAL_BASE, GLOBAL_FACTOR, LOCAL_BASE = 1_000_000.0, 8.0, 10_000.0
EXTRA_ROWS = 8


def vocabulary():
    """(piece, score, type) in id order; types as SentencePiece numbers them."""
    pieces = [("<pad>", 0.0, 3), ("<eos>", 0.0, 3), ("<bos>", 0.0, 3), ("<unk>", 0.0, 2),
              ("<start_of_turn>", 0.0, 3), ("<end_of_turn>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces += [("\n", 0.0, 4)]
    words = ["\u2581", "t", "h", "e", "c", "a", "s", "th", "he", "at", "\u2581t", "\u2581c",
             "\u2581s", "\u2581the", "\u2581cat", "\u2581sat"]
    pieces += [(w, -float(i), 1) for i, w in enumerate(words)]
    return pieces


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def sentencepiece_model(pieces):
    """A ModelProto with field 1 (pieces) only."""
    out = bytearray()
    for text, score, kind in pieces:
        raw = text.encode()
        body = b"\x0a" + varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score)
        if kind != 1:
            body += b"\x18" + varint(kind)
        out += b"\x0a" + varint(len(body)) + body
    return bytes(out)


def to_bf16_bits(a):
    """Round-to-nearest-even f32 -> bf16, as uint16."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_values(a):
    return (to_bf16_bits(a).astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path, tensors, dtype):
    """tensors: name -> float array; dtype 'BF16' or 'F32'."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        if dtype == "BF16":
            blob = to_bf16_bits(array).tobytes()
        else:
            blob = np.asarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def weights(vocab_rows, rng):
    """HF-named tensors (without prefix), values exactly representable in bf16."""
    def draw(*shape, std):
        return bf16_values(rng.normal(0, std, size=shape).astype(np.float32))

    w = {"embed_tokens.weight": draw(vocab_rows, HIDDEN, std=0.4)}
    for layer in range(LAYERS):
        p = f"layers.{layer}."
        w[p + "input_layernorm.weight"] = draw(HIDDEN, std=0.2)
        w[p + "self_attn.q_proj.weight"] = draw(HEADS * HEAD_DIM, HIDDEN, std=0.2)
        w[p + "self_attn.k_proj.weight"] = draw(KV_HEADS * HEAD_DIM, HIDDEN, std=0.2)
        w[p + "self_attn.v_proj.weight"] = draw(KV_HEADS * HEAD_DIM, HIDDEN, std=0.2)
        w[p + "self_attn.o_proj.weight"] = draw(HIDDEN, HEADS * HEAD_DIM, std=0.2)
        w[p + "self_attn.q_norm.weight"] = draw(HEAD_DIM, std=0.2)
        w[p + "self_attn.k_norm.weight"] = draw(HEAD_DIM, std=0.2)
        w[p + "post_attention_layernorm.weight"] = draw(HIDDEN, std=0.2)
        w[p + "pre_feedforward_layernorm.weight"] = draw(HIDDEN, std=0.2)
        w[p + "mlp.gate_proj.weight"] = draw(FFN, HIDDEN, std=0.2)
        w[p + "mlp.up_proj.weight"] = draw(FFN, HIDDEN, std=0.2)
        w[p + "mlp.down_proj.weight"] = draw(HIDDEN, FFN, std=0.2)
        w[p + "post_feedforward_layernorm.weight"] = draw(HIDDEN, std=0.2)
    w["norm.weight"] = draw(HIDDEN, std=0.2)
    return w


def is_global(layer):
    return (layer + 1) % 6 == 0


def forward(w, ids, embed_scale):
    """HF Gemma3 text model in float64: logits at every position."""
    W = {k: v.astype(np.float64) for k, v in w.items()}

    def rms(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * (1.0 + weight)

    def rope(x, positions, base):
        half = x.shape[-1] // 2
        inv = base ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
        ang = positions[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    T = len(ids)
    emb = W["embed_tokens.weight"]
    x = emb[ids] * embed_scale
    pos = np.arange(T, dtype=np.float64)
    i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    causal = j <= i
    sliding = causal & (j > i - WINDOW)  # HF keeps key j iff j > i - window
    for layer in range(LAYERS):
        p = f"layers.{layer}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = (h @ W[p + "self_attn.q_proj.weight"].T).reshape(T, HEADS, HEAD_DIM)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).reshape(T, KV_HEADS, HEAD_DIM)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(T, KV_HEADS, HEAD_DIM)
        q = rms(q, W[p + "self_attn.q_norm.weight"])
        k = rms(k, W[p + "self_attn.k_norm.weight"])
        if is_global(layer):
            base, positions, mask = GLOBAL_BASE, pos / GLOBAL_FACTOR, causal
        else:
            base, positions, mask = LOCAL_BASE, pos, sliding
        q = rope(q, positions, base) * QPAS**-0.5
        k = rope(k, positions, base)
        out = np.zeros((T, HEADS, HEAD_DIM))
        for head in range(HEADS):
            kv = head // (HEADS // KV_HEADS)
            s = np.where(mask, q[:, head, :] @ k[:, kv, :].T, -np.inf)
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            out[:, head, :] = s @ v[:, kv, :]
        o = out.reshape(T, HEADS * HEAD_DIM) @ W[p + "self_attn.o_proj.weight"].T
        x = x + rms(o, W[p + "post_attention_layernorm.weight"])
        h = rms(x, W[p + "pre_feedforward_layernorm.weight"])
        a = gelu_tanh(h @ W[p + "mlp.gate_proj.weight"].T) * (h @ W[p + "mlp.up_proj.weight"].T)
        x = x + rms(a @ W[p + "mlp.down_proj.weight"].T, W[p + "post_feedforward_layernorm.weight"])
    return rms(x, W["norm.weight"]) @ emb.T


def text_config(vocab_rows, new_form):
    c = {"model_type": "gemma3_text", "hidden_size": HIDDEN, "intermediate_size": FFN,
         "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
         "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
         "query_pre_attn_scalar": QPAS, "rms_norm_eps": EPS, "sliding_window": WINDOW,
         "vocab_size": vocab_rows, "max_position_embeddings": 64, "bos_token_id": 2,
         "eos_token_id": [1, 5], "pad_token_id": 0, "hidden_activation": "gelu_pytorch_tanh",
         "final_logit_softcapping": None, "attn_logit_softcapping": None}
    if new_form:
        c["layer_types"] = ["full_attention" if is_global(i) else "sliding_attention"
                            for i in range(LAYERS)]
        c["rope_parameters"] = {
            "full_attention": {"rope_type": "linear", "factor": GLOBAL_FACTOR,
                               "rope_theta": GLOBAL_BASE},
            "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_BASE}}
    else:
        c.update({"sliding_window_pattern": 6, "rope_theta": GLOBAL_BASE,
                  "rope_local_base_freq": LOCAL_BASE,
                  "rope_scaling": {"rope_type": "linear", "factor": GLOBAL_FACTOR}})
    return c


def main():
    rng = np.random.default_rng(20261126)
    pieces = vocabulary()
    vocab_rows = len(pieces) + EXTRA_ROWS
    w = weights(vocab_rows, rng)
    tokenizer = sentencepiece_model(pieces)
    ids = [2] + [int(t) for t in rng.integers(6, len(pieces), size=12)]

    layouts = {}
    # 1. Text-only, flat config, bf16, one file.
    d = OUT / "bf16"
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(text_config(vocab_rows, new_form=False), architectures=["Gemma3ForCausalLM"],
               torch_dtype="bfloat16")
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_safetensors(d / "model.safetensors", {"model." + k: v for k, v in w.items()}, "BF16")
    layouts["bf16"] = "bf16"

    # 2. New config form, f32, two shards and an index, tied lm_head copy.
    d = OUT / "sharded-f32"
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(text_config(vocab_rows, new_form=True), architectures=["Gemma3ForCausalLM"],
               torch_dtype="float32")
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    named = {"model." + k: v for k, v in w.items()}
    named["lm_head.weight"] = w["embed_tokens.weight"]
    names = list(named)
    split = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:split],
              "model-00002-of-00002.safetensors": names[split:]}
    weight_map = {}
    for file, members in shards.items():
        write_safetensors(d / file, {n: named[n] for n in members}, "F32")
        weight_map.update({n: file for n in members})
    total = sum(v.size * 4 for v in named.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    layouts["sharded-f32"] = "f32"

    # 3. Multimodal wrapper: text_config, language_model.model. prefix, vision tensors.
    d = OUT / "multimodal"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": text_config(vocab_rows, new_form=False),
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
           "mm_tokens_per_image": 4, "torch_dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    named = {"language_model.model." + k: v for k, v in w.items()}
    named["vision_tower.vision_model.embeddings.patch_embedding.weight"] = bf16_values(
        rng.normal(0, 1, size=(8, 3, 2, 2)).astype(np.float32))
    named["multi_modal_projector.mm_input_projection_weight"] = bf16_values(
        rng.normal(0, 1, size=(8, HIDDEN)).astype(np.float32))
    write_safetensors(d / "model.safetensors", named, "BF16")
    layouts["multimodal"] = "bf16"

    for name in layouts:
        (OUT / name / "tokenizer.model").write_bytes(tokenizer)

    root = float(np.float32(np.sqrt(np.float32(HIDDEN))))
    scales = {"f32": root, "bf16": float(bf16_values(np.array([root], dtype=np.float32))[0])}
    logits = {kind: forward(w, ids, scale) for kind, scale in scales.items()}
    gap = np.abs(logits["f32"] - logits["bf16"]).max()
    print(f"embed scale f32 {scales['f32']:.6f}, bf16 {scales['bf16']:.6f}; "
          f"max logit gap between them {gap:.4f}")
    reference = {
        "reference": "numpy float64 forward (HF Gemma3 semantics) over the bf16-exact weights",
        "ids": ids,
        "pieces": len(pieces),
        "vocab_rows": vocab_rows,
        "layouts": {name: {"embed_scale": scales[kind],
                           "logits": [[round(float(v), 6) for v in row] for row in logits[kind]]}
                    for name, kind in layouts.items()},
    }
    REFERENCE.write_text(json.dumps(reference) + "\n")
    print(f"wrote {OUT} and {REFERENCE}")


if __name__ == "__main__":
    main()
