//! The `count` job: the smallest real workload that crosses the whole cluster.
//!
//! Every worker generates its share of `events` keyed events from a seeded
//! generator ([`KeyedEvents`]), one epoch of `epoch_events` at a time. The keys
//! are exchanged to their owning worker ([`CountByKey`]) and counted there;
//! when the input ends every worker sends its per-key totals to worker 0
//! ([`GatherTotals`]), which reports a [`CountSummary`]: events, distinct keys, and a checksum that does
//! not depend on the order of the (key, count) pairs. Because the generator,
//! the routing and the checksum depend only on the job, the summary is the same
//! for every layout of processes and workers, and equals [`count_sequential`],
//! the single-threaded loop that serves as both the oracle in tests and the
//! anchor in benchmarks.

mod count_by_key;
mod gather_totals;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde::Serialize;
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use timely::worker::Worker;

pub use count_by_key::CountByKey;
pub use gather_totals::GatherTotals;

use crate::metrics::DataflowMetrics;
use crate::placement::mix64;

/// The dataflow name under which the count job reports metrics.
pub const DATAFLOW: &str = "count";

/// Keys are sent into the dataflow in batches of this many.
const BATCH: usize = 8192;

/// What the count job does: resolved from the manifest's `[jobs.count]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CountJob {
    /// Events generated across the whole cluster.
    pub events: u64,
    /// Distinct keys the generator draws from.
    pub keys: u64,
    /// Generator seed.
    pub seed: u64,
    /// Events per epoch (one timely timestamp), across the whole cluster.
    pub epoch_events: u64,
    /// A worker stops generating while this many of its epochs are incomplete.
    pub max_epochs_in_flight: u64,
    /// Target rate across the cluster; `None` generates as fast as possible.
    pub events_per_second: Option<f64>,
}

impl Default for CountJob {
    fn default() -> Self {
        Self {
            events: 1_000_000,
            keys: 10_000,
            seed: 42,
            epoch_events: 100_000,
            max_epochs_in_flight: 4,
            events_per_second: None,
        }
    }
}

impl CountJob {
    /// Number of epochs the job runs.
    pub fn epochs(&self) -> u64 {
        self.events.div_ceil(self.epoch_events.max(1))
    }
}

/// The seeded keyed-event generator: event `i` of the job has key `key(i)`.
///
/// Keys are uniform over `0..keys` and depend only on the seed and the event
/// index, so any split of the index range over workers yields the same events.
#[derive(Clone, Copy, Debug)]
pub struct KeyedEvents {
    seed: u64,
    keys: u64,
}

impl KeyedEvents {
    /// A generator over `keys` distinct keys (at least one).
    pub fn new(seed: u64, keys: u64) -> Self {
        Self {
            seed: mix64(seed),
            keys: keys.max(1),
        }
    }

    /// The key of event `index`.
    #[inline]
    pub fn key(&self, index: u64) -> u64 {
        mix64(self.seed ^ index) % self.keys
    }
}

/// The job's result: the JSON line `dima up` prints last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CountSummary {
    /// Events counted (sum of all per-key counts).
    pub events: u64,
    /// Distinct keys counted.
    pub keys: u64,
    /// Order-independent checksum over all (key, count) pairs.
    pub checksum: u64,
}

impl CountSummary {
    /// Summarises final per-key totals, in any order.
    pub fn from_totals(totals: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut summary = Self {
            events: 0,
            keys: 0,
            checksum: 0,
        };
        for (key, count) in totals {
            summary.events += count;
            summary.keys += 1;
            // A wrapping sum of per-pair hashes: commutative, so the order in
            // which workers deliver their totals cannot change it.
            summary.checksum = summary.checksum.wrapping_add(mix64(
                mix64(key) ^ count.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
        }
        summary
    }

    /// The result line: `{"job":"count","events":N,"keys":K,"checksum":"<hex>"}`.
    pub fn to_json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Line<'a> {
            job: &'a str,
            events: u64,
            keys: u64,
            checksum: String,
        }
        serde_json::to_value(Line {
            job: DATAFLOW,
            events: self.events,
            keys: self.keys,
            checksum: format!("{:016x}", self.checksum),
        })
        .unwrap_or_default()
    }
}

