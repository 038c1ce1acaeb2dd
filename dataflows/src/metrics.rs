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

const PIPELINE_LATE: MetricFamily = MetricFamily {
    name: "dima_pipeline_late_total",
    help: "Records dead-lettered as late: more than watermark_delay_s behind the newest event time their share had read.",
    kind: MetricKind::Counter,
};
const PIPELINE_ORPHANS: MetricFamily = MetricFamily {
    name: "dima_pipeline_orphan_clicks_total",
    help: "On-time clicks that labelled no impression within the attribution window.",
    kind: MetricKind::Counter,
};
const PIPELINE_EXAMPLES: MetricFamily = MetricFamily {
    name: "dima_pipeline_examples_total",
    help: "Labelled examples emitted by a pipeline's attribution stage.",
    kind: MetricKind::Counter,
};
const PIPELINE_WATERMARK_LAG: MetricFamily = MetricFamily {
    name: "dima_pipeline_watermark_lag_seconds",
    help: "Event-time delay between the newest record a source share has read and the pipeline's output frontier, by share.",
    kind: MetricKind::Gauge,
};

const KAFKA_LAG: MetricFamily = MetricFamily {
    name: "dima_kafka_consumer_lag_records",
    help: "Records between a Kafka partition's high watermark and the next offset its source reads, by partition.",
    kind: MetricKind::Gauge,
};
const KAFKA_FETCH_AGE: MetricFamily = MetricFamily {
    name: "dima_kafka_fetch_age_seconds",
    help: "Seconds since a Kafka partition last fetched successfully (a message, or its fetcher active against a leader that is up).",
    kind: MetricKind::Gauge,
};

/// The Kafka source gauges of one pipeline on one process (created per
/// partition on the first value: a process exports only the partitions it
/// reads).
#[derive(Clone, Debug)]
pub struct KafkaMetrics {
    lag: IntGaugeVec,
    fetch_age: prometheus::GaugeVec,
    dataflow: String,
}

impl KafkaMetrics {
    /// Partition `partition`'s lag in records.
    pub fn set_lag(&self, topic: &str, partition: i32, records: i64) {
        self.lag
            .with_label_values(&[&self.dataflow, topic, &partition.to_string()])
            .set(records);
    }

    /// Seconds since partition `partition` last fetched successfully.
    pub fn set_fetch_age(&self, topic: &str, partition: i32, seconds: f64) {
        self.fetch_age
            .with_label_values(&[&self.dataflow, topic, &partition.to_string()])
            .set(seconds);
    }
}

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
    pipeline_late: IntCounterVec,
    pipeline_orphans: IntCounterVec,
    pipeline_examples: IntCounterVec,
    pipeline_watermark_lag: prometheus::GaugeVec,
    kafka_lag: IntGaugeVec,
    kafka_fetch_age: prometheus::GaugeVec,
}

/// The matcher's metrics of one pipeline (set by worker 0). The gauges are
/// created on the first value, so a process without one exports none.
#[derive(Clone, Debug)]
pub struct MatchingMetrics {
    served_rate: prometheus::GaugeVec,
    value_states: IntGaugeVec,
    dataflow: String,
    /// Dispatches so far.
    pub dispatches: IntCounter,
}

impl MatchingMetrics {
    /// Dispatched / requests seen.
    pub fn set_served_rate(&self, rate: f64) {
        self.served_rate
            .with_label_values(&[&self.dataflow])
            .set(rate);
    }

    /// Value-function states.
    pub fn set_value_states(&self, states: i64) {
        self.value_states
            .with_label_values(&[&self.dataflow])
            .set(states);
    }
}

/// The learner gauges of one pipeline (set by worker 0). The gauges are
/// created on the first value, so a process without one exports none.
#[derive(Clone, Debug)]
pub struct LearnerMetrics {
    auc: prometheus::GaugeVec,
    logloss: prometheus::GaugeVec,
    dataflow: String,
    /// Examples so far.
    pub examples: IntCounter,
}

impl LearnerMetrics {
    /// AUC of the last completed window.
    pub fn set_auc(&self, auc: f64) {
        self.auc.with_label_values(&[&self.dataflow]).set(auc);
    }

