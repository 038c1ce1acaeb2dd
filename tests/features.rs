//! Event time, attribution and windowed features through real `dima up`
//! processes at several layouts, against the from-scratch batch oracle
//! (`dataflows::features::recompute`).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use dataflows::events::{AdClick, AdContext, AdImpression, Event, parse_line};
use dataflows::features::{
    AdEvent, AttributionSpec, EventTime, FeatureSpec, KeyField, Measure, recompute,
};
use dataflows::pipelines::source::{JsonlSplit, RecordSource};
use dima_tests::{layout_manifest, run_dima, write};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(180);
const T0: i64 = 1_790_000_000_000;

/// A seeded ads stream in arrival order: jitter below the watermark delay,
/// some records far behind (late), duplicate clicks, orphan clicks (unknown
/// ids, outside the window, before their impression), malformed lines.
fn stream(seed: u64, impressions: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let countries = ["US", "DE", "IN", "BR"];
    let devices = ["mobile", "desktop", "tablet"];
    let mut arrivals: Vec<(i64, u64, String)> = Vec::new();
    let mut order = 0u64;
    let mut push = |arrival: i64, line: String| {
        order += 1;
        arrivals.push((arrival, order, line));
    };
    for id in 0..impressions {
        let t = T0 + id as i64 * 400 + rng.random_range(0..300);
        let member = rng.random_range(0..200u64);
        let campaign = rng.random_range(0..8u64);
        let impression = AdImpression {
            schema_version: 1,
            event_time: t,
            impression_id: id,
            member_id: member,
            item_id: campaign * 10 + rng.random_range(0..3),
            campaign_id: campaign,
            context: AdContext {
                device: devices[rng.random_range(0..3)].into(),
                placement: "feed".into(),
                position: rng.random_range(1..4),
                country: countries[rng.random_range(0..4)].into(),
                hour: 0,
            },
        };
        // 1% arrive two minutes late; the rest within 8 s.
        let delay = if rng.random::<f64>() < 0.01 {
            120_000
        } else {
            rng.random_range(0..8_000)
        };
        let click = |at: i64, id: u64| AdClick {
            schema_version: 1,
            event_time: at,
            impression_id: id,
            member_id: member,
            item_id: impression.item_id,
            campaign_id: campaign,
        };
        let u: f64 = rng.random();
        let mut clicks = Vec::new();
        if u < 0.15 {
            // Within the 600 s window, now and then twice.
            let at = t + rng.random_range(0..=600_000);
            clicks.push(click(at, id));
            if rng.random::<f64>() < 0.2 {
                clicks.push(click(at + rng.random_range(0..30_000), id));
            }
        } else if u < 0.17 {
            clicks.push(click(t + rng.random_range(600_001..900_000), id)); // too late
        } else if u < 0.18 {
            clicks.push(click(t - rng.random_range(1..5_000), id)); // before it
        } else if u < 0.19 {
            clicks.push(click(t + 1_000, 10_000_000 + id)); // unknown id
        }
        push(t + delay, Event::AdImpression(impression.clone()).to_line());
        for c in clicks {
            let at = c.event_time + rng.random_range(0..8_000);
            push(at, Event::AdClick(c).to_line());
        }
    }
    arrivals.sort();
    let mut lines: Vec<String> = arrivals.into_iter().map(|(_, _, l)| l).collect();
    // Malformed lines spread through the file: cut JSON, a key that is not
    // a number, an unparseable event_time, not JSON; and an impression two
    // hours ahead of everything (refused by max_future_s).
    let context =
        r#""context":{"device":"mobile","placement":"feed","position":1,"country":"US","hour":0}"#;
    let bad = [
        "{\"type\":\"ad_click\"".to_owned(),
        format!(
            r#"{{"type":"ad_impression","schema_version":1,"event_time":{T0},"impression_id":99999998,"member_id":"seven","item_id":1,"campaign_id":1,{context}}}"#
        ),
        format!(
            r#"{{"type":"ad_impression","schema_version":1,"event_time":"soon","impression_id":99999997,"member_id":7,"item_id":1,"campaign_id":1,{context}}}"#
        ),
        "not json at all".to_owned(),
        format!(
            r#"{{"type":"ad_impression","schema_version":1,"event_time":{},"impression_id":99999999,"member_id":1,"item_id":1,"campaign_id":1,{context}}}"#,
            T0 + impressions as i64 * 400 + 7_200_000
        ),
    ];
    for (k, b) in bad.into_iter().enumerate() {
        let at = (k + 1) * lines.len() / 6;
        lines.insert(at, b);
    }
    lines
}

