//! `[inference]` under `dima up` / `dima run`: the processes the manifest
//! places ranks on load them, beside their dataflow job. The process with
//! rank 0 serves the OpenAI-compatible API ([`actors::serve`]) at
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

use actors::serve::{self, Deployed, Deployment, Placement};

use cluster::manifest::{ApiKey, InferenceSpec, Manifest};

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
    let deployment = Deployment {
        model: path.clone(),
        tp: spec.tp,
        placement,
        backend: spec.backend.clone(),
        collective_timeout: spec.collective_timeout,
        http: serve_config(spec)?,
    };
    let deployed = deployment.start().map_err(|e| match e {
        e @ serve::ServeError::Listen { .. } => anyhow::Error::new(e).context("inference.listen"),
        e => anyhow::Error::new(e).context(format!(
            "loading rank {rank} of {} of {}",
            spec.tp,
            path.display()
        )),
    })?;
    let (server, held, load_s) = match deployed {
        Deployed::Following {
            ref description,
            load_s,
            ..
        } => {
            for line in description.lines() {
                tracing::info!(load_s, "{line}");
            }
            deployed.follow().map_err(|e| match e {
                serve::ServeError::Follower { source, .. } => {
                    anyhow::anyhow!("rank {rank} of {}: {source}", spec.tp)
                }
                e => anyhow::anyhow!("rank {rank} of {}: {e}", spec.tp),
            })?;
            return Ok(None);
        }
        Deployed::Serving {
            server,
            ranks,
            description,
            load_s,
        } => {
            for line in description.lines() {
                tracing::info!(load_s, "{line}");
            }
            let held: Vec<Value> = ranks
                .iter()
                .map(|r| {
                    let mut held = json!({"rank": r.rank, "process": spec.ranks[r.rank]});
                    if let Some(bytes) = r.weight_bytes {
                        held["weight_bytes"] = json!(bytes);
                    }
                    if let Some(device) = r.device {
                        held["device"] = json!(device);
                    }
                    held
                })
                .collect();
            (server, held, load_s)
        }
    };
    finish_serving(
        spec,
        server,
        &deployment.http,
        (&path, load_s, held),
        done,
        stop,
    )
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
            prefix_cache_bytes: spec.prefix_cache_mib << 20,
            ..Default::default()
        },
        handle_signals: false,
        public_health: spec.public_health,
        public_metrics: spec.public_metrics,
        max_tokens_cap: spec.max_tokens_cap,
        body_timeout: spec.body_timeout,
        header_timeout: spec.header_timeout,
        request_timeout: spec.request_timeout,
        max_connections: spec.max_connections,
        max_streams_per_client: spec.max_streams_per_client,
        degraded_after: spec.degraded_after,
    })
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
            cluster::manifest::Backend::Cpu => "cpu",
            cluster::manifest::Backend::Cuda { .. } => "cuda",
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
    let outcomes: Vec<Result<serve::client::StreamStats, serve::client::ClientError>> =
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..load.concurrency.min(load.requests.max(1)))
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= load.requests || stop.load(Ordering::SeqCst) {
                                return mine;
                            }
                            mine.push(serve::client::stream_completion(
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
            Ok(stats) => {
                ttft.push(stats.first_event_s);
                itl.extend(&stats.gaps_s);
                tokens += stats.completion_tokens;
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
        let x = serve::client::percentile(v, q);
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
