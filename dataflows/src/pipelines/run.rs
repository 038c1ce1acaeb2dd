//! Building and driving the pipelines on one worker.
//!
//! Each worker reads its share of the source, parses every record, judges it
//! with its share's event-time clock ([`ShareClock`]) and sends it at its
//! event-time bucket through an unordered input whose capability follows the
//! worker's watermark (the least watermark of its shares). Refused records
//! (malformed, late, too far ahead) go to the dead-letter sink at the
//! capability's time. A worker stops reading while more than
//! `epoch_events × max_epochs_in_flight` of its records wait behind the
//! input frontier for the rest of the dataflow.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::unordered_input::UnorderedHandle;
use timely::dataflow::operators::vec::{Map, Partition, UnorderedInput};
use timely::dataflow::operators::{ActivateCapability, Concat, Probe};
use timely::dataflow::{ProbeHandle, StreamVec};
use timely::worker::Worker;

use super::sink::{DeadLetter, LineWriter};
use super::source::{self, Record, RecordSource, Resume, SourceError};
use super::{LearnerSpec, PipelineSpec, SinkSpec, SourceSpec};
use crate::checkpoint::{
    Checkpointed, Checkpointing, Coordinator, PipelineState, ShareState, States, WorkerPart, encode,
};
use crate::events::{Event, Family, TYPES, WireEvent, parse_bytes};
use crate::features::{
    AdEvent, Admission, AttributionOutput, FeatureSpec, ShareClock, bucket, learner_value,
    split_for_features,
};
use crate::learner::ads::{AD_FEATURES, LearnerTally, ad_features};
use crate::learner::{Example, Learn, LearnerConfig, LearnerOutput, StepParams};
use crate::matching::operator::{
    DispatchRecord, MatchEvent, MatchOutput, MatchTally, MatchingSummary, match_dispatch,
};
use crate::metrics::{DataflowMetrics, FrontierMetrics, PipelineMetrics};

/// Records are read from a source in batches of at most this many.
const BATCH: usize = 4096;

/// Why a record went to the dead-letter sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Refusal {
    /// Not a valid event of the pipeline (or too far in the future).
    Malformed,
    /// Behind its share's watermark.
    Late,
    /// A click that labelled no impression.
    Orphan,
}

/// A record after parsing.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Parsed {
    /// A valid event and its entity key (computed once, at parse time).
    Valid(u64, WireEvent),
    Invalid(DeadLetter, Refusal),
    /// What a worker tells worker 0 once, when its input closes.
    Counts(Closing),
}

/// A worker's valid events per type (indexed as [`TYPES`]) and, for a
/// Kafka source, the records left in its partitions beyond what it read.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Closing {
    types: [u64; 6],
    lag: Option<u64>,
    /// The greatest event time the worker read (the matcher walks its
    /// windows up to the stream's greatest at the end).
    greatest: Option<u64>,
}

impl Closing {
    fn add(&mut self, other: Closing) {
        add_types(&mut self.types, &other.types);
        if let Some(lag) = other.lag {
            self.lag = Some(self.lag.unwrap_or(0) + lag);
        }
    }
}

fn add_types(to: &mut [u64; 6], from: &[u64; 6]) {
    for (t, c) in to.iter_mut().zip(from) {
        *t += c;
    }
}

/// A valid event of `family` with its key and event time, or why not.
fn classify(
    pipeline: &str,
    family: Family,
    record: &Record,
) -> Result<(u64, WireEvent, u64), DeadLetter> {
    let reason = match parse_bytes(&record.payload) {
        Ok(event) if event.family() == family => {
            let time = event.event_time();
            if time < 0 {
                format!("event_time {time} is before 1970-01-01T00:00:00Z (the Unix epoch)")
            } else {
                return Ok((event.key(), event.into(), time as u64));
            }
        }
        Ok(event) => format!(
            "{} is not an event of the {} pipeline (expected {})",
            event.type_name(),
            family.name(),
            family.types().join(", ")
        ),
        Err(malformed) => malformed.0,
    };
    Err(DeadLetter::new(
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
    /// `generator`, `jsonl` or `kafka`.
    pub source: String,
    /// Kafka sources: records left in the topic's partitions beyond what
    /// the run read (high watermark − next offset, summed, measured when
    /// each worker's input closed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_lag_records: Option<u64>,
    /// Records read, valid or not.
    pub read: u64,
    /// Valid events (on time).
    pub valid: u64,
    /// Records sent to the dead-letter sink as malformed (unparseable, of
    /// another family, or too far ahead in event time).
    pub malformed: u64,
    /// Valid records that were late (dead-lettered, in nothing else).
    pub late: u64,
    /// Valid events per type.
    pub by_type: BTreeMap<String, u64>,
    /// Sink kind and lines written.
    pub sink: SinkSummary,
    /// Dead-letter file and lines written.
    pub dead_letter: DeadLetterSummary,
    /// Click attribution (ads pipelines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<AttributionSummary>,
    /// Labelled examples (ads pipelines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub examples: Option<SinkSummary>,
    /// Streaming features (ads pipelines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<FeatureSummary>>,
    /// What the learner did, when the pipeline has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learner: Option<crate::learner::ads::LearnerSummary>,
    /// What the dispatch matcher did, when the pipeline has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matching: Option<MatchingReport>,
}

/// The attribution part of a [`PipelineSummary`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AttributionSummary {
    /// The attribution window, s.
    pub window_s: f64,
    /// Impressions a click labelled.
    pub positives: u64,
    /// Impressions no click labelled.
    pub negatives: u64,
    /// On-time clicks that labelled no impression.
    pub orphan_clicks: u64,
}

/// One feature in a [`PipelineSummary`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FeatureSummary {
    /// Its name.
    pub name: String,
    /// Distinct key values among the events it counted.
    pub keys: u64,
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

/// What the workers said when their inputs closed, gathered on worker 0.
type Totals = Rc<RefCell<Closing>>;

/// A sink that worker 0's operators and the runner share.
type SharedWriter = Rc<RefCell<Option<LineWriter>>>;

/// Dead letters by why, counted on worker 0.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DeadCounts {
    malformed: Cell<u64>,
    late: Cell<u64>,
    orphans: Cell<u64>,
}

/// What worker 0 gathers of the ads stages.
#[derive(Debug, Default, Serialize, Deserialize)]
struct AdsReport {
    positives: u64,
    negatives: u64,
    keys: Vec<u64>,
}

/// The attribution output, fanned out in one pass.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum AdsOut {
    /// An orphan click's dead letter.
    Dead(Parsed),
    /// What worker 0 counts (and writes).
    Report(Reported),
    /// The learner's example.
    Learn(Example),
}

/// What the attribution stage sends to worker 0.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Reported {
    /// An example: its label, and its line when there is an examples sink.
    Example(bool, Option<(u64, String)>),
    /// A feature's distinct keys on one worker.
    Keys(u32, u64),
}

/// One source share as its worker sees it.
struct Share {
    clock: ShareClock,
    /// When it last read something.
    seen: Instant,
    /// Its watermark-lag gauge.
    lag: prometheus::Gauge,
    /// With checkpoints: each time a record raised the share's greatest
    /// checkpoint level (`⌈assigned time / grid⌉`), where that record
    /// starts and the greatest event time before it. A checkpoint at
    /// `c·grid + CHECKPOINT_OFFSET` resumes the share at the first mark above `c`.
    marks: BTreeMap<u64, (Resume, Option<u64>)>,
}

