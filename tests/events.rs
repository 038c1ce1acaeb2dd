//! Event streams: `dima events generate|check` and the pipelines of `dima up`
//! over JSONL files, across two processes.

use std::collections::BTreeMap;
use std::time::Duration;

use dima_tests::{layout_manifest, run_dima, write};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

fn check_json(path: &str) -> (Option<i32>, Value) {
    let done = run_dima(&["events", "check", path, "--format", "json"], LIMIT);
    done.assert_no_panic();
    (
        done.status.code(),
        serde_json::from_str(done.last_line()).unwrap(),
    )
}

#[test]
fn generate_is_seeded_and_check_names_every_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    for (name, seed) in [("a", "1"), ("b", "1"), ("c", "2")] {
        let to = format!("jsonl:{}", path(&format!("{name}.jsonl")));
        let done = run_dima(
            &[
                "events",
                "generate",
                "--pipeline",
                "ads",
                "--count",
                "3000",
                "--seed",
                seed,
                "--to",
                &to,
            ],
            LIMIT,
        );
        done.assert_success();
    }
    let read = |name: &str| std::fs::read(path(name)).unwrap();
    assert_eq!(read("a.jsonl"), read("b.jsonl"), "same seed, same bytes");
    assert_ne!(read("a.jsonl"), read("c.jsonl"));
    let (code, report) = check_json(&path("a.jsonl"));
    assert_eq!(code, Some(0));
    assert_eq!(
        (report["lines"].as_u64(), report["valid"].as_u64()),
        (Some(3000), Some(3000))
    );

    // Break three lines by hand; check names exactly those.
    let text = String::from_utf8(read("a.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[0] = lines[0].replace("\"member_id\":", "\"member\":");
    lines[1499].truncate(30);
    lines[2999] = "not json".into();
    std::fs::write(path("bad.jsonl"), lines.join("\n") + "\n").unwrap();
    let (code, report) = check_json(&path("bad.jsonl"));
    assert_eq!(code, Some(1));
    let bad: Vec<(u64, String)> = report["malformed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["line"].as_u64().unwrap(),
                m["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        bad.iter().map(|b| b.0).collect::<Vec<_>>(),
        [1, 1500, 3000],
        "{bad:?}"
    );
    assert!(bad[0].1.contains("unknown field `member`"), "{bad:?}");
    assert!(bad[1].1.contains("EOF while parsing"), "{bad:?}");
    assert!(bad[2].1.contains("expected ident"), "{bad:?}");

    let text = run_dima(&["events", "check", &path("bad.jsonl")], LIMIT);
    assert_eq!(text.status.code(), Some(1));
    assert!(text.stdout.contains("bad.jsonl:1500: "), "{}", text.stdout);
    assert!(
        text.stdout.contains("3000 lines, 2997 valid, 3 malformed"),
        "{}",
        text.stdout
    );

    let done = run_dima(
        &[
            "events",
            "generate",
            "--pipeline",
            "ads",
            "--count",
            "1",
            "--to",
            "ftp://x",
        ],
        LIMIT,
    );
    assert_eq!(done.status.code(), Some(1));
    assert!(
        done.stderr
            .contains("expected stdout, jsonl:PATH or kafka:BROKERS/TOPIC"),
        "{}",
        done.stderr
    );
}

/// Both pipelines read JSONL files with 1% malformed lines, on two processes
/// of two workers: every valid event is counted once and written once, and
/// the dead-letter files hold exactly the malformed lines, with their numbers.
#[test]
fn two_processes_count_every_valid_event_once_and_dead_letter_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let mut expected = BTreeMap::new();
    for (family, count) in [("ads", "40000"), ("dispatch", "30000")] {
        let to = format!("jsonl:{}", p(&format!("{family}.jsonl")));
        run_dima(
            &[
                "events",
                "generate",
                "--pipeline",
                family,
                "--count",
                count,
                "--malformed",
                "0.01",
                "--to",
                &to,
            ],
            LIMIT,
        )
        .assert_success();
        let (code, report) = check_json(&p(&format!("{family}.jsonl")));
        assert_eq!(code, Some(1));
        expected.insert(family, report);
    }
    let pipelines = r#"
[pipelines.ads]
epoch_events = 2000
max_epochs_in_flight = 2
[pipelines.ads.source]
kind = "jsonl"
path = "ads.jsonl"
[pipelines.ads.sink]
kind = "jsonl"
path = "out/ads.jsonl"

[pipelines.dispatch]
epoch_events = 3000
[pipelines.dispatch.source]
kind = "jsonl"
path = "dispatch.jsonl"
[pipelines.dispatch.sink]
kind = "jsonl"
path = "out/dispatch.jsonl"
"#;
    let manifest = write(dir.path(), "m.toml", &layout_manifest(2, 2, pipelines));
    let done = run_dima(&["up", manifest.to_str().unwrap()], LIMIT);
    done.assert_success().assert_no_panic();
    let result: Value = serde_json::from_str(done.last_line()).unwrap();
    for summary in result["pipelines"].as_array().unwrap() {
        let name = summary["name"].as_str().unwrap();
        let report = &expected[name];
        assert_eq!(summary["read"], report["lines"], "{name}");
        assert_eq!(summary["valid"], report["valid"], "{name}");
        assert_eq!(summary["by_type"], report["by_type"], "{name}");
        let malformed = report["malformed"].as_array().unwrap();
        assert_eq!(summary["malformed"].as_u64(), Some(malformed.len() as u64));
        assert!(
            malformed.len() > 100,
            "{name}: {} malformed",
            malformed.len()
        );

        // The sink holds every valid input event once (order aside).
        let bad_lines: std::collections::BTreeSet<u64> = malformed
            .iter()
            .map(|m| m["line"].as_u64().unwrap())
            .collect();
        let input = std::fs::read_to_string(p(&format!("{name}.jsonl"))).unwrap();
        let mut valid_in: Vec<Value> = input
            .lines()
            .enumerate()
            .filter(|(i, _)| !bad_lines.contains(&(*i as u64 + 1)))
            .map(|(_, l)| serde_json::from_str::<Value>(l).unwrap())
            .collect();
        let out = std::fs::read_to_string(p(&format!("out/{name}.jsonl"))).unwrap();
        let mut valid_out: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let key = |v: &Value| v.to_string();
        valid_in.sort_by_key(key);
        valid_out.sort_by_key(key);
        assert_eq!(valid_out.len(), valid_in.len(), "{name}");
        assert!(
            valid_out == valid_in,
            "{name}: sink differs from the valid input"
        );

        // The dead letters are exactly the malformed lines, same numbers and reasons.
        let dead =
            std::fs::read_to_string(dir.path().join(format!("dead-letter/{name}.jsonl"))).unwrap();
        let mut letters: Vec<(u64, String)> = dead
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            // Clicks whose impression was a malformed line are orphans, dead
            // letters of the attribution stage.
            .filter(|v| {
                let orphan = v["source"] == "attribution";
                assert!(!orphan || v["reason"].as_str().unwrap().starts_with("orphan click"));
                !orphan
            })
            .map(|v| {
                let source = v["source"].as_str().unwrap();
                let (file, line) = source.rsplit_once(':').unwrap();
                assert!(file.ends_with(&format!("{name}.jsonl")), "{source}");
                (
                    line.parse().unwrap(),
                    v["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        letters.sort();
        let wanted: Vec<(u64, String)> = malformed
            .iter()
            .map(|m| {
                (
                    m["line"].as_u64().unwrap(),
                    m["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(letters, wanted, "{name}");
    }
}
