#!/usr/bin/env python3
"""Writes dataflows/testdata/lambda_learner_reference.json: incremental
Bayesian logistic regression steps computed by LinkedIn's `lambda-learner`
0.1.0 (TrainerSequentialBayesianLogisticLossWithL2), for Dima's learner to
match (`dataflows::learner::step`).

    python3 -m pip install 'lambda-learner==0.1.0' 'scipy<1.18' 'numpy<3' scikit-learn
    OPENBLAS_NUM_THREADS=1 python3 scripts/reference/lambda_learner_reference.py

CI runs it (scripts/test.sh, in a cached virtual environment) before the
tests, so the fixture always comes from the real package.

Each case is two sequential steps for one entity: the first from the unseen
prior N(0, (lambda I)^-1), the second with the first's posterior as the prior,
for full and diagonal Hessians and several (delta, lambda). Rows have an
intercept column, dense features, per-row weights and offsets; X is built as
scipy.sparse.csc_matrix as the package expects.

The package's `train()` stops L-BFGS at scipy's default projected-gradient
tolerance (1e-5, not configurable through `train`), which leaves theta only
about 1e-5 accurate. So each step also minimises the package's own `loss` and
`gradient` with L-BFGS-B at tight tolerances and takes the posterior from the
package's own `_update_hessian` at that optimum; the tests compare with these
("tight"), and the file also records the default `train()` results.
"""
import json
import os
import pathlib

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import optimize, sparse  # noqa: E402

from linkedin.learner.ds.indexed_dataset import IndexedDataset  # noqa: E402
from linkedin.learner.ds.indexed_model import IndexedModel  # noqa: E402
from linkedin.learner.prediction.hessian_type import HessianType  # noqa: E402
from linkedin.learner.prediction.trainer_sequential_bayesian_logistic_loss_with_l2 import (  # noqa: E402
    TrainerSequentialBayesianLogisticLossWithL2,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "dataflows" / "testdata" / "lambda_learner_reference.json"


def batch(rng, n, p, truth):
    x = rng.uniform(-1, 1, size=(n, p))
    x[:, 0] = 1.0
    offsets = rng.uniform(-0.5, 0.5, size=n)
    s = x @ truth + offsets
    y = np.where(rng.uniform(size=n) < 1 / (1 + np.exp(-s)), 1.0, -1.0)
    w = rng.uniform(0.5, 2.0, size=n)
    return x, y, w, offsets


def dense(h):
    return np.asarray(h.todense()) if sparse.issparse(h) else np.asarray(h)


def run_step(x, y, w, offsets, theta0, h0, hessian_type, delta, lam):
    data = IndexedDataset(sparse.csc_matrix(x), y, w, offsets)
    model = IndexedModel(theta=theta0.copy(), hessian=sparse.csc_matrix(h0))
    trainer = TrainerSequentialBayesianLogisticLossWithL2(
        training_data=data, initial_model=model, hessian_type=hessian_type,
        penalty=lam, delta=delta)
    default_model, default_loss, _ = trainer.train()
    tight = optimize.minimize(
        trainer.loss, theta0.copy(), jac=trainer.gradient, method="L-BFGS-B",
        options={"ftol": 1e-16, "gtol": 1e-11, "maxiter": 100000, "maxcor": 30})
    tight_h = trainer._update_hessian(tight.x)
    return {
        "theta": tight.x.tolist(),
        "loss": float(trainer.loss(tight.x)),
        "hessian": dense(tight_h).tolist(),
        "gradient_max": float(np.abs(trainer.gradient(tight.x)).max()),
        "default_train": {"theta": np.asarray(default_model.theta).tolist(),
                          "loss": float(default_loss)},
    }, tight.x, dense(tight_h)


def main():
    rng = np.random.default_rng(20261126)
    cases = []
    for hessian_type, full in [(HessianType.FULL, True), (HessianType.DIAGONAL, False)]:
        for delta, lam in [(0.0, 1.0), (0.5, 0.5), (0.8, 5.0), (1.0, 2.0)]:
            p = 4
            truth = rng.normal(0, 1, size=p)
            theta = np.zeros(p)
            h = np.eye(p) * lam
            steps = []
            for n in (60, 25):
                x, y, w, offsets = batch(rng, n, p, truth)
                result, theta, h = run_step(x, y, w, offsets, theta, h, hessian_type, delta, lam)
                result["input"] = {"x": x.tolist(), "y": y.tolist(), "w": w.tolist(),
                                   "offsets": offsets.tolist()}
                steps.append(result)
            cases.append({"full": full, "delta": delta, "lambda": lam, "steps": steps})
            worst = max(abs(a - b) for s in steps for a, b in zip(s["theta"], s["default_train"]["theta"]))
            print(f"{'full' if full else 'diagonal'} delta={delta} lambda={lam}: "
                  f"|grad| {max(s['gradient_max'] for s in steps):.1e}, "
                  f"default train() theta off by {worst:.1e}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"reference": "lambda-learner 0.1.0 "
                               "TrainerSequentialBayesianLogisticLossWithL2",
                               "cases": cases}) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
