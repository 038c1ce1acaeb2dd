//! The incremental Bayesian logistic regression of Lambda Learner (LinkedIn,
//! KDD 2021): one mini-batch step of a random effect, with the previous
//! posterior as the prior.
//!
//! For an entity with coefficients θ ∈ ℝᵖ, prior mean θ₀ and prior
//! precision H₀, a mini-batch of rows xᵢ with labels yᵢ ∈ {−1, +1}, weights
//! wᵢ and offsets oᵢ (the fixed effect's score), the step minimises
//!
//! ```text
//! L(θ) = Σ wᵢ·log(1 + exp(−yᵢ(xᵢᵀθ + oᵢ)))
//!      + (δ/2)(θ − θ₀)ᵀH₀(θ − θ₀) + (λ(1 − δ)/2)‖θ‖²
//! ```
//!
//! and sets the posterior precision (Laplace approximation at the optimum θ̂)
//!
//! ```text
//! H₁ = δH₀ + Σ σᵢ(1 − σᵢ)xᵢxᵢᵀ + (1 − δ)λI,   σᵢ = σ(xᵢᵀθ̂ + oᵢ)
//! ```
//!
//! δ is the forgetting factor (0 forgets the past), λ the L2 penalty. As in
//! the reference package (`lambda-learner` 0.1.0,
//! `TrainerSequentialBayesianLogisticLossWithL2`), the data term of H₁ is not
//! weighted by wᵢ. H may be full or diagonal (diagonal: only the diagonal
//! of H₁ is kept, and the prior term uses the diagonal H₀).
//!
//! The reference minimises with L-BFGS; the dimension of a random effect is
//! small, so this module uses Newton's method with a Cholesky solve, a
//! backtracking line search and Levenberg damping when the Hessian is not
//! positive definite. It reaches the same optimum to solver precision.

pub mod ads;
pub mod evaluate;
pub mod hashed;
pub mod operator;

pub use operator::{
    EntityModel, Example, FixedEffectConfig, Learn, LearnerConfig, LearnerOutput, Reanchor,
    learn_in_process, learn_sequential, learn_window,
};

/// A Gaussian posterior over one coefficient vector: mean and precision.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Posterior {
    /// Mean (the MAP coefficients).
    pub theta: Vec<f64>,
    /// Precision (inverse covariance).
    pub precision: Precision,
}

/// A precision matrix, full or diagonal.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    /// p × p, row-major, symmetric.
    Full(Vec<f64>),
    /// The diagonal.
    Diagonal(Vec<f64>),
}

impl Precision {
    /// `λI` of dimension `p`, full or diagonal.
    pub fn scaled_identity(p: usize, lambda: f64, full: bool) -> Self {
        if full {
            let mut m = vec![0.0; p * p];
            for i in 0..p {
                m[i * p + i] = lambda;
            }
            Self::Full(m)
        } else {
            Self::Diagonal(vec![lambda; p])
        }
    }

    /// `y = self · x`.
    fn apply(&self, x: &[f64], y: &mut [f64]) {
        let p = x.len();
        match self {
            Self::Full(m) => {
                for (i, yi) in y.iter_mut().enumerate() {
                    *yi = m[i * p..(i + 1) * p]
                        .iter()
                        .zip(x)
                        .map(|(a, b)| a * b)
                        .sum();
                }
            }
            Self::Diagonal(d) => {
                for ((yi, di), xi) in y.iter_mut().zip(d).zip(x) {
                    *yi = di * xi;
                }
            }
        }
    }

    /// Adds `scale · self` to the dense p × p matrix `m`.
    fn add_to(&self, scale: f64, m: &mut [f64], p: usize) {
        match self {
            Self::Full(h) => m.iter_mut().zip(h).for_each(|(a, b)| *a += scale * b),
            Self::Diagonal(d) => {
                for (i, di) in d.iter().enumerate() {
                    m[i * p + i] += scale * di;
                }
            }
        }
    }

