//! `dima run FILE --process I`: one timely process of the manifest's cluster.

use std::any::Any;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use dataflows::checkpoint::{CheckpointSpec, Checkpointing, Store};
use dataflows::pipelines::{PipelineSpec, PipelinesRun, SourceSpec, run_pipelines_with};
use dataflows::{CountJob, CountRun, DataflowMetrics, run_count};

use timely::WorkerConfig;
use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};

use crate::manifest::Manifest;
use crate::mesh::{self, MeshError, MeshSpec};
use crate::telemetry::Telemetry;

/// A job `dima up`/`dima run` can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Job {
    /// Generate keyed events, exchange them by key, count them, gather the totals.
    Count,
    /// Run every `[pipelines.*]` of the manifest.
    Pipelines,
}

impl Job {
    /// The job's name on the command line and in its result line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Pipelines => "pipelines",
        }
    }

    /// What `dima up FILE` runs without `--job`: the manifest's pipelines,
    /// or the count job when it has none.
    pub fn default_for(manifest: &Manifest) -> Self {
        if manifest.pipelines.is_empty() {
            Self::Count
        } else {
            Self::Pipelines
        }
    }
}

/// What to run in this process.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Index into `dataflow.processes`.
    pub process: usize,
    /// Which job.
    pub job: Job,
    /// Overrides the job's event count.
    pub events: Option<u64>,
    /// Ignore existing checkpoints (start from the beginning).
    pub fresh: bool,
}

/// Why a process could not run its job to the end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The process index is not in the manifest.
    #[error("--process {index}: the manifest has {count} process(es), indices 0..{count}")]
    NoSuchProcess {
        /// The requested index.
        index: usize,
        /// How many processes the manifest lists.
        count: usize,
    },
    /// The process's own address cannot be listened on.
    #[error("{field} {address}: cannot listen: {source}")]
    Listen {
        /// The manifest field.
        field: String,
        /// The address.
        address: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Telemetry could not start.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// The peers could not be connected.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// Timely could not start (networking).
    #[error("timely could not start: {0}")]
    Timely(String),
    /// A worker thread panicked.
    #[error("worker {worker} failed: {message}")]
    Worker {
        /// Global worker index.
        worker: usize,
        /// The panic message.
        message: String,
    },
    /// A stop signal ended the job before it finished.
    #[error("interrupted before the job finished")]
    Interrupted,
    /// A pipeline's source or sink failed.
    #[error("{0}")]
    Pipeline(String),
    /// `--job pipelines` with a manifest that has none.
    #[error("the manifest has no [pipelines.*] section to run (try --job count)")]
    NoPipelines,
}

impl RunError {
    /// A stable name for the kind of error.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::NoSuchProcess { .. } => "no_such_process",
            Self::Listen { .. } => "listen",
            Self::Metrics(_) => "metrics",
            Self::Telemetry(_) => "telemetry",
            Self::Mesh(MeshError::Interrupted) => "interrupted",
            Self::Mesh(_) => "mesh",
            Self::Timely(_) => "timely",
            Self::Worker { .. } => "worker",
            Self::Interrupted => "interrupted",
            Self::Pipeline(_) => "pipeline",
            Self::NoPipelines => "no_pipelines",
        }
    }
}

/// Timely's communication for process `index`: worker threads in-process,
/// joined to the other processes over the sockets of [`mesh::connect`].
pub fn communication(
    manifest: &Manifest,
    index: usize,
    stop: &AtomicBool,
) -> Result<(Vec<AllocatorBuilder>, Box<dyn Any + Send>), RunError> {
    let threads = manifest.dataflow.workers_per_process();
    let hooks = timely::communication::Hooks::default();
    let local =
        ProcessBuilder::new_typed_vector(threads, hooks.refill.clone(), hooks.spill.clone());
    if manifest.dataflow.processes.len() == 1 {
        return Ok((
            local.into_iter().map(AllocatorBuilder::Process).collect(),
            Box::new(()),
        ));
    }
    let sockets = mesh::connect(&MeshSpec::new(manifest, index), stop)?;
    let (builders, guard) =
        initialize_networking_from_sockets(local, sockets, index, threads, hooks)
            .map_err(|e| RunError::Timely(format!("starting network threads: {e}")))?;
    Ok((
        builders.into_iter().map(AllocatorBuilder::Tcp).collect(),
        Box::new(guard),
    ))
}

