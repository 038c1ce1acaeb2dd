//! `dima bench assign`: the exact assignment solvers against scipy's
//! `linear_sum_assignment` (dense) and OR-tools' min-cost flow (sparse) on
//! the same problems in the same run.

use super::{anchor, median_ms};

/// One row of `dima bench assign`: our solver and its anchor on one problem.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AssignRow {
    /// `dense` (n × n, minimise, complete) or `sparse` (N × N, k nearest,
    /// maximise, unmatched allowed).
    pub kind: &'static str,
    /// Rows (= columns).
    pub n: usize,
    /// Allowed pairs.
    pub edges: usize,
    /// Our median solve time, ms.
    pub dima_ms: f64,
    /// Our objective.
    pub dima_objective: f64,
    /// The anchor's name and version.
    pub anchor: String,
    /// The anchor's median time, ms.
    pub anchor_ms: f64,
    /// The anchor's objective.
    pub anchor_objective: f64,
    /// anchor_ms / dima_ms (above 1: we are faster).
    pub speedup: f64,
}

/// A dense n × n cost matrix, uniform in [0, 1000).
pub fn dense_problem(n: usize, seed: u64) -> Vec<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n * n).map(|_| rng.random::<f64>() * 1000.0).collect()
}

/// A dispatch-shaped sparse problem: n riders and n drivers uniform in a
/// square of side √n · 0.15 km (about 44 per km²), each rider linked to its
/// `k` nearest drivers with weight 10 − 3·km + uniform noise in [−1, 1].
pub fn sparse_problem(n: usize, k: usize, seed: u64) -> dataflows::matching::Problem {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let side = (n as f64).sqrt() * 0.15;
    let mut point = || (rng.random::<f64>() * side, rng.random::<f64>() * side);
    let riders: Vec<(f64, f64)> = (0..n).map(|_| point()).collect();
    let drivers: Vec<(f64, f64)> = (0..n).map(|_| point()).collect();
    // A grid of 0.3 km buckets for the nearest-k search.
    let cell = 0.3;
    let cells = (side / cell).ceil() as usize + 1;
    let mut grid = vec![Vec::new(); cells * cells];
    let at = |x: f64| ((x / cell) as usize).min(cells - 1);
    for (j, (x, y)) in drivers.iter().enumerate() {
        grid[at(*y) * cells + at(*x)].push(j);
    }
    let mut edges = Vec::with_capacity(n * k);
    for (i, (x, y)) in riders.iter().enumerate() {
        let (cx, cy) = (at(*x) as i64, at(*y) as i64);
        let mut found: Vec<(f64, usize)> = Vec::new();
        let mut ring = 1i64;
        loop {
            found.clear();
            for gy in (cy - ring).max(0)..=(cy + ring).min(cells as i64 - 1) {
                for gx in (cx - ring).max(0)..=(cx + ring).min(cells as i64 - 1) {
                    for &j in &grid[gy as usize * cells + gx as usize] {
                        let d = ((drivers[j].0 - x).powi(2) + (drivers[j].1 - y).powi(2)).sqrt();
                        found.push((d, j));
                    }
                }
            }
            // Complete once the k-th nearest lies within the searched radius.
            found.sort_by(|a, b| a.0.total_cmp(&b.0));
            if found.len() >= k && found[k - 1].0 <= ring as f64 * cell || ring as usize > cells {
                break;
            }
            ring += 1;
        }
        for (d, j) in found.into_iter().take(k) {
            let noise = rng.random::<f64>() * 2.0 - 1.0;
            edges.push((i, j, 10.0 - 3.0 * d + noise));
        }
    }
    dataflows::matching::Problem {
        rows: n,
        cols: n,
        edges,
    }
}

/// Our dense and sparse solvers against scipy and OR-tools on the same
/// problems, in the same run.
pub fn bench_assign(
    dense: &[usize],
    sparse: &[usize],
    k: usize,
    repeat: usize,
    python: &str,
) -> anyhow::Result<Vec<AssignRow>> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for &n in dense {
        let cost = dense_problem(n, n as u64);
        let (dima_ms, columns) = median_ms(repeat, || dataflows::matching::hungarian(&cost, n, n));
        let columns = columns.ok_or_else(|| anyhow::anyhow!("dense {n}: no assignment"))?;
        let objective: f64 = columns
            .iter()
            .enumerate()
            .map(|(r, c)| cost[r * n + c])
            .sum();
        let path = dir.path().join(format!("dense-{n}.bin"));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for v in &cost {
            file.write_all(&v.to_le_bytes())?;
        }
        file.flush()?;
        drop(file);
        let a = anchor(
            python,
            &[
                "dense".into(),
                path.display().to_string(),
                n.to_string(),
                repeat.to_string(),
            ],
        )?;
        std::fs::remove_file(&path)?;
        rows.push(assign_row("dense", n, n * n, dima_ms, objective, &a));
    }
    for &n in sparse {
        let problem = sparse_problem(n, k, n as u64 + 1);
        let (dima_ms, solved) = median_ms(repeat, || problem.solve_sparse(true));
        let solved = solved?;
        let path = dir.path().join(format!("sparse-{n}.bin"));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for (r, _, _) in &problem.edges {
            file.write_all(&(*r as u32).to_le_bytes())?;
        }
        for (_, c, _) in &problem.edges {
            file.write_all(&(*c as u32).to_le_bytes())?;
        }
        for (_, _, w) in &problem.edges {
            file.write_all(&w.to_le_bytes())?;
        }
        file.flush()?;
        drop(file);
        let a = anchor(
            python,
            &[
                "sparse".into(),
                path.display().to_string(),
                n.to_string(),
                n.to_string(),
                problem.edges.len().to_string(),
                repeat.to_string(),
            ],
        )?;
        rows.push(assign_row(
            "sparse",
            n,
            problem.edges.len(),
            dima_ms,
            solved.objective,
            &a,
        ));
    }
    Ok(rows)
}

fn assign_row(
    kind: &'static str,
    n: usize,
    edges: usize,
    dima_ms: f64,
    dima_objective: f64,
    anchor: &serde_json::Value,
) -> AssignRow {
    let anchor_ms = anchor["ms"].as_f64().unwrap_or(f64::NAN);
    AssignRow {
        kind,
        n,
        edges,
        dima_ms,
        dima_objective,
        anchor: anchor["solver"].as_str().unwrap_or("?").to_owned(),
        anchor_ms,
        anchor_objective: anchor["objective"].as_f64().unwrap_or(f64::NAN),
        speedup: anchor_ms / dima_ms,
    }
}
