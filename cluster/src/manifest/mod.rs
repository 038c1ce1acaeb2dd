//! The cluster manifest: one TOML file that describes a Dima cluster.
//!
//! Loading happens in two steps. The file is parsed into raw types whose
//! fields are all optional and which reject unknown fields; then
//! [`validate`](validate::validate) fills in defaults, checks every field, and
//! returns a [`Manifest`] that the rest of the program uses without checking
//! anything again. Syntax and type errors stop parsing at the first one (that
//! is how a parser works); validation reports every problem it finds at once.
//! `docs/manifest.md` documents every field and its default.

mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dataflows::CountJob;

/// A validated manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// `[cluster]`.
    pub cluster: ClusterSpec,
    /// `[dataflow]`: the timely processes.
    pub dataflow: DataflowSpec,
    /// `[telemetry]`.
    pub telemetry: TelemetrySpec,
    /// `[jobs.*]`.
    pub jobs: JobsSpec,
    /// `[pipelines.*]`, in name order.
    pub pipelines: Vec<dataflows::pipelines::PipelineSpec>,
}

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The cluster's name, used in telemetry.
    pub name: String,
}

/// `[dataflow]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataflowSpec {
    /// The timely processes, in index order.
    pub processes: Vec<ProcessSpec>,
    /// How long a process waits for all its peers to connect.
    pub connect_timeout: Duration,
}

impl DataflowSpec {
    /// Workers in every process (validation guarantees they are equal).
    pub fn workers_per_process(&self) -> usize {
        self.processes.first().map_or(1, |p| p.workers)
    }

    /// Workers across the cluster.
    pub fn total_workers(&self) -> usize {
        self.processes.iter().map(|p| p.workers).sum()
    }
}

/// One timely process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Its index in `dataflow.processes`.
    pub index: usize,
    /// Where it listens for its peers.
    pub address: SocketAddr,
    /// Worker threads.
    pub workers: usize,
    /// Where it serves Prometheus metrics, if anywhere.
    pub metrics_address: Option<SocketAddr>,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::Json => "json",
        }
    }
}

/// `[telemetry]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetrySpec {
    /// A `tracing` filter directive, e.g. `info` or `dima=debug,timely=warn`.
    pub log_level: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// `service.name` of exported telemetry.
    pub service_name: String,
    /// OTLP/gRPC export of traces and metrics, when configured.
    pub otlp: Option<OtlpSpec>,
}

/// Where and how often OpenTelemetry data is exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpSpec {
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// Interval between metric exports.
    pub export_interval: Duration,
}

/// `[jobs.*]`.
#[derive(Clone, Debug, PartialEq)]
pub struct JobsSpec {
    /// `[jobs.count]`.
    pub count: CountJob,
}

/// One problem found while validating, named by its field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted field path, e.g. `dataflow.processes[1].address`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read manifest {}: {source}", path.display())]
    Read {
        /// The manifest path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}:{column}: TOML syntax error: {message}", path.display())]
    Syntax {
        /// The manifest path.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's description.
        message: String,
    },
    /// A field is unknown or has the wrong type.
    #[error("{}:{line}:{column}: {field}: {message}", path.display())]
    Schema {
        /// The manifest path.
        path: PathBuf,
        /// Dotted path of the offending field (or its table, for unknown fields).
        field: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The manifest parsed but some fields are invalid.
    #[error("{} is not a valid manifest ({} problem{}):\n  {}",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid {
        /// The manifest path.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

impl ManifestError {
    /// A stable name for the kind of error, for metric labels and tests.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Syntax { .. } => "syntax",
            Self::Schema { .. } => "schema",
            Self::Invalid { .. } => "invalid",
        }
    }
}

impl Manifest {
    /// Reads, parses and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates manifest text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let raw: raw::RawManifest =
            dataflows::toml_input::parse_toml(text).map_err(|e| match e.field {
                None => ManifestError::Syntax {
                    path: path.to_owned(),
                    line: e.line,
                    column: e.column,
                    message: e.message,
                },
                Some(field) => ManifestError::Schema {
                    path: path.to_owned(),
                    field,
                    line: e.line,
                    column: e.column,
                    message: e.message,
                },
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        validate::validate(raw, base).map_err(|problems| ManifestError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }
}
