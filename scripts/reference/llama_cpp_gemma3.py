#!/usr/bin/env python3
"""Writes actors/testdata/llama_cpp_gemma3_270m.json: what llama.cpp (through
llama-cpp-python) does with gemma-3-270m-q4_k_m.gguf.

- `tokenize`: ids of varied texts (no BOS, special tokens parsed), and with BOS.
- `prompts`: for each prompt, its ids (with BOS), the top-20 logits at the last
  prompt position, and 32 greedy steps, each with the chosen id and the
  margin between llama.cpp's own top-1 and top-2 logits (the parity test
  compares free-running output up to the first step whose margin is < 0.25,
  and teacher-forces the rest).

The end-to-end tests read this file; CI does not rebuild it. Regenerate with
(llama.cpp's AMX path crashes on this CPU, hence the flags):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
        pip install 'llama-cpp-python==0.3.16' 'numpy<3'
    python3 scripts/reference/llama_cpp_gemma3.py "$(dima models fetch gemma3-270m)"
"""
import json
import pathlib
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

OUT = pathlib.Path(__file__).resolve().parents[2] / "actors" / "testdata" / "llama_cpp_gemma3_270m.json"
STEPS = 32

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé, São Paulo, Ærøskøbing, Ελληνικά, русский",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷🇯🇵, plus a zero\u200bwidth space.",
    "  leading spaces,   runs   of   spaces,\ttabs\t\tand\nnewlines\n\n\nend  ",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "Code: fn main() { println!(\"{}\", 42); } // ok",
    "",
    " ",
    "\n",
    "a<bos>b<eos>c</s>d",
    "1234567890 3.14159 -2e10 0x1F",
]

LONG = " ".join(
    f"Paragraph {i}: the river carried the boat past quiet villages, old mills and green fields, "
    "while the travellers counted bridges and told stories about the towns they had left behind."
    for i in range(1, 30)
)

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<start_of_turn>user\nWrite a haiku about autumn.<end_of_turn>\n<start_of_turn>model\n",
    "Les trois couleurs du drapeau français sont",
    "Summarise the following text in one sentence.\n\n" + LONG + "\n\nSummary:",
]


def main(path):
    llm = Llama(model_path=path, n_ctx=4096, n_threads=2, n_batch=512, logits_all=True, verbose=False, seed=0)
    tokenize = [
        {
            "text": t,
            "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True),
            "ids_with_bos": llm.tokenize(t.encode("utf-8"), add_bos=True, special=True),
        }
        for t in TEXTS
    ]
    prompts = []
    for text in PROMPTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        top = np.argsort(-last, kind="stable")[:20]
        steps = []
        for _ in range(STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(-logits, kind="stable")
            chosen = int(order[0])
            steps.append({"id": chosen, "margin": float(logits[order[0]] - logits[order[1]])})
            if chosen in (1, 106, 212):
                break
            llm.eval([chosen])
        prompts.append(
            {
                "text": text,
                "prompt_ids": ids,
                "top20": [[int(i), float(last[i])] for i in top],
                "greedy": steps,
            }
        )
        print(f"prompt of {len(ids)} tokens: {llm.detokenize([s['id'] for s in steps]).decode('utf-8', 'replace')!r}")
    OUT.write_text(
        json.dumps(
            {"llama_cpp_python": llama_cpp.__version__, "model": pathlib.Path(path).name, "tokenize": tokenize, "prompts": prompts},
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"wrote {OUT}")


main(sys.argv[1])
