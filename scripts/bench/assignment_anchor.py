#!/usr/bin/env python3
"""The anchors of `dima bench assign`: times scipy's linear_sum_assignment on
a dense problem, or OR-tools' SimpleMinCostFlow on a sparse one with an
"unserved" option, on the very files the Rust side solved.

  dense PATH N REPEAT        -- N x N float64 costs (little-endian, row-major), minimise
  sparse PATH N M E REPEAT   -- E edges: u32 rows, u32 cols, f64 weights; maximise,
                                any row or column may stay unmatched at weight 0

Prints one JSON line: solver, median ms over REPEAT solves, objective.
"""
import json
import sys
import time

import numpy as np


def median_ms(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return times[len(times) // 2], result


def dense(path, n, repeat):
    from scipy.optimize import linear_sum_assignment

    cost = np.fromfile(path, dtype="<f8").reshape(n, n)
    ms, (rows, cols) = median_ms(lambda: linear_sum_assignment(cost), repeat)
    import scipy

    return {"solver": f"scipy {scipy.__version__} linear_sum_assignment", "ms": ms,
            "objective": float(cost[rows, cols].sum())}


def sparse(path, n, m, e, repeat):
    from ortools.graph.python import min_cost_flow
    import ortools

    raw = open(path, "rb").read()
    rows = np.frombuffer(raw, dtype="<u4", count=e, offset=0).astype(np.int64)
    cols = np.frombuffer(raw, dtype="<u4", count=e, offset=4 * e).astype(np.int64)
    weights = np.frombuffer(raw, dtype="<f8", count=e, offset=8 * e)
    scale = 10_000.0  # OR-tools needs integer costs: 1e-4 resolution

    def solve():
        # source 0, rows 1..n, columns n+1..n+m, sink n+m+1. Every row sends
        # one unit: through a column (cost -w) or straight to the sink (0).
        flow = min_cost_flow.SimpleMinCostFlow()
        source, sink = 0, n + m + 1
        r = np.arange(n, dtype=np.int64)
        c = np.arange(m, dtype=np.int64)
        tails = np.concatenate([np.zeros(n, np.int64), rows + 1, c + n + 1, r + 1])
        heads = np.concatenate([r + 1, cols + n + 1, np.full(m, sink, np.int64), np.full(n, sink, np.int64)])
        caps = np.ones(len(tails), dtype=np.int64)
        costs = np.concatenate([np.zeros(n, np.int64), -np.rint(weights * scale).astype(np.int64),
                                np.zeros(m, np.int64), np.zeros(n, np.int64)])
        flow.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, costs)
        supplies = np.zeros(n + m + 2, dtype=np.int64)
        supplies[source], supplies[sink] = n, -n
        flow.set_nodes_supplies(np.arange(n + m + 2, dtype=np.int64), supplies)
        status = flow.solve()
        if status != flow.OPTIMAL:
            raise SystemExit(f"OR-tools status {status}")
        return -flow.optimal_cost() / scale

    ms, objective = median_ms(solve, repeat)
    return {"solver": f"OR-tools {ortools.__version__} SimpleMinCostFlow", "ms": ms, "objective": objective}


def main(argv):
    kind = argv[1]
    if kind == "dense":
        out = dense(argv[2], int(argv[3]), int(argv[4]))
    elif kind == "sparse":
        out = sparse(argv[2], int(argv[3]), int(argv[4]), int(argv[5]), int(argv[6]))
    else:
        raise SystemExit(f"unknown kind {kind!r}: dense or sparse")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)
