"""Greedy text from the CPU model and from the GPU (`dima generate
--backend cuda`) on the same prompts: prints one JSON line per prompt with
both id lists and whether they are identical (and the first step where
they differ). Part of scripts/device-check.sh; needs the real model file.

Usage: python3 scripts/device-generate.py DIMA [MODEL] [TOKENS]
"""

import json
import subprocess
import sys

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
    "Les enfants jouent dans le jardin et",
    "1, 2, 3, 4,",
    "Explain why the sky is blue.",
]


def generate(dima, model, prompt, tokens, cuda):
    cmd = [dima, "generate", "--model", model, "--prompt", prompt,
           "--max-tokens", str(tokens), "--format", "json"]
    if cuda:
        cmd += ["--backend", "cuda"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    dima = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else "gemma3-270m"
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    same = 0
    for i, prompt in enumerate(PROMPTS):
        cpu = generate(dima, model, prompt, tokens, False)
        gpu = generate(dima, model, prompt, tokens, True)
        differ = next((s for s, (a, b) in enumerate(zip(cpu["ids"], gpu["ids"])) if a != b), None)
        if differ is None and len(cpu["ids"]) != len(gpu["ids"]):
            differ = min(len(cpu["ids"]), len(gpu["ids"]))
        same += differ is None
        print(json.dumps({"prompt": i, "identical": differ is None, "first_difference": differ,
                          "cpu_ids": cpu["ids"], "gpu_ids": gpu["ids"],
                          "cpu_text": cpu["text"], "gpu_text": gpu["text"]}), flush=True)
    print(json.dumps({"prompts": len(PROMPTS), "identical": same}), flush=True)


if __name__ == "__main__":
    main()
