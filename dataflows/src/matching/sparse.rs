//! Exact assignment on a sparse bipartite graph where any row or column may
//! stay unmatched at weight 0 (the dispatch case: each request sees its k
//! nearest drivers).
//!
//! [`Problem::solve_sparse`] runs the ε-scaling auction of
//! [`super::auction`], which is exact on every problem whose weights fit
//! 62-bit integers after one power-of-two scale (any weights within a factor
//! of about 2^9 of each other's precision, so in practice all). Other
//! problems go to [`Problem::solve_sparse_paths`]:
//!
//! Successive shortest paths with Johnson potentials: rows are added one at
//! a time; each runs Dijkstra over reduced costs (forward along a row's
//! edges, backward along matched pairs) until it reaches a free column, or
//! its own private "stay unmatched" column, then flips the path. Reduced
//! costs stay non-negative, so every step keeps an optimal partial
//! assignment, and the result is optimal. Only the nodes a search settles
//! are touched, so a search that finds a free column nearby costs little;
//! the worst case is O(n · E log V).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::assign::{AssignError, Assignment, Problem};

/// A totally ordered f64 for the heap (costs are finite).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Key(f64);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Problem {
    /// Solves with unmatched rows and columns allowed at weight 0 over the
    /// listed pairs: the auction, or shortest paths when the weights cannot
    /// be made integers (see the module). Same answer as
    /// [`Problem::solve_partial`] (objective), much faster when each row
    /// has few edges.
    pub fn solve_sparse(&self, maximize: bool) -> Result<Assignment, AssignError> {
        self.check()?;
        if let Some(solved) = super::auction::solve(self, maximize) {
            return Ok(solved);
        }
        self.solve_sparse_paths(maximize)
    }

    /// The successive-shortest-path solver alone (exact for any finite
    /// weights; slower than the auction on large problems).
    pub fn solve_sparse_paths(&self, maximize: bool) -> Result<Assignment, AssignError> {
        self.check()?;
        let (n, m) = (self.rows, self.cols);
        let sign = if maximize { -1.0 } else { 1.0 };
        // Rows' edges, CSR; costs are minimised.
        let mut start = vec![0usize; n + 1];
        for &(r, _, _) in &self.edges {
            start[r + 1] += 1;
        }
        for r in 0..n {
            start[r + 1] += start[r];
        }
        let mut fill = start.clone();
        let mut targets = vec![0usize; self.edges.len()];
        let mut costs = vec![0.0f64; self.edges.len()];
        for &(r, c, w) in &self.edges {
            targets[fill[r]] = c;
            costs[fill[r]] = sign * w;
            fill[r] += 1;
        }
        // Node ids: rows 0..n, columns n..n+m, row r's dummy column n+m+r.
        let nodes = n + m + n;
        let column = |c: usize| n + c;
        let dummy = |r: usize| n + m + r;
        // Potentials with reduced cost c(u, v) + p(u) − p(v) ≥ 0 on every
        // residual edge. Every column and dummy starts at the same value, the
        // least cost anywhere (or 0): a free column's potential never changes
        // (a search settles a free column only as its target), so all free
        // columns share one potential and the first one a search settles is
        // the cheapest augmentation, as in the dense Hungarian method.
        let floor = costs.iter().copied().fold(0.0f64, f64::min);
        let mut p = vec![floor; nodes];
        for r in p.iter_mut().take(n) {
            *r = 0.0;
        }
        // Matching: the row each column (real or dummy) holds, and the
        // column (node id) each row holds.
        let mut owner: Vec<Option<usize>> = vec![None; nodes];
        let mut holds: Vec<Option<usize>> = vec![None; n];
        // The cost of the edge each row holds, and of the edge a search
        // reached each node by (a backward step and the objective need them).
        let mut held_cost = vec![0.0f64; n];
        let mut arc_cost = vec![0.0f64; nodes];

        let mut dist = vec![f64::INFINITY; nodes];
        let mut parent = vec![usize::MAX; nodes];
        let mut settled = vec![false; nodes];
        let mut touched: Vec<usize> = Vec::new();
        let mut heap: BinaryHeap<Reverse<(Key, usize)>> = BinaryHeap::new();
        // Warm start, Jonker–Volgenant's augmenting row reduction adapted to
        // free columns: a row takes its cheapest option (an edge or its
        // dummy) at a tight row potential. If that column is held and the
        // row's second-best is strictly worse, the column's potential drops
        // by the difference (only reduced costs into it grow) and its holder
        // is evicted and goes next; on a tie the row takes its second-best
        // and the evicted holder waits for the next round. Free columns keep
        // the common potential, matched ones only go below it, and every
        // reduced cost stays non-negative: the invariant the searches below
        // need. Two rounds with a work budget; the searches take the rest.
        let none = usize::MAX;
        let mut queue: Vec<usize> = (0..n).collect();
        for _round in 0..2 {
            let mut next = Vec::new();
            let mut budget = 4 * n + 16;
            let mut k = 0;
            while k < queue.len() {
                if budget == 0 {
                    next.extend_from_slice(&queue[k..]);
                    break;
                }
                budget -= 1;
                let i = queue[k];
                k += 1;
                // Cheapest and second cheapest reduced cost (row potential 0).
                let (mut umin, mut j1, mut c1) = (0.0 - p[dummy(i)], dummy(i), 0.0);
                let (mut usub, mut j2, mut c2) = (f64::INFINITY, none, 0.0);
                for e in start[i]..start[i + 1] {
                    let v = column(targets[e]);
                    let h = costs[e] - p[v];
                    if h < usub {
                        if h >= umin {
                            (usub, j2, c2) = (h, v, costs[e]);
                        } else {
                            (usub, j2, c2) = (umin, j1, c1);
                            (umin, j1, c1) = (h, v, costs[e]);
                        }
                    }
                }
                let mut holder = owner[j1];
                let strict = umin < usub;
                let (mut to, mut cost) = (j1, c1);
                if holder.is_some() {
                    if strict {
                        p[j1] -= usub - umin;
                    } else if j2 != none {
                        (to, cost) = (j2, c2);
                        holder = owner[j2];
                    }
                }
                if let Some(r) = holder {
                    holds[r] = None;
                }
                owner[to] = Some(i);
                holds[i] = Some(to);
                held_cost[i] = cost;
                p[i] = p[to] - cost;
                if let Some(r) = holder {
                    if strict && to == j1 {
                        k -= 1;
                        queue[k] = r;
                    } else {
                        next.push(r);
                    }
                }
            }
            queue = next;
        }
        for s in 0..n {
            if holds[s].is_some() {
                continue;
            }
            for &v in &touched {
                dist[v] = f64::INFINITY;
                parent[v] = usize::MAX;
                settled[v] = false;
            }
            touched.clear();
            heap.clear();
            dist[s] = 0.0;
            touched.push(s);
            heap.push(Reverse((Key(0.0), s)));
            let mut target = None;
            while let Some(Reverse((Key(d), u))) = heap.pop() {
                if settled[u] || d > dist[u] {
                    continue;
                }
                settled[u] = true;
                if u < n {
                    // A row: its edges, and its own dummy.
                    let relax =
                        |v: usize,
                         cost: f64,
                         dist: &mut Vec<f64>,
                         parent: &mut Vec<usize>,
                         arc_cost: &mut Vec<f64>,
                         touched: &mut Vec<usize>,
                         heap: &mut BinaryHeap<Reverse<(Key, usize)>>| {
                            // Skip the edge the row is matched by: it is backward-only.
                            let reduced = (cost + p[u] - p[v]).max(0.0);
                            let nd = d + reduced;
                            if nd < dist[v] {
                                if dist[v].is_infinite() {
                                    touched.push(v);
                                }
                                dist[v] = nd;
                                parent[v] = u;
                                arc_cost[v] = cost;
                                heap.push(Reverse((Key(nd), v)));
                            }
                        };
                    for k in start[u]..start[u + 1] {
                        let v = column(targets[k]);
                        if holds[u] != Some(v) && !settled[v] {
                            relax(
                                v,
                                costs[k],
                                &mut dist,
                                &mut parent,
                                &mut arc_cost,
                                &mut touched,
                                &mut heap,
                            );
                        }
                    }
                    let v = dummy(u);
                    if holds[u] != Some(v) && !settled[v] {
                        relax(
                            v,
                            0.0,
                            &mut dist,
                            &mut parent,
                            &mut arc_cost,
                            &mut touched,
                            &mut heap,
                        );
                    }
                } else {
                    match owner[u] {
                        // A free column (or a free dummy of the searching row).
                        None => {
                            target = Some(u);
                            break;
                        }
                        // A matched column: go back to its row (reduced cost 0).
                        Some(r) => {
                            if !settled[r] {
                                let reduced = (-held_cost[r] + p[u] - p[r]).max(0.0);
                                let nd = d + reduced;
                                if nd < dist[r] {
                                    if dist[r].is_infinite() {
                                        touched.push(r);
                                    }
                                    dist[r] = nd;
                                    parent[r] = u;
                                    heap.push(Reverse((Key(nd), r)));
                                }
                            }
                        }
                    }
                }
            }
            // The row's own dummy is always free, so a target exists.
            let Some(t) = target else {
                return Err(AssignError::Infeasible(n));
            };
            let dt = dist[t];
            for &v in &touched {
                if settled[v] && dist[v] < dt {
                    p[v] += dist[v] - dt;
                }
            }
            // Flip the path t ← row ← column ← row … ← s.
            let mut v = t;
            loop {
                let r = parent[v];
                let previous = holds[r];
                holds[r] = Some(v);
                held_cost[r] = arc_cost[v];
                owner[v] = Some(r);
                match previous {
                    Some(col) if r != s => {
                        owner[col] = None;
                        v = parent[r];
                        debug_assert_eq!(v, col);
                    }
                    _ => break,
                }
            }
        }
        let mut pairs = Vec::new();
        let mut objective = 0.0;
        for (r, held) in holds.iter().enumerate() {
            if let Some(node) = *held
                && node < n + m
            {
                pairs.push((r, node - n));
                objective += sign * held_cost[r];
            }
        }
        Ok(Assignment { objective, pairs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(seed: u64, rows: usize, cols: usize, density: u64, span: i64) -> Problem {
        let mut state = seed.max(1);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut edges = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                if next() % 100 < density {
                    let w = (next() % (2 * span as u64 + 1)) as i64 - span / 2;
                    edges.push((r, c, w as f64));
                }
            }
        }
        Problem { rows, cols, edges }
    }

    /// The auction (through `solve_sparse`) or the shortest-path solver.
    fn solve(p: &Problem, maximize: bool, paths: bool) -> Assignment {
        if paths {
            p.solve_sparse_paths(maximize).unwrap()
        } else {
            p.solve_sparse(maximize).unwrap()
        }
    }

    #[test]
    fn sparse_equals_dense_on_random_problems() {
        for seed in 1..400u64 {
            let rows = (seed % 9) as usize;
            let cols = ((seed * 7) % 11) as usize;
            let p = random(seed, rows, cols, [100, 60, 25][(seed % 3) as usize], 10);
            for (maximize, paths) in [(true, false), (false, false), (true, true), (false, true)] {
                let dense = p.solve_partial(maximize).unwrap();
                let sparse = solve(&p, maximize, paths);
                assert!(
                    (dense.objective - sparse.objective).abs() < 1e-9,
                    "seed {seed} max {maximize} paths {paths}: dense {} sparse {}",
                    dense.objective,
                    sparse.objective
                );
                let mut cols_used: Vec<usize> = sparse.pairs.iter().map(|x| x.1).collect();
                cols_used.sort_unstable();
                cols_used.dedup();
                assert_eq!(
                    cols_used.len(),
                    sparse.pairs.len(),
                    "seed {seed}: a column twice"
                );
            }
        }
    }

    #[test]
    fn larger_problems_and_float_weights_agree() {
        for seed in 1..6u64 {
            let mut p = random(seed * 977, 120, 90, 15, 1000);
            for e in &mut p.edges {
                e.2 = e.2 / 7.0 + 0.25;
            }
            for (maximize, paths) in [(true, false), (false, false), (true, true), (false, true)] {
                let dense = p.solve_partial(maximize).unwrap();
                let sparse = solve(&p, maximize, paths);
                assert!(
                    (dense.objective - sparse.objective).abs()
                        < 1e-7 * dense.objective.abs().max(1.0),
                    "seed {seed} paths {paths}: {} vs {}",
                    dense.objective,
                    sparse.objective
                );
            }
        }
    }
}