    /// Log loss of the last completed window.
    pub fn set_logloss(&self, logloss: f64) {
        self.logloss
            .with_label_values(&[&self.dataflow])
            .set(logloss);
    }
}

/// Event-time metrics of one pipeline on one process.
#[derive(Clone, Debug)]
pub struct PipelineMetrics {
    /// Late records (counted where they are read).
    pub late: IntCounter,
    /// Orphan clicks (counted on worker 0).
    pub orphans: IntCounter,
    /// Examples emitted (counted where they are attributed).
    pub examples: IntCounter,
    watermark_lag: prometheus::GaugeVec,
    dataflow: String,
}

impl PipelineMetrics {
    /// Share `share`'s watermark-lag gauge, s (created on this call: a
    /// process exports only the shares it reads).
    pub fn watermark_lag(&self, share: u32) -> prometheus::Gauge {
        self.watermark_lag
            .with_label_values(&[&self.dataflow, &share.to_string()])
    }
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
        let pipeline_late = IntCounterVec::new(opts(PIPELINE_LATE), &["dataflow"])?;
        let pipeline_orphans = IntCounterVec::new(opts(PIPELINE_ORPHANS), &["dataflow"])?;
        let pipeline_examples = IntCounterVec::new(opts(PIPELINE_EXAMPLES), &["dataflow"])?;
        let pipeline_watermark_lag =
            prometheus::GaugeVec::new(opts(PIPELINE_WATERMARK_LAG), &["dataflow", "share"])?;
        registry.register(Box::new(pipeline_late.clone()))?;
        registry.register(Box::new(pipeline_orphans.clone()))?;
        registry.register(Box::new(pipeline_examples.clone()))?;
        registry.register(Box::new(pipeline_watermark_lag.clone()))?;
        let kafka_lag = IntGaugeVec::new(opts(KAFKA_LAG), &["dataflow", "topic", "partition"])?;
        let kafka_fetch_age =
            prometheus::GaugeVec::new(opts(KAFKA_FETCH_AGE), &["dataflow", "topic", "partition"])?;
        registry.register(Box::new(kafka_lag.clone()))?;
        registry.register(Box::new(kafka_fetch_age.clone()))?;
        Ok(Self {
            kafka_lag,
            kafka_fetch_age,
            pipeline_late,
            pipeline_orphans,
            pipeline_examples,
            pipeline_watermark_lag,
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
            served_rate: self.matching_served_rate.clone(),
            value_states: self.matching_value_states.clone(),
            dataflow: dataflow.to_owned(),
            dispatches: self.matching_dispatches.with_label_values(&[dataflow]),
        }
    }

    /// The learner gauges of `dataflow`.
    pub fn learner(&self, dataflow: &str) -> LearnerMetrics {
        LearnerMetrics {
            auc: self.learner_auc.clone(),
            logloss: self.learner_logloss.clone(),
            dataflow: dataflow.to_owned(),
            examples: self.learner_examples.with_label_values(&[dataflow]),
        }
    }

    /// The event-time metrics of `dataflow`.
    pub fn pipeline(&self, dataflow: &str) -> PipelineMetrics {
        PipelineMetrics {
            late: self.pipeline_late.with_label_values(&[dataflow]),
            orphans: self.pipeline_orphans.with_label_values(&[dataflow]),
            examples: self.pipeline_examples.with_label_values(&[dataflow]),
            watermark_lag: self.pipeline_watermark_lag.clone(),
            dataflow: dataflow.to_owned(),
        }
    }

    /// The Kafka source gauges of `dataflow`.
    pub fn kafka(&self, dataflow: &str) -> KafkaMetrics {
        KafkaMetrics {
            lag: self.kafka_lag.clone(),
            fetch_age: self.kafka_fetch_age.clone(),
            dataflow: dataflow.to_owned(),
        }
    }

    /// The families [`register`](Self::register) adds, for exporters that
    /// need to declare instruments before any sample exists.
    pub fn families() -> [MetricFamily; 16] {
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
            PIPELINE_LATE,
            PIPELINE_ORPHANS,
            PIPELINE_EXAMPLES,
            PIPELINE_WATERMARK_LAG,
            KAFKA_LAG,
            KAFKA_FETCH_AGE,
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
