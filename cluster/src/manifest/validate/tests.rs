//! The manifest's validation, field by field.

use std::path::Path;
use std::time::Duration;

use crate::manifest::{ApiKey, InferenceLoad, Manifest, ManifestError};

fn parse(text: &str) -> Result<Manifest, ManifestError> {
    Manifest::parse(text, Path::new("m.toml"))
}

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Err(ManifestError::Invalid { problems, .. }) => {
            problems.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected validation problems, got {other:?}"),
    }
}

#[test]
fn empty_manifest_gets_every_default() {
    let m = parse("").unwrap();
    assert_eq!(m.cluster.name, "dima");
    assert_eq!(m.dataflow.processes.len(), 1);
    assert_eq!(
        m.dataflow.processes[0].address.to_string(),
        "127.0.0.1:2101"
    );
    assert_eq!(m.dataflow.processes[0].workers, 1);
    assert_eq!(m.dataflow.processes[0].metrics_address, None);
    assert_eq!(m.telemetry.log_level, "info");
    assert_eq!(m.telemetry.otlp, None);
    assert_eq!(m.jobs.count, dataflows::CountJob::default());
}

#[test]
fn bad_address_is_named_exactly() {
    let p = problems(
        r#"
        [[dataflow.processes]]
        address = "127.0.0.1:2101"
        [[dataflow.processes]]
        address = "127.0.0.1:x"
        "#,
    );
    assert_eq!(
        p,
        vec![
            r#"dataflow.processes[1].address: "127.0.0.1:x" is not a socket address (expected IP:PORT, e.g. 127.0.0.1:2101)"#
        ]
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let p = problems(
        r#"
        cluster = { name = "" }
        [[dataflow.processes]]
        address = "127.0.0.1:2101"
        workers = 0
        [[dataflow.processes]]
        address = "127.0.0.1:2101"
        [telemetry]
        log_format = "xml"
        otlp_endpoint = "localhost:4317"
        [jobs.count]
        keys = 0
        "#,
    );
    let joined = p.join("\n");
    for needle in [
        "cluster.name:",
        "dataflow.processes[0].workers: must be at least 1",
        "dataflow.processes[1].address: 127.0.0.1:2101 is already used by dataflow.processes[0].address",
        "telemetry.log_format:",
        "telemetry.otlp_endpoint:",
        "jobs.count.keys: must be at least 1",
    ] {
        assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
    }
}

#[test]
fn unequal_workers_are_rejected() {
    let p = problems(
        r#"
        [[dataflow.processes]]
        address = "127.0.0.1:2101"
        workers = 2
        [[dataflow.processes]]
        address = "127.0.0.1:2102"
        workers = 1
        "#,
    );
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with("dataflow.processes[1].workers: 1 differs"),
        "{p:?}"
    );
}

#[test]
fn metrics_ports_follow_the_process_index_and_must_not_collide() {
    let m = parse(
        r#"
        [[dataflow.processes]]
        address = "127.0.0.1:2101"
        [[dataflow.processes]]
        address = "127.0.0.1:2102"
        [telemetry]
        metrics_address = "127.0.0.1:9464"
        "#,
    )
    .unwrap();
    let ports: Vec<_> = m
        .dataflow
        .processes
        .iter()
        .map(|p| p.metrics_address.unwrap().port())
        .collect();
    assert_eq!(ports, vec![9464, 9465]);

    let p = problems(
        r#"
        [[dataflow.processes]]
        address = "127.0.0.1:2101"
        [[dataflow.processes]]
        address = "127.0.0.1:2102"
        [telemetry]
        metrics_address = "127.0.0.1:2101"
        "#,
    );
    assert!(p.iter().any(|m| m.contains("already used")), "{p:?}");
}

#[test]
fn checkpoints_fields_are_checked_and_kafka_sources_refused() {
    let p = problems(
        r#"
        [checkpoints]
        every_s = 0
        keep = 0
        "#,
    );
    assert!(
        p.iter()
            .any(|m| m.starts_with("checkpoints.dir:") && m.contains("is required")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|m| m.starts_with("checkpoints.every_s:")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|m| m.starts_with("checkpoints.keep:")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.contains("no [pipelines.*] to checkpoint")),
        "{p:?}"
    );
    // A Kafka source cannot resume yet: refused by name.
    let p = problems(
        r#"
        [checkpoints]
        dir = "ckpt"
        [pipelines.ads]
        family = "ads"
        [pipelines.ads.source]
        kind = "kafka"
        brokers = "127.0.0.1:9092"
        topic = "ads"
        "#,
    );
    assert!(
        p.iter().any(|m| m.contains("pipelines.ads.source") && m.contains("Kafka source cannot resume")),
        "{p:?}"
    );
}

