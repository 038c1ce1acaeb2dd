//! `dima bench dispatch`: the value policy against myopic and nearest
//! dispatch on the same riders, seed by seed.

use std::path::Path;

/// One policy's results over the seeds of [`bench_dispatch`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct PolicyRuns {
    /// The policy.
    pub policy: &'static str,
    /// Served rate per seed, in seed order.
    pub served_rate: Vec<f64>,
    /// Mean served rate.
    pub mean: f64,
    /// Sample standard deviation of the served rate.
    pub std: f64,
    /// Mean served rate per simulated hour (the learning curve).
    pub hourly: Vec<f64>,
    /// Mean revenue per online driver hour.
    pub revenue_per_driver_hour: f64,
    /// Mean median wait, s.
    pub wait_p50_s: f64,
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Runs a scenario under every policy for each seed (the same riders for
/// every policy of one seed), on all cores, and summarises per policy.
pub fn bench_dispatch(
    scenario: &dataflows::matching::Scenario,
    seeds: &[u64],
    hours: f64,
) -> Vec<PolicyRuns> {
    use dataflows::matching::{Policy, simulate};
    use rayon::prelude::*;
    let policies = [Policy::Value, Policy::Myopic, Policy::Nearest];
    let jobs: Vec<(Policy, u64)> = policies
        .iter()
        .flat_map(|p| seeds.iter().map(move |s| (*p, *s)))
        .collect();
    let reports: Vec<_> = jobs
        .par_iter()
        .map(|(p, s)| simulate(scenario, *p, hours, *s))
        .collect();
    policies
        .iter()
        .map(|policy| {
            let runs: Vec<_> = reports
                .iter()
                .filter(|r| r.policy == policy.name())
                .collect();
            let rates: Vec<f64> = runs.iter().map(|r| r.served_rate).collect();
            let (mean, std) = mean_std(&rates);
            let hours_seen = runs
                .iter()
                .map(|r| r.hourly_served_rate.len())
                .min()
                .unwrap_or(0);
            let hourly = (0..hours_seen)
                .map(|h| {
                    runs.iter().map(|r| r.hourly_served_rate[h]).sum::<f64>() / runs.len() as f64
                })
                .collect();
            let avg = |f: &dyn Fn(&dataflows::matching::SimReport) -> f64| {
                runs.iter().map(|r| f(r)).sum::<f64>() / runs.len() as f64
            };
            PolicyRuns {
                policy: policy.name(),
                served_rate: rates,
                mean,
                std,
                hourly,
                revenue_per_driver_hour: avg(&|r| r.revenue_per_driver_hour),
                wait_p50_s: avg(&|r| r.wait_p50_s),
            }
        })
        .collect()
}

/// The relative gain of `a` over `b` per seed: mean and sample standard deviation.
pub fn gain(a: &PolicyRuns, b: &PolicyRuns) -> (f64, f64) {
    let gains: Vec<f64> = a
        .served_rate
        .iter()
        .zip(&b.served_rate)
        .map(|(x, y)| x / y - 1.0)
        .collect();
    mean_std(&gains)
}

/// Draws the learning curves (served rate per simulated hour, mean over
/// seeds) of every policy into an SVG or PNG file.
pub fn plot_learning(path: &Path, title: &str, runs: &[PolicyRuns]) -> anyhow::Result<()> {
    let series: Vec<crate::plot::Series> = runs
        .iter()
        .map(|run| crate::plot::Series {
            name: run.policy.to_owned(),
            points: run
                .hourly
                .iter()
                .enumerate()
                .map(|(h, v)| (h as f64 + 0.5, *v))
                .collect(),
        })
        .collect();
    crate::plot::line_chart(path, title, "simulated hour", "served rate", &series)
}
