//! Event pipelines: a source, the parse-and-validate stage, keyed exchange,
//! per-type counts, a sink for valid events and a dead-letter sink for the
//! rest.
//!
//! Each worker owns a disjoint share of the source ([`source`]): a shard of
//! the generator, a byte range of a JSONL file. Records enter one epoch (a
//! timely timestamp) per `epoch_events` records; a worker stops reading while
//! `max_epochs_in_flight` of its epochs are not yet complete at every output
//! (backpressure). Malformed records never stop the stream: each goes to the
//! dead-letter sink with its reason and source position, and is counted.
//!
//! Later stages (feature computation and the learner for `ads`, matching for
//! `dispatch`) attach to the valid, keyed stream.

pub mod kafka;
mod run;
pub mod sink;
pub mod source;

use std::path::PathBuf;

pub use run::{MatchingReport, PipelineSummary, PipelinesRun, run_pipelines, run_pipelines_with};

use crate::events::Family;

/// The generator's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorSpec {
    /// Which event family.
    pub family: Family,
    /// Events to produce across the whole cluster.
    pub events: u64,
    /// Seed: the same seed and shard count give the same events.
    pub seed: u64,
    /// Shards of the stream (spread over the workers; the stream does not
    /// depend on how many workers there are).
    pub shards: u64,
    /// Fraction of lines corrupted on purpose (dead-letter traffic), 0 to 1.
    pub malformed_fraction: f64,
    /// Wall-clock rate across the cluster; `None` is as fast as possible.
    pub events_per_second: Option<f64>,
    /// Simulated time: ads impressions (or dispatch requests) per simulated
    /// second at mean intensity.
    pub simulated_rate: f64,
    /// Ads: members.
    pub members: u64,
    /// Ads: campaigns.
    pub campaigns: u64,
    /// Dispatch: drivers.
    pub drivers: u64,
    /// Ads: random-walk, lifetime and global drift of the click model.
    pub drift: crate::events::Drift,
    /// Out-of-order arrival: each event arrives up to this long after its
    /// event time (uniformly), ms; 0 keeps event-time order.
    pub jitter_ms: u64,
    /// Fraction of events that arrive `late_by_ms` after their time.
    pub late_fraction: f64,
    /// How long after its event time a late event arrives, ms.
    pub late_by_ms: u64,
}

impl GeneratorSpec {
    /// The defaults for `family`.
    pub fn new(family: Family) -> Self {
        Self {
            family,
            events: 100_000,
            seed: 42,
            shards: 4,
            malformed_fraction: 0.0,
            events_per_second: None,
            simulated_rate: match family {
                Family::Ads => 2.5,
                Family::Dispatch => 0.15,
            },
            members: 50_000,
            campaigns: 40,
            drivers: 500,
            drift: crate::events::Drift::default(),
            jitter_ms: 0,
            late_fraction: 0.0,
            late_by_ms: 300_000,
        }
    }
}

/// Where a pipeline reads.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceSpec {
    /// The embedded generator.
    Generator(GeneratorSpec),
    /// A JSONL file, split by byte ranges across workers.
    Jsonl {
        /// The file.
        path: PathBuf,
    },
    /// A Kafka topic, partitions split across workers.
    Kafka(kafka::KafkaSourceSpec),
}

impl SourceSpec {
    /// `generator` or `jsonl`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Generator(_) => "generator",
            Self::Jsonl { .. } => "jsonl",
            Self::Kafka(_) => "kafka",
        }
    }
}

/// Where valid events go.
#[derive(Clone, Debug, PartialEq)]
pub enum SinkSpec {
    /// Counted only.
    None,
    /// One JSON line per event on standard output.
    Stdout,
    /// Appended to a JSONL file.
    Jsonl {
        /// The file.
        path: PathBuf,
    },
    /// Produced to a Kafka topic, keyed by the event's entity.
    Kafka(Box<kafka::KafkaSinkSpec>),
}

impl SinkSpec {
    /// `none`, `stdout` or `jsonl`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Stdout => "stdout",
            Self::Jsonl { .. } => "jsonl",
            Self::Kafka(_) => "kafka",
        }
    }
}

