//! The dispatch generator: a small discrete-event city.
//!
//! Riders ask for rides at a rate with morning and evening peaks; pickups and
//! drop-offs cluster around hot spots whose weight changes with the hour
//! (downtown by day, the airport mornings and evenings, nightlife late); the
//! number of drivers online follows its own cycle, lowest at night and short
//! of demand at the peaks, so some requests are cancelled. Every driver
//! online pings its status every minute. Inside the generator a naive
//! nearest-idle-driver rule decides which requests become trips, only so that
//! `trip_completed` and `request_cancelled` events follow from the requests;
//! Dima's matcher is a separate consumer of the stream.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::f64::consts::PI;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashMap;

use super::ads::DEFAULT_START_MS;
use super::geo::{LatLng, haversine_km};
use super::{
    DriverState, DriverStatus, Event, RequestCancelled, RideRequest, SCHEMA_VERSION, TripCompleted,
};
use crate::placement::mix64;

/// Hot spots: (name, centre, spread in degrees).
const HOT_SPOTS: [(&str, LatLng, f64); 5] = [
    (
        "downtown",
        LatLng {
            lat: 37.7897,
            lng: -122.3972,
        },
        0.008,
    ),
    (
        "mission",
        LatLng {
            lat: 37.7599,
            lng: -122.4148,
        },
        0.007,
    ),
    (
        "airport",
        LatLng {
            lat: 37.6213,
            lng: -122.3790,
        },
        0.004,
    ),
    (
        "ballpark",
        LatLng {
            lat: 37.7786,
            lng: -122.3893,
        },
        0.004,
    ),
    (
        "sunset",
        LatLng {
            lat: 37.7530,
            lng: -122.4940,
        },
        0.012,
    ),
];

/// Relative weight of each hot spot at `hour`.
fn hot_spot_weights(hour: f64) -> [f64; 5] {
    let bump = |centre: f64, width: f64| {
        let d = (hour - centre).abs().min(24.0 - (hour - centre).abs());
        (-(d * d) / (2.0 * width * width)).exp()
    };
    [
        0.4 + 1.2 * bump(13.0, 4.0),
        0.3 + 1.0 * bump(22.0, 3.0),
        0.2 + 0.8 * bump(7.0, 2.0) + 0.8 * bump(19.0, 2.0),
        0.1 + 0.9 * bump(20.0, 1.5),
        0.3 + 0.6 * bump(8.0, 2.0),
    ]
}

fn hour_of(ms: i64) -> f64 {
    ms.rem_euclid(86_400_000) as f64 / 3_600_000.0
}

/// Relative request rate at `ms`: peaks at 08:00 and 18:00.
pub fn demand_intensity(ms: i64) -> f64 {
    let h = hour_of(ms);
    let bump = |c: f64, w: f64| (-((h - c) * (h - c)) / (2.0 * w * w)).exp();
    0.35 + 1.3 * bump(8.0, 1.5) + 1.5 * bump(18.0, 2.0)
}

/// Fraction of drivers online at `ms`: highest early afternoon, lowest at night.
pub fn supply_fraction(ms: i64) -> f64 {
    0.5 + 0.35 * (2.0 * PI * (hour_of(ms) - 7.0) / 24.0).sin()
}

/// Average city speed, km/h, and how much longer roads are than the crow flies.
const SPEED_KMH: f64 = 25.0;
const DETOUR: f64 = 1.3;
/// Drivers farther than this from a pickup are not considered.
const MAX_PICKUP_KM: f64 = 6.0;
const PING_MS: i64 = 60_000;

#[derive(Clone, Debug)]
struct Driver {
    id: u64,
    location: LatLng,
    online: bool,
    /// Busy until this time (en route until `pickup_at`, then on trip).
    busy_until: i64,
    pickup_at: i64,
}

#[derive(Clone, Debug)]
enum Pending {
    Arrival,
    Ping(usize),
    Dropoff(usize, TripCompleted, LatLng),
    Cancel(RequestCancelled),
}

/// One shard of the dispatch stream: deterministic for (seed, shard, shards).
/// Each shard simulates its own drivers and its share of the requests.
#[derive(Debug)]
pub struct DispatchGenerator {
    rng: ChaCha8Rng,
    drivers: Vec<Driver>,
    queue: BinaryHeap<Reverse<(i64, u64)>>,
    pending: FxHashMap<u64, Pending>,
    next_seq: u64,
    /// Mean gap between this shard's requests at intensity 1, ms.
    request_gap_ms: f64,
    shard: u64,
    shards: u64,
    requests: u64,
    riders: u64,
}

