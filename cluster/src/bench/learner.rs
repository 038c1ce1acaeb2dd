//! `dima bench learner`: the incremental learner's throughput and
//! progressive accuracy over a logged CSV, next to Vowpal Wabbit and
//! `lambda-learner` in the same run.

use anyhow::Context;
use std::path::Path;

use super::{median, median_ms, run_script};

/// What `dima bench learner` runs: the learner over a logged CSV (the
/// columns as `dima learner evaluate` takes them), next to Vowpal Wabbit and
/// `lambda-learner` on the same file.
#[derive(Clone, Debug)]
pub struct LearnerBench {
    /// The log (header row; `.gz` is decompressed).
    pub input: std::path::PathBuf,
    /// The entity column.
    pub entity_column: String,
    /// The label column.
    pub label_column: String,
    /// Fixed-effect features.
    pub features: Vec<String>,
    /// Random-effect features.
    pub entity_features: Vec<String>,
    /// Hashed categorical features of the fixed effect (columns, or
    /// columns crossed with `*`).
    pub hashed: Vec<String>,
    /// Hash bits of those features.
    pub hash_bits: u32,
    /// Rows per window.
    pub batch_size: usize,
    /// Windows before the scored rows: the fixed effect is fitted on them,
    /// δ and λ are tuned on them, VW's learning rate is chosen on them.
    pub warmup_batches: usize,
    /// δ and λ; tuned on the warm-up rows when `None`.
    pub params: Option<dataflows::learner::StepParams>,
    /// Full or diagonal precision.
    pub full: bool,
    /// Worker counts for the timely operator.
    pub workers: Vec<usize>,
    /// Timed runs per row; the median is reported.
    pub repeat: usize,
    /// A Python with `vowpalwabbit` and `lambda-learner`.
    pub python: String,
    /// Windows `lambda-learner` is timed on (it is ~300× slower).
    pub lambda_learner_batches: usize,
}

/// Opens a CSV, decompressing `.gz`.
pub fn open_log(path: &Path) -> anyhow::Result<Box<dyn std::io::BufRead>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(std::io::BufReader::with_capacity(1 << 16, file))
    })
}

/// Progressive logloss and AUC of the scores of rows at or after `first`.
fn scored_metrics(
    outputs: &[dataflows::learner::LearnerOutput],
    first: u64,
) -> (usize, Option<f64>, Option<f64>) {
    use dataflows::learner::LearnerOutput;
    let mut scored: Vec<(f64, f64)> = outputs
        .iter()
        .filter_map(|o| match o {
            LearnerOutput::Scored { id, p, y } if *id >= first => Some((*p, *y)),
            _ => None,
        })
        .collect();
    let logloss = dataflows::learner::ads::logloss(&scored);
    let auc = dataflows::learner::ads::auc(&mut scored);
    (scored.len(), logloss, auc)
}

