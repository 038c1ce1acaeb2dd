//! `dima`: run and inspect Dima clusters. See `dima --help`.
//!
//! This file parses the command line and dispatches; each subcommand group
//! lives in `cli/` with a `run` that returns `Result<(), Failure>`.

mod assign;
mod bench;
mod cli;
mod events;
mod inference;
mod models;
mod plot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cli::{Failure, FormatArg, Globals};

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

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a manifest and print what it describes; exit 2 if it is invalid.
    Validate(cli::cluster::ValidateArgs),
    /// Start every process the manifest places on this machine and wait for
    /// the job to finish; prints the job's result as the last stdout line.
    Up(cli::cluster::UpArgs),
    /// Run one process of the manifest's cluster (what `dima up` starts).
    Run(cli::cluster::RunArgs),
    /// Generate text with a Gemma 3 model (greedy decoding).
    Generate(cli::model::GenerateArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (`/v1/completions`,
    /// `/v1/chat/completions`, `/v1/models`, `/health`) with continuous
    /// batching, until stopped.
    Serve(cli::model::ServeArgs),
    /// Print the token ids of a text as a JSON array (no BOS; special-token
    /// strings such as `<start_of_turn>` become their tokens).
    Tokenize(cli::model::TokenizeArgs),
    /// Run one forward pass over a sequence and print, per position, the top
    /// logits and the log-probability of the next token, and the perplexity.
    Score(cli::model::ScoreArgs),
    /// Generate and check event streams.
    Events {
        #[command(subcommand)]
        events: cli::events::EventsCommand,
    },
    /// Solve an assignment problem from a file: a JSON edge list
    /// `{"rows":R,"cols":C,"edges":[[r,c,w],...]}` (pairs not listed are
    /// forbidden) or a dense CSV matrix (every cell a weight).
    Assign(cli::matching::AssignArgs),
    /// Simulate a city's dispatch under a matching policy: riders, drivers,
    /// batch matching every window, the value function learned online.
    Simulate(cli::matching::SimulateArgs),
    /// The incremental learner's offline tools.
    Learner {
        #[command(subcommand)]
        learner: cli::learner::LearnerCommand,
    },
    /// List and inspect the checkpoints of a `[checkpoints] dir`.
    Checkpoints {
        #[command(subcommand)]
        checkpoints: cli::checkpoints::CheckpointsCommand,
    },
    /// Fetch and inspect model files.
    Models {
        #[command(subcommand)]
        models: cli::model::ModelsCommand,
    },
    /// The GPU (CUDA builds, `--features cuda`): describe it, or check every
    /// CUDA kernel against the CPU op it mirrors.
    Gpu {
        #[command(subcommand)]
        gpu: cli::gpu::GpuCommand,
    },
    /// End-to-end benchmarks, each against an anchor measured in the same run.
    Bench {
        #[command(subcommand)]
        bench: cli::bench::BenchCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Up(_) | Command::Run(_)) {
        // One-shot commands end quietly when their reader goes away
        // (`dima models inspect M | head`), as Unix tools do, instead of
        // panicking on a failed print. The cluster processes keep Rust's
        // default (SIGPIPE ignored) so a dropped peer socket is an error.
        // SAFETY: restoring a default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let globals = Globals {
        log_format: cli.log_format.map(Into::into),
        log_level: cli.log_level.clone(),
    };
    match execute(&cli.command, &globals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("error: {}", cli::describe(&error));
            ExitCode::from(code)
        }
    }
}

fn execute(command: &Command, globals: &Globals) -> Result<(), Failure> {
    match command {
        Command::Validate(args) => cli::cluster::validate(args),
        Command::Up(args) => cli::cluster::up(args, globals),
        Command::Run(args) => cli::cluster::run(args, globals),
        Command::Generate(args) => cli::model::generate(args),
        Command::Serve(args) => {
            ::cluster::telemetry::stderr_logging(
                globals.log_level.as_deref(),
                globals.log_format.unwrap_or(::cluster::LogFormat::Human),
            );
            cli::model::serve(args)
        }
        Command::Tokenize(args) => cli::model::tokenize(args),
        Command::Score(args) => cli::model::score(args),
        Command::Events { events } => cli::events::run(events),
        Command::Assign(args) => cli::matching::assign(args),
        Command::Simulate(args) => cli::matching::simulate(args),
        Command::Learner { learner } => cli::learner::run(learner),
        Command::Checkpoints { checkpoints } => cli::checkpoints::run(checkpoints),
        Command::Models { models } => cli::model::models(models),
        Command::Gpu { gpu } => cli::gpu::run(gpu),
        Command::Bench { bench } => cli::bench::run(bench),
    }
}