impl Share {
    fn new(
        time: &crate::features::EventTime,
        greatest: Option<u64>,
        lag: prometheus::Gauge,
    ) -> Self {
        Self {
            clock: ShareClock::resumed(time.watermark_delay_ms, time.max_future_ms, greatest),
            seen: Instant::now(),
            lag,
            marks: BTreeMap::new(),
        }
    }
}

struct Runner {
    spec: PipelineSpec,
    /// `None` once closed.
    input: Option<(UnorderedHandle<u64, Parsed>, ActivateCapability<u64>)>,
    probe: ProbeHandle<u64>,
    source: Box<dyn RecordSource>,
    /// Each share's clock and when it last read something.
    clocks: BTreeMap<u32, Share>,
    /// Valid records sent, by timestamp, not yet complete.
    in_flight: BTreeMap<u64, u64>,
    /// The greatest timestamp sent so far.
    sent_upto: u64,
    /// Valid events read here, per type, at complete timestamps.
    counts: [u64; 6],
    /// Valid events read here, per type, by timestamp, not yet complete.
    counts_at: BTreeMap<u64, [u64; 6]>,
    /// With checkpoints: this pipeline's operator states.
    states: States,
    /// Checkpoint times are `c·grid + CHECKPOINT_OFFSET` ([`checkpoint_grid`]).
    grid: u64,
    /// After a restore: records whose time is before this were applied
    /// before the checkpoint and are skipped.
    skip_below: u64,
    /// When the input closed: the capability's time then.
    finished_at: Option<u64>,
    /// Worker 0, during a checkpoint: holds the input frontier at its time.
    hold: Option<ActivateCapability<u64>>,
    /// Records read since the input last gave up timestamps, and when.
    since_report: u64,
    reported_at: Instant,
    read: u64,
    read_counter: IntCounter,
    rate: Option<f64>,
    started: Instant,
    /// Input timestamps given up, and when, not yet complete at the output.
    closed_at: VecDeque<(u64, Instant)>,
    /// Timestamps below this are complete and were reported to the source.
    completed: u64,
    /// The first timestamp given up (the base of the lag in buckets).
    first: Option<u64>,
    lag: FrontierMetrics,
    metrics: PipelineMetrics,
    totals: Totals,
    sink: SharedWriter,
    dead: SharedWriter,
    dead_counts: Rc<DeadCounts>,
    examples: SharedWriter,
    ads: Option<Rc<RefCell<AdsReport>>>,
    tally: Option<Rc<RefCell<LearnerTally>>>,
    /// The matcher's tally and its dispatch sink.
    matching: Option<(Rc<RefCell<MatchTally>>, SharedWriter)>,
}

/// Checkpoint times of a pipeline are `c·grid + CHECKPOINT_OFFSET`: `grid`
/// is a multiple of every window its operators cut event time into
/// (buckets, the matcher's windows and value periods), so that at a
/// checkpoint every window that ends at or before `c·grid` is complete,
/// with what it sends on one millisecond later (the matcher's value
/// function comes back at a period's end + 1), and no later window has
/// ended (windows are longer than the offset).
const CHECKPOINT_OFFSET: u64 = 2;

/// The checkpoint level of a record at time `at`: it comes after the
/// checkpoint at `c·grid + CHECKPOINT_OFFSET` iff its level exceeds `c`.
fn checkpoint_level(at: u64, grid: u64) -> u64 {
    if at < CHECKPOINT_OFFSET {
        0
    } else {
        (at - CHECKPOINT_OFFSET) / grid + 1
    }
}

fn checkpoint_grid(spec: &PipelineSpec) -> u64 {
    fn lcm(a: u64, b: u64) -> u64 {
        fn gcd(a: u64, b: u64) -> u64 {
            if b == 0 { a } else { gcd(b, a % b) }
        }
        let (a, b) = (a.max(1), b.max(1));
        (a / gcd(a, b)).saturating_mul(b)
    }
    let mut grid = spec.time.bucket_ms.max(1);
    if let Some(l) = &spec.learner {
        grid = lcm(grid, l.window_ms);
    }
    if let Some(m) = &spec.matching {
        let window_ms = ((m.config.plan.matching.window_s * 1000.0).round() as u64).max(1);
        grid = lcm(grid, window_ms);
        grid = lcm(grid, m.config.value_sync_ms.max(window_ms as i64) as u64);
    }
    grid
}

impl Runner {
    /// Worker 0 at the start of a checkpoint: holds the input frontier at
    /// the next checkpoint time and returns it (`u64::MAX` when the
    /// pipeline has finished everywhere); `None` when it cannot (its input
    /// closed while others still run: a later checkpoint will).
    fn start_hold(&mut self) -> Option<u64> {
        if self.probe.done() {
            return Some(u64::MAX);
        }
        let (_, cap) = self.input.as_ref()?;
        let level = cap
            .time()
            .saturating_sub(CHECKPOINT_OFFSET)
            .div_ceil(self.grid);
        let time = level.saturating_mul(self.grid) + CHECKPOINT_OFFSET;
        self.hold = Some(cap.delayed(&time));
        Some(time)
    }

    /// Whether every operator has applied every timestamp before `time`.
    fn ready_for(&self, time: u64) -> bool {
        if time == u64::MAX {
            self.probe.done()
        } else {
            self.complete() >= time
        }
    }

    /// This worker's state of the pipeline as of checkpoint time `time`.
    fn save(&mut self, time: u64) -> Result<PipelineState, String> {
        let level = if time == u64::MAX {
            u64::MAX
        } else {
            (time - CHECKPOINT_OFFSET) / self.grid
        };
        let shares = self
            .source
            .shares()
            .into_iter()
            .map(|share| {
                let here = self.clocks.get_mut(&share);
                let marked = here.as_ref().and_then(|s| {
                    s.marks
                        .range(level.saturating_add(1)..)
                        .next()
                        .map(|(_, m)| *m)
                });
                let (resume, greatest) = marked.unwrap_or_else(|| {
                    (
                        self.source.next_position(share),
                        here.as_ref().and_then(|s| s.clock.greatest()),
                    )
                });
                if let Some(s) = here {
                    // Later checkpoints are at higher levels.
                    s.marks = s.marks.split_off(&level.saturating_add(1));
                }
                ShareState {
                    share,
                    resume,
                    greatest,
                }
            })
            .collect();
        let mut counts = self.counts;
        for c in self.counts_at.range(..time).map(|(_, c)| c) {
            add_types(&mut counts, c);
        }
        Ok(PipelineState {
            time,
            finished: self.finished_at.is_some_and(|t| t < time),
            shares,
            counts,
            operators: self.states.save(time)?,
        })
    }

    /// Every timestamp before this is complete at every output.
    fn complete(&self) -> u64 {
        self.probe
            .with_frontier(|f| f.iter().min().copied())
            .unwrap_or(u64::MAX)
    }

    fn cap_time(&self) -> Option<u64> {
        self.input.as_ref().map(|(_, cap)| *cap.time())
    }

