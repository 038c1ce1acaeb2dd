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
    /// `[inference]`, when the cluster serves a model.
    pub inference: Option<InferenceSpec>,
    /// `[checkpoints]`, when the pipelines' state is checkpointed.
    pub checkpoints: Option<CheckpointsSpec>,
}

/// `[checkpoints]`: where and how often the pipelines' state is saved.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointsSpec {
    /// The directory (resolved next to the manifest); every process must
    /// see the same one.
    pub dir: std::path::PathBuf,
    /// Wall-clock time between checkpoints.
    pub every: std::time::Duration,
    /// Complete checkpoints kept.
    pub keep: usize,
}

/// `[inference]`: a Gemma 3 model served over the OpenAI-compatible API by
/// tensor-parallel ranks placed on the cluster's processes.
#[derive(Clone, Debug, PartialEq)]
pub struct InferenceSpec {
    /// A catalog name (`gemma3-270m`), or a `.gguf` file or checkpoint
    /// directory (resolved next to the manifest).
    pub model: String,
    /// Where the ranks compute.
    pub backend: Backend,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// The process (index into `dataflow.processes`) running each rank.
    pub ranks: Vec<usize>,
    /// Where rank 0 meets the other ranks, when they run in other processes.
    pub root: Option<SocketAddr>,
    /// Where rank 0's process serves HTTP.
    pub listen: SocketAddr,
    /// The name clients send as `"model"`.
    pub served_model_name: String,
    /// The bearer token, or the environment variable holding it.
    pub api_key: Option<ApiKey>,
    /// Requests decoding together.
    pub max_batch: usize,
    /// Requests waiting for a place (beyond: 429).
    pub max_waiting: usize,
    /// Prompt plus generation budget over the running requests.
    pub max_tokens_in_flight: usize,
    /// MiB each rank keeps for the prefix cache (0: off).
    pub prefix_cache_mib: usize,
    /// With an API key: `/health` answers without it.
    pub public_health: bool,
    /// With an API key: `/metrics` answers without it.
    pub public_metrics: bool,
    /// Most tokens one request may ask for (`None`: the context).
    pub max_tokens_cap: Option<usize>,
    /// How long a client may take to send a request's body.
    pub body_timeout: Duration,
    /// `/health` says `degraded` once a request has waited this long.
    pub degraded_after: Duration,
    /// How long a new connection may take to send its first headers.
    pub header_timeout: Duration,
    /// A generation request running longer is ended (`None`: no limit).
    pub request_timeout: Option<Duration>,
    /// Most open connections.
    pub max_connections: usize,
    /// Most generation requests in progress per client address (0: no
    /// limit).
    pub max_streams_per_client: usize,
    /// How long a rank waits for its peers.
    pub collective_timeout: Duration,
    /// Keep serving after the jobs finish, until `dima up` is stopped.
    pub keep_serving: bool,
    /// The completions `dima up` sends through the API while the jobs run.
    pub load: InferenceLoad,
}

impl InferenceSpec {
    /// Whether every rank runs in one process (threads).
    pub fn in_one_process(&self) -> bool {
        self.ranks.iter().all(|p| Some(p) == self.ranks.first())
    }
}

/// Where inference ranks compute: the deployment's own type.
pub use actors::serve::Backend;

/// Where the bearer token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiKey {
    /// Written in the manifest.
    Literal(String),
    /// Read from this environment variable when the server starts.
    Env(String),
}

/// `[inference.load]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InferenceLoad {
    /// Streaming completions in all.
    pub requests: usize,
    /// Sent at once.
    pub concurrency: usize,
    /// Tokens each.
    pub max_tokens: usize,
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
