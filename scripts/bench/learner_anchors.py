#!/usr/bin/env python3
"""The anchors of `dima bench learner`, on the very CSV the Rust side learned.

  vw FILE.csv --entity-column C --label-column C --features a,b --entity-features c
     --warmup-rows N --repeat R [--learning-rates 0.1,0.25,0.5,1,2]

Vowpal Wabbit (PyPI `vowpalwabbit`) with logistic loss on the same model
family as the GLMix learner: namespace `f` holds the fixed-effect features,
`c` the entity (one indicator: a per-entity intercept), `e` the entity
features, and `-q ce` their interactions (per-entity slopes); VW adds the
global constant. The text file is written first (not timed); each timed run
is VW's own driver reading that file (`-d`, `run_parser`), predictions to a
file. The learning rate is chosen on the warm-up rows only, by progressive
logloss, from the grid; the reported logloss and AUC are VW's progressive
predictions (made before each example is learned) over the rows after the
warm-up. Prints one JSON line.

  lambda-learner FILE.csv --entity-column C --label-column C --features a,b
     --entity-features c --batch-size B --batches K --offsets OFFSETS.txt
     --delta D --lambda L [--hessian full|diagonal]

LinkedIn's `lambda-learner` 0.1.0: one
`TrainerSequentialBayesianLogisticLossWithL2` step per entity per batch of B
rows, for the first K batches, with the fixed effect's scores as offsets
(one per line, in row order, as Dima computed them), each entity's previous
posterior as its prior, exactly the loop Dima's learner runs. Prints one
JSON line with the learn examples per second.

`--hashed-features member,placement*hour` adds hashed categorical features
to the fixed effect: for VW a namespace `h` with one `name=value` token per
feature (VW hashes them itself, 18 bits by default).
"""
import argparse
import csv
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def clean(token):
    """A VW feature name: no spaces, colons or bars."""
    return token.replace(" ", "_").replace(":", "_").replace("|", "_")


def read(path, entity_column, label_column, features, entity_features, hashed=()):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        index = {name: i for i, name in enumerate(header)}
        for name in [entity_column, label_column, *features, *entity_features]:
            if name not in index:
                sys.exit(f"{path}: no column {name!r} (header: {', '.join(header)})")
        for name in hashed:
            for part in name.split("*"):
                if part not in index:
                    sys.exit(f"{path}: no column {part!r} (header: {', '.join(header)})")
        rows = []
        for row in reader:
            label = float(row[index[label_column]])
            tokens = [clean("{}={}".format(name.replace("*", "_x_"),
                                           "_".join(row[index[p]] for p in name.split("*"))))
                      for name in hashed]
            rows.append((
                row[index[entity_column]],
                1.0 if label > 0 else -1.0,
                [float(row[index[n]]) for n in features],
                [float(row[index[n]]) for n in entity_features],
                tokens,
            ))
    return rows


def progressive_metrics(p, y):
    from sklearn.metrics import roc_auc_score
    p = np.clip(np.asarray(p), 1e-15, 1 - 1e-15)
    y = np.asarray(y)
    positive = y > 0
    logloss = float(-np.mean(np.where(positive, np.log(p), np.log1p(-p))))
    auc = float(roc_auc_score(positive, p)) if 0 < positive.sum() < len(y) else None
    return logloss, auc


