//! The `dima` subcommands, one file per group. Each group exposes its clap
//! arguments and a `run` that returns `Result<(), Failure>`; `main.rs` only
//! parses and dispatches.

pub mod bench;
pub mod checkpoints;
pub mod cluster;
pub mod events;
pub mod gpu;
pub mod learner;
pub mod matching;
pub mod model;

use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

/// A failed command: the error to print and the exit code it gives.
///
/// `From` impls choose the code by error type (1: the command failed; 2: it
/// was asked for something invalid; 130/143: interrupted).
#[derive(Debug)]
pub struct Failure {
    /// The process's exit status.
    pub code: u8,
    /// What went wrong, with its causes.
    pub error: anyhow::Error,
}

impl Failure {
    /// A command line or input that cannot be run (exit 2).
    pub fn usage(message: impl Display) -> Self {
        Self {
            code: 2,
            error: anyhow::anyhow!("{message}"),
        }
    }

    /// A failure with exit status 1.
    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }

    /// The same error, refused as invalid input (exit 2).
    pub fn invalid(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 2,
            error: error.into(),
        }
    }
}

/// Errors that mean "this command failed" (exit 1).
macro_rules! fails_with_1 {
    ($($error:ty),* $(,)?) => {
        $(impl From<$error> for Failure {
            fn from(error: $error) -> Self {
                Self::failed(error)
            }
        })*
    };
}

fails_with_1!(
    anyhow::Error,
    std::io::Error,
    serde_json::Error,
    ::cluster::TelemetryError,
    actors::gemma::LoadError,
    actors::gemma::GenerateError,
    actors::gemma::device::DeviceModelError,
    actors::ServeError,
    actors::models::ModelError,
    kernels::collective::CollectiveError,
);

#[cfg(feature = "cuda")]
fails_with_1!(kernels::cuda::GpuError);

/// Invalid input (exit 2).
macro_rules! fails_with_2 {
    ($($error:ty),* $(,)?) => {
        $(impl From<$error> for Failure {
            fn from(error: $error) -> Self {
                Self::invalid(error)
            }
        })*
    };
}

fails_with_2!(
    ::cluster::ManifestError,
    actors::gemma::SamplingError,
    dataflows::matching::ScenarioError,
);

impl From<::cluster::UpError> for Failure {
    fn from(error: ::cluster::UpError) -> Self {
        Self {
            code: u8::try_from(error.exit_code()).unwrap_or(1),
            error: error.into(),
        }
    }
}

impl From<::cluster::RunError> for Failure {
    fn from(error: ::cluster::RunError) -> Self {
        let interrupted = matches!(
            error,
            ::cluster::RunError::Interrupted
                | ::cluster::RunError::Mesh(::cluster::mesh::MeshError::Interrupted)
        );
        Self {
            code: if interrupted { 130 } else { 1 },
            error: error.into(),
        }
    }
}

/// The error and its causes, skipping a cause its parent already quotes.
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Options every subcommand takes (`--log-format`, `--log-level`).
#[derive(Clone, Debug, Default)]
pub struct Globals {
    /// `--log-format`.
    pub log_format: Option<::cluster::LogFormat>,
    /// `--log-level`.
    pub log_level: Option<String>,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Human,
    Json,
}

impl From<FormatArg> for ::cluster::LogFormat {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::Human => Self::Human,
            FormatArg::Json => Self::Json,
        }
    }
}

/// `--format` of the one-shot commands.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// This machine's CPU cores.
    Cpu,
    /// One NVIDIA GPU (builds with `--features cuda`).
    Cuda,
}

/// `--hessian`: the posterior precision kept per entity.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Hessian {
    Full,
    Diagonal,
}

impl Hessian {
    /// Whether the full precision matrix is kept.
    pub fn full(self) -> bool {
        matches!(self, Self::Full)
    }
}

/// A clap parser for a library enum from its values' names and help
/// lines; the names parse back with `FromStr`, so library crates need no
/// clap.
pub fn one_of<T>(
    values: impl IntoIterator<Item = (&'static str, &'static str)>,
) -> impl TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let values = values
        .into_iter()
        .map(|(name, help)| PossibleValue::new(name).help(help));
    PossibleValuesParser::new(values).try_map(|name| name.parse::<T>())
}