/// Checks that `address` can be listened on right now.
pub fn check_listen(address: SocketAddr, field: &str) -> Result<(), RunError> {
    TcpListener::bind(address)
        .map(drop)
        .map_err(|source| RunError::Listen {
            field: field.to_owned(),
            address,
            source,
        })
}

/// Runs `options.job` in process `options.process` until it completes.
///
/// Returns the job's result line on the process that reports it (process 0)
/// and `None` elsewhere.
pub fn run_process(
    manifest: &Manifest,
    options: &RunOptions,
    telemetry: &mut Telemetry,
    stop: Arc<AtomicBool>,
) -> Result<Option<serde_json::Value>, RunError> {
    let count = manifest.dataflow.processes.len();
    let spec = manifest
        .dataflow
        .processes
        .get(options.process)
        .ok_or(RunError::NoSuchProcess {
            index: options.process,
            count,
        })?;
    let field = format!("dataflow.processes[{}]", spec.index);

    let metrics = DataflowMetrics::register(telemetry.registry())?;
    telemetry.export_metrics(&DataflowMetrics::families());
    if let Some(address) = spec.metrics_address {
        let bound = telemetry.serve_metrics(address, &format!("{field}.metrics_address"))?;
        tracing::info!(address = %bound, "serving Prometheus metrics at /metrics");
    }

    if options.job == Job::Pipelines {
        return run_pipelines_process(manifest, options, &metrics, stop);
    }
    let job = CountJob {
        events: options.events.unwrap_or(manifest.jobs.count.events),
        ..manifest.jobs.count.clone()
    };
    let span = tracing::info_span!(
        "dima.run",
        cluster = %manifest.cluster.name,
        process = options.process,
        job = options.job.name(),
        events = job.events,
    );
    let _entered = span.clone().entered();
    tracing::info!(
        processes = count,
        workers = manifest.dataflow.workers_per_process(),
        address = %spec.address,
        "starting"
    );
    let started = Instant::now();
    let worker_span = span.clone();
    let worker_stop = Arc::clone(&stop);
    let (builders, guard) = communication(manifest, options.process, &stop)?;
    tracing::debug!(
        elapsed_s = started.elapsed().as_secs_f64(),
        "peers connected"
    );
    let guards =
        timely::execute::execute_from(builders, guard, WorkerConfig::default(), move |worker| {
            let _span =
                tracing::info_span!(parent: &worker_span, "worker", worker = worker.index())
                    .entered();
            let run = run_count(worker, &job, &metrics, &worker_stop);
            tracing::debug!(generated = run.generated, "worker done");
            run
        })
        .map_err(RunError::Timely)?;

    let runs: Vec<CountRun> = join_workers(guards, manifest, options.process)?;
    let generated: u64 = runs.iter().map(|r| r.generated).sum();
    tracing::info!(
        generated,
        elapsed_s = started.elapsed().as_secs_f64(),
        "job finished"
    );
    if runs.iter().any(|r| r.interrupted) {
        return Err(RunError::Interrupted);
    }
    Ok(runs.first().and_then(|r| r.summary).map(|s| s.to_json()))
}

/// Waits for this process's workers; a worker that panicked is named by its
/// global index.
fn join_workers<T: Send + 'static>(
    guards: timely::communication::WorkerGuards<T>,
    manifest: &Manifest,
    process: usize,
) -> Result<Vec<T>, RunError> {
    let first_worker = process * manifest.dataflow.workers_per_process();
    guards
        .join()
        .into_iter()
        .enumerate()
        .map(|(offset, result)| {
            result.map_err(|message| RunError::Worker {
                worker: first_worker + offset,
                message,
            })
        })
        .collect()
}

/// The manifest's pipelines, with `--events` overriding every generator's count.
pub fn pipeline_specs(manifest: &Manifest, events: Option<u64>) -> Vec<PipelineSpec> {
    manifest
        .pipelines
        .iter()
        .cloned()
        .map(|mut spec| {
            if let (Some(n), SourceSpec::Generator(g)) = (events, &mut spec.source) {
                g.events = n;
            }
            spec
        })
        .collect()
}

