//! `dima validate`, `dima up` and `dima run`: the manifest and its processes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use cluster::manifest::TelemetrySpec;
use cluster::{Identity, Job, Manifest, RunOptions, Telemetry, UpOptions};

use super::{Failure, Globals};

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// The manifest (TOML).
    file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The manifest (TOML).
    file: PathBuf,
    /// The job to run: `pipelines` (the manifest's `[pipelines.*]`, the
    /// default when it has any) or `count` (the default otherwise).
    #[arg(long, value_enum)]
    job: Option<Job>,
    /// Number of events; overrides the count job's `events`, or every
    /// generator source's `events`.
    #[arg(long, value_name = "N")]
    events: Option<u64>,
    /// Run the jobs only, without the manifest's `[inference]`.
    #[arg(long)]
    no_inference: bool,
    /// Ignore the checkpoints in `[checkpoints] dir` and start from the
    /// beginning (they are not deleted; newer ones are written beside them).
    #[arg(long)]
    fresh: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The manifest (TOML).
    file: PathBuf,
    /// Index of this process in `dataflow.processes`.
    #[arg(long, value_name = "I")]
    process: usize,
    /// The job to run (as for `dima up`).
    #[arg(long, value_enum)]
    job: Option<Job>,
    /// Number of events; overrides the job's `events` in the manifest.
    #[arg(long, value_name = "N")]
    events: Option<u64>,
    /// Run the job only, without the manifest's `[inference]` ranks.
    #[arg(long)]
    no_inference: bool,
    /// Ignore existing checkpoints (as for `dima up`).
    #[arg(long)]
    fresh: bool,
}

fn telemetry_spec(globals: &Globals, manifest: &Manifest) -> TelemetrySpec {
    let mut spec = manifest.telemetry.clone();
    if let Some(format) = globals.log_format {
        spec.log_format = format;
    }
    if let Some(level) = &globals.log_level {
        spec.log_level = level.clone();
    }
    spec
}

/// `dima validate FILE`: prints what the manifest describes.
pub fn validate(args: &ValidateArgs) -> Result<(), Failure> {
    let file = &args.file;
    let manifest = Manifest::load(file)?;
    let dataflow = &manifest.dataflow;
    println!(
        "ok: {}: cluster {:?}, {} process(es) x {} worker(s) = {} worker(s)",
        file.display(),
        manifest.cluster.name,
        dataflow.processes.len(),
        dataflow.workers_per_process(),
        dataflow.total_workers()
    );
    for p in &dataflow.processes {
        let metrics = p
            .metrics_address
            .map(|a| format!(", metrics at {a}"))
            .unwrap_or_default();
        println!("  process {}: {}{metrics}", p.index, p.address);
    }
    for p in &manifest.pipelines {
        use dataflows::pipelines::{SinkSpec, SourceSpec};
        let source = match &p.source {
            SourceSpec::Generator(g) => {
                format!("generator ({} events, seed {})", g.events, g.seed)
            }
            SourceSpec::Jsonl { path } => format!("jsonl {}", path.display()),
            SourceSpec::Kafka(k) => {
                format!("kafka {}/{} (group {})", k.brokers, k.topic, k.group)
            }
        };
        let describe = |sink: &SinkSpec| match sink {
            SinkSpec::None => "none".to_owned(),
            SinkSpec::Stdout => "stdout".to_owned(),
            SinkSpec::Jsonl { path } => format!("jsonl {}", path.display()),
            SinkSpec::Kafka(k) => format!("kafka {}/{}", k.brokers, k.topic),
        };
        let sink = describe(&p.sink);
        println!(
            "  pipeline {} ({}): {source} -> {sink}; dead letters {}",
            p.name,
            p.family.name(),
            p.dead_letter.display()
        );
        let t = p.time;
        println!(
            "    event time: watermark delay {} s, max future {} s, buckets of {} ms, idle after {} s",
            t.watermark_delay_ms as f64 / 1000.0,
            t.max_future_ms as f64 / 1000.0,
            t.bucket_ms,
            t.idle_ms as f64 / 1000.0
        );
        if let Some(a) = p.ads_stages() {
            let features: Vec<String> = p
                .features
                .iter()
                .map(|f| {
                    format!(
                        "{} ({} by {} over {} s)",
                        f.name,
                        f.measure.name(),
                        f.key.path(),
                        f.window_ms as f64 / 1000.0
                    )
                })
                .collect();
            println!(
                "    attribution within {} s; features: {}; examples -> {}",
                a.window_ms as f64 / 1000.0,
                if features.is_empty() {
                    "none".to_owned()
                } else {
                    features.join(", ")
                },
                describe(&p.examples)
            );
        }
    }
    if let Some(i) = &manifest.inference {
        let placement = if i.in_one_process() {
            format!("all in process {} (threads)", i.ranks[0])
        } else {
            format!(
                "processes {:?} over TCP through {}",
                i.ranks,
                i.root.map_or("?".to_owned(), |r| r.to_string())
            )
        };
        let backend = match &i.backend {
            cluster::manifest::Backend::Cpu => "on cpu".to_owned(),
            cluster::manifest::Backend::Cuda {
                devices,
                max_context,
            } => {
                format!("on cuda devices {devices:?}, {max_context} positions per request")
            }
        };
        println!(
            "  inference: {} as {:?} {backend}, tp {} ({placement}), http://{}; max batch {}, \
             max waiting {}, max tokens in flight {}; load {} request(s) x {} token(s), {} at a time",
            i.model,
            i.served_model_name,
            i.tp,
            i.listen,
            i.max_batch,
            i.max_waiting,
            i.max_tokens_in_flight,
            i.load.requests,
            i.load.max_tokens,
            i.load.concurrency
        );
    }
    Ok(())
}

