//! Exact sparse assignment by an ε-scaling forward–reverse auction on
//! integer benefits (Bertsekas' auction for asymmetric assignment).
//!
//! The problem: rows ("persons") and columns ("objects"), listed pairs only,
//! any row or column may stay unmatched at weight 0. Every row gets a
//! private "unmatched" object at benefit 0, so every row is assigned and
//! columns may stay free.
//!
//! **Exact, not approximate.** Weights are floats, but every finite float is
//! a dyadic rational: scaled by one power of two they are all integers. When
//! those integers fit in [`SPAN`] bits less the bits of rows + 1 (weights
//! whose magnitudes lie within a factor of about 10^12 of each other; else
//! the caller falls back to shortest paths), the exact benefits are those
//! integers times (rows + 1), in i128. The auction ends with
//! ε = 1 in ε-complementary slackness, free columns at price 0 and assigned
//! ones at price ≥ 0; then the assignment is within rows · ε < rows + 1 of
//! the optimum, and since every assignment's value is a multiple of
//! rows + 1 it is optimal. Nothing in that phase rounds.
//!
//! **Stages.** Coarse phases in f64 (fast; their prices only need to be
//! close, since any prices are a valid start), then one exact phase in
//! i128 at ε = 1. Each phase is forward bids, then reverse steps.
//! Forward phases with ε falling by a factor θ: all rows free
//! at the start of a phase, each free row bids for its best object,
//! raising the price by the gap to its second best plus ε, and evicts the
//! holder. Prices carry over between phases, so later phases start close
//! to the answer. After the last phase a column may be free at a positive
//! price (it was held in an earlier phase); reverse steps lower such a
//! price to 0 when no row would want it within ε, or sell it to the row that
//! values it most (which frees that row's object, which is then checked the
//! same way).

use super::assign::{Assignment, Problem};

const NONE: usize = usize::MAX;

/// A non-zero float as ±odd · 2^exp: (odd, exp).
fn dyadic(w: f64) -> (u64, i32) {
    let bits = w.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1u64 << 52) - 1);
    let (mantissa, exp) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1u64 << 52), biased - 1075)
    };
    let zeros = mantissa.trailing_zeros();
    (mantissa >> zeros, exp + zeros as i32)
}

/// Bits the exact benefits (scaled weights times rows + 1) may use; the
/// rest of an i128 is headroom for prices and differences.
const SPAN: i32 = 120;

/// The power of two that makes every weight an integer, or `None` when
/// the largest would then need more than `bits` bits.
fn integer_shift(edges: &[(usize, usize, f64)], bits: i32) -> Option<i32> {
    let mut shift = i32::MIN;
    let mut top = i32::MIN;
    for &(_, _, w) in edges {
        if w == 0.0 {
            continue;
        }
        let (odd, exp) = dyadic(w);
        shift = shift.max(-exp);
        top = top.max(exp + (64 - odd.leading_zeros() as i32));
    }
    if shift == i32::MIN {
        return Some(0);
    }
    (top.checked_add(shift)? <= bits).then_some(shift)
}

/// `w · 2^shift` exactly (an integer by the choice of `shift`).
#[inline]
fn to_integer(w: f64, shift: i32) -> i128 {
    if w == 0.0 {
        return 0;
    }
    let (odd, exp) = dyadic(w);
    let magnitude = (odd as i128) << (exp + shift) as u32;
    if w < 0.0 { -magnitude } else { magnitude }
}

/// Rows' arcs (CSR) and objects' in-arcs.
struct Graph {
    rows: usize,
    /// Objects: columns 0..cols, then row i's unmatched object cols + i.
    objects: usize,
    start: Vec<usize>,
    target: Vec<u32>,
    /// Each arc's weight, negated to minimise (so the auction maximises);
    /// 0 for the unmatched objects. The exact benefit is
    /// `to_integer(weight, shift) · scale`, with `scale` = rows + 1.
    weight: Vec<f64>,
    scale: i128,
    shift: i32,
    /// For each object, the arcs into it and their rows.
    in_start: Vec<usize>,
    in_arc: Vec<u32>,
    in_row: Vec<u32>,
    /// The weight of each in-arc (a copy, so a reverse step reads one
    /// contiguous run).
    in_weight: Vec<f64>,
}

