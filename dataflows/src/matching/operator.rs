//! The matching operator of the dispatch pipeline.
//!
//! Events are exchanged by region (the H3 cell of their location at a coarse
//! resolution) to the worker that owns the region; `trip_completed` and
//! `request_cancelled`, which carry no location, go to every worker (only
//! the one that knows the request acts on them). Each worker cuts its
//! events into batch windows of event time and, once the watermark (the
//! oldest of the newest event times that the reading workers report, minus
//! the allowed lateness) passes a window's end, matches that window with
//! [`plan`] and emits dispatches. Events that arrive after their window was
//! matched count in the next window (and as late).
//!
//! The value function is sharded by cell: every TD update travels to the
//! owner of its cell, which applies the updates of a timely epoch in a fixed
//! order and broadcasts the values that changed; a loop delivers them back
//! to the matchers one epoch later. A matcher therefore reads values that
//! miss at most the updates of the epoch in progress and of the one before
//! it (with the default epochs of 10,000 events, about 1 to 2 simulated
//! minutes of dispatch traffic).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::{Broadcast, Map, Partition};
use timely::dataflow::operators::{Capability, Concat, ConnectLoop, Feedback};

use super::batch::{DriverGrid, OpenRequest, PlanContext, Policy, plan};
use super::value::{TdSample, TdUpdate, ValueKey, ValueTable, cell_of};
use crate::events::{DriverState, Event, LatLng};
use crate::placement::route;

/// The dispatch events the matcher reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MatchEvent {
    /// `ride_request`.
    Request {
        /// Event time, ms.
        at_ms: i64,
        /// Request id.
        id: u64,
        /// Pickup.
        pickup: LatLng,
        /// Drop-off.
        dropoff: LatLng,
    },
    /// `driver_status`.
    Driver {
        /// Event time, ms.
        at_ms: i64,
        /// Driver id.
        id: u64,
        /// Where the driver is.
        location: LatLng,
        /// Whether the driver is idle (available).
        idle: bool,
    },
    /// `trip_completed`.
    Completed {
        /// Event time, ms.
        at_ms: i64,
        /// The request served.
        request: u64,
        /// The driver.
        driver: u64,
        /// What it paid.
        fare: f64,
    },
    /// `request_cancelled`.
    Cancelled {
        /// Event time, ms.
        at_ms: i64,
        /// The request.
        request: u64,
    },
    /// A worker's input has ended; no event it read is later than `at_ms`.
    /// At the end of the stream every region's matcher walks its windows
    /// up to the latest of these (the greatest event time of the stream),
    /// so the windows walked do not depend on how far the input frontier
    /// happened to move before the inputs closed.
    End {
        /// The greatest event time the worker read, ms.
        at_ms: i64,
    },
}

impl MatchEvent {
    /// The matcher's view of a dispatch event (`None` for ads events).
    pub fn from_event(event: &Event) -> Option<Self> {
        Some(match event {
            Event::RideRequest(r) => Self::Request {
                at_ms: r.event_time,
                id: r.request_id,
                pickup: r.pickup,
                dropoff: r.dropoff,
            },
            Event::DriverStatus(d) => Self::Driver {
                at_ms: d.event_time,
                id: d.driver_id,
                location: d.location,
                idle: d.state == DriverState::Idle,
            },
            Event::TripCompleted(t) => Self::Completed {
                at_ms: t.event_time,
                request: t.request_id,
                driver: t.driver_id,
                fare: t.fare,
            },
            Event::RequestCancelled(c) => Self::Cancelled {
                at_ms: c.event_time,
                request: c.request_id,
            },
            Event::AdImpression(_) | Event::AdClick(_) => return None,
        })
    }

    /// Event time, ms.
    pub fn at_ms(&self) -> i64 {
        match self {
            Self::Request { at_ms, .. }
            | Self::Driver { at_ms, .. }
            | Self::Completed { at_ms, .. }
            | Self::Cancelled { at_ms, .. }
            | Self::End { at_ms } => *at_ms,
        }
    }

    /// Where it happens, for events that say.
    fn location(&self) -> Option<LatLng> {
        match self {
            Self::Request { pickup, .. } => Some(*pickup),
            Self::Driver { location, .. } => Some(*location),
            Self::Completed { .. } | Self::Cancelled { .. } | Self::End { .. } => None,
        }
    }

    /// A total order within a window: time, then kind, then id.
    fn order(&self) -> (i64, u8, u64) {
        match self {
            Self::Cancelled { at_ms, request } => (*at_ms, 0, *request),
            Self::Completed { at_ms, request, .. } => (*at_ms, 1, *request),
            Self::Driver { at_ms, id, .. } => (*at_ms, 2, *id),
            Self::Request { at_ms, id, .. } => (*at_ms, 3, *id),
            Self::End { at_ms } => (*at_ms, 4, 0),
        }
    }
}

/// How the dispatch pipeline matches.
#[derive(Clone, Debug, PartialEq)]
pub struct MatchConfig {
    /// Policy, prices, window, radius, nearest-k, rider value, driving
    /// times and the value function: what each window's [`plan`] needs.
    pub plan: PlanContext,
    /// H3 resolution of the region shards.
    pub region_resolution: u8,
    /// The value function a window reads: every update of the windows that
    /// ended by the start of its value period (event time cut into periods
    /// of this length, ms; at least one window).
    pub value_sync_ms: i64,
    /// A request not matched for this long is dropped, ms.
    pub max_wait_ms: i64,
    /// A driver whose last idle status is older than this is not offered, ms.
    pub driver_stale_ms: i64,
}