#[test]
fn inference_resolves_with_defaults() {
    let m = parse(
        r#"
        [inference]
        model = "gemma3-270m"
        "#,
    )
    .unwrap();
    let i = m.inference.unwrap();
    assert_eq!((i.tp, i.ranks.clone(), i.root), (1, vec![0], None));
    assert_eq!(i.listen.to_string(), "127.0.0.1:8000");
    assert_eq!(i.served_model_name, "gemma3-270m");
    assert_eq!(
        (i.max_batch, i.max_waiting, i.max_tokens_in_flight),
        (16, 64, 65_536)
    );
    assert_eq!(i.collective_timeout, Duration::from_secs(30));
    assert_eq!(
        i.load,
        InferenceLoad {
            requests: 8,
            concurrency: 4,
            max_tokens: 16
        }
    );
    assert!(i.in_one_process() && !i.keep_serving && i.api_key.is_none());

    let m = parse(
        r#"
        [[dataflow.processes]]
        address = "127.0.0.1:2101"
        [[dataflow.processes]]
        address = "127.0.0.1:2102"
        [inference]
        model = "models/my.gguf"
        tp = 2
        ranks = [0, 1]
        root = "127.0.0.1:2201"
        api_key_env = "MY_KEY"
        load = { requests = 0 }
        "#,
    )
    .unwrap();
    let i = m.inference.unwrap();
    assert!(!i.in_one_process());
    assert_eq!(i.root.unwrap().to_string(), "127.0.0.1:2201");
    assert_eq!(i.api_key, Some(ApiKey::Env("MY_KEY".into())));
    assert!(i.model.ends_with("models/my.gguf"), "{}", i.model);
    assert_eq!(i.served_model_name, "my.gguf");
    assert_eq!(i.load.requests, 0);
}

#[test]
fn inference_problems_name_their_fields() {
    let p = problems(
        r#"
        [[dataflow.processes]]
        address = "127.0.0.1:2101"
        [[dataflow.processes]]
        address = "127.0.0.1:2102"
        [[dataflow.processes]]
        address = "127.0.0.1:2103"
        [inference]
        backend = "tpu"
        tp = 3
        ranks = [0, 0, 5]
        listen = "127.0.0.1:2102"
        api_key = "a"
        api_key_env = "B"
        collective_timeout_s = 0
        max_batch = 0
        load = { concurrency = 0 }
        "#,
    );
    let want = [
        "inference.model: is required",
        "inference.backend: \"tpu\" is not a backend",
        "inference.ranks[2]: process 5 does not exist (dataflow.processes has 3)",
        "inference.ranks: [0, 0, 5] puts some ranks together and others apart",
        "inference.root: is required when ranks run in different processes",
        "inference.listen: 127.0.0.1:2102 is already dataflow.processes[1].address",
        "inference.api_key: set api_key or api_key_env, not both",
        "inference.collective_timeout_s: 0 is not between 0.1 and 3600 seconds",
        "inference.load.concurrency: must be at least 1",
        "inference.max_batch: must be at least 1",
    ];
    for w in want {
        assert!(
            p.iter().any(|m| m.starts_with(w)),
            "missing {w:?} in {p:#?}"
        );
    }
    let p =
        problems("[inference]\nmodel = \"gemma3-270m\"\nbackend = \"cuda\"\ntp = 2\nranks = [0]\n");
    assert!(
        p.iter().all(|m| !m.starts_with("inference.backend")),
        "tp 2 in one process is fine on GPUs: {p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.starts_with("inference.ranks: lists 1 process(es) for tp = 2")),
        "{p:?}"
    );
}

