//! `dima learner evaluate` on a logged CSV.

use std::time::Duration;

use dima_tests::{check_events, run_dima};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// 30,000 rows, 60 campaigns whose intercepts drift every 500 rows.
fn drifting_log() -> String {
    let mut state = 12345u64;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut bias: Vec<f64> = (0..60).map(|_| -2.0 * uniform()).collect();
    let mut out = String::from("campaign,clicked,age,slot\n");
    for row in 0..30_000 {
        if row % 500 == 0 {
            for b in &mut bias {
                *b += uniform() - 0.5;
            }
        }
        let e = (uniform() * 60.0) as usize;
        let (age, slot) = (2.0 * uniform() - 1.0, uniform());
        let s = bias[e] + 0.8 * age - 1.2 * slot;
        let y = u8::from(uniform() < 1.0 / (1.0 + (-s).exp()));
        out.push_str(&format!("c{e},{y},{age:.4},{slot:.4}\n"));
    }
    out
}

#[test]
fn evaluate_reports_every_method_and_incremental_beats_stale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.csv");
    std::fs::write(&path, drifting_log()).unwrap();
    let path = path.to_str().unwrap();
    let args = [
        "learner",
        "evaluate",
        "--input",
        path,
        "--entity-column",
        "campaign",
        "--label-column",
        "clicked",
        "--features",
        "age",
        "--entity-features",
        "slot",
        "--batch-size",
        "1000",
        "--warmup-batches",
        "5",
        "--delta",
        "0.5",
        "--refit-every",
        "5",
        "--format",
        "json",
    ];
    let done = run_dima(&args, LIMIT);
    done.assert_success();
    let report: Value = serde_json::from_str(done.last_line()).unwrap();
    assert_eq!(report["examples"], 25_000);
    assert!(report["learn_examples_per_s"].as_f64().unwrap() > 0.0);
    let auc = |m: &str| report[m]["auc"].as_f64().unwrap();
    for m in ["incremental", "stale", "periodic", "lambda"] {
        assert!(
            report[m]["logloss"].as_f64().is_some_and(f64::is_finite),
            "{m}: {report}"
        );
        assert_eq!(report[m]["quarters"].as_array().unwrap().len(), 4, "{m}");
    }
    assert!(auc("incremental") > auc("stale") + 0.05, "{report}");
    assert!(auc("incremental") > auc("periodic"), "{report}");

    let png = dir.path().join("auc.png");
    let mut plotted = args[..args.len() - 2].to_vec();
    plotted.extend(["--plot", png.to_str().unwrap()]);
    let text = run_dima(&plotted, LIMIT);
    text.assert_success();
    assert!(text.stdout.contains("incremental"), "{}", text.stdout);
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "--plot wrote a PNG");
    assert!(bytes.len() > 10_000, "a chart, not an empty image");
    let mut jpeg = plotted.clone();
    let last = jpeg.len() - 1;
    let jpg = dir.path().join("auc.jpg");
    jpeg[last] = jpg.to_str().unwrap();
    let done = run_dima(&jpeg, LIMIT);
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
    assert!(
        done.stderr.contains("must end in .png or .svg"),
        "{}",
        done.stderr
    );

    let mut bad = args.to_vec();
    bad[7] = "label";
    let done = run_dima(&bad, LIMIT);
    assert_eq!(done.status.code(), Some(2));
    assert!(
        done.stderr.contains(
            "column \"label\" is not in the header (columns: campaign, clicked, age, slot)"
        ),
        "{}",
        done.stderr
    );
    done.assert_no_panic();
}

