//! Kafka end to end, against a real Kafka-compatible broker (tansu with
//! sqlite storage, started on loopback by each test; `scripts/tansu.sh`
//! installs it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use dima_tests::{
    Broker, check_events, free_port, layout_manifest, run_dima, spawn_dima, wait, write,
};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

fn generate(family: &str, count: u64, seed: u64, malformed: f64, to: &str) {
    run_dima(
        &[
            "events",
            "generate",
            "--pipeline",
            family,
            "--count",
            &count.to_string(),
            "--seed",
            &seed.to_string(),
            "--malformed",
            &malformed.to_string(),
            "--to",
            to,
            "--partitions",
            "4",
        ],
        LIMIT,
    )
    .assert_success();
}

/// `dima events check` of the same events written to a file.
fn expected(dir: &Path, family: &str, count: u64, seed: u64, malformed: f64) -> Value {
    let path = dir.join(format!("{family}-expected.jsonl"));
    generate(
        family,
        count,
        seed,
        malformed,
        &format!("jsonl:{}", path.display()),
    );
    check_events(&path).1
}

fn kafka_pipeline(name: &str, broker: &str, topic: &str, group: &str, extra: &str) -> String {
    format!(
        r#"
[pipelines.{name}]
epoch_events = 2000
max_epochs_in_flight = 2
[pipelines.{name}.source]
kind = "kafka"
brokers = "{broker}"
topic = "{topic}"
group = "{group}"
stop_at_end = true
{extra}
[pipelines.{name}.sink]
kind = "jsonl"
path = "out/{name}.jsonl"
"#
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `dima up` of `pipelines` (one process, one worker) in `dir`: it must
/// fail without a panic within `bound`, its error naming every one of
/// `needles`; returns its stderr.
fn up_fails_within(dir: &Path, pipelines: &str, bound: Duration, needles: &[&str]) -> String {
    let manifest = write(dir, "m.toml", &layout_manifest(1, 1, pipelines));
    let started = std::time::Instant::now();
    let done = run_dima(&["up", manifest.to_str().unwrap()], LIMIT);
    assert!(!done.status.success(), "{}", done.stdout);
    done.assert_no_panic();
    for needle in needles {
        assert!(done.stderr.contains(needle), "{needle}: {}", done.stderr);
    }
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    done.stderr
}

/// Offsets committed by `group` on `topic`'s partitions, summed.
fn committed(broker: &str, topic: &str, group: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let offsets = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    offsets
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

/// 200,000 events of both pipelines, 1% malformed, consumed by two
/// processes of two workers: every valid event counted and written once, the
/// dead letters exactly the malformed ones, named by topic/partition/offset.
#[test]
fn both_pipelines_from_kafka_every_valid_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"));
    let address = broker.address();
    let mut wanted = BTreeMap::new();
    for (family, seed) in [("ads", 5), ("dispatch", 6)] {
        generate(
            family,
            100_000,
            seed,
            0.01,
            &format!("kafka:{address}/{family}"),
        );
        wanted.insert(family, expected(dir.path(), family, 100_000, seed, 0.01));
    }
    let pipelines = kafka_pipeline("ads", &address, "ads", "g-both", "")
        + &kafka_pipeline("dispatch", &address, "dispatch", "g-both", "");
    let manifest = write(dir.path(), "m.toml", &layout_manifest(2, 2, &pipelines));
    let done = run_dima(&["up", manifest.to_str().unwrap()], LIMIT);
    done.assert_success().assert_no_panic();
    let result: Value = serde_json::from_str(done.last_line()).unwrap();
    for summary in result["pipelines"].as_array().unwrap() {
        let name = summary["name"].as_str().unwrap();
        let report = &wanted[name];
        assert_eq!(summary["read"], 100_000, "{name}");
        assert_eq!(summary["valid"], report["valid"], "{name}");
        assert_eq!(summary["by_type"], report["by_type"], "{name}");
        let malformed = report["malformed"].as_array().unwrap();
        assert_eq!(
            summary["malformed"].as_u64(),
            Some(malformed.len() as u64),
            "{name}"
        );

        let out = lines(&dir.path().join(format!("out/{name}.jsonl")));
        let unique: BTreeSet<&String> = out.iter().collect();
        assert_eq!(
            out.len() as u64,
            report["valid"].as_u64().unwrap(),
            "{name}: written once"
        );
        assert_eq!(unique.len(), out.len(), "{name}: no duplicates");

        let dead = lines(&dir.path().join(format!("dead-letter/{name}.jsonl")));
        let mut reasons: Vec<String> = Vec::new();
        let mut positions = BTreeSet::new();
        for letter in &dead {
            let v: Value = serde_json::from_str(letter).unwrap();
            let source = v["source"].as_str().unwrap();
            let parts: Vec<&str> = source.split('/').collect();
            assert_eq!(parts.len(), 3, "topic/partition/offset: {source}");
            assert_eq!(parts[0], name);
            assert!(
                positions.insert(source.to_owned()),
                "dead letter twice: {source}"
            );
            reasons.push(v["reason"].as_str().unwrap().to_owned());
        }
        let mut expected_reasons: Vec<String> = malformed
            .iter()
            .map(|m| m["reason"].as_str().unwrap().to_owned())
            .collect();
        reasons.sort();
        expected_reasons.sort();
        assert_eq!(
            reasons, expected_reasons,
            "{name}: the dead letters are the malformed lines"
        );
    }
}

/// A consuming process killed mid-run, then the cluster restarted: nothing
/// is lost, the restart resumes at the committed offsets, and the events
/// replayed are exactly those written after the last commit.
#[test]
fn a_killed_consumer_resumes_from_committed_offsets_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"));
    let address = broker.address();
    const TOTAL: u64 = 60_000;
    generate("ads", TOTAL, 9, 0.0, &format!("kafka:{address}/ads"));
    let throttle = "events_per_second = 6000.0";
    let manifest = write(
        dir.path(),
        "m.toml",
        &layout_manifest(
            2,
            1,
            &kafka_pipeline("ads", &address, "ads", "g-kill", throttle),
        ),
    );
    let manifest = manifest.to_str().unwrap();
    let sink = dir.path().join("out/ads.jsonl");
    let up = spawn_dima(&["up", manifest]);
    let progressed = dima_tests::eventually(Duration::from_secs(60), || {
        (lines(&sink).len() >= 15_000).then_some(())
    });
    assert!(progressed.is_some(), "the first run wrote nothing");
    let victim = dima_tests::pids_with_args(&[manifest, "--process 1"])[0];
    std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let first = wait(up, LIMIT);
    assert_eq!(first.status.code(), Some(1), "{}", first.stderr);
    let written_before = lines(&sink).len() as i64;
    let committed_before = committed(&address, "ads", "g-kill", 4);
    assert!(
        committed_before > 0 && committed_before < TOTAL as i64,
        "{committed_before}"
    );

    // The restart (no throttle) reads exactly what was not committed.
    let fast = std::fs::read_to_string(manifest)
        .unwrap()
        .replace(throttle, "");
    std::fs::write(manifest, fast).unwrap();
    let second = run_dima(&["up", manifest], LIMIT);
    second.assert_success().assert_no_panic();
    let result: Value = serde_json::from_str(second.last_line()).unwrap();
    let read_again = result["pipelines"][0]["read"].as_i64().unwrap();
    assert_eq!(
        read_again,
        TOTAL as i64 - committed_before,
        "resumed at the committed offsets"
    );
    assert_eq!(committed(&address, "ads", "g-kill", 4), TOTAL as i64);

    let out = lines(&sink);
    let complete: Vec<&String> = out.iter().filter(|l| l.ends_with('}')).collect();
    let unique: BTreeSet<&String> = complete.iter().copied().collect();
    assert_eq!(unique.len() as u64, TOTAL, "no event lost");
    // Replayed: what the first run wrote past its last commit.
    let duplicates = complete.len() as i64 - TOTAL as i64;
    let expected_duplicates = written_before - committed_before;
    assert!(
        (duplicates - expected_duplicates).abs() <= 1,
        "{duplicates} duplicates, {expected_duplicates} written after the last commit (a torn last line may differ by one)"
    );
    // Bounded by what two workers can have in flight: 2 epochs of 2000 each, plus the open one.
    assert!(duplicates <= 2 * 3 * 2000, "{duplicates} duplicates");
    eprintln!(
        "kill/restart: first run wrote {written_before}, committed {committed_before}; restart read {read_again}; {duplicates} events processed twice"
    );
}

/// The broker is down when the cluster starts, and goes away mid-run: the
/// source logs and retries; nothing crashes; everything arrives once the
/// broker is back.
#[test]
fn a_broker_down_at_start_or_mid_run_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("broker");
    let mut broker = Broker::start_on(&data, port);
    let address = broker.address();
    const TOTAL: u64 = 20_000;
    generate("ads", TOTAL, 3, 0.0, &format!("kafka:{address}/ads"));
    broker.stop();

    let manifest = write(
        dir.path(),
        "m.toml",
        &layout_manifest(
            2,
            1,
            &kafka_pipeline(
                "ads",
                &address,
                "ads",
                "g-down",
                "events_per_second = 4000.0",
            ),
        ),
    );
    let mut up = spawn_dima(&["up", manifest.to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        up.try_wait().unwrap().is_none(),
        "dima up must keep retrying, not exit"
    );
    let mut broker = Broker::start_on(&data, port);
    let sink = dir.path().join("out/ads.jsonl");
    let reading = dima_tests::eventually(Duration::from_secs(60), || {
        (lines(&sink).len() >= 4_000).then_some(())
    });
    assert!(reading.is_some(), "nothing read after the broker came up");
    broker.stop();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        up.try_wait().unwrap().is_none(),
        "dima up must survive the broker going away"
    );
    let _broker = Broker::start_on(&data, port);
    let done = wait(up, LIMIT);
    done.assert_success().assert_no_panic();
    assert!(
        done.stderr
            .contains("kafka source cannot reach the topic; retrying"),
        "a clear retry message:\n{}",
        done.stderr
    );
    let out = lines(&sink);
    let unique: BTreeSet<&String> = out.iter().collect();
    assert_eq!(unique.len() as u64, TOTAL, "every event arrived");
}

