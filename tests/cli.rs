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
