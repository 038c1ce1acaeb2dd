//! `[checkpoints]`.

use std::path::Path;
use std::time::Duration;

use dataflows::pipelines::{PipelineSpec, SourceSpec};

use super::super::CheckpointsSpec;
use super::super::raw::RawCheckpoints;
use super::{Problems, resolve_path};

pub(super) fn checkpoints(
    raw: RawCheckpoints,
    pipelines: &[PipelineSpec],
    base: &Path,
    problems: &mut Problems,
) -> Option<CheckpointsSpec> {
    let dir = match raw.dir.as_deref().map(str::trim) {
        Some("") => {
            problems.add("checkpoints.dir", "must not be empty");
            None
        }
        Some(text) => Some(resolve_path(base, text)),
        None => {
            problems.add(
                "checkpoints.dir",
                "is required: the directory checkpoints are written to (relative to the manifest)",
            );
            None
        }
    };
    let every_s = raw.every_s.unwrap_or(10.0);
    if !(every_s.is_finite() && every_s > 0.0 && every_s <= 86_400.0) {
        problems.add(
            "checkpoints.every_s",
            format!("{every_s} is not a number of seconds in (0, 86400]"),
        );
    }
    let keep = raw.keep.unwrap_or(3);
    if keep == 0 {
        problems.add(
            "checkpoints.keep",
            "must be at least 1 (the newest complete checkpoint is always kept)",
        );
    }
    if pipelines.is_empty() {
        problems.add(
            "checkpoints",
            "there are no [pipelines.*] to checkpoint (the count job and [inference] keep no state across runs)",
        );
    }
    for p in pipelines {
        if let SourceSpec::Kafka(_) = p.source {
            problems.add(
                format!("checkpoints (pipelines.{}.source)", p.name),
                "a Kafka source cannot resume from a checkpoint yet (its offsets are committed to the consumer group instead)",
            );
        }
        if let Some(m) = &p.matching
            && m.config.plan.matching.window_s * 1000.0 <= 2.0
        {
            problems.add(
                format!("checkpoints (pipelines.{}.matching.window_s)", p.name),
                "with checkpoints, a matching window must be longer than 2 ms",
            );
        }
    }
    Some(CheckpointsSpec {
        dir: dir?,
        every: Duration::from_secs_f64(every_s.clamp(0.001, 86_400.0)),
        keep: keep.max(1) as usize,
    })
}
