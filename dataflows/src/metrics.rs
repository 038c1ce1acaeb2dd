//! Dataflow metrics: records per operator and worker, and frontier lag.
//!
//! The metrics live in a [`prometheus::Registry`] that the caller owns (the
//! `dima` binary serves it as Prometheus text and bridges it to OpenTelemetry).
//! Operators take a pre-labelled counter when the dataflow is built and add
//! whole batches, so counting costs one atomic add per batch, not per record.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Whether a metric family only goes up or moves both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic (Prometheus counter, OpenTelemetry sum).
    Counter,
    /// Goes up and down (Prometheus gauge, OpenTelemetry gauge).
    Gauge,
}

/// The name, help text and kind of one metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricFamily {
    /// Prometheus family name.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: MetricKind,
}

const RECORDS: MetricFamily = MetricFamily {
    name: "dima_operator_records_total",
    help: "Records an operator has processed, by dataflow, operator and worker.",
    kind: MetricKind::Counter,
};
const LAG_EPOCHS: MetricFamily = MetricFamily {
    name: "dima_frontier_lag_epochs",
    help: "Epochs closed at a dataflow's input that are not yet complete at its output.",
    kind: MetricKind::Gauge,
};
const LAG_SECONDS: MetricFamily = MetricFamily {
    name: "dima_frontier_lag_seconds",
    help: "Seconds since the oldest epoch not yet complete at the output was closed at the input.",
    kind: MetricKind::Gauge,
};
const EPOCHS_COMPLETED: MetricFamily = MetricFamily {
    name: "dima_epochs_completed_total",
    help: "Epochs that have passed a dataflow's output frontier.",
    kind: MetricKind::Counter,
};

const LEARNER_AUC: MetricFamily = MetricFamily {
    name: "dima_learner_auc",
    help: "Progressive-validation AUC of a pipeline's learner over its last completed window.",
    kind: MetricKind::Gauge,
};
const LEARNER_LOGLOSS: MetricFamily = MetricFamily {
    name: "dima_learner_logloss",
    help: "Progressive-validation mean log loss of a pipeline's learner over its last completed window.",
    kind: MetricKind::Gauge,
};
const LEARNER_EXAMPLES: MetricFamily = MetricFamily {
    name: "dima_learner_examples_total",
    help: "Examples a pipeline's learner has scored and learned from.",
    kind: MetricKind::Counter,
};

const MATCHING_SERVED_RATE: MetricFamily = MetricFamily {
    name: "dima_matching_served_rate",
    help: "Share of the ride requests a pipeline's matcher has seen that it dispatched.",
    kind: MetricKind::Gauge,
};
const MATCHING_VALUE_STATES: MetricFamily = MetricFamily {
    name: "dima_matching_value_states",
    help: "States (H3 cell, time bucket) with a learned driver value, over all shards.",
    kind: MetricKind::Gauge,
};
const MATCHING_DISPATCHES: MetricFamily = MetricFamily {
    name: "dima_matching_dispatches_total",
    help: "Dispatches a pipeline's matcher has made.",
    kind: MetricKind::Counter,
};

/// Metric families shared by every dataflow of one process.
#[derive(Clone, Debug)]
pub struct DataflowMetrics {
    records: IntCounterVec,
    lag_epochs: IntGaugeVec,
    lag_seconds: prometheus::GaugeVec,
    epochs_completed: IntCounterVec,
    learner_auc: prometheus::GaugeVec,
    learner_logloss: prometheus::GaugeVec,
    learner_examples: IntCounterVec,
    matching_served_rate: prometheus::GaugeVec,
    matching_value_states: IntGaugeVec,
    matching_dispatches: IntCounterVec,
}

/// The matcher's metrics of one pipeline (set by worker 0).
#[derive(Clone, Debug)]
pub struct MatchingMetrics {
    /// Dispatched / requests seen.
    pub served_rate: prometheus::Gauge,
    /// Value-function states.
    pub value_states: IntGauge,
    /// Dispatches so far.
    pub dispatches: IntCounter,
}

/// The learner gauges of one pipeline (set by worker 0).
#[derive(Clone, Debug)]
pub struct LearnerMetrics {
    /// AUC of the last completed window.
    pub auc: prometheus::Gauge,
    /// Log loss of the last completed window.
    pub logloss: prometheus::Gauge,
    /// Examples so far.
    pub examples: IntCounter,
}

