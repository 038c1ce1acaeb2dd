//! `dima learner dataset` and `dima learner evaluate`: the incremental
//! learner's offline tools.

use std::path::PathBuf;

use anyhow::Context as _;
use dataflows::learner::StepParams;
use dataflows::learner::evaluate::{EvalConfig, evaluate, read_csv_hashed};

use super::{Failure, Hessian, OutputFormat, non_empty, step_params};

#[derive(Debug, clap::Subcommand)]
pub enum LearnerCommand {
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
    Evaluate(EvaluateArgs),
}

#[derive(Debug, clap::Args)]
pub struct EvaluateArgs {
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
    #[arg(long, default_value_t = StepParams::DEFAULT.delta)]
    delta: f64,
    /// L2 penalty.
    #[arg(long, default_value_t = StepParams::DEFAULT.lambda)]
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
}

/// `dima learner …`.
pub fn run(command: &LearnerCommand) -> Result<(), Failure> {
    match command {
        LearnerCommand::Dataset { input, output } => {
            let (rows, clicks) = crate::events::ads_dataset(input, output)?;
            eprintln!(
                "wrote {rows} impressions ({clicks} clicked) to {}",
                output.display()
            );
            Ok(())
        }
        LearnerCommand::Evaluate(args) => evaluate_log(args),
    }
}

fn evaluate_log(args: &EvaluateArgs) -> Result<(), Failure> {
    let input = &args.input;
    let params = step_params(args.delta, args.lambda)?;
    let file =
        std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let reader: Box<dyn std::io::Read> = if input.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let data = read_csv_hashed(
        std::io::BufReader::new(reader),
        &args.entity_column,
        &args.label_column,
        &non_empty(&args.features),
        &non_empty(&args.entity_features),
        &non_empty(&args.hashed_features),
        args.hash_bits,
    )
    .map_err(|e| Failure::usage(format!("{}: {e}", input.display())))?;
    let mut config = EvalConfig {
        batch_size: args.batch_size,
        warmup_batches: args.warmup_batches,
        params,
        refit_every: args.refit_every,
        full: args.hessian.full(),
    };
    if args.tune {
        let (d, l) = dataflows::learner::evaluate::tune(&data, &config).map_err(Failure::usage)?;
        eprintln!("tuned on the warm-up rows: delta {d}, lambda {l}");
        config.params = StepParams {
            delta: d,
            lambda: l,
        };
    }
    let report = evaluate(&data, &config).map_err(Failure::usage)?;
    let methods = [
        ("incremental", &report.incremental),
        ("stale", &report.stale),
        ("periodic", &report.periodic),
        ("lambda", &report.lambda),
    ];
    if let Some(path) = &args.plot {
        let series: Vec<crate::plot::Series> = methods
            .iter()
            .map(|(name, m)| crate::plot::Series {
                name: (*name).to_owned(),
                points: m
                    .batches
                    .iter()
                    .enumerate()
                    .filter_map(|(i, b)| b.auc.map(|a| ((args.warmup_batches + i) as f64, a)))
                    .collect(),
            })
            .collect();
        let title = format!(
            "{}: progressive AUC per window of {} rows (delta {}, lambda {})",
            input.file_name().map_or_else(
                || input.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            ),
            args.batch_size,
            config.params.delta,
            config.params.lambda
        );
        crate::plot::line_chart(path, &title, "window", "AUC", &series).map_err(Failure::usage)?;
        eprintln!("wrote {}", path.display());
    }
    match args.format {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&report)?;
            // "lambda" is the method's key: the hyper-parameters go under "params".
            value["params"] = serde_json::json!({
                "delta": config.params.delta,
                "lambda": config.params.lambda,
                "tuned": args.tune,
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
                args.warmup_batches,
                args.batch_size
            );
            println!(
                "{:<12} {:>8} {:>8}   AUC per quarter",
                "method", "AUC", "logloss"
            );
            for (name, m) in methods {
                let quarters: Vec<String> = m.quarters.iter().map(|q| show(q.auc)).collect();
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