impl DispatchGenerator {
    /// Shard `shard` of `shards`: `drivers` drivers and `requests_per_second`
    /// simulated requests per second at mean demand, both across all shards.
    pub fn new(seed: u64, drivers: u64, requests_per_second: f64, shard: u64, shards: u64) -> Self {
        let shards = shards.max(1);
        let mut rng = ChaCha8Rng::seed_from_u64(mix64(seed ^ 0xD15) ^ mix64(shard + 1));
        let start = DEFAULT_START_MS;
        let mine = (0..drivers.max(1)).filter(|d| d % shards == shard);
        let mut generator = Self {
            drivers: Vec::new(),
            queue: BinaryHeap::new(),
            pending: FxHashMap::default(),
            next_seq: 0,
            request_gap_ms: 1000.0 * shards as f64 / requests_per_second.max(1e-9),
            shard,
            shards,
            requests: 0,
            riders: 20_000,
            rng: ChaCha8Rng::seed_from_u64(0),
        };
        for id in mine {
            let location = generator.sample_spot(&mut rng, hour_of(start));
            let online = rng.random::<f64>() < supply_fraction(start);
            generator.drivers.push(Driver {
                id: id + 1,
                location,
                online,
                busy_until: start,
                pickup_at: start,
            });
        }
        for index in 0..generator.drivers.len() {
            let first = start + rng.random_range(0..PING_MS);
            generator.schedule(first, Pending::Ping(index));
        }
        generator.rng = rng;
        generator.schedule(start, Pending::Arrival);
        generator
    }

    fn schedule(&mut self, at: i64, what: Pending) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Reverse((at, seq)));
        self.pending.insert(seq, what);
    }

    fn sample_spot(&self, rng: &mut ChaCha8Rng, hour: f64) -> LatLng {
        let weights = hot_spot_weights(hour);
        let total: f64 = weights.iter().sum();
        let mut pick = rng.random::<f64>() * total;
        let mut spot = HOT_SPOTS.len() - 1;
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                spot = i;
                break;
            }
            pick -= w;
        }
        let (_, centre, spread) = HOT_SPOTS[spot];
        // Approximately normal offsets: the sum of three uniforms.
        let mut offset = || (0..3).map(|_| rng.random::<f64>() - 0.5).sum::<f64>() * 2.0 * spread;
        LatLng {
            lat: (centre.lat + offset()).clamp(37.60, 37.83),
            lng: (centre.lng + offset()).clamp(-122.52, -122.35),
        }
    }

    fn state(driver: &Driver, now: i64) -> DriverState {
        if !driver.online {
            DriverState::Offline
        } else if now < driver.pickup_at {
            DriverState::EnRoute
        } else if now < driver.busy_until {
            DriverState::OnTrip
        } else {
            DriverState::Idle
        }
    }

    fn status(&self, index: usize, now: i64) -> Event {
        let d = &self.drivers[index];
        Event::DriverStatus(DriverStatus {
            schema_version: SCHEMA_VERSION,
            event_time: now,
            driver_id: d.id,
            location: round(d.location),
            state: Self::state(d, now),
        })
    }

    /// A driver's ping: go on or off line towards the hour's supply, drift a
    /// little when idle, report when online (and once when going offline).
    fn ping(&mut self, index: usize, now: i64) -> Option<Event> {
        let online = self.drivers.iter().filter(|d| d.online).count() as f64;
        let target = supply_fraction(now) * self.drivers.len() as f64;
        let idle = Self::state(&self.drivers[index], now) == DriverState::Idle;
        let mut rng = std::mem::replace(&mut self.rng, ChaCha8Rng::seed_from_u64(0));
        let change = rng.random::<f64>() < 0.05;
        let mut went_offline = false;
        if !self.drivers[index].online && online < target && change {
            let spot = self.sample_spot(&mut rng, hour_of(now));
            let d = &mut self.drivers[index];
            d.online = true;
            d.location = spot;
        } else if idle && online > target && change {
            self.drivers[index].online = false;
            went_offline = true;
        } else if idle {
            let d = &mut self.drivers[index];
            d.location.lat =
                (d.location.lat + (rng.random::<f64>() - 0.5) * 0.002).clamp(37.60, 37.83);
            d.location.lng =
                (d.location.lng + (rng.random::<f64>() - 0.5) * 0.002).clamp(-122.52, -122.35);
        }
        let next = now + PING_MS + rng.random_range(-2_000..2_000);
        self.rng = rng;
        self.schedule(next, Pending::Ping(index));
        (self.drivers[index].online || went_offline).then(|| self.status(index, now))
    }

    /// A request arrives: report it, and decide its fate.
    fn arrival(&mut self, now: i64) -> Event {
        let mut rng = std::mem::replace(&mut self.rng, ChaCha8Rng::seed_from_u64(0));
        let u: f64 = rng.random::<f64>().max(1e-12);
        let gap = -u.ln() * self.request_gap_ms / demand_intensity(now);
        self.requests += 1;
        let request_id = self.requests * self.shards + self.shard;
        let rider_id = 1 + mix64(request_id ^ 0x51DE) % self.riders;
        let pickup = self.sample_spot(&mut rng, hour_of(now));
        let mut dropoff = self.sample_spot(&mut rng, hour_of(now) + 3.0);
        if haversine_km(pickup, dropoff) < 0.5 {
            dropoff.lat = (dropoff.lat + 0.01).min(37.83);
        }
        let patience_ms = rng.random_range(180_000..900_000);
        let trip_km = haversine_km(pickup, dropoff) * DETOUR;
        let trip_ms =
            (trip_km / SPEED_KMH * 3_600_000.0) as i64 + rng.random_range(60_000..240_000);
        self.rng = rng;
        self.schedule(now + gap.max(1.0) as i64, Pending::Arrival);

        let nearest = self
            .drivers
            .iter()
            .enumerate()
            .filter(|(_, d)| Self::state(d, now) == DriverState::Idle)
            .map(|(i, d)| (i, haversine_km(d.location, pickup)))
            .filter(|(_, km)| *km <= MAX_PICKUP_KM)
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let cancel = |reason: &str, at: i64| {
            Pending::Cancel(RequestCancelled {
                schema_version: SCHEMA_VERSION,
                event_time: at,
                request_id,
                rider_id,
                reason: reason.into(),
            })
        };
        match nearest {
            None => self.schedule(now + 60_000, cancel("no_driver", now + 60_000)),
            Some((_, km)) if (km * DETOUR / SPEED_KMH * 3_600_000.0) as i64 > patience_ms => {
                self.schedule(now + patience_ms, cancel("rider", now + patience_ms));
            }
            Some((index, km)) => {
                let pickup_at = now + (km * DETOUR / SPEED_KMH * 3_600_000.0) as i64;
                let dropoff_at = pickup_at + trip_ms;
                let driver = &mut self.drivers[index];
                driver.pickup_at = pickup_at;
                driver.busy_until = dropoff_at;
                let minutes = trip_ms as f64 / 60_000.0;
                let trip = TripCompleted {
                    schema_version: SCHEMA_VERSION,
                    event_time: dropoff_at,
                    request_id,
                    driver_id: driver.id,
                    fare: ((2.5 + 1.2 * trip_km + 0.3 * minutes) * 100.0).round() / 100.0,
                    distance_km: (trip_km * 1000.0).round() / 1000.0,
                    duration_s: (trip_ms / 1000) as u32,
                };
                self.schedule(dropoff_at, Pending::Dropoff(index, trip, dropoff));
            }
        }
        Event::RideRequest(RideRequest {
            schema_version: SCHEMA_VERSION,
            event_time: now,
            request_id,
            rider_id,
            pickup: round(pickup),
            dropoff: round(dropoff),
        })
    }
}

