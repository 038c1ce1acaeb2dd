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
    // Sections that later work fills in. They are accepted by the parser only
    // so that validation can say "not supported yet" instead of "unknown field".
    pub pipelines: Option<toml::Table>,
    pub inference: Option<toml::Value>,
    pub checkpoints: Option<toml::Value>,
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
