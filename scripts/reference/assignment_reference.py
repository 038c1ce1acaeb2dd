#!/usr/bin/env python3
"""Writes dataflows/testdata/assignment_reference.json: random assignment
problems and the optimal objectives scipy.optimize.linear_sum_assignment
finds for them, for Dima's solver (`dataflows::matching::assign`) to match.

    python3 -m pip install 'scipy<1.18' 'numpy<3'
    python3 scripts/reference/assignment_reference.py

CI runs it (scripts/test.sh, in the cached reference venv) before the tests.

Two semantics, as in Dima:
- complete: exactly min(rows, cols) pairs, scipy's own (forbidden pairs are
  +inf for a minimisation, -inf for a maximisation; cases are drawn so a
  complete matching exists);
- partial: any row or column may stay unmatched at weight 0, pairs not listed
  are forbidden. scipy solves it on the matrix widened by one private
  "unmatched" column per row (weight 0), forbidden cells at +/-inf.
Instances cover square and rectangular shapes, integer weights with many
ties, negative weights, forbidden pairs and empty sides.
"""
import json
import pathlib

import numpy as np
from scipy.optimize import linear_sum_assignment

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "dataflows" / "testdata" / "assignment_reference.json"


def partial_objective(rows, cols, edges, maximize):
    if rows == 0 or cols == 0:
        return 0.0
    bad = -np.inf if maximize else np.inf
    m = np.full((rows, cols + rows), bad)
    for r, c, w in edges:
        m[r, c] = w if not np.isfinite(m[r, c]) else (max(m[r, c], w) if maximize else min(m[r, c], w))
    for r in range(rows):
        m[r, cols + r] = 0.0
    ri, ci = linear_sum_assignment(m, maximize=maximize)
    return float(m[ri, ci].sum())


def complete_objective(rows, cols, edges, maximize):
    if rows == 0 or cols == 0:
        return 0.0
    bad = -np.inf if maximize else np.inf
    m = np.full((rows, cols), bad)
    for r, c, w in edges:
        m[r, c] = w
    ri, ci = linear_sum_assignment(m, maximize=maximize)
    return float(m[ri, ci].sum())


def main():
    rng = np.random.default_rng(20261126)
    cases = []
    for k in range(240):
        rows = int(rng.integers(0, 9)) if k % 10 else 0
        cols = int(rng.integers(0, 9)) if k % 13 else 0
        if k >= 220:  # a few larger ones
            rows, cols = int(rng.integers(15, 40)), int(rng.integers(15, 40))
        kind = ["float", "ties", "negative"][k % 3]
        density = [1.0, 0.6, 0.3][(k // 3) % 3]
        edges = []
        for r in range(rows):
            for c in range(cols):
                if rng.uniform() >= density:
                    continue
                if kind == "float":
                    w = round(float(rng.uniform(-1, 10)), 6)
                elif kind == "ties":
                    w = float(rng.integers(0, 4))
                else:
                    w = float(rng.integers(-9, 3))
                edges.append([r, c, w])
        case = {"rows": rows, "cols": cols, "edges": edges}
        for maximize in (True, False):
            key = "max" if maximize else "min"
            case[f"partial_{key}"] = partial_objective(rows, cols, edges, maximize)
            # Complete only where every cell is allowed (always feasible).
            if density == 1.0:
                case[f"complete_{key}"] = complete_objective(rows, cols, edges, maximize)
        cases.append(case)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"reference": "scipy.optimize.linear_sum_assignment", "cases": cases}) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