impl Default for MatchConfig {
    fn default() -> Self {
        Self {
            plan: PlanContext::default(),
            region_resolution: 5,
            value_sync_ms: 60_000,
            max_wait_ms: 300_000,
            driver_stale_ms: 120_000,
        }
    }
}

/// A dispatch the matcher made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchRecord {
    /// End of the window that made it, ms.
    pub event_time: i64,
    /// The request.
    pub request_id: u64,
    /// The driver sent.
    pub driver_id: u64,
    /// Road km to the pickup.
    pub pickup_km: f64,
    /// Predicted time to the pickup, s.
    pub pickup_eta_s: f64,
    /// Predicted fare.
    pub fare: f64,
    /// How long the rider had waited, s.
    pub waited_s: f64,
}

impl DispatchRecord {
    /// The record as a `dispatch` JSON line.
    pub fn to_line(&self, policy: Policy) -> String {
        serde_json::json!({
            "type": "dispatch",
            "schema_version": crate::events::SCHEMA_VERSION,
            "event_time": self.event_time,
            "request_id": self.request_id,
            "driver_id": self.driver_id,
            "pickup_km": self.pickup_km,
            "pickup_eta_s": self.pickup_eta_s,
            "fare": self.fare,
            "waited_s": self.waited_s,
            "policy": policy.name(),
        })
        .to_string()
    }
}

/// One matched window of one worker.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    /// Worker.
    pub worker: usize,
    /// Window index (event time / window length).
    pub window: i64,
    /// Requests that arrived in it.
    pub requests: u64,
    /// Dispatches made.
    pub dispatched: u64,
    /// Requests dropped after waiting `max_wait`.
    pub expired: u64,
    /// Requests cancelled by their rider while open.
    pub cancelled: u64,
    /// Open requests offered to the solver.
    pub open: u64,
    /// Drivers offered.
    pub available: u64,
    /// Events that arrived after their window was matched (counted in the next).
    pub late: u64,
    /// Wall time of the window's matching, ms.
    pub solve_ms: f64,
}

/// A value shard's size after an epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ValueShardStats {
    /// Owner worker.
    pub worker: usize,
    /// States with a value.
    pub states: usize,
    /// Updates applied so far.
    pub updates: u64,
    /// Sum of the values in millionths, each value rounded first: integer
    /// sums add up the same however the states are spread over shards.
    pub sum_micro: i64,
}

/// What the matching dataflow emits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MatchOutput {
    /// A dispatch.
    Dispatch(DispatchRecord),
    /// A matched window.
    Window(WindowStats),
    /// A value shard after an epoch.
    Shard(ValueShardStats),
}

/// The matcher's internal output: results, and TD updates for the owners.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Matched {
    Out(MatchOutput),
    Td(TdUpdate),
}

/// The streams of the matching dataflow.
#[derive(Debug)]
pub struct MatchStreams<'scope> {
    /// Dispatches, window and shard statistics.
    pub outputs: StreamVec<'scope, u64, MatchOutput>,
    /// Every TD update, at the epoch its matcher emitted it (the epoch in
    /// which its owner applies it).
    pub updates: StreamVec<'scope, u64, TdUpdate>,
    /// Every value an owner changed, at the epoch it changed.
    pub values: StreamVec<'scope, u64, (ValueKey, f64)>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct DriverInfo {
    at: LatLng,
    idle: bool,
    seen_ms: i64,
    /// We dispatched it after its last status.
    taken: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct TripRecord {
    driver: u64,
    dispatched_ms: i64,
    dropoff: LatLng,
    pickup_km: f64,
    from: ValueKey,
    to: ValueKey,
    reward: f64,
    busy_s: f64,
}

/// The matchers of one worker, one per region it owns: what a region
/// matches does not depend on which other regions share its worker, so the
/// dispatches are the same for any number of workers.
#[derive(Debug)]
struct Regions {
    config: MatchConfig,
    worker: usize,
    by_region: BTreeMap<u64, Matcher>,
    /// The value function as this worker has received it (a new region's
    /// matcher starts from it).
    values: ValueTable,
    /// The greatest event time of the inputs that have ended ([`MatchEvent::End`]).
    end: Option<i64>,
}

impl Regions {
    fn new(config: MatchConfig, worker: usize) -> Self {
        Self {
            values: ValueTable::new(config.plan.value.alpha),
            config,
            worker,
            by_region: BTreeMap::new(),
            end: None,
        }
    }

    /// A located event to its region's matcher; the others (completions,
    /// cancellations) to every region's (only the one that knows the
    /// request acts on them).
    fn add(&mut self, event: MatchEvent) {
        if let MatchEvent::End { at_ms } = event {
            self.end = Some(self.end.map_or(at_ms, |e| e.max(at_ms)));
            return;
        }
        match event.location() {
            Some(at) => {
                let region = cell_of(at, self.config.region_resolution);
                self.by_region
                    .entry(region)
                    .or_insert_with(|| {
                        let mut m = Matcher::new(self.config.clone(), self.worker);
                        m.values = self.values.clone();
                        m
                    })
                    .add(event);
            }
            None => {
                for m in self.by_region.values_mut() {
                    m.add(event.clone());
                }
            }
        }
    }