/// `dima bench learner`: learn examples per second of the sequential loop
/// and of the timely operator (per worker count), from memory and counting
/// the CSV parse, with progressive logloss and AUC over the rows after the
/// warm-up; then the anchors on the same file. Returns one JSON value per
/// row and a closing summary with the ratios.
pub fn bench_learner(b: &LearnerBench) -> anyhow::Result<Vec<serde_json::Value>> {
    use dataflows::learner::evaluate::{EvalConfig, fit_fixed_effect, read_csv_hashed, tune};
    use dataflows::learner::{LearnerConfig, StepParams, learn_in_process, learn_sequential};

    let read = || -> anyhow::Result<dataflows::learner::evaluate::Dataset> {
        read_csv_hashed(
            open_log(&b.input)?,
            &b.entity_column,
            &b.label_column,
            &b.features,
            &b.entity_features,
            &b.hashed,
            b.hash_bits,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", b.input.display()))
    };
    let (parse_ms, data) = median_ms(b.repeat, read);
    let data = data?;
    let n = data.len();
    let warm_rows = b.warmup_batches * b.batch_size;
    if b.batch_size == 0 || n <= warm_rows {
        anyhow::bail!(
            "{} rows leave nothing to score after {} warm-up batches of {}",
            n,
            b.warmup_batches,
            b.batch_size
        );
    }
    let (params, tuned) = match b.params {
        Some(p) => (p, false),
        None => {
            let config = EvalConfig {
                batch_size: b.batch_size,
                warmup_batches: b.warmup_batches,
                params: StepParams {
                    delta: 0.8,
                    lambda: 1.0,
                },
                refit_every: 10,
                full: b.full,
            };
            let (delta, lambda) = tune(&data, &config)?;
            (StepParams { delta, lambda }, true)
        }
    };
    let fixed = fit_fixed_effect(&data, 0..warm_rows, params.lambda)?;
    let config = LearnerConfig {
        window_ms: 1,
        p: data.pr,
        params,
        full: b.full,
        fixed: None,
    };
    let (build_ms, _) = median_ms(b.repeat, || data.windows(b.batch_size, &fixed));
    let mut rows = Vec::new();
    let row = |run: &str,
               workers: usize,
               learn_ms: f64,
               outputs: &[dataflows::learner::LearnerOutput]| {
        let (scored, logloss, auc) = scored_metrics(outputs, warm_rows as u64);
        let failed = outputs
            .iter()
            .filter(|o| matches!(o, dataflows::learner::LearnerOutput::Failed { .. }))
            .count();
        serde_json::json!({
            "bench": "learner",
            "side": "dima",
            "run": run,
            "workers": workers,
            "examples": n,
            "seconds": learn_ms / 1000.0,
            "examples_per_s": n as f64 / (learn_ms / 1000.0),
            "from_file_examples_per_s": n as f64 / ((parse_ms + build_ms + learn_ms) / 1000.0),
            "scored": scored,
            "logloss": logloss,
            "auc": auc,
            "failed_updates": failed,
        })
    };
    // The oracle loop: one thread, no dataflow.
    let windows = data.windows(b.batch_size, &fixed);
    let (ms, (_, outputs)) = median_ms(b.repeat, || learn_sequential(&windows, &config));
    rows.push(row("sequential", 1, ms, &outputs));
    drop(windows);
    for &workers in &b.workers {
        let mut times = Vec::new();
        let mut last = Vec::new();
        for _ in 0..b.repeat.max(1) {
            let windows = data.windows(b.batch_size, &fixed);
            let started = std::time::Instant::now();
            last = learn_in_process(windows, config, workers).map_err(anyhow::Error::msg)?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        rows.push(row("operator", workers, median(times), &last));
    }

    let input = b.input.display().to_string();
    let columns = [
        input,
        "--entity-column".into(),
        b.entity_column.clone(),
        "--label-column".into(),
        b.label_column.clone(),
        format!("--features={}", b.features.join(",")),
        format!("--entity-features={}", b.entity_features.join(",")),
    ];
    let mut vw_args = vec!["vw".to_owned()];
    vw_args.extend(columns.iter().cloned());
    vw_args.extend([
        format!("--hashed-features={}", b.hashed.join(",")),
        format!("--warmup-rows={warm_rows}"),
        format!("--repeat={}", b.repeat.max(1)),
    ]);
    let hint = "needs `pip install vowpalwabbit==9.11.9 lambda-learner==0.1.0 'scipy<1.18' scikit-learn` in --python";
    let mut vw = run_script(&b.python, "learner_anchors.py", &vw_args).context(hint)?;
    vw["bench"] = "learner".into();
    vw["side"] = "anchor".into();
    // lambda-learner gets the fixed effect's scores as offsets, row by row.
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let offsets_path = scratch.path().join("offsets.txt");
    let ll_rows = (b.lambda_learner_batches.max(1) * b.batch_size).min(n);
    let offsets: String = (0..ll_rows)
        .map(|i| format!("{:e}\n", data.fixed_score(i, &fixed)))
        .collect();
    std::fs::write(&offsets_path, offsets)
        .with_context(|| format!("writing {}", offsets_path.display()))?;
    let mut ll_args = vec!["lambda-learner".to_owned()];
    ll_args.extend(columns.iter().cloned());
    ll_args.extend([
        format!("--batch-size={}", b.batch_size),
        format!("--batches={}", b.lambda_learner_batches.max(1)),
        format!("--offsets={}", offsets_path.display()),
        format!("--delta={}", params.delta),
        format!("--lambda={}", params.lambda),
        format!("--hessian={}", if b.full { "full" } else { "diagonal" }),
    ]);
    let mut ll = run_script(&b.python, "learner_anchors.py", &ll_args).context(hint)?;
    ll["bench"] = "learner".into();
    ll["side"] = "anchor".into();

    let rate = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let vw_rate = rate(&vw, "examples_per_s");
    let ll_rate = rate(&ll, "examples_per_s");
    let mut ratios = serde_json::Map::new();
    for r in &rows {
        let name = match r["run"].as_str() {
            Some("sequential") => "sequential".to_owned(),
            _ => format!("operator_{}w", r["workers"]),
        };
        ratios.insert(
            format!("{name}_over_vw"),
            (rate(r, "examples_per_s") / vw_rate).into(),
        );
        ratios.insert(
            format!("{name}_from_file_over_vw"),
            (rate(r, "from_file_examples_per_s") / vw_rate).into(),
        );
        ratios.insert(
            format!("{name}_over_lambda_learner"),
            (rate(r, "examples_per_s") / ll_rate).into(),
        );
    }
    let summary = serde_json::json!({
        "bench": "learner",
        "summary": true,
        "input": b.input.display().to_string(),
        "rows": n,
        "scored_from_row": warm_rows,
        "params": {"delta": params.delta, "lambda": params.lambda, "tuned": tuned, "hessian": if b.full { "full" } else { "diagonal" }},
        "hashed_features": b.hashed,
        "hash_bits": if b.hashed.is_empty() { 0 } else { b.hash_bits },
        "parse_s": parse_ms / 1000.0,
        "build_windows_s": build_ms / 1000.0,
        "ratios": ratios,
        "logloss": {"dima": rows[0]["logloss"], "vw": vw["logloss"]},
        "auc": {"dima": rows[0]["auc"], "vw": vw["auc"]},
    });
    rows.push(vw);
    rows.push(ll);
    rows.push(summary);
    Ok(rows)
}
