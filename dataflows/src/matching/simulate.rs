//! The dispatch simulator behind `dima simulate`: a city on an H3 grid,
//! riders arriving as a Poisson process with a daily cycle and hot spots,
//! drivers logging on and off, travel times with noise, riders who give up
//! waiting or decline a far pickup, and a batch matcher every window that
//! uses one of the [`Policy`]s. Under `value` the matcher reads the value
//! function that the same run learns online by TD; the learning never stops
//! and nothing is trained beforehand.
//!
//! Deterministic for (scenario, policy, hours, seed): one random stream, and
//! every collection that is iterated is ordered.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::batch::{DriverGrid, OpenRequest, PlanContext, Policy, Travel, plan};
use super::scenario::Scenario;
use super::value::{TdSample, TdUpdate, ValueKey, ValueTable};
use crate::events::{
    DEFAULT_START_MS, DriverState, DriverStatus, Event, LatLng, RequestCancelled, RideRequest,
    SCHEMA_VERSION, TripCompleted,
};

const HOUR_MS: i64 = 3_600_000;

/// What a run did. The first eight fields are the interface of
/// `dima simulate --format json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimReport {
    /// The policy that matched.
    pub policy: &'static str,
    /// Requests made.
    pub requests: u64,
    /// Requests picked up.
    pub served: u64,
    /// served / requests.
    pub served_rate: f64,
    /// Median time from request to pickup of served requests, s.
    pub wait_p50_s: f64,
    /// 95th percentile of that time, s.
    pub wait_p95_s: f64,
    /// Share of online driver time spent driving to pickups or on trips.
    pub driver_utilization: f64,
    /// Fares of completed trips per online driver hour.
    pub revenue_per_driver_hour: f64,
    /// The scenario's name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Simulated hours.
    pub hours: f64,
    /// Requests cancelled after waiting past their patience.
    pub cancelled_waiting: u64,
    /// Requests whose rider declined the driver offered (pickup too far).
    pub declined: u64,
    /// Trips completed.
    pub completed: u64,
    /// Value-function states with a value.
    pub value_states: usize,
    /// TD updates applied.
    pub td_updates: u64,
    /// Mean value over those states.
    pub value_mean: f64,
    /// Served rate of the requests made in each simulated hour.
    pub hourly_served_rate: Vec<f64>,
    /// Batch windows matched.
    pub windows: u64,
    /// 99th percentile of the wall time of one window (matching and TD), ms.
    pub window_p99_ms: f64,
    /// Simulated seconds per wall-clock second.
    pub sim_seconds_per_wall_second: f64,
}

#[derive(Clone, Copy, Debug)]
struct Trip {
    request: u64,
    request_at_ms: i64,
    road_km: f64,
    dispatched_ms: i64,
    dropoff: LatLng,
    pickup_km: f64,
    trip_ms: i64,
    fare: f64,
    from: ValueKey,
    to: ValueKey,
    /// Predicted fare − pickup cost and time from dispatch to drop-off.
    reward: f64,
    busy_s: f64,
}

#[derive(Clone, Copy, Debug)]
enum State {
    Offline,
    Idle,
    Repositioning,
    EnRoute(Trip),
    OnTrip(Trip),
}

