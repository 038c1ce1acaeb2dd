//! Dima's dataflows: timely graphs that carry events from sources through
//! features, learners and matchers to sinks.
//!
//! The crate knows nothing about manifests or processes: the `cluster` crate
//! builds a timely configuration and calls into the jobs here from each
//! worker. The three types to know first:
//!
//! - [`PipelineSpec`] and [`run_pipelines`]: an event pipeline (a source,
//!   validation with dead letters, the incremental learner or the matcher,
//!   a sink) run on a timely worker;
//! - [`CountJob`] and [`run_count`]: the `count` job, the smallest
//!   end-to-end dataflow (generate keyed events, exchange by key, count,
//!   gather);
//! - [`DataflowMetrics`]: per-operator, per-worker record counters and
//!   frontier lag, registered in a Prometheus registry.
//!
//! Keyed exchanges all use one stable hash ([`placement::route`]).
//!
//! ```
//! use std::sync::atomic::AtomicBool;
//! use dataflows::{count_sequential, run_count, CountJob, DataflowMetrics};
//!
//! let job = CountJob { events: 5_000, keys: 50, ..CountJob::default() };
//! let expected = count_sequential(&job);
//! let metrics = DataflowMetrics::detached();
//! let stop = AtomicBool::new(false);
//! let guards = timely::execute(timely::Config::process(2), move |worker| {
//!     run_count(worker, &job, &metrics, &stop).summary
//! }).unwrap();
//! let summaries: Vec<_> = guards.join().into_iter().map(Result::unwrap).collect();
//! assert_eq!(summaries[0], Some(expected));
//! ```

pub mod checkpoint;
pub mod events;
pub mod features;
pub mod jobs;
pub mod learner;
pub mod matching;
mod metrics;
pub mod pipelines;
pub mod placement;
pub mod toml_input;

pub use jobs::count::{CountJob, CountRun, CountSummary, KeyedEvents, count_sequential, run_count};
pub use metrics::{
    DataflowMetrics, FrontierMetrics, LearnerMetrics, MatchingMetrics, MetricFamily, MetricKind,
    PipelineMetrics,
};
pub use pipelines::{PipelineSpec, run_pipelines};
