//! Building and driving the pipelines on one worker.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::{Map, Partition};
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle, StreamVec};
use timely::worker::Worker;

use super::sink::{DeadLetter, LineWriter};
use super::source::{self, Record, RecordSource, SourceError};
use super::{LearnerSpec, PipelineSpec, SourceSpec};
use crate::events::{Event, Family, TYPES, WireEvent, parse_bytes};
use crate::learner::ads::{AD_FEATURES, LabelClicks, LearnerTally};
use crate::learner::{Learn, LearnerConfig, LearnerOutput, StepParams};
use crate::matching::operator::{
    DispatchRecord, MatchEvent, MatchOutput, MatchTally, MatchingSummary, match_dispatch,
};
use crate::metrics::{DataflowMetrics, FrontierMetrics};
use crate::placement::route;

/// Records are sent into a dataflow in batches of at most this many.
const BATCH: usize = 4096;

/// A record after parsing.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Parsed {
    /// A valid event and its entity key (computed once, at parse time).
    Valid(u64, WireEvent),
    Invalid(DeadLetter),
}

fn classify(pipeline: &str, family: Family, record: Record) -> Parsed {
    let reason = match parse_bytes(&record.payload) {
        Ok(event) if event.family() == family => return Parsed::Valid(event.key(), event.into()),
        Ok(event) => format!(
            "{} is not an event of the {} pipeline (expected {})",
            event.type_name(),
            family.name(),
            family.types().join(", ")
        ),
        Err(malformed) => malformed.0,
    };
    Parsed::Invalid(DeadLetter::new(
        pipeline,
        &record.origin,
        reason,
        &record.payload,
    ))
}

/// What one pipeline did, as reported by worker 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PipelineSummary {
    /// The pipeline's name.
    pub name: String,
    /// Its event family.
    pub family: String,
    /// `generator` or `jsonl`.
    pub source: String,
    /// Records read, valid or not.
    pub read: u64,
    /// Valid events.
    pub valid: u64,
    /// Records sent to the dead-letter sink.
    pub malformed: u64,
    /// Valid events per type.
    pub by_type: BTreeMap<String, u64>,
    /// Sink kind and lines written.
    pub sink: SinkSummary,
    /// Dead-letter file and lines written.
    pub dead_letter: DeadLetterSummary,
    /// What the learner did, when the pipeline has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learner: Option<crate::learner::ads::LearnerSummary>,
    /// What the dispatch matcher did, when the pipeline has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matching: Option<MatchingReport>,
}

/// The matcher's part of a [`PipelineSummary`]: its summary and where the
/// dispatches went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MatchingReport {
    /// What the matcher did.
    #[serde(flatten)]
    pub summary: MatchingSummary,
    /// Dispatch sink kind and lines written.
    pub dispatches: SinkSummary,
}

/// The sink part of a [`PipelineSummary`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SinkSummary {
    /// `none`, `stdout` or `jsonl`.
    pub kind: String,
    /// Lines written.
    pub written: u64,
}

/// The dead-letter part of a [`PipelineSummary`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeadLetterSummary {
    /// The file.
    pub path: String,
    /// Lines written by this run.
    pub written: u64,
}

/// What one worker's run of the pipelines produced.
#[derive(Debug, Default)]
pub struct PipelinesRun {
    /// Per-pipeline summaries, on worker 0 of a run that was not interrupted.
    pub summaries: Option<Vec<PipelineSummary>>,
    /// Records this worker read.
    pub read: u64,
    /// Whether `stop` ended reading early.
    pub interrupted: bool,
    /// The first error (a source or sink that failed), if any.
    pub error: Option<String>,
}

/// Valid events per type (indexed as [`TYPES`]), gathered on worker 0.
type Totals = Rc<RefCell<[u64; 6]>>;

/// A sink that worker 0's operators and the runner share.
type SharedWriter = Rc<RefCell<Option<LineWriter>>>;

