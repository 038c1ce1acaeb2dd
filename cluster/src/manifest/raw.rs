//! The manifest as written: every field optional, unknown fields rejected.
//!
//! Nothing outside the `manifest` module sees these types; [`super::validate`]
//! turns them into the resolved [`super::Manifest`].

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManifest {
    pub cluster: Option<RawCluster>,
    pub dataflow: Option<RawDataflow>,
    pub telemetry: Option<RawTelemetry>,
    pub jobs: Option<RawJobs>,
    pub pipelines: Option<std::collections::BTreeMap<String, RawPipeline>>,
    pub inference: Option<RawInference>,
    pub checkpoints: Option<RawCheckpoints>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheckpoints {
    pub dir: Option<String>,
    pub every_s: Option<f64>,
    pub keep: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInference {
    pub model: Option<String>,
    pub backend: Option<String>,
    pub devices: Option<Vec<u64>>,
    pub max_context: Option<u64>,
    pub tp: Option<u64>,
    pub ranks: Option<Vec<u64>>,
    pub root: Option<String>,
    pub listen: Option<String>,
    pub served_model_name: Option<String>,
    pub api_key: Option<String>,
    pub api_key_env: Option<String>,
    pub max_batch: Option<u64>,
    pub max_waiting: Option<u64>,
    pub max_tokens_in_flight: Option<u64>,
    pub prefix_cache_mib: Option<u64>,
    pub public_health: Option<bool>,
    pub public_metrics: Option<bool>,
    pub max_tokens_cap: Option<u64>,
    pub body_timeout_s: Option<f64>,
    pub degraded_after_s: Option<f64>,
    pub header_timeout_s: Option<f64>,
    pub request_timeout_s: Option<f64>,
    pub max_connections: Option<u64>,
    pub max_streams_per_client: Option<u64>,
    pub collective_timeout_s: Option<f64>,
    pub keep_serving: Option<bool>,
    pub load: Option<RawInferenceLoad>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInferenceLoad {
    pub requests: Option<u64>,
    pub concurrency: Option<u64>,
    pub max_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataflow {
    pub processes: Option<Vec<RawProcess>>,
    pub connect_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProcess {
    pub address: String,
    pub workers: Option<u64>,
    pub metrics_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub service_name: Option<String>,
    pub otlp_endpoint: Option<String>,
    pub export_interval_ms: Option<u64>,
    pub metrics_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJobs {
    pub count: Option<RawCountJob>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCountJob {
    pub events: Option<u64>,
    pub keys: Option<u64>,
    pub seed: Option<u64>,
    pub epoch_events: Option<u64>,
    pub max_epochs_in_flight: Option<u64>,
    pub events_per_second: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPipeline {
    pub family: Option<String>,
    pub epoch_events: Option<u64>,
    pub epoch_ms: Option<u64>,
    pub max_epochs_in_flight: Option<u64>,
    pub source: Option<RawSource>,
    pub sink: Option<RawSink>,
    pub dead_letter: Option<RawDeadLetter>,
    pub learner: Option<RawLearner>,
    pub matching: Option<RawMatching>,
    pub time: Option<RawTime>,
    pub attribution: Option<RawAttribution>,
    pub features: Option<Vec<RawFeature>>,
    pub examples: Option<RawSink>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTime {
    pub watermark_delay_s: Option<f64>,
    pub max_future_s: Option<f64>,
    pub bucket_ms: Option<u64>,
    pub idle_s: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAttribution {
    pub window_s: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFeature {
    pub name: Option<String>,
    pub key: Option<String>,
    pub measure: Option<String>,
    pub window_s: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatching {
    pub policy: Option<String>,
    pub window_s: Option<f64>,
    pub radius_km: Option<f64>,
    pub nearest: Option<usize>,
    pub rider_value: Option<f64>,
    pub region_resolution: Option<u8>,
    pub lateness_s: Option<f64>,
    pub value_sync_s: Option<f64>,
    pub max_wait_s: Option<f64>,
    pub driver_stale_s: Option<f64>,
    pub speed_kmh: Option<f64>,
    pub detour: Option<f64>,
    pub pricing: Option<dataflows::matching::scenario::Pricing>,
    pub value: Option<dataflows::matching::ValueParams>,
    pub dispatches: Option<RawSink>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLearner {
    pub delta: Option<f64>,
    pub lambda: Option<f64>,
    pub hessian: Option<String>,
    pub snapshots: Option<String>,
    pub fixed_effect_every: Option<u64>,
    pub fixed_effect_history: Option<u64>,
    pub fixed_effect_lambda: Option<f64>,
    pub reanchor: Option<String>,
    pub hashed_features: Option<Vec<String>>,
    pub hash_bits: Option<u32>,
    pub features: Option<Vec<String>>,
    pub window_s: Option<f64>,
}

/// Every source kind's fields in one table; validation rejects the ones
/// that do not belong to the chosen `kind`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub kind: Option<String>,
    // generator
    pub events: Option<u64>,
    pub seed: Option<u64>,
    pub malformed_fraction: Option<f64>,
    pub events_per_second: Option<f64>,
    pub simulated_rate: Option<f64>,
    pub members: Option<u64>,
    pub campaigns: Option<u64>,
    pub drivers: Option<u64>,
    pub campaign_walk_sd: Option<f64>,
    pub campaign_lifetime_hours: Option<f64>,
    pub global_drift_per_day: Option<f64>,
    pub shards: Option<u64>,
    pub jitter_s: Option<f64>,
    pub late_fraction: Option<f64>,
    pub late_by_s: Option<f64>,
    // jsonl
    pub path: Option<String>,
    // kafka
    pub brokers: Option<String>,
    pub topic: Option<String>,
    pub group: Option<String>,
    pub stop_at_end: Option<bool>,
    pub missing_topic_timeout_s: Option<f64>,
    pub security: Option<RawSecurity>,
    pub properties: Option<std::collections::BTreeMap<String, toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    pub kind: Option<String>,
    pub path: Option<String>,
    pub brokers: Option<String>,
    pub topic: Option<String>,
    pub compression: Option<String>,
    pub security: Option<RawSecurity>,
    pub properties: Option<std::collections::BTreeMap<String, toml::Value>>,
}

/// `[….security]` of a Kafka source or sink. `password` and
/// `key_password` are parsed only to be refused by name (secrets never
/// inline).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecurity {
    pub protocol: Option<String>,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub key_password: Option<toml::Value>,
    pub key_password_env: Option<String>,
    pub key_password_file: Option<String>,
    pub sasl_mechanism: Option<String>,
    pub username: Option<String>,
    pub password: Option<toml::Value>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeadLetter {
    pub path: Option<String>,
}
