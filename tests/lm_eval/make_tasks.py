"""Writes the two small lm-evaluation-harness tasks the API tests run
(no hub access): a 50-item multiple-choice task scored by loglikelihood
(`dima_mc`) and a 20-item `generate_until` task with stop sequences
(`dima_gen`). Deterministic: the same files every run.

Usage: python make_tasks.py OUT_DIR
Writes OUT_DIR/dima_mc.jsonl, OUT_DIR/dima_gen.jsonl and the two task
YAML files pointing at them.
"""

import json
import random
import sys
from pathlib import Path

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = random.Random(20261206)

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"),
]
OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("day", "night"),
    ("open", "closed"), ("old", "new"), ("light", "dark"), ("full", "empty"), ("early", "late"),
]
COLORS = [
    ("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
    ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("an orange", "orange"),
]


def mc_items():
    items = []
    for country, city in CAPITALS:
        others = [c for _, c in CAPITALS if c != city]
        choices = rng.sample(others, 3) + [city]
        rng.shuffle(choices)
        items.append({"question": f"What is the capital of {country}?", "choices": choices, "answer": choices.index(city)})
    for word, opposite in OPPOSITES:
        others = [o for _, o in OPPOSITES if o != opposite]
        choices = rng.sample(others, 3) + [opposite]
        rng.shuffle(choices)
        items.append({"question": f"What is the opposite of {word}?", "choices": choices, "answer": choices.index(opposite)})
    for thing, color in COLORS:
        others = [c for _, c in COLORS if c != color]
        choices = rng.sample(others, 3) + [color]
        rng.shuffle(choices)
        items.append({"question": f"What color is {thing}?", "choices": choices, "answer": choices.index(color)})
    while len(items) < 50:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        right = a + b
        wrong = rng.sample([right - 2, right - 1, right + 1, right + 2, right + 10], 3)
        choices = [str(x) for x in wrong + [right]]
        rng.shuffle(choices)
        items.append({"question": f"What is {a} plus {b}?", "choices": choices, "answer": choices.index(str(right))})
    return items


def gen_items():
    items = []
    for country, city in CAPITALS[:8]:
        items.append({"question": f"The capital of {country} is", "answer": city})
    for word, opposite in OPPOSITES[:6]:
        items.append({"question": f"The opposite of {word} is", "answer": opposite})
    for i in range(6):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        items.append({"question": f"{a} plus {b} equals", "answer": str(a + b)})
    return items


for name, items in [("dima_mc", mc_items()), ("dima_gen", gen_items())]:
    with open(out / f"{name}.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")

(out / "dima_mc.yaml").write_text(
    f"""task: dima_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out.resolve() / 'dima_mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""
)
(out / "dima_gen.yaml").write_text(
    f"""task: dima_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out.resolve() / 'dima_gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", ".", ","]
  max_gen_toks: 12
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""
)
print(f"wrote the tasks to {out}")
