//! The driver value function: V(cell, time bucket), a driver's discounted
//! future earnings from an H3 cell, learned online by temporal-difference
//! updates (Xu et al., KDD 2018 §4; Lyft's "A Better Match for Drivers and
//! Riders", 2023).
//!
//! Updates travel as [`TdSample`]s: whoever observes a transition computes
//! the TD target `R + γ^Δt · V(c′)` from the values it has, and the owner of
//! the cell `c` applies `V(c) += α · (target − V(c))`. Samples that share a
//! key and a target (idle drivers in one cell during one window) are sent
//! once with a count, and `count` updates with one target have a closed form:
//! `V ← target + (1 − α)^count · (V − target)`.

use h3o::{CellIndex, LatLng as H3LatLng, Resolution};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::events::LatLng;

/// Learning parameters of the value function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValueParams {
    /// Step size α of each TD update.
    pub alpha: f64,
    /// Discount γ per minute of driver time.
    pub gamma_per_minute: f64,
    /// H3 resolution of the cells (0–15).
    pub resolution: u8,
    /// Time-of-day buckets (1 = one value per cell for the whole day).
    pub time_buckets: u32,
}

impl Default for ValueParams {
    fn default() -> Self {
        // α 0.05: a cell's value follows the last few dozen transitions from
        // it, so it tracks the hour of day without time buckets. γ 0.99 per
        // minute: a half-life of 69 minutes, longer than a trip plus the wait
        // for the next one, short enough that values stay bounded. Resolution
        // 7 (about 5 km² a cell): coarse enough that a city-sized fleet visits
        // every busy cell many times an hour. One time bucket: online updates
        // already track the time of day; buckets pay off only after days.
        Self {
            alpha: 0.05,
            gamma_per_minute: 0.99,
            resolution: 7,
            time_buckets: 1,
        }
    }
}

/// A value-function parameter out of its range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field} {value} {rule}")]
pub struct ValueParamsError {
    /// The field (`alpha`, `gamma_per_minute`, `resolution`, `time_buckets`).
    pub field: &'static str,
    /// Its value.
    pub value: f64,
    /// The range it breaks.
    pub rule: &'static str,
}

impl ValueParams {
    /// Checks the ranges; the error names the field.
    pub fn check(&self) -> Result<(), ValueParamsError> {
        let out = |field, value, rule| Err(ValueParamsError { field, value, rule });
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return out("alpha", self.alpha, "must be in (0, 1]");
        }
        if !(self.gamma_per_minute > 0.0 && self.gamma_per_minute <= 1.0) {
            return out(
                "gamma_per_minute",
                self.gamma_per_minute,
                "must be in (0, 1]",
            );
        }
        if self.resolution > 15 {
            return out(
                "resolution",
                f64::from(self.resolution),
                "is not an H3 resolution (0 to 15)",
            );
        }
        if self.time_buckets == 0 || self.time_buckets > 1440 {
            return out(
                "time_buckets",
                f64::from(self.time_buckets),
                "must be 1 to 1440",
            );
        }
        Ok(())
    }

    /// γ^Δt for `seconds` of driver time.
    pub fn discount(&self, seconds: f64) -> f64 {
        self.gamma_per_minute.powf(seconds.max(0.0) / 60.0)
    }

    /// The cell and time bucket of a position at `ms` (ms since the epoch).
    pub fn key(&self, at: LatLng, ms: i64) -> ValueKey {
        ValueKey {
            cell: cell_of(at, self.resolution),
            bucket: self.bucket(ms),
        }
    }

    /// The TD samples of drivers who waited one window of `window_ms` from
    /// `from_ms` at `positions`: zero reward, one step, one counted sample
    /// per state, in key order. `value` reads the values the caller has.
    pub fn idle_samples(
        &self,
        positions: impl IntoIterator<Item = LatLng>,
        from_ms: i64,
        window_ms: i64,
        value: impl Fn(ValueKey) -> f64,
    ) -> Vec<TdSample> {
        let mut counts: std::collections::BTreeMap<ValueKey, u32> = Default::default();
        for at in positions {
            *counts.entry(self.key(at, from_ms)).or_default() += 1;
        }
        let discount = self.discount(window_ms as f64 / 1000.0);
        let bucket = self.bucket(from_ms + window_ms);
        counts
            .into_iter()
            .map(|(key, count)| TdSample {
                key,
                target: discount * value(ValueKey { bucket, ..key }),
                count,
            })
            .collect()
    }

    /// The time-of-day bucket of `ms`.
    pub fn bucket(&self, ms: i64) -> u16 {
        let day_ms = ms.rem_euclid(86_400_000) as u64;
        (day_ms * u64::from(self.time_buckets) / 86_400_000) as u16
    }
}