    /// Whether every entry is finite.
    pub fn is_finite(&self) -> bool {
        match self {
            Self::Full(v) | Self::Diagonal(v) => v.iter().all(|x| x.is_finite()),
        }
    }
}

impl Posterior {
    /// The prior of an entity never seen: N(0, (λI)⁻¹).
    pub fn unseen(p: usize, lambda: f64, full: bool) -> Self {
        Self {
            theta: vec![0.0; p],
            precision: Precision::scaled_identity(p, lambda, full),
        }
    }

    /// The dimension.
    pub fn dim(&self) -> usize {
        self.theta.len()
    }
}

/// A mini-batch for one entity: dense rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// Number of features (columns).
    pub p: usize,
    /// Rows, n × p row-major.
    pub x: Vec<f64>,
    /// Labels, −1 or +1.
    pub y: Vec<f64>,
    /// Weights (≥ 0).
    pub w: Vec<f64>,
    /// Offsets (the fixed effect's score).
    pub offsets: Vec<f64>,
}

impl Batch {
    /// An empty batch over `p` features.
    pub fn new(p: usize) -> Self {
        Self {
            p,
            ..Self::default()
        }
    }

    /// Adds one row.
    pub fn push(&mut self, x: &[f64], y: f64, w: f64, offset: f64) {
        debug_assert_eq!(x.len(), self.p);
        self.x.extend_from_slice(x);
        self.y.push(y);
        self.w.push(w);
        self.offsets.push(offset);
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.x[i * self.p..(i + 1) * self.p]
    }
}

/// The hyper-parameters of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepParams {
    /// Forgetting factor δ ∈ [0, 1].
    pub delta: f64,
    /// L2 penalty λ ≥ 0.
    pub lambda: f64,
}

impl StepParams {
    /// The defaults of the manifest's `learner` and of the CLI's `--delta`
    /// and `--lambda`.
    pub const DEFAULT: Self = Self {
        delta: 0.8,
        lambda: 1.0,
    };

    /// Whether δ is a forgetting factor: in [0, 1].
    pub fn delta_in_range(delta: f64) -> bool {
        (0.0..=1.0).contains(&delta)
    }

    /// Whether λ is an L2 penalty: finite and at least 0.
    pub fn lambda_in_range(lambda: f64) -> bool {
        lambda.is_finite() && lambda >= 0.0
    }

    /// δ and λ, checked.
    pub fn new(delta: f64, lambda: f64) -> Result<Self, StepError> {
        let params = Self { delta, lambda };
        params.check()?;
        Ok(params)
    }

    /// Refuses a δ or λ out of range.
    pub fn check(&self) -> Result<(), StepError> {
        if Self::delta_in_range(self.delta) && Self::lambda_in_range(self.lambda) {
            Ok(())
        } else {
            Err(StepError::Params {
                delta: self.delta,
                lambda: self.lambda,
            })
        }
    }
}

