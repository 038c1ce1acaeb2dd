//! One batch window of matching: open requests × available drivers within
//! the pickup radius, edge weights by policy, the assignment, and the TD
//! targets of the dispatches it makes. The simulator and the dataflow
//! operator both call [`plan`].

use h3o::{CellIndex, LatLng as H3LatLng, Resolution};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::assign::Problem;
use super::scenario::{Matching, Pricing};
use super::value::{ValueKey, ValueParams};
use crate::events::{LatLng, haversine_km};

/// How a batch is matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Maximum total of reward − pickup cost + γ^Δt·V(drop-off) − V(driver).
    Value,
    /// Maximum total of reward − pickup cost (the same solver, no values).
    Myopic,
    /// Oldest request first, each to its nearest available driver.
    Nearest,
}

impl Policy {
    /// Every policy.
    pub const ALL: [Self; 3] = [Self::Value, Self::Myopic, Self::Nearest];

    /// One line on what the policy does (the CLI's help).
    pub fn describe(self) -> &'static str {
        match self {
            Self::Value => "Maximum total of reward − pickup cost + γ^Δt·V(drop-off) − V(driver)",
            Self::Myopic => "Maximum total of reward − pickup cost (the same solver, no values)",
            Self::Nearest => "Oldest request first, each to its nearest available driver",
        }
    }

    /// The policy's name, as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Value => "value",
            Self::Myopic => "myopic",
            Self::Nearest => "nearest",
        }
    }
}

/// A name that is not a policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a policy (value, myopic or nearest)")]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(name: &str) -> Result<Self, UnknownPolicy> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| UnknownPolicy(name.to_owned()))
    }
}

/// Driving times from distances.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Travel {
    /// Average speed, km/h.
    pub speed_kmh: f64,
    /// Road km per straight-line km.
    pub detour: f64,
}

impl Default for Travel {
    /// 25 km/h, 1.3 road km per straight-line km (the default city's).
    fn default() -> Self {
        Travel {
            speed_kmh: 25.0,
            detour: 1.3,
        }
    }
}

impl Travel {
    /// Road distance, km.
    pub fn road_km(&self, a: LatLng, b: LatLng) -> f64 {
        haversine_km(a, b) * self.detour
    }

    /// Predicted driving time for `road_km`, s.
    pub fn seconds(&self, road_km: f64) -> f64 {
        road_km / self.speed_kmh * 3600.0
    }
}

impl Pricing {
    /// The fare of a trip.
    pub fn fare(&self, road_km: f64, seconds: f64) -> f64 {
        self.base + self.per_km * road_km + self.per_minute * seconds / 60.0
    }
}

/// A request waiting for a driver.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// Request id.
    pub id: u64,
    /// When it was made, ms since the epoch.
    pub at_ms: i64,
    /// Pickup point.
    pub pickup: LatLng,
    /// Drop-off point.
    pub dropoff: LatLng,
}

/// Available drivers, indexed by H3 cell for radius queries.
#[derive(Clone, Debug)]
pub struct DriverGrid {
    resolution: Resolution,
    /// Rings around a pickup's cell that cover the radius.
    rings: u32,
    radius_km: f64,
    drivers: FxHashMap<u64, (LatLng, u64)>,
    cells: FxHashMap<u64, Vec<u64>>,
}

impl DriverGrid {
    /// An empty grid for queries of `radius_km`.
    pub fn new(radius_km: f64) -> Self {
        // The finest resolution whose cells are at least half the radius
        // across keeps a query to a few dozen cells.
        let mut resolution = Resolution::Zero;
        for r in 0..=12u8 {
            let res = Resolution::try_from(r).unwrap_or(Resolution::Zero);
            if res.edge_length_km() >= radius_km / 2.0 {
                resolution = res;
            }
        }
        let edge = resolution.edge_length_km();
        // Cells at grid distance j have centres at least 1.5·j·edge apart;
        // a point within the radius lies in a cell whose centre is within
        // radius + 2·edge of the pickup's centre. 20% margin for H3's
        // distortion of edge lengths.
        let rings = ((radius_km + 2.0 * edge) / (1.2 * edge)).ceil() as u32;
        Self {
            resolution,
            rings,
            radius_km,
            drivers: FxHashMap::default(),
            cells: FxHashMap::default(),
        }
    }

    fn cell(&self, at: LatLng) -> u64 {
        match H3LatLng::new(at.lat, at.lng) {
            Ok(ll) => u64::from(ll.to_cell(self.resolution)),
            Err(_) => 0,
        }
    }

    /// Adds (or moves) a driver.
    pub fn insert(&mut self, id: u64, at: LatLng) {
        self.remove(id);
        let cell = self.cell(at);
        self.drivers.insert(id, (at, cell));
        self.cells.entry(cell).or_default().push(id);
    }