def vw(args):
    import vowpalwabbit

    rows = read(args.csv, args.entity_column, args.label_column, args.features,
                args.entity_features, args.hashed_features)
    features, entity_features = args.features, args.entity_features
    tmp = tempfile.mkdtemp(prefix="dima-vw-")
    data = os.path.join(tmp, "data.vw")
    with open(data, "w") as out:
        for entity, y, fx, ex, tokens in rows:
            fixed = " ".join(f"{n}:{v:g}" for n, v in zip(features, fx) if v != 0.0)
            slopes = " ".join(f"{n}:{v:g}" for n, v in zip(entity_features, ex) if v != 0.0)
            hashed = f" |h {' '.join(tokens)}" if tokens else ""
            out.write(f"{y:g} |f {fixed} |c e{entity} |e {slopes}{hashed}\n")
    labels = [row[1] for row in rows]
    warm = args.warmup_rows

    def run(rate, preds):
        options = (f"-d {data} --loss_function logistic --link logistic -q ce "
                   f"-l {rate} --quiet -p {preds}")
        start = time.perf_counter()
        workspace = vowpalwabbit.Workspace(options)
        workspace.run_parser()
        workspace.finish()
        seconds = time.perf_counter() - start
        with open(preds) as f:
            p = [float(line.split()[0]) for line in f]
        if len(p) != len(rows):
            sys.exit(f"vw predicted {len(p)} of {len(rows)} rows")
        return seconds, p, options

    preds = os.path.join(tmp, "preds.txt")
    tuning = {}
    for rate in args.learning_rates:
        _, p, _ = run(rate, preds)
        tuning[rate] = progressive_metrics(p[:warm], labels[:warm])[0] if warm > 0 else 0.0
    rate = min(args.learning_rates, key=lambda r: tuning[r])
    times = []
    for _ in range(args.repeat):
        seconds, p, options = run(rate, preds)
        times.append(seconds)
    times.sort()
    seconds = times[len(times) // 2]
    logloss, auc = progressive_metrics(p[warm:], labels[warm:])
    print(json.dumps({
        "anchor": f"vowpalwabbit {vowpalwabbit.__version__}",
        "options": options.replace(data, "DATA").replace(preds, "PREDS"),
        "learning_rate": rate,
        "warmup_logloss_by_rate": {str(k): v for k, v in tuning.items()},
        "examples": len(rows),
        "seconds": seconds,
        "examples_per_s": len(rows) / seconds,
        "logloss": logloss,
        "auc": auc,
    }))
    for name in (data, preds):
        os.remove(name)
    os.rmdir(tmp)


def lambda_learner(args):
    from scipy import sparse

    from linkedin.learner.ds.indexed_dataset import IndexedDataset
    from linkedin.learner.ds.indexed_model import IndexedModel
    from linkedin.learner.prediction.hessian_type import HessianType
    from linkedin.learner.prediction.trainer_sequential_bayesian_logistic_loss_with_l2 import (
        TrainerSequentialBayesianLogisticLossWithL2,
    )

    rows = read(args.csv, args.entity_column, args.label_column, args.features, args.entity_features)
    rows = rows[: args.batch_size * args.batches]
    with open(args.offsets) as f:
        offsets_by_row = [float(line) for line in f]
    if len(offsets_by_row) < len(rows):
        sys.exit(f"{args.offsets} has {len(offsets_by_row)} offsets for {len(rows)} rows")
    p = len(args.entity_features) + 1
    hessian_type = HessianType.FULL if args.hessian == "full" else HessianType.DIAGONAL
    models = {}
    learned = 0
    seconds = 0.0
    for start in range(0, len(rows), args.batch_size):
        groups = {}
        for i in range(start, min(start + args.batch_size, len(rows))):
            entity, y, _, ex, _ = rows[i]
            groups.setdefault(entity, []).append((y, offsets_by_row[i], ex))
        for entity in sorted(groups):
            group = groups[entity]
            x = np.array([[1.0, *ex] for _, _, ex in group])
            y = np.array([y for y, _, _ in group])
            offsets = np.array([o for _, o, _ in group])
            theta0, h0 = models.get(entity, (np.zeros(p), sparse.identity(p, format="csc") * args.lam))
            began = time.perf_counter()
            data = IndexedDataset(sparse.csc_matrix(x), y, np.ones(len(y)), offsets)
            model = IndexedModel(theta=theta0.copy(), hessian=sparse.csc_matrix(h0))
            trainer = TrainerSequentialBayesianLogisticLossWithL2(
                training_data=data, initial_model=model, hessian_type=hessian_type,
                penalty=args.lam, delta=args.delta)
            trained, _, _ = trainer.train()
            seconds += time.perf_counter() - began
            models[entity] = (np.asarray(trained.theta), trained.hessian)
            learned += len(group)
    import importlib.metadata
    print(json.dumps({
        "anchor": f"lambda-learner {importlib.metadata.version('lambda-learner')}",
        "examples": learned,
        "entities": len(models),
        "seconds": seconds,
        "examples_per_s": learned / seconds if seconds > 0 else None,
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("anchor", choices=["vw", "lambda-learner"])
    parser.add_argument("csv")
    parser.add_argument("--entity-column", required=True)
    parser.add_argument("--label-column", required=True)
    split = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    parser.add_argument("--features", type=split, default=[])
    parser.add_argument("--entity-features", type=split, default=[])
    parser.add_argument("--warmup-rows", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--learning-rates", type=lambda s: [float(v) for v in split(s)],
                        default=[0.1, 0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--hashed-features", type=split, default=[])
    parser.add_argument("--offsets")
    parser.add_argument("--delta", type=float, default=0.8)
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0)
    parser.add_argument("--hessian", choices=["full", "diagonal"], default="full")
    args = parser.parse_args()
    if args.anchor == "vw":
        vw(args)
    else:
        lambda_learner(args)


if __name__ == "__main__":
    main()