#[derive(Clone, Copy, Debug)]
struct Driver {
    at: LatLng,
    state: State,
    online_since_ms: i64,
    /// When the driver last became idle (tells a stale reposition timer).
    idle_since_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timed {
    Pickup(u32),
    Dropoff(u32),
    /// Reposition if still idle since the given time.
    Reposition(u32, i64),
    Arrive(u32),
}

#[derive(Clone, Copy, Debug)]
struct Waiting {
    request: OpenRequest,
    give_up_ms: i64,
    hour: usize,
}

/// A running simulation.
#[derive(Debug)]
pub struct Simulation {
    scenario: Scenario,
    policy: Policy,
    ctx: PlanContext,
    /// Everything but the riders: fleet, travel noise, declines.
    rng: ChaCha8Rng,
    /// The riders alone (arrivals, places, patience), so that every policy
    /// sees the same requests for one seed (common random numbers).
    demand_rng: ChaCha8Rng,
    seed: u64,
    now_ms: i64,
    start_ms: i64,
    window_ms: i64,
    next_arrival_ms: f64,
    next_request: u64,
    drivers: Vec<Driver>,
    offline: Vec<u32>,
    idle: DriverGrid,
    queue: BinaryHeap<Reverse<(i64, u64, Timed)>>,
    seq: u64,
    open: Vec<Waiting>,
    values: ValueTable,
    origins: Vec<f64>,
    destinations: Vec<f64>,
    // Tallies.
    requests: u64,
    served: u64,
    cancelled_waiting: u64,
    declined: u64,
    completed: u64,
    waits_s: Vec<f64>,
    busy_ms: i64,
    online_ms: i64,
    revenue: f64,
    hourly: Vec<(u64, u64)>,
    window_ms_wall: Vec<f64>,
    /// The city's events, when asked for ([`Simulation::with_events`]).
    events: Option<Vec<Event>>,
    started: std::time::Instant,
}

impl Simulation {
    /// A city at the scenario's start hour with every driver offline; the
    /// first window brings the scheduled share online.
    pub fn new(scenario: &Scenario, policy: Policy, seed: u64) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(seed);
        let start_ms = DEFAULT_START_MS + i64::from(scenario.city.start_hour) * HOUR_MS;
        let drivers: Vec<Driver> = (0..scenario.fleet.drivers)
            .map(|_| Driver {
                at: scenario.city.centre,
                state: State::Offline,
                online_since_ms: 0,
                idle_since_ms: 0,
            })
            .collect();
        let demand = &scenario.demand;
        let origins = std::iter::once(demand.background.origin_weight)
            .chain(demand.zones.iter().map(|z| z.origin_weight))
            .collect();
        let destinations = std::iter::once(demand.background.destination_weight)
            .chain(demand.zones.iter().map(|z| z.destination_weight))
            .collect();
        let ctx = PlanContext {
            policy,
            pricing: scenario.pricing.clone(),
            matching: scenario.matching.clone(),
            travel: Travel {
                speed_kmh: scenario.city.speed_kmh,
                detour: scenario.city.detour,
            },
            value: scenario.value.clone(),
        };
        let window_ms = ((scenario.matching.window_s * 1000.0).round() as i64).max(1);
        Self {
            offline: (0..scenario.fleet.drivers).rev().collect(),
            idle: DriverGrid::new(scenario.matching.radius_km),
            values: ValueTable::new(scenario.value.alpha),
            scenario: scenario.clone(),
            policy,
            ctx,
            rng,
            demand_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0fde_3ad5),
            seed,
            now_ms: start_ms,
            start_ms,
            window_ms,
            next_arrival_ms: start_ms as f64,
            next_request: 0,
            drivers,
            queue: BinaryHeap::new(),
            seq: 0,
            open: Vec::new(),
            origins,
            destinations,
            requests: 0,
            served: 0,
            cancelled_waiting: 0,
            declined: 0,
            completed: 0,
            waits_s: Vec::new(),
            busy_ms: 0,
            online_ms: 0,
            revenue: 0.0,
            hourly: Vec::new(),
            window_ms_wall: Vec::new(),
            events: None,
            started: std::time::Instant::now(),
        }
    }

    /// Records the city's events (`ride_request`, `driver_status` at every
    /// change and every minute, `trip_completed`, `request_cancelled`), the
    /// stream a dispatch pipeline reads; take them with [`Self::drain_events`].
    pub fn with_events(mut self) -> Self {
        self.events = Some(Vec::new());
        self
    }

    /// The events recorded since the last call, in event-time order.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = self.events.as_mut().map(std::mem::take).unwrap_or_default();
        out.sort_by_key(Event::event_time);
        out
    }

    fn emit(&mut self, event: impl FnOnce() -> Event) {
        if let Some(events) = self.events.as_mut() {
            events.push(event());
        }
    }

    fn status(&mut self, d: u32, at: i64, state: DriverState) {
        let location = self.drivers[d as usize].at;
        self.emit(|| {
            Event::DriverStatus(DriverStatus {
                schema_version: SCHEMA_VERSION,
                event_time: at,
                driver_id: u64::from(d),
                location,
                state,
            })
        });
    }

    fn cancelled(&mut self, request: u64, at: i64, reason: &str) {
        self.emit(|| {
            Event::RequestCancelled(RequestCancelled {
                schema_version: SCHEMA_VERSION,
                event_time: at,
                request_id: request,
                rider_id: request,
                reason: reason.to_owned(),
            })
        });
    }

    /// Whether `now_ms` has passed `hours` of simulated time.
    pub fn done(&self, hours: f64) -> bool {
        self.now_ms >= self.start_ms + (hours * HOUR_MS as f64) as i64
    }

    /// Simulated time so far, s.
    pub fn elapsed_s(&self) -> f64 {
        (self.now_ms - self.start_ms) as f64 / 1000.0
    }

    /// The value function learned so far.
    pub fn values(&self) -> &ValueTable {
        &self.values
    }

    fn hour_of_day(&self, ms: i64) -> usize {
        (ms.rem_euclid(86_400_000) / HOUR_MS) as usize
    }

    fn schedule(&mut self, at_ms: i64, what: Timed) {
        self.seq += 1;
        self.queue.push(Reverse((at_ms, self.seq, what)));
    }

    /// Actual time for a predicted one: log-normal noise with mean 1.
    fn noisy_ms(&mut self, predicted_s: f64) -> i64 {
        let sigma = self.scenario.city.travel_noise;
        let z = normal(&mut self.rng);
        let factor = (sigma * z - sigma * sigma / 2.0).exp();
        (predicted_s * factor * 1000.0).round().max(1.0) as i64
    }

    /// A point from the origin (or destination) distribution, drawn from
    /// the demand stream (`riders`) or the fleet's.
    fn place(&mut self, weights_of_origins: bool, riders: bool) -> LatLng {
        let rng = if riders {
            &mut self.demand_rng
        } else {
            &mut self.rng
        };
        let weights = if weights_of_origins {
            &self.origins
        } else {
            &self.destinations
        };
        let total: f64 = weights.iter().sum();
        let mut pick = rng.random::<f64>() * total;
        let mut chosen = 0;
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                chosen = i;
                break;
            }
            pick -= w;
            chosen = i;
        }
        let city = &self.scenario.city;
        if chosen == 0 {
            return uniform_in_disk(rng, city.centre, city.radius_km);
        }
        let zone = &self.scenario.demand.zones[chosen - 1];
        let (centre, spread) = (zone.centre, zone.spread_km);
        for _ in 0..20 {
            let (dx, dy) = (normal(rng) * spread, normal(rng) * spread);
            let p = offset(centre, dx, dy);
            if crate::events::haversine_km(p, city.centre) <= city.radius_km {
                return p;
            }
        }
        centre
    }

    /// Runs one batch window and returns how many dispatches it made.
    pub fn step(&mut self) -> usize {
        let started = std::time::Instant::now();
        let now = self.now_ms;
        // Pickups and drop-offs due by now.
        while let Some(Reverse((at, _, what))) = self.queue.peek().copied() {
            if at > now {
                break;
            }
            self.queue.pop();
            match what {
                Timed::Pickup(d) => self.pick_up(d, at),
                Timed::Dropoff(d) => self.drop_off(d, at),
                Timed::Reposition(d, since) => self.reposition(d, since, at),
                Timed::Arrive(d) => self.become_idle(d, self.drivers[d as usize].at, at),
            }
        }
        if (now - self.start_ms) % 60_000 < self.window_ms {
            self.staff(now);
            if self.events.is_some() {
                // Every online driver pings its state once a minute.
                for d in 0..self.drivers.len() as u32 {
                    let state = match self.drivers[d as usize].state {
                        State::Offline => continue,
                        State::Idle => DriverState::Idle,
                        State::Repositioning | State::EnRoute(_) => DriverState::EnRoute,
                        State::OnTrip(_) => DriverState::OnTrip,
                    };
                    self.status(d, now, state);
                }
            }
        }
        self.arrivals(now);
        // Riders past their patience give up.
        let before = self.open.len();
        if self.events.is_some() {
            let gave_up: Vec<(u64, i64)> = self
                .open
                .iter()
                .filter(|w| w.give_up_ms <= now)
                .map(|w| (w.request.id, w.give_up_ms))
                .collect();
            for (id, at) in gave_up {
                self.cancelled(id, at, "no_driver");
            }
        }
        self.open.retain(|w| w.give_up_ms > now);
        self.cancelled_waiting += (before - self.open.len()) as u64;
        // Match.
        let requests: Vec<OpenRequest> = self.open.iter().map(|w| w.request).collect();
        let values = &self.values;
        let planned = plan(&self.ctx, now, &requests, &self.idle, &|k| values.get(k));
        let mut gone = vec![false; requests.len()];
        let mut matched = 0;
        for p in &planned {
            gone[p.request] = true;
            let chance = (self.scenario.demand.decline_per_km * p.pickup_km)
                .min(self.scenario.demand.decline_max);
            if self.rng.random::<f64>() < chance {
                self.declined += 1;
                self.cancelled(requests[p.request].id, now, "rider");
                continue;
            }
            matched += 1;
            let d = p.driver as u32;
            self.idle.remove(p.driver);
            let request = requests[p.request];
            let pickup_ms = self.noisy_ms(p.pickup_s);
            let trip_ms = self.noisy_ms(p.trip_s);
            let trip = Trip {
                request: request.id,
                request_at_ms: request.at_ms,
                road_km: self.ctx.travel.road_km(request.pickup, request.dropoff),
                dispatched_ms: now,
                dropoff: request.dropoff,
                pickup_km: p.pickup_km,
                trip_ms,
                fare: self.scenario.pricing.fare(
                    self.ctx.travel.road_km(request.pickup, request.dropoff),
                    trip_ms as f64 / 1000.0,
                ),
                from: p.from,
                to: p.to,
                reward: p.reward,
                busy_s: p.pickup_s + p.trip_s,
            };
            self.drivers[d as usize].state = State::EnRoute(trip);
            self.status(d, now, DriverState::EnRoute);
            self.drivers[d as usize].at = request.pickup;
            self.schedule(now + pickup_ms, Timed::Pickup(d));
            let hour = self.open[p.request].hour;
            self.hourly[hour].1 += 1;
            // TD at dispatch, with the predicted drop-off state.
            self.values.update(TdUpdate::Sample(TdSample {
                key: p.from,
                target: p.target,
                count: 1,
            }));
        }
        let mut i = 0;
        self.open.retain(|_| {
            i += 1;
            !gone[i - 1]
        });
        // Idle drivers wait one window: zero reward, one step.
        let values = &self.values;
        let idle = self
            .ctx
            .value
            .idle_samples(self.idle.positions(), now, self.window_ms, |k| {
                values.get(k)
            });
        for sample in idle {
            self.values.update(TdUpdate::Sample(sample));
        }
        let online = self.drivers.len() - self.offline.len();
        self.online_ms += online as i64 * self.window_ms;
        self.now_ms += self.window_ms;
        self.window_ms_wall
            .push(started.elapsed().as_secs_f64() * 1000.0);
        matched
    }

    fn pick_up(&mut self, d: u32, at: i64) {
        let driver = &mut self.drivers[d as usize];
        if let State::EnRoute(trip) = driver.state {
            driver.state = State::OnTrip(trip);
            self.status(d, at, DriverState::OnTrip);
            self.served += 1;
            self.waits_s.push((at - trip.request_at_ms) as f64 / 1000.0);
            self.schedule(at + trip.trip_ms, Timed::Dropoff(d));
        }
    }

    fn drop_off(&mut self, d: u32, at: i64) {
        let State::OnTrip(trip) = self.drivers[d as usize].state else {
            return;
        };
        self.completed += 1;
        self.revenue += trip.fare;
        self.emit(|| {
            Event::TripCompleted(TripCompleted {
                schema_version: SCHEMA_VERSION,
                event_time: at,
                request_id: trip.request,
                driver_id: u64::from(d),
                fare: trip.fare,
                distance_km: trip.road_km,
                duration_s: (trip.trip_ms / 1000).clamp(0, i64::from(u32::MAX)) as u32,
            })
        });
        self.busy_ms += at - trip.dispatched_ms;
        // TD on completion: correct the dispatch-time sample by what the
        // trip actually paid and took. Both sides read today's values, so
        // the correction carries the surprise in reward, time and drop-off
        // state only, never how the values moved during the trip.
        let elapsed_s = (at - trip.dispatched_ms) as f64 / 1000.0;
        let landed = self.ctx.value.key(trip.dropoff, at);
        let actual = trip.fare - self.scenario.pricing.pickup_cost_per_km * trip.pickup_km
            + self.ctx.value.discount(elapsed_s) * self.values.get(landed);
        let predicted =
            trip.reward + self.ctx.value.discount(trip.busy_s) * self.values.get(trip.to);
        self.values.update(TdUpdate::Correct {
            key: trip.from,
            delta: actual - predicted,
        });
        self.become_idle(d, trip.dropoff, at);
    }

    /// The driver waits for a dispatch at `at_pos` and, if none comes in a
    /// while, repositions.
    fn become_idle(&mut self, d: u32, at_pos: LatLng, now: i64) {
        let driver = &mut self.drivers[d as usize];
        driver.at = at_pos;
        driver.state = State::Idle;
        driver.idle_since_ms = now;
        self.idle.insert(u64::from(d), at_pos);
        self.status(d, now, DriverState::Idle);
        let mean = self.scenario.fleet.reposition_after_s;
        if mean > 0.0 {
            let wait_ms = -mean * 1000.0 * (1.0 - self.rng.random::<f64>()).ln();
            self.schedule(now + wait_ms as i64 + 1, Timed::Reposition(d, now));
        }
    }

    /// An idle driver heads to where riders usually are; unavailable until
    /// it arrives.
    fn reposition(&mut self, d: u32, since: i64, now: i64) {
        let driver = self.drivers[d as usize];
        if !matches!(driver.state, State::Idle) || driver.idle_since_ms != since {
            return;
        }
        let to = self.place(true, false);
        let seconds = self
            .ctx
            .travel
            .seconds(self.ctx.travel.road_km(driver.at, to));
        let ms = self.noisy_ms(seconds);
        self.idle.remove(u64::from(d));
        let driver = &mut self.drivers[d as usize];
        driver.state = State::Repositioning;
        driver.at = to;
        self.status(d, now, DriverState::EnRoute);
        self.schedule(now + ms, Timed::Arrive(d));
    }

    /// Brings drivers online or lets idle ones log off, towards the
    /// scheduled share for this hour.
    fn staff(&mut self, now: i64) {
        let fleet = &self.scenario.fleet;
        let target =
            (f64::from(fleet.drivers) * fleet.online[self.hour_of_day(now)]).round() as usize;
        let online = self.drivers.len() - self.offline.len();
        if online < target {
            for _ in online..target {
                if self.offline.is_empty() {
                    break;
                }
                let pick = self.rng.random_range(0..self.offline.len());
                let d = self.offline.swap_remove(pick);
                // Drivers log on where riders usually are.
                self.drivers[d as usize].online_since_ms = now;
                let at = self.place(true, false);
                self.become_idle(d, at, now);
            }
        } else if online > target {
            let min_ms = (fleet.min_shift_hours * HOUR_MS as f64) as i64;
            let mut eligible: Vec<u64> = self
                .idle
                .drivers()
                .into_iter()
                .map(|(id, _)| id)
                .filter(|id| now - self.drivers[*id as usize].online_since_ms >= min_ms)
                .collect();
            for _ in 0..(online - target).min(eligible.len()) {
                let pick = self.rng.random_range(0..eligible.len());
                let id = eligible.swap_remove(pick);
                self.idle.remove(id);
                self.drivers[id as usize].state = State::Offline;
                self.status(id as u32, now, DriverState::Offline);
                self.offline.push(id as u32);
            }
        }
    }

    /// Poisson arrivals up to now, at the hour's rate.
    fn arrivals(&mut self, now: i64) {
        // Requests made during the window that ends now.
        while self.next_arrival_ms <= now as f64 {
            let at_ms = self.next_arrival_ms as i64;
            let hour = ((at_ms - self.start_ms) / HOUR_MS) as usize;
            if self.hourly.len() <= hour {
                self.hourly.resize(hour + 1, (0, 0));
            }
            let pickup = self.place(true, true);
            let dropoff = self.place(false, true);
            let patience = -self.scenario.demand.patience_s
                * 1000.0
                * (1.0 - self.demand_rng.random::<f64>()).ln();
            self.open.push(Waiting {
                request: OpenRequest {
                    id: self.next_request,
                    at_ms,
                    pickup,
                    dropoff,
                },
                give_up_ms: at_ms + patience as i64,
                hour,
            });
            let id = self.next_request;
            self.emit(|| {
                Event::RideRequest(RideRequest {
                    schema_version: SCHEMA_VERSION,
                    event_time: at_ms,
                    request_id: id,
                    rider_id: id,
                    pickup,
                    dropoff,
                })
            });
            self.next_request += 1;
            self.requests += 1;
            self.hourly[hour].0 += 1;
            let demand = &self.scenario.demand;
            let rate_per_ms =
                demand.requests_per_hour * demand.profile[self.hour_of_day(at_ms)] / HOUR_MS as f64;
            // A zero rate this hour skips to the next hour.
            self.next_arrival_ms += if rate_per_ms > 0.0 {
                -(1.0 - self.demand_rng.random::<f64>()).ln() / rate_per_ms
            } else {
                (HOUR_MS - at_ms.rem_euclid(HOUR_MS)) as f64
            };
        }
    }

    /// Runs `hours` of simulated time and reports.
    pub fn run(mut self, hours: f64) -> SimReport {
        while !self.done(hours) {
            self.step();
        }
        self.report(hours)
    }

    /// What the run did so far (`hours` as asked, for the report).
    pub fn report(mut self, hours: f64) -> SimReport {
        let started = self.started;
        // Trips still running count their time so far as busy.
        for driver in &self.drivers {
            if let State::EnRoute(t) | State::OnTrip(t) = driver.state {
                self.busy_ms += self.now_ms - t.dispatched_ms;
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let mut waits = std::mem::take(&mut self.waits_s);
        waits.sort_by(f64::total_cmp);
        let mut windows = std::mem::take(&mut self.window_ms_wall);
        windows.sort_by(f64::total_cmp);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        SimReport {
            policy: self.policy.name(),
            requests: self.requests,
            served: self.served,
            served_rate: ratio(self.served as f64, self.requests as f64),
            wait_p50_s: quantile(&waits, 0.5),
            wait_p95_s: quantile(&waits, 0.95),
            driver_utilization: ratio(self.busy_ms as f64, self.online_ms as f64),
            revenue_per_driver_hour: ratio(self.revenue, self.online_ms as f64 / HOUR_MS as f64),
            scenario: self.scenario.city.name.clone(),
            seed: self.seed,
            hours,
            cancelled_waiting: self.cancelled_waiting,
            declined: self.declined,
            completed: self.completed,
            value_states: self.values.len(),
            td_updates: self.values.updates(),
            value_mean: self.values.mean(),
            hourly_served_rate: self
                .hourly
                .iter()
                .map(|(r, s)| ratio(*s as f64, *r as f64))
                .collect(),
            windows: windows.len() as u64,
            window_p99_ms: quantile(&windows, 0.99),
            sim_seconds_per_wall_second: ratio(self.elapsed_s(), wall),
        }
    }
}

/// Runs a scenario under a policy for `hours` from `seed`.
pub fn simulate(scenario: &Scenario, policy: Policy, hours: f64, seed: u64) -> SimReport {
    Simulation::new(scenario, policy, seed).run(hours)
}

/// The q-quantile of sorted values (nearest rank; 0 when empty).
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// `p` moved `dx` km east and `dy` km north.
fn offset(p: LatLng, dx: f64, dy: f64) -> LatLng {
    LatLng {
        lat: p.lat + dy / 110.574,
        lng: p.lng + dx / (111.320 * p.lat.to_radians().cos()),
    }
}

/// A point uniform in the disk of `radius_km` around `centre`.
fn uniform_in_disk(rng: &mut ChaCha8Rng, centre: LatLng, radius_km: f64) -> LatLng {
    let r = radius_km * rng.random::<f64>().sqrt();
    let theta = 2.0 * std::f64::consts::PI * rng.random::<f64>();
    offset(centre, r * theta.cos(), r * theta.sin())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Scenario {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/city-small.toml");
        Scenario::load(std::path::Path::new(path)).expect("the shipped scenario loads")
    }

    #[test]
    fn a_run_is_deterministic_and_its_tallies_add_up() {
        let scenario = small();
        let a = simulate(&scenario, Policy::Value, 1.0, 9);
        let b = simulate(&scenario, Policy::Value, 1.0, 9);
        let strip = |r: &SimReport| SimReport {
            window_p99_ms: 0.0,
            sim_seconds_per_wall_second: 0.0,
            ..r.clone()
        };
        assert_eq!(strip(&a), strip(&b));
        assert!(a.requests > 300, "{a:?}");
        // Every request is served, given up on, declined, or still open.
        assert!(a.served + a.cancelled_waiting + a.declined <= a.requests);
        assert!(a.served + a.cancelled_waiting + a.declined + 100 > a.requests);
        assert!(a.completed <= a.served);
        assert!(a.wait_p50_s > 0.0 && a.wait_p50_s <= a.wait_p95_s);
        assert!(a.driver_utilization > 0.0 && a.driver_utilization < 1.0);
        assert!(a.value_states > 10 && a.td_updates > 1000);
        // Same seed, other policy: the same riders (common random numbers).
        let m = simulate(&scenario, Policy::Myopic, 1.0, 9);
        assert_eq!(m.requests, a.requests);
    }

    #[test]
    fn learned_values_serve_more_riders_than_myopic_matching() {
        // The CI check of the learning bar's direction: from V = 0, on the
        // supply-constrained small city, over three seeds.
        let scenario = small();
        let (mut value, mut myopic) = (0.0, 0.0);
        for seed in 1..=3 {
            value += simulate(&scenario, Policy::Value, 3.0, seed).served_rate;
            myopic += simulate(&scenario, Policy::Myopic, 3.0, seed).served_rate;
        }
        assert!(
            value > myopic * 1.03,
            "value {:.4} vs myopic {:.4}",
            value / 3.0,
            myopic / 3.0
        );
    }
}
