//! `dima bench …`: end-to-end benchmarks, each against an anchor measured
//! in the same run (the benchmarks themselves are in `crate::bench`).

use std::path::PathBuf;

use crate::bench::Layout;

use super::{Backend, Failure, Hessian, non_empty, step_params, this_exe};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
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
        /// The shared-prefix workload instead: every request is a system
        /// prompt of this many tokens plus its own --suffix-tokens, sent by
        /// the largest --streams level; run with and without the prefix
        /// cache (and against llama.cpp's server with --llama-python).
        #[arg(long)]
        shared_prefix: Option<usize>,
        /// Tokens of each request's own suffix (with --shared-prefix).
        #[arg(long, default_value_t = 64)]
        suffix_tokens: usize,
        /// A Python with `llama-cpp-python[server]`: the shared-prefix
        /// workload's anchor.
        #[arg(long)]
        llama_python: Option<String>,
        /// The mixed workload instead: the largest --streams level of
        /// short requests alone, then the same number of streams of which
        /// --long-streams send one long request each: does a long request
        /// keep short ones waiting (short p99 time to first token, mixed
        /// over plain)?
        #[arg(long, conflicts_with = "shared_prefix")]
        mix: bool,
        /// With --mix: streams that send a long request.
        #[arg(long, default_value_t = 4)]
        long_streams: usize,
        /// With --mix: tokens of a long request.
        #[arg(long, default_value_t = 1000)]
        long_tokens: usize,
        /// With --mix: tokens of a short request.
        #[arg(long, default_value_t = 16)]
        short_tokens: usize,
    },
    /// What structured output costs per token: a JSON document valid under
    /// a schema fed token by token through the llguidance constraint (mask
    /// and follow), next to the sampler's draw and one decode step of the
    /// model in the same run. One JSON line.
    Constrain {
        /// A catalog name (`gemma3-270m`) or a .gguf file.
        #[arg(long, default_value = "gemma3-270m")]
        model: String,
        /// Tokens of the document, at least.
        #[arg(long, default_value_t = 400)]
        tokens: usize,
    },
    /// Aggregate decode tokens/s when several sequences take each step
    /// together (the core of continuous batching), per batch size, next to
    /// one sequence alone in the same run. One JSON line per batch size.
    Decode(DecodeArgs),
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
    Learner(LearnerArgs),
    /// The ads pipeline (parse, validate, keyed exchange, count) through
    /// `dima up` from JSONL and, with `--kafka`, from a Kafka topic written
    /// uncompressed and again zstd-compressed, per layout, next to each
    /// source's ceiling in the same run (one thread reading the lines; one
    /// plain rdkafka consumer); a zstd row has `over_uncompressed`. One JSON
    /// line per row.
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
        /// Bootstrap servers of a broker for the Kafka rows (topics
        /// `dima-bench-<pid>-none` and `-zstd` are created and filled).
        #[arg(long, value_name = "BROKERS")]
        kafka: Option<String>,
    },
    /// The ads pipeline with attribution and four windowed features
    /// through `dima up` per layout, next to the plain parse-and-count
    /// pipeline on the same file in the same run. One JSON line per layout.
    Features {
        /// Events per run.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Layouts as PROCESSESxWORKERS, comma separated (1x1 first: the
        /// others are also compared with it).
        #[arg(long, value_delimiter = ',', default_value = "1x1,2x1,1x2")]
        layouts: Vec<Layout>,
        /// Runs per layout; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
}

#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
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
}

#[derive(Debug, clap::Args)]
pub struct LearnerArgs {
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
}

fn print_rows(rows: impl IntoIterator<Item = serde_json::Value>) {
    for row in rows {
        println!("{row}");
    }
}