    fn set_value(&mut self, key: ValueKey, v: f64) {
        self.values.set(key, v);
        for m in self.by_region.values_mut() {
            m.values.set(key, v);
        }
    }

    /// The earliest window some region has due by `upto`.
    fn next_due(&mut self, upto: Option<i64>) -> Option<i64> {
        let end = self.end;
        self.by_region
            .values_mut()
            .filter_map(|m| m.next_due(upto, end))
            .min()
    }

    /// Matches `window` in every region that has it due.
    fn match_window(&mut self, window: i64, upto: Option<i64>, out: &mut Vec<Matched>) {
        for m in self.by_region.values_mut() {
            if m.next_due(upto, self.end) == Some(window) {
                m.match_window(window, out);
            }
        }
    }
}

/// One region's matcher in a checkpoint (its configuration comes from the
/// manifest).
#[derive(Serialize, Deserialize)]
struct SavedMatcher {
    pending: BTreeMap<i64, Vec<MatchEvent>>,
    next_window: Option<i64>,
    open: BTreeMap<u64, OpenRequest>,
    drivers: FxHashMap<u64, DriverInfo>,
    trips: FxHashMap<u64, TripRecord>,
    values: ValueTable,
    late: u64,
}

/// The matching operator's state in a checkpoint.
#[derive(Serialize, Deserialize)]
struct SavedMatch {
    regions: BTreeMap<u64, SavedMatcher>,
    end: Option<i64>,
    values: ValueTable,
    values_due: BTreeMap<u64, Vec<(ValueKey, f64)>>,
}

impl Regions {
    /// The state as of checkpoint time `time`: events that entered at
    /// `time` or later (`entered_before` says which did not) are left out,
    /// to be read again; a region left with nothing is dropped (it would
    /// be made again, from the same values, by its next event).
    fn save(&self, entered_before: impl Fn(&MatchEvent) -> bool) -> BTreeMap<u64, SavedMatcher> {
        let mut out = BTreeMap::new();
        for (&region, m) in &self.by_region {
            let mut pending = BTreeMap::new();
            for (&window, events) in &m.pending {
                let kept: Vec<MatchEvent> = events
                    .iter()
                    .filter(|e| entered_before(e))
                    .cloned()
                    .collect();
                if !kept.is_empty() {
                    pending.insert(window, kept);
                }
            }
            if pending.is_empty()
                && m.next_window.is_none()
                && m.open.is_empty()
                && m.drivers.is_empty()
                && m.trips.is_empty()
            {
                continue;
            }
            out.insert(
                region,
                SavedMatcher {
                    pending,
                    next_window: m.next_window,
                    open: m.open.clone(),
                    drivers: m.drivers.clone(),
                    trips: m.trips.clone(),
                    values: m.values.clone(),
                    late: m.late,
                },
            );
        }
        out
    }

    fn restore(&mut self, saved: SavedMatch) -> BTreeMap<u64, Vec<(ValueKey, f64)>> {
        self.values = saved.values;
        self.end = saved.end;
        for (region, s) in saved.regions {
            let mut m = Matcher::new(self.config.clone(), self.worker);
            m.pending = s.pending;
            m.next_window = s.next_window;
            m.open = s.open;
            m.drivers = s.drivers;
            m.trips = s.trips;
            m.values = s.values;
            m.late = s.late;
            self.by_region.insert(region, m);
        }
        saved.values_due
    }
}

/// One region's matcher state.
#[derive(Debug)]
struct Matcher {
    config: MatchConfig,
    worker: usize,
    window_ms: i64,
    pending: BTreeMap<i64, Vec<MatchEvent>>,
    next_window: Option<i64>,
    open: BTreeMap<u64, OpenRequest>,
    drivers: FxHashMap<u64, DriverInfo>,
    trips: FxHashMap<u64, TripRecord>,
    values: ValueTable,
    late: u64,
}

impl Matcher {
    fn new(config: MatchConfig, worker: usize) -> Self {
        let window_ms = ((config.plan.matching.window_s * 1000.0).round() as i64).max(1);
        Self {
            values: ValueTable::new(config.plan.value.alpha),
            config,
            worker,
            window_ms,
            pending: BTreeMap::new(),
            next_window: None,
            open: BTreeMap::new(),
            drivers: FxHashMap::default(),
            trips: FxHashMap::default(),
            late: 0,
        }
    }

    fn add(&mut self, event: MatchEvent) {
        let at = event.at_ms();
        let mut window = at.div_euclid(self.window_ms);
        if let Some(next) = self.next_window
            && window < next
        {
            // Its window is already matched: it counts in the next one. The
            // input frontier makes this impossible in the pipelines (a
            // window is matched only once every event before its end is
            // in); it stays for inputs that break that promise.
            self.late += 1;
            window = next;
        }
        self.pending.entry(window).or_default().push(event);
    }

