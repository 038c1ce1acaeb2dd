"""The Hugging Face transformers anchor of `dima bench decode --backend cuda`.

Builds Gemma3ForCausalLM from a size preset (the same shapes as Dima's
`GemmaConfig::preset`) with random bf16 weights on one GPU, and times eager
greedy decoding with a KV cache at the given batch sizes. Prints one JSON
line per batch size: {"anchor": "transformers", "preset", "batch",
"steps", "seconds", "tokens_per_s"}. Runs where torch and transformers are
installed (the lent GPU machine has them); nothing is downloaded.
"""

import argparse
import json
import time

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

# layers, hidden, ffn, heads, kv heads, head dim, window, linear rope factor, vocab
PRESETS = {
    "270m": (18, 640, 2048, 4, 1, 256, 512, None, 262_144),
    "1b": (26, 1152, 6912, 4, 1, 256, 512, None, 262_144),
    "4b": (34, 2560, 10_240, 8, 4, 256, 1024, 8.0, 262_208),
    "12b": (48, 3840, 15_360, 16, 8, 256, 1024, 8.0, 262_208),
    "27b": (62, 5376, 21_504, 32, 16, 128, 1024, 8.0, 262_208),
}


def config(preset: str) -> Gemma3TextConfig:
    layers, hidden, ffn, heads, kv, hd, window, factor, vocab = PRESETS[preset]
    return Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        sliding_window=window,
        query_pre_attn_scalar=hidden // heads if preset == "27b" else hd,
        rope_scaling=None if factor is None else {"rope_type": "linear", "factor": factor},
        max_position_embeddings=4096,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="27b", choices=sorted(PRESETS))
    p.add_argument("--batch", default="1,16")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(7)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Gemma3ForCausalLM(config(args.preset)).eval()
    model.config._attn_implementation = "eager"
    for b in [int(x) for x in args.batch.split(",")]:
        ids = torch.randint(300, 200_000, (b, args.prompt_tokens), device="cuda")
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        print(json.dumps({
            "anchor": "transformers",
            "preset": args.preset,
            "batch": b,
            "prompt_tokens": args.prompt_tokens,
            "steps": args.steps,
            "seconds": seconds,
            "tokens_per_s": b * args.steps / seconds,
        }), flush=True)


if __name__ == "__main__":
    main()
