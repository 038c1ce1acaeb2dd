//! Maximum- or minimum-weight bipartite assignment.
//!
//! Problems have `rows` × `cols` with a weight on each allowed pair. Two
//! semantics:
//!
//! - **partial** (the default, what dispatch needs): any row or column may
//!   stay unmatched at weight 0; pairs not given are forbidden. Solved as a
//!   rectangular assignment over the columns plus one private "stay
//!   unmatched" column per row.
//! - **complete**: exactly min(rows, cols) pairs, as scipy's
//!   `linear_sum_assignment`; fails when the allowed pairs admit no such
//!   matching.
//!
//! The solver is the shortest-augmenting-path Hungarian method with row and
//! column potentials (Kuhn–Munkres in the form of Jonker–Volgenant's
//! augmentation): each row is added by a Dijkstra-like search over reduced
//! costs, O(n²m) in the worst case.

use serde::Serialize;

/// One assignment problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Allowed pairs and their weights.
    pub edges: Vec<(usize, usize, f64)>,
}

/// Why a problem cannot be solved.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AssignError {
    /// An edge names a row or column outside the problem.
    #[error("edge {index}: ({row}, {col}) is outside {rows} x {cols}")]
    OutOfRange {
        /// The edge's position in the list.
        index: usize,
        /// Its row.
        row: usize,
        /// Its column.
        col: usize,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// A weight is NaN or infinite.
    #[error("edge {index} ({row}, {col}): weight {weight} is not a finite number")]
    NotFinite {
        /// The edge's position.
        index: usize,
        /// Its row.
        row: usize,
        /// Its column.
        col: usize,
        /// The weight.
        weight: f64,
    },
    /// `complete` was asked for but no complete matching exists.
    #[error("no assignment matches all {0} rows (or columns) with the allowed pairs")]
    Infeasible(usize),
}

/// The solution.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Assignment {
    /// Sum of the weights of the pairs.
    pub objective: f64,
    /// Matched (row, column) pairs, by row.
    pub pairs: Vec<(usize, usize)>,
}

/// Minimises Σ cost over an n × m matrix (n ≤ m), every row matched;
/// `f64::INFINITY` marks a forbidden cell. Returns the column of each row,
/// or `None` when some row can only take forbidden cells.
///
/// Square matrices without forbidden cells go to [`jonker_volgenant`];
/// everything else to the shortest-augmenting-path Hungarian method.
pub fn hungarian(cost: &[f64], n: usize, m: usize) -> Option<Vec<usize>> {
    debug_assert!(n <= m && cost.len() == n * m);
    if n == m && n > 0 && cost.iter().all(|c| c.is_finite()) {
        return Some(jonker_volgenant(cost, n));
    }
    shortest_augmenting_path(cost, n, m)
}