    /// The next window to match among those that end at or before `upto`
    /// (ms; every window when `None`), skipping runs of windows in which
    /// nothing can happen: nothing waits, no driver is fresh enough to be
    /// offered, no event is due (a quiet night, a replay that jumps ahead).
    /// At the end (`upto` is `None`) windows are walked up to the one of
    /// `end`, the greatest event time of the stream, when known.
    fn next_due(&mut self, upto: Option<i64>, end: Option<i64>) -> Option<i64> {
        let last = match upto {
            Some(ms) => ms.div_euclid(self.window_ms) - 1,
            None => {
                let pending = self.pending.last_key_value().map(|(w, _)| *w);
                let end = end.map(|ms| ms.div_euclid(self.window_ms));
                pending.max(end)?
            }
        };
        let mut window = self
            .next_window
            .or_else(|| self.pending.first_key_value().map(|(w, _)| *w))?;
        if !self.pending.contains_key(&window)
            && self.open.is_empty()
            && !self.anyone_available(window * self.window_ms)
        {
            // Never back: after a restore the frontier starts below the
            // windows already matched.
            window = self
                .pending
                .range(window..)
                .next()
                .map_or(last + 1, |(w, _)| *w)
                .min(last + 1)
                .max(window);
            self.next_window = Some(window);
        }
        (window <= last).then_some(window)
    }

    /// Matches `window` (the one [`next_due`](Self::next_due) returned).
    fn match_window(&mut self, window: i64, out: &mut Vec<Matched>) {
        let events = self.pending.remove(&window).unwrap_or_default();
        self.window(window, events, out);
        self.next_window = Some(window + 1);
    }

    /// Matches every window that ends at or before `upto` (ms); all of them
    /// when `upto` is `None`. (Values are whatever the table holds.)
    #[cfg(test)]
    fn run(&mut self, upto: Option<i64>, out: &mut Vec<Matched>) {
        while let Some(window) = self.next_due(upto, None) {
            self.match_window(window, out);
        }
    }

    /// Whether some driver could be offered at `now` (ms).
    fn anyone_available(&self, now: i64) -> bool {
        let stale = self.config.driver_stale_ms;
        self.drivers
            .values()
            .any(|d| d.idle && !d.taken && now - d.seen_ms <= stale)
    }

    fn window(&mut self, window: i64, mut events: Vec<MatchEvent>, out: &mut Vec<Matched>) {
        let started = std::time::Instant::now();
        let now = (window + 1) * self.window_ms;
        let mut stats = WindowStats {
            worker: self.worker,
            window,
            late: std::mem::take(&mut self.late),
            ..WindowStats::default()
        };
        events.sort_by_key(MatchEvent::order);
        for event in events {
            match event {
                MatchEvent::Request {
                    at_ms,
                    id,
                    pickup,
                    dropoff,
                } => {
                    stats.requests += 1;
                    self.open.insert(
                        id,
                        OpenRequest {
                            id,
                            at_ms,
                            pickup,
                            dropoff,
                        },
                    );
                }
                MatchEvent::Driver {
                    at_ms,
                    id,
                    location,
                    idle,
                } => {
                    let info = self.drivers.entry(id).or_insert(DriverInfo {
                        at: location,
                        idle,
                        seen_ms: at_ms,
                        taken: false,
                    });
                    if at_ms >= info.seen_ms {
                        *info = DriverInfo {
                            at: location,
                            idle,
                            seen_ms: at_ms,
                            taken: false,
                        };
                    }
                }
                MatchEvent::Completed {
                    at_ms,
                    request,
                    driver,
                    fare,
                } => {
                    if let Some(trip) = self.trips.remove(&request)
                        && trip.driver == driver
                    {
                        // TD on completion, as in the simulator: the surprise
                        // in reward, time and drop-off state.
                        let elapsed_s = (at_ms - trip.dispatched_ms) as f64 / 1000.0;
                        let landed = self.config.plan.value.key(trip.dropoff, at_ms);
                        let actual = fare
                            - self.config.plan.pricing.pickup_cost_per_km * trip.pickup_km
                            + self.config.plan.value.discount(elapsed_s) * self.values.get(landed);
                        let predicted = trip.reward
                            + self.config.plan.value.discount(trip.busy_s)
                                * self.values.get(trip.to);
                        out.push(Matched::Td(TdUpdate::Correct {
                            key: trip.from,
                            delta: actual - predicted,
                        }));
                    }
                }
                MatchEvent::End { .. } => {}
                MatchEvent::Cancelled { request, .. } => {
                    if self.open.remove(&request).is_some() {
                        stats.cancelled += 1;
                    }
                }
            }
        }
        let before = self.open.len();
        let max_wait = self.config.max_wait_ms;
        self.open.retain(|_, r| now - r.at_ms <= max_wait);
        stats.expired = (before - self.open.len()) as u64;
        // Trips whose completion never came (lost, or served by someone
        // else) are forgotten after a day.
        self.trips
            .retain(|_, t| now - t.dispatched_ms <= 86_400_000);

        let stale = self.config.driver_stale_ms;
        let mut grid = DriverGrid::new(self.config.plan.matching.radius_km);
        // Insertion order does not matter: queries order by distance and id.
        for (id, d) in self
            .drivers
            .iter()
            .filter(|(_, d)| d.idle && !d.taken && now - d.seen_ms <= stale)
        {
            grid.insert(*id, d.at);
        }
        stats.available = grid.len() as u64;
        stats.open = self.open.len() as u64;
        if !self.open.is_empty() && !grid.is_empty() {
            let requests: Vec<OpenRequest> = self.open.values().copied().collect();
            let values = &self.values;
            let planned = plan(&self.config.plan, now, &requests, &grid, &|k| values.get(k));
            for p in planned {
                let request = requests[p.request];
                self.open.remove(&request.id);
                grid.remove(p.driver);
                if let Some(d) = self.drivers.get_mut(&p.driver) {
                    d.taken = true;
                }
                self.trips.insert(
                    request.id,
                    TripRecord {
                        driver: p.driver,
                        dispatched_ms: now,
                        dropoff: request.dropoff,
                        pickup_km: p.pickup_km,
                        from: p.from,
                        to: p.to,
                        reward: p.reward,
                        busy_s: p.pickup_s + p.trip_s,
                    },
                );
                out.push(Matched::Td(TdUpdate::Sample(TdSample {
                    key: p.from,
                    target: p.target,
                    count: 1,
                })));
                out.push(Matched::Out(MatchOutput::Dispatch(DispatchRecord {
                    event_time: now,
                    request_id: request.id,
                    driver_id: p.driver,
                    pickup_km: p.pickup_km,
                    pickup_eta_s: p.pickup_s,
                    fare: p.fare,
                    waited_s: (now - request.at_ms) as f64 / 1000.0,
                })));
                stats.dispatched += 1;
            }
        }
        // Drivers still available waited one window: zero reward, one step.
        let idle = self.config.plan.value.idle_samples(
            grid.positions(),
            now - self.window_ms,
            self.window_ms,
            |k| self.values.get(k),
        );
        out.extend(idle.into_iter().map(|s| Matched::Td(TdUpdate::Sample(s))));
        stats.solve_ms = started.elapsed().as_secs_f64() * 1000.0;
        if stats.requests + stats.dispatched + stats.expired + stats.cancelled > 0 {
            out.push(Matched::Out(MatchOutput::Window(stats)));
        }
    }
}

