//! Dispatch matching from the command line: the simulator and its scenario
//! errors, the matcher's manifest section.

use std::time::Duration;

use dima_tests::{Finished, check_events, layout_manifest, repo_root, run_dima, write};

const LIMIT: Duration = Duration::from_secs(60);

fn rejected(done: &Finished, needles: &[&str]) {
    done.assert_rejected(2, needles);
}

#[test]
fn simulate_prints_the_documented_json_for_every_policy() {
    let scenario = repo_root().join("examples/city-small.toml");
    let mut requests = None;
    for policy in ["value", "myopic", "nearest"] {
        let done = run_dima(
            &[
                "simulate",
                "--scenario",
                scenario.to_str().unwrap(),
                "--policy",
                policy,
                "--hours",
                "0.5",
                "--seed",
                "4",
                "--format",
                "json",
            ],
            LIMIT,
        );
        done.assert_success().assert_no_panic();
        let r: serde_json::Value = serde_json::from_str(done.last_line()).unwrap();
        for key in [
            "policy",
            "requests",
            "served",
            "served_rate",
            "wait_p50_s",
            "wait_p95_s",
            "driver_utilization",
            "revenue_per_driver_hour",
        ] {
            assert!(r.get(key).is_some(), "{key} missing from {r}");
        }
        assert_eq!(r["policy"], policy);
        let (n, served) = (
            r["requests"].as_u64().unwrap(),
            r["served"].as_u64().unwrap(),
        );
        assert!(n > 100 && served > 0 && served <= n, "{r}");
        let rate = r["served_rate"].as_f64().unwrap();
        assert!((rate - served as f64 / n as f64).abs() < 1e-12, "{r}");
        // The same seed gives every policy the same riders.
        assert_eq!(*requests.get_or_insert(n), n);
    }
    // The text report.
    let done = run_dima(
        &[
            "simulate",
            "--scenario",
            scenario.to_str().unwrap(),
            "--hours",
            "0.2",
        ],
        LIMIT,
    );
    done.assert_success();
    assert!(
        done.stdout.contains("city-small, policy value"),
        "{}",
        done.stdout
    );
}

#[test]
fn bad_scenarios_name_the_field_and_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, text: &str| {
        let path = write(dir.path(), name, text);
        run_dima(
            &[
                "simulate",
                "--scenario",
                path.to_str().unwrap(),
                "--hours",
                "0.1",
            ],
            LIMIT,
        )
    };
    rejected(
        &run("unknown.toml", "[city]\nname = \"x\"\nradius = 4.0\n"),
        &["unknown.toml:3:1: city.radius: unknown field `radius`"],
    );
    rejected(
        &run("empty.toml", "[fleet]\ndrivers = 0\n"),
        &["fleet.drivers = 0: a city needs at least one driver"],
    );
    rejected(
        &run("negative.toml", "[demand]\nrequests_per_hour = -10.0\n"),
        &["demand.requests_per_hour = -10 must be a positive number"],
    );
    rejected(
        &run(
            "zone.toml",
            "[[demand.zones]]\nname = \"far\"\ncentre = { lat = 40.0, lng = -74.0 }\nspread_km = 1.0\norigin_weight = 1.0\ndestination_weight = 1.0\n",
        ),
        &["demand.zones[0].centre (far) lies outside the city"],
    );
    rejected(
        &run_dima(&["simulate", "--scenario", "/nonexistent/city.toml"], LIMIT),
        &["cannot read scenario /nonexistent/city.toml"],
    );
    let scenario = repo_root().join("examples/city-small.toml");
    rejected(
        &run_dima(
            &[
                "simulate",
                "--scenario",
                scenario.to_str().unwrap(),
                "--hours",
                "0",
            ],
            LIMIT,
        ),
        &["--hours 0 must be a positive number of hours"],
    );
}

#[test]
fn the_matching_section_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |name: &str, text: &str| {
        let path = write(dir.path(), name, text);
        run_dima(&["validate", path.to_str().unwrap()], LIMIT)
    };
    let base = "[pipelines.rides]\nfamily = \"dispatch\"\n[pipelines.rides.source]\nkind = \"generator\"\n";
    validate(
        "ok.toml",
        &format!("{base}[pipelines.rides.matching]\npolicy = \"myopic\"\n"),
    )
    .assert_success();
    rejected(
        &validate(
            "policy.toml",
            &format!("{base}[pipelines.rides.matching]\npolicy = \"greedy\"\nradius_km = 0.0\n"),
        ),
        &[
            "pipelines.rides.matching.policy",
            "\"greedy\" is not one of",
            "pipelines.rides.matching.radius_km",
        ],
    );
    rejected(
        &validate(
            "value.toml",
            &format!("{base}[pipelines.rides.matching.value]\nalpha = 1.5\n"),
        ),
        &[
            "pipelines.rides.matching.value",
            "alpha 1.5 must be in (0, 1]",
        ],
    );
    rejected(
        &validate(
            "ads.toml",
            "[pipelines.ads]\n[pipelines.ads.source]\nkind = \"generator\"\n[pipelines.ads.matching]\n",
        ),
        &["pipelines.ads.matching", "dispatch pipelines only"],
    );
}

#[test]
fn simulated_city_events_feed_the_pipeline_matcher() {
    // The simulator writes the city's events; the dispatch pipeline reads
    // them from JSONL on 2 processes and matches every request it sees.
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("city.jsonl");
    let scenario = repo_root().join("examples/city-small.toml");
    run_dima(
        &[
            "simulate",
            "--scenario",
            scenario.to_str().unwrap(),
            "--hours",
            "0.5",
            "--events-out",
            events.to_str().unwrap(),
        ],
        LIMIT,
    )
    .assert_success();
    let (check, report) = check_events(&events);
    check.assert_success();
    let requests = report["by_type"]["ride_request"].as_u64().unwrap();
    assert!(requests > 100, "{report}");
    let dispatches = dir.path().join("dispatches.jsonl");
    let manifest = write(
        dir.path(),
        "city.toml",
        &layout_manifest(
            2,
            1,
            &format!(
                "[pipelines.city]\nfamily = \"dispatch\"\n[pipelines.city.source]\nkind = \"jsonl\"\npath = \"{}\"\n[pipelines.city.matching]\npolicy = \"myopic\"\ndispatches = {{ kind = \"jsonl\", path = \"{}\" }}\n",
                events.display(),
                dispatches.display()
            ),
        ),
    );
    let done = run_dima(&["up", manifest.to_str().unwrap()], LIMIT);
    done.assert_success().assert_no_panic();
    let line: serde_json::Value = serde_json::from_str(done.last_line()).unwrap();
    let m = &line["pipelines"][0]["matching"];
    assert_eq!(m["policy"], "myopic", "{m}");
    assert_eq!(m["requests"].as_u64().unwrap(), requests, "{m}");
    assert_eq!(m["late_events"], 0, "{m}");
    let dispatched = m["dispatched"].as_u64().unwrap();
    assert!(dispatched * 2 > requests, "{m}");
    let written = std::fs::read_to_string(&dispatches).unwrap();
    assert_eq!(written.lines().count() as u64, dispatched);
}