/// The count job as one plain loop: the oracle for tests, the anchor for benchmarks.
pub fn count_sequential(job: &CountJob) -> CountSummary {
    let generator = KeyedEvents::new(job.seed, job.keys);
    let mut totals: FxHashMap<u64, u64> = FxHashMap::default();
    for index in 0..job.events {
        *totals.entry(generator.key(index)).or_insert(0) += 1;
    }
    CountSummary::from_totals(totals)
}

/// What one worker's run of the count job produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountRun {
    /// The summary, on worker 0 of a run that was not interrupted.
    pub summary: Option<CountSummary>,
    /// Events this worker generated.
    pub generated: u64,
    /// Whether `stop` ended generation early.
    pub interrupted: bool,
}

/// Builds and drives the count dataflow on one worker until it completes.
///
/// Generation stops early when `stop` becomes true (the dataflow then drains
/// what was generated and no summary is reported).
pub fn run_count(
    worker: &mut Worker,
    job: &CountJob,
    metrics: &DataflowMetrics,
    stop: &AtomicBool,
) -> CountRun {
    let index = worker.index();
    let peers = worker.peers() as u64;
    let mut input = InputHandleVec::<u64, u64>::new();
    let probe = ProbeHandle::new();
    let result = (index == 0).then(|| Rc::new(RefCell::new(None)));

    let counted = metrics.records(DATAFLOW, "count_by_key", index);
    let gathered = metrics.records(DATAFLOW, "gather_totals", index);
    let slot = result.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        scope
            .input_from(&mut input)
            .count_by_key(counted)
            .gather_totals(gathered, slot)
            .probe_with(&probe);
    });

    let generator = KeyedEvents::new(job.seed, job.keys);
    let generated_counter = metrics.records(DATAFLOW, "generate", index);
    let lag = metrics.frontier(DATAFLOW, index);
    let per_worker_rate = job.events_per_second.map(|rate| rate / peers as f64);
    let epochs = job.epochs();
    let started = Instant::now();
    // When each epoch not yet complete at the output was closed at the input.
    let mut closed_at: VecDeque<(u64, Instant)> = VecDeque::new();
    let completed = |probe: &ProbeHandle<u64>, closed: u64| {
        probe
            .with_frontier(|f| f.iter().min().copied())
            .unwrap_or(closed)
    };
    let observe = |closed_at: &mut VecDeque<(u64, Instant)>, closed: u64| {
        let complete = completed(&probe, closed);
        while closed_at
            .front()
            .is_some_and(|(epoch, _)| *epoch < complete)
        {
            closed_at.pop_front();
        }
        let age = closed_at
            .front()
            .map_or(0.0, |(_, at)| at.elapsed().as_secs_f64());
        lag.observe(closed, complete, age);
        complete
    };

    let mut batch = Vec::with_capacity(BATCH);
    let mut generated = 0u64;
    let mut interrupted = false;
    for epoch in 0..epochs {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        // Backpressure: epochs [0, epoch) are closed; wait while too many are incomplete.
        while epoch - observe(&mut closed_at, epoch) >= job.max_epochs_in_flight.max(1) {
            worker.step_or_park(Some(Duration::from_millis(5)));
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let lo = epoch * job.epoch_events;
        let hi = (lo + job.epoch_events).min(job.events);
        let first = lo + (index as u64 + peers - lo % peers) % peers;
        let mut index_in_epoch = first;
        while index_in_epoch < hi {
            if let Some(rate) = per_worker_rate {
                // Pace to the target rate, stepping the dataflow while we wait.
                let due = Duration::from_secs_f64(generated as f64 / rate);
                while let Some(wait) = due.checked_sub(started.elapsed()) {
                    if wait.is_zero() || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    worker.step_or_park(Some(wait.min(Duration::from_millis(10))));
                }
            }
            let room = if per_worker_rate.is_some() { 64 } else { BATCH };
            while index_in_epoch < hi && batch.len() < room {
                batch.push(generator.key(index_in_epoch));
                index_in_epoch += peers;
            }
            generated += batch.len() as u64;
            generated_counter.inc_by(batch.len() as u64);
            input.send_batch(&mut batch);
            batch.clear();
        }
        input.advance_to(epoch + 1);
        closed_at.push_back((epoch, Instant::now()));
        worker.step();
        tracing::trace!(epoch, generated, "epoch closed");
    }
    let closed = input.time().to_owned();
    input.close();
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(5)));
        observe(&mut closed_at, closed);
    }
    observe(&mut closed_at, closed);

    let summary = if interrupted {
        None
    } else {
        result.and_then(|slot| slot.borrow_mut().take())
    };
    CountRun {
        summary,
        generated,
        interrupted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(events: u64, keys: u64) -> CountJob {
        CountJob {
            events,
            keys,
            epoch_events: 1000,
            ..CountJob::default()
        }
    }

    #[test]
    fn checksum_ignores_order_but_not_counts() {
        let a = CountSummary::from_totals([(1, 5), (2, 7), (3, 1)]);
        let b = CountSummary::from_totals([(3, 1), (1, 5), (2, 7)]);
        let c = CountSummary::from_totals([(3, 1), (1, 7), (2, 5)]);
        assert_eq!(a, b);
        assert_ne!(a.checksum, c.checksum);
        assert_eq!((a.events, a.keys), (13, 3));
    }

    #[test]
    fn sequential_count_sees_every_event() {
        let summary = count_sequential(&job(50_000, 100));
        assert_eq!(summary.events, 50_000);
        assert_eq!(summary.keys, 100);
    }

    #[test]
    fn json_line_has_the_documented_keys() {
        let line = CountSummary {
            events: 3,
            keys: 2,
            checksum: 0xab,
        }
        .to_json();
        assert_eq!(
            line.to_string(),
            r#"{"job":"count","events":3,"keys":2,"checksum":"00000000000000ab"}"#
        );
    }

    fn run_threads(workers: usize, job: CountJob) -> (CountSummary, u64) {
        let metrics = DataflowMetrics::detached();
        let stop = AtomicBool::new(false);
        let guards = timely::execute(timely::Config::process(workers), move |worker| {
            run_count(worker, &job, &metrics, &stop)
        })
        .expect("timely starts");
        let runs: Vec<CountRun> = guards
            .join()
            .into_iter()
            .map(|r| r.expect("worker ok"))
            .collect();
        let generated = runs.iter().map(|r| r.generated).sum();
        (runs[0].summary.expect("worker 0 reports"), generated)
    }

    #[test]
    fn dataflow_matches_the_sequential_oracle_for_1_2_and_3_workers() {
        // 10_500 events: the last epoch is a partial one.
        let job = job(10_500, 37);
        let expected = count_sequential(&job);
        for workers in [1, 2, 3] {
            let (summary, generated) = run_threads(workers, job.clone());
            assert_eq!(summary, expected, "{workers} workers");
            assert_eq!(generated, 10_500, "{workers} workers");
        }
    }

    #[test]
    fn zero_events_gives_an_empty_summary() {
        let (summary, _) = run_threads(2, job(0, 10));
        assert_eq!(
            summary,
            CountSummary {
                events: 0,
                keys: 0,
                checksum: 0
            }
        );
    }

    #[test]
    fn rate_limit_paces_generation() {
        let job = CountJob {
            events_per_second: Some(4_000.0),
            ..job(1_000, 10)
        };
        let started = Instant::now();
        let (summary, _) = run_threads(1, job.clone());
        assert_eq!(summary, count_sequential(&job));
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "took {:?}",
            started.elapsed()
        );
    }
}