impl Graph {
    fn new(problem: &Problem, shift: i32, maximize: bool) -> Self {
        let (n, m) = (problem.rows, problem.cols);
        let sign = if maximize { 1.0 } else { -1.0 };
        // Rows' arcs with room for each row's unmatched object.
        let mut start = vec![0usize; n + 1];
        for &(r, _, _) in &problem.edges {
            start[r + 1] += 1;
        }
        for r in 0..n {
            start[r + 1] += start[r] + 1;
        }
        let total = start[n];
        let mut target = vec![0u32; total];
        let mut weight = vec![0.0f64; total];
        let mut fill = start.clone();
        for &(r, c, w) in &problem.edges {
            target[fill[r]] = c as u32;
            weight[fill[r]] = sign * w;
            fill[r] += 1;
        }
        // Compact: the unmatched object last, a repeated pair keeps its best.
        let mut seen = vec![usize::MAX; m];
        let mut write = 0;
        let mut begin = 0;
        for i in 0..n {
            let row_start = write;
            for e in begin..fill[i] {
                let c = target[e] as usize;
                let at = seen[c];
                if at != usize::MAX && at >= row_start {
                    weight[at] = weight[at].max(weight[e]);
                    continue;
                }
                seen[c] = write;
                target[write] = target[e];
                weight[write] = weight[e];
                write += 1;
            }
            target[write] = (m + i) as u32;
            weight[write] = 0.0;
            write += 1;
            begin = start[i + 1];
            start[i + 1] = write;
        }
        target.truncate(write);
        weight.truncate(write);
        let objects = m + n;
        let mut in_start = vec![0usize; objects + 1];
        for &t in &target {
            in_start[t as usize + 1] += 1;
        }
        for o in 0..objects {
            in_start[o + 1] += in_start[o];
        }
        let mut place = in_start.clone();
        let mut in_arc = vec![0u32; target.len()];
        let mut in_row = vec![0u32; target.len()];
        let mut in_weight = vec![0.0f64; target.len()];
        for i in 0..n {
            for e in start[i]..start[i + 1] {
                let o = target[e] as usize;
                in_arc[place[o]] = e as u32;
                in_row[place[o]] = i as u32;
                in_weight[place[o]] = weight[e];
                place[o] += 1;
            }
        }
        Graph {
            rows: n,
            objects,
            start,
            target,
            weight,
            scale: n as i128 + 1,
            shift,
            in_start,
            in_arc,
            in_row,
            in_weight,
        }
    }

    #[inline]
    fn object(&self, arc: usize) -> usize {
        self.target[arc] as usize
    }
}

/// The number type of prices and profits: `f64` for the coarse phases
/// (fast, approximate: any prices are a valid start), `i128` for the exact
/// ones.
trait Money:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::AddAssign
{
    /// Below every value a row or object can see.
    const LOW: Self;
    const ZERO: Self;
    /// An arc's benefit from its weight: the weight itself, or its exact
    /// integer image times `scale`.
    fn benefit(weight: f64, shift: i32, scale: i128) -> Self;
}

impl Money for f64 {
    const LOW: Self = f64::NEG_INFINITY;
    const ZERO: Self = 0.0;
    #[inline]
    fn benefit(weight: f64, _shift: i32, _scale: i128) -> Self {
        weight
    }
}

impl Money for i128 {
    const LOW: Self = i128::MIN / 4;
    const ZERO: Self = 0;
    #[inline]
    fn benefit(weight: f64, shift: i32, scale: i128) -> Self {
        to_integer(weight, shift) * scale
    }
}

/// The best value over `range`, where it is, and the second best value
/// (`LOW` when the range has one element; `NONE` where when it has none).
#[inline]
fn best_two<T: Money>(range: std::ops::Range<usize>, value: impl Fn(usize) -> T) -> (T, usize, T) {
    let (mut v1, mut a1, mut v2) = (T::LOW, NONE, T::LOW);
    for k in range {
        let v = value(k);
        if v > v1 {
            v2 = v1;
            (v1, a1) = (v, k);
        } else if v > v2 {
            v2 = v;
        }
    }
    (v1, a1, v2)
}

