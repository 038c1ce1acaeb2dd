"""Compares lm-eval's per-item results on `dima serve` with the fixture
tests/lm_eval/llama_cpp.json, which holds two references for the same
token ids:

- exact arithmetic (float64 NumPy over the GGUF weights,
  scripts/reference/lm_eval_float64.py): every multiple-choice
  loglikelihood within 0.05, the same chosen answer on at least 95% of the
  items, and each generated text equal to the float64 greedy text unless
  that path has a near-tie (top two within 0.02) at or before the first
  token where the texts part;
- llama.cpp (scripts/reference/lm_eval_llama_cpp.py), whose int8
  activations put it tenths of a nat (several, on some prompts without
  BOS) away from exact arithmetic: reported (largest and mean difference,
  agreement on the chosen answer and on the generated texts), and the
  chosen answers must agree on at least 80% of the items.

Usage: python compare.py FIXTURE.json OURS.json
Prints one JSON line; exits 1 when a check fails.
"""

import json
import sys

fixture = json.load(open(sys.argv[1]))
ours = json.load(open(sys.argv[2]))
problems = []


def pick(values):
    return max(range(len(values)), key=values.__getitem__)


def against(reference, tolerance):
    worst, total, count, same = 0.0, 0.0, 0, 0
    for doc, theirs in reference.items():
        mine = ours["mc"][doc]["logliks"]
        for a, b in zip(mine, theirs["logliks"]):
            worst = max(worst, abs(a - b))
            total += abs(a - b)
            count += 1
            if tolerance is not None and abs(a - b) > tolerance:
                problems.append(f"mc item {doc}: loglikelihood {a:.4f} vs {b:.4f}")
        same += pick(mine) == pick(theirs["logliks"])
    return worst, total / max(count, 1), same / max(len(reference), 1)


f64_worst, f64_mean, f64_agree = against(fixture["mc_float64"], 0.05)
if f64_agree < 0.95:
    problems.append(f"the same answer as exact arithmetic on {f64_agree:.0%} of the items (at least 95%)")
cpp_worst, cpp_mean, cpp_agree = against(fixture["mc"], None)
if cpp_agree < 0.80:
    problems.append(f"the same answer as llama.cpp on {cpp_agree:.0%} of the items (at least 80%)")

equal, near_ties = 0, 0
for doc, ref in fixture["gen_float64"].items():
    mine = ours["gen"][doc]
    if mine == ref["text"]:
        equal += 1
        continue
    shown, cut = "", len(ref["tokens"])
    for i, token in enumerate(ref["tokens"]):
        if not mine.startswith(shown + token):
            cut = i
            break
        shown += token
    if min(ref["margins"][: cut + 1], default=99.0) < 0.02:
        near_ties += 1
    else:
        problems.append(f"gen item {doc}: {mine!r} vs exact arithmetic {ref['text']!r}")
same_as_llama = sum(ours["gen"][d] == t for d, t in fixture["gen"].items())

print(
    json.dumps(
        {
            "mc_items": len(fixture["mc_float64"]),
            "float64_max_loglik_diff": f64_worst,
            "float64_mean_loglik_diff": f64_mean,
            "float64_argmax_agreement": f64_agree,
            "llama_cpp_max_loglik_diff": cpp_worst,
            "llama_cpp_mean_loglik_diff": cpp_mean,
            "llama_cpp_argmax_agreement": cpp_agree,
            "gen_items": len(fixture["gen_float64"]),
            "gen_equal_float64": equal,
            "gen_near_ties_float64": near_ties,
            "gen_equal_llama_cpp": same_as_llama,
            "acc": ours["acc"],
            "acc_llama_cpp": fixture["acc"],
            "exact_match": ours["exact_match"],
            "exact_match_llama_cpp": fixture["exact_match"],
            "problems": problems,
        }
    )
)
sys.exit(1 if problems else 0)
