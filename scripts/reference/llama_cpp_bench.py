#!/usr/bin/env python3
"""The anchor of `dima bench generate`: llama.cpp (llama-cpp-python) on the
same GGUF, the same prompt ids and the same thread count. `dima bench
generate` runs this script itself (embedded in the binary) and prints both.

Usage: llama_cpp_bench.py MODEL.gguf PROMPT_IDS_JSON NEW_TOKENS THREADS
Prints one JSON object: version, prefill and decode tokens/s.
"""
import json
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama

path, ids, new_tokens, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(
    model_path=path,
    n_ctx=len(ids) + new_tokens + 16,
    n_threads=threads,
    n_threads_batch=threads,
    n_batch=512,
    n_ubatch=512,
    logits_all=False,
    verbose=False,
)
vocab = llm.n_vocab()
started = time.perf_counter()
llm.eval(ids)
prefill_s = time.perf_counter() - started
started = time.perf_counter()
for _ in range(new_tokens):
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
    llm.eval([int(np.argmax(logits))])
decode_s = time.perf_counter() - started
print(
    json.dumps(
        {
            "version": llama_cpp.__version__,
            "prefill_tokens_per_s": len(ids) / prefill_s,
            "decode_tokens_per_s": new_tokens / decode_s,
        }
    )
)
