//! Hashed sparse features for the global fixed effect, and the ridge
//! logistic regression that fits them.
//!
//! A hashed feature is a categorical field, or a cross of fields such as
//! `placement*hour`, whose value is hashed into one of 2^bits slots (the
//! hashing trick): a member id becomes a one-hot indicator without a
//! dictionary, and slots are shared by colliding values. Each row then has
//! its dense features (an intercept first) and one slot per hashed feature;
//! the fixed effect's coefficients are the p dense ones followed by the
//! 2^bits slot weights.
//!
//! The fit is the same ridge logistic regression as the dense one
//! (`Σ wᵢ log(1 + exp(−yᵢ sᵢ)) + (λ/2)‖θ‖²`), solved by truncated Newton:
//! each step solves the Newton system by conjugate gradients with
//! Hessian-vector products over the rows (no matrix is formed) and a
//! Jacobi preconditioner, then backtracks (Armijo). It converges to the same
//! optimum as the dense Newton solver; `hashed::tests` checks that on the
//! equivalent dense problem.

use super::{sigmoid, softplus};

/// The slot of `value` for the hashed feature `name` with 2^`bits` slots.
/// FNV-1a over `name`, a 0xFF separator and `value`, then the SplitMix64
/// finaliser; the top `bits` bits. Stable across platforms and releases:
/// models stay valid when the binary changes.
pub fn slot(name: &str, value: &str, bits: u32) -> u32 {
    let mut h = crate::placement::fnv1a(name.bytes().chain([0xFF]).chain(value.bytes()));
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let bits = bits.clamp(1, 31);
    (h >> (64 - bits)) as u32
}

/// The largest `bits` accepted (2^24 slots: 128 MiB of f64 weights).
pub const MAX_BITS: u32 = 24;

/// Rows for [`fit`]: dense features (n × `p`, an intercept first) and
/// `k` slots per row (n × `k`), with labels ±1, weights and offsets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HashedRows {
    /// Dense width.
    pub p: usize,
    /// Slots per row.
    pub k: usize,
    /// Dense values, row-major.
    pub dense: Vec<f64>,
    /// Slot indices (below 2^bits), row-major.
    pub slots: Vec<u32>,
    /// Labels, ±1.
    pub y: Vec<f64>,
    /// Weights.
    pub w: Vec<f64>,
    /// Offsets.
    pub offsets: Vec<f64>,
}

impl HashedRows {
    /// Empty rows of `p` dense features and `k` slots.
    pub fn new(p: usize, k: usize) -> Self {
        Self {
            p,
            k,
            ..Self::default()
        }
    }

    /// Adds a row.
    pub fn push(&mut self, dense: &[f64], slots: &[u32], y: f64, w: f64, offset: f64) {
        debug_assert_eq!((dense.len(), slots.len()), (self.p, self.k));
        self.dense.extend_from_slice(dense);
        self.slots.extend_from_slice(slots);
        self.y.push(y);
        self.w.push(w);
        self.offsets.push(offset);
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// xᵢᵀθ + oᵢ for row `i` (θ: p dense weights, then the slots').
    pub fn score(&self, i: usize, theta: &[f64]) -> f64 {
        score(
            &self.dense[i * self.p..(i + 1) * self.p],
            &self.slots[i * self.k..(i + 1) * self.k],
            theta,
        ) + self.offsets[i]
    }

    /// Adds `c · xᵢ` to `out`.
    fn add_row(&self, i: usize, c: f64, out: &mut [f64]) {
        let p = self.p;
        for (o, x) in out[..p].iter_mut().zip(&self.dense[i * p..(i + 1) * p]) {
            *o += c * x;
        }
        for &s in &self.slots[i * self.k..(i + 1) * self.k] {
            out[p + s as usize] += c;
        }
    }
}

/// The score of dense features and slots under θ (dense weights first).
pub fn score(dense: &[f64], slots: &[u32], theta: &[f64]) -> f64 {
    let p = dense.len();
    let d: f64 = dense.iter().zip(theta).map(|(a, b)| a * b).sum();
    d + slots
        .iter()
        .map(|&s| theta.get(p + s as usize).copied().unwrap_or(0.0))
        .sum::<f64>()
}

/// Why a fit failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FitError {
    /// A row holds a NaN or infinite value, a label other than ±1, or a
    /// slot out of range.
    #[error("row {row}: {what}")]
    Input {
        /// The row.
        row: usize,
        /// What is wrong.
        what: String,
    },
    /// No convergence within the iteration limit.
    #[error(
        "the hashed fixed effect did not converge in {iterations} Newton steps (gradient {gradient:e})"
    )]
    NoConvergence {
        /// Newton steps taken.
        iterations: usize,
        /// The gradient's norm then.
        gradient: f64,
    },
}

