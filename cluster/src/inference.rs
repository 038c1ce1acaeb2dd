//! `[inference]` under `dima up` / `dima run`: the processes the manifest
//! places ranks on load them, beside their dataflow job. The process with
//! rank 0 serves the OpenAI-compatible API ([`crate::serve`]) at
//! `inference.listen` and, while the jobs run, sends `[inference.load]`'s
//! streaming completions through it; the others follow rank 0 over TCP.
//! When the jobs are done (or, with `keep_serving`, when the cluster is
//! stopped) rank 0 stops the server, which stops the other ranks, and
//! reports one result line (`"job": "inference"`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::manifest::{ApiKey, InferenceSpec, Manifest};
use crate::serve::{self, Placement};

/// Prompts the built-in load cycles through.
const PROMPTS: [&str; 8] = [
    "Write a one-line ad for trail running shoes:",
    "The capital of France is",
    "Give three tips for a first marathon:",
    "Summarise what a ride-hailing dispatcher does in one sentence:",
    "Write a haiku about autumn in the city:",
    "Explain logistic regression to a new engineer:",
    "List three colours of the rainbow:",
    "Suggest a name for a coffee shop near the sea:",
];

/// The inference work of one process, running on its own thread.
#[derive(Debug)]
pub struct Inference {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Option<Value>>>,
}

impl Inference {
    /// Says the jobs are done and waits: rank 0 stops serving (unless
    /// `keep_serving`, which waits for the stop signal) and returns its
    /// result line; other ranks return once rank 0 has stopped them.
    pub fn finish(self) -> anyhow::Result<Option<Value>> {
        self.done.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the inference thread panicked"))?
    }
}

/// Starts this process's share of `[inference]`, if the manifest places a
/// rank here. `stop` is the process's stop signal.
pub fn start(manifest: &Manifest, process: usize, stop: Arc<AtomicBool>) -> Option<Inference> {
    let spec = manifest.inference.clone()?;
    let mine: Vec<usize> = (0..spec.tp).filter(|r| spec.ranks[*r] == process).collect();
    let first = *mine.first()?;
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let thread = std::thread::Builder::new()
        .name("dima-inference".into())
        .spawn(move || {
            let result = run(&spec, first, &flag, &stop);
            if let Err(e) = &result {
                tracing::error!(error = format!("{e:#}"), "inference failed");
            }
            result
        });
    match thread {
        Ok(thread) => Some(Inference { done, thread }),
        Err(e) => {
            let failed = std::thread::spawn(move || {
                Err(anyhow::anyhow!("cannot start the inference thread: {e}"))
            });
            Some(Inference {
                done,
                thread: failed,
            })
        }
    }
}

