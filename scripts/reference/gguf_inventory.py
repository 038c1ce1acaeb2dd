#!/usr/bin/env python3
"""Writes actors/testdata/gemma3-270m-inventory.json: what the `gguf` Python
package reads from gemma-3-270m-q4_k_m.gguf (every tensor's name, type, shape
and absolute data offset; every scalar metadata value; array lengths).

The end-to-end test compares `dima models inspect gemma3-270m` with it, so our
GGUF reader is checked against a reader we did not write. Regenerate with:

    pip install 'gguf==0.19.0' 'numpy<3'
    dima models fetch gemma3-270m
    python3 scripts/reference/gguf_inventory.py "$(dima models fetch gemma3-270m)"
"""
import json
import pathlib
import sys

from gguf import GGUFReader, GGUFValueType

OUT = pathlib.Path(__file__).resolve().parents[2] / "actors" / "testdata" / "gemma3-270m-inventory.json"

reader = GGUFReader(sys.argv[1])
metadata = {}
for key, field in reader.fields.items():
    if key.startswith("GGUF."):
        continue
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        metadata[key] = {"array_len": len(field.data)}
    elif kind == GGUFValueType.STRING:
        metadata[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
    else:
        metadata[key] = field.parts[field.data[0]].tolist()[0]

tensors = [
    {
        "name": t.name,
        "type": t.tensor_type.name,
        "dims": [int(d) for d in t.shape],
        "start": int(t.data_offset),
        "bytes": int(t.n_bytes),
    }
    for t in reader.tensors
]
OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps({"metadata": metadata, "tensors": tensors}, indent=1) + "\n")
print(f"wrote {OUT}: {len(metadata)} metadata keys, {len(tensors)} tensors")