/// Tensor-parallel placement (`dima generate`, `dima serve`).
#[derive(Debug, clap::Args)]
pub struct TpArgs {
    /// Tensor-parallel ranks. Without --rank, all of them run in this
    /// process (threads); with --rank, this process runs that one rank and
    /// joins the others over TCP through rank 0 at --root (rank 0 prints the
    /// output of `generate`; under `serve` it serves HTTP and drives the
    /// others).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Run only this rank of the --tp group.
    #[arg(long, requires = "root")]
    pub rank: Option<usize>,
    /// Rank 0's address (it listens there; the others connect).
    #[arg(long, value_name = "HOST:PORT")]
    pub root: Option<std::net::SocketAddr>,
    /// How long a rank waits for its peers (connecting, and in each step);
    /// under `serve`, a rank gone for longer makes the server answer 503
    /// with the reason.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub collective_timeout: f64,
}

/// `TpArgs`, checked: what this process runs.
#[derive(Clone, Copy, Debug)]
pub struct Tp {
    /// Ranks in the group.
    pub tp: usize,
    /// Where they run.
    pub placement: actors::serve::Placement,
    /// How long a rank waits for its peers.
    pub timeout: Duration,
}

impl Tp {
    /// This process's rank when it runs one rank of a group over TCP.
    pub fn rank(&self) -> Option<usize> {
        match self.placement {
            actors::serve::Placement::Tcp { rank, .. } => Some(rank),
            actors::serve::Placement::InProcess => None,
        }
    }
}

impl TpArgs {
    /// The one check of `--tp`, `--rank`, `--root` and `--collective-timeout`.
    pub fn check(&self) -> Result<Tp, Failure> {
        if self.tp == 0 || self.rank.is_some_and(|r| r >= self.tp) {
            return Err(Failure::usage(format!(
                "--tp {} must be at least 1 and --rank below it",
                self.tp
            )));
        }
        if !(self.collective_timeout.is_finite() && self.collective_timeout > 0.0) {
            return Err(Failure::usage("--collective-timeout must be positive"));
        }
        let placement = match (self.rank, self.root) {
            (None, _) => actors::serve::Placement::InProcess,
            (Some(rank), Some(root)) => actors::serve::Placement::Tcp { rank, root },
            (Some(_), None) => return Err(Failure::usage("--rank needs --root")),
        };
        Ok(Tp {
            tp: self.tp,
            placement,
            timeout: Duration::from_secs_f64(self.collective_timeout),
        })
    }
}

/// A comma-separated list flag without its empty entries (`--features ""`).
pub fn non_empty(values: &[String]) -> Vec<String> {
    values.iter().filter(|s| !s.is_empty()).cloned().collect()
}

/// This executable (the benchmarks and `dima up` start copies of it).
pub fn this_exe() -> Result<PathBuf, Failure> {
    use anyhow::Context as _;
    Ok(std::env::current_exe().context("locating the dima executable")?)
}

/// Checks `--delta` and `--lambda` with the learner's own rule.
pub fn step_params(delta: f64, lambda: f64) -> Result<dataflows::learner::StepParams, Failure> {
    dataflows::learner::StepParams::new(delta, lambda).map_err(|_| {
        Failure::usage(format!(
            "--delta {delta} must be in [0, 1] and --lambda {lambda} at least 0"
        ))
    })
}

/// Loads a Gemma model, with a progress bar when stderr is a terminal.
pub fn load_gemma(model: &str) -> anyhow::Result<actors::gemma::Gemma> {
    let path = crate::models::model_path(model)?;
    Ok(with_load_progress(&path, |progress| {
        actors::gemma::Gemma::load_with_progress(&path, progress)
    })?)
}

/// Runs `load` with a progress bar of the layers loaded when stderr is a
/// terminal (nothing otherwise).
pub fn with_load_progress<T>(
    path: &std::path::Path,
    load: impl FnOnce(&mut dyn FnMut(usize, usize)) -> T,
) -> T {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return load(&mut |_, _| {});
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading {msg} {bar:30} {pos}/{len} layers")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let out = load(&mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    out
}