/// The same ads stream from a 4-partition topic (keyed by member, so each
/// partition is one share with its own watermark) and from a JSONL file
/// gives the same examples, labels and features.
#[test]
fn a_four_partition_topic_gives_the_same_examples_as_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"));
    let address = broker.address();
    let file = dir.path().join("ads.jsonl");
    generate(
        "ads",
        30_000,
        9,
        0.0,
        &format!("kafka:{address}/ads-features"),
    );
    generate("ads", 30_000, 9, 0.0, &format!("jsonl:{}", file.display()));
    let stages = r#"
[pipelines.ads.attribution]
window_s = 600

[[pipelines.ads.features]]
name = "member_clicks_1h"
key = "member_id"
measure = "clicks"
window_s = 3600

[[pipelines.ads.features]]
name = "campaign_impressions_10m"
key = "campaign_id"
measure = "impressions"
window_s = 600

[pipelines.ads.examples]
kind = "jsonl"
path = "out/examples.jsonl"
"#;
    let mut runs = Vec::new();
    for (name, source, layout) in [
        (
            "kafka",
            format!(
                "[pipelines.ads.source]\nkind = \"kafka\"\nbrokers = \"{address}\"\ntopic = \"ads-features\"\ngroup = \"features\"\nstop_at_end = true\n"
            ),
            (2, 2),
        ),
        (
            "file",
            format!(
                "[pipelines.ads.source]\nkind = \"jsonl\"\npath = \"{}\"\n",
                file.display()
            ),
            (1, 1),
        ),
    ] {
        let here = dir.path().join(name);
        std::fs::create_dir_all(&here).unwrap();
        let pipelines = format!("[pipelines.ads]\nepoch_events = 2000\n{source}{stages}");
        let manifest = write(
            &here,
            "m.toml",
            &layout_manifest(layout.0, layout.1, &pipelines),
        );
        let done = run_dima(
            &["up", manifest.to_str().unwrap(), "--job", "pipelines"],
            LIMIT,
        );
        done.assert_success().assert_no_panic();
        let result: Value = serde_json::from_str(done.last_line()).unwrap();
        let mut examples = lines(&here.join("out/examples.jsonl"));
        examples.sort();
        runs.push((result["pipelines"][0].clone(), examples));
    }
    let (kafka, file) = (&runs[0], &runs[1]);
    assert_eq!(kafka.0["read"], 30_000, "{}", kafka.0);
    assert_eq!(kafka.0["late"], 0, "{}", kafka.0);
    assert_eq!(kafka.0["attribution"], file.0["attribution"]);
    assert_eq!(kafka.0["features"], file.0["features"]);
    assert!(kafka.1.len() > 25_000);
    assert!(kafka.1 == file.1, "the examples differ");
}