    fn observe(&mut self) -> Result<(), SourceError> {
        let complete = self.complete();
        if complete > self.completed {
            self.completed = complete;
            self.source.complete_below(complete)?;
            self.in_flight = self.in_flight.split_off(&complete);
            let later = self.counts_at.split_off(&complete);
            for done in std::mem::replace(&mut self.counts_at, later).into_values() {
                add_types(&mut self.counts, &done);
            }
        }
        while self.closed_at.front().is_some_and(|(t, _)| *t < complete) {
            self.closed_at.pop_front();
        }
        let age = self
            .closed_at
            .front()
            .map_or(0.0, |(_, at)| at.elapsed().as_secs_f64());
        let bucket_ms = self.spec.time.bucket_ms.max(1);
        let base = self.first.unwrap_or(0);
        let given_up = self.cap_time().unwrap_or(self.sent_upto.saturating_add(1));
        self.lag.observe(
            given_up.saturating_sub(base) / bucket_ms,
            complete.min(given_up).saturating_sub(base) / bucket_ms,
            age,
        );
        for share in self.clocks.values() {
            if let Some(greatest) = share.clock.greatest() {
                let behind = greatest.saturating_sub(complete.min(greatest));
                share.lag.set(behind as f64 / 1000.0);
            }
        }
        Ok(())
    }

    /// The worker's watermark: the least of its active shares' (`None`
    /// while a share that is neither finished nor idle has read nothing).
    /// When every share that is not finished is idle (the whole stream
    /// paused), the greatest of their watermarks: nothing holds event time
    /// back, so the windows up to what was read complete, whenever the
    /// shares went quiet relative to each other.
    fn watermark(&self) -> Option<u64> {
        let shares = self.source.shares();
        if shares.is_empty() {
            return None;
        }
        let idle = Duration::from_millis(self.spec.time.idle_ms);
        let follows = self.source.unbounded();
        let mut least: Option<u64> = None;
        let (mut active, mut idle_greatest) = (false, None::<u64>);
        for share in shares {
            if self.source.share_finished(share) {
                continue;
            }
            match self.clocks.get(&share) {
                Some(s) => {
                    if follows && s.seen.elapsed() >= idle {
                        if let Some(w) = s.clock.watermark() {
                            idle_greatest = Some(idle_greatest.map_or(w, |g| g.max(w)));
                        }
                        continue;
                    }
                    active = true;
                    let w = s.clock.watermark()?;
                    least = Some(least.map_or(w, |l| l.min(w)));
                }
                None if follows && self.started.elapsed() >= idle => {}
                None => return None,
            }
        }
        if active { least } else { idle_greatest }
    }

    /// Reads and sends what backpressure and the rate allow; returns
    /// whether this runner still has input to send.
    fn pump(&mut self, stop: &AtomicBool) -> Result<bool, SourceError> {
        let Some(cap_time) = self.cap_time() else {
            return Ok(false);
        };
        if stop.load(Ordering::Relaxed) {
            self.finish();
            return Ok(false);
        }
        let waiting: u64 = self.in_flight.range(..cap_time).map(|(_, n)| n).sum();
        let allowed = self.spec.epoch_events * self.spec.max_epochs_in_flight.max(1);
        if waiting >= allowed {
            return Ok(true);
        }
        let mut room = self.spec.epoch_events.min(BATCH as u64) as usize;
        if let Some(rate) = self.rate {
            let due = (self.started.elapsed().as_secs_f64() * rate) as u64 + 1;
            room = room.min(due.saturating_sub(self.read) as usize);
            if room == 0 {
                return Ok(true);
            }
        }
        let mut batch = Vec::with_capacity(room);
        let more = self.source.fill(room, &mut batch)?;
        let batch_len = batch.len() as u64;
        self.read += batch.len() as u64;
        self.read_counter.inc_by(batch.len() as u64);
        let time = self.spec.time;
        let now = Instant::now();
        let mut groups: BTreeMap<u64, Vec<Parsed>> = BTreeMap::new();
        let mut late = 0;
        let marking = self.states.enabled();
        for record in batch {
            let id = record.origin.share();
            let share = match self.clocks.entry(id) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Share::new(&time, None, self.metrics.watermark_lag(id)))
                }
            };
            share.seen = now;
            let before = share.clock.greatest();
            // A refused record's time: its share's watermark before it
            // (a function of the share's records, not of timing).
            let refused_at = bucket(share.clock.watermark().unwrap_or(0), time.bucket_ms);
            let (at, parsed) = match classify(&self.spec.name, self.spec.family, &record) {
                Err(dead) => (refused_at, Parsed::Invalid(dead, Refusal::Malformed)),
                Ok((key, event, t)) => {
                    let at = bucket(t, time.bucket_ms);
                    let admission = match share.clock.admit(t) {
                        Admission::OnTime if at < cap_time => Admission::AfterIdle {
                            behind_ms: cap_time.saturating_sub(t),
                        },
                        other => other,
                    };
                    match admission.reason(time.watermark_delay_ms, time.max_future_ms) {
                        None => (at, Parsed::Valid(key, event)),
                        Some(reason) => {
                            let refusal = if matches!(admission, Admission::Future { .. }) {
                                Refusal::Malformed
                            } else {
                                Refusal::Late
                            };
                            let dead = DeadLetter::new(
                                &self.spec.name,
                                &record.origin,
                                reason,
                                &record.payload,
                            );
                            (refused_at, Parsed::Invalid(dead, refusal))
                        }
                    }
                }
            };
            if marking {
                let level = checkpoint_level(at, self.grid);
                if share.marks.last_key_value().is_none_or(|(l, _)| level > *l) {
                    share.marks.insert(level, (record.resume(), before));
                }
            }
            if at < self.skip_below {
                // Applied before the checkpoint this run restored.
                continue;
            }
            let send_at = at.max(cap_time);
            match &parsed {
                Parsed::Valid(_, event) => {
                    *self.in_flight.entry(send_at).or_default() += 1;
                    self.counts_at.entry(send_at).or_default()[event.type_index()] += 1;
                }
                Parsed::Invalid(_, Refusal::Late) => late += 1,
                _ => {}
            }
            groups.entry(send_at).or_default().push(parsed);
        }
        self.metrics.late.inc_by(late);
        // A worker reports progress (gives up timestamps) once per
        // `epoch_events` records or `epoch_ms`, whichever comes first, and
        // at the end.
        self.since_report += batch_len;
        let report = self.since_report >= self.spec.epoch_events
            || self.reported_at.elapsed() >= Duration::from_millis(self.spec.epoch_ms)
            || !more;
        let watermark = if report { self.watermark() } else { None };
        let Some((handle, cap)) = self.input.as_mut() else {
            return Ok(false);
        };
        {
            let mut active = handle.activate();
            for (t, mut group) in groups {
                self.sent_upto = self.sent_upto.max(t);
                active.session(&cap.delayed(&t)).give_container(&mut group);
            }
        }
        if let Some(w) = watermark {
            self.since_report = 0;
            self.reported_at = now;
            let next = bucket(w, time.bucket_ms);
            if next > *cap.time() {
                self.closed_at.push_back((*cap.time(), now));
                self.first.get_or_insert(next);
                cap.downgrade(&next);
            }
        }
        self.source.epoch_closed(self.sent_upto.max(*cap.time()));
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
        if let Some((mut handle, cap)) = self.input.take() {
            let mut types = self.counts;
            for counts in self.counts_at.values() {
                add_types(&mut types, counts);
            }
            let closing = Closing {
                types,
                lag: self.source.final_lag(),
                greatest: self
                    .clocks
                    .values()
                    .filter_map(|s| s.clock.greatest())
                    .max(),
            };
            self.finished_at = Some(*cap.time());
            handle
                .activate()
                .session(&cap)
                .give(Parsed::Counts(closing));
            self.closed_at.push_back((*cap.time(), Instant::now()));
            self.source.epoch_closed(self.sent_upto.max(*cap.time()));
        }
    }
}