    /// Removes a driver; returns where it was.
    pub fn remove(&mut self, id: u64) -> Option<LatLng> {
        let (at, cell) = self.drivers.remove(&id)?;
        if let Some(list) = self.cells.get_mut(&cell) {
            if let Some(i) = list.iter().position(|d| *d == id) {
                list.swap_remove(i);
            }
            if list.is_empty() {
                self.cells.remove(&cell);
            }
        }
        Some(at)
    }

    /// Where a driver is, if available.
    pub fn location(&self, id: u64) -> Option<LatLng> {
        self.drivers.get(&id).map(|(at, _)| *at)
    }

    /// Number of available drivers.
    pub fn len(&self) -> usize {
        self.drivers.len()
    }

    /// Whether no driver is available.
    pub fn is_empty(&self) -> bool {
        self.drivers.is_empty()
    }

    /// Every available driver and its position, in id order.
    pub fn drivers(&self) -> Vec<(u64, LatLng)> {
        let mut all: Vec<_> = self
            .drivers
            .iter()
            .map(|(id, (at, _))| (*id, *at))
            .collect();
        all.sort_by_key(|(id, _)| *id);
        all
    }

    /// Where the available drivers are, in no particular order.
    pub fn positions(&self) -> impl Iterator<Item = LatLng> + '_ {
        self.drivers.values().map(|(at, _)| *at)
    }

    /// The `nearest` available drivers within the radius of `at`, closest
    /// first (ties by id), with their straight-line distance.
    pub fn near(&self, at: LatLng, nearest: usize) -> Vec<(u64, LatLng, f64)> {
        let mut found = Vec::new();
        let Ok(ll) = H3LatLng::new(at.lat, at.lng) else {
            return found;
        };
        let origin: CellIndex = ll.to_cell(self.resolution);
        for cell in origin.grid_disk::<Vec<_>>(self.rings) {
            if let Some(ids) = self.cells.get(&u64::from(cell)) {
                for id in ids {
                    if let Some((pos, _)) = self.drivers.get(id) {
                        let d = haversine_km(at, *pos);
                        if d <= self.radius_km {
                            found.push((*id, *pos, d));
                        }
                    }
                }
            }
        }
        found.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)));
        found.truncate(nearest);
        found
    }
}

/// Everything [`plan`] needs besides the requests, drivers and values.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanContext {
    /// How to weigh edges.
    pub policy: Policy,
    /// Fares and pickup cost.
    pub pricing: Pricing,
    /// Radius and nearest-k.
    pub matching: Matching,
    /// Driving times.
    pub travel: Travel,
    /// Discount and keys of the value function.
    pub value: ValueParams,
}

impl Default for PlanContext {
    /// The value policy with default pricing, matching, travel and values.
    fn default() -> Self {
        PlanContext {
            policy: Policy::Value,
            pricing: Pricing::default(),
            matching: Matching::default(),
            travel: Travel::default(),
            value: ValueParams::default(),
        }
    }
}

/// A dispatch decided by [`plan`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Planned {
    /// Index of the request in the slice given to [`plan`].
    pub request: usize,
    /// The driver.
    pub driver: u64,
    /// Where the driver is.
    pub driver_at: LatLng,
    /// Road km to the pickup.
    pub pickup_km: f64,
    /// Predicted time to the pickup, s.
    pub pickup_s: f64,
    /// Predicted trip time, s.
    pub trip_s: f64,
    /// Predicted fare.
    pub fare: f64,
    /// The driver's state now (the key whose value the dispatch updates).
    pub from: ValueKey,
    /// The predicted state at drop-off.
    pub to: ValueKey,
    /// Predicted fare − pickup cost.
    pub reward: f64,
    /// TD target of the dispatch: fare − pickup cost + γ^Δt·V(drop-off).
    pub target: f64,
}

