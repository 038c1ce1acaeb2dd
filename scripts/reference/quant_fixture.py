#!/usr/bin/env python3
"""Writes kernels/testdata/quant_blocks.json: random GGML blocks of every type
the model files use, with the values the `gguf` package's own decoder gives.

The Rust decoders in kernels/src/quant are tested against this file, so the
reference is an implementation we did not write. Regenerate with:

    pip install 'gguf==0.19.0' 'numpy<3'
    python3 scripts/reference/quant_fixture.py

The output is deterministic (fixed seed).
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

rng = np.random.default_rng(20261126)
OUT = pathlib.Path(__file__).resolve().parents[2] / "kernels" / "testdata" / "quant_blocks.json"


def f16_bytes(values):
    return np.atleast_1d(np.asarray(values, dtype=np.float16)).view(np.uint8)


def blocks(qtype, count):
    """`count` random blocks with finite, realistic f16 scales."""
    size = {T.Q8_0: 34, T.Q5_0: 22, T.Q4_K: 144, T.Q6_K: 210}[qtype]
    raw = rng.integers(0, 256, size=(count, size), dtype=np.uint8)
    for b in raw:
        if qtype in (T.Q8_0, T.Q5_0):
            b[0:2] = f16_bytes(rng.uniform(-0.05, 0.05))
        elif qtype == T.Q4_K:
            b[0:2] = f16_bytes(rng.uniform(0.0, 0.01))
            b[2:4] = f16_bytes(rng.uniform(0.0, 0.01))
        elif qtype == T.Q6_K:
            b[208:210] = f16_bytes(rng.uniform(-0.01, 0.01))
    return raw


cases = {}
for name, qtype, count in [("q8_0", T.Q8_0, 8), ("q5_0", T.Q5_0, 8), ("q4_K", T.Q4_K, 3), ("q6_K", T.Q6_K, 3)]:
    raw = blocks(qtype, count)
    values = dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(-1)
    cases[name] = {"hex": raw.tobytes().hex(), "values": [float(v) for v in values]}

f16 = rng.uniform(-4, 4, size=64).astype(np.float16)
cases["f16"] = {"hex": f16.tobytes().hex(), "values": [float(v) for v in dequantize(f16.view(np.uint8), T.F16)]}
bf16_source = rng.uniform(-4, 4, size=64).astype(np.float32)
bf16 = (bf16_source.view(np.uint32) >> 16).astype(np.uint16)
cases["bf16"] = {"hex": bf16.tobytes().hex(), "values": [float(v) for v in dequantize(bf16.view(np.uint8), T.BF16)]}

OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps(cases, indent=0) + "\n")
summary = ", ".join(f"{k}: {len(v['values'])} values" for k, v in cases.items())
print(f"wrote {OUT} ({summary})")