/// Lines waiting for their timestamp to complete, by timestamp.
type Held = BTreeMap<u64, Vec<(Option<u64>, String)>>;

/// Writes the held records of every timestamp before `complete` as lines
/// (`line`), each timestamp's sorted by key and text, so that a file's
/// bytes depend on the data only, not on which worker's records arrived
/// first; then flushes.
fn write_complete<D>(
    held: &mut BTreeMap<u64, Vec<D>>,
    complete: Option<u64>,
    writer: &mut Option<LineWriter>,
    errors: &RefCell<Option<String>>,
    line: &impl Fn(D) -> (Option<u64>, String),
) {
    let mut wrote = false;
    while let Some(entry) = held.first_entry() {
        if complete.is_some_and(|c| *entry.key() >= c) {
            break;
        }
        let mut lines: Vec<(Option<u64>, String)> = entry.remove().into_iter().map(line).collect();
        lines.sort_unstable();
        wrote = true;
        if let Some(w) = writer.as_mut() {
            for (key, text) in lines {
                if let Err(e) = w.write_keyed(key, &text) {
                    errors.borrow_mut().get_or_insert(e.to_string());
                }
            }
        }
    }
    if wrote
        && let Some(w) = writer.as_mut()
        && let Err(e) = w.flush()
    {
        errors.borrow_mut().get_or_insert(e.to_string());
    }
}

/// A writer in a checkpoint: its file's length and the lines it wrote.
#[derive(Serialize, Deserialize)]
struct WriterState {
    bytes: Option<u64>,
    written: u64,
}

fn writer_state(writer: &SharedWriter) -> Result<Vec<u8>, String> {
    let mut writer = writer.borrow_mut();
    let state = match writer.as_mut() {
        Some(w) => WriterState {
            bytes: w.file_len().map_err(|e| e.to_string())?,
            written: w.written(),
        },
        None => WriterState {
            bytes: None,
            written: 0,
        },
    };
    encode(&state)
}

/// Registers a sink's saver as `state`: it writes every held record before
/// the checkpoint time, then saves the writer's length.
fn register_sink<D: 'static>(
    (states, state): (&States, &str),
    held: &Rc<RefCell<BTreeMap<u64, Vec<D>>>>,
    writer: &SharedWriter,
    errors: &Rc<RefCell<Option<String>>>,
    line: impl Fn(D) -> (Option<u64>, String) + 'static,
) {
    let (held, writer, errors) = (Rc::clone(held), Rc::clone(writer), Rc::clone(errors));
    states.register(state, move |time| {
        write_complete(
            &mut held.borrow_mut(),
            Some(time),
            &mut writer.borrow_mut(),
            &errors,
            &line,
        );
        writer_state(&writer)
    });
}

/// A sink operator on worker 0: holds each timestamp's records until the
/// timestamp is complete, then writes them sorted ([`write_complete`]) and
/// flushes (a timestamp complete here is on disk). With checkpoints it
/// saves, as `state`, the file's length once every timestamp before the
/// checkpoint is written.
#[allow(clippy::too_many_arguments)]
fn write_lines<D: timely::ExchangeData>(
    stream: StreamVec<'_, u64, D>,
    name: &str,
    writer: SharedWriter,
    errors: Rc<RefCell<Option<String>>>,
    line: impl Fn(D) -> (Option<u64>, String) + 'static,
    probe: &ProbeHandle<u64>,
    counter: IntCounter,
    (states, state): (&States, &str),
) {
    let held: Rc<RefCell<BTreeMap<u64, Vec<D>>>> = Rc::default();
    let line = Rc::new(line);
    {
        let line = Rc::clone(&line);
        register_sink((states, state), &held, &writer, &errors, move |d| line(d));
    }
    stream
        .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Exchange::new(|_: &D| 0),
            name,
            move |_cap, _info| {
                move |(input, frontier), _output| {
                    let mut held = held.borrow_mut();
                    input.for_each(|cap, data| {
                        counter.inc_by(data.len() as u64);
                        let Some(&time) = cap.least() else { return };
                        held.entry(time).or_default().append(data);
                    });
                    let complete = frontier.frontier().iter().min().copied();
                    write_complete(
                        &mut held,
                        complete,
                        &mut writer.borrow_mut(),
                        &errors,
                        &*line,
                    );
                }
            },
        )
        .probe_with(probe);
}

/// Opens worker 0's writer for `spec`, recording a failure; after a
/// restore, cuts it back to what the checkpoint recorded as `state`.
fn open_writer(
    spec: &SinkSpec,
    index: usize,
    failed: &dyn Fn(String),
    (states, state): (&States, &str),
) -> SharedWriter {
    let writer = match (spec, index) {
        (SinkSpec::None, _) | (_, 1..) => None,
        (spec, 0) => LineWriter::open(spec)
            .map_err(|e| failed(e.to_string()))
            .ok(),
    };
    resume_writer(writer, failed, (states, state))
}

fn resume_writer(
    mut writer: Option<LineWriter>,
    failed: &dyn Fn(String),
    (states, state): (&States, &str),
) -> SharedWriter {
    // With checkpoints, a file's lines belong to the checkpointed run: a
    // restore cuts it back to the checkpoint's length, a run that starts
    // without one (the first, or --fresh) starts it empty.
    let saved = states.take::<WriterState>(state).or_else(|| {
        states.enabled().then_some(WriterState {
            bytes: Some(0),
            written: 0,
        })
    });
    if let Some(saved) = saved
        && let Some(w) = writer.as_mut()
        && let Err(e) = w.resume(saved.bytes, saved.written)
    {
        failed(e.to_string());
    }
    Rc::new(RefCell::new(writer))
}