/// Matches one batch window at `now_ms`. `value` reads the matcher's copy
/// of the value function (0 where it has none).
pub fn plan(
    ctx: &PlanContext,
    now_ms: i64,
    requests: &[OpenRequest],
    drivers: &DriverGrid,
    value: &dyn Fn(ValueKey) -> f64,
) -> Vec<Planned> {
    let edge = |request: usize, driver: u64, driver_at: LatLng| -> (Planned, f64) {
        let r = &requests[request];
        let pickup_km = ctx.travel.road_km(driver_at, r.pickup);
        let pickup_s = ctx.travel.seconds(pickup_km);
        let trip_km = ctx.travel.road_km(r.pickup, r.dropoff);
        let trip_s = ctx.travel.seconds(trip_km);
        let fare = ctx.pricing.fare(trip_km, trip_s);
        let reward = fare - ctx.pricing.pickup_cost_per_km * pickup_km;
        let busy_s = pickup_s + trip_s;
        let from = ctx.value.key(driver_at, now_ms);
        let to = ctx.value.key(r.dropoff, now_ms + (busy_s * 1000.0) as i64);
        let target = reward + ctx.value.discount(busy_s) * value(to);
        let weight = ctx.matching.rider_value
            + match ctx.policy {
                Policy::Value => target - value(from),
                Policy::Myopic | Policy::Nearest => reward,
            };
        let planned = Planned {
            request,
            driver,
            driver_at,
            pickup_km,
            pickup_s,
            trip_s,
            fare,
            from,
            to,
            reward,
            target,
        };
        (planned, weight)
    };
    match ctx.policy {
        Policy::Nearest => {
            let mut order: Vec<usize> = (0..requests.len()).collect();
            order.sort_by_key(|i| (requests[*i].at_ms, requests[*i].id));
            let mut taken = rustc_hash::FxHashSet::default();
            let mut out = Vec::new();
            for i in order {
                let near = drivers.near(requests[i].pickup, usize::MAX);
                if let Some((id, at, _)) = near.into_iter().find(|(id, _, _)| !taken.contains(id)) {
                    taken.insert(id);
                    out.push(edge(i, id, at).0);
                }
            }
            out
        }
        Policy::Value | Policy::Myopic => {
            let mut column_of: FxHashMap<u64, usize> = FxHashMap::default();
            let mut columns: Vec<(u64, LatLng)> = Vec::new();
            let mut planned: Vec<Planned> = Vec::new();
            let mut edges = Vec::new();
            for (i, r) in requests.iter().enumerate() {
                for (id, at, _) in drivers.near(r.pickup, ctx.matching.nearest) {
                    let c = *column_of.entry(id).or_insert_with(|| {
                        columns.push((id, at));
                        columns.len() - 1
                    });
                    let (p, w) = edge(i, id, at);
                    // Non-positive edges can never beat leaving both unmatched.
                    if w > 0.0 && w.is_finite() {
                        edges.push((i, c, w));
                        planned.push(p);
                    }
                }
            }
            let problem = Problem {
                rows: requests.len(),
                cols: columns.len(),
                edges,
            };
            let Ok(solution) = problem.solve_sparse(true) else {
                return Vec::new();
            };
            let chosen: rustc_hash::FxHashSet<(usize, usize)> =
                solution.pairs.into_iter().collect();
            planned
                .into_iter()
                .filter(|p| chosen.contains(&(p.request, column_of[&p.driver])))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lat: f64, lng: f64) -> LatLng {
        LatLng { lat, lng }
    }

    #[test]
    fn grid_queries_agree_with_a_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for radius in [0.5, 2.0, 6.0] {
            let mut grid = DriverGrid::new(radius);
            let mut all = Vec::new();
            for id in 0..600u64 {
                let p = at(
                    37.7 + rng.random::<f64>() * 0.15,
                    -122.5 + rng.random::<f64>() * 0.15,
                );
                grid.insert(id, p);
                all.push((id, p));
            }
            for id in (0..600u64).step_by(7) {
                grid.remove(id);
            }
            all.retain(|(id, _)| id % 7 != 0);
            assert_eq!(grid.len(), all.len());
            for _ in 0..50 {
                let q = at(
                    37.7 + rng.random::<f64>() * 0.15,
                    -122.5 + rng.random::<f64>() * 0.15,
                );
                let got: Vec<u64> = grid.near(q, 10).iter().map(|x| x.0).collect();
                let mut want: Vec<(u64, f64)> = all
                    .iter()
                    .map(|(id, p)| (*id, haversine_km(q, *p)))
                    .filter(|(_, d)| *d <= radius)
                    .collect();
                want.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                let want: Vec<u64> = want.iter().take(10).map(|x| x.0).collect();
                assert_eq!(got, want, "radius {radius}");
            }
        }
    }

    #[test]
    fn value_weights_steer_drivers_and_myopic_ignores_them() {
        // One request downtown going to a far suburb; two drivers at equal
        // distance from the pickup, one in a valuable cell. The value policy
        // sends the driver from the cell worth less; with a very valuable
        // origin cell and a worthless destination it refuses the trip.
        let ctx = PlanContext {
            value: ValueParams {
                resolution: 9,
                ..ValueParams::default()
            },
            ..PlanContext::default()
        };
        let pickup = at(37.7800, -122.4100);
        let request = OpenRequest {
            id: 1,
            at_ms: 0,
            pickup,
            dropoff: at(37.7300, -122.4700),
        };
        let (a, b) = (at(37.7890, -122.4100), at(37.7710, -122.4100));
        let mut grid = DriverGrid::new(2.0);
        grid.insert(10, a);
        grid.insert(20, b);
        let rich = ctx.value.key(a, 0);
        let value = |k: ValueKey| if k == rich { 30.0 } else { 0.0 };
        let planned = plan(&ctx, 0, &[request], &grid, &value);
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].driver, 20);
        let myopic = PlanContext {
            policy: Policy::Myopic,
            ..ctx.clone()
        };
        let planned = plan(&myopic, 0, &[request], &grid, &value);
        assert_eq!(planned.len(), 1);
        grid.remove(20);
        let refuse = |k: ValueKey| if k == rich { 500.0 } else { 0.0 };
        assert!(plan(&ctx, 0, &[request], &grid, &refuse).is_empty());
        assert_eq!(plan(&myopic, 0, &[request], &grid, &refuse).len(), 1);
    }
}
