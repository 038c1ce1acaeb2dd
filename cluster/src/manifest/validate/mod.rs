//! Raw manifest → [`Manifest`]: defaults filled in, every field checked, every
//! problem collected. One file per manifest section; this one holds the
//! entry point and what the sections share.

mod checkpoints;
mod dataflow;
mod inference;
mod jobs;
mod kafka;
mod pipelines;
mod telemetry;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::RawManifest;
use super::{ClusterSpec, JobsSpec, Manifest, Problem};

/// The process list when the manifest has none: one local process, one worker.
pub const DEFAULT_PROCESS_ADDRESS: &str = "127.0.0.1:2101";

#[derive(Default)]
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

pub(super) fn validate(raw: RawManifest, base: &Path) -> Result<Manifest, Vec<Problem>> {
    let mut problems = Problems::default();

    let cluster = cluster(raw.cluster.and_then(|c| c.name), &mut problems);
    let raw_dataflow = raw.dataflow.unwrap_or_default();
    let telemetry_raw = raw.telemetry.unwrap_or_default();
    let mut dataflow = dataflow::dataflow(
        raw_dataflow.processes,
        telemetry_raw.metrics_address.as_deref(),
        &mut problems,
    );
    let timeout_ms = raw_dataflow.connect_timeout_ms.unwrap_or(60_000);
    if timeout_ms < 100 {
        problems.add(
            "dataflow.connect_timeout_ms",
            format!("{timeout_ms} is below the minimum of 100"),
        );
    }
    dataflow.connect_timeout = Duration::from_millis(timeout_ms);
    let telemetry = telemetry::telemetry(telemetry_raw, &mut problems);
    let count = jobs::count_job(
        raw.jobs.and_then(|j| j.count).unwrap_or_default(),
        &mut problems,
    );

    let pipelines: Vec<dataflows::pipelines::PipelineSpec> = raw
        .pipelines
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, raw)| pipelines::pipeline(name, raw, base, &mut problems))
        .collect();

    let inference = raw
        .inference
        .map(|raw| inference::inference(raw, &dataflow, base, &mut problems));
    let checkpoints = raw
        .checkpoints
        .and_then(|raw| checkpoints::checkpoints(raw, &pipelines, base, &mut problems));

    if problems.0.is_empty() {
        Ok(Manifest {
            cluster,
            dataflow,
            telemetry,
            jobs: JobsSpec { count },
            pipelines,
            inference,
            checkpoints,
        })
    } else {
        Err(problems.0)
    }
}

fn cluster(name: Option<String>, problems: &mut Problems) -> ClusterSpec {
    let name = name.unwrap_or_else(|| "dima".to_owned());
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 63 || !name.chars().all(valid) {
        problems.add(
            "cluster.name",
            format!("{name:?} is not a valid name (1 to 63 of A-Z a-z 0-9 - _ .)"),
        );
    }
    ClusterSpec { name }
}

pub(super) fn socket_address(
    text: &str,
    field: &str,
    problems: &mut Problems,
) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(address) => Some(address),
        Err(_) => {
            problems.add(
                field,
                format!("{text:?} is not a socket address (expected IP:PORT, e.g. 127.0.0.1:2101)"),
            );
            None
        }
    }
}

/// A required, non-empty text field.
pub(super) fn required_text(
    value: Option<String>,
    field: &str,
    problems: &mut Problems,
) -> Option<String> {
    match value {
        Some(text) if !text.trim().is_empty() => Some(text),
        Some(_) => {
            problems.add(field, "must not be empty");
            None
        }
        None => {
            problems.add(field, "is required for kind = \"kafka\"");
            None
        }
    }
}

/// A manifest path: absolute, or relative to the manifest's directory.
pub(super) fn resolve_path(base: &Path, text: &str) -> PathBuf {
    let path = Path::new(text);
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}
