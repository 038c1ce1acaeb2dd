//! `[pipelines.*]`: sources, sinks, dead letters, the learner and the
//! matcher of each pipeline.

use std::path::Path;

use dataflows::events::Family;
use dataflows::learner::StepParams;
use std::time::Duration;

use dataflows::pipelines::kafka::{
    KafkaSinkSpec, KafkaSourceSpec, MISSING_TOPIC_TIMEOUT, Role, Until,
};
use dataflows::pipelines::{
    GeneratorSpec, LearnerSpec, MatchingSpec, PipelineSpec, SinkSpec, SourceSpec,
};

use dataflows::features::{AttributionSpec, EventTime, FeatureSpec, KeyField, Measure};

use crate::manifest::raw::{RawFeature, RawMatching, RawPipeline, RawSink, RawSource, RawTime};

use super::{Problems, kafka, required_text, resolve_path};

/// Resolves a sink table (`field` is its dotted path, for problems).
fn sink_spec(
    sink_raw: RawSink,
    field: &str,
    base: &Path,
    problems: &mut Problems,
) -> Option<SinkSpec> {
    let sink_kind = sink_raw.kind.as_deref().unwrap_or("none");
    if sink_kind != "jsonl" && sink_raw.path.is_some() {
        problems.add(
            format!("{field}.path"),
            format!("does not apply to kind = {sink_kind:?}"),
        );
    }
    if sink_kind != "kafka" {
        for (set, name) in [
            (sink_raw.brokers.is_some(), "brokers"),
            (sink_raw.topic.is_some(), "topic"),
            (sink_raw.compression.is_some(), "compression"),
            (sink_raw.security.is_some(), "security"),
            (sink_raw.properties.is_some(), "properties"),
        ] {
            if set {
                problems.add(
                    format!("{field}.{name}"),
                    format!("does not apply to kind = {sink_kind:?}"),
                );
            }
        }
    }
    match sink_kind {
        "none" => Some(SinkSpec::None),
        "stdout" => Some(SinkSpec::Stdout),
        "jsonl" => match &sink_raw.path {
            Some(path) => Some(SinkSpec::Jsonl {
                path: resolve_path(base, path),
            }),
            None => {
                problems.add(format!("{field}.path"), "is required for kind = \"jsonl\"");
                None
            }
        },
        "kafka" => {
            let brokers = required_text(
                sink_raw.brokers.clone(),
                &format!("{field}.brokers"),
                problems,
            );
            let topic = required_text(sink_raw.topic.clone(), &format!("{field}.topic"), problems);
            let compression = kafka::compression(sink_raw.compression.as_deref(), field, problems);
            let security = kafka::security(sink_raw.security, field, base, problems);
            let properties =
                kafka::properties(sink_raw.properties, field, Role::Producer, problems);
            match (brokers, topic) {
                (Some(brokers), Some(topic)) => {
                    let spec = KafkaSinkSpec {
                        brokers,
                        topic,
                        security,
                        properties,
                        compression,
                    };
                    kafka::librdkafka_accepts(&spec.client(), field, problems);
                    Some(SinkSpec::Kafka(Box::new(spec)))
                }
                _ => None,
            }
        }
        other => {
            problems.add(
                format!("{field}.kind"),
                format!("{other:?} is not one of \"none\", \"stdout\", \"jsonl\", \"kafka\""),
            );
            None
        }
    }
}