struct Runner {
    spec: PipelineSpec,
    /// `None` once closed.
    input: Option<InputHandleVec<u64, Record>>,
    probe: ProbeHandle<u64>,
    source: Box<dyn RecordSource>,
    epoch: u64,
    in_epoch: u64,
    read: u64,
    read_counter: IntCounter,
    rate: Option<f64>,
    started: Instant,
    closed_at: VecDeque<(u64, Instant)>,
    /// When the current epoch got its first record.
    epoch_opened: Option<Instant>,
    /// Epochs below this are complete and were reported to the source.
    completed: u64,
    lag: FrontierMetrics,
    totals: Totals,
    sink: Rc<RefCell<Option<LineWriter>>>,
    dead: Rc<RefCell<Option<LineWriter>>>,
    tally: Option<Rc<RefCell<LearnerTally>>>,
    /// The matcher's tally and its dispatch sink.
    matching: Option<(Rc<RefCell<MatchTally>>, SharedWriter)>,
}

impl Runner {
    fn complete(&self) -> u64 {
        self.probe
            .with_frontier(|f| f.iter().min().copied())
            .unwrap_or(u64::MAX)
    }

    fn observe(&mut self) -> Result<(), SourceError> {
        let complete = self.complete();
        if complete > self.completed {
            self.completed = complete;
            self.source.complete_below(complete)?;
        }
        while self.closed_at.front().is_some_and(|(e, _)| *e < complete) {
            self.closed_at.pop_front();
        }
        let age = self
            .closed_at
            .front()
            .map_or(0.0, |(_, at)| at.elapsed().as_secs_f64());
        self.lag.observe(self.epoch, complete.min(self.epoch), age);
        Ok(())
    }

    fn close_epoch(&mut self) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        self.source.epoch_closed(self.epoch);
        self.closed_at.push_back((self.epoch, Instant::now()));
        self.epoch += 1;
        self.in_epoch = 0;
        self.epoch_opened = None;
        input.advance_to(self.epoch);
    }

    /// Reads and sends what backpressure and the rate allow; returns
    /// whether this runner still has input to send.
    fn pump(&mut self, stop: &AtomicBool) -> Result<bool, SourceError> {
        if self.exhausted() {
            return Ok(false);
        }
        if stop.load(Ordering::Relaxed) {
            self.finish();
            return Ok(false);
        }
        let in_flight = self.epoch.saturating_sub(self.complete().min(self.epoch));
        if in_flight >= self.spec.max_epochs_in_flight.max(1) {
            return Ok(true);
        }
        let mut room = (self.spec.epoch_events - self.in_epoch).min(BATCH as u64) as usize;
        if let Some(rate) = self.rate {
            let due = (self.started.elapsed().as_secs_f64() * rate) as u64 + 1;
            room = room.min(due.saturating_sub(self.read) as usize);
            if room == 0 {
                return Ok(true);
            }
        }
        let mut batch = Vec::with_capacity(room);
        let more = self.source.fill(room, &mut batch)?;
        if !batch.is_empty() {
            self.epoch_opened.get_or_insert_with(Instant::now);
        }
        self.read += batch.len() as u64;
        self.in_epoch += batch.len() as u64;
        self.read_counter.inc_by(batch.len() as u64);
        let Some(input) = self.input.as_mut() else {
            return Ok(false);
        };
        input.send_batch(&mut batch);
        let timed_out = self
            .epoch_opened
            .is_some_and(|at| at.elapsed() >= Duration::from_millis(self.spec.epoch_ms));
        if self.in_epoch >= self.spec.epoch_events || timed_out {
            self.close_epoch();
        }
        if !more {
            self.finish();
        }
        Ok(more)
    }

    /// Whether the input is closed (read to the end, stopped or failed).
    fn exhausted(&self) -> bool {
        self.input.is_none()
    }

    fn finish(&mut self) {
        if let Some(input) = self.input.take() {
            let last = *input.time();
            self.source.epoch_closed(last);
            self.closed_at.push_back((last, Instant::now()));
            self.epoch = last + 1;
            input.close();
        }
    }
}

/// A sink operator on worker 0: writes each record's line, flushes when its
/// input frontier moves (an epoch complete here is on disk).
fn write_lines<D: timely::ExchangeData>(
    stream: StreamVec<'_, u64, D>,
    name: &str,
    writer: Rc<RefCell<Option<LineWriter>>>,
    errors: Rc<RefCell<Option<String>>>,
    line: impl Fn(D) -> (Option<u64>, String) + 'static,
    probe: &ProbeHandle<u64>,
    counter: IntCounter,
) {
    stream
        .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Exchange::new(|_: &D| 0),
            name,
            move |_cap, _info| {
                let mut frontier_seen: Option<u64> = Some(0);
                move |(input, frontier), _output| {
                    let mut writer = writer.borrow_mut();
                    input.for_each(|_time, data| {
                        counter.inc_by(data.len() as u64);
                        for d in data.drain(..) {
                            let (key, text) = line(d);
                            let written = writer
                                .as_mut()
                                .map_or(Ok(()), |w| w.write_keyed(key, &text));
                            if let Err(e) = written {
                                errors.borrow_mut().get_or_insert(e.to_string());
                            }
                        }
                    });
                    let now = frontier.frontier().iter().min().copied();
                    if now != frontier_seen {
                        frontier_seen = now;
                        if let Some(w) = writer.as_mut()
                            && let Err(e) = w.flush()
                        {
                            errors.borrow_mut().get_or_insert(e.to_string());
                        }
                    }
                }
            },
        )
        .probe_with(probe);
}