/// `log(1 + exp(z))` without overflow.
pub fn softplus(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

/// The logistic function.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// The objective L(θ) of one step.
pub fn loss(prior: &Posterior, batch: &Batch, params: StepParams, theta: &[f64]) -> f64 {
    let mut data = 0.0;
    for i in 0..batch.len() {
        let s = dot(batch.row(i), theta) + batch.offsets[i];
        data += batch.w[i] * softplus(-batch.y[i] * s);
    }
    let deviation: Vec<f64> = theta.iter().zip(&prior.theta).map(|(a, b)| a - b).collect();
    let mut h_dev = vec![0.0; theta.len()];
    prior.precision.apply(&deviation, &mut h_dev);
    data + 0.5 * params.delta * dot(&deviation, &h_dev)
        + 0.5 * params.lambda * (1.0 - params.delta) * dot(theta, theta)
}

/// ∇L(θ).
pub fn gradient(prior: &Posterior, batch: &Batch, params: StepParams, theta: &[f64]) -> Vec<f64> {
    let p = theta.len();
    let mut g = vec![0.0; p];
    for i in 0..batch.len() {
        let row = batch.row(i);
        let s = dot(row, theta) + batch.offsets[i];
        // d/ds w·log(1+exp(−ys)) = −w·y·σ(−ys)
        let coef = -batch.w[i] * batch.y[i] * sigmoid(-batch.y[i] * s);
        g.iter_mut().zip(row).for_each(|(gj, xj)| *gj += coef * xj);
    }
    let deviation: Vec<f64> = theta.iter().zip(&prior.theta).map(|(a, b)| a - b).collect();
    let mut h_dev = vec![0.0; p];
    prior.precision.apply(&deviation, &mut h_dev);
    for j in 0..p {
        g[j] += params.delta * h_dev[j] + params.lambda * (1.0 - params.delta) * theta[j];
    }
    g
}

/// ∇²L(θ) as a dense p × p matrix, with the data term weighted by `weights`
/// (`true`: the Hessian of L; `false`: the reference's unweighted posterior
/// update).
fn hessian(
    prior: &Posterior,
    batch: &Batch,
    params: StepParams,
    theta: &[f64],
    weighted: bool,
) -> Vec<f64> {
    let p = theta.len();
    let mut h = vec![0.0; p * p];
    for i in 0..batch.len() {
        let row = batch.row(i);
        let s = dot(row, theta) + batch.offsets[i];
        let sig = sigmoid(s);
        let d = sig * (1.0 - sig) * if weighted { batch.w[i] } else { 1.0 };
        if d == 0.0 {
            continue;
        }
        for a in 0..p {
            let da = d * row[a];
            if da == 0.0 {
                continue;
            }
            for b in 0..p {
                h[a * p + b] += da * row[b];
            }
        }
    }
    prior.precision.add_to(params.delta, &mut h, p);
    for a in 0..p {
        h[a * p + a] += params.lambda * (1.0 - params.delta);
    }
    h
}

/// The full Hessian ∇²L(θ) (dense, row-major), for checks.
pub fn loss_hessian(
    prior: &Posterior,
    batch: &Batch,
    params: StepParams,
    theta: &[f64],
) -> Vec<f64> {
    hessian(prior, batch, params, theta, true)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `m · x = b` for symmetric positive definite `m` (Cholesky);
/// `None` when `m` is not positive definite.
pub fn cholesky_solve(m: &[f64], b: &[f64]) -> Option<Vec<f64>> {
    let p = b.len();
    let mut l = vec![0.0; p * p];
    for i in 0..p {
        for j in 0..=i {
            let mut sum = m[i * p + j];
            for k in 0..j {
                sum -= l[i * p + k] * l[j * p + k];
            }
            if i == j {
                if !(sum > 0.0 && sum.is_finite()) {
                    return None;
                }
                l[i * p + i] = sum.sqrt();
            } else {
                l[i * p + j] = sum / l[j * p + j];
            }
        }
    }
    let mut z = vec![0.0; p];
    for i in 0..p {
        let mut sum = b[i];
        for k in 0..i {
            sum -= l[i * p + k] * z[k];
        }
        z[i] = sum / l[i * p + i];
    }
    let mut x = vec![0.0; p];
    for i in (0..p).rev() {
        let mut sum = z[i];
        for k in i + 1..p {
            sum -= l[k * p + i] * x[k];
        }
        x[i] = sum / l[i * p + i];
    }
    Some(x)
}

/// Why a step kept the previous model.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StepError {
    /// A feature, label, weight or offset is NaN or infinite.
    #[error("row {row}: {what} is not finite")]
    NotFinite {
        /// The row.
        row: usize,
        /// Which value.
        what: &'static str,
    },
    /// A label is not −1 or +1.
    #[error("row {row}: label {label} is not -1 or +1")]
    Label {
        /// The row.
        row: usize,
        /// The label.
        label: f64,
    },
    /// The solver did not converge.
    #[error("Newton did not converge in {iterations} iterations (gradient norm {gradient})")]
    NoConvergence {
        /// Iterations run.
        iterations: usize,
        /// Max-norm of the last gradient.
        gradient: f64,
    },
    /// δ or λ is out of range.
    #[error("delta must be in [0, 1] and lambda >= 0 (got delta {delta}, lambda {lambda})")]
    Params {
        /// δ.
        delta: f64,
        /// λ.
        lambda: f64,
    },
}

/// What a step did.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The new posterior.
    pub posterior: Posterior,
    /// L at the optimum.
    pub loss: f64,
    /// Newton iterations.
    pub iterations: usize,
}

