use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

fn random_batch(seed: u64, n: usize, p: usize) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let truth: Vec<f64> = (0..p).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut batch = Batch::new(p);
    for _ in 0..n {
        let mut x: Vec<f64> = (0..p).map(|_| rng.random_range(-1.0..1.0)).collect();
        x[0] = 1.0; // intercept
        let offset = rng.random_range(-0.5..0.5);
        let s = dot(&x, &truth) + offset;
        let y = if rng.random::<f64>() < sigmoid(s) {
            1.0
        } else {
            -1.0
        };
        batch.push(&x, y, rng.random_range(0.5..2.0), offset);
    }
    batch
}

fn prior(p: usize, full: bool, seed: u64) -> Posterior {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let theta = (0..p).map(|_| rng.random_range(-0.3..0.3)).collect();
    let precision = if full {
        // A random SPD matrix: AᵀA + I.
        let a: Vec<f64> = (0..p * p).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut m = vec![0.0; p * p];
        for i in 0..p {
            for j in 0..p {
                m[i * p + j] = (0..p).map(|k| a[k * p + i] * a[k * p + j]).sum::<f64>();
            }
            m[i * p + i] += 1.0;
        }
        Precision::Full(m)
    } else {
        Precision::Diagonal((0..p).map(|_| rng.random_range(0.5..3.0)).collect())
    };
    Posterior { theta, precision }
}

const PARAMS: StepParams = StepParams {
    delta: 0.7,
    lambda: 2.0,
};

#[test]
fn gradient_and_hessian_match_finite_differences() {
    for full in [true, false] {
        let batch = random_batch(1, 40, 5);
        let prior = prior(5, full, 2);
        let theta = vec![0.3, -0.2, 0.5, 0.1, -0.4];
        let g = gradient(&prior, &batch, PARAMS, &theta);
        let h = loss_hessian(&prior, &batch, PARAMS, &theta);
        let eps = 1e-6;
        for j in 0..5 {
            let mut up = theta.clone();
            let mut down = theta.clone();
            up[j] += eps;
            down[j] -= eps;
            let numeric = (loss(&prior, &batch, PARAMS, &up) - loss(&prior, &batch, PARAMS, &down))
                / (2.0 * eps);
            assert!(
                (numeric - g[j]).abs() < 1e-6 * g[j].abs().max(1.0),
                "g[{j}]: {numeric} vs {}",
                g[j]
            );
            let gu = gradient(&prior, &batch, PARAMS, &up);
            let gd = gradient(&prior, &batch, PARAMS, &down);
            for k in 0..5 {
                let numeric = (gu[k] - gd[k]) / (2.0 * eps);
                assert!(
                    (numeric - h[k * 5 + j]).abs() < 1e-5 * numeric.abs().max(1.0),
                    "h[{k},{j}]"
                );
            }
        }
    }
}

#[test]
fn the_step_reaches_a_stationary_point_and_updates_the_precision() {
    for full in [true, false] {
        let batch = random_batch(3, 200, 4);
        let prior = prior(4, full, 4);
        let out = step(&prior, &batch, PARAMS).unwrap();
        let g = gradient(&prior, &batch, PARAMS, &out.posterior.theta);
        assert!(g.iter().all(|v| v.abs() < 1e-9), "{g:?}");
        // Any other point is worse.
        for j in 0..4 {
            let mut other = out.posterior.theta.clone();
            other[j] += 1e-3;
            assert!(loss(&prior, &batch, PARAMS, &other) > out.loss);
        }
        // H₁ = δH₀ + XᵀDX + (1−δ)λI at θ̂ (unweighted data term).
        let mut expected = vec![0.0; 16];
        for i in 0..batch.len() {
            let row = batch.row(i);
            let s = sigmoid(dot(row, &out.posterior.theta) + batch.offsets[i]);
            for a in 0..4 {
                for b in 0..4 {
                    expected[a * 4 + b] += s * (1.0 - s) * row[a] * row[b];
                }
            }
        }
        prior.precision.add_to(PARAMS.delta, &mut expected, 4);
        for a in 0..4 {
            expected[a * 4 + a] += PARAMS.lambda * (1.0 - PARAMS.delta);
        }
        match &out.posterior.precision {
            Precision::Full(h) => {
                for (x, y) in h.iter().zip(&expected) {
                    assert!((x - y).abs() < 1e-12 * y.abs().max(1.0));
                }
            }
            Precision::Diagonal(d) => {
                for (i, x) in d.iter().enumerate() {
                    assert!((x - expected[i * 4 + i]).abs() < 1e-12 * x.abs().max(1.0));
                }
            }
        }
    }
}

#[test]
fn a_previous_posterior_is_the_prior_and_delta_zero_forgets_it() {
    let batch = random_batch(5, 50, 3);
    let far = Posterior {
        theta: vec![5.0, -5.0, 5.0],
        precision: Precision::Diagonal(vec![100.0; 3]),
    };
    let remembered = step(
        &far,
        &batch,
        StepParams {
            delta: 1.0,
            lambda: 1.0,
        },
    )
    .unwrap();
    let forgotten = step(
        &far,
        &batch,
        StepParams {
            delta: 0.0,
            lambda: 1.0,
        },
    )
    .unwrap();
    let fresh = step(
        &Posterior::unseen(3, 1.0, false),
        &batch,
        StepParams {
            delta: 0.0,
            lambda: 1.0,
        },
    )
    .unwrap();
    // A strong prior holds θ near it; δ = 0 gives the same answer as no prior.
    assert!((remembered.posterior.theta[0] - 5.0).abs() < 0.5);
    for (a, b) in forgotten.posterior.theta.iter().zip(&fresh.posterior.theta) {
        assert!((a - b).abs() < 1e-8, "{a} vs {b}");
    }
}