#[test]
fn generated_ads_events_become_a_labelled_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("ads.jsonl");
    let csv = dir.path().join("ads.csv");
    let to = format!("jsonl:{}", events.display());
    run_dima(
        &[
            "events",
            "generate",
            "--pipeline",
            "ads",
            "--count",
            "20000",
            "--campaigns",
            "200",
            "--walk-sd",
            "0.3",
            "--lifetime-hours",
            "1",
            "--simulated-rate",
            "10",
            "--to",
            &to,
        ],
        LIMIT,
    )
    .assert_success();
    let (_, report) = check_events(&events);
    let done = run_dima(
        &[
            "learner",
            "dataset",
            "--input",
            events.to_str().unwrap(),
            "--output",
            csv.to_str().unwrap(),
        ],
        LIMIT,
    );
    done.assert_success();
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(
        rows.len() as u64,
        report["by_type"]["ad_impression"].as_u64().unwrap()
    );
    let clicked = rows
        .iter()
        .filter(|r| r.split(',').nth(3) == Some("1"))
        .count() as u64;
    assert_eq!(clicked, report["by_type"]["ad_click"].as_u64().unwrap());
    // Campaign lifetimes of 1 hour over about 33 minutes: many campaigns appear.
    let campaigns: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r.split(',').nth(1)).collect();
    assert!(campaigns.len() > 20, "{} campaigns", campaigns.len());
    // `learner evaluate` on that CSV, with more flags.
    let evaluate = |extra: &[&str]| {
        let mut args = vec![
            "learner",
            "evaluate",
            "--input",
            csv.to_str().unwrap(),
            "--entity-column",
            "campaign",
            "--label-column",
            "clicked",
            "--features",
            "desktop,search,position",
            "--entity-features",
            "search",
            "--batch-size",
            "2000",
            "--warmup-batches",
            "4",
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        run_dima(&args, LIMIT)
    };
    let evaluated = evaluate(&["--tune"]);
    evaluated.assert_success();
    let report: Value = serde_json::from_str(evaluated.last_line()).unwrap();
    let params = &report["params"];
    assert!(
        params["delta"].is_f64() && params["lambda"].is_f64(),
        "{report}"
    );
    assert_eq!(params["tuned"], true);
    assert!(
        report["lambda"]["auc"].is_f64(),
        "the lambda method keeps its key"
    );
    assert!(report["incremental"]["auc"].is_f64());

    // Hashed sparse features for the fixed effect: a column and a cross.
    let hashed = |features: &str, bits: &str| {
        evaluate(&["--hashed-features", features, "--hash-bits", bits])
    };
    let done = hashed("member,campaign*search", "16");
    done.assert_success();
    let report: Value = serde_json::from_str(done.last_line()).unwrap();
    for m in ["incremental", "stale", "periodic", "lambda"] {
        assert!(report[m]["auc"].is_f64(), "{m}: {report}");
        assert!(report[m]["logloss"].as_f64().is_some_and(f64::is_finite));
    }
    let done = hashed("member,campaign*weekday", "16");
    assert_eq!(done.status.code(), Some(2));
    assert!(
        done.stderr
            .contains("column \"weekday\" is not in the header"),
        "{}",
        done.stderr
    );
    let done = hashed("member", "0");
    assert_eq!(done.status.code(), Some(2));
    assert!(
        done.stderr
            .contains("--hash-bits 0 must be between 1 and 24"),
        "{}",
        done.stderr
    );
    done.assert_no_panic();
}

/// `dima bench learner` on a small log: our rows (sequential loop, operator
/// with 1 and 2 workers: the same progressive metrics, since the models do
/// not depend on the worker count), both anchors and the ratios. Needs the
/// reference Python (`DIMA_REF_PYTHON`, set by scripts/test.sh, with
/// vowpalwabbit and lambda-learner); without it the test says so and passes.
#[test]
fn bench_learner_reports_ours_and_both_anchors() {
    let Some(python) = std::env::var_os("DIMA_REF_PYTHON") else {
        eprintln!(
            "DIMA_REF_PYTHON is not set: skipping dima bench learner (scripts/test.sh sets it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.csv");
    std::fs::write(&path, drifting_log()).unwrap();
    let done = run_dima(
        &[
            "bench",
            "learner",
            "--input",
            path.to_str().unwrap(),
            "--label-column",
            "clicked",
            "--features",
            "age",
            "--entity-features",
            "slot",
            "--batch-size",
            "1000",
            "--warmup-batches",
            "5",
            "--repeat",
            "1",
            "--lambda-learner-batches",
            "1",
            "--python",
            python.to_str().unwrap(),
        ],
        LIMIT,
    );
    done.assert_success();
    let rows = done.json_lines();
    assert_eq!(rows.len(), 6, "{}", done.stdout);
    let ours: Vec<&Value> = rows.iter().filter(|r| r["side"] == "dima").collect();
    assert_eq!(ours.len(), 3);
    for r in &ours {
        assert_eq!(r["examples"], 30_000);
        assert_eq!(r["scored"], 25_000);
        assert_eq!(r["failed_updates"], 0);
        assert!(r["examples_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(
            r["auc"], ours[0]["auc"],
            "same models for every worker count"
        );
        let gap = r["logloss"].as_f64().unwrap() - ours[0]["logloss"].as_f64().unwrap();
        assert!(gap.abs() < 1e-12, "{r}");
    }
    assert_eq!(
        ours.iter()
            .map(|r| r["workers"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 1, 2]
    );
    let vw = rows
        .iter()
        .find(|r| {
            r["anchor"]
                .as_str()
                .is_some_and(|a| a.starts_with("vowpalwabbit"))
        })
        .unwrap();
    assert_eq!(vw["examples"], 30_000);
    assert!(vw["logloss"].as_f64().is_some_and(f64::is_finite), "{vw}");
    assert!(vw["options"].as_str().unwrap().contains("-q ce"), "{vw}");
    let ll = rows
        .iter()
        .find(|r| {
            r["anchor"]
                .as_str()
                .is_some_and(|a| a.starts_with("lambda-learner"))
        })
        .unwrap();
    assert_eq!(ll["examples"], 1000, "one window of 1000 rows");
    let summary = rows.last().unwrap();
    assert_eq!(summary["summary"], true);
    for key in [
        "sequential_over_vw",
        "operator_1w_over_vw",
        "operator_2w_over_vw",
        "operator_1w_from_file_over_vw",
        "operator_1w_over_lambda_learner",
    ] {
        assert!(
            summary["ratios"][key].as_f64().unwrap() > 0.0,
            "{key}: {summary}"
        );
    }
    assert_eq!(summary["params"]["tuned"], true);
}