/// Fields of `[pipelines.<name>.source]` that are set but do not belong to `kind`.
fn foreign_fields(raw: &RawSource, kind: &str) -> Vec<&'static str> {
    let generator = [
        ("events", raw.events.is_some()),
        ("seed", raw.seed.is_some()),
        ("malformed_fraction", raw.malformed_fraction.is_some()),
        ("simulated_rate", raw.simulated_rate.is_some()),
        ("members", raw.members.is_some()),
        ("campaigns", raw.campaigns.is_some()),
        ("drivers", raw.drivers.is_some()),
        ("campaign_walk_sd", raw.campaign_walk_sd.is_some()),
        (
            "campaign_lifetime_hours",
            raw.campaign_lifetime_hours.is_some(),
        ),
        ("global_drift_per_day", raw.global_drift_per_day.is_some()),
        ("shards", raw.shards.is_some()),
        ("jitter_s", raw.jitter_s.is_some()),
        ("late_fraction", raw.late_fraction.is_some()),
        ("late_by_s", raw.late_by_s.is_some()),
    ];
    let jsonl = [("path", raw.path.is_some())];
    let kafka = [
        ("brokers", raw.brokers.is_some()),
        ("topic", raw.topic.is_some()),
        ("group", raw.group.is_some()),
        ("stop_at_end", raw.stop_at_end.is_some()),
        (
            "missing_topic_timeout_s",
            raw.missing_topic_timeout_s.is_some(),
        ),
        ("security", raw.security.is_some()),
        ("properties", raw.properties.is_some()),
    ];
    let mut foreign = Vec::new();
    for (owner, fields) in [
        ("generator", &generator[..]),
        ("jsonl", &jsonl[..]),
        ("kafka", &kafka[..]),
    ] {
        if owner != kind {
            foreign.extend(fields.iter().filter(|(_, set)| *set).map(|(name, _)| *name));
        }
    }
    foreign
}