fn build(
    worker: &mut Worker,
    spec: &PipelineSpec,
    metrics: &DataflowMetrics,
    errors: &Rc<RefCell<Option<String>>>,
) -> Runner {
    let index = worker.index();
    let peers = worker.peers();
    // Every worker must build the same dataflows in the same order, so a
    // source or sink that cannot be opened is recorded as the run's error
    // and replaced by nothing, rather than returned before building.
    let failed = |e: String| {
        errors.borrow_mut().get_or_insert(e);
    };
    let source = super::open_source(&spec.source, &spec.name, index, peers).unwrap_or_else(|e| {
        failed(e.to_string());
        Box::new(source::Empty)
    });
    let (sink, dead) = if index == 0 {
        (
            LineWriter::open(&spec.sink)
                .map_err(|e| failed(e.to_string()))
                .ok(),
            LineWriter::file(&spec.dead_letter)
                .map_err(|e| failed(e.to_string()))
                .ok(),
        )
    } else {
        (None, None)
    };
    let sink = Rc::new(RefCell::new(sink));
    let dead = Rc::new(RefCell::new(dead));
    let totals: Totals = Rc::new(RefCell::new([0; 6]));
    let tally = Rc::new(RefCell::new(LearnerTally::default()));
    let snapshots = Rc::new(RefCell::new(match (&spec.learner, index) {
        (
            Some(LearnerSpec {
                snapshots: Some(path),
                ..
            }),
            0,
        ) => LineWriter::file(path)
            .map_err(|e| failed(e.to_string()))
            .ok(),
        _ => None,
    }));
    let match_tally = Rc::new(RefCell::new(MatchTally::default()));
    let dispatch_sink = Rc::new(RefCell::new(match (&spec.matching, index) {
        (Some(m), 0) => LineWriter::open(&m.dispatches)
            .map_err(|e| failed(e.to_string()))
            .ok(),
        _ => None,
    }));
    let mut input = InputHandleVec::<u64, Record>::new();
    let probe = ProbeHandle::new();
    let name = spec.name.clone();
    let family = spec.family;
    let dataflow = format!("pipeline.{name}");
    let parsed_counter = metrics.records(&dataflow, "parse", index);
    let counted = metrics.records(&dataflow, "count_by_type", index);
    let sink_counter = metrics.records(&dataflow, "sink", index);
    let dead_counter = metrics.records(&dataflow, "dead_letter", index);
    let has_sink = spec.sink != super::SinkSpec::None;

    worker.dataflow::<u64, _, _>(|scope| {
        let records = scope.input_from(&mut input);
        let pipeline = name.clone();
        let parsed = records.map(move |r| {
            parsed_counter.inc();
            classify(&pipeline, family, r)
        });
        let mut parts = parsed.partition(2, |p| match p {
            Parsed::Valid(..) => (0, p),
            Parsed::Invalid(_) => (1, p),
        });
        let invalid = parts.pop().unwrap_or_else(|| unreachable!("two parts"));
        let valid = parts.pop().unwrap_or_else(|| unreachable!("two parts"));

        // Keyed exchange to the entity's owner (where later stages keep its
        // state), counted per type there; totals to worker 0 at the end.
        let gathered = Rc::clone(&totals);
        valid
            .clone()
            .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<[u64; 6]>>, _, _, _>(
                Exchange::new(|p: &Parsed| match p {
                    Parsed::Valid(key, _) => route(*key),
                    Parsed::Invalid(_) => 0,
                }),
                "CountByType",
                move |initial, _info| {
                    let mut capability = Some(initial);
                    let mut counts = [0u64; 6];
                    move |(input, frontier), output| {
                        input.for_each(|_time, data| {
                            counted.inc_by(data.len() as u64);
                            for p in data.drain(..) {
                                if let Parsed::Valid(_, e) = p {
                                    counts[Event::from(e).type_index()] += 1;
                                }
                            }
                        });
                        let Some(cap) = capability.as_mut() else {
                            return;
                        };
                        match frontier.frontier().iter().min() {
                            Some(earliest) => {
                                if cap.time() < earliest {
                                    cap.downgrade(earliest);
                                }
                            }
                            None => {
                                output.session(&*cap).give(counts);
                                capability = None;
                            }
                        }
                    }
                },
            )
            .unary::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
                Exchange::new(|_: &[u64; 6]| 0),
                "GatherTypes",
                move |_cap, _info| {
                    move |input, _output| {
                        input.for_each(|_time, data| {
                            let mut totals = gathered.borrow_mut();
                            for counts in data.drain(..) {
                                for (t, c) in totals.iter_mut().zip(counts) {
                                    *t += c;
                                }
                            }
                        });
                    }
                },
            )
            .probe_with(&probe);
        if let (Some(learner), Family::Ads) = (&spec.learner, family) {
            let config = LearnerConfig {
                p: AD_FEATURES.len(),
                params: StepParams {
                    delta: learner.delta,
                    lambda: learner.lambda,
                },
                full: learner.full,
                // The fixed effect's slots are the hashing's.
                fixed: learner.fixed.map(|f| crate::learner::FixedEffectConfig {
                    hash_bits: learner.hashing.bits(),
                    ..f
                }),
            };
            let tally = Rc::clone(&tally);
            let snapshots = Rc::clone(&snapshots);
            let errors = Rc::clone(errors);
            let pipeline = name.clone();
            let gauges = metrics.learner(&dataflow);
            let hash_bits = learner.hashing.bits();
            valid
                .clone()
                .flat_map(|p| match p {
                    Parsed::Valid(_, e) => Some(e),
                    Parsed::Invalid(_) => None,
                })
                .label_clicks(learner.hashing.clone())
                .learn(config)
                .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
                    Exchange::new(|_: &LearnerOutput| 0),
                    "LearnerTally",
                    move |_cap, _info| {
                        let mut reported = 0u64;
                        move |(input, frontier), _output| {
                            input.for_each(|cap, data| {
                                let window = cap.least().copied().unwrap_or(0);
                                let mut tally = tally.borrow_mut();
                                let mut snapshots = snapshots.borrow_mut();
                                for output in data.drain(..) {
                                    if let (Some(w), LearnerOutput::Snapshot { entity, version, theta }) =
                                        (snapshots.as_mut(), &output)
                                    {
                                        let line = serde_json::json!({
                                            "pipeline": pipeline, "window": window, "entity": entity,
                                            "version": version, "theta": theta,
                                        });
                                        if let Err(e) = w.write_line(&line.to_string()) {
                                            errors.borrow_mut().get_or_insert(e.to_string());
                                        }
                                    }
                                    if let (Some(w), LearnerOutput::FixedEffect { version, theta }) =
                                        (snapshots.as_mut(), &output)
                                    {
                                        let line = fixed_effect_line(&pipeline, window, *version, theta, hash_bits);
                                        if let Err(e) = w.write_line(&line.to_string()) {
                                            errors.borrow_mut().get_or_insert(e.to_string());
                                        }
                                    }
                                    tally.add(window, output);
                                }
                                if let Some(w) = snapshots.as_mut()
                                    && let Err(e) = w.flush()
                                {
                                    errors.borrow_mut().get_or_insert(e.to_string());
                                }
                            });
                            // Publish each window's metrics once it is complete here.
                            let tally = tally.borrow();
                            let complete = frontier.frontier().iter().min().copied().unwrap_or(u64::MAX);
                            let upto = complete.min(tally.next_window());
                            while reported < upto {
                                if let Some((auc, logloss, n)) = tally.window_metrics(reported) {
                                    if let Some(a) = auc {
                                        gauges.auc.set(a);
                                    }
                                    if let Some(l) = logloss {
                                        gauges.logloss.set(l);
                                    }
                                    gauges.examples.inc_by(n);
                                }
                                reported += 1;
                            }
                        }
                    },
                )
                .probe_with(&probe);
        }
        if let (Some(matching), Family::Dispatch) = (&spec.matching, family) {
            let events = valid.clone().flat_map(|p| match p {
                Parsed::Valid(_, e) => MatchEvent::from_event(&Event::from(e)),
                Parsed::Invalid(_) => None,
            });
            let streams = match_dispatch(events, matching.config.clone());
            let policy = matching.config.plan.policy;
            let gauges = metrics.matching(&dataflow);
            let tally = Rc::clone(&match_tally);
            streams
                .outputs
                .clone()
                .unary::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
                    Exchange::new(|_: &MatchOutput| 0),
                    "MatchTally",
                    move |_cap, _info| {
                        move |input, _output| {
                            input.for_each(|_time, data| {
                                let mut tally = tally.borrow_mut();
                                for output in data.drain(..) {
                                    if let MatchOutput::Dispatch(_) = output {
                                        gauges.dispatches.inc();
                                    }
                                    tally.add(&output);
                                }
                                gauges.served_rate.set(tally.served_rate());
                                gauges.value_states.set(tally.value_states() as i64);
                            });
                        }
                    },
                )
                .probe_with(&probe);
            write_lines(
                streams.outputs.flat_map(|o| match o {
                    MatchOutput::Dispatch(d) => Some(d),
                    MatchOutput::Window(_) | MatchOutput::Shard(_) => None,
                }),
                "Dispatches",
                Rc::clone(&dispatch_sink),
                Rc::clone(errors),
                move |d: DispatchRecord| (Some(d.request_id), d.to_line(policy)),
                &probe,
                metrics.records(&dataflow, "dispatches", index),
            );
        }
        if has_sink {
            write_lines(
                valid,
                "Sink",
                Rc::clone(&sink),
                Rc::clone(errors),
                |p: Parsed| match p {
                    Parsed::Valid(key, e) => (Some(key), Event::from(e).to_line()),
                    Parsed::Invalid(_) => (None, String::new()),
                },
                &probe,
                sink_counter,
            );
        } else {
            valid.probe_with(&probe);
        }
        write_lines(
            invalid,
            "DeadLetter",
            Rc::clone(&dead),
            Rc::clone(errors),
            |p: Parsed| match p {
                Parsed::Invalid(d) => (None, serde_json::to_string(&d).unwrap_or_default()),
                Parsed::Valid(..) => (None, String::new()),
            },
            &probe,
            dead_counter,
        );
    });

    let rate = match &spec.source {
        SourceSpec::Generator(g) => g.events_per_second.map(|r| r / peers as f64),
        SourceSpec::Kafka(k) => k.events_per_second.map(|r| r / peers as f64),
        SourceSpec::Jsonl { .. } => None,
    };
    Runner {
        spec: spec.clone(),
        input: Some(input),
        probe,
        source,
        epoch: 0,
        in_epoch: 0,
        read: 0,
        read_counter: metrics.records(&dataflow, "read", index),
        rate,
        started: Instant::now(),
        closed_at: VecDeque::new(),
        epoch_opened: None,
        completed: 0,
        lag: metrics.frontier(&dataflow, index),
        totals,
        sink,
        dead,
        tally: spec.learner.is_some().then_some(tally),
        matching: spec
            .matching
            .is_some()
            .then_some((match_tally, dispatch_sink)),
    }
}