/// What a pipeline's matcher did, gathered on worker 0.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MatchTally {
    windows: u64,
    requests: u64,
    dispatched: u64,
    expired: u64,
    cancelled: u64,
    late: u64,
    solve_ms: Vec<f64>,
    waits_s: Vec<f64>,
    shards: BTreeMap<usize, ValueShardStats>,
}

/// The matcher's part of a pipeline summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MatchingSummary {
    /// The policy.
    pub policy: &'static str,
    /// Windows with activity (requests, dispatches, expiries or cancellations), over all region shards.
    pub windows: u64,
    /// Ride requests seen.
    pub requests: u64,
    /// Dispatches made.
    pub dispatched: u64,
    /// dispatched / requests.
    pub served_rate: f64,
    /// Requests dropped unmatched after `max_wait_s`.
    pub expired: u64,
    /// Requests cancelled by the rider while open.
    pub cancelled: u64,
    /// Events that arrived after their window was matched.
    pub late_events: u64,
    /// Median wait from request to dispatch, s.
    pub wait_p50_s: f64,
    /// States with a learned value, over all shards.
    pub value_states: usize,
    /// TD updates applied, over all shards.
    pub td_updates: u64,
    /// Mean learned value.
    pub value_mean: f64,
    /// 99th percentile of one window's matching time, ms.
    pub window_p99_ms: f64,
}

impl MatchTally {
    /// Counts one output.
    pub fn add(&mut self, output: &MatchOutput) {
        match output {
            MatchOutput::Dispatch(d) => self.waits_s.push(d.waited_s),
            MatchOutput::Window(w) => {
                self.windows += 1;
                self.requests += w.requests;
                self.dispatched += w.dispatched;
                self.expired += w.expired;
                self.cancelled += w.cancelled;
                self.late += w.late;
                self.solve_ms.push(w.solve_ms);
            }
            MatchOutput::Shard(s) => {
                let entry = self.shards.entry(s.worker).or_default();
                if s.updates >= entry.updates {
                    *entry = s.clone();
                }
            }
        }
    }

    /// dispatched / requests (0 before any request).
    pub fn served_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.dispatched as f64 / self.requests as f64
        }
    }

    /// States with a value, over all shards.
    pub fn value_states(&self) -> usize {
        self.shards.values().map(|s| s.states).sum()
    }

    /// The summary so far.
    pub fn summary(&self, policy: Policy) -> MatchingSummary {
        let quantile = |values: &[f64], q: f64| {
            let mut sorted = values.to_vec();
            sorted.sort_by(f64::total_cmp);
            super::simulate::quantile(&sorted, q)
        };
        let states = self.value_states();
        let sum = self.shards.values().map(|s| s.sum_micro).sum::<i64>() as f64 / 1e6;
        MatchingSummary {
            policy: policy.name(),
            windows: self.windows,
            requests: self.requests,
            dispatched: self.dispatched,
            served_rate: self.served_rate(),
            expired: self.expired,
            cancelled: self.cancelled,
            late_events: self.late,
            wait_p50_s: quantile(&self.waits_s, 0.5),
            value_states: states,
            td_updates: self.shards.values().map(|s| s.updates).sum(),
            value_mean: if states == 0 {
                0.0
            } else {
                sum / states as f64
            },
            window_p99_ms: quantile(&self.solve_ms, 0.99),
        }
    }
}

/// The order in which an owner applies one epoch's updates: by state, then
/// kind, then value, so the result does not depend on arrival order.
fn apply_order(a: &TdUpdate, b: &TdUpdate) -> std::cmp::Ordering {
    let rank = |u: &TdUpdate| match u {
        TdUpdate::Sample(s) => (0u8, s.target, s.count),
        TdUpdate::Correct { delta, .. } => (1u8, *delta, 0),
    };
    let (ka, kb) = (a.key(), b.key());
    let (ra, rb) = (rank(a), rank(b));
    ka.cmp(&kb)
        .then(ra.0.cmp(&rb.0))
        .then(ra.1.total_cmp(&rb.1))
        .then(ra.2.cmp(&rb.2))
}