/// The H3 cell (as its 64-bit index) that holds `at` at `resolution`.
/// Positions come checked; an invalid one falls to cell 0, which no real
/// position maps to.
pub fn cell_of(at: LatLng, resolution: u8) -> u64 {
    let res = Resolution::try_from(resolution.min(15)).unwrap_or(Resolution::Seven);
    match H3LatLng::new(at.lat, at.lng) {
        Ok(ll) => u64::from(ll.to_cell(res)),
        Err(_) => 0,
    }
}

/// The centre of an H3 cell given as its 64-bit index.
pub fn cell_centre(cell: u64) -> Option<LatLng> {
    let cell = CellIndex::try_from(cell).ok()?;
    let ll = H3LatLng::from(cell);
    Some(LatLng {
        lat: ll.lat(),
        lng: ll.lng(),
    })
}

/// A value-function entry: an H3 cell and a time-of-day bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueKey {
    /// H3 cell index.
    pub cell: u64,
    /// Time-of-day bucket.
    pub bucket: u16,
}

/// `count` TD updates of `key` towards `target`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TdSample {
    /// The state whose value moves.
    pub key: ValueKey,
    /// `R + γ^Δt · V(c′)`, computed by whoever saw the transition.
    pub target: f64,
    /// How many identical samples this stands for.
    pub count: u32,
}

/// An update of one state's value, as it travels to the state's owner.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum TdUpdate {
    /// Move towards a target (see [`TdSample`]).
    Sample(TdSample),
    /// `V(key) += α · delta`: the correction a completed trip sends when
    /// its actual return differs from the one predicted at dispatch.
    Correct {
        /// The state whose value moves.
        key: ValueKey,
        /// Actual minus predicted TD target.
        delta: f64,
    },
}

impl TdUpdate {
    /// The state this update moves.
    pub fn key(&self) -> ValueKey {
        match self {
            Self::Sample(s) => s.key,
            Self::Correct { key, .. } => *key,
        }
    }
}

/// A value table: the whole function in the simulator, one worker's share
/// of cells in the dataflow.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValueTable {
    alpha: f64,
    values: FxHashMap<ValueKey, f64>,
    updates: u64,
}

impl ValueTable {
    /// An empty table (every value 0) with step size `alpha`.
    pub fn new(alpha: f64) -> Self {
        Self {
            alpha,
            values: FxHashMap::default(),
            updates: 0,
        }
    }

    /// V(key); 0 for a state never updated.
    pub fn get(&self, key: ValueKey) -> f64 {
        self.values.get(&key).copied().unwrap_or(0.0)
    }

    /// Applies a sample and returns the new value.
    pub fn apply(&mut self, sample: TdSample) -> f64 {
        let v = self.values.entry(sample.key).or_insert(0.0);
        let keep = (1.0 - self.alpha).powi(sample.count.min(i32::MAX as u32) as i32);
        *v = sample.target + keep * (*v - sample.target);
        self.updates += u64::from(sample.count);
        *v
    }

    /// Applies an update and returns the new value.
    pub fn update(&mut self, update: TdUpdate) -> f64 {
        match update {
            TdUpdate::Sample(sample) => self.apply(sample),
            TdUpdate::Correct { key, delta } => {
                let v = self.values.entry(key).or_insert(0.0);
                *v += self.alpha * delta;
                self.updates += 1;
                *v
            }
        }
    }