/// Gathers what the workers said when their inputs closed on worker 0,
/// each once its timestamp is complete.
fn gather_counts(
    counts: StreamVec<'_, u64, Closing>,
    totals: Totals,
    probe: &ProbeHandle<u64>,
    states: &States,
) {
    if let Some(saved) = states.take::<Closing>("totals") {
        *totals.borrow_mut() = saved;
    }
    let held: Rc<RefCell<BTreeMap<u64, Vec<Closing>>>> = Rc::default();
    let apply = |held: &mut BTreeMap<u64, Vec<Closing>>, totals: &Totals, complete: u64| {
        let later = held.split_off(&complete);
        for closing in std::mem::replace(held, later).into_values().flatten() {
            totals.borrow_mut().add(closing);
        }
    };
    {
        let (held, totals) = (Rc::clone(&held), Rc::clone(&totals));
        states.register("totals", move |time| {
            apply(&mut held.borrow_mut(), &totals, time);
            encode(&*totals.borrow())
        });
    }
    counts
        .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Exchange::new(|_: &Closing| 0),
            "GatherTypes",
            move |_cap, _info| {
                move |(input, frontier), _output| {
                    let mut held = held.borrow_mut();
                    input.for_each(|cap, data| {
                        let Some(&time) = cap.least() else { return };
                        held.entry(time).or_default().append(data);
                    });
                    let complete = frontier
                        .frontier()
                        .iter()
                        .min()
                        .copied()
                        .unwrap_or(u64::MAX);
                    apply(&mut held, &totals, complete);
                }
            },
        )
        .probe_with(probe);
}

/// The learner's example of an attributed impression: the context
/// features, then `ln(1 + count)` of each streaming feature it uses.
fn learner_example(
    example: &crate::features::AdExample,
    features: &[usize],
    hashing: &crate::learner::ads::AdHashing,
) -> Example {
    let i = &example.impression;
    let mut x = ad_features(i);
    x.extend(
        features
            .iter()
            .map(|&f| learner_value(example.features.get(f).copied().unwrap_or(0))),
    );
    Example {
        id: i.impression_id,
        entity: i.campaign_id,
        x,
        hashed: hashing.slots(i),
        y: if example.clicked { 1.0 } else { -1.0 },
        w: 1.0,
        offset: 0.0,
    }
}

