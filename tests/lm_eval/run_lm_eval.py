"""Runs lm-evaluation-harness (`local-completions`, the remote tokenizer:
the server's /tokenize, /detokenize and /tokenizer_info) on the two tasks
make_tasks.py writes, against an OpenAI-compatible server, and writes the
per-item results:

    {"mc": {doc_id: {"logliks": [...], "answer": i}}, "gen": {doc_id: text},
     "acc": ..., "exact_match": ...}

Usage: python run_lm_eval.py BASE_URL MODEL TASK_DIR OUT.json
"""

import json
import sys

import lm_eval
from lm_eval.tasks import TaskManager

base, model, task_dir, out = sys.argv[1:5]
results = lm_eval.simple_evaluate(
    model="local-completions",
    model_args=(
        f"model={model},base_url={base}/v1/completions,tokenizer_backend=remote,"
        "tokenized_requests=True,num_concurrent=1,max_retries=1,timeout=600"
    ),
    tasks=["dima_mc", "dima_gen"],
    task_manager=TaskManager(include_path=task_dir),
    log_samples=True,
    random_seed=0,
    numpy_random_seed=0,
    torch_random_seed=0,
    fewshot_random_seed=0,
)
mc = {}
for s in results["samples"]["dima_mc"]:
    mc[str(s["doc_id"])] = {
        "logliks": [float(r[0][0]) for r in s["resps"]],
        "answer": s["doc"]["answer"],
    }
gen = {str(s["doc_id"]): s["resps"][0][0] for s in results["samples"]["dima_gen"]}
summary = {
    "mc": mc,
    "gen": gen,
    "acc": results["results"]["dima_mc"]["acc,none"],
    "exact_match": results["results"]["dima_gen"]["exact_match,none"],
}
with open(out, "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
print(json.dumps({"acc": summary["acc"], "exact_match": summary["exact_match"], "items": len(mc) + len(gen)}))