pub(super) fn pipeline(
    name: String,
    raw: RawPipeline,
    base: &Path,
    problems: &mut Problems,
) -> Option<PipelineSpec> {
    let field = format!("pipelines.{name}");
    let valid_name = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if !valid_name {
        problems.add(&field, "a pipeline name is 1 to 63 of A-Z a-z 0-9 - _");
    }
    let named = raw.family.as_deref().unwrap_or(name.as_str());
    let family = match named.parse::<Family>() {
        Ok(family) => Some(family),
        Err(_) => {
            let other = named;
            let what = if raw.family.is_some() {
                format!("{other:?} is not \"ads\" or \"dispatch\"")
            } else {
                "is missing (needed when the pipeline is not named ads or dispatch): \"ads\" or \"dispatch\"".to_owned()
            };
            problems.add(format!("{field}.family"), what);
            None
        }
    };
    let epoch_events = raw.epoch_events.unwrap_or(10_000);
    if epoch_events == 0 {
        problems.add(format!("{field}.epoch_events"), "must be at least 1");
    }
    let epoch_ms = raw.epoch_ms.unwrap_or(1_000);
    if epoch_ms == 0 {
        problems.add(format!("{field}.epoch_ms"), "must be at least 1");
    }
    let max_epochs_in_flight = raw.max_epochs_in_flight.unwrap_or(4);
    if max_epochs_in_flight == 0 {
        problems.add(
            format!("{field}.max_epochs_in_flight"),
            "must be at least 1",
        );
    }
    let family = family?;

    let source_raw = raw.source.unwrap_or_default();
    let kind = source_raw
        .kind
        .clone()
        .unwrap_or_else(|| "generator".to_owned());
    for foreign in foreign_fields(&source_raw, &kind) {
        problems.add(
            format!("{field}.source.{foreign}"),
            format!("does not apply to kind = {kind:?}"),
        );
    }
    if kind == "jsonl" && source_raw.events_per_second.is_some() {
        problems.add(
            format!("{field}.source.events_per_second"),
            "does not apply to kind = \"jsonl\"",
        );
    }
    if let Some(rate) = source_raw.events_per_second
        && !(rate.is_finite() && rate > 0.0)
    {
        problems.add(
            format!("{field}.source.events_per_second"),
            format!("{rate} is not a positive rate"),
        );
    }
    let source = match kind.as_str() {
        "generator" => {
            let defaults = GeneratorSpec::new(family);
            let fraction = source_raw.malformed_fraction.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&fraction) {
                problems.add(
                    format!("{field}.source.malformed_fraction"),
                    format!("{fraction} is not between 0 and 1"),
                );
            }
            let simulated_rate = source_raw.simulated_rate.unwrap_or(defaults.simulated_rate);
            if !(simulated_rate.is_finite() && simulated_rate > 0.0) {
                problems.add(
                    format!("{field}.source.simulated_rate"),
                    format!("{simulated_rate} is not a positive rate"),
                );
            }
            for (value, name) in [
                (source_raw.members, "members"),
                (source_raw.campaigns, "campaigns"),
                (source_raw.drivers, "drivers"),
            ] {
                if value == Some(0) {
                    problems.add(format!("{field}.source.{name}"), "must be at least 1");
                }
            }
            let walk_sd = source_raw.campaign_walk_sd.unwrap_or(0.0);
            let lifetime_hours = source_raw.campaign_lifetime_hours.unwrap_or(0.0);
            let global_drift = source_raw.global_drift_per_day.unwrap_or(0.0);
            for (value, name) in [
                (walk_sd, "campaign_walk_sd"),
                (lifetime_hours, "campaign_lifetime_hours"),
            ] {
                if !(value.is_finite() && value >= 0.0) {
                    problems.add(
                        format!("{field}.source.{name}"),
                        format!("{value} is not a non-negative number"),
                    );
                }
            }
            if !global_drift.is_finite() {
                problems.add(
                    format!("{field}.source.global_drift_per_day"),
                    format!("{global_drift} is not a number"),
                );
            }
            let jitter_ms = seconds_ms(
                source_raw.jitter_s,
                0,
                &format!("{field}.source.jitter_s"),
                problems,
            );
            let late_by_ms = seconds_ms(
                source_raw.late_by_s,
                defaults.late_by_ms,
                &format!("{field}.source.late_by_s"),
                problems,
            );
            let late_fraction = source_raw.late_fraction.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&late_fraction) {
                problems.add(
                    format!("{field}.source.late_fraction"),
                    format!("{late_fraction} is not between 0 and 1"),
                );
            }
            let shards = source_raw.shards.unwrap_or(defaults.shards);
            if shards == 0 {
                problems.add(format!("{field}.source.shards"), "must be at least 1");
            }
            Some(SourceSpec::Generator(GeneratorSpec {
                shards: shards.max(1),
                jitter_ms,
                late_by_ms,
                late_fraction: late_fraction.clamp(0.0, 1.0),
                family,
                events: source_raw.events.unwrap_or(defaults.events),
                seed: source_raw.seed.unwrap_or(defaults.seed),
                malformed_fraction: fraction.clamp(0.0, 1.0),
                events_per_second: source_raw
                    .events_per_second
                    .filter(|r| r.is_finite() && *r > 0.0),
                simulated_rate,
                members: source_raw.members.unwrap_or(defaults.members).max(1),
                campaigns: source_raw.campaigns.unwrap_or(defaults.campaigns).max(1),
                drivers: source_raw.drivers.unwrap_or(defaults.drivers).max(1),
                drift: dataflows::events::Drift {
                    walk_sd_per_hour: walk_sd,
                    lifetime_hours,
                    global_per_day: global_drift,
                    horizon_hours: 0.0,
                },
            }))
        }
        "jsonl" => match source_raw.path {
            Some(path) => Some(SourceSpec::Jsonl {
                path: resolve_path(base, &path),
            }),
            None => {
                problems.add(
                    format!("{field}.source.path"),
                    "is required for kind = \"jsonl\"",
                );
                None
            }
        },
        "kafka" => {
            let brokers = required_text(
                source_raw.brokers,
                &format!("{field}.source.brokers"),
                problems,
            );
            let topic = required_text(source_raw.topic, &format!("{field}.source.topic"), problems);
            let group = source_raw.group.unwrap_or_else(|| format!("dima.{name}"));
            if group.trim().is_empty() {
                problems.add(format!("{field}.source.group"), "must not be empty");
            }
            let source_field = format!("{field}.source");
            let security = kafka::security(source_raw.security, &source_field, base, problems);
            let properties = kafka::properties(
                source_raw.properties,
                &source_field,
                Role::Consumer,
                problems,
            );
            let missing_topic_timeout = match source_raw.missing_topic_timeout_s {
                None => MISSING_TOPIC_TIMEOUT,
                Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
                Some(s) => {
                    problems.add(
                        format!("{field}.source.missing_topic_timeout_s"),
                        format!("{s} is not a positive number of seconds"),
                    );
                    MISSING_TOPIC_TIMEOUT
                }
            };
            match (brokers, topic) {
                (Some(brokers), Some(topic)) => {
                    let spec = KafkaSourceSpec {
                        brokers,
                        topic,
                        group,
                        until: if source_raw.stop_at_end.unwrap_or(false) {
                            Until::End
                        } else {
                            Until::Stopped
                        },
                        events_per_second: source_raw
                            .events_per_second
                            .filter(|r| r.is_finite() && *r > 0.0),
                        security,
                        properties,
                        missing_topic_timeout,
                    };
                    kafka::librdkafka_accepts(&spec.client(), &source_field, problems);
                    Some(SourceSpec::Kafka(spec))
                }
                _ => None,
            }
        }
        other => {
            problems.add(
                format!("{field}.source.kind"),
                format!("{other:?} is not one of \"generator\", \"jsonl\", \"kafka\""),
            );
            None
        }
    };

    let sink = sink_spec(
        raw.sink.unwrap_or_default(),
        &format!("{field}.sink"),
        base,
        problems,
    );
    let dead_letter = resolve_path(
        base,
        raw.dead_letter
            .and_then(|d| d.path)
            .as_deref()
            .unwrap_or(&format!("dead-letter/{name}.jsonl")),
    );
    let ads_only = |what: &str, problems: &mut Problems| {
        problems.add(
            format!("{field}.{what}"),
            "applies to ads pipelines only (attribution, features and examples are the ads pipeline's)",
        );
    };
    let attribution_set = raw.attribution.is_some();
    let attribution = match raw.attribution {
        Some(_) if family != Family::Ads => {
            ads_only("attribution", problems);
            AttributionSpec::default()
        }
        Some(a) => AttributionSpec {
            window_ms: window_ms(
                a.window_s.unwrap_or(600.0),
                &format!("{field}.attribution.window_s"),
                problems,
            ),
        },
        None => AttributionSpec::default(),
    };
    let features = match raw.features {
        Some(_) if family != Family::Ads => {
            ads_only("features", problems);
            Vec::new()
        }
        Some(list) => feature_specs(list, &field, problems),
        None => Vec::new(),
    };
    let examples = match raw.examples {
        Some(_) if family != Family::Ads => {
            ads_only("examples", problems);
            SinkSpec::None
        }
        Some(raw) => {
            sink_spec(raw, &format!("{field}.examples"), base, problems).unwrap_or(SinkSpec::None)
        }
        None => SinkSpec::None,
    };
    let matching_lateness = raw.matching.as_ref().and_then(|m| m.lateness_s);
    // Only a live Kafka partition can go quiet; files and generators are
    // read to the end.
    if kind != "kafka" && raw.time.as_ref().is_some_and(|t| t.idle_s.is_some()) {
        problems.add(
            format!("{field}.time.idle_s"),
            format!("applies to kafka sources only (kind = {kind:?} is read to its end)"),
        );
    }
    let time = event_time(raw.time, matching_lateness, family, &field, problems);
    let learner = raw.learner.and_then(|l| {
        if family != Family::Ads {
            problems.add(
                format!("{field}.learner"),
                "the incremental learner runs on ads pipelines only",
            );
            return None;
        }
        let delta = l.delta.unwrap_or(StepParams::DEFAULT.delta);
        if !StepParams::delta_in_range(delta) {
            problems.add(
                format!("{field}.learner.delta"),
                format!("{delta} is not between 0 and 1"),
            );
        }
        let lambda = l.lambda.unwrap_or(StepParams::DEFAULT.lambda);
        if !StepParams::lambda_in_range(lambda) {
            problems.add(
                format!("{field}.learner.lambda"),
                format!("{lambda} is not a non-negative number"),
            );
        }
        let full = match l.hessian.as_deref().unwrap_or("full") {
            "full" => true,
            "diagonal" => false,
            other => {
                problems.add(
                    format!("{field}.learner.hessian"),
                    format!("{other:?} is not \"full\" or \"diagonal\""),
                );
                true
            }
        };
        use dataflows::learner::Reanchor;
        let reanchor = match l.reanchor.as_deref().unwrap_or("shift") {
            "keep" => Reanchor::Keep,
            "reset" => Reanchor::Reset,
            "shift" => Reanchor::Shift,
            other => {
                problems.add(
                    format!("{field}.learner.reanchor"),
                    format!("{other:?} is not \"shift\", \"keep\" or \"reset\""),
                );
                Reanchor::Shift
            }
        };
        let fe_lambda = l.fixed_effect_lambda.unwrap_or(lambda);
        if !(fe_lambda.is_finite() && fe_lambda >= 0.0) {
            problems.add(
                format!("{field}.learner.fixed_effect_lambda"),
                format!("{fe_lambda} is not a non-negative number"),
            );
        }
        let names = l.hashed_features.unwrap_or_default();
        let hashing =
            match dataflows::learner::ads::AdHashing::parse(&names, l.hash_bits.unwrap_or(18)) {
                Ok(hashing) => hashing,
                Err(e) => {
                    let which = match e {
                        dataflows::learner::ads::HashingError::Bits { .. } => "hash_bits",
                        dataflows::learner::ads::HashingError::Field { .. } => "hashed_features",
                    };
                    problems.add(format!("{field}.learner.{which}"), e.to_string());
                    dataflows::learner::ads::AdHashing::default()
                }
            };
        let every = l.fixed_effect_every.unwrap_or(0);
        if !names.is_empty() && every == 0 {
            problems.add(
                format!("{field}.learner.hashed_features"),
                "hashed features feed the fixed effect: set fixed_effect_every too",
            );
        }
        let fixed = match every {
            0 => None,
            every => Some(dataflows::learner::operator::FixedEffectConfig {
                every,
                history: l.fixed_effect_history.unwrap_or(0),
                lambda: fe_lambda,
                reanchor,
                hash_bits: hashing.bits(),
            }),
        };
        let mut chosen = Vec::new();
        for (k, wanted) in l.features.unwrap_or_default().iter().enumerate() {
            match features.iter().position(|f| f.name == *wanted) {
                Some(f) if !chosen.contains(&f) => chosen.push(f),
                Some(_) => problems.add(
                    format!("{field}.learner.features[{k}]"),
                    format!("{wanted:?} is listed twice"),
                ),
                None => problems.add(
                    format!("{field}.learner.features[{k}]"),
                    format!(
                        "{wanted:?} is not a feature of this pipeline (defined: {})",
                        names_or_none(&features)
                    ),
                ),
            }
        }
        let window_ms = window_ms(
            l.window_s.unwrap_or(3600.0),
            &format!("{field}.learner.window_s"),
            problems,
        );
        Some(LearnerSpec {
            delta,
            lambda,
            full,
            snapshots: l.snapshots.map(|s| resolve_path(base, &s)),
            fixed,
            hashing,
            features: chosen,
            window_ms,
        })
    });
    let matching = raw.matching.and_then(|m| {
        if family != Family::Dispatch {
            problems.add(
                format!("{field}.matching"),
                "the matcher runs on dispatch pipelines only",
            );
            return None;
        }
        matching_spec(m, &format!("{field}.matching"), base, problems)
    });
    Some(PipelineSpec {
        name,
        family,
        source: source?,
        sink: sink?,
        dead_letter,
        epoch_events: epoch_events.max(1),
        epoch_ms: epoch_ms.max(1),
        max_epochs_in_flight: max_epochs_in_flight.max(1),
        time,
        // The ads stages run when any of them is configured.
        attribution: (family == Family::Ads
            && (attribution_set
                || !features.is_empty()
                || examples != SinkSpec::None
                || learner.is_some()))
        .then_some(attribution),
        features,
        examples,
        learner,
        matching,
    })
}

