//! Checkpoints: the state of every stateful operator and the position of
//! every source share, captured together at one event time and restored
//! together.
//!
//! A checkpoint at time `h` of a pipeline holds what every record with an
//! assigned time before `h` did, and nothing of the later ones: worker 0
//! holds the pipeline's input frontier at `h` (a retained capability) until
//! every worker has written its part, so every operator has applied every
//! time before `h` and none at or after it (an operator's saved state leaves
//! out what it holds of later times; those records are read again). Each
//! share records where its first record at or after `h` starts, and the
//! clock it had there; on restore it is read again from there and records
//! before `h` are skipped (they were applied already).
//!
//! On disk: one directory per checkpoint (`DIR/<id>`), one binary part per
//! worker (`worker-<w>.part`: a magic, the format version and the
//! [`bincode`] encoding of [`WorkerPart`]), written to a temporary name,
//! synced and renamed; then the [`Manifest`] (`MANIFEST.json`) listing every
//! part with its size and CRC-32, written last the same way. A directory
//! without a manifest, or whose parts do not match it, is not a checkpoint.

mod control;
mod states;
mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use control::{Checkpointed, Coordinator};
pub use states::{States, decode, encode};
pub use store::{Listing, Loaded, Store};

/// The version of the on-disk format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST: &str = "MANIFEST.json";

/// `[checkpoints]` as the dataflows need it.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointSpec {
    /// Where checkpoints are written (shared by every process).
    pub dir: PathBuf,
    /// Wall-clock time between checkpoints.
    pub every: Duration,
    /// Complete checkpoints kept.
    pub keep: usize,
    /// A digest of what the checkpoint's state depends on (the pipelines as
    /// configured): a checkpoint with another is refused.
    pub fingerprint: String,
    /// Processes of the layout.
    pub processes: usize,
    /// Workers per process.
    pub workers: usize,
}

/// Checkpoints as a run uses them: where and how often, and the
/// checkpoint it restores, if any.
#[derive(Clone, Debug)]
pub struct Checkpointing {
    /// `[checkpoints]`.
    pub spec: CheckpointSpec,
    /// The checkpoint to restore (`None`: a fresh start).
    pub restore: Option<Loaded>,
}

/// What a checkpoint directory's manifest says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The format version it was written with.
    pub format_version: u32,
    /// Its id (the directory's name).
    pub id: u64,
    /// When it completed, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// The pipelines' fingerprint ([`CheckpointSpec::fingerprint`]).
    pub fingerprint: String,
    /// Processes of the layout that wrote it.
    pub processes: usize,
    /// Workers per process of that layout.
    pub workers_per_process: usize,
    /// Each pipeline's checkpoint time.
    pub pipelines: Vec<PipelineTime>,
    /// Every part.
    pub parts: Vec<PartInfo>,
}

/// A pipeline's checkpoint time: its state holds every record whose
/// timestamp is before `time` (`u64::MAX`: the pipeline had finished).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineTime {
    /// The pipeline.
    pub name: String,
    /// The time.
    pub time: u64,
}

/// One worker's part file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// The worker.
    pub worker: usize,
    /// Its file name, in the checkpoint's directory.
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// CRC-32 of its bytes.
    pub crc32: u32,
}

/// What one worker saves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerPart {
    /// The worker.
    pub worker: usize,
    /// Each pipeline's state, by name.
    pub pipelines: BTreeMap<String, PipelineState>,
}

/// One pipeline's state on one worker.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineState {
    /// The checkpoint time.
    pub time: u64,
    /// Whether this worker's input had been read to its end.
    pub finished: bool,
    /// Where each share resumes.
    pub shares: Vec<ShareState>,
    /// Valid events before `time`, per type (the summary's counts).
    pub counts: [u64; 6],
    /// Each stateful operator's encoded state, by name.
    pub operators: BTreeMap<String, Vec<u8>>,
}

/// Where a source share resumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareState {
    /// The share ([`Origin::share`](crate::pipelines::source::Origin::share)).
    pub share: u32,
    /// The first record to read again ([`Resume`](crate::pipelines::source::Resume)).
    pub resume: crate::pipelines::source::Resume,
    /// The greatest event time the share had read before it.
    pub greatest: Option<u64>,
}

/// Why checkpoints could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file or directory could not be used.
    #[error("{path}: {reason}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A checkpoint that cannot be restored onto this run.
    #[error("{path}: {reason}")]
    Refused {
        /// The checkpoint.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}