/// Jonker & Volgenant's LAPJV ("A shortest augmenting path algorithm for
/// dense and sparse linear assignment problems", Computing 38, 1987) on a
/// square matrix of finite costs: column reduction, reduction transfer and
/// two rounds of augmenting row reduction assign most rows cheaply; the rows
/// still free are then added by Dijkstra over reduced costs, scanning
/// columns in blocks of equal distance. Returns the column of each row.
// Index loops over rows and columns read like the paper's pseudocode, and
// most of them touch several arrays at once.
#[allow(clippy::needless_range_loop)]
pub fn jonker_volgenant(cost: &[f64], n: usize) -> Vec<usize> {
    const NONE: usize = usize::MAX;
    let c = |i: usize, j: usize| cost[i * n + j];
    let mut v = vec![0.0f64; n];
    let mut row_col = vec![NONE; n];
    let mut col_row = vec![NONE; n];
    let mut matches = vec![0u32; n];
    // Column reduction: each column's price is its least cost, and goes to
    // that row when the row has nothing cheaper yet.
    for j in (0..n).rev() {
        let (mut min, mut imin) = (c(0, j), 0);
        for i in 1..n {
            if c(i, j) < min {
                min = c(i, j);
                imin = i;
            }
        }
        v[j] = min;
        matches[imin] += 1;
        if matches[imin] == 1 {
            row_col[imin] = j;
            col_row[j] = imin;
        } else if v[j] < v[row_col[imin]] {
            let j1 = row_col[imin];
            row_col[imin] = j;
            col_row[j] = imin;
            col_row[j1] = NONE;
        } else {
            col_row[j] = NONE;
        }
    }
    // Reduction transfer: a row that got one column passes its slack to it.
    let mut free = Vec::with_capacity(n);
    for i in 0..n {
        if matches[i] == 0 {
            free.push(i);
        } else if matches[i] == 1 {
            let j1 = row_col[i];
            let mut min = f64::INFINITY;
            for j in 0..n {
                if j != j1 && c(i, j) - v[j] < min {
                    min = c(i, j) - v[j];
                }
            }
            if min.is_finite() {
                v[j1] -= min;
            }
        }
    }
    // Augmenting row reduction, twice: a free row takes its cheapest column
    // and lowers that column's price to its second-cheapest, evicting the
    // owner, which is processed next.
    for _ in 0..2 {
        let todo = std::mem::take(&mut free);
        let mut k = 0;
        let mut stack = todo;
        // In floating point two rows can trade a column back and forth by
        // ever smaller price steps; past a budget, the augmentation phase
        // takes the rows still waiting.
        let mut budget = 4 * n + 16;
        while k < stack.len() {
            if budget == 0 {
                free.extend_from_slice(&stack[k..]);
                break;
            }
            budget -= 1;
            let i = stack[k];
            k += 1;
            let (mut umin, mut j1) = (c(i, 0) - v[0], 0usize);
            let (mut usubmin, mut j2) = (f64::INFINITY, NONE);
            for j in 1..n {
                let h = c(i, j) - v[j];
                if h < usubmin {
                    if h >= umin {
                        usubmin = h;
                        j2 = j;
                    } else {
                        usubmin = umin;
                        umin = h;
                        j2 = j1;
                        j1 = j;
                    }
                }
            }
            let mut i0 = col_row[j1];
            let strict = umin < usubmin;
            if strict {
                v[j1] -= usubmin - umin;
            } else if i0 != NONE && j2 != NONE {
                j1 = j2;
                i0 = col_row[j2];
            }
            if row_col[i] != NONE && col_row[row_col[i]] == i {
                col_row[row_col[i]] = NONE;
            }
            row_col[i] = j1;
            col_row[j1] = i;
            if i0 != NONE {
                row_col[i0] = NONE;
                if strict {
                    // Process the evicted row right away.
                    k -= 1;
                    stack[k] = i0;
                } else {
                    free.push(i0);
                }
            }
        }
    }
    // Augmentation: Dijkstra from each remaining free row.
    let mut d = vec![0.0f64; n];
    let mut pred = vec![0usize; n];
    let mut cols: Vec<usize> = (0..n).collect();
    for &start in &free {
        for j in 0..n {
            d[j] = c(start, j) - v[j];
            pred[j] = start;
            cols[j] = j;
        }
        // cols[..low]: settled; cols[low..up]: at the current minimum,
        // to scan; cols[up..]: not yet reached at the minimum.
        let (mut low, mut up) = (0usize, 0usize);
        let mut last = 0usize;
        let mut min = 0.0f64;
        let end;
        'search: loop {
            if up == low {
                last = low;
                min = d[cols[up]];
                up += 1;
                let mut k = up;
                while k < n {
                    let j = cols[k];
                    let h = d[j];
                    if h <= min {
                        if h < min {
                            up = low;
                            min = h;
                        }
                        cols[k] = cols[up];
                        cols[up] = j;
                        up += 1;
                    }
                    k += 1;
                }
                for &j in &cols[low..up] {
                    if col_row[j] == NONE {
                        end = j;
                        break 'search;
                    }
                }
            }
            let j1 = cols[low];
            low += 1;
            let i = col_row[j1];
            let h = c(i, j1) - v[j1] - min;
            let mut k = up;
            while k < n {
                let j = cols[k];
                let reduced = c(i, j) - v[j] - h;
                if reduced < d[j] {
                    pred[j] = i;
                    if reduced == min {
                        if col_row[j] == NONE {
                            end = j;
                            break 'search;
                        }
                        cols[k] = cols[up];
                        cols[up] = j;
                        up += 1;
                    }
                    d[j] = reduced;
                }
                k += 1;
            }
        }
        // Settled columns move their prices by how much closer they were.
        for &j in &cols[..last] {
            v[j] += d[j] - min;
        }
        // Flip the alternating path back to the start row.
        let mut j = end;
        loop {
            let i = pred[j];
            col_row[j] = i;
            let next = row_col[i];
            row_col[i] = j;
            if i == start {
                break;
            }
            j = next;
        }
    }
    row_col
}