struct Auction<'g, T> {
    g: &'g Graph,
    price: Vec<T>,
    /// Each row's profit: benefit of its arc minus its object's price.
    profit: Vec<T>,
    owner: Vec<usize>,
    held: Vec<usize>,
    /// Bids and reverse steps so far.
    bids: usize,
}

impl<'g, T: Money> Auction<'g, T> {
    fn new(g: &'g Graph, price: Vec<T>) -> Self {
        Auction {
            g,
            price,
            profit: vec![T::ZERO; g.rows],
            owner: vec![NONE; g.objects],
            held: vec![NONE; g.rows],
            bids: 0,
        }
    }

    fn place(&mut self, row: usize, arc: usize) {
        let object = self.g.object(arc);
        self.owner[object] = row;
        self.held[row] = arc;
        self.profit[row] =
            T::benefit(self.g.weight[arc], self.g.shift, self.g.scale) - self.price[object];
    }

    /// One forward phase: every row free at the start, bids until all hold
    /// an object.
    fn forward(&mut self, eps: T) {
        let g = self.g;
        self.owner.fill(NONE);
        self.held.fill(NONE);
        let mut stack: Vec<usize> = (0..g.rows).rev().collect();
        while let Some(i) = stack.pop() {
            let (first, last) = (g.start[i], g.start[i + 1]);
            self.bids += 1;
            let price = &self.price;
            let (v1, a1, v2) = best_two(first..last, |e| {
                T::benefit(g.weight[e], g.shift, g.scale) - price[g.object(e)]
            });
            let object = g.object(a1);
            // A row with a single arc owns that object alone.
            let raise = if v2 == T::LOW { eps } else { v1 - v2 + eps };
            self.price[object] += raise;
            let previous = self.owner[object];
            self.place(i, a1);
            if previous != NONE {
                self.held[previous] = NONE;
                stack.push(previous);
            }
        }
    }

    /// Reverse steps until every free object is at price 0, keeping
    /// ε-complementary slackness: a free object drops to 0 when no row would
    /// gain more than ε by taking it there; otherwise it goes to the row
    /// that gains most, at the price that leaves the runner-up within ε,
    /// and that row's old object is checked next.
    fn reverse(&mut self, eps: T) {
        let g = self.g;
        let mut queue: Vec<usize> = (0..g.objects)
            .filter(|&o| self.owner[o] == NONE && self.price[o] > T::ZERO)
            .collect();
        while let Some(o) = queue.pop() {
            if self.owner[o] != NONE || self.price[o] <= T::ZERO {
                continue;
            }
            let (first, last) = (g.in_start[o], g.in_start[o + 1]);
            self.bids += 1;
            let profit = &self.profit;
            let (b1, a1, b2) = best_two(first..last, |k| {
                T::benefit(g.in_weight[k], g.shift, g.scale) - profit[g.in_row[k] as usize]
            });
            if a1 == NONE || b1 - eps <= T::ZERO {
                self.price[o] = T::ZERO;
                continue;
            }
            let row = g.in_row[a1] as usize;
            let arc = g.in_arc[a1] as usize;
            let floor = b2 - eps;
            self.price[o] = if b2 == T::LOW || floor < T::ZERO {
                T::ZERO
            } else {
                floor
            };
            let previous = g.object(self.held[row]);
            self.owner[previous] = NONE;
            self.place(row, arc);
            if self.price[previous] > T::ZERO {
                queue.push(previous);
            }
        }
    }

    /// A forward phase then reverse steps at `eps`; returns the bids.
    fn phase(&mut self, eps: T) -> usize {
        let before = self.bids;
        self.forward(eps);
        self.reverse(eps);
        self.bids - before
    }
}

/// ε falls by this factor per coarse phase.
const THETA: f64 = 16.0;
/// Coarse phases stop once a phase needs at most this many bids per row
/// (prices are then close enough that the exact phase is cheap), or when
/// ε reaches this fraction of the largest weight.
const QUIET: usize = 2;
const FINEST: f64 = 1e-12;
/// ... but not before ε is this small a fraction of the largest weight (the
/// first phases are quiet too when ε is huge).
const SETTLED: f64 = 1e-6;