/// Builds `spec`'s dataflow on this worker. With checkpoints, `states`
/// holds its operators' savers (and their restored states), and `saved` is
/// this worker's part of the checkpoint it restores, if any.
fn build(
    worker: &mut Worker,
    spec: &PipelineSpec,
    metrics: &DataflowMetrics,
    errors: &Rc<RefCell<Option<String>>>,
    states: States,
    saved: Option<&PipelineState>,
) -> Runner {
    let index = worker.index();
    let peers = worker.peers();
    // Every worker must build the same dataflows in the same order, so a
    // source or sink that cannot be opened is recorded as the run's error
    // and replaced by nothing, rather than returned before building.
    let failed = |e: String| {
        errors.borrow_mut().get_or_insert(e);
    };
    let kafka_metrics = metrics.kafka(&format!("pipeline.{}", spec.name));
    let mut source =
        super::open_source(&spec.source, &spec.name, index, peers, Some(kafka_metrics))
            .unwrap_or_else(|e| {
                failed(e.to_string());
                Box::new(source::Empty)
            });
    let mut clocks = BTreeMap::new();
    let dataflow = format!("pipeline.{}", spec.name);
    let pipeline_metrics = metrics.pipeline(&dataflow);
    if let Some(saved) = saved {
        for share in &saved.shares {
            if let Err(e) = source.seek(share.share, share.resume) {
                failed(e.to_string());
            }
            clocks.insert(
                share.share,
                Share::new(
                    &spec.time,
                    share.greatest,
                    pipeline_metrics.watermark_lag(share.share),
                ),
            );
        }
    }
    let sink = open_writer(&spec.sink, index, &failed, (&states, "sink.events"));
    let dead = resume_writer(
        (index == 0)
            .then(|| {
                LineWriter::file(&spec.dead_letter)
                    .map_err(|e| failed(e.to_string()))
                    .ok()
            })
            .flatten(),
        &failed,
        (&states, "sink.dead_letter"),
    );
    let examples = open_writer(&spec.examples, index, &failed, (&states, "sink.examples"));
    let totals: Totals = Rc::new(RefCell::new(Closing::default()));
    let dead_counts = Rc::new(states.take::<DeadCounts>("dead_counts").unwrap_or_default());
    let tally = Rc::new(RefCell::new(LearnerTally::default()));
    let ads_report = Rc::new(RefCell::new(AdsReport {
        keys: vec![0; spec.features.len()],
        ..AdsReport::default()
    }));
    let snapshots = resume_writer(
        match (&spec.learner, index) {
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
        },
        &failed,
        (&states, "sink.snapshots"),
    );
    if let Some(saved) = states.take::<LearnerTally>("learner_tally") {
        *tally.borrow_mut() = saved;
    }
    let snapshot_lines: Rc<RefCell<Held>> = Rc::default();
    if spec.learner.is_some() {
        // The learner's outputs reach worker 0 at their (complete) window
        // ends: every one before the checkpoint time is in.
        let tally = Rc::clone(&tally);
        states.register("learner_tally", move |_| encode(&*tally.borrow()));
        register_sink(
            (&states, "sink.snapshots"),
            &snapshot_lines,
            &snapshots,
            errors,
            |l| l,
        );
    }
    let match_tally = Rc::new(RefCell::new(MatchTally::default()));
    let dispatch_sink = match &spec.matching {
        Some(m) => open_writer(&m.dispatches, index, &failed, (&states, "sink.dispatches")),
        None => Rc::new(RefCell::new(None)),
    };
    let probe = ProbeHandle::new();
    let name = spec.name.clone();
    let family = spec.family;
    let has_sink = spec.sink != SinkSpec::None;
    let bucket_ms = spec.time.bucket_ms;

    let input = worker.dataflow::<u64, _, _>(|scope| {
        let (input, parsed) = scope.new_unordered_input::<Parsed>();
        let mut parts = parsed.partition(3, |p| match p {
            Parsed::Valid(..) => (0, p),
            Parsed::Invalid(..) => (1, p),
            Parsed::Counts(_) => (2, p),
        });
        let counts = parts.pop().unwrap_or_else(|| unreachable!("three parts"));
        let mut invalid = parts.pop().unwrap_or_else(|| unreachable!("three parts"));
        let valid = parts.pop().unwrap_or_else(|| unreachable!("three parts"));
        // Valid events are counted by type where they are read.
        let closings = counts.flat_map(|p| match p {
            Parsed::Counts(c) => Some(c),
            _ => None,
        });
        gather_counts(
            closings.clone(),
            Rc::clone(&totals),
            &probe,
            &states,
        );
        if let Some(attribution) = spec.ads_stages() {
            let events = valid.clone().flat_map(|p| match p {
                Parsed::Valid(_, WireEvent::AdImpression(i)) => Some(AdEvent::Impression(i)),
                Parsed::Valid(_, WireEvent::AdClick(c)) => Some(AdEvent::Click(c)),
                _ => None,
            });
            let features: Rc<[FeatureSpec]> = spec.features.clone().into();
            let (keyed, events) = split_for_features(events, Rc::clone(&features));
            let values = crate::features::window_counts_with(
                keyed,
                Rc::clone(&features),
                (&states, bucket_ms),
            );
            let attributed = crate::features::attribute_with(
                events,
                values,
                attribution,
                (bucket_ms, features.len()),
                &states,
            );
            // One pass over the attribution's output (each example is
            // moved, never copied for a second consumer): orphan clicks
            // become dead letters with their reason; examples are reported
            // to worker 0 (counted there, written to the examples sink with
            // the line made here) and turned into the learner's examples.
            let window_ms = attribution.window_ms;
            let pipeline = name.clone();
            let names: Vec<String> = spec.features.iter().map(|f| f.name.clone()).collect();
            let with_lines = spec.examples != SinkSpec::None;
            let examples_counter = pipeline_metrics.examples.clone();
            let to_learner = spec
                .learner
                .as_ref()
                .map(|l| (l.features.clone(), l.hashing.clone()));
            let fanned = attributed.flat_map(move |o| {
                let (first, second) = match o {
                    AttributionOutput::Orphan(click) => {
                        let reason = format!(
                            "orphan click: no on-time impression {} at or up to {window_ms} ms (attribution window_s) before its event_time {}",
                            click.impression_id, click.event_time
                        );
                        let dead = DeadLetter {
                            pipeline: pipeline.clone(),
                            source: "attribution".into(),
                            reason,
                            raw: Event::AdClick(click).to_line(),
                        };
                        (AdsOut::Dead(Parsed::Invalid(dead, Refusal::Orphan)), None)
                    }
                    AttributionOutput::Example(e) => {
                        examples_counter.inc();
                        let learn = to_learner
                            .as_ref()
                            .map(|(chosen, hashing)| AdsOut::Learn(learner_example(&e, chosen, hashing)));
                        let line = with_lines
                            .then(|| (e.impression.impression_id, e.to_line(&names)));
                        (AdsOut::Report(Reported::Example(e.clicked, line)), learn)
                    }
                    AttributionOutput::Keys { feature, distinct } => {
                        (AdsOut::Report(Reported::Keys(feature, distinct)), None)
                    }
                };
                [Some(first), second].into_iter().flatten()
            });
            let mut parts = fanned.partition(3, |o| match o {
                AdsOut::Dead(_) => (0, o),
                AdsOut::Report(_) => (1, o),
                AdsOut::Learn(_) => (2, o),
            });
            let learn = parts.pop().unwrap_or_else(|| unreachable!("three parts"));
            let reported = parts.pop().unwrap_or_else(|| unreachable!("three parts"));
            let orphans = parts.pop().unwrap_or_else(|| unreachable!("three parts"));
            invalid = invalid.concat(orphans.flat_map(|o| match o {
                AdsOut::Dead(p) => Some(p),
                _ => None,
            }));
            let reported = reported.flat_map(|o| match o {
                AdsOut::Report(r) => Some(r),
                _ => None,
            });
            let report = Rc::clone(&ads_report);
            let writer = Rc::clone(&examples);
            let errors_here = Rc::clone(errors);
            if let Some(saved) = states.take::<AdsReport>("ads_report") {
                *report.borrow_mut() = saved;
            }
            let held: Rc<RefCell<Held>> = Rc::default();
            {
                // Examples reach worker 0 at their (complete) timestamps:
                // every one before the checkpoint time is in.
                register_sink((&states, "sink.examples"), &held, &writer, errors, |l| l);
                let report = Rc::clone(&report);
                states.register("ads_report", move |_| encode(&*report.borrow()));
            }
            reported
                .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
                    Exchange::new(|_: &Reported| 0),
                    "Examples",
                    move |_cap, _info| {
                        move |(input, frontier), _output| {
                            let mut held = held.borrow_mut();
                            let mut report = report.borrow_mut();
                            input.for_each(|cap, data| {
                                let Some(&time) = cap.least() else { return };
                                for r in data.drain(..) {
                                    match r {
                                        Reported::Example(clicked, line) => {
                                            if clicked {
                                                report.positives += 1;
                                            } else {
                                                report.negatives += 1;
                                            }
                                            if let Some((key, line)) = line {
                                                held.entry(time).or_default().push((Some(key), line));
                                            }
                                        }
                                        Reported::Keys(f, n) => {
                                            if let Some(k) = report.keys.get_mut(f as usize) {
                                                *k += n;
                                            }
                                        }
                                    }
                                }
                            });
                            let complete = frontier.frontier().iter().min().copied();
                            write_complete(&mut held, complete, &mut writer.borrow_mut(), &errors_here, &|l| l);
                        }
                    },
                )
                .probe_with(&probe);
            if let Some(learner) = &spec.learner {
                let p = AD_FEATURES.len() + learner.features.len();
                let config = LearnerConfig {
                    p,
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
                    window_ms: learner.window_ms,
                };
                let examples = learn.flat_map(|o| match o {
                    AdsOut::Learn(e) => Some(e),
                    _ => None,
                });
                learner_tally(
                    examples.learn_with(config, &states),
                    LearnerReport {
                        pipeline: name.clone(),
                        window_ms: learner.window_ms,
                        hash_bits: learner.hashing.bits(),
                        dense: p,
                    },
                    Rc::clone(&tally),
                    (Rc::clone(&snapshots), Rc::clone(&snapshot_lines)),
                    Rc::clone(errors),
                    metrics.learner(&dataflow),
                    &probe,
                );
            }
        }
        if let (Some(matching), Family::Dispatch) = (&spec.matching, family) {
            let events = valid.clone().flat_map(|p| match p {
                Parsed::Valid(_, e) => MatchEvent::from_event(&Event::from(e)),
                Parsed::Invalid(..) | Parsed::Counts(_) => None,
            });
            let events = events.concat(closings.flat_map(|c| {
                c.greatest.map(|g| MatchEvent::End {
                    at_ms: g.min(i64::MAX as u64) as i64,
                })
            }));
            let streams = match_dispatch(events, matching.config.clone(), (&states, bucket_ms));
            let policy = matching.config.plan.policy;
            let gauges = metrics.matching(&dataflow);
            let tally = Rc::clone(&match_tally);
            if let Some(saved) = states.take::<MatchTally>("match_tally") {
                *tally.borrow_mut() = saved;
            }
            {
                // Outputs reach the tally only once the matcher emits them,
                // at or after their (complete) window: nothing later is in.
                let tally = Rc::clone(&tally);
                states.register("match_tally", move |_| encode(&*tally.borrow()));
            }
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
                                gauges.set_served_rate(tally.served_rate());
                                gauges.set_value_states(tally.value_states() as i64);
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
                (&states, "sink.dispatches"),
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
                    Parsed::Invalid(..) | Parsed::Counts(_) => (None, String::new()),
                },
                &probe,
                metrics.records(&dataflow, "sink", index),
                (&states, "sink.events"),
            );
        }
        let counts = Rc::clone(&dead_counts);
        let orphans_counter = pipeline_metrics.orphans.clone();
        write_lines(
            invalid,
            "DeadLetter",
            Rc::clone(&dead),
            Rc::clone(errors),
            move |p: Parsed| match p {
                Parsed::Invalid(d, why) => {
                    let cell = match why {
                        Refusal::Malformed => &counts.malformed,
                        Refusal::Late => &counts.late,
                        Refusal::Orphan => {
                            orphans_counter.inc();
                            &counts.orphans
                        }
                    };
                    cell.set(cell.get() + 1);
                    (None, serde_json::to_string(&d).unwrap_or_default())
                }
                Parsed::Valid(..) | Parsed::Counts(_) => (None, String::new()),
            },
            &probe,
            metrics.records(&dataflow, "dead_letter", index),
            (&states, "sink.dead_letter"),
        );
        // After the dead-letter sink's saver: it writes (and counts) every
        // dead letter before the checkpoint first.
        let counts = Rc::clone(&dead_counts);
        states.register("dead_counts", move |_| encode(&*counts));
        input
    });

    let rate = match &spec.source {
        SourceSpec::Generator(g) => g.events_per_second.map(|r| r / peers as f64),
        SourceSpec::Kafka(k) => k.events_per_second.map(|r| r / peers as f64),
        SourceSpec::Jsonl { .. } => None,
    };
    let mut runner = Runner {
        spec: spec.clone(),
        input: Some(input),
        probe,
        source,
        clocks,
        in_flight: BTreeMap::new(),
        sent_upto: 0,
        counts: saved.map_or([0; 6], |s| s.counts),
        counts_at: BTreeMap::new(),
        grid: checkpoint_grid(spec),
        skip_below: saved.map_or(0, |s| s.time),
        finished_at: None,
        hold: None,
        states,
        since_report: 0,
        reported_at: Instant::now(),
        read: 0,
        read_counter: metrics.records(&dataflow, "read", index),
        rate,
        started: Instant::now(),
        closed_at: VecDeque::new(),
        completed: 0,
        first: None,
        lag: metrics.frontier(&dataflow, index),
        metrics: pipeline_metrics,
        totals,
        sink,
        dead,
        dead_counts,
        examples,
        ads: spec.ads_stages().is_some().then_some(ads_report),
        tally: spec.learner.is_some().then_some(tally),
        matching: spec
            .matching
            .is_some()
            .then_some((match_tally, dispatch_sink)),
    };
    if let Some(saved) = saved {
        if saved.finished {
            // Its input had been read to the end before the checkpoint:
            // what it told worker 0 then is in the restored totals.
            runner.input = None;
        } else if let Some((_, cap)) = runner.input.as_mut() {
            // Nothing before the checkpoint time is read again (its bucket:
            // a record of that bucket is admitted, then skipped).
            let start = bucket(saved.time, spec.time.bucket_ms);
            if start > *cap.time() {
                cap.downgrade(&start);
            }
        }
    }
    runner
}