/// A digest of what checkpointed state depends on: the pipelines as
/// configured (a checkpoint of other pipelines is refused).
pub fn pipelines_fingerprint(specs: &[PipelineSpec]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{specs:?}").as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `[checkpoints]` for this run, with the newest complete checkpoint to
/// restore unless `fresh`; a directory that cannot be written, or a
/// checkpoint that does not fit, ends the run before it starts.
fn checkpointing(
    manifest: &Manifest,
    specs: &[PipelineSpec],
    fresh: bool,
) -> Result<Option<Checkpointing>, RunError> {
    let Some(c) = &manifest.checkpoints else {
        if fresh {
            tracing::info!("--fresh: the manifest has no [checkpoints]; nothing to ignore");
        }
        return Ok(None);
    };
    let spec = CheckpointSpec {
        dir: c.dir.clone(),
        every: c.every,
        keep: c.keep,
        fingerprint: pipelines_fingerprint(specs),
        processes: manifest.dataflow.processes.len(),
        workers: manifest.dataflow.workers_per_process(),
    };
    let checkpoint_error = |e: dataflows::checkpoint::CheckpointError| {
        RunError::Pipeline(format!("checkpoints.dir: {e}"))
    };
    let store = Store::open(&spec.dir).map_err(checkpoint_error)?;
    let restore = if fresh {
        tracing::info!(dir = %spec.dir.display(), "--fresh: existing checkpoints are ignored");
        None
    } else {
        store.newest(&spec).map_err(checkpoint_error)?
    };
    match &restore {
        Some(loaded) => {
            let bytes: u64 = loaded.manifest.parts.iter().map(|p| p.bytes).sum();
            tracing::info!(
                checkpoint = loaded.manifest.id,
                path = %loaded.path.display(),
                bytes,
                times = ?loaded
                    .manifest
                    .pipelines
                    .iter()
                    .map(|p| (&p.name, p.time))
                    .collect::<Vec<_>>(),
                "restoring from checkpoint"
            );
        }
        None if !fresh => {
            tracing::info!(dir = %spec.dir.display(), "no checkpoint to restore: starting from the beginning");
        }
        None => {}
    }
    Ok(Some(Checkpointing { spec, restore }))
}

fn run_pipelines_process(
    manifest: &Manifest,
    options: &RunOptions,
    metrics: &DataflowMetrics,
    stop: Arc<AtomicBool>,
) -> Result<Option<serde_json::Value>, RunError> {
    let specs = pipeline_specs(manifest, options.events);
    if specs.is_empty() {
        return Err(RunError::NoPipelines);
    }
    let span = tracing::info_span!(
        "dima.run",
        cluster = %manifest.cluster.name,
        process = options.process,
        job = options.job.name(),
        pipelines = specs.len(),
    );
    let _entered = span.clone().entered();
    tracing::info!(
        processes = manifest.dataflow.processes.len(),
        workers = manifest.dataflow.workers_per_process(),
        pipelines = ?specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        "starting"
    );
    let checkpoints = checkpointing(manifest, &specs, options.fresh)?;
    let started = Instant::now();
    let (builders, guard) = communication(manifest, options.process, &stop)?;
    let worker_span = span.clone();
    let metrics = metrics.clone();
    let guards =
        timely::execute::execute_from(builders, guard, WorkerConfig::default(), move |worker| {
            let _span =
                tracing::info_span!(parent: &worker_span, "worker", worker = worker.index())
                    .entered();
            run_pipelines_with(worker, &specs, &metrics, &stop, checkpoints.as_ref())
        })
        .map_err(RunError::Timely)?;
    let mut runs: Vec<PipelinesRun> = join_workers(guards, manifest, options.process)?;
    let read: u64 = runs.iter().map(|r| r.read).sum();
    tracing::info!(
        read,
        elapsed_s = started.elapsed().as_secs_f64(),
        "pipelines finished"
    );
    if let Some(error) = runs.iter_mut().find_map(|r| r.error.take()) {
        return Err(RunError::Pipeline(error));
    }
    if runs.iter().any(|r| r.interrupted) {
        return Err(RunError::Interrupted);
    }
    Ok(runs
        .first_mut()
        .and_then(|r| r.summaries.take())
        .map(|summaries| serde_json::json!({"job": "pipelines", "pipelines": summaries})))
}