fn features() -> Vec<FeatureSpec> {
    let f = |name: &str, key, measure, window_s: u64| FeatureSpec {
        name: name.into(),
        key,
        measure,
        window_ms: window_s * 1000,
    };
    vec![
        f(
            "member_clicks_1h",
            KeyField::MemberId,
            Measure::Clicks,
            3600,
        ),
        f(
            "member_impressions_10m",
            KeyField::MemberId,
            Measure::Impressions,
            600,
        ),
        f(
            "campaign_clicks_10m",
            KeyField::CampaignId,
            Measure::Clicks,
            600,
        ),
        f(
            "country_impressions_5m",
            KeyField::Country,
            Measure::Impressions,
            300,
        ),
    ]
}

const FEATURES_TOML: &str = r#"
[[pipelines.ads.features]]
name = "member_clicks_1h"
key = "member_id"
measure = "clicks"
window_s = 3600

[[pipelines.ads.features]]
name = "member_impressions_10m"
key = "member_id"
measure = "impressions"
window_s = 600

[[pipelines.ads.features]]
name = "campaign_clicks_10m"
key = "campaign_id"
measure = "clicks"
window_s = 600

[[pipelines.ads.features]]
name = "country_impressions_5m"
key = "context.country"
measure = "impressions"
window_s = 300
"#;