/// Coordinates to 6 decimals (about 0.1 m), as a GPS feed reports them.
fn round(p: LatLng) -> LatLng {
    LatLng {
        lat: (p.lat * 1e6).round() / 1e6,
        lng: (p.lng * 1e6).round() / 1e6,
    }
}

impl Iterator for DispatchGenerator {
    type Item = Event;

    /// The next event in simulated-time order.
    fn next(&mut self) -> Option<Event> {
        loop {
            let Reverse((now, seq)) = self.queue.pop()?;
            let what = self.pending.remove(&seq)?;
            let event = match what {
                Pending::Arrival => Some(self.arrival(now)),
                Pending::Ping(index) => self.ping(index, now),
                Pending::Dropoff(index, trip, at) => {
                    self.drivers[index].location = at;
                    Some(Event::TripCompleted(trip))
                }
                Pending::Cancel(cancel) => Some(Event::RequestCancelled(cancel)),
            };
            if event.is_some() {
                return event;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(seed: u64, n: usize) -> Vec<Event> {
        DispatchGenerator::new(seed, 300, 0.1, 0, 1)
            .take(n)
            .collect()
    }

    #[test]
    fn deterministic_valid_and_in_time_order() {
        let a = take(11, 5000);
        assert_eq!(a, take(11, 5000));
        assert_ne!(a, take(12, 5000));
        let mut last = i64::MIN;
        for e in &a {
            e.validate().unwrap();
            assert!(e.event_time() >= last);
            last = e.event_time();
            assert_eq!(super::super::parse_line(&e.to_line()).unwrap(), *e);
        }
    }

    #[test]
    fn every_request_ends_once_as_a_trip_or_a_cancellation() {
        let events = take(5, 60_000);
        let mut open: FxHashMap<u64, i64> = FxHashMap::default();
        let (mut trips, mut cancels, mut requests) = (0, 0, 0);
        for e in &events {
            match e {
                Event::RideRequest(r) => {
                    requests += 1;
                    assert!(open.insert(r.request_id, r.event_time).is_none());
                }
                Event::TripCompleted(t) => {
                    trips += 1;
                    let asked = open
                        .remove(&t.request_id)
                        .expect("trip for an open request");
                    assert!(t.event_time > asked && t.fare > 2.5);
                }
                Event::RequestCancelled(c) => {
                    cancels += 1;
                    assert!(open.remove(&c.request_id).is_some());
                }
                Event::DriverStatus(_) => {}
                _ => unreachable!(),
            }
        }
        assert!(requests > 400, "{requests} requests");
        // Both outcomes happen: supply is short at times but not always.
        assert!(
            trips > requests / 2 && cancels > 0,
            "{trips} trips, {cancels} cancelled of {requests}"
        );
    }
}
