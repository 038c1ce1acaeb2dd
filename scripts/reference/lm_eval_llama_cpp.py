#!/usr/bin/env python3
"""The llama.cpp side of the lm-evaluation-harness check: the same two
tasks (tests/lm_eval/make_tasks.py) through lm-eval against llama.cpp on
the same GGUF, written as the fixture tests/lm_eval/llama_cpp.json that CI
compares `dima serve` with (so CI need not build llama.cpp).

llama-cpp-python's OpenAI server takes text prompts only and has none of
vLLM's tokenizer routes, which lm-eval's remote tokenizer (the mode the dima
side runs in) needs. So this script serves llama-cpp-python's own
`Llama.create_completion` -- the function its OpenAI server wraps -- behind
a small HTTP shim that adds `/tokenize`, `/detokenize`, `/tokenizer_info`
and token-id prompts, and points lm-eval at it. For the generate task it
also records llama.cpp's greedy tokens with the margin between the two
most likely tokens at each step, so the comparison can tell near-ties from
real differences.

Usage (a Python with llama-cpp-python, lm-eval[api]):
  python scripts/reference/lm_eval_llama_cpp.py MODEL.gguf OUT.json
"""

import json
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama

ROOT = Path(__file__).resolve().parents[2]
path, out = sys.argv[1], sys.argv[2]
llm = Llama(model_path=path, n_ctx=2048, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False)
lock = threading.Lock()


def piece(tok):
    return llm.detokenize([tok]).decode("utf-8", "replace")


def echo_scores(ids, k, new_tokens):
    """`echo` + `logprobs` for a token-id prompt, from llama.cpp's logits
    of every position (`create_completion` fails on this combination in
    llama-cpp-python 0.3: it adds the prompt list to the text)."""
    llm.reset()
    llm.eval(ids)
    generated = []
    for _ in range(new_tokens):
        last = np.array(llm.scores[llm.n_tokens - 1])
        generated.append(int(np.argmax(last)))
        llm.eval([generated[-1]])
    seq = ids + generated
    logits = np.array(llm.scores[: len(seq) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    tokens, token_logprobs, top, offsets, text = [], [], [], [], ""
    for i, tok in enumerate(seq):
        tokens.append(piece(tok))
        offsets.append(len(text))
        text += tokens[-1]
        if i == 0:
            token_logprobs.append(None)
            top.append(None)
            continue
        row = logp[i - 1]
        token_logprobs.append(float(row[tok]))
        best = np.argsort(-row, kind="stable")[: max(k, 1)]
        entry = {piece(int(t)): float(row[t]) for t in best}
        entry.setdefault(piece(tok), float(row[tok]))
        top.append(entry)
    return {
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": text,
                "finish_reason": "length",
                "logprobs": {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets},
            }
        ],
    }


class Shim(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/tokenizer_info":
            self.reply({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})
        else:
            self.reply({"error": "no route"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with lock:
            if self.path == "/tokenize":
                ids = llm.tokenize(body["prompt"].encode(), add_bos=body.get("add_special_tokens", True), special=False)
                self.reply({"tokens": ids, "count": len(ids)})
            elif self.path == "/detokenize":
                self.reply({"prompt": llm.detokenize(body["tokens"]).decode("utf-8", "replace")})
            elif self.path == "/v1/completions":
                prompt = body["prompt"]
                # lm-eval batches one prompt as a list of token-id lists.
                if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
                    assert len(prompt) == 1, "one prompt per request (batch_size 1)"
                    prompt = prompt[0]
                if body.get("echo") and isinstance(prompt, list):
                    self.reply(echo_scores(prompt, body.get("logprobs") or 0, body.get("max_tokens", 16)))
                    return
                llm.reset()
                r = llm.create_completion(
                    prompt=prompt,
                    max_tokens=body.get("max_tokens", 16),
                    temperature=body.get("temperature", 1.0),
                    logprobs=body.get("logprobs"),
                    echo=body.get("echo", False),
                    stop=body.get("stop") or [],
                    seed=body.get("seed"),
                )
                self.reply(r)
            else:
                self.reply({"error": "no route"}, 404)


server = ThreadingHTTPServer(("127.0.0.1", 0), Shim)
threading.Thread(target=server.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{server.server_address[1]}"

with tempfile.TemporaryDirectory() as tmp:
    import subprocess

    subprocess.run([sys.executable, str(ROOT / "tests/lm_eval/make_tasks.py"), tmp], check=True)
    results = Path(tmp) / "results.json"
    subprocess.run(
        [sys.executable, str(ROOT / "tests/lm_eval/run_lm_eval.py"), base, "gemma3-270m", tmp, str(results)],
        check=True,
    )
    fixture = json.loads(results.read_text())
    # The generate task's greedy path with each step's top-two margin.
    steps = {}
    for line_no, line in enumerate(open(Path(tmp) / "dima_gen.jsonl")):
        doc = json.loads(line)
        ids = llm.tokenize(doc["question"].encode(), add_bos=False, special=False)
        llm.reset()
        r = llm.create_completion(prompt=ids, max_tokens=12, temperature=0, logprobs=2)
        lp = r["choices"][0]["logprobs"]
        margins = []
        for top in lp["top_logprobs"]:
            values = sorted(top.values(), reverse=True)
            margins.append(float(values[0] - values[1]) if len(values) > 1 else 99.0)
        steps[str(line_no)] = {"text": r["choices"][0]["text"], "tokens": lp["tokens"], "margins": margins}
    fixture["gen_steps"] = steps
    fixture["llama_cpp_python"] = llama_cpp.__version__
    Path(out).write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
server.shutdown()
print(f"wrote {out}")
