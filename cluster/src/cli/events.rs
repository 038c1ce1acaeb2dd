//! `dima events generate` and `dima events check`.

use std::path::PathBuf;

use dataflows::events::Family;

use super::{Failure, OutputFormat, one_of};

#[derive(Debug, clap::Subcommand)]
pub enum EventsCommand {
    /// Write seeded, deterministic events of one pipeline.
    Generate {
        /// Which pipeline's events.
        #[arg(long, value_parser = one_of::<Family>(Family::ALL.map(|f| (f.name(), f.describe()))))]
        pipeline: Family,
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
        /// Kafka: the codec of the batches written (`none`, `gzip`,
        /// `snappy`, `lz4`, `zstd`).
        #[arg(long, default_value = "none", value_name = "CODEC", value_parser = parse_compression)]
        compression: dataflows::pipelines::kafka::Compression,
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

/// A `--compression` value.
fn parse_compression(text: &str) -> Result<dataflows::pipelines::kafka::Compression, String> {
    use dataflows::pipelines::kafka::Compression;
    Compression::parse(text).ok_or_else(|| format!("not one of {}", Compression::VALUES))
}

/// `dima events …`.
pub fn run(command: &EventsCommand) -> Result<(), Failure> {
    match command {
        EventsCommand::Generate {
            pipeline,
            count,
            seed,
            to,
            malformed,
            partitions,
            compression,
            campaigns,
            simulated_rate,
            walk_sd,
            lifetime_hours,
            global_drift,
        } => {
            if !(0.0..=1.0).contains(malformed) {
                return Err(Failure::usage(format!(
                    "--malformed {malformed}: not between 0 and 1"
                )));
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
                return Err(Failure::usage(
                    "--campaigns, --simulated-rate, --walk-sd and --lifetime-hours must be positive (or 0 where allowed) and finite",
                ));
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
            let written = crate::events::generate(&spec, to, *partitions, *compression)?;
            eprintln!("wrote {written} {} events to {to}", pipeline.name());
            Ok(())
        }
        EventsCommand::Check { path, format } => {
            let report = crate::events::check(path)?;
            match format {
                OutputFormat::Json => println!("{}", report.to_json()),
                OutputFormat::Text => print!("{}", report.to_text()),
            }
            if report.malformed.is_empty() {
                Ok(())
            } else {
                Err(Failure::failed(anyhow::anyhow!(
                    "{}: {} malformed line(s)",
                    path.display(),
                    report.malformed.len()
                )))
            }
        }
    }
}