/// Seconds >= 0 as milliseconds, `default_ms` when unset; a problem names
/// `field`.
fn seconds_ms(value: Option<f64>, default_ms: u64, field: &str, problems: &mut Problems) -> u64 {
    match value {
        None => default_ms,
        Some(v) if v.is_finite() && v >= 0.0 => (v * 1000.0).round() as u64,
        Some(v) => {
            problems.add(field, format!("{v} is not a number of seconds >= 0"));
            default_ms
        }
    }
}

/// A window of `window_s` seconds as milliseconds (at least 1); a problem
/// names `field`.
fn window_ms(window_s: f64, field: &str, problems: &mut Problems) -> u64 {
    if !(window_s.is_finite() && window_s * 1000.0 >= 1.0) {
        problems.add(
            field,
            format!("{window_s} is not a positive number of seconds (at least 0.001)"),
        );
    }
    ((window_s * 1000.0).round() as u64).max(1)
}

/// The features' names, or `none`.
fn names_or_none(features: &[FeatureSpec]) -> String {
    if features.is_empty() {
        return "none".into();
    }
    features
        .iter()
        .map(|f| f.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves `[[pipelines.<name>.features]]`.
fn feature_specs(list: Vec<RawFeature>, field: &str, problems: &mut Problems) -> Vec<FeatureSpec> {
    let mut out: Vec<FeatureSpec> = Vec::new();
    for (k, raw) in list.into_iter().enumerate() {
        let at = format!("{field}.features[{k}]");
        let name = required_text(raw.name, &format!("{at}.name"), problems);
        if let Some(name) = &name
            && out.iter().any(|f| f.name == *name)
        {
            problems.add(format!("{at}.name"), format!("{name:?} is defined twice"));
        }
        let measure = match raw.measure.as_deref() {
            None => {
                problems.add(
                    format!("{at}.measure"),
                    "is required: \"impressions\" or \"clicks\"",
                );
                None
            }
            Some(m) => {
                let parsed = Measure::parse(m);
                if parsed.is_none() {
                    problems.add(
                        format!("{at}.measure"),
                        format!("{m:?} is not \"impressions\" or \"clicks\""),
                    );
                }
                parsed
            }
        };
        let key = match raw.key.as_deref() {
            None => {
                problems.add(
                    format!("{at}.key"),
                    "is required (a field path such as \"member_id\")",
                );
                None
            }
            Some(path) => match KeyField::parse(path) {
                None => {
                    let known: Vec<&str> = KeyField::ALL.iter().map(|(p, _)| *p).collect();
                    problems.add(
                        format!("{at}.key"),
                        format!(
                            "{path:?} is not a field of ad_impression or ad_click (keys: {})",
                            known.join(", ")
                        ),
                    );
                    None
                }
                Some(key) if measure == Some(Measure::Clicks) && !key.on_clicks() => {
                    problems.add(
                        format!("{at}.key"),
                        format!(
                            "{path:?} is not a field of ad_click, so clicks cannot be counted by it (clicks carry member_id, item_id, campaign_id)"
                        ),
                    );
                    None
                }
                Some(key) => Some(key),
            },
        };
        let window = match raw.window_s {
            None => {
                problems.add(format!("{at}.window_s"), "is required (seconds, > 0)");
                1
            }
            Some(s) => window_ms(s, &format!("{at}.window_s"), problems),
        };
        if let (Some(name), Some(key), Some(measure)) = (name, key, measure) {
            out.push(FeatureSpec {
                name,
                key,
                measure,
                window_ms: window,
            });
        }
    }
    out
}

/// Resolves `[pipelines.<name>.time]`; a dispatch pipeline's
/// `matching.lateness_s` is its watermark delay when `[time]` sets none.
fn event_time(
    raw: Option<RawTime>,
    matching_lateness_s: Option<f64>,
    family: Family,
    field: &str,
    problems: &mut Problems,
) -> EventTime {
    let raw = raw.unwrap_or_default();
    let defaults = EventTime::default();
    if raw.watermark_delay_s.is_some() && matching_lateness_s.is_some() {
        problems.add(
            format!("{field}.matching.lateness_s"),
            "is the watermark delay: set time.watermark_delay_s or matching.lateness_s, not both",
        );
    }
    let mut seconds = |name: &str, value: Option<f64>, default_ms: u64| {
        seconds_ms(value, default_ms, &format!("{field}.time.{name}"), problems)
    };
    let delay_default = match family {
        Family::Ads => defaults.watermark_delay_ms,
        Family::Dispatch => 4_000,
    };
    let watermark_delay_ms = seconds(
        "watermark_delay_s",
        raw.watermark_delay_s.or(matching_lateness_s),
        delay_default,
    );
    let max_future_ms = seconds("max_future_s", raw.max_future_s, defaults.max_future_ms);
    let idle_ms = seconds("idle_s", raw.idle_s, defaults.idle_ms);
    let bucket_ms = raw.bucket_ms.unwrap_or(defaults.bucket_ms);
    if bucket_ms == 0 {
        problems.add(format!("{field}.time.bucket_ms"), "must be at least 1");
    }
    EventTime {
        watermark_delay_ms,
        max_future_ms,
        bucket_ms: bucket_ms.max(1),
        idle_ms,
    }
}

/// Resolves `[pipelines.<name>.matching]` (`field` is its dotted path).
fn matching_spec(
    m: RawMatching,
    field: &str,
    base: &Path,
    problems: &mut Problems,
) -> Option<MatchingSpec> {
    use dataflows::matching::Policy;
    use dataflows::matching::operator::MatchConfig;
    let policy = match m.policy.as_deref().unwrap_or("value") {
        "value" => Policy::Value,
        "myopic" => Policy::Myopic,
        "nearest" => Policy::Nearest,
        other => {
            problems.add(
                format!("{field}.policy"),
                format!("{other:?} is not one of \"value\", \"myopic\", \"nearest\""),
            );
            Policy::Value
        }
    };
    let mut config = MatchConfig::default();
    config.plan.policy = policy;
    let mut positive = |name: &str, value: Option<f64>, default: f64| -> f64 {
        let v = value.unwrap_or(default);
        if !(v.is_finite() && v > 0.0) {
            problems.add(
                format!("{field}.{name}"),
                format!("{v} is not a positive number"),
            );
            return default;
        }
        v
    };
    config.plan.matching.window_s = positive("window_s", m.window_s, config.plan.matching.window_s);
    config.plan.matching.radius_km =
        positive("radius_km", m.radius_km, config.plan.matching.radius_km);
    config.plan.travel.speed_kmh = positive("speed_kmh", m.speed_kmh, config.plan.travel.speed_kmh);
    let max_wait_s = positive("max_wait_s", m.max_wait_s, 300.0);
    let driver_stale_s = positive("driver_stale_s", m.driver_stale_s, 120.0);
    let value_sync_s = positive("value_sync_s", m.value_sync_s, 60.0);
    config.value_sync_ms = (value_sync_s * 1000.0) as i64;
    config.max_wait_ms = (max_wait_s * 1000.0) as i64;
    config.driver_stale_ms = (driver_stale_s * 1000.0) as i64;
    let lateness_s = m.lateness_s.unwrap_or(4.0);
    if !(lateness_s.is_finite() && lateness_s >= 0.0) {
        problems.add(
            format!("{field}.lateness_s"),
            format!("{lateness_s} is not a number >= 0"),
        );
    } else {
        let _ = lateness_s; // the watermark delay (see event_time)
    }
    let rider_value = m.rider_value.unwrap_or(config.plan.matching.rider_value);
    if !(rider_value.is_finite() && rider_value >= 0.0) {
        problems.add(
            format!("{field}.rider_value"),
            format!("{rider_value} is not a number >= 0"),
        );
    } else {
        config.plan.matching.rider_value = rider_value;
    }
    let detour = m.detour.unwrap_or(config.plan.travel.detour);
    if !(detour.is_finite() && detour >= 1.0) {
        problems.add(
            format!("{field}.detour"),
            format!("{detour} is not a number >= 1"),
        );
    } else {
        config.plan.travel.detour = detour;
    }
    match m.nearest {
        Some(0) => problems.add(format!("{field}.nearest"), "must be at least 1"),
        Some(k) => config.plan.matching.nearest = k,
        None => {}
    }
    match m.region_resolution {
        Some(r) if r > 15 => problems.add(
            format!("{field}.region_resolution"),
            format!("{r} is not an H3 resolution (0 to 15)"),
        ),
        Some(r) => config.region_resolution = r,
        None => {}
    }
    if let Some(pricing) = m.pricing {
        for (name, v) in [
            ("base", pricing.base),
            ("per_km", pricing.per_km),
            ("per_minute", pricing.per_minute),
            ("pickup_cost_per_km", pricing.pickup_cost_per_km),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                problems.add(
                    format!("{field}.pricing.{name}"),
                    format!("{v} is not a number >= 0"),
                );
            }
        }
        config.plan.pricing = pricing;
    }
    if let Some(value) = m.value {
        if let Err(e) = value.check() {
            problems.add(format!("{field}.value"), e.to_string());
        }
        config.plan.value = value;
    }
    let dispatches = match m.dispatches {
        Some(raw) => sink_spec(raw, &format!("{field}.dispatches"), base, problems)?,
        None => SinkSpec::None,
    };
    Some(MatchingSpec { config, dispatches })
}