/// What the learner's tally needs to write snapshot lines.
struct LearnerReport {
    pipeline: String,
    window_ms: u64,
    hash_bits: u32,
    /// Dense features (the context features, then the streaming ones).
    dense: usize,
}

/// Gathers the learner's outputs on worker 0: snapshot lines, the tally,
/// and each window's metrics once it is complete.
#[allow(clippy::too_many_arguments)]
fn learner_tally(
    outputs: StreamVec<'_, u64, LearnerOutput>,
    report: LearnerReport,
    tally: Rc<RefCell<LearnerTally>>,
    (snapshots, held): (SharedWriter, Rc<RefCell<Held>>),
    errors: Rc<RefCell<Option<String>>>,
    gauges: crate::metrics::LearnerMetrics,
    probe: &ProbeHandle<u64>,
) {
    let span = report.window_ms.max(1);
    outputs
        .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Exchange::new(|_: &LearnerOutput| 0),
            "LearnerTally",
            move |_cap, _info| {
                let mut reported = 0u64;
                move |(input, frontier), _output| {
                    input.for_each(|cap, data| {
                        let window = cap.least().copied().unwrap_or(0) / span;
                        let mut tally = tally.borrow_mut();
                        let with_lines = snapshots.borrow().is_some();
                        let mut held = held.borrow_mut();
                        let Some(&time) = cap.least() else { return };
                        for output in data.drain(..) {
                            let key = match &output {
                                LearnerOutput::Snapshot { entity, .. } => Some(*entity),
                                _ => None,
                            };
                            let line = match (&output, with_lines) {
                                (
                                    LearnerOutput::Snapshot {
                                        entity,
                                        version,
                                        theta,
                                    },
                                    true,
                                ) => Some(serde_json::json!({
                                    "pipeline": report.pipeline, "window": window,
                                    "window_start_ms": window * span, "entity": entity,
                                    "version": version, "theta": theta,
                                })),
                                (LearnerOutput::FixedEffect { version, theta }, true) => {
                                    Some(fixed_effect_line(
                                        &report.pipeline,
                                        window,
                                        *version,
                                        theta,
                                        report.hash_bits,
                                        report.dense,
                                    ))
                                }
                                _ => None,
                            };
                            if let Some(line) = line {
                                held.entry(time).or_default().push((key, line.to_string()));
                            }
                            tally.add(window, output);
                        }
                    });
                    // Snapshot lines are written once their timestamp is
                    // complete, sorted (the file does not depend on which
                    // worker's models arrived first).
                    let complete = frontier
                        .frontier()
                        .iter()
                        .min()
                        .copied()
                        .unwrap_or(u64::MAX);
                    write_complete(
                        &mut held.borrow_mut(),
                        Some(complete),
                        &mut snapshots.borrow_mut(),
                        &errors,
                        &|l| l,
                    );
                    // Publish each window's metrics once it is complete here.
                    let tally = tally.borrow();
                    for window in tally.windows_from(reported) {
                        if window.saturating_mul(span).saturating_add(span - 1) >= complete {
                            break;
                        }
                        if let Some((auc, logloss, n)) = tally.window_metrics(window) {
                            if let Some(a) = auc {
                                gauges.set_auc(a);
                            }
                            if let Some(l) = logloss {
                                gauges.set_logloss(l);
                            }
                            gauges.examples.inc_by(n);
                        }
                        reported = window + 1;
                    }
                }
            },
        )
        .probe_with(probe);
}

/// Builds every pipeline on this worker and drives them until all complete.
pub fn run_pipelines(
    worker: &mut Worker,
    specs: &[PipelineSpec],
    metrics: &DataflowMetrics,
    stop: &AtomicBool,
) -> PipelinesRun {
    run_pipelines_with(worker, specs, metrics, stop, None)
}

/// The runners as the checkpoint protocol sees them.
struct Pipelines<'a>(&'a mut [Runner]);

impl Checkpointed for Pipelines<'_> {
    fn hold(&mut self) -> Option<Vec<u64>> {
        let mut times = Vec::with_capacity(self.0.len());
        for runner in self.0.iter_mut() {
            match runner.start_hold() {
                Some(t) => times.push(t),
                None => {
                    self.release();
                    return None;
                }
            }
        }
        Some(times)
    }

    fn release(&mut self) {
        for runner in self.0.iter_mut() {
            runner.hold = None;
        }
    }

    fn ready(&self, times: &[u64]) -> bool {
        self.0.iter().zip(times).all(|(r, &t)| r.ready_for(t))
    }

    fn save(&mut self, times: &[u64]) -> Result<WorkerPart, String> {
        let mut part = WorkerPart::default();
        for (runner, &time) in self.0.iter_mut().zip(times) {
            let state = runner
                .save(time)
                .map_err(|e| format!("pipeline {}: {e}", runner.spec.name))?;
            part.pipelines.insert(runner.spec.name.clone(), state);
        }
        Ok(part)
    }

    fn names(&self) -> Vec<String> {
        self.0.iter().map(|r| r.spec.name.clone()).collect()
    }
}