    /// Overwrites V(key) (a matcher's copy receiving the owner's value).
    pub fn set(&mut self, key: ValueKey, value: f64) {
        self.values.insert(key, value);
    }

    /// Number of states with a value.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no state has a value yet.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// TD updates applied so far (a counted sample counts its count).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Sum of the values in millionths, each rounded first (exact and
    /// order-free to add across shards).
    pub fn sum_micro(&self) -> i64 {
        self.values.values().map(|v| (v * 1e6).round() as i64).sum()
    }

    /// Mean value over the states that have one (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.values.is_empty() {
            0.0
        } else {
            self.values.values().sum::<f64>() / self.values.len() as f64
        }
    }

    /// Every (state, value), in key order.
    pub fn entries(&self) -> Vec<(ValueKey, f64)> {
        let mut all: Vec<_> = self.values.iter().map(|(k, v)| (*k, *v)).collect();
        all.sort_by_key(|(k, _)| *k);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counted_sample_equals_that_many_single_updates() {
        let key = ValueKey { cell: 7, bucket: 0 };
        let mut one = ValueTable::new(0.1);
        let mut many = ValueTable::new(0.1);
        one.apply(TdSample {
            key,
            target: 3.0,
            count: 1,
        });
        many.apply(TdSample {
            key,
            target: 3.0,
            count: 1,
        });
        for _ in 0..17 {
            one.apply(TdSample {
                key,
                target: -1.5,
                count: 1,
            });
        }
        many.apply(TdSample {
            key,
            target: -1.5,
            count: 17,
        });
        assert!((one.get(key) - many.get(key)).abs() < 1e-12);
        assert_eq!(one.updates(), 18);
        assert_eq!(many.updates(), 18);
    }

    #[test]
    fn td_converges_to_the_discounted_return_of_a_chain() {
        // Two cells: from A a trip pays 10 and lands in B after 10 minutes;
        // from B a trip pays 4 and lands in A after 5 minutes. The fixed
        // point solves V_A = 10 + γ^10 V_B, V_B = 4 + γ^5 V_A.
        let params = ValueParams::default();
        let (a, b) = (
            ValueKey { cell: 1, bucket: 0 },
            ValueKey { cell: 2, bucket: 0 },
        );
        let mut table = ValueTable::new(params.alpha);
        for _ in 0..5000 {
            let target = 10.0 + params.discount(600.0) * table.get(b);
            table.apply(TdSample {
                key: a,
                target,
                count: 1,
            });
            let target = 4.0 + params.discount(300.0) * table.get(a);
            table.apply(TdSample {
                key: b,
                target,
                count: 1,
            });
        }
        let (ga, gb) = (params.discount(600.0), params.discount(300.0));
        let va = (10.0 + ga * 4.0) / (1.0 - ga * gb);
        let vb = 4.0 + gb * va;
        assert!(
            (table.get(a) - va).abs() < 1e-6 * va,
            "{} {va}",
            table.get(a)
        );
        assert!(
            (table.get(b) - vb).abs() < 1e-6 * vb,
            "{} {vb}",
            table.get(b)
        );
    }

    #[test]
    fn keys_follow_h3_and_the_clock() {
        let params = ValueParams {
            time_buckets: 24,
            ..ValueParams::default()
        };
        let ferry = LatLng {
            lat: 37.7955,
            lng: -122.3937,
        };
        let key = params.key(ferry, 3 * 3_600_000 + 5);
        assert_eq!(key.bucket, 3);
        let cell = CellIndex::try_from(key.cell).expect("a valid cell");
        assert_eq!(cell.resolution(), Resolution::Seven);
        let centre = cell_centre(key.cell).expect("a centre");
        assert!(crate::events::haversine_km(centre, ferry) < 2.0);
        assert!(
            ValueParams {
                alpha: 0.0,
                ..params.clone()
            }
            .check()
            .is_err()
        );
        assert!(
            ValueParams {
                resolution: 16,
                ..params
            }
            .check()
            .is_err()
        );
    }
}
