//! `dima assign` and `dima simulate`: the matcher's offline tools.

use std::io::Write;
use std::path::PathBuf;

use dataflows::matching::{Policy, Scenario, Simulation};

use super::{Failure, OutputFormat, one_of};

#[derive(Debug, clap::Args)]
pub struct AssignArgs {
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
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The scenario (TOML: city, fleet, demand, pricing, matching, value).
    #[arg(long)]
    scenario: PathBuf,
    /// `value` (learned driver values), `myopic` (same solver, immediate
    /// reward only) or `nearest` (first come, nearest driver).
    #[arg(long, default_value = "value", value_parser = one_of::<Policy>(Policy::ALL.map(|p| (p.name(), p.describe()))))]
    policy: Policy,
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
}

/// `dima assign`.
pub fn assign(args: &AssignArgs) -> Result<(), Failure> {
    let input = &args.input;
    let problem = crate::assign::read_problem(input).map_err(Failure::invalid)?;
    let started = std::time::Instant::now();
    let solved = if args.complete {
        problem.solve_complete(args.maximize)
    } else if args.sparse {
        problem.solve_sparse(args.maximize)
    } else {
        problem.solve_partial(args.maximize)
    }
    .map_err(|e| Failure::usage(format!("{}: {e}", input.display())))?;
    match args.format {
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

/// `dima simulate`.
pub fn simulate(args: &SimulateArgs) -> Result<(), Failure> {
    let hours = args.hours;
    if !(hours.is_finite() && hours > 0.0 && hours <= 24.0 * 365.0) {
        return Err(Failure::usage(format!(
            "--hours {hours} must be a positive number of hours"
        )));
    }
    let loaded = Scenario::load(&args.scenario)?;
    let report = match &args.events_out {
        None => dataflows::matching::simulate(&loaded, args.policy, hours, args.seed),
        Some(path) => {
            let file = std::fs::File::create(path)
                .map_err(|e| Failure::usage(format!("cannot create {}: {e}", path.display())))?;
            let mut out = std::io::BufWriter::new(file);
            let mut sim = Simulation::new(&loaded, args.policy, args.seed).with_events();
            while !sim.done(hours) {
                sim.step();
                for event in sim.drain_events() {
                    writeln!(out, "{}", event.to_line())
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                }
            }
            out.flush()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            sim.report(hours)
        }
    };
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string(&report)?),
        OutputFormat::Text => print!("{}", cluster::summary::simulation(&report)),
    }
    Ok(())
}