/// Solves `problem` exactly, or returns `None` when its weights cannot be
/// made integers in 62 bits by one power-of-two scale.
pub(crate) fn solve(problem: &Problem, maximize: bool) -> Option<Assignment> {
    let (n, m) = (problem.rows, problem.cols);
    // Object and arc ids are u32.
    let limit = u32::MAX as usize;
    if n.checked_add(m)? >= limit || problem.edges.len().checked_add(n)? >= limit {
        return None;
    }
    let scale = n as i128 + 1;
    let shift = integer_shift(&problem.edges, SPAN - (128 - scale.leading_zeros() as i32))?;
    // Exact units per weight unit; beyond f64's range the coarse prices
    // could not be carried over.
    let factor = 2f64.powi(shift) * scale as f64;
    if !factor.is_finite() || factor <= 0.0 {
        return None;
    }
    let g = Graph::new(problem, shift, maximize);
    let top = g.weight.iter().fold(0.0f64, |a, w| a.max(w.abs()));
    let mut coarse = Auction::<f64>::new(&g, vec![0.0; g.objects]);
    let mut eps = top / 8.0;
    while eps >= top * FINEST && eps * factor >= 1.0 {
        let bids = coarse.phase(eps);
        if bids <= QUIET * n.max(1) && eps <= top * SETTLED {
            break;
        }
        eps /= THETA;
    }
    // The exact phase at ε = 1 exact unit, from the coarse prices.
    let ceiling = 2f64.powi(SPAN);
    let price = coarse
        .price
        .iter()
        .map(|&p| (p * factor).round().clamp(0.0, ceiling) as i128)
        .collect();
    let mut exact = Auction::<i128>::new(&g, price);
    exact.phase(1);
    let sign = if maximize { 1.0 } else { -1.0 };
    let mut pairs = Vec::new();
    let mut objective = 0.0;
    for (i, &arc) in exact.held.iter().enumerate() {
        let c = g.object(arc);
        if c < m {
            pairs.push((i, c));
            objective += sign * g.weight[arc];
        }
    }
    Some(Assignment { objective, pairs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed.max(1);
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// The exact value of a set of pairs (best weight of a repeated pair),
    /// as an integer at `shift`.
    fn exact_value(
        problem: &Problem,
        pairs: &[(usize, usize)],
        maximize: bool,
        shift: i32,
    ) -> i128 {
        let sign = if maximize { 1 } else { -1 };
        pairs
            .iter()
            .map(|&(r, c)| {
                problem
                    .edges
                    .iter()
                    .filter(|e| e.0 == r && e.1 == c)
                    .map(|e| sign * to_integer(e.2, shift))
                    .max()
                    .expect("a pair the problem lists")
            })
            .sum()
    }

    /// The best partial assignment by enumeration, exactly.
    fn brute_force(problem: &Problem, maximize: bool, shift: i32) -> i128 {
        fn go(
            row: usize,
            used: &mut Vec<bool>,
            problem: &Problem,
            value: &dyn Fn(usize, usize) -> i128,
        ) -> i128 {
            if row == problem.rows {
                return 0;
            }
            let mut best = go(row + 1, used, problem, value);
            for c in 0..problem.cols {
                if !used[c] && problem.edges.iter().any(|e| e.0 == row && e.1 == c) {
                    used[c] = true;
                    best = best.max(value(row, c) + go(row + 1, used, problem, value));
                    used[c] = false;
                }
            }
            best
        }
        let value = |r: usize, c: usize| exact_value(problem, &[(r, c)], maximize, shift);
        go(0, &mut vec![false; problem.cols], problem, &value)
    }

    #[test]
    fn integer_images_are_exact() {
        assert_eq!(to_integer(0.75, 2), 3);
        assert_eq!(to_integer(-0.75, 3), -6);
        assert_eq!(to_integer(0.0, 10), 0);
        assert_eq!(to_integer(f64::MIN_POSITIVE / 4.0, 1024), 1);
        let edges = [(0, 0, 0.75), (0, 1, -12.0), (1, 0, 1.0 + f64::EPSILON)];
        let shift = integer_shift(&edges, 120).expect("fits");
        assert_eq!(shift, 52);
        for &(_, _, w) in &edges {
            assert_eq!(to_integer(w, shift) as f64, w * 2f64.powi(shift));
        }
        // 1e300 and 1e-300 need about 2,000 bits.
        assert_eq!(integer_shift(&[(0, 0, 1e300), (0, 1, 1e-300)], 120), None);
    }

    #[test]
    fn equals_brute_force_exactly_on_tiny_problems() {
        // Weights with ties, signs, and gaps of one unit in the last place:
        // an ε-optimal answer would get some of these wrong.
        let one_up = 1.0 + f64::EPSILON;
        let pool = [
            0.0,
            1.0,
            -1.0,
            2.0,
            3.0,
            -2.5,
            one_up,
            1.0 + 2.0 * f64::EPSILON,
            0.1,
            0.3,
            1e-9,
            7.25,
        ];
        let mut next = xorshift(42);
        for case in 0..3000 {
            let rows = (next() % 6) as usize;
            let cols = (next() % 6) as usize;
            let mut edges = Vec::new();
            for r in 0..rows {
                for c in 0..cols {
                    // Some pairs twice, to check the best copy counts.
                    for _ in 0..[0, 1, 1, 2][(next() % 4) as usize] {
                        edges.push((r, c, pool[(next() % pool.len() as u64) as usize]));
                    }
                }
            }
            let problem = Problem { rows, cols, edges };
            let shift = integer_shift(&problem.edges, 120).expect("fits");
            for maximize in [true, false] {
                let solved = solve(&problem, maximize).expect("scalable weights");
                let mut columns: Vec<usize> = solved.pairs.iter().map(|p| p.1).collect();
                columns.sort_unstable();
                columns.dedup();
                assert_eq!(
                    columns.len(),
                    solved.pairs.len(),
                    "case {case}: a column twice"
                );
                assert_eq!(
                    exact_value(&problem, &solved.pairs, maximize, shift),
                    brute_force(&problem, maximize, shift),
                    "case {case} maximize {maximize}: {problem:?}"
                );
            }
        }
    }

    #[test]
    fn agrees_with_shortest_paths_on_larger_problems() {
        let mut next = xorshift(7);
        for case in 0..12 {
            let (rows, cols) = (150 + case * 20, 120 + case * 25);
            let mut edges = Vec::new();
            for r in 0..rows {
                for _ in 0..8 {
                    let c = (next() % cols as u64) as usize;
                    let w = (next() % 2_000_000) as f64 / 1e5 - 4.0;
                    edges.push((r, c, w));
                }
            }
            let problem = Problem { rows, cols, edges };
            for maximize in [true, false] {
                let auction = solve(&problem, maximize).expect("scalable weights");
                let paths = problem.solve_sparse_paths(maximize).expect("solvable");
                assert!(
                    (auction.objective - paths.objective).abs()
                        <= 1e-9 * paths.objective.abs().max(1.0),
                    "case {case} maximize {maximize}: auction {} paths {}",
                    auction.objective,
                    paths.objective
                );
            }
        }
    }

    #[test]
    fn weights_too_far_apart_fall_back_to_shortest_paths() {
        let problem = Problem {
            rows: 2,
            cols: 2,
            edges: vec![(0, 0, 1e300), (0, 1, 1e-300), (1, 0, 1e300), (1, 1, 2e-300)],
        };
        assert!(solve(&problem, true).is_none());
        let sparse = problem.solve_sparse(true).expect("shortest paths");
        let dense = problem.solve_partial(true).expect("dense");
        assert_eq!(sparse.objective, dense.objective);
    }

    #[test]
    fn empty_and_all_zero_problems() {
        for (rows, cols) in [(0, 0), (0, 3), (3, 0)] {
            let solved = solve(
                &Problem {
                    rows,
                    cols,
                    edges: vec![],
                },
                true,
            )
            .expect("trivial");
            assert_eq!(solved.objective, 0.0);
            assert!(solved.pairs.is_empty());
        }
        let zeros = Problem {
            rows: 3,
            cols: 3,
            edges: (0..9).map(|k| (k / 3, k % 3, 0.0)).collect(),
        };
        assert_eq!(solve(&zeros, true).expect("zeros").objective, 0.0);
    }
}