/// Applies one epoch's updates in [`apply_order`] and returns the changed
/// values in key order.
pub fn apply_epoch(table: &mut ValueTable, mut updates: Vec<TdUpdate>) -> Vec<(ValueKey, f64)> {
    updates.sort_by(apply_order);
    let mut changed: BTreeMap<ValueKey, f64> = BTreeMap::new();
    for u in updates {
        let v = table.update(u);
        changed.insert(u.key(), v);
    }
    changed.into_iter().collect()
}

/// The matching dataflow on a stream of dispatch events.
///
/// With checkpoints, the matcher (`matcher`: regions, open requests,
/// drivers, trips, values, values not yet applied) and the value owners
/// (`value_owner`: their tables) register their state in `states`; events
/// are timestamped at `bucket(at_ms, bucket_ms)`.
pub fn match_dispatch<'scope>(
    events: StreamVec<'scope, u64, MatchEvent>,
    config: MatchConfig,
    (states, bucket_ms): (&crate::checkpoint::States, u64),
) -> MatchStreams<'scope> {
    let scope = events.scope();
    let worker = scope.index();
    let region_resolution = config.region_resolution;
    let alpha = config.plan.value.alpha;

    // Located events to their region's owner; the rest to everyone.
    let mut parts = events.partition(2, |e: MatchEvent| (u64::from(e.location().is_none()), e));
    let unlocated = parts.pop().unwrap_or_else(|| unreachable!("two parts"));
    let located = parts.pop().unwrap_or_else(|| unreachable!("two parts"));
    let located = located.unary(
        Exchange::new(move |e: &MatchEvent| {
            route(e.location().map_or(0, |l| cell_of(l, region_resolution)))
        }),
        "ByRegion",
        |_cap, _info| {
            |input, output| {
                input.for_each(|cap, data| output.session(&cap).give_container(data));
            }
        },
    );
    let inputs = located.concat(unlocated.broadcast());

    // Window w (event time [w·L, (w+1)·L)) is matched once the input
    // frontier passes its end T: every event in it has arrived; its
    // dispatches are emitted at timestamp T. Event time is cut into value
    // periods of `value_sync_ms`; the TD updates of the windows that start
    // in the period [B, B + P) are emitted at B + P, the value owners apply
    // them once their input is complete there and send the changed values
    // back one millisecond later. A window that starts in [B, B + P) reads
    // the value function with every update of the windows that started
    // before B (on every worker) and none after: before matching it, a
    // matcher waits until every value sent back at or before B + 1 has
    // arrived and applies them in time order. The same values for any
    // number of workers, and one round trip per period, not per window.
    let (handle, fed_back) = scope.feedback::<Vec<(ValueKey, f64)>>(1);
    let window_ms = ((config.plan.matching.window_s * 1000.0).round() as i64).max(1);
    let sync_ms = config.value_sync_ms.max(window_ms);
    let matched = inputs.binary_frontier(
        fed_back,
        Pipeline,
        Pipeline,
        "Match",
        move |initial, _info| {
            let mut regions = Regions::new(config, worker);
            let mut values_due: BTreeMap<u64, Vec<(ValueKey, f64)>> = BTreeMap::new();
            if let Some(saved) = states.take::<SavedMatch>("matcher") {
                values_due = regions.restore(saved);
            }
            let state = Rc::new(RefCell::new((regions, values_due)));
            {
                let state = Rc::clone(&state);
                let bucket_ms = bucket_ms.max(1) as i64;
                states.register("matcher", move |time| {
                    let (regions, values_due) = &*state.borrow();
                    let before = |e: &MatchEvent| {
                        let at = e.at_ms().max(0);
                        ((at - at % bucket_ms) as u64) < time
                    };
                    // Values come back at a period's end + 1, before any
                    // checkpoint time that follows the period: all are kept.
                    crate::checkpoint::encode(&SavedMatch {
                        regions: regions.save(before),
                        end: regions.end,
                        values: regions.values.clone(),
                        values_due: values_due.clone(),
                    })
                });
            }
            let mut clock = Some(initial);
            move |(input, frontier), (values, values_frontier), output| {
                let (matcher, values_due) = &mut *state.borrow_mut();
                input.for_each(|_cap, data| {
                    for e in data.drain(..) {
                        matcher.add(e);
                    }
                });
                values.for_each(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    values_due.entry(time).or_default().append(data);
                });
                let Some(cap) = clock.as_mut() else {
                    return;
                };
                let lower = frontier.frontier().iter().min().copied();
                let upto = lower.map(|t| t.min(i64::MAX as u64) as i64);
                while let Some(window) = matcher.next_due(upto) {
                    let end = ((window + 1) * window_ms).max(0) as u64;
                    if *cap.time() < end {
                        cap.downgrade(&end);
                    }
                    let period = ((window * window_ms).div_euclid(sync_ms) * sync_ms).max(0) as u64;
                    if values_frontier.less_equal(&(period + 1)) {
                        // Values of the windows before this period still to come.
                        return;
                    }
                    while let Some(entry) = values_due.first_entry() {
                        if *entry.key() > period + 1 {
                            break;
                        }
                        for (key, v) in entry.remove() {
                            matcher.set_value(key, v);
                        }
                    }
                    let mut out = Vec::new();
                    matcher.match_window(window, upto, &mut out);
                    // TD updates leave at the end of the value period: the
                    // owners then apply a period at a time.
                    let (td, results): (Vec<Matched>, Vec<Matched>) =
                        out.into_iter().partition(|m| matches!(m, Matched::Td(_)));
                    output.session(&*cap).give_iterator(results.into_iter());
                    if !td.is_empty() {
                        let period_end = cap.delayed(&(period + sync_ms as u64));
                        output.session(&period_end).give_iterator(td.into_iter());
                    }
                }
                match lower {
                    None => clock = None,
                    Some(t) => {
                        if *cap.time() < t {
                            cap.downgrade(&t);
                        }
                    }
                }
            }
        },
    );
    let updates = matched.clone().flat_map(|m| match m {
        Matched::Td(u) => Some(u),
        Matched::Out(_) => None,
    });
    let results = matched.flat_map(|m| match m {
        Matched::Out(o) => Some(o),
        Matched::Td(_) => None,
    });

    // The owners of the value function.
    let owned = updates
        .clone()
        .unary_frontier::<timely::container::CapacityContainerBuilder<
            Vec<(Option<(ValueKey, f64)>, Option<ValueShardStats>)>,
        >, _, _, _>(
            Exchange::new(move |u: &TdUpdate| route(u.key().cell)),
            "ValueOwner",
            move |_initial, _info| {
                let table = states
                    .take::<ValueTable>("value_owner")
                    .unwrap_or_else(|| ValueTable::new(alpha));
                let table = Rc::new(RefCell::new(table));
                {
                    // Updates are applied once their period's end is
                    // complete; every period before a checkpoint time has
                    // ended by then, so none waits here at a checkpoint.
                    let table = Rc::clone(&table);
                    states.register("value_owner", move |_| {
                        crate::checkpoint::encode(&*table.borrow())
                    });
                }
                let mut pending: BTreeMap<u64, (Capability<u64>, Vec<TdUpdate>)> = BTreeMap::new();
                move |(input, frontier), output| {
                    let mut table = table.borrow_mut();
                    input.for_each(|cap, data| {
                        let Some(&time) = cap.least() else {
                            return;
                        };
                        if let Some((_, list)) = pending.get_mut(&time) {
                            list.append(data);
                        } else if let Some(held) = cap.retain_least(0) {
                            pending.insert(time, (held, std::mem::take(data)));
                        }
                    });
                    while let Some(entry) = pending.first_entry() {
                        if frontier.less_equal(entry.key()) {
                            break;
                        }
                        let (cap, updates) = entry.remove();
                        let changed = apply_epoch(&mut table, updates);
                        let mut session = output.session(&cap);
                        for kv in changed {
                            session.give((Some(kv), None));
                        }
                        session.give((
                            None,
                            Some(ValueShardStats {
                                worker,
                                states: table.len(),
                                updates: table.updates(),
                                sum_micro: table.sum_micro(),
                            }),
                        ));
                    }
                }
            },
        );
    let values = owned.clone().flat_map(|(kv, _)| kv);
    values.clone().broadcast().connect_loop(handle);
    let shards = owned.flat_map(|(_, s)| s.map(MatchOutput::Shard));
    MatchStreams {
        outputs: results.concat(shards),
        updates,
        values,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use timely::dataflow::InputHandleVec;
    use timely::dataflow::operators::{Input, Inspect, Probe};

    use super::*;
    use crate::events::DispatchGenerator;

    type Captured = (
        Vec<(u64, TdUpdate)>,
        Vec<(u64, ValueKey, f64)>,
        Vec<MatchOutput>,
    );

    /// Runs the matching dataflow on `workers` workers over the generator's
    /// events, `per_epoch` events an epoch, and gathers what every worker saw.
    fn run(workers: usize, events: usize, per_epoch: usize, policy: Policy) -> Captured {
        let all: Arc<Mutex<Captured>> = Arc::default();
        let sink = Arc::clone(&all);
        timely::execute(timely::Config::process(workers), move |worker| {
            let index = worker.index();
            let peers = worker.peers();
            let mut input = InputHandleVec::<u64, MatchEvent>::new();
            let probe = timely::dataflow::ProbeHandle::new();
            let sink = Arc::clone(&sink);
            worker.dataflow::<u64, _, _>(|scope| {
                let mut config = MatchConfig::default();
                config.plan.policy = policy;
                let streams = match_dispatch(
                    scope.input_from(&mut input),
                    config,
                    (&crate::checkpoint::States::off(), 1),
                );
                let (s1, s2, s3) = (Arc::clone(&sink), Arc::clone(&sink), Arc::clone(&sink));
                streams
                    .updates
                    .inspect_core(move |e| {
                        if let Ok((stamp, data)) = e {
                            let t = stamp.elements()[0];
                            s1.lock().unwrap().0.extend(data.iter().map(|u| (t, *u)));
                        }
                    })
                    .probe_with(&probe);
                streams
                    .values
                    .inspect_core(move |e| {
                        if let Ok((stamp, data)) = e {
                            let t = stamp.elements()[0];
                            s2.lock()
                                .unwrap()
                                .1
                                .extend(data.iter().map(|(k, v)| (t, *k, *v)));
                        }
                    })
                    .probe_with(&probe);
                streams
                    .outputs
                    .inspect(move |o| s3.lock().unwrap().2.push(o.clone()))
                    .probe_with(&probe);
            });
            let generator = DispatchGenerator::new(5, 300, 0.2, index as u64, peers as u64);
            // Each event at its event time (the generator is in time order),
            // as the pipelines send them.
            for (i, event) in generator.take(events / peers).enumerate() {
                if let Some(e) = MatchEvent::from_event(&event) {
                    let t = crate::features::bucket(e.at_ms().max(0) as u64, 1_000);
                    if t > *input.time() {
                        input.advance_to(t);
                    }
                    input.send(e);
                }
                if (i + 1) % (per_epoch / peers) == 0 {
                    while probe.less_than(input.time()) {
                        worker.step();
                    }
                }
            }
            input.close();
            while worker.step() {}
        })
        .unwrap();
        let mut all = all.lock().unwrap();
        std::mem::take(&mut *all)
    }

    #[test]
    fn a_gap_of_days_in_event_time_is_skipped_not_walked() {
        let mut matcher = Matcher::new(MatchConfig::default(), 0);
        let at = |lat: f64| LatLng { lat, lng: -122.41 };
        let day = 86_400_000i64;
        let t0 = crate::events::DEFAULT_START_MS;
        for (t, id) in [(t0, 1u64), (t0 + 30 * day, 2)] {
            matcher.add(MatchEvent::Driver {
                at_ms: t,
                id,
                location: at(37.78),
                idle: true,
            });
            matcher.add(MatchEvent::Request {
                at_ms: t + 500,
                id,
                pickup: at(37.781),
                dropoff: at(37.80),
            });
        }
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        matcher.run(None, &mut out);
        assert!(started.elapsed().as_secs() < 5, "walked the gap");
        let dispatched: Vec<u64> = out
            .iter()
            .filter_map(|m| match m {
                Matched::Out(MatchOutput::Dispatch(d)) => Some(d.request_id),
                _ => None,
            })
            .collect();
        assert_eq!(dispatched, [1, 2]);
    }

    #[test]
    fn sharded_values_equal_applying_every_update_in_epoch_order() {
        // The oracle: one table that applies each epoch's updates (from every
        // matcher) in the owners' order must hold exactly the values the
        // owners broadcast last.
        let (updates, values, outputs) = run(3, 30_000, 3_000, Policy::Value);
        assert!(updates.len() > 1000, "{} updates", updates.len());
        let mut by_epoch: BTreeMap<u64, Vec<TdUpdate>> = BTreeMap::new();
        for (t, u) in updates {
            by_epoch.entry(t).or_default().push(u);
        }
        let mut oracle = ValueTable::new(crate::matching::ValueParams::default().alpha);
        for (_, list) in by_epoch {
            apply_epoch(&mut oracle, list);
        }
        let mut last: BTreeMap<ValueKey, (u64, f64)> = BTreeMap::new();
        for (t, k, v) in values {
            let entry = last.entry(k).or_insert((t, v));
            if t >= entry.0 {
                *entry = (t, v);
            }
        }
        assert_eq!(last.len(), oracle.len());
        for (k, (_, v)) in &last {
            assert!(
                (oracle.get(*k) - v).abs() <= 1e-9 * v.abs().max(1.0),
                "{k:?}"
            );
        }
        // The shards' own report agrees.
        let mut shards: BTreeMap<usize, ValueShardStats> = BTreeMap::new();
        for o in &outputs {
            if let MatchOutput::Shard(s) = o {
                let e = shards.entry(s.worker).or_default();
                if s.updates >= e.updates {
                    *e = s.clone();
                }
            }
        }
        assert_eq!(
            shards.values().map(|s| s.states).sum::<usize>(),
            oracle.len()
        );
        assert_eq!(
            shards.values().map(|s| s.updates).sum::<u64>(),
            oracle.updates()
        );
    }

    #[test]
    fn every_request_is_dispatched_at_most_once_to_a_driver_within_the_radius() {
        for (workers, policy) in [
            (1, Policy::Value),
            (2, Policy::Value),
            (1, Policy::Myopic),
            (2, Policy::Myopic),
            (2, Policy::Nearest),
        ] {
            let (_, _, outputs) = run(workers, 20_000, 2_000, policy);
            let mut requests = rustc_hash::FxHashSet::default();
            let mut per_window: rustc_hash::FxHashSet<(i64, u64)> = Default::default();
            let (mut dispatched, mut windows_dispatched, mut arrived) = (0u64, 0u64, 0u64);
            for o in &outputs {
                match o {
                    MatchOutput::Dispatch(d) => {
                        dispatched += 1;
                        assert!(
                            requests.insert(d.request_id),
                            "request {} twice",
                            d.request_id
                        );
                        assert!(per_window.insert((d.event_time, d.driver_id)));
                        // Straight-line radius 2 km, 1.3 road km per km.
                        assert!(d.pickup_km <= 2.0 * 1.3 + 1e-9, "{d:?}");
                        assert!(d.waited_s >= 0.0 && d.waited_s <= 300.0 + 2.0, "{d:?}");
                    }
                    MatchOutput::Window(w) => {
                        windows_dispatched += w.dispatched;
                        arrived += w.requests;
                    }
                    MatchOutput::Shard(_) => {}
                }
            }
            assert_eq!(dispatched, windows_dispatched);
            assert!(arrived > 100, "{arrived} requests");
            assert!(
                dispatched * 5 > arrived,
                "{policy:?} on {workers}: {dispatched} of {arrived}"
            );
        }
    }
}