/// Builds every pipeline on this worker and drives them until all complete.
pub fn run_pipelines(
    worker: &mut Worker,
    specs: &[PipelineSpec],
    metrics: &DataflowMetrics,
    stop: &AtomicBool,
) -> PipelinesRun {
    let errors: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
    let mut runners: Vec<Runner> = specs
        .iter()
        .map(|spec| build(worker, spec, metrics, &errors))
        .collect();
    if errors.borrow().is_some() {
        for runner in &mut runners {
            runner.finish();
        }
    }
    loop {
        let mut pending = false;
        for runner in &mut runners {
            match runner.pump(stop) {
                Ok(more) => pending |= more,
                Err(e) => {
                    errors.borrow_mut().get_or_insert(e.to_string());
                    runner.finish();
                }
            }
            if let Err(e) = runner.observe() {
                errors.borrow_mut().get_or_insert(e.to_string());
            }
        }
        if errors.borrow().is_some() {
            runners.iter_mut().for_each(Runner::finish);
        }
        let done = runners.iter().all(|r| r.exhausted() && r.probe.done());
        if done {
            break;
        }
        if pending {
            worker.step();
        } else {
            worker.step_or_park(Some(Duration::from_millis(5)));
        }
    }
    for runner in &mut runners {
        if let Err(e) = runner.observe() {
            errors.borrow_mut().get_or_insert(e.to_string());
        }
    }
    let interrupted = stop.load(Ordering::Relaxed);
    let read = runners.iter().map(|r| r.read).sum();
    let error = errors.borrow_mut().take();
    let summaries = (worker.index() == 0 && !interrupted && error.is_none()).then(|| {
        runners
            .iter()
            .map(|r| {
                let counts = *r.totals.borrow();
                let valid: u64 = counts.iter().sum();
                let dead = r.dead.borrow().as_ref().map_or(0, LineWriter::written);
                let by_type = TYPES
                    .iter()
                    .zip(counts)
                    .filter(|(name, _)| r.spec.family.types().contains(name))
                    .map(|(name, c)| ((*name).to_owned(), c))
                    .collect();
                PipelineSummary {
                    name: r.spec.name.clone(),
                    family: r.spec.family.name().to_owned(),
                    source: r.spec.source.kind().to_owned(),
                    read: valid + dead,
                    valid,
                    malformed: dead,
                    by_type,
                    sink: SinkSummary {
                        kind: r.spec.sink.kind().to_owned(),
                        written: r.sink.borrow().as_ref().map_or(0, LineWriter::written),
                    },
                    dead_letter: DeadLetterSummary {
                        path: r.spec.dead_letter.display().to_string(),
                        written: dead,
                    },
                    learner: r.tally.as_ref().map(|t| t.borrow().summary()),
                    matching: match (&r.matching, &r.spec.matching) {
                        (Some((tally, sink)), Some(m)) => Some(MatchingReport {
                            summary: tally.borrow().summary(m.config.plan.policy),
                            dispatches: SinkSummary {
                                kind: m.dispatches.kind().to_owned(),
                                written: sink.borrow().as_ref().map_or(0, LineWriter::written),
                            },
                        }),
                        _ => None,
                    },
                }
            })
            .collect()
    });
    PipelinesRun {
        summaries,
        read,
        interrupted,
        error,
    }
}