#[test]
fn bad_input_is_an_error_and_never_a_nan_model() {
    let mut batch = random_batch(6, 10, 2);
    let prior = Posterior::unseen(2, 1.0, true);
    batch.x[3] = f64::NAN;
    assert_eq!(
        step(&prior, &batch, PARAMS),
        Err(StepError::NotFinite {
            row: 1,
            what: "a feature"
        })
    );
    let mut batch = random_batch(6, 10, 2);
    batch.y[4] = 0.0;
    assert_eq!(
        step(&prior, &batch, PARAMS),
        Err(StepError::Label { row: 4, label: 0.0 })
    );
    assert!(matches!(
        step(
            &prior,
            &batch,
            StepParams {
                delta: 1.5,
                lambda: 1.0
            }
        ),
        Err(StepError::Params { .. })
    ));
    // One class only: the prior keeps it finite.
    let mut single = Batch::new(2);
    for _ in 0..30 {
        single.push(&[1.0, 0.5], 1.0, 1.0, 0.0);
    }
    let out = step(&prior, &single, PARAMS).unwrap();
    assert!(
        out.posterior
            .theta
            .iter()
            .all(|v| v.is_finite() && *v > 0.0)
    );
    // No prior, no penalty, separable data: the infimum is at infinity.
    // Newton stops where the gradient vanishes in f64, with finite θ.
    let none = StepParams {
        delta: 0.0,
        lambda: 0.0,
    };
    if let Ok(out) = step(&prior, &single, none) {
        assert!(out.posterior.theta.iter().all(|v| v.is_finite()));
        assert!(out.posterior.precision.is_finite());
    }
    // An empty batch: θ is the prior terms' minimiser.
    let out = step(&prior, &Batch::new(2), PARAMS).unwrap();
    assert!(out.posterior.theta.iter().all(|v| v.abs() < 1e-12));
}

#[test]
fn softplus_and_sigmoid_are_stable_at_the_extremes() {
    assert_eq!(softplus(-1000.0), 0.0);
    assert_eq!(softplus(1000.0), 1000.0);
    assert!((softplus(0.0) - 2f64.ln()).abs() < 1e-15);
    assert_eq!(sigmoid(-1000.0), 0.0);
    assert_eq!(sigmoid(1000.0), 1.0);
}

/// Two sequential steps per case against LinkedIn's `lambda-learner` 0.1.0
/// (`scripts/reference/lambda_learner_reference.py`; CI regenerates the file
/// from the real package before the tests).
#[test]
fn matches_lambda_learner_full_and_diagonal() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/lambda_learner_reference.json"
    ))
    .unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{what}: ours {a}, lambda-learner {b}"
        );
    };
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let full = case["full"].as_bool().unwrap();
        let params = StepParams {
            delta: case["delta"].as_f64().unwrap(),
            lambda: case["lambda"].as_f64().unwrap(),
        };
        let label = format!("full={full} {params:?}");
        let mut posterior = Posterior::unseen(4, params.lambda, full);
        for (k, expected) in case["steps"].as_array().unwrap().iter().enumerate() {
            let input = &expected["input"];
            let x: Vec<Vec<f64>> = input["x"].as_array().unwrap().iter().map(floats).collect();
            let mut batch = Batch::new(4);
            for (i, row) in x.iter().enumerate() {
                batch.push(
                    row,
                    input["y"][i].as_f64().unwrap(),
                    input["w"][i].as_f64().unwrap(),
                    input["offsets"][i].as_f64().unwrap(),
                );
            }
            let out = step(&posterior, &batch, params).unwrap();
            close(
                out.loss,
                expected["loss"].as_f64().unwrap(),
                &format!("{label} step {k} loss"),
            );
            for (a, b) in out.posterior.theta.iter().zip(floats(&expected["theta"])) {
                close(*a, b, &format!("{label} step {k} theta"));
            }
            let h: Vec<Vec<f64>> = expected["hessian"]
                .as_array()
                .unwrap()
                .iter()
                .map(floats)
                .collect();
            match &out.posterior.precision {
                Precision::Full(m) => {
                    for i in 0..4 {
                        for j in 0..4 {
                            close(
                                m[i * 4 + j],
                                h[i][j],
                                &format!("{label} step {k} H[{i},{j}]"),
                            );
                        }
                    }
                }
                Precision::Diagonal(d) => {
                    for i in 0..4 {
                        close(d[i], h[i][i], &format!("{label} step {k} H[{i},{i}]"));
                        for j in (0..4).filter(|j| *j != i) {
                            assert_eq!(h[i][j], 0.0, "the reference keeps only the diagonal");
                        }
                    }
                }
            }
            posterior = out.posterior;
        }
    }
}