impl DataflowMetrics {
    /// Registers the dataflow metric families in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let opts = |family: MetricFamily| Opts::new(family.name, family.help);
        let records = IntCounterVec::new(opts(RECORDS), &["dataflow", "operator", "worker"])?;
        let lag_epochs = IntGaugeVec::new(opts(LAG_EPOCHS), &["dataflow", "worker"])?;
        let lag_seconds = prometheus::GaugeVec::new(opts(LAG_SECONDS), &["dataflow", "worker"])?;
        let epochs_completed = IntCounterVec::new(opts(EPOCHS_COMPLETED), &["dataflow", "worker"])?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(lag_epochs.clone()))?;
        registry.register(Box::new(lag_seconds.clone()))?;
        registry.register(Box::new(epochs_completed.clone()))?;
        let learner_auc = prometheus::GaugeVec::new(opts(LEARNER_AUC), &["dataflow"])?;
        let learner_logloss = prometheus::GaugeVec::new(opts(LEARNER_LOGLOSS), &["dataflow"])?;
        let learner_examples = IntCounterVec::new(opts(LEARNER_EXAMPLES), &["dataflow"])?;
        registry.register(Box::new(learner_auc.clone()))?;
        registry.register(Box::new(learner_logloss.clone()))?;
        registry.register(Box::new(learner_examples.clone()))?;
        let matching_served_rate =
            prometheus::GaugeVec::new(opts(MATCHING_SERVED_RATE), &["dataflow"])?;
        let matching_value_states = IntGaugeVec::new(opts(MATCHING_VALUE_STATES), &["dataflow"])?;
        let matching_dispatches = IntCounterVec::new(opts(MATCHING_DISPATCHES), &["dataflow"])?;
        registry.register(Box::new(matching_served_rate.clone()))?;
        registry.register(Box::new(matching_value_states.clone()))?;
        registry.register(Box::new(matching_dispatches.clone()))?;
        Ok(Self {
            records,
            lag_epochs,
            lag_seconds,
            epochs_completed,
            learner_auc,
            learner_logloss,
            learner_examples,
            matching_served_rate,
            matching_value_states,
            matching_dispatches,
        })
    }

    /// The matcher's metrics of `dataflow`.
    pub fn matching(&self, dataflow: &str) -> MatchingMetrics {
        MatchingMetrics {
            served_rate: self.matching_served_rate.with_label_values(&[dataflow]),
            value_states: self.matching_value_states.with_label_values(&[dataflow]),
            dispatches: self.matching_dispatches.with_label_values(&[dataflow]),
        }
    }

    /// The learner gauges of `dataflow`.
    pub fn learner(&self, dataflow: &str) -> LearnerMetrics {
        LearnerMetrics {
            auc: self.learner_auc.with_label_values(&[dataflow]),
            logloss: self.learner_logloss.with_label_values(&[dataflow]),
            examples: self.learner_examples.with_label_values(&[dataflow]),
        }
    }

    /// The families [`register`](Self::register) adds, for exporters that
    /// need to declare instruments before any sample exists.
    pub fn families() -> [MetricFamily; 10] {
        [
            RECORDS,
            LAG_EPOCHS,
            LAG_SECONDS,
            EPOCHS_COMPLETED,
            LEARNER_AUC,
            LEARNER_LOGLOSS,
            LEARNER_EXAMPLES,
            MATCHING_SERVED_RATE,
            MATCHING_VALUE_STATES,
            MATCHING_DISPATCHES,
        ]
    }

    /// Metrics that go nowhere, for tests and benchmarks that do not scrape.
    pub fn detached() -> Self {
        // A private registry that nobody reads; registration cannot collide.
        Self::register(&Registry::new()).unwrap_or_else(|e| unreachable!("fresh registry: {e}"))
    }

    /// The record counter of `operator` on `worker` in `dataflow`.
    pub fn records(&self, dataflow: &str, operator: &str, worker: usize) -> IntCounter {
        self.records
            .with_label_values(&[dataflow, operator, &worker.to_string()])
    }

    /// Frontier-lag handles of one worker's dataflow.
    pub fn frontier(&self, dataflow: &str, worker: usize) -> FrontierMetrics {
        let worker = worker.to_string();
        FrontierMetrics {
            lag_epochs: self.lag_epochs.with_label_values(&[dataflow, &worker]),
            lag_seconds: self.lag_seconds.with_label_values(&[dataflow, &worker]),
            completed: self
                .epochs_completed
                .with_label_values(&[dataflow, &worker]),
        }
    }
}

/// Frontier-lag handles of one worker's dataflow.
#[derive(Clone, Debug)]
pub struct FrontierMetrics {
    lag_epochs: IntGauge,
    lag_seconds: prometheus::Gauge,
    completed: IntCounter,
}

impl FrontierMetrics {
    /// Records the lag: `closed` epochs closed at the input, `complete` of them
    /// complete at the output, the oldest incomplete one closed `age_s` ago.
    pub fn observe(&self, closed: u64, complete: u64, age_s: f64) {
        self.lag_epochs.set(closed.saturating_sub(complete) as i64);
        self.lag_seconds.set(age_s);
        let seen = self.completed.get();
        if complete > seen {
            self.completed.inc_by(complete - seen);
        }
    }
}
