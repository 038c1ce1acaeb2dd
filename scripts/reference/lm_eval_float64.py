#!/usr/bin/env python3
"""The exact-arithmetic side of the lm-evaluation-harness check, from the
float64 NumPy forward pass (scripts/reference/numpy_gemma3.py) on the
token ids lm-eval sends with its remote tokenizer (no BOS): every
multiple-choice loglikelihood of tests/lm_eval's `dima_mc` task (context
ids, then the continuation's ids of context + " " + choice), and the
`dima_gen` task's greedy text (12 tokens at most, cut at its stop strings)
with the top-two margin of each step. Written into the fixture
tests/lm_eval/llama_cpp.json under "mc_float64" and "gen_float64", next to
llama.cpp's numbers, so CI compares `dima serve` with both.

Usage: python scripts/reference/lm_eval_float64.py MODEL.gguf FIXTURE.json
(a Python with gguf, numpy and llama-cpp-python, whose tokenizer gives the
same ids as dima's: tests/gemma.rs checks that).
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent
model, fixture_path = sys.argv[1], Path(sys.argv[2])
sys.argv = [sys.argv[0], model]
sys.path.insert(0, str(ROOT))
import numpy_gemma3 as ref  # noqa: E402

vocab = Llama(model_path=model, vocab_only=True, verbose=False)


def ids(text):
    return vocab.tokenize(text.encode(), add_bos=False, special=False)


def loglik(context, continuation):
    whole = ids(context + continuation)
    ctx = ids(context)
    cont = whole[len(ctx):]
    total = 0.0
    for i in range(len(cont)):
        logits = np.asarray(ref.forward(ctx + cont[:i]), dtype=np.float64)
        logits = logits - logits.max()
        total += float(logits[cont[i]] - np.log(np.exp(logits).sum()))
    return total


with tempfile.TemporaryDirectory() as tmp:
    import subprocess

    subprocess.run([sys.executable, str(ROOT.parents[1] / "tests/lm_eval/make_tasks.py"), tmp], check=True)
    docs = [json.loads(line) for line in open(Path(tmp) / "dima_mc.jsonl")]
    gen_docs = [json.loads(line) for line in open(Path(tmp) / "dima_gen.jsonl")]

fixture = json.loads(fixture_path.read_text())
exact = {}
for i, doc in enumerate(docs):
    context = f"Question: {doc['question']}\nAnswer:"
    exact[str(i)] = {"logliks": [loglik(context, " " + c) for c in doc["choices"]], "answer": doc["answer"]}
    print(i, [round(x, 4) for x in exact[str(i)]["logliks"]], flush=True)
fixture["mc_float64"] = exact
STOPS = ["\n", ".", ",", "<eos>"]
greedy = {}
for i, doc in enumerate(gen_docs):
    seq = ids(doc["question"])
    tokens, margins = [], []
    for _ in range(12):
        logits = np.asarray(ref.forward(seq + tokens), dtype=np.float64)
        order = np.argsort(-logits, kind="stable")
        margins.append(float(logits[order[0]] - logits[order[1]]))
        tokens.append(int(order[0]))
        if tokens[-1] in (1, 106):
            break
    pieces = [vocab.detokenize([t]).decode("utf-8", "replace") for t in tokens]
    text = "".join(pieces)
    cut = min([text.find(s) for s in STOPS if s in text], default=len(text))
    greedy[str(i)] = {"text": text[:cut], "tokens": pieces, "margins": margins}
    print("gen", i, repr(text[:cut]), flush=True)
fixture["gen_float64"] = greedy
fixture_path.write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
print(f"wrote {fixture_path}")