#[test]
fn pipelines_resolve_with_defaults_and_paths_next_to_the_manifest() {
    let m = Manifest::parse(
        r#"
        [pipelines.ads]
        [pipelines.replay]
        family = "dispatch"
        epoch_events = 500
        [pipelines.replay.source]
        kind = "jsonl"
        path = "data/d.jsonl"
        [pipelines.replay.sink]
        kind = "jsonl"
        path = "/abs/out.jsonl"
        [pipelines.replay.dead_letter]
        path = "dl/replay.jsonl"
        "#,
        Path::new("/etc/dima/m.toml"),
    )
    .unwrap();
    use dataflows::events::Family;
    use dataflows::pipelines::{GeneratorSpec, SinkSpec, SourceSpec};
    assert_eq!(m.pipelines.len(), 2);
    let ads = &m.pipelines[0];
    assert_eq!((ads.name.as_str(), ads.family), ("ads", Family::Ads));
    assert_eq!(
        ads.source,
        SourceSpec::Generator(GeneratorSpec::new(Family::Ads))
    );
    assert_eq!(ads.sink, SinkSpec::None);
    assert_eq!(
        ads.dead_letter,
        Path::new("/etc/dima/dead-letter/ads.jsonl")
    );
    assert_eq!((ads.epoch_events, ads.max_epochs_in_flight), (10_000, 4));
    let replay = &m.pipelines[1];
    assert_eq!(replay.family, Family::Dispatch);
    assert_eq!(
        replay.source,
        SourceSpec::Jsonl {
            path: "/etc/dima/data/d.jsonl".into()
        }
    );
    assert_eq!(
        replay.sink,
        SinkSpec::Jsonl {
            path: "/abs/out.jsonl".into()
        }
    );
    assert_eq!(replay.dead_letter, Path::new("/etc/dima/dl/replay.jsonl"));
    assert_eq!(replay.epoch_events, 500);
}

#[test]
fn pipeline_problems_name_their_fields() {
    let p = problems(
        r#"
        [pipelines.clicks]
        [pipelines.ads]
        epoch_events = 0
        [pipelines.ads.source]
        kind = "generator"
        path = "x.jsonl"
        malformed_fraction = 1.5
        [pipelines.ads.sink]
        kind = "jsonl"
        [pipelines.dispatch.source]
        kind = "jsonl"
        [pipelines.dispatch.sink]
        kind = "carrier-pigeon"
        [pipelines.k]
        family = "ads"
        [pipelines.k.source]
        kind = "kafka"
        brokers = "127.0.0.1:9092"
        [pipelines.k.sink]
        kind = "kafka"
        topic = "out"
        "#,
    );
    let expected = [
        "pipelines.ads.epoch_events: must be at least 1",
        "pipelines.ads.source.path: does not apply to kind = \"generator\"",
        "pipelines.ads.source.malformed_fraction: 1.5 is not between 0 and 1",
        "pipelines.ads.sink.path: is required for kind = \"jsonl\"",
        "pipelines.clicks.family: is missing (needed when the pipeline is not named ads or dispatch): \"ads\" or \"dispatch\"",
        "pipelines.dispatch.source.path: is required for kind = \"jsonl\"",
        "pipelines.dispatch.sink.kind: \"carrier-pigeon\" is not one of \"none\", \"stdout\", \"jsonl\", \"kafka\"",
        "pipelines.k.source.topic: is required for kind = \"kafka\"",
        "pipelines.k.sink.brokers: is required for kind = \"kafka\"",
    ];
    assert_eq!(p, expected, "{p:#?}");
}

#[test]
fn hashed_features_are_checked_and_reach_the_fixed_effect() {
    let p = problems(
        r#"
        [pipelines.ads.learner]
        hashed_features = ["member", "placement*weekday"]
        [pipelines.a2]
        family = "ads"
        [pipelines.a2.learner]
        hashed_features = ["member"]
        hash_bits = 40
        fixed_effect_every = 2
        "#,
    );
    let expected = [
        "pipelines.a2.learner.hash_bits: hash_bits 40 must be between 1 and 24",
        "pipelines.ads.learner.hashed_features: \"placement*weekday\": \"weekday\" is not one of member, item, campaign, device, placement, position, hour",
        "pipelines.ads.learner.hashed_features: hashed features feed the fixed effect: set fixed_effect_every too",
    ];
    assert_eq!(p, expected, "{p:#?}");
    let m = parse(
        r#"
        [pipelines.ads.learner]
        hashed_features = ["member", "placement*hour"]
        hash_bits = 16
        fixed_effect_every = 3
        "#,
    )
    .unwrap();
    let learner = m.pipelines[0].learner.as_ref().unwrap();
    assert_eq!(learner.hashing.bits(), 16);
    assert!(!learner.hashing.is_empty());
    assert_eq!(learner.fixed.unwrap().hash_bits, 16);
}