/// Fetches a catalog model that is not in the cache yet (`dima up` does
/// this before starting processes, so they do not race to fetch it).
fn ensure_model(model: &str) -> anyhow::Result<()> {
    let Some(entry) = actors::models::catalog_entry(model) else {
        return Ok(());
    };
    if crate::models::model_path(model).is_ok() {
        return Ok(());
    }
    eprintln!("fetching {model} for [inference] (once; it is cached)");
    let fetched = actors::models::fetch(entry, "python3")?;
    eprintln!("fetched {}", fetched.path.display());
    Ok(())
}

/// `dima up FILE`: starts this machine's processes and prints the results.
pub fn up(args: &UpArgs, globals: &Globals) -> Result<(), Failure> {
    let file = &args.file;
    let manifest = Manifest::load(file)?;
    if let Some(inference) = manifest.inference.as_ref().filter(|_| !args.no_inference) {
        if matches!(inference.backend, cluster::manifest::Backend::Cuda { .. })
            && !cfg!(feature = "cuda")
        {
            return Err(Failure::usage(format!(
                "{}: inference.backend = \"cuda\", but this dima was built without \
                 CUDA: build it with `cargo build --release -p cluster --features cuda` \
                 (or run with --no-inference)",
                file.display()
            )));
        }
        ensure_model(&inference.model)?;
    }
    let mut spec = telemetry_spec(globals, &manifest);
    // The launcher only logs; its children export telemetry.
    spec.otlp = None;
    let identity = Identity {
        cluster: manifest.cluster.name.clone(),
        process: None,
    };
    let telemetry = Telemetry::init(&spec, &identity)?;
    let exe = super::this_exe()?;
    let options = UpOptions {
        manifest: file.clone(),
        job: args.job.unwrap_or_else(|| Job::default_for(&manifest)),
        events: args.events,
        log_format: globals.log_format,
        log_level: globals.log_level.clone(),
        no_inference: args.no_inference,
        fresh: args.fresh,
    };
    let outcome = cluster::up(&manifest, &options, &exe);
    telemetry.shutdown();
    let results = outcome?;
    for result in &results {
        for line in cluster::summary::human(result) {
            eprintln!("{line}");
        }
    }
    for result in results {
        println!("{result}");
    }
    Ok(())
}

fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal asks for a clean stop; a second one exits at once.
        // Registration only fails for forbidden signals; these are not.
        let _ = signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop));
        let _ = signal_hook::flag::register(signal, Arc::clone(&stop));
    }
    stop
}

/// Turns any panic in a `dima run` process into one clear line and an exit.
///
/// Timely's network threads panic when a peer's socket closes; the process
/// then cannot make progress, so it exits with [`cluster::EXIT_PEER_LOST`]
/// (which tells `dima up` this is a consequence, not the cause). Any other
/// panic is a bug: it is reported with its location and exits 1.
fn exit_on_panic(process: usize) {
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        if message.contains("timely communication error") || message.contains("poisoned") {
            eprintln!(
                "error: process {process} lost its connection to a peer process ({message}); stopping"
            );
            std::process::exit(cluster::EXIT_PEER_LOST);
        }
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: process {process}: internal error in thread '{thread}'{location}: {message}"
        );
        std::process::exit(1);
    }));
}

/// `dima run FILE --process I`: one process of the cluster.
pub fn run(args: &RunArgs, globals: &Globals) -> Result<(), Failure> {
    exit_on_panic(args.process);
    let manifest = load(&args.file)?;
    let spec = telemetry_spec(globals, &manifest);
    let identity = Identity {
        cluster: manifest.cluster.name.clone(),
        process: Some(args.process),
    };
    let mut telemetry = Telemetry::init(&spec, &identity)?;
    let options = RunOptions {
        process: args.process,
        job: args.job.unwrap_or_else(|| Job::default_for(&manifest)),
        events: args.events,
        fresh: args.fresh,
    };
    let stop = stop_flag();
    let inference = if args.no_inference {
        None
    } else {
        crate::inference::start(&manifest, args.process, Arc::clone(&stop))
    };
    let outcome = cluster::run_process(&manifest, &options, &mut telemetry, stop);
    // The jobs are done (or failed): rank 0 stops serving.
    let served = inference.map(crate::inference::Inference::finish);
    telemetry.shutdown();
    if let Ok(Some(result)) = &outcome {
        println!("{result}");
    }
    match served {
        Some(Ok(Some(report))) => println!("{report}"),
        Some(Err(e)) if outcome.is_ok() => {
            return Err(Failure::failed(e.context("inference")));
        }
        _ => {}
    }
    outcome?;
    Ok(())
}

fn load(path: &Path) -> Result<Manifest, Failure> {
    Ok(Manifest::load(path)?)
}