/// `dima bench …`.
pub fn run(command: &BenchCommand) -> Result<(), Failure> {
    match command {
        BenchCommand::Generate {
            model,
            prompt_tokens,
            new_tokens,
            threads,
            python,
        } => {
            let result = crate::bench::bench_generate(
                &crate::models::gguf_path(model)?,
                *prompt_tokens,
                *new_tokens,
                *threads,
                python,
            )?;
            println!("{result}");
        }
        BenchCommand::Serve {
            model,
            streams,
            requests,
            max_tokens,
            max_batch,
            backend,
            device,
            shared_prefix,
            suffix_tokens,
            llama_python,
            mix,
            long_streams,
            long_tokens,
            short_tokens,
        } => {
            if let Some(shared) = shared_prefix {
                if *backend == Backend::Cuda {
                    return Err(Failure::usage(
                        "--shared-prefix runs the CPU server (the prefix cache is CPU-only)",
                    ));
                }
                let workload = crate::bench::SharedPrefix {
                    shared: (*shared).max(1),
                    suffix: (*suffix_tokens).max(1),
                    streams: streams.iter().copied().max().unwrap_or(16).max(1),
                    requests: (*requests).max(1),
                    max_tokens: (*max_tokens).max(1),
                    max_batch: (*max_batch).max(1),
                    llama_python: llama_python.clone(),
                };
                print_rows(crate::bench::bench_serve_shared_prefix(
                    &this_exe()?,
                    model,
                    &workload,
                )?);
                return Ok(());
            }
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
            if *mix {
                let workload = crate::bench::Mix {
                    streams: streams.iter().copied().max().unwrap_or(16).max(2),
                    long_streams: *long_streams,
                    short_tokens: (*short_tokens).max(1),
                    long_tokens: (*long_tokens).max(1),
                    requests: (*requests).max(1),
                    max_batch: (*max_batch).max(1),
                };
                print_rows(crate::bench::bench_serve_mix(
                    &this_exe()?,
                    model,
                    &workload,
                    &server_args,
                )?);
                return Ok(());
            }
            print_rows(crate::bench::bench_serve(
                &this_exe()?,
                model,
                streams,
                (*requests).max(1),
                (*max_tokens).max(1),
                (*max_batch).max(1),
                &server_args,
            )?);
        }
        BenchCommand::Decode(args) => decode(args)?,
        BenchCommand::Constrain { model, tokens } => {
            let path = crate::models::gguf_path(model)?;
            print_rows([crate::bench::bench_constrain(&path, *tokens)?]);
        }
        BenchCommand::Count {
            events,
            keys,
            layouts,
            repeat,
        } => {
            let job = dataflows::CountJob {
                events: *events,
                keys: *keys,
                ..Default::default()
            };
            crate::bench::bench_count(&this_exe()?, &job, layouts, *repeat)?;
        }
        BenchCommand::Assign {
            dense,
            sparse,
            k,
            repeat,
            python,
        } => {
            for row in crate::bench::bench_assign(dense, sparse, *k, *repeat, python)? {
                println!("{}", serde_json::to_string(&row)?);
            }
        }
        BenchCommand::Dispatch {
            scenario,
            seeds,
            hours,
            plot,
        } => dispatch(scenario, *seeds, *hours, plot.as_ref())?,
        BenchCommand::Events {
            events,
            layouts,
            repeat,
            kafka,
        } => {
            crate::bench::bench_events(&this_exe()?, *events, layouts, *repeat, kafka.as_deref())?;
        }
        BenchCommand::Features {
            events,
            layouts,
            repeat,
        } => crate::bench::bench_features(&this_exe()?, *events, layouts, *repeat)?,
        BenchCommand::Learner(args) => learner(args)?,
        BenchCommand::Matching {
            input,
            layouts,
            repeat,
        } => {
            crate::bench::bench_matching(&this_exe()?, input, layouts, *repeat)?;
        }
    }
    Ok(())
}

fn decode(args: &DecodeArgs) -> Result<(), Failure> {
    let gemma = if args.random_weights {
        let config = crate::models::preset(&args.model).map_err(Failure::invalid)?;
        let ty = crate::models::random_weight_type(&args.weight_type).map_err(Failure::invalid)?;
        // KV (f32 keys and values, local layers within their window) for
        // the largest batch, plus the logits.
        let most = args.batch.iter().copied().max().unwrap_or(1).max(1) as u64;
        let tokens = (args.prompt_tokens + args.steps) as u64;
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
        crate::models::random_gemma(&args.model, ty, working, 7)?
    } else {
        actors::gemma::Gemma::load(&crate::models::model_path(&args.model)?)?
    };
    if args.backend == Backend::Cuda {
        print_rows(super::gpu::bench_decode_on_gpu(
            &gemma,
            args.device,
            &args.batch,
            args.prompt_tokens,
            args.steps,
            &args.gemm,
        )?);
        return Ok(());
    }
    print_rows(crate::bench::bench_decode(
        &gemma,
        &args.batch,
        args.prompt_tokens,
        args.steps,
        args.threads,
    )?);
    Ok(())
}

fn dispatch(
    scenario: &std::path::Path,
    seeds: u64,
    hours: f64,
    plot: Option<&PathBuf>,
) -> Result<(), Failure> {
    if seeds == 0 || !(hours.is_finite() && hours > 0.0) {
        return Err(Failure::usage(
            "--seeds must be at least 1 and --hours positive",
        ));
    }
    let loaded = dataflows::matching::Scenario::load(scenario)?;
    let seeds: Vec<u64> = (1..=seeds).collect();
    let started = std::time::Instant::now();
    let runs = crate::bench::bench_dispatch(&loaded, &seeds, hours);
    for run in &runs {
        println!("{}", serde_json::to_string(run)?);
    }
    let value = &runs[0];
    let myopic = &runs[1];
    let (gain, spread) = crate::bench::gain(value, myopic);
    println!(
        "{}",
        serde_json::json!({
            "bench": "dispatch",
            "scenario": loaded.city.name,
            "seeds": seeds.len(),
            "hours": hours,
            "value_over_myopic": gain,
            "value_over_myopic_std": spread,
            "value_over_nearest": crate::bench::gain(value, &runs[2]).0,
            "wall_s": started.elapsed().as_secs_f64(),
        })
    );
    if let Some(path) = plot {
        let title = format!(
            "{}: served rate per simulated hour, mean of {} seeds",
            loaded.city.name,
            seeds.len()
        );
        crate::bench::plot_learning(path, &title, &runs)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn learner(args: &LearnerArgs) -> Result<(), Failure> {
    let params = match (args.delta, args.lambda) {
        (Some(delta), Some(lambda)) => Some(step_params(delta, lambda)?),
        _ => None,
    };
    let bench = crate::bench::LearnerBench {
        input: args.input.clone(),
        entity_column: args.entity_column.clone(),
        label_column: args.label_column.clone(),
        features: non_empty(&args.features),
        entity_features: non_empty(&args.entity_features),
        hashed: non_empty(&args.hashed_features),
        hash_bits: args.hash_bits,
        batch_size: args.batch_size,
        warmup_batches: args.warmup_batches,
        params,
        full: args.hessian.full(),
        workers: args.workers.clone(),
        repeat: args.repeat,
        python: args.python.clone(),
        lambda_learner_batches: args.lambda_learner_batches,
    };
    print_rows(crate::bench::bench_learner(&bench)?);
    Ok(())
}