#[test]
fn syntax_errors_carry_line_and_column() {
    match parse("[cluster]\nname = \"a\"\nworkers = = 3\n") {
        Err(ManifestError::Syntax { line, column, .. }) => assert_eq!((line, column), (3, 11)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_fields_and_wrong_types_name_the_field() {
    match parse("[[dataflow.processes]]\naddress = \"127.0.0.1:1\"\nadress = \"x\"\n") {
        Err(e @ ManifestError::Schema { .. }) => {
            let text = e.to_string();
            assert!(text.contains("dataflow.processes[0]"), "{text}");
            assert!(text.contains("unknown field `adress`"), "{text}");
            assert!(text.starts_with("m.toml:3:"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    match parse("[[dataflow.processes]]\naddress = \"127.0.0.1:1\"\nworkers = \"two\"\n") {
        Err(e @ ManifestError::Schema { .. }) => {
            let text = e.to_string();
            assert!(text.contains("dataflow.processes[0].workers"), "{text}");
            assert!(text.contains("invalid type"), "{text}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn event_time_attribution_and_features_are_checked_field_by_field() {
    let p = problems(
        r#"
        [pipelines.ads.time]
        watermark_delay_s = -1
        idle_s = 5
        [pipelines.ads.attribution]
        window_s = 0
        [[pipelines.ads.features]]
        name = "a"
        key = "member_id"
        measure = "clicks"
        window_s = 60
        [[pipelines.ads.features]]
        name = "a"
        key = "context.country"
        measure = "clicks"
        window_s = 60
        [[pipelines.ads.features]]
        name = "c"
        key = "context.colour"
        measure = "impressions"
        window_s = -5
        [[pipelines.ads.features]]
        name = "d"
        key = "item_id"
        measure = "views"
        [pipelines.ads.learner]
        features = ["a", "nope"]
        [pipelines.dispatch.attribution]
        window_s = 60
        "#,
    );
    for wanted in [
        "pipelines.ads.time.watermark_delay_s: -1 is not a number of seconds >= 0",
        "pipelines.ads.time.idle_s: applies to kafka sources only (kind = \"generator\" is read to its end)",
        "pipelines.ads.attribution.window_s: 0 is not a positive number of seconds (at least 0.001)",
        "pipelines.ads.features[1].name: \"a\" is defined twice",
        "pipelines.ads.features[1].key: \"context.country\" is not a field of ad_click, so clicks cannot be counted by it (clicks carry member_id, item_id, campaign_id)",
        "pipelines.ads.features[2].key: \"context.colour\" is not a field of ad_impression or ad_click",
        "pipelines.ads.features[2].window_s: -5 is not a positive number of seconds (at least 0.001)",
        "pipelines.ads.features[3].measure: \"views\" is not \"impressions\" or \"clicks\"",
        "pipelines.ads.features[3].window_s: is required (seconds, > 0)",
        "pipelines.ads.learner.features[1]: \"nope\" is not a feature of this pipeline (defined: a)",
        "pipelines.dispatch.attribution: applies to ads pipelines only",
    ] {
        assert!(
            p.iter().any(|problem| problem.starts_with(wanted)),
            "{wanted}\nnot in {p:#?}"
        );
    }
}

#[test]
fn event_time_sections_resolve_with_their_defaults() {
    let m = parse(
        r#"
        [pipelines.ads.time]
        watermark_delay_s = 30
        [[pipelines.ads.features]]
        name = "member_clicks_1h"
        key = "member_id"
        measure = "clicks"
        window_s = 3600
        [pipelines.ads.learner]
        features = ["member_clicks_1h"]
        [pipelines.dispatch.matching]
        lateness_s = 6
        "#,
    )
    .unwrap();
    let ads = &m.pipelines[0];
    assert_eq!(ads.time.watermark_delay_ms, 30_000);
    assert_eq!(ads.time.bucket_ms, 10_000);
    assert_eq!(ads.features[0].window_ms, 3_600_000);
    assert_eq!(ads.ads_stages().map(|a| a.window_ms), Some(600_000));
    let learner = ads.learner.as_ref().unwrap();
    assert_eq!(
        (learner.features.clone(), learner.window_ms),
        (vec![0], 3_600_000)
    );
    let dispatch = &m.pipelines[1];
    assert_eq!(dispatch.time.watermark_delay_ms, 6_000);
    assert_eq!(dispatch.ads_stages(), None);
}

#[test]
fn kafka_security_properties_and_codecs_are_checked() {
    let p = problems(
        r#"
        [pipelines.ads.source]
        kind = "kafka"
        brokers = "127.0.0.1:9092"
        topic = "ads"
        missing_topic_timeout_s = -1
        properties = { "fetch.max.bytes" = 1048576, "group.id" = "mine" }
        [pipelines.ads.source.security]
        protocol = "sasl_ssl"
        sasl_mechanism = "SCRAM-SHA-512"
        username = "dima"
        password = "hunter2"
        ca_file = "no-such-ca.pem"
        [pipelines.ads.sink]
        kind = "kafka"
        brokers = "127.0.0.1:9092"
        topic = "out"
        compression = "brotli"
        properties = { "fetch.max.bytez" = "1" }
        [pipelines.ads.sink.security]
        protocol = "plaintext"
        username = "dima"
        password_env = "DIMA_TEST_SURELY_UNSET_VARIABLE"
        [pipelines.dispatch.sink]
        kind = "jsonl"
        path = "d.jsonl"
        compression = "zstd"
        "#,
    );
    let expected = [
        "pipelines.ads.sink.compression: \"brotli\" is not one of \"none\", \"gzip\", \"snappy\", \"lz4\", \"zstd\"",
        "pipelines.ads.sink.security.password_env: the environment variable DIMA_TEST_SURELY_UNSET_VARIABLE is not set (or is not UTF-8)",
        "pipelines.ads.sink.security.username: applies to protocol \"sasl_plaintext\" or \"sasl_ssl\" (protocol is \"plaintext\")",
        "pipelines.ads.sink.security.password_env: applies to protocol \"sasl_plaintext\" or \"sasl_ssl\" (protocol is \"plaintext\")",
        "pipelines.ads.source.security.ca_file: no-such-ca.pem does not exist or is not a file",
        "pipelines.ads.source.security.password: a secret is never written in the manifest: name an environment variable (password_env) or a file (password_file)",
        "pipelines.ads.source.properties.\"group.id\": is owned by Dima: set `group`",
        "pipelines.ads.source.missing_topic_timeout_s: -1 is not a positive number of seconds",
        "pipelines.dispatch.sink.compression: does not apply to kind = \"jsonl\"",
    ];
    for want in expected {
        assert!(p.iter().any(|got| got == want), "{want} in {p:#?}");
    }
    // librdkafka's own check names a property it does not know.
    assert!(
        p.iter()
            .any(|got| got.starts_with("pipelines.ads.sink.properties:")
                && got.contains("fetch.max.bytez")),
        "{p:#?}"
    );
    // The secret itself is never echoed.
    assert!(p.iter().all(|got| !got.contains("hunter2")), "{p:#?}");
}

#[test]
fn kafka_settings_reach_the_specs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not checked here").unwrap();
    let secret = dir.path().join("password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let text = format!(
        r#"
        [pipelines.ads.source]
        kind = "kafka"
        brokers = "127.0.0.1:9092"
        topic = "ads"
        missing_topic_timeout_s = 5
        properties = {{ "fetch.max.bytes" = 1048576, "client.id" = "ads-reader" }}
        [pipelines.ads.source.security]
        protocol = "sasl_ssl"
        ca_file = "{}"
        sasl_mechanism = "SCRAM-SHA-256"
        username = "dima"
        password_file = "{}"
        [pipelines.ads.sink]
        kind = "kafka"
        brokers = "127.0.0.1:9092"
        topic = "out"
        compression = "zstd"
        "#,
        ca.display(),
        secret.display()
    );
    let m = parse(&text).unwrap();
    let ads = m.pipelines.iter().find(|p| p.name == "ads").unwrap();
    let dataflows::pipelines::SourceSpec::Kafka(source) = &ads.source else {
        panic!("a kafka source");
    };
    use dataflows::pipelines::kafka::{Compression, Mechanism, Protocol, Secret};
    assert_eq!(source.missing_topic_timeout, Duration::from_secs(5));
    assert_eq!(source.properties["fetch.max.bytes"], "1048576");
    assert_eq!(source.security.protocol, Protocol::SaslSsl);
    assert_eq!(source.security.mechanism, Some(Mechanism::ScramSha256));
    assert_eq!(source.security.password, Some(Secret::File(secret.clone())));
    let config = source.client().config().unwrap();
    assert_eq!(config.get("sasl.password"), Some("s3cret"));
    assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
    assert_eq!(config.get("client.id"), Some("ads-reader"));
    let dataflows::pipelines::SinkSpec::Kafka(sink) = &ads.sink else {
        panic!("a kafka sink");
    };
    assert_eq!(sink.compression, Compression::Zstd);
}