fn run(
    spec: &InferenceSpec,
    rank: usize,
    done: &AtomicBool,
    stop: &AtomicBool,
) -> anyhow::Result<Option<Value>> {
    let path = crate::models::model_path(&spec.model).context("inference.model")?;
    let placement = if spec.in_one_process() {
        Placement::InProcess
    } else {
        let root = spec
            .root
            .context("inference.root is required when ranks run in different processes")?;
        Placement::Tcp { rank, root }
    };
    if let crate::manifest::Backend::Cuda {
        devices,
        max_context,
    } = &spec.backend
    {
        return serve_on_gpu(spec, &path, devices, *max_context, done, stop);
    }
    let started = Instant::now();
    let ranks = serve::load_ranks(&path, spec.tp, placement, spec.collective_timeout)
        .with_context(|| format!("loading rank {rank} of {} of {}", spec.tp, path.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    for line in serve::describe_ranks(&ranks).lines() {
        tracing::info!(load_s, "{line}");
    }
    if rank != 0 {
        let gemma = ranks.into_iter().next().context("no rank was loaded")?;
        actors::gemma::engine::follow(gemma)
            .map_err(|e| anyhow::anyhow!("rank {rank} of {}: {e}", spec.tp))?;
        return Ok(None);
    }
    let held: Vec<Value> = ranks
        .iter()
        .map(|g| {
            let r = g.shard().rank;
            json!({"rank": r, "process": spec.ranks[r], "weight_bytes": g.weight_bytes()})
        })
        .collect();
    let config = serve_config(spec)?;
    let server = serve::start(ranks, &config)?;
    finish_serving(spec, server, &config, (&path, load_s, held), done, stop)
}

/// The server's settings from `[inference]` (the bearer token read now).
fn serve_config(spec: &InferenceSpec) -> anyhow::Result<serve::ServeConfig> {
    let api_key = match &spec.api_key {
        None => None,
        Some(ApiKey::Literal(k)) => Some(k.clone()),
        Some(ApiKey::Env(name)) => Some(std::env::var(name).with_context(|| {
            format!("inference.api_key_env: the environment variable {name} is not set")
        })?),
    };
    Ok(serve::ServeConfig {
        model_name: spec.served_model_name.clone(),
        listen: spec.listen,
        api_key,
        engine: actors::gemma::engine::EngineConfig {
            max_batch: spec.max_batch,
            max_waiting: spec.max_waiting,
            max_tokens_in_flight: spec.max_tokens_in_flight,
            heartbeat: spec.collective_timeout.mul_f64(0.25),
        },
        handle_signals: false,
    })
}

/// A GPU deployment, every rank in this process (one GPU each, NCCL
/// between them), served by the same engine and server.
#[cfg(feature = "cuda")]
fn serve_on_gpu(
    spec: &InferenceSpec,
    path: &std::path::Path,
    devices: &[usize],
    max_context: usize,
    done: &AtomicBool,
    stop: &AtomicBool,
) -> anyhow::Result<Option<Value>> {
    let started = Instant::now();
    let config = serve_config(spec)?;
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("inference.listen: cannot listen on {}", config.listen))?;
    let (shards, tokenizer) = crate::gpu::gpu_shards(
        path,
        devices,
        (spec.max_batch, max_context),
        spec.collective_timeout,
    )?;
    let load_s = started.elapsed().as_secs_f64();
    let held = devices
        .iter()
        .enumerate()
        .map(|(r, d)| json!({"rank": r, "process": spec.ranks[r], "device": d}))
        .collect();
    let engine = actors::gemma::engine::Engine::start_shards(shards, config.engine)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = serve::start_engine(engine, tokenizer, listener, &config)?;
    finish_serving(spec, server, &config, (path, load_s, held), done, stop)
}

#[cfg(not(feature = "cuda"))]
fn serve_on_gpu(
    _spec: &InferenceSpec,
    _path: &std::path::Path,
    _devices: &[usize],
    _max_context: usize,
    _done: &AtomicBool,
    _stop: &AtomicBool,
) -> anyhow::Result<Option<Value>> {
    anyhow::bail!(
        "inference.backend = \"cuda\", but this dima was built without CUDA: build it with \
         `cargo build --release -p cluster --features cuda`"
    )
}

/// Sends the load through the running server, waits for the jobs (or the
/// stop signal), stops the server and reports.
fn finish_serving(
    spec: &InferenceSpec,
    server: serve::Running,
    config: &serve::ServeConfig,
    (path, load_s, held): (&std::path::Path, f64, Vec<Value>),
    done: &AtomicBool,
    stop: &AtomicBool,
) -> anyhow::Result<Option<Value>> {
    let api_key = config.api_key.clone();
    let address = server.address.to_string();
    tracing::info!(%address, tp = spec.tp, "serving the OpenAI-compatible API");
    let load = send_load(spec, &address, api_key.as_deref(), stop);
    if spec.keep_serving {
        tracing::info!(%address, "the jobs' load is done; serving until stopped");
    }
    while !stop.load(Ordering::SeqCst) && (spec.keep_serving || !done.load(Ordering::SeqCst)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    server.stop()?;
    let mut report = json!({
        "job": "inference",
        "model": spec.served_model_name,
        "path": path.display().to_string(),
        "tp": spec.tp,
        "placement": if spec.in_one_process() { "threads" } else { "tcp" },
        "backend": match spec.backend {
            crate::manifest::Backend::Cpu => "cpu",
            crate::manifest::Backend::Cuda { .. } => "cuda",
        },
        "ranks_here": held,
        "listen": address,
        "load_s": load_s,
    });
    if let (Some(obj), Value::Object(load)) = (report.as_object_mut(), load) {
        obj.extend(load);
    }
    Ok(Some(report))
}

/// Sends `[inference.load]`'s completions, `concurrency` at a time, and
/// measures them.
fn send_load(
    spec: &InferenceSpec,
    address: &str,
    api_key: Option<&str>,
    stop: &AtomicBool,
) -> Value {
    let load = spec.load;
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let outcomes: Vec<anyhow::Result<(f64, Vec<f64>, u64)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..load.concurrency.min(load.requests.max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= load.requests || stop.load(Ordering::SeqCst) {
                            return mine;
                        }
                        mine.push(crate::bench::stream_once(
                            address,
                            &spec.served_model_name,
                            PROMPTS[i % PROMPTS.len()],
                            load.max_tokens,
                            api_key,
                        ));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let wall_s = started.elapsed().as_secs_f64();
    let (mut ttft, mut itl, mut tokens, mut errors) = (Vec::new(), Vec::new(), 0u64, Vec::new());
    for outcome in &outcomes {
        match outcome {
            Ok((first, gaps, n)) => {
                ttft.push(*first);
                itl.extend(gaps);
                tokens += n;
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let ok = ttft.len();
    let rate = if wall_s > 0.0 {
        tokens as f64 / wall_s
    } else {
        0.0
    };
    let p = |v: &mut Vec<f64>, q: f64| {
        let x = crate::bench::percentile(v, q);
        if x.is_finite() { json!(x) } else { Value::Null }
    };
    errors.truncate(3);
    json!({
        "requests": outcomes.len(),
        "ok": ok,
        "failed": outcomes.len() - ok,
        "errors": errors,
        "completion_tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": rate,
        "ttft_p50_s": p(&mut ttft, 0.5),
        "ttft_p99_s": p(&mut ttft, 0.99),
        "itl_p50_s": p(&mut itl, 0.5),
        "itl_p99_s": p(&mut itl, 0.99),
    })
}