/// One incremental update: the MAP coefficients of the batch under the
/// prior, and the Laplace posterior precision there. An empty batch returns
/// the prior shrunk as the formula says (θ minimises the prior terms alone).
pub fn step(prior: &Posterior, batch: &Batch, params: StepParams) -> Result<Step, StepError> {
    params.check()?;
    for i in 0..batch.len() {
        if !batch.row(i).iter().all(|v| v.is_finite()) {
            return Err(StepError::NotFinite {
                row: i,
                what: "a feature",
            });
        }
        for (value, what) in [(batch.w[i], "the weight"), (batch.offsets[i], "the offset")] {
            if !value.is_finite() {
                return Err(StepError::NotFinite { row: i, what });
            }
        }
        if batch.y[i] != 1.0 && batch.y[i] != -1.0 {
            return Err(StepError::Label {
                row: i,
                label: batch.y[i],
            });
        }
    }
    let p = prior.dim();
    let mut theta = prior.theta.clone();
    let mut f = loss(prior, batch, params, &theta);
    let mut iterations = 0;
    let mut g = gradient(prior, batch, params, &theta);
    const MAX_ITERATIONS: usize = 100;
    loop {
        let gnorm = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if gnorm <= 1e-12 * f.abs().max(1.0) {
            break;
        }
        if iterations == MAX_ITERATIONS {
            return Err(StepError::NoConvergence {
                iterations,
                gradient: gnorm,
            });
        }
        iterations += 1;
        let mut h = hessian(prior, batch, params, &theta, true);
        // Levenberg damping until the system is positive definite.
        let mut mu = 0.0;
        let direction = loop {
            if let Some(d) = cholesky_solve(&h, &g) {
                break d;
            }
            let add = if mu == 0.0 { 1e-8 } else { mu * 9.0 };
            for a in 0..p {
                h[a * p + a] += add;
            }
            mu += add;
            if mu > 1e12 {
                return Err(StepError::NoConvergence {
                    iterations,
                    gradient: gnorm,
                });
            }
        };
        // Backtracking (Armijo) along −direction.
        let slope = -dot(&g, &direction);
        let mut t = 1.0;
        let mut next;
        let mut f_next;
        loop {
            next = theta
                .iter()
                .zip(&direction)
                .map(|(a, d)| a - t * d)
                .collect::<Vec<f64>>();
            f_next = loss(prior, batch, params, &next);
            if f_next <= f + 1e-4 * t * slope || t < 1e-10 {
                break;
            }
            t *= 0.5;
        }
        let moved = next
            .iter()
            .zip(&theta)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        theta = next;
        let improvement = f - f_next;
        f = f_next;
        g = gradient(prior, batch, params, &theta);
        if moved <= 1e-15 * theta.iter().fold(1.0f64, |m, v| m.max(v.abs()))
            || (improvement >= 0.0 && improvement <= 1e-16 * f.abs().max(1.0) && t < 1.0)
        {
            break;
        }
    }
    let h = hessian(prior, batch, params, &theta, false);
    let precision = match prior.precision {
        Precision::Full(_) => Precision::Full(h),
        Precision::Diagonal(_) => Precision::Diagonal((0..p).map(|i| h[i * p + i]).collect()),
    };
    if !(theta.iter().all(|v| v.is_finite()) && precision.is_finite() && f.is_finite()) {
        return Err(StepError::NoConvergence {
            iterations,
            gradient: f64::NAN,
        });
    }
    Ok(Step {
        posterior: Posterior { theta, precision },
        loss: f,
        iterations,
    })
}

#[cfg(test)]
mod tests;
