//! The command line itself: help for every subcommand, usage errors.

use std::time::Duration;

use dima_tests::run_dima;

#[test]
fn every_subcommand_has_help() {
    for args in [
        &["--help"][..],
        &["validate", "--help"],
        &["up", "--help"],
        &["run", "--help"],
        &["bench", "--help"],
        &["bench", "count", "--help"],
    ] {
        let done = run_dima(args, Duration::from_secs(10));
        done.assert_success();
        assert!(
            done.stdout.contains("Usage: dima"),
            "{args:?}:\n{}",
            done.stdout
        );
    }
    let done = run_dima(&["up", "--help"], Duration::from_secs(10));
    for flag in ["--job", "--events", "--log-format"] {
        assert!(
            done.stdout.contains(flag),
            "up --help lists {flag}:\n{}",
            done.stdout
        );
    }
}

#[test]
fn unknown_job_is_a_usage_error() {
    let done = run_dima(
        &["up", "examples/local.toml", "--job", "nope"],
        Duration::from_secs(10),
    );
    assert_eq!(done.status.code(), Some(2));
    assert!(
        done.stderr.contains("invalid value 'nope' for '--job"),
        "{}",
        done.stderr
    );
}

#[test]
fn assign_solves_json_and_csv_problems() {
    let dir = tempfile::tempdir().unwrap();
    let json = dima_tests::write(
        dir.path(),
        "p.json",
        r#"{"rows":3,"cols":2,"edges":[[0,0,3],[0,1,5],[1,0,4],[2,1,-2]]}"#,
    );
    let done = run_dima(
        &[
            "assign",
            "--input",
            json.to_str().unwrap(),
            "--maximize",
            "--format",
            "json",
        ],
        Duration::from_secs(10),
    );
    done.assert_success();
    let v: serde_json::Value = serde_json::from_str(done.last_line()).unwrap();
    assert_eq!(v["objective"], 9.0);
    assert_eq!(v["pairs"], serde_json::json!([[0, 1], [1, 0]]));
    let done = run_dima(
        &[
            "assign",
            "--input",
            json.to_str().unwrap(),
            "--maximize",
            "--sparse",
            "--format",
            "json",
        ],
        Duration::from_secs(10),
    );
    done.assert_success();
    let v: serde_json::Value = serde_json::from_str(done.last_line()).unwrap();
    assert_eq!(v["objective"], 9.0, "the sparse solver agrees");
    // scipy's linear_sum_assignment gives 5 for this matrix.
    let csv = dima_tests::write(dir.path(), "p.csv", "4,1,3\n2,0,5\n3,2,2\n");
    let done = run_dima(
        &[
            "assign",
            "--input",
            csv.to_str().unwrap(),
            "--complete",
            "--format",
            "json",
        ],
        Duration::from_secs(10),
    );
    done.assert_success();
    let v: serde_json::Value = serde_json::from_str(done.last_line()).unwrap();
    assert_eq!(v["objective"], 5.0);
    let bad = dima_tests::write(dir.path(), "bad.csv", "1,2\n3,nan\n");
    let done = run_dima(
        &["assign", "--input", bad.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(done.status.code(), Some(2));
    assert!(
        done.stderr.contains("weight NaN is not a finite number"),
        "{}",
        done.stderr
    );
    done.assert_no_panic();
}

/// The GPU commands in a build without the `cuda` feature (what CI runs):
/// a usage error that says how to build with CUDA, exit 2, no panic.
#[test]
fn gpu_commands_without_cuda_say_how_to_build_it() {
    for args in [
        &["gpu", "check"][..],
        &["gpu", "info"],
        &["gpu", "parity", "--random-weights"],
        &[
            "generate",
            "--model",
            "gemma3-270m",
            "--prompt",
            "hi",
            "--backend",
            "cuda",
        ],
        &["serve", "--model", "gemma3-270m", "--backend", "cuda"],
        &[
            "bench",
            "decode",
            "--model",
            "gemma3-270m",
            "--random-weights",
            "--backend",
            "cuda",
            "--batch",
            "1",
            "--steps",
            "1",
            "--prompt-tokens",
            "2",
        ],
    ] {
        let done = run_dima(args, Duration::from_secs(60));
        done.assert_rejected(2, &["built without CUDA", "--features cuda"]);
        done.assert_no_panic();
    }
    // A manifest that serves on a GPU is refused before anything starts.
    let dir = tempfile::tempdir().unwrap();
    let path = dima_tests::write(
        dir.path(),
        "gpu.toml",
        "[inference]\nmodel = \"gemma3-270m\"\nbackend = \"cuda\"\n",
    );
    let done = run_dima(&["up", path.to_str().unwrap()], Duration::from_secs(60));
    done.assert_rejected(2, &["inference.backend = \"cuda\"", "built without CUDA"]);
}