/// One pipeline of the manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineSpec {
    /// Its name (`[pipelines.<name>]`).
    pub name: String,
    /// The event family it carries.
    pub family: Family,
    /// Where it reads.
    pub source: SourceSpec,
    /// Where valid events go.
    pub sink: SinkSpec,
    /// The dead-letter JSONL file (written by worker 0).
    pub dead_letter: PathBuf,
    /// Records per epoch, per worker.
    pub epoch_events: u64,
    /// An epoch with records in it closes after this long even when it has
    /// fewer than `epoch_events` (slow streams still complete and commit).
    pub epoch_ms: u64,
    /// A worker stops reading while this many of its epochs are incomplete.
    pub max_epochs_in_flight: u64,
    /// The event-time clock: watermark delay, future bound, bucket.
    pub time: crate::features::EventTime,
    /// Click attribution (ads only). The ads stages (attribution, features,
    /// examples, the learner) run when it is set; without it the pipeline
    /// parses, counts and sinks only.
    pub attribution: Option<crate::features::AttributionSpec>,
    /// Windowed streaming features (ads only).
    pub features: Vec<crate::features::FeatureSpec>,
    /// Where labelled examples go (ads only; [`SinkSpec::None`] counts them).
    pub examples: SinkSpec,
    /// The incremental learner on this pipeline's events (ads only).
    pub learner: Option<LearnerSpec>,
    /// The dispatch matcher (dispatch pipelines only).
    pub matching: Option<MatchingSpec>,
}

impl PipelineSpec {
    /// The attribution the ads stages run with, when they run: set, or
    /// the default when features, examples or a learner need them.
    pub fn ads_stages(&self) -> Option<crate::features::AttributionSpec> {
        if self.family != Family::Ads {
            return None;
        }
        let needed =
            self.learner.is_some() || !self.features.is_empty() || self.examples != SinkSpec::None;
        self.attribution
            .or_else(|| needed.then(crate::features::AttributionSpec::default))
    }
}

/// The dispatch matcher of a pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct MatchingSpec {
    /// Policy, windows, radius, values, prices.
    pub config: crate::matching::operator::MatchConfig,
    /// Where dispatch events go.
    pub dispatches: SinkSpec,
}

/// `[pipelines.<name>.learner]`: per-campaign random effects learned from
/// impressions labelled by their clicks, one update per campaign per window.
#[derive(Clone, Debug, PartialEq)]
pub struct LearnerSpec {
    /// Forgetting factor δ.
    pub delta: f64,
    /// L2 penalty λ.
    pub lambda: f64,
    /// Full (true) or diagonal precision.
    pub full: bool,
    /// Where model snapshots go (JSONL, worker 0), if anywhere.
    pub snapshots: Option<PathBuf>,
    /// The global fixed effect and its refit schedule, if any.
    pub fixed: Option<crate::learner::operator::FixedEffectConfig>,
    /// Hashed sparse features of the fixed effect (none by default).
    pub hashing: crate::learner::ads::AdHashing,
    /// Indices into the pipeline's features that the learner uses (as
    /// `ln(1 + count)`, after the context features).
    pub features: Vec<usize>,
    /// Event-time length of a learner window, ms: one update per campaign
    /// per window.
    pub window_ms: u64,
}

/// Opens worker `worker`'s share (of `workers`) of `spec`; a Kafka source
/// publishes its partitions' lag on `kafka`.
pub fn open_source(
    spec: &SourceSpec,
    pipeline: &str,
    worker: usize,
    workers: usize,
    kafka: Option<crate::metrics::KafkaMetrics>,
) -> Result<Box<dyn source::RecordSource>, source::SourceError> {
    Ok(match spec {
        SourceSpec::Generator(g) => Box::new(source::GeneratorShards::new(
            g,
            worker as u64,
            workers as u64,
        )),
        SourceSpec::Jsonl { path } => Box::new(source::JsonlSplit::open(path, worker, workers)?),
        SourceSpec::Kafka(k) => {
            let source = kafka::KafkaSource::new(k, pipeline, worker, workers)?;
            Box::new(match kafka {
                Some(metrics) => source.with_metrics(metrics),
                None => source,
            })
        }
    })
}