/// The ridge logistic regression on `rows` with 2^`bits` slots and penalty
/// `lambda` (> 0); returns θ (p dense weights, then the slots'), from θ = 0.
pub fn fit(rows: &HashedRows, bits: u32, lambda: f64) -> Result<Vec<f64>, FitError> {
    let n = rows.len();
    let dim = rows.p + (1usize << bits.min(MAX_BITS));
    for i in 0..n {
        let bad = |what: String| Err(FitError::Input { row: i, what });
        if !rows.dense[i * rows.p..(i + 1) * rows.p]
            .iter()
            .all(|v| v.is_finite())
        {
            return bad("a dense feature is not finite".into());
        }
        if !(rows.w[i].is_finite() && rows.offsets[i].is_finite()) {
            return bad("the weight or offset is not finite".into());
        }
        if rows.y[i] != 1.0 && rows.y[i] != -1.0 {
            return bad(format!("label {} is not -1 or +1", rows.y[i]));
        }
        if let Some(s) = rows.slots[i * rows.k..(i + 1) * rows.k]
            .iter()
            .find(|&&s| rows.p + s as usize >= dim)
        {
            return bad(format!("slot {s} is not below 2^{bits}"));
        }
    }
    let lambda = lambda.max(1e-9);
    let objective = |theta: &[f64], margins: &mut Vec<f64>| -> f64 {
        margins.clear();
        let mut total = 0.5 * lambda * dot(theta, theta);
        for i in 0..n {
            let s = rows.score(i, theta);
            margins.push(s);
            total += rows.w[i] * softplus(-rows.y[i] * s);
        }
        total
    };
    let mut theta = vec![0.0; dim];
    let mut margins = Vec::with_capacity(n);
    let mut f = objective(&theta, &mut margins);
    const MAX_NEWTON: usize = 50;
    let mut iteration = 0;
    loop {
        // Gradient and the Hessian's data weights at θ.
        let mut g: Vec<f64> = theta.iter().map(|t| lambda * t).collect();
        let mut d = vec![0.0; n];
        let mut precond = vec![lambda; dim];
        for i in 0..n {
            let s = margins[i];
            rows.add_row(i, -rows.w[i] * rows.y[i] * sigmoid(-rows.y[i] * s), &mut g);
            let sig = sigmoid(s);
            d[i] = rows.w[i] * sig * (1.0 - sig);
            let p = rows.p;
            for (pc, x) in precond[..p].iter_mut().zip(&rows.dense[i * p..(i + 1) * p]) {
                *pc += d[i] * x * x;
            }
            for &s in &rows.slots[i * rows.k..(i + 1) * rows.k] {
                precond[p + s as usize] += d[i];
            }
        }
        let gnorm = dot(&g, &g).sqrt();
        if gnorm <= 1e-11 * f.abs().max(1.0) {
            return Ok(theta);
        }
        if iteration == MAX_NEWTON {
            return Err(FitError::NoConvergence {
                iterations: iteration,
                gradient: gnorm,
            });
        }
        // Newton direction: (X'DX + λI) step = g by preconditioned CG, to a
        // relative residual that tightens as the gradient shrinks.
        let hv = |v: &[f64], out: &mut Vec<f64>| {
            out.clear();
            out.extend(v.iter().map(|x| lambda * x));
            for (i, &di) in d.iter().enumerate() {
                if di == 0.0 {
                    continue;
                }
                let xv = score(
                    &rows.dense[i * rows.p..(i + 1) * rows.p],
                    &rows.slots[i * rows.k..(i + 1) * rows.k],
                    v,
                );
                rows.add_row(i, di * xv, out);
            }
        };
        let tolerance = (0.5f64).min(gnorm.sqrt()) * gnorm;
        let step = conjugate_gradients(&hv, &g, &precond, tolerance, 250);
        // Backtracking along −step. Near the optimum L cannot tell the
        // full Newton step from no step (both round to the same value), so
        // a full step whose L is equal to rounding is taken.
        let slope = -dot(&g, &step);
        let rounding = 1e-13 * f.abs().max(1.0);
        let mut t = 1.0;
        let mut next = vec![0.0; dim];
        loop {
            for ((nx, th), st) in next.iter_mut().zip(&theta).zip(&step) {
                *nx = th - t * st;
            }
            let mut trial = Vec::with_capacity(n);
            let f_next = objective(&next, &mut trial);
            if f_next <= f + 1e-4 * t * slope || (t == 1.0 && f_next <= f + rounding) {
                f = f_next;
                margins = trial;
                break;
            }
            t *= 0.5;
            if t < 1e-12 {
                // No decrease along the direction: θ is optimal to rounding.
                return Ok(theta);
            }
        }
        let moved = step.iter().fold(0.0f64, |m, v| m.max((t * v).abs()));
        let size = theta.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        std::mem::swap(&mut theta, &mut next);
        if moved <= 1e-15 * size {
            return Ok(theta);
        }
        iteration += 1;
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves A x = b (A symmetric positive definite, given as a product) by
/// Jacobi-preconditioned conjugate gradients until ‖r‖ ≤ `tolerance`.
fn conjugate_gradients(
    a: &impl Fn(&[f64], &mut Vec<f64>),
    b: &[f64],
    diagonal: &[f64],
    tolerance: f64,
    max_iterations: usize,
) -> Vec<f64> {
    let mut x = vec![0.0; b.len()];
    let mut r = b.to_vec();
    let mut z: Vec<f64> = r.iter().zip(diagonal).map(|(r, d)| r / d).collect();
    let mut p = z.clone();
    let mut rz = dot(&r, &z);
    let mut ap = Vec::with_capacity(b.len());
    for _ in 0..max_iterations {
        if dot(&r, &r).sqrt() <= tolerance {
            break;
        }
        a(&p, &mut ap);
        let pap = dot(&p, &ap);
        if pap <= 0.0 {
            break;
        }
        let alpha = rz / pap;
        for ((xi, ri), (pi, api)) in x.iter_mut().zip(r.iter_mut()).zip(p.iter().zip(&ap)) {
            *xi += alpha * pi;
            *ri -= alpha * api;
        }
        for ((zi, ri), di) in z.iter_mut().zip(&r).zip(diagonal) {
            *zi = ri / di;
        }
        let rz_next = dot(&r, &z);
        let beta = rz_next / rz;
        rz = rz_next;
        for (pi, zi) in p.iter_mut().zip(&z) {
            *pi = zi + beta * *pi;
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::learner::{Batch, Posterior, StepParams, step};

    #[test]
    fn slots_are_stable_and_spread() {
        // Fixed values: a model saved today must mean the same tomorrow.
        assert_eq!(slot("member", "42", 18), slot("member", "42", 18));
        assert_ne!(slot("member", "42", 18), slot("item", "42", 18));
        let pinned = [
            slot("member", "42", 18),
            slot("placement*hour", "search\u{1f}20", 18),
        ];
        assert_eq!(pinned, [PINNED_MEMBER_42, PINNED_CROSS]);
        let mut counts = [0u32; 16];
        for v in 0..16_000 {
            counts[slot("member", &v.to_string(), 4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    const PINNED_MEMBER_42: u32 = 254_256;
    const PINNED_CROSS: u32 = 129_433;

    /// With few slots the problem is small enough for the dense Newton
    /// solver: both must reach the same optimum.
    #[test]
    fn matches_the_dense_solver_on_the_equivalent_problem() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (bits, k, lambda) in [(2, 1, 1.0), (3, 2, 0.3), (4, 3, 3.0)] {
            let p = 3;
            let dim = p + (1 << bits);
            let mut rows = HashedRows::new(p, k);
            let mut dense = Batch::new(dim);
            for _ in 0..400 {
                let x = [1.0, rng.random_range(-1.0..1.0), rng.random_range(0.0..2.0)];
                let slots: Vec<u32> = (0..k).map(|_| rng.random_range(0..1u32 << bits)).collect();
                let s = 0.3 * x[1] - 0.5 + f64::from(slots[0]) * 0.2;
                let y = if rng.random::<f64>() < sigmoid(s) {
                    1.0
                } else {
                    -1.0
                };
                let w = rng.random_range(0.5..1.5);
                let offset = rng.random_range(-0.2..0.2);
                rows.push(&x, &slots, y, w, offset);
                let mut full = vec![0.0; dim];
                full[..p].copy_from_slice(&x);
                for &s in &slots {
                    full[p + s as usize] += 1.0;
                }
                dense.push(&full, y, w, offset);
            }
            let ours = fit(&rows, bits, lambda).unwrap();
            let reference = step(
                &Posterior::unseen(dim, lambda, true),
                &dense,
                StepParams { delta: 0.0, lambda },
            )
            .unwrap()
            .posterior
            .theta;
            for (a, b) in ours.iter().zip(&reference) {
                assert!(
                    (a - b).abs() < 1e-8 * b.abs().max(1.0),
                    "{ours:?} vs {reference:?}"
                );
            }
        }
    }

    /// 2^18 slots, 30,000 rows: per-member effects are recovered.
    #[test]
    fn learns_member_effects_in_a_large_hashed_space() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let bits = 18;
        let members: Vec<f64> = (0..300).map(|_| rng.random_range(-1.5..1.5)).collect();
        let mut rows = HashedRows::new(2, 1);
        for _ in 0..30_000 {
            let m = rng.random_range(0..members.len());
            let x = [1.0, rng.random_range(-1.0..1.0)];
            let s = -1.0 + 0.5 * x[1] + members[m];
            let y = if rng.random::<f64>() < sigmoid(s) {
                1.0
            } else {
                -1.0
            };
            rows.push(&x, &[slot("member", &m.to_string(), bits)], y, 1.0, 0.0);
        }
        let theta = fit(&rows, bits, 1.0).unwrap();
        assert_eq!(theta.len(), 2 + (1 << bits));
        // The member weights follow the truth (up to the shared intercept).
        let learned: Vec<f64> = (0..members.len())
            .map(|m| theta[2 + slot("member", &m.to_string(), bits) as usize])
            .collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (mt, ml) = (mean(&members), mean(&learned));
        let cov: f64 = members
            .iter()
            .zip(&learned)
            .map(|(a, b)| (a - mt) * (b - ml))
            .sum();
        let var_t: f64 = members.iter().map(|a| (a - mt).powi(2)).sum();
        let var_l: f64 = learned.iter().map(|b| (b - ml).powi(2)).sum();
        let correlation = cov / (var_t * var_l).sqrt();
        assert!(correlation > 0.9, "correlation {correlation}");
        assert!((theta[1] - 0.5).abs() < 0.1, "slope {}", theta[1]);
    }

    #[test]
    fn bad_rows_are_named() {
        let mut rows = HashedRows::new(1, 1);
        rows.push(&[1.0], &[0], 1.0, 1.0, 0.0);
        rows.push(&[f64::NAN], &[0], 1.0, 1.0, 0.0);
        assert_eq!(
            fit(&rows, 4, 1.0).unwrap_err(),
            FitError::Input {
                row: 1,
                what: "a dense feature is not finite".into()
            }
        );
        let mut rows = HashedRows::new(1, 1);
        rows.push(&[1.0], &[16], 1.0, 1.0, 0.0);
        assert!(
            fit(&rows, 4, 1.0)
                .unwrap_err()
                .to_string()
                .contains("slot 16 is not below 2^4")
        );
        let mut rows = HashedRows::new(1, 1);
        rows.push(&[1.0], &[1], 0.0, 1.0, 0.0);
        assert!(
            fit(&rows, 4, 1.0)
                .unwrap_err()
                .to_string()
                .contains("label 0")
        );
        // No rows: the ridge optimum is 0.
        assert_eq!(fit(&HashedRows::new(2, 1), 3, 1.0).unwrap(), vec![0.0; 10]);
    }
}