/// A fixed-effect version as a snapshots line: the dense coefficients
/// (the ads features, intercept first) under `theta` and the non-zero
/// hashed slots as `[slot, weight]` pairs under `hashed`.
fn fixed_effect_line(
    pipeline: &str,
    window: u64,
    version: u64,
    theta: &[f64],
    hash_bits: u32,
) -> serde_json::Value {
    let p = AD_FEATURES.len().min(theta.len());
    let hashed: Vec<(usize, f64)> = theta[p..]
        .iter()
        .enumerate()
        .filter(|(_, w)| **w != 0.0)
        .map(|(slot, w)| (slot, *w))
        .collect();
    serde_json::json!({
        "pipeline": pipeline, "window": window, "fixed_effect": true, "version": version,
        "theta": &theta[..p], "hash_bits": hash_bits, "hashed": hashed,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::events::parse_line;
    use crate::pipelines::source::GeneratedLines;
    use crate::pipelines::{GeneratorSpec, LearnerSpec, SinkSpec};

    fn spec(name: &str, family: Family, source: SourceSpec, dir: &Path) -> PipelineSpec {
        PipelineSpec {
            name: name.into(),
            family,
            source,
            sink: SinkSpec::Jsonl {
                path: dir.join(format!("{name}.out.jsonl")),
            },
            dead_letter: dir.join(format!("dead/{name}.jsonl")),
            epoch_events: 500,
            epoch_ms: 1000,
            max_epochs_in_flight: 2,
            learner: None,
            matching: None,
        }
    }

    fn run(workers: usize, specs: Vec<PipelineSpec>) -> Vec<PipelineSummary> {
        let metrics = DataflowMetrics::detached();
        let stop = AtomicBool::new(false);
        let guards = timely::execute(timely::Config::process(workers), move |worker| {
            run_pipelines(worker, &specs, &metrics, &stop)
        })
        .unwrap();
        let runs: Vec<PipelinesRun> = guards.join().into_iter().map(Result::unwrap).collect();
        for r in &runs {
            assert_eq!(r.error, None);
        }
        runs.into_iter().next().unwrap().summaries.unwrap()
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn both_generators_every_record_once_malformed_to_dead_letter() {
        let dir = tempfile::tempdir().unwrap();
        let generator = |family| {
            SourceSpec::Generator(GeneratorSpec {
                events: 7_001,
                malformed_fraction: 0.01,
                ..GeneratorSpec::new(family)
            })
        };
        let specs = vec![
            spec("ads", Family::Ads, generator(Family::Ads), dir.path()),
            spec(
                "dispatch",
                Family::Dispatch,
                generator(Family::Dispatch),
                dir.path(),
            ),
        ];
        let summaries = run(3, specs);
        for s in &summaries {
            assert_eq!(s.read, 7_001, "{s:?}");
            assert_eq!(s.valid + s.malformed, 7_001);
            assert_eq!(s.by_type.values().sum::<u64>(), s.valid);
            assert!((30..120).contains(&s.malformed), "{s:?}");
            let out = lines(&dir.path().join(format!("{}.out.jsonl", s.name)));
            assert_eq!(out.len() as u64, s.valid);
            assert!(out.iter().all(|l| parse_line(l).is_ok()));
            let dead = lines(&dir.path().join(format!("dead/{}.jsonl", s.name)));
            assert_eq!(dead.len() as u64, s.malformed);
            for d in &dead {
                let letter: serde_json::Value = serde_json::from_str(d).unwrap();
                assert!(
                    letter["source"]
                        .as_str()
                        .unwrap()
                        .starts_with("generator shard ")
                );
                assert!(!letter["reason"].as_str().unwrap().is_empty());
                assert!(parse_line(letter["raw"].as_str().unwrap()).is_err());
            }
        }
        assert_eq!(summaries[0].by_type.len(), 2);
        assert_eq!(summaries[1].by_type.len(), 4);
    }

    #[test]
    fn jsonl_splits_report_exact_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        let spec_lines = GeneratorSpec {
            events: 3_000,
            ..GeneratorSpec::new(Family::Ads)
        };
        let mut text: Vec<String> = GeneratedLines::new(&spec_lines, 0, 1).collect();
        // Lines 10, 1000 and 2999 go bad in three different ways; line 2000
        // is a dispatch event in the ads pipeline.
        text[9] = "{\"type\":".into();
        text[999] = text[999].replace("\"schema_version\":1", "\"schema_version\":3");
        text[1999] = r#"{"type":"driver_status","schema_version":1,"event_time":5,"driver_id":1,"location":{"lat":37.7,"lng":-122.4},"state":"idle"}"#.into();
        text[2998] = String::new();
        std::fs::write(&input, text.join("\n") + "\n").unwrap();
        let mut s = spec(
            "ads",
            Family::Ads,
            SourceSpec::Jsonl {
                path: input.clone(),
            },
            dir.path(),
        );
        s.sink = SinkSpec::None;
        let summary = &run(3, vec![s])[0];
        assert_eq!((summary.read, summary.malformed), (3_000, 4));
        assert_eq!(summary.sink.written, 0);
        let dead = lines(&dir.path().join("dead/ads.jsonl"));
        let mut got: Vec<(String, String)> = dead
            .iter()
            .map(|d| {
                let v: serde_json::Value = serde_json::from_str(d).unwrap();
                let source = v["source"].as_str().unwrap();
                let line = source.rsplit_once(':').unwrap().1.to_owned();
                (line, v["reason"].as_str().unwrap().to_owned())
            })
            .collect();
        got.sort_by_key(|(line, _)| line.parse::<u64>().unwrap());
        assert_eq!(got[0].0, "10");
        assert!(got[0].1.contains("EOF while parsing"), "{got:?}");
        assert_eq!(
            got[1],
            (
                "1000".into(),
                "schema_version 3 is not supported (this build reads 1)".into()
            )
        );
        assert_eq!(got[2].0, "2000");
        assert!(
            got[2]
                .1
                .starts_with("driver_status is not an event of the ads pipeline"),
            "{got:?}"
        );
        assert_eq!(got[3], ("2999".into(), "empty line".into()));
    }

    #[test]
    fn a_sink_only_worker_0_fails_to_open_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("dead"),
            "a file where a directory should be",
        )
        .unwrap();
        let source = SourceSpec::Generator(GeneratorSpec {
            events: 1000,
            ..GeneratorSpec::new(Family::Ads)
        });
        let s = spec("ads", Family::Ads, source, dir.path());
        let metrics = DataflowMetrics::detached();
        let stop = AtomicBool::new(false);
        let guards = timely::execute(timely::Config::process(2), move |worker| {
            run_pipelines(worker, std::slice::from_ref(&s), &metrics, &stop)
        })
        .unwrap();
        let runs: Vec<PipelinesRun> = guards.join().into_iter().map(Result::unwrap).collect();
        let error = runs[0].error.clone().unwrap();
        assert!(error.contains("dead"), "{error}");
        assert!(runs[0].summaries.is_none());
    }

    #[test]
    fn the_learner_reports_its_metrics_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        let source = SourceSpec::Generator(GeneratorSpec {
            events: 30_000,
            ..GeneratorSpec::new(Family::Ads)
        });
        let mut s = spec("ads", Family::Ads, source, dir.path());
        s.epoch_events = 5_000;
        s.sink = SinkSpec::None;
        s.learner = Some(LearnerSpec {
            delta: 0.8,
            lambda: 1.0,
            full: false,
            snapshots: Some(dir.path().join("models.jsonl")),
            fixed: Some(crate::learner::FixedEffectConfig {
                every: 2,
                history: 0,
                lambda: 1.0,
                reanchor: crate::learner::Reanchor::Shift,
                hash_bits: 12,
            }),
            hashing: crate::learner::ads::AdHashing::parse(
                &["member".into(), "placement*hour".into()],
                12,
            )
            .unwrap(),
        });
        let registry = prometheus::Registry::new();
        let metrics = DataflowMetrics::register(&registry).unwrap();
        let stop = AtomicBool::new(false);
        let guards = timely::execute(timely::Config::process(2), move |worker| {
            run_pipelines(worker, std::slice::from_ref(&s), &metrics, &stop)
        })
        .unwrap();
        let runs: Vec<PipelinesRun> = guards.join().into_iter().map(Result::unwrap).collect();
        let learner = runs[0].summaries.as_ref().unwrap()[0]
            .learner
            .clone()
            .unwrap();
        // 15,000 events per worker in windows of 5,000: 3 windows, 1 refit.
        assert_eq!(learner.windows.len(), 3);
        assert_eq!(learner.fixed_effect_refits, 1);
        assert_eq!(learner.failed, 0);
        let snapshots = lines(&dir.path().join("models.jsonl"));
        // One line per campaign update, and one per fixed-effect version.
        assert_eq!(snapshots.len() as u64, learner.updates + 1);
        let fixed: Vec<serde_json::Value> = snapshots
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["fixed_effect"] == true)
            .collect();
        assert_eq!(fixed.len(), 1);
        assert_eq!(fixed[0]["version"], 1);
        assert_eq!(
            fixed[0]["theta"].as_array().unwrap().len(),
            AD_FEATURES.len()
        );
        assert_eq!(fixed[0]["hash_bits"], 12);
        // The member and placement*hour slots learned weights.
        let hashed = fixed[0]["hashed"].as_array().unwrap();
        assert!(hashed.len() > 100, "{} hashed weights", hashed.len());
        assert!(hashed.iter().all(|pair| pair[0].as_u64().unwrap() < 4096));
        let value = |name: &str| {
            registry
                .gather()
                .iter()
                .find(|f| f.name() == name)
                .map(|f| {
                    let m = &f.get_metric()[0];
                    if name.ends_with("_total") {
                        m.get_counter().get_value()
                    } else {
                        m.get_gauge().get_value()
                    }
                })
                .unwrap()
        };
        assert_eq!(
            value("dima_learner_examples_total") as u64,
            learner.examples
        );
        let last = learner.windows.last().unwrap();
        assert!((value("dima_learner_auc") - last.auc.unwrap()).abs() < 1e-12);
        assert!((value("dima_learner_logloss") - last.logloss.unwrap()).abs() < 1e-12);
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(
            "ads",
            Family::Ads,
            SourceSpec::Jsonl {
                path: dir.path().join("nope.jsonl"),
            },
            dir.path(),
        );
        let metrics = DataflowMetrics::detached();
        let stop = AtomicBool::new(false);
        let guards = timely::execute(timely::Config::process(2), move |worker| {
            run_pipelines(worker, std::slice::from_ref(&s), &metrics, &stop)
        })
        .unwrap();
        for run in guards.join().into_iter().map(Result::unwrap) {
            let error = run.error.unwrap();
            assert!(error.contains("nope.jsonl"), "{error}");
        }
    }
}