/// A partition that goes silent does not hold event time back forever
/// (`time.idle_s`, Flink's idleness): the first 200 events (the earliest)
/// are on partition 1 of a two-partition topic and nothing more comes
/// there; the rest are on partition 0. Following the live topic, the
/// pipeline must emit examples while it runs, once partition 1 has been
/// silent for `idle_s`; without idleness its watermark would stop every
/// window. Every line it emits is one the file run emits.
#[test]
fn a_silent_partition_does_not_stop_event_time() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"));
    let address = broker.address();
    let file = dir.path().join("ads.jsonl");
    generate("ads", 20_000, 4, 0.0, &format!("jsonl:{}", file.display()));
    let topic = "ads-idle";
    dataflows::pipelines::kafka::ensure_topic(&address, topic, 2).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &address)
        .create()
        .unwrap();
    for (i, line) in lines(&file).iter().enumerate() {
        let partition = if i < 200 { 1 } else { 0 };
        loop {
            match producer.send::<(), _>(
                BaseRecord::to(topic)
                    .partition(partition)
                    .payload(line.as_str()),
            ) {
                Ok(()) => break,
                Err((e, _)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "{e}"
                    );
                    producer.poll(Duration::from_millis(50));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    let stages = r#"
[pipelines.ads.time]
idle_s = 5

[pipelines.ads.attribution]
window_s = 600

[pipelines.ads.examples]
kind = "jsonl"
path = "out/examples.jsonl"
"#;
    // The oracle: the same events from the file.
    let here = dir.path().join("file");
    std::fs::create_dir_all(&here).unwrap();
    let source = format!(
        "[pipelines.ads.source]\nkind = \"jsonl\"\npath = \"{}\"\n",
        file.display()
    );
    let pipelines = format!(
        "[pipelines.ads]\nepoch_events = 2000\n{source}{}",
        stages.replace("idle_s = 5\n", "")
    );
    let manifest = write(&here, "m.toml", &layout_manifest(1, 1, &pipelines));
    run_dima(
        &["up", manifest.to_str().unwrap(), "--job", "pipelines"],
        LIMIT,
    )
    .assert_success()
    .assert_no_panic();
    let want: BTreeSet<String> = lines(&here.join("out/examples.jsonl"))
        .into_iter()
        .collect();
    assert!(want.len() > 15_000, "{}", want.len());
    // The live run.
    let here = dir.path().join("kafka");
    std::fs::create_dir_all(&here).unwrap();
    let source = format!(
        "[pipelines.ads.source]\nkind = \"kafka\"\nbrokers = \"{address}\"\ntopic = \"{topic}\"\ngroup = \"idle\"\nstop_at_end = false\n"
    );
    let pipelines = format!("[pipelines.ads]\nepoch_events = 2000\n{source}{stages}");
    let manifest = write(&here, "m.toml", &layout_manifest(1, 1, &pipelines));
    let up = dima_tests::spawn_dima(&["up", manifest.to_str().unwrap(), "--job", "pipelines"]);
    let out = here.join("out/examples.jsonl");
    let enough = want.len() * 8 / 10;
    let emitted = dima_tests::eventually(Duration::from_secs(120), || {
        let got = std::fs::read_to_string(&out).ok()?;
        (got.lines().count() >= enough).then_some(())
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status();
    let done = dima_tests::wait(up, LIMIT);
    assert!(
        emitted.is_some(),
        "fewer than {enough} examples within 120 s while following the topic: {}\n{}",
        lines(&out).len(),
        done.stderr
    );
    let got = lines(&out);
    let stray: Vec<&String> = got.iter().filter(|l| !want.contains(*l)).take(3).collect();
    assert!(
        stray.is_empty(),
        "lines the file run does not have: {stray:?}"
    );
}

/// The Python with `confluent-kafka` (`DIMA_KAFKA_PYTHON`, set by
/// scripts/test.sh), or `None` with a note that the test is skipped.
fn independent_client() -> Option<std::ffi::OsString> {
    let python = std::env::var_os("DIMA_KAFKA_PYTHON");
    if python.is_none() {
        eprintln!(
            "DIMA_KAFKA_PYTHON is not set: skipping the independent-client checks (scripts/test.sh sets it)"
        );
    }
    python
}

/// Runs `tests/python/kafka_client.py` with `args`; its JSON answer.
fn independent(python: &std::ffi::OsStr, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kafka_client.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kafka_client.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Topics written by Confluent's own client with each codec the test
/// broker can serve (gzip, lz4, zstd; tansu 0.6.0 refuses to fetch snappy
/// batches, `UnexpectedType("Snappy")`, so snappy is checked on librdkafka's
/// mock cluster in `dataflows`) are read exactly: every event once, the
/// counts those of `dima events check` of the same lines. And Dima's sink
/// writing each codec is read back by that client, event for event.
#[test]
fn every_codec_is_read_and_written_with_an_independent_client() {
    let Some(python) = independent_client() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"));
    let address = broker.address();
    let file = dir.path().join("ads.jsonl");
    generate("ads", 20_000, 31, 0.0, &format!("jsonl:{}", file.display()));
    let report = check_events(&file).1;
    let codecs = ["gzip", "lz4", "zstd"];
    let mut pipelines = String::new();
    for codec in codecs {
        let sent = independent(
            &python,
            &[
                "produce",
                &address,
                &format!("in-{codec}"),
                codec,
                file.to_str().unwrap(),
            ],
        );
        assert_eq!(sent["sent"], 20_000);
        independent(&python, &["create", &address, &format!("out-{codec}")]);
        // Read each topic, and write the lines back with the same codec.
        pipelines += &format!(
            r#"
[pipelines.{codec}]
family = "ads"
epoch_events = 2000
[pipelines.{codec}.source]
kind = "kafka"
brokers = "{address}"
topic = "in-{codec}"
group = "g-{codec}"
stop_at_end = true
missing_topic_timeout_s = 30
[pipelines.{codec}.sink]
kind = "kafka"
brokers = "{address}"
topic = "out-{codec}"
compression = "{codec}"
properties = {{ "linger.ms" = 10, "client.id" = "dima-codec-test" }}
"#
        );
    }
    let manifest = write(dir.path(), "m.toml", &layout_manifest(1, 2, &pipelines));
    let done = run_dima(&["up", manifest.to_str().unwrap()], LIMIT);
    done.assert_success().assert_no_panic();
    let result: Value = serde_json::from_str(done.last_line()).unwrap();
    let mut expected_lines: Vec<String> = lines(&file);
    expected_lines.sort();
    for summary in result["pipelines"].as_array().unwrap() {
        let codec = summary["name"].as_str().unwrap();
        assert_eq!(summary["read"], 20_000, "{codec}");
        assert_eq!(summary["valid"], report["valid"], "{codec}");
        assert_eq!(summary["by_type"], report["by_type"], "{codec}");
        assert_eq!(summary["malformed"], 0, "{codec}");
        let back = independent(
            &python,
            &["consume", &address, &format!("out-{codec}"), "20000"],
        );
        assert_eq!(back["count"], 20_000, "{codec}: written once each");
        let got: Vec<String> = back["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_owned())
            .collect();
        // Dima writes each valid event as its canonical line: the same
        // events, so the same set once both are parsed.
        let parse = |l: &String| event_json(l);
        let mut got: Vec<Value> = got.iter().map(parse).collect();
        let mut want: Vec<Value> = expected_lines.iter().map(parse).collect();
        got.sort_by_key(|v| v.to_string());
        want.sort_by_key(|v| v.to_string());
        assert!(
            got == want,
            "{codec}: the lines read back are the events written"
        );
    }
}

/// An event line as JSON (for comparing lines whose key order may differ).
fn event_json(line: &str) -> Value {
    serde_json::from_str(line).unwrap()
}

/// A topic that never appears ends the run after
/// `missing_topic_timeout_s`, naming the topic and the setting.
#[test]
fn a_topic_that_never_appears_ends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"));
    let pipelines = kafka_pipeline(
        "ads",
        &broker.address(),
        "never-created",
        "g-missing",
        "missing_topic_timeout_s = 2",
    );
    up_fails_within(
        dir.path(),
        &pipelines,
        Duration::from_secs(60),
        &[
            "never-created",
            "does not exist after",
            "missing_topic_timeout_s",
        ],
    );
}

/// Sum of a gauge family's samples whose labels contain `labels`.
fn gauge_sum(body: &str, family: &str, labels: &str) -> Option<f64> {
    let samples: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(family) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// Lag: a source that stops at the end offsets it saw when it connected
/// leaves the records produced after that in the topic. Once its input
/// closes, `dima_kafka_consumer_lag_records` summed over its partitions is
/// exactly that remainder, and so is `kafka_lag_records` in the summary;
/// `dima_kafka_fetch_age_seconds` is exported per partition.
#[test]
fn the_lag_gauge_is_what_is_left_in_the_topic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"));
    let address = broker.address();
    generate("ads", 3_000, 41, 0.0, &format!("kafka:{address}/lag"));
    let port = free_port();
    // The ads source reads 3,000 records at 1,000/s; the dispatch pipeline
    // keeps the process up (and its metrics served) for a while after.
    let pipelines = format!(
        "[telemetry]\nmetrics_address = \"127.0.0.1:{port}\"\n\n{}\n\
         [pipelines.dispatch]\n[pipelines.dispatch.source]\nkind = \"generator\"\n\
         events = 12000\nevents_per_second = 1000.0\n",
        kafka_pipeline(
            "ads",
            &address,
            "lag",
            "g-lag",
            "events_per_second = 1000.0"
        )
    );
    let manifest = write(dir.path(), "m.toml", &layout_manifest(1, 2, &pipelines));
    let up = spawn_dima(&["up", manifest.to_str().unwrap()]);
    let metrics = format!("127.0.0.1:{port}");
    // Once every partition is connected (its gauges exist), 250 more.
    let connected = dima_tests::eventually(Duration::from_secs(60), || {
        let body = dima_tests::http_get(&metrics, "/metrics")?;
        let partitions = body
            .lines()
            .filter(|l| {
                l.starts_with("dima_kafka_fetch_age_seconds")
                    && l.contains(r#"dataflow="pipeline.ads""#)
            })
            .count();
        (partitions == 4).then_some(())
    });
    assert!(connected.is_some(), "the fetch-age gauges of 4 partitions");
    let extra = dir.path().join("extra.jsonl");
    generate("ads", 250, 42, 0.0, &format!("jsonl:{}", extra.display()));
    let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &address)
        .create()
        .unwrap();
    for (i, line) in lines(&extra).iter().enumerate() {
        producer
            .send(
                rdkafka::producer::BaseRecord::to("lag")
                    .key(&i.to_be_bytes())
                    .payload(line),
            )
            .unwrap();
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
    // The ads input closes after its 3,000; the gauge then holds the 250.
    let lag = dima_tests::eventually(Duration::from_secs(60), || {
        let body = dima_tests::http_get(&metrics, "/metrics")?;
        let read = gauge_sum(
            &body,
            "dima_operator_records_total",
            r#"dataflow="pipeline.ads",operator="read""#,
        )?;
        let lag = gauge_sum(
            &body,
            "dima_kafka_consumer_lag_records",
            r#"dataflow="pipeline.ads""#,
        )?;
        (read == 3000.0 && lag == 250.0).then_some(lag)
    });
    assert_eq!(lag, Some(250.0), "the lag gauge after the input closed");
    let done = wait(up, LIMIT);
    done.assert_success().assert_no_panic();
    let result: Value = serde_json::from_str(done.last_line()).unwrap();
    let ads = result["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "ads")
        .unwrap();
    assert_eq!(ads["read"], 3000);
    assert_eq!(ads["kafka_lag_records"], 250, "{ads}");
}

/// A sink topic that does not exist (on a broker that does not create
/// topics) ends the run with the broker's reason once librdkafka gives up
/// on it (`topic.metadata.propagation.max.ms`, passed through
/// `properties`), not epoch after epoch.
#[test]
fn a_sink_topic_that_does_not_exist_ends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"));
    let file = dir.path().join("ads.jsonl");
    generate("ads", 5_000, 43, 0.0, &format!("jsonl:{}", file.display()));
    let pipelines = format!(
        r#"
[pipelines.ads]
epoch_events = 200
[pipelines.ads.source]
kind = "jsonl"
path = "{}"
[pipelines.ads.sink]
kind = "kafka"
brokers = "{}"
topic = "no-such-topic"
properties = {{ "topic.metadata.propagation.max.ms" = 2000 }}
"#,
        file.display(),
        broker.address()
    );
    up_fails_within(
        dir.path(),
        &pipelines,
        Duration::from_secs(30),
        &["no-such-topic", "UnknownTopicOrPartition"],
    );
}

/// Authentication refused by a real broker (tansu with `--authentication`
/// and a SCRAM-SHA-512 user; the client sends a wrong password, read from a
/// file) ends the run within a bound, naming the cause and the topic, and
/// the password is not printed. Before, the source retried forever.
#[test]
fn refused_authentication_ends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker");
    let port = free_port();
    let mut open = Broker::start_with(&data, port, &[]);
    open.create_user("dima", "s3cret-pw");
    let address = open.address();
    generate("ads", 500, 51, 0.0, &format!("kafka:{address}/secured"));
    open.stop();
    let _broker = Broker::start_with(&data, port, &["--authentication"]);
    let wrong = write(dir.path(), "wrong", "not-the-password\n");
    let pipelines = kafka_pipeline("ads", &address, "secured", "g-sasl", "")
        + &format!(
            "[pipelines.ads.source.security]\nprotocol = \"sasl_plaintext\"\n\
             sasl_mechanism = \"SCRAM-SHA-512\"\nusername = \"dima\"\npassword_file = \"{}\"\n",
            wrong.display()
        );
    let stderr = up_fails_within(
        dir.path(),
        &pipelines,
        Duration::from_secs(60),
        &["topic secured", "Authentication", "not retried"],
    );
    assert!(!stderr.contains("not-the-password"), "{stderr}");
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `tests/python/tls_proxy.py` on `port` in front of the broker on
/// `origin`, with `dir`'s server certificate (and requiring client
/// certificates from `dir`'s CA when `mutual`); returns once it listens.
fn tls_proxy(python: &std::ffi::OsStr, dir: &Path, port: u16, origin: u16, mutual: bool) -> Killed {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tls_proxy.py");
    let mut args = vec![
        port.to_string(),
        origin.to_string(),
        dir.join("server.pem").display().to_string(),
        dir.join("server.key").display().to_string(),
    ];
    if mutual {
        args.push(dir.join("ca.pem").display().to_string());
    }
    let mut proxy = std::process::Command::new(python)
        .arg(script)
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(proxy.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    Killed(proxy)
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TLS against a real broker: tansu behind a TLS-terminating proxy
/// (`tests/python/tls_proxy.py`, Python's `ssl`) with a certificate for
/// 127.0.0.1 signed by a CA the test makes. Confluent's client writes the
/// events over TLS; Dima with `protocol = "ssl"` and that CA reads every
/// one; with another CA the certificate does not verify and the run ends
/// within a bound, naming the cause. And with mutual TLS (a proxy that asks
/// for a client certificate) `cert_file` and `key_file` sign the source in.
#[test]
fn tls_reads_with_the_ca_and_a_wrong_ca_ends_the_run() {
    let Some(python) = independent_client() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=dima-test-ca",
            "-days",
            "2",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other-ca.pem",
            "-subj",
            "/CN=another-ca",
            "-days",
            "2",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    write(d, "san.ext", "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    // A client certificate for mutual TLS, from the same CA.
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=dima-client",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "2",
        ],
    );
    let (broker_port, proxy_port) = (free_port(), free_port());
    let broker = Broker::start_advertising(&d.join("broker"), broker_port, proxy_port, &[]);
    let proxy = tls_proxy(&python, d, proxy_port, broker_port, false);
    let address = format!("127.0.0.1:{proxy_port}");
    let file = d.join("ads.jsonl");
    generate("ads", 1_000, 61, 0.0, &format!("jsonl:{}", file.display()));
    let report = check_events(&file).1;
    let out = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kafka_client.py"))
        .args(["produce", &address, "tls", "none", file.to_str().unwrap()])
        .env("KAFKA_CA", d.join("ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, ca) in [("right", "ca.pem"), ("wrong", "other-ca.pem")] {
        let pipelines = kafka_pipeline("ads", &address, "tls", &format!("g-{name}"), "")
            + &format!(
                "[pipelines.ads.source.security]\nprotocol = \"ssl\"\nca_file = \"{}\"\n",
                d.join(ca).display()
            );
        let manifest = write(
            d,
            &format!("{name}.toml"),
            &layout_manifest(1, 1, &pipelines),
        );
        let started = std::time::Instant::now();
        let done = run_dima(&["up", manifest.to_str().unwrap()], LIMIT);
        done.assert_no_panic();
        if name == "right" {
            done.assert_success();
            let result: Value = serde_json::from_str(done.last_line()).unwrap();
            let ads = &result["pipelines"][0];
            assert_eq!(ads["read"], 1000, "{}", done.stdout);
            assert_eq!(ads["valid"], report["valid"]);
        } else {
            assert!(!done.status.success(), "{}", done.stdout);
            assert!(
                done.stderr.contains("topic tls")
                    && (done.stderr.contains("SSL") || done.stderr.contains("certificate")),
                "{}",
                done.stderr
            );
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{:?}",
                started.elapsed()
            );
        }
    }
    // Mutual TLS: the broker again, behind a proxy that asks for a client
    // certificate from the CA; with `cert_file` and `key_file` the source
    // reads every event. (Without them the proxy closes the connection after
    // the handshake, which librdkafka cannot tell from a broker going away,
    // so that case is retried like one: not tested here.)
    drop((proxy, broker));
    let (broker_port, mutual_port) = (free_port(), free_port());
    let _broker = Broker::start_advertising(&d.join("broker"), broker_port, mutual_port, &[]);
    let _mutual = tls_proxy(&python, d, mutual_port, broker_port, true);
    let pipelines = kafka_pipeline(
        "ads",
        &format!("127.0.0.1:{mutual_port}"),
        "tls",
        "g-mutual",
        "",
    ) + &format!(
        "[pipelines.ads.source.security]\nprotocol = \"ssl\"\nca_file = \"{}\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\n",
        d.join("ca.pem").display(),
        d.join("client.pem").display(),
        d.join("client.key").display()
    );
    let manifest = write(d, "mutual.toml", &layout_manifest(1, 1, &pipelines));
    let done = run_dima(&["up", manifest.to_str().unwrap()], LIMIT);
    done.assert_success().assert_no_panic();
    let result: Value = serde_json::from_str(done.last_line()).unwrap();
    assert_eq!(result["pipelines"][0]["read"], 1000, "{}", done.stdout);
}