/// [`run_pipelines`], with checkpoints written (and one restored) as
/// `checkpoints` says.
pub fn run_pipelines_with(
    worker: &mut Worker,
    specs: &[PipelineSpec],
    metrics: &DataflowMetrics,
    stop: &AtomicBool,
    checkpoints: Option<&Checkpointing>,
) -> PipelinesRun {
    let errors: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
    let mut coordinator = checkpoints.and_then(|c| {
        Coordinator::new(worker, c.spec.clone())
            .map_err(|e| {
                errors.borrow_mut().get_or_insert(e.to_string());
            })
            .ok()
    });
    let part = checkpoints
        .and_then(|c| c.restore.as_ref())
        .and_then(|loaded| {
            loaded
                .part(worker.index())
                .map_err(|e| {
                    errors.borrow_mut().get_or_insert(e.to_string());
                })
                .ok()
        });
    let mut runners: Vec<Runner> = specs
        .iter()
        .map(|spec| {
            let saved = part.as_ref().and_then(|p| p.pipelines.get(&spec.name));
            let states = match (checkpoints, saved) {
                (None, _) => States::off(),
                (Some(_), None) => States::on(BTreeMap::new()),
                (Some(_), Some(s)) => States::on(s.operators.clone()),
            };
            if part.is_some() && saved.is_none() {
                errors.borrow_mut().get_or_insert(format!(
                    "the checkpoint has no state for pipeline {}",
                    spec.name
                ));
            }
            let runner = build(worker, spec, metrics, &errors, states, saved);
            if let Some(e) = runner.states.error() {
                errors
                    .borrow_mut()
                    .get_or_insert(format!("pipeline {}: restoring: {e}", spec.name));
            }
            runner
        })
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
        if let Some(c) = coordinator.as_mut() {
            if errors.borrow().is_some() || stop.load(Ordering::Relaxed) {
                c.abandon(&mut Pipelines(&mut runners));
            } else if let Err(e) = c.turn(&mut Pipelines(&mut runners)) {
                errors.borrow_mut().get_or_insert(e);
                c.abandon(&mut Pipelines(&mut runners));
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
    if let Some(c) = coordinator.as_mut() {
        c.close();
    }
    let interrupted = stop.load(Ordering::Relaxed);
    let read = runners.iter().map(|r| r.read).sum();
    let error = errors.borrow_mut().take();
    let summaries = (worker.index() == 0 && !interrupted && error.is_none())
        .then(|| runners.iter().map(Runner::summary).collect());
    PipelinesRun {
        summaries,
        read,
        interrupted,
        error,
    }
}

impl Runner {
    /// Worker 0's summary of a finished run.
    fn summary(&self) -> PipelineSummary {
        let closing = *self.totals.borrow();
        let counts = closing.types;
        let valid: u64 = counts.iter().sum();
        let dead = &self.dead_counts;
        let by_type = TYPES
            .iter()
            .zip(counts)
            .filter(|(name, _)| self.spec.family.types().contains(name))
            .map(|(name, c)| ((*name).to_owned(), c))
            .collect();
        let written = |w: &SharedWriter| w.borrow().as_ref().map_or(0, LineWriter::written);
        let ads = self.ads.as_ref().map(|r| r.borrow());
        PipelineSummary {
            name: self.spec.name.clone(),
            family: self.spec.family.name().to_owned(),
            source: self.spec.source.kind().to_owned(),
            kafka_lag_records: closing.lag,
            read: valid + dead.malformed.get() + dead.late.get(),
            valid,
            malformed: dead.malformed.get(),
            late: dead.late.get(),
            by_type,
            sink: SinkSummary {
                kind: self.spec.sink.kind().to_owned(),
                written: written(&self.sink),
            },
            dead_letter: DeadLetterSummary {
                path: self.spec.dead_letter.display().to_string(),
                written: written(&self.dead),
            },
            attribution: ads.as_ref().map(|r| AttributionSummary {
                window_s: self.spec.ads_stages().map_or(0, |a| a.window_ms) as f64 / 1000.0,
                positives: r.positives,
                negatives: r.negatives,
                orphan_clicks: dead.orphans.get(),
            }),
            examples: ads.as_ref().map(|r| SinkSummary {
                kind: self.spec.examples.kind().to_owned(),
                written: match self.spec.examples {
                    SinkSpec::None => r.positives + r.negatives,
                    _ => written(&self.examples),
                },
            }),
            features: ads.as_ref().map(|r| {
                self.spec
                    .features
                    .iter()
                    .zip(&r.keys)
                    .map(|(f, &keys)| FeatureSummary {
                        name: f.name.clone(),
                        keys,
                    })
                    .collect()
            }),
            learner: self.tally.as_ref().map(|t| t.borrow().summary()),
            matching: match (&self.matching, &self.spec.matching) {
                (Some((tally, sink)), Some(m)) => Some(MatchingReport {
                    summary: tally.borrow().summary(m.config.plan.policy),
                    dispatches: SinkSummary {
                        kind: m.dispatches.kind().to_owned(),
                        written: written(sink),
                    },
                }),
                _ => None,
            },
        }
    }
}

/// A fixed-effect version as a snapshots line: the dense coefficients
/// (the learner's features, intercept first) under `theta` and the non-zero
/// hashed slots as `[slot, weight]` pairs under `hashed`.
fn fixed_effect_line(
    pipeline: &str,
    window: u64,
    version: u64,
    theta: &[f64],
    hash_bits: u32,
    dense: usize,
) -> serde_json::Value {
    let p = dense.min(theta.len());
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
#[path = "checkpoint_tests.rs"]
mod checkpoint_tests;

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
            time: crate::features::EventTime::default(),
            attribution: None,
            features: Vec::new(),
            examples: SinkSpec::None,
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
        assert!(runs[0].summaries.is_some(), "{:?}", runs[0]);
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
            // Clicks whose impression was corrupted are orphans, also
            // dead-lettered (from the attribution stage).
            let orphans = s.attribution.as_ref().map_or(0, |a| a.orphan_clicks);
            assert_eq!(s.late, 0);
            assert_eq!(dead.len() as u64, s.malformed + orphans);
            for d in &dead {
                let letter: serde_json::Value = serde_json::from_str(d).unwrap();
                if letter["source"] == "attribution" {
                    assert!(
                        letter["reason"]
                            .as_str()
                            .unwrap()
                            .starts_with("orphan click")
                    );
                    continue;
                }
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
            features: Vec::new(),
            window_ms: 3_600_000,
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
        // About 3 simulated hours in windows of an hour; a refit every 2.
        assert!(learner.windows.len() >= 3, "{learner:?}");
        assert!(learner.fixed_effect_refits >= 1);
        assert_eq!(learner.failed, 0);
        let snapshots = lines(&dir.path().join("models.jsonl"));
        // One line per campaign update, and one per fixed-effect version.
        assert_eq!(
            snapshots.len() as u64,
            learner.updates + learner.fixed_effect_refits
        );
        let fixed: Vec<serde_json::Value> = snapshots
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["fixed_effect"] == true)
            .collect();
        assert_eq!(fixed.len() as u64, learner.fixed_effect_refits);
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
        let last_auc = learner.windows.iter().rev().find_map(|w| w.auc).unwrap();
        assert!((value("dima_learner_auc") - last_auc).abs() < 1e-12);
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