/// The oracle's view: each worker's share of the file, parsed, in order.
fn shares(path: &Path, workers: usize) -> Vec<Vec<AdEvent>> {
    (0..workers)
        .map(|w| {
            let mut split = JsonlSplit::open(path, w, workers).unwrap();
            let mut records = Vec::new();
            while split.fill(1024, &mut records).unwrap() {}
            records
                .iter()
                .filter_map(|r| parse_line(std::str::from_utf8(&r.payload).ok()?).ok())
                .filter_map(|e| match e {
                    Event::AdImpression(i) if i.event_time >= 0 => Some(AdEvent::Impression(i)),
                    Event::AdClick(c) if c.event_time >= 0 => Some(AdEvent::Click(c)),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

fn sorted_lines(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

#[test]
fn examples_late_positives_and_orphans_equal_the_batch_oracle_at_every_layout() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "ads.jsonl",
        &(stream(20, 6_000).join("\n") + "\n"),
    );
    let time = EventTime {
        watermark_delay_ms: 20_000,
        ..EventTime::default()
    };
    let attribution = AttributionSpec { window_ms: 600_000 };
    let mut first: Option<(Vec<u8>, Value)> = None;
    for (processes, workers) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
        let oracle = recompute(
            &shares(&input, processes * workers),
            time,
            attribution,
            &features(),
        );
        assert!(oracle.late > 20, "the stream has late records");
        assert!(oracle.orphan_clicks > 50, "and orphans");
        let out = dir
            .path()
            .join(format!("examples-{processes}x{workers}.jsonl"));
        let pipelines = format!(
            r#"
[pipelines.ads]
epoch_events = 500
max_epochs_in_flight = 2

[pipelines.ads.source]
kind = "jsonl"
path = "{}"

[pipelines.ads.dead_letter]
path = "{}"

[pipelines.ads.time]
watermark_delay_s = 20

[pipelines.ads.attribution]
window_s = 600

[pipelines.ads.examples]
kind = "jsonl"
path = "{}"
{FEATURES_TOML}"#,
            input.display(),
            dir.path()
                .join(format!("dead-{processes}x{workers}.jsonl"))
                .display(),
            out.display(),
        );
        let manifest = write(
            dir.path(),
            &format!("m{processes}x{workers}.toml"),
            &layout_manifest(processes, workers, &pipelines),
        );
        let done = run_dima(
            &["up", manifest.to_str().unwrap(), "--job", "pipelines"],
            LIMIT,
        );
        done.assert_success().assert_no_panic();
        let result: Value = serde_json::from_str(done.last_line()).unwrap();
        let ads = &result["pipelines"][0];
        let layout = format!("{processes}x{workers}");
        assert_eq!(ads["late"].as_u64(), Some(oracle.late), "{layout}");
        // Malformed: the four unparseable lines and the far-future impression.
        assert_eq!(oracle.future, 1, "{layout}");
        assert_eq!(
            ads["malformed"].as_u64(),
            Some(4 + oracle.future),
            "{layout}"
        );
        let positives = oracle.examples.iter().filter(|e| e.clicked).count() as u64;
        let a = &ads["attribution"];
        assert_eq!(a["positives"].as_u64(), Some(positives), "{layout}");
        assert_eq!(
            a["negatives"].as_u64(),
            Some(oracle.examples.len() as u64 - positives),
            "{layout}"
        );
        assert_eq!(
            a["orphan_clicks"].as_u64(),
            Some(oracle.orphan_clicks),
            "{layout}"
        );
        let keys: Vec<u64> = ads["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["keys"].as_u64().unwrap())
            .collect();
        assert_eq!(keys, oracle.keys, "{layout}");
        // Every example, label and feature value.
        let names: Vec<String> = features().into_iter().map(|f| f.name).collect();
        let mut expected: Vec<String> = oracle.examples.iter().map(|e| e.to_line(&names)).collect();
        expected.sort();
        assert_eq!(sorted_lines(&out), expected, "{layout}");
        assert!(
            expected
                .iter()
                .any(|l| l.contains("\"member_clicks_1h\":3"))
        );
        // The same bytes and the same summary at every layout.
        let bytes = std::fs::read(&out).unwrap();
        let mut summary = ads.clone();
        summary["dead_letter"]["path"] = Value::Null;
        match &first {
            None => first = Some((bytes, summary)),
            Some((b, s)) => {
                assert!(*b == bytes, "{layout}: examples file differs from 1x1");
                assert_eq!(*s, summary, "{layout}");
            }
        }
        // Late and orphan records are dead letters with their reason.
        let dead = sorted_lines(&dir.path().join(format!("dead-{layout}.jsonl")));
        let reasons: BTreeSet<String> = dead
            .iter()
            .map(|d| {
                serde_json::from_str::<Value>(d).unwrap()["reason"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("late: event_time is "))
        );
        assert!(reasons.iter().any(|r| r.starts_with("orphan click")));
        assert!(reasons.iter().any(|r| r.contains("max_future_s")));
    }
}

/// Drops the fields that measure wall-clock time.
fn without_timing(mut line: Value) -> Value {
    for p in line["pipelines"].as_array_mut().unwrap() {
        if let Some(m) = p.get_mut("matching").and_then(Value::as_object_mut) {
            m.remove("window_p99_ms");
        }
        p["dead_letter"]["path"] = Value::Null;
    }
    line
}

#[test]
fn the_main_jobs_pipelines_give_the_same_answer_every_run_at_every_layout_even_under_load() {
    // The pipelines of examples/local.toml, on a smaller stream.
    let local =
        std::fs::read_to_string(dima_tests::repo_root().join("examples/local.toml")).unwrap();
    let start = local.find("[pipelines.ads]").unwrap();
    let end = local.find("[inference]").unwrap();
    let pipelines = &local[start..end];
    assert!(
        pipelines.contains("late_fraction") && pipelines.contains("[[pipelines.ads.features]]")
    );
    let dir = tempfile::tempdir().unwrap();
    let mut first: Option<(Value, Vec<u8>, Vec<u8>)> = None;
    for (run, (processes, workers), busy) in [
        (0, (2, 1), false),
        (1, (2, 1), true),
        (2, (2, 1), false),
        (3, (1, 1), false),
        (4, (2, 2), false),
    ] {
        let here = dir.path().join(format!("run{run}"));
        std::fs::create_dir_all(&here).unwrap();
        let manifest = write(
            &here,
            "m.toml",
            &layout_manifest(processes, workers, pipelines),
        );
        // Another process keeps both CPUs busy during one run.
        let hogs: Vec<std::process::Child> = (0..if busy { 2 } else { 0 })
            .map(|_| {
                std::process::Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .unwrap()
            })
            .collect();
        let done = run_dima(
            &[
                "up",
                manifest.to_str().unwrap(),
                "--job",
                "pipelines",
                "--events",
                "40000",
            ],
            LIMIT,
        );
        for mut hog in hogs {
            hog.kill().ok();
            hog.wait().ok();
        }
        done.assert_success().assert_no_panic();
        let line = without_timing(serde_json::from_str(done.last_line()).unwrap());
        let dispatches = std::fs::read(here.join("out/dispatches.jsonl")).unwrap();
        let examples = std::fs::read(here.join("out/examples.jsonl")).unwrap();
        assert!(!dispatches.is_empty() && !examples.is_empty());
        let layout = format!(
            "run {run}: {processes}x{workers}{}",
            if busy { " under load" } else { "" }
        );
        match &first {
            None => first = Some((line, dispatches, examples)),
            Some((l, d, e)) => {
                assert_eq!(*l, line, "{layout}");
                assert!(*d == dispatches, "{layout}: dispatches differ");
                assert!(*e == examples, "{layout}: examples differ");
            }
        }
    }
}