/// The classic shortest-augmenting-path Hungarian method (row by row, with
/// row and column potentials), for rectangular matrices and forbidden cells.
fn shortest_augmenting_path(cost: &[f64], n: usize, m: usize) -> Option<Vec<usize>> {
    // 1-based arrays with a virtual column 0, as in the classic formulation.
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; m + 1];
    let mut owner = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    let mut minv = vec![0.0f64; m + 1];
    let mut used = vec![false; m + 1];
    for i in 1..=n {
        owner[0] = i;
        let mut j0 = 0usize;
        minv.fill(f64::INFINITY);
        used.fill(false);
        loop {
            used[j0] = true;
            let i0 = owner[j0];
            let row = &cost[(i0 - 1) * m..i0 * m];
            let mut delta = f64::INFINITY;
            let mut j1 = 0usize;
            for j in 1..=m {
                if !used[j] {
                    let reduced = row[j - 1] - u[i0] - v[j];
                    if reduced < minv[j] {
                        minv[j] = reduced;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            if !delta.is_finite() {
                return None;
            }
            for j in 0..=m {
                if used[j] {
                    u[owner[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if owner[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            owner[j0] = owner[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut column = vec![0usize; n];
    for j in 1..=m {
        if owner[j] != 0 {
            column[owner[j] - 1] = j - 1;
        }
    }
    Some(column)
}

impl Problem {
    pub(crate) fn check(&self) -> Result<(), AssignError> {
        for (index, &(row, col, weight)) in self.edges.iter().enumerate() {
            if row >= self.rows || col >= self.cols {
                return Err(AssignError::OutOfRange {
                    index,
                    row,
                    col,
                    rows: self.rows,
                    cols: self.cols,
                });
            }
            if !weight.is_finite() {
                return Err(AssignError::NotFinite {
                    index,
                    row,
                    col,
                    weight,
                });
            }
        }
        Ok(())
    }

    /// Solves with unmatched rows and columns allowed at weight 0,
    /// maximising (or minimising) the total weight.
    pub fn solve_partial(&self, maximize: bool) -> Result<Assignment, AssignError> {
        self.check()?;
        let (n, m) = (self.rows, self.cols);
        if n == 0 || m == 0 {
            return Ok(Assignment {
                objective: 0.0,
                pairs: Vec::new(),
            });
        }
        let sign = if maximize { -1.0 } else { 1.0 };
        // Columns 0..m are real; column m + i lets row i stay unmatched.
        let width = m + n;
        let mut cost = vec![f64::INFINITY; n * width];
        for i in 0..n {
            cost[i * width + m + i] = 0.0;
        }
        for &(r, c, w) in &self.edges {
            let cell = &mut cost[r * width + c];
            // Duplicate pairs: keep the better weight.
            *cell = cell.min(sign * w);
        }
        let columns = hungarian(&cost, n, width).ok_or(AssignError::Infeasible(n))?;
        let mut pairs = Vec::new();
        let mut objective = 0.0;
        for (r, &c) in columns.iter().enumerate() {
            if c < m {
                pairs.push((r, c));
                objective += sign * cost[r * width + c];
            }
        }
        Ok(Assignment { objective, pairs })
    }

    /// Solves with exactly min(rows, cols) pairs (scipy's semantics).
    pub fn solve_complete(&self, maximize: bool) -> Result<Assignment, AssignError> {
        self.check()?;
        let transpose = self.rows > self.cols;
        let (n, m) = if transpose {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        };
        if n == 0 {
            return Ok(Assignment {
                objective: 0.0,
                pairs: Vec::new(),
            });
        }
        let sign = if maximize { -1.0 } else { 1.0 };
        let mut cost = vec![f64::INFINITY; n * m];
        for &(r, c, w) in &self.edges {
            let (a, b) = if transpose { (c, r) } else { (r, c) };
            let cell = &mut cost[a * m + b];
            *cell = cell.min(sign * w);
        }
        let columns = hungarian(&cost, n, m).ok_or(AssignError::Infeasible(n))?;
        let mut pairs: Vec<(usize, usize)> = Vec::with_capacity(n);
        let mut objective = 0.0;
        for (a, &b) in columns.iter().enumerate() {
            let w = cost[a * m + b];
            if !w.is_finite() {
                return Err(AssignError::Infeasible(n));
            }
            objective += sign * w;
            pairs.push(if transpose { (b, a) } else { (a, b) });
        }
        pairs.sort_unstable();
        Ok(Assignment { objective, pairs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(rows: usize, cols: usize, w: &[f64]) -> Problem {
        Problem {
            rows,
            cols,
            edges: (0..rows)
                .flat_map(|r| (0..cols).map(move |c| (r, c)))
                .map(|(r, c)| (r, c, w[r * cols + c]))
                .collect(),
        }
    }

    /// Every assignment of a small problem, by brute force.
    fn brute_partial(p: &Problem, maximize: bool) -> f64 {
        let mut weight = vec![None; p.rows * p.cols];
        for &(r, c, w) in &p.edges {
            weight[r * p.cols + c] = Some(w);
        }
        fn go(
            r: usize,
            p: &Problem,
            weight: &[Option<f64>],
            used: &mut Vec<bool>,
            maximize: bool,
        ) -> f64 {
            if r == p.rows {
                return 0.0;
            }
            let mut best = go(r + 1, p, weight, used, maximize);
            for c in 0..p.cols {
                if let (false, Some(w)) = (used[c], weight[r * p.cols + c]) {
                    used[c] = true;
                    let total = w + go(r + 1, p, weight, used, maximize);
                    used[c] = false;
                    if (maximize && total > best) || (!maximize && total < best) {
                        best = total;
                    }
                }
            }
            best
        }
        go(0, p, &weight, &mut vec![false; p.cols], maximize)
    }

    #[test]
    fn known_small_problems() {
        let p = dense(3, 3, &[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 3.0, 2.0, 2.0]);
        // scipy.optimize.linear_sum_assignment gives cost 5 for this matrix.
        let done = p.solve_complete(false).unwrap();
        assert_eq!(done.objective, 5.0);
        assert_eq!(done.pairs, vec![(0, 1), (1, 0), (2, 2)]);
        let done = p.solve_complete(true).unwrap();
        assert_eq!(done.objective, 11.0);
        // Partial, minimising: only negative weights are worth taking.
        assert_eq!(p.solve_partial(false).unwrap().objective, 0.0);
        let empty = Problem {
            rows: 0,
            cols: 5,
            edges: vec![],
        };
        assert_eq!(empty.solve_partial(true).unwrap().pairs, vec![]);
        assert_eq!(empty.solve_complete(true).unwrap().objective, 0.0);
    }

    #[test]
    fn partial_matches_brute_force_with_forbidden_pairs_and_negatives() {
        let mut state = 7u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let rows = (next() % 5) as usize;
            let cols = (next() % 5) as usize;
            let mut edges = Vec::new();
            for r in 0..rows {
                for c in 0..cols {
                    if next() % 3 != 0 {
                        edges.push((r, c, (next() % 21) as f64 - 8.0));
                    }
                }
            }
            let p = Problem { rows, cols, edges };
            for maximize in [true, false] {
                let done = p.solve_partial(maximize).unwrap();
                assert_eq!(done.objective, brute_partial(&p, maximize), "{p:?}");
                let mut cols_used: Vec<usize> = done.pairs.iter().map(|x| x.1).collect();
                cols_used.sort_unstable();
                cols_used.dedup();
                assert_eq!(cols_used.len(), done.pairs.len());
            }
        }
    }

    #[test]
    fn jonker_volgenant_equals_the_hungarian_method() {
        // Random square problems: small integer costs (many ties), negative
        // costs, wide floats; the objective must equal the classic method's.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for case in 0..600 {
            let n = 1 + case % 60;
            let cost: Vec<f64> = (0..n * n)
                .map(|_| match case % 3 {
                    0 => rng.random_range(0..4) as f64,
                    1 => rng.random_range(-50..50) as f64,
                    _ => rng.random::<f64>() * 1e3 - 5e2,
                })
                .collect();
            let jv = jonker_volgenant(&cost, n);
            let sap = shortest_augmenting_path(&cost, n, n).expect("finite costs");
            let mut seen = vec![false; n];
            for &j in &jv {
                assert!(!seen[j], "case {case}: column {j} twice");
                seen[j] = true;
            }
            let total = |cols: &[usize]| -> f64 {
                cols.iter().enumerate().map(|(i, j)| cost[i * n + j]).sum()
            };
            let (a, b) = (total(&jv), total(&sap));
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                "case {case} n {n}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn bad_weights_and_infeasible_complete_problems_are_errors() {
        let p = Problem {
            rows: 1,
            cols: 1,
            edges: vec![(0, 0, f64::NAN)],
        };
        assert!(matches!(
            p.solve_partial(true),
            Err(AssignError::NotFinite { .. })
        ));
        let p = Problem {
            rows: 1,
            cols: 1,
            edges: vec![(0, 3, 1.0)],
        };
        assert!(matches!(
            p.solve_partial(true),
            Err(AssignError::OutOfRange { .. })
        ));
        let p = Problem {
            rows: 2,
            cols: 2,
            edges: vec![(0, 0, 1.0), (1, 0, 1.0)],
        };
        assert_eq!(p.solve_complete(true), Err(AssignError::Infeasible(2)));
        assert_eq!(p.solve_partial(true).unwrap().objective, 1.0);
    }
}

#[cfg(test)]
mod scipy {
    use super::*;

    /// 240 instances against scipy's `linear_sum_assignment`
    /// (`scripts/reference/assignment_reference.py`; CI regenerates it).
    #[test]
    fn objectives_match_scipy() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/assignment_reference.json"
        ))
        .unwrap();
        let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut compared = 0;
        for (k, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
            let problem = Problem {
                rows: case["rows"].as_u64().unwrap() as usize,
                cols: case["cols"].as_u64().unwrap() as usize,
                edges: case["edges"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        (
                            e[0].as_u64().unwrap() as usize,
                            e[1].as_u64().unwrap() as usize,
                            e[2].as_f64().unwrap(),
                        )
                    })
                    .collect(),
            };
            for (key, complete, maximize) in [
                ("partial_max", false, true),
                ("partial_min", false, false),
                ("complete_max", true, true),
                ("complete_min", true, false),
            ] {
                let Some(expected) = case[key].as_f64() else {
                    continue;
                };
                let done = if complete {
                    problem.solve_complete(maximize)
                } else {
                    problem.solve_partial(maximize)
                }
                .unwrap();
                assert!(
                    (done.objective - expected).abs() <= 1e-9 * expected.abs().max(1.0),
                    "case {k} {key}: ours {}, scipy {expected}",
                    done.objective
                );
                compared += 1;
                if !complete {
                    // The sparse solver answers the same partial problems.
                    let sparse = problem.solve_sparse(maximize).unwrap();
                    assert!(
                        (sparse.objective - expected).abs() <= 1e-9 * expected.abs().max(1.0),
                        "case {k} {key}: sparse {}, scipy {expected}",
                        sparse.objective
                    );
                    compared += 1;
                }
            }
        }
        assert!(compared > 1000, "{compared} comparisons");
    }
}
