//! City scenarios for the dispatch simulator: a TOML file that sets the
//! city, the fleet, the demand and its shape, prices, matching and learning
//! parameters. Every field has a default; unknown fields are rejected with
//! their line and column, and impossible values (no drivers, negative rates)
//! with the field that holds them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::value::ValueParams;
use crate::events::{LatLng, haversine_km};

/// A whole scenario.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// The city.
    pub city: City,
    /// The drivers.
    pub fleet: Fleet,
    /// The riders.
    pub demand: Demand,
    /// What trips pay.
    pub pricing: Pricing,
    /// The batch matcher.
    pub matching: Matching,
    /// The value function's learning parameters.
    pub value: ValueParams,
}

/// The city: a disk on the map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct City {
    /// A name for reports.
    pub name: String,
    /// Centre of the city.
    pub centre: LatLng,
    /// Radius of the served area, km.
    pub radius_km: f64,
    /// Average driving speed, km/h.
    pub speed_kmh: f64,
    /// Road distance over straight-line distance.
    pub detour: f64,
    /// Log-normal spread of actual travel times around the prediction.
    pub travel_noise: f64,
    /// Hour of the day when the simulation starts (0–23).
    pub start_hour: u32,
}

impl Default for City {
    fn default() -> Self {
        Self {
            name: "city".into(),
            centre: LatLng {
                lat: 37.7749,
                lng: -122.4194,
            },
            radius_km: 8.0,
            speed_kmh: 25.0,
            detour: 1.3,
            travel_noise: 0.15,
            start_hour: 7,
        }
    }
}

/// The drivers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fleet {
    /// Drivers who work in the city (online or not).
    pub drivers: u32,
    /// Fraction of the drivers online in each hour of the day (24 values).
    pub online: Vec<f64>,
    /// Minimum time online before a driver may log off, hours.
    pub min_shift_hours: f64,
    /// Mean idle time before a driver drives to where riders usually are
    /// (a point drawn from the origin distribution), s; 0 = never.
    pub reposition_after_s: f64,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            drivers: 400,
            online: vec![
                0.30, 0.25, 0.20, 0.20, 0.25, 0.35, 0.50, 0.65, 0.70, 0.65, 0.60, 0.60, 0.60, 0.60,
                0.60, 0.65, 0.70, 0.75, 0.75, 0.70, 0.60, 0.50, 0.45, 0.35,
            ],
            min_shift_hours: 2.0,
            reposition_after_s: 600.0,
        }
    }
}

/// Where riders come from and go to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Demand {
    /// Requests per hour at profile 1.0.
    pub requests_per_hour: f64,
    /// Multiplier of the request rate in each hour of the day (24 values).
    pub profile: Vec<f64>,
    /// Mean time a rider waits for a match before cancelling, s.
    pub patience_s: f64,
    /// Chance that a matched rider cancels, per km of pickup distance.
    pub decline_per_km: f64,
    /// Upper bound on that chance.
    pub decline_max: f64,
    /// Origin and destination weight of the city at large (uniform over
    /// the disk), next to the zones.
    pub background: Weights,
    /// Hot spots: Gaussian blobs with their own origin and destination
    /// weights. A trip's origin and destination are drawn independently
    /// from the zones and the background by these weights.
    pub zones: Vec<Zone>,
}

impl Default for Demand {
    fn default() -> Self {
        Self {
            requests_per_hour: 2000.0,
            profile: vec![
                0.40, 0.30, 0.20, 0.15, 0.15, 0.30, 0.60, 1.20, 1.50, 1.20, 0.90, 0.90, 1.00, 1.00,
                0.90, 0.90, 1.10, 1.40, 1.60, 1.30, 1.00, 0.90, 0.80, 0.60,
            ],
            patience_s: 180.0,
            decline_per_km: 0.05,
            decline_max: 0.3,
            background: Weights {
                origin_weight: 1.0,
                destination_weight: 1.0,
            },
            zones: Vec::new(),
        }
    }
}

/// Origin and destination weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    /// Relative chance that a trip starts here.
    pub origin_weight: f64,
    /// Relative chance that a trip ends here.
    pub destination_weight: f64,
}

/// A hot spot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    /// A name for reports.
    pub name: String,
    /// Centre of the blob.
    pub centre: LatLng,
    /// Standard deviation of the blob, km.
    pub spread_km: f64,
    /// Relative chance that a trip starts here.
    pub origin_weight: f64,
    /// Relative chance that a trip ends here.
    pub destination_weight: f64,
}

/// What trips pay and what pickups cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pricing {
    /// Flag fall.
    pub base: f64,
    /// Per road km of the trip.
    pub per_km: f64,
    /// Per minute of the trip.
    pub per_minute: f64,
    /// Cost of driving to the pickup, per road km (the matcher's pickup cost).
    pub pickup_cost_per_km: f64,
}

impl Default for Pricing {
    fn default() -> Self {
        Self {
            base: 2.5,
            per_km: 1.2,
            per_minute: 0.3,
            pickup_cost_per_km: 0.6,
        }
    }
}

/// The batch matcher.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Matching {
    /// Batch window, s.
    pub window_s: f64,
    /// Drivers farther than this (straight line) from a pickup are not considered, km.
    pub radius_km: f64,
    /// Each request sees at most this many nearest drivers.
    pub nearest: usize,
    /// What serving a rider is worth to the platform beyond the fare; added
    /// to every edge's trip reward (not to the drivers' earnings that the
    /// value function learns), so that the matcher leaves a rider waiting
    /// only when a dispatch would cost more than this.
    pub rider_value: f64,
}

impl Default for Matching {
    fn default() -> Self {
        Self {
            window_s: 2.0,
            radius_km: 2.0,
            nearest: 20,
            rider_value: 10.0,
        }
    }
}

/// A scenario that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {}: {source}", path.display())]
    Read {
        /// The scenario path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not TOML, an unknown field, or a value of the wrong type.
    #[error("{}:{line}:{column}: {field}: {message}", path.display())]
    Parse {
        /// The scenario path.
        path: PathBuf,
        /// Dotted path of the field ("(top level)" when none).
        field: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// Values that parse but make no sense.
    #[error("{}: {}", path.display(), problems.join("; "))]
    Invalid {
        /// The scenario path.
        path: PathBuf,
        /// One line per problem, each naming its field.
        problems: Vec<String>,
    },
}

impl Scenario {
    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates scenario text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ScenarioError> {
        let scenario: Scenario =
            crate::toml_input::parse_toml(text).map_err(|e| ScenarioError::Parse {
                path: path.to_owned(),
                field: e.field.unwrap_or_else(|| "(top level)".into()),
                line: e.line,
                column: e.column,
                message: e.message,
            })?;
        let problems = scenario.problems();
        if problems.is_empty() {
            Ok(scenario)
        } else {
            Err(ScenarioError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Everything wrong with the values, one line each naming the field.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut positive = |field: &str, v: f64| {
            if !(v.is_finite() && v > 0.0) {
                out.push(format!("{field} = {v} must be a positive number"));
            }
        };
        positive("city.radius_km", self.city.radius_km);
        positive("city.speed_kmh", self.city.speed_kmh);
        positive("demand.requests_per_hour", self.demand.requests_per_hour);
        positive("demand.patience_s", self.demand.patience_s);
        positive("matching.window_s", self.matching.window_s);
        positive("matching.radius_km", self.matching.radius_km);
        let mut at_least = |field: &str, v: f64, low: f64| {
            if !(v.is_finite() && v >= low) {
                out.push(format!("{field} = {v} must be a number >= {low}"));
            }
        };
        at_least("city.detour", self.city.detour, 1.0);
        at_least("city.travel_noise", self.city.travel_noise, 0.0);
        at_least("fleet.min_shift_hours", self.fleet.min_shift_hours, 0.0);
        at_least(
            "fleet.reposition_after_s",
            self.fleet.reposition_after_s,
            0.0,
        );
        at_least("demand.decline_per_km", self.demand.decline_per_km, 0.0);
        at_least("demand.decline_max", self.demand.decline_max, 0.0);
        at_least(
            "demand.background.origin_weight",
            self.demand.background.origin_weight,
            0.0,
        );
        at_least(
            "demand.background.destination_weight",
            self.demand.background.destination_weight,
            0.0,
        );
        at_least("pricing.base", self.pricing.base, 0.0);
        at_least("matching.rider_value", self.matching.rider_value, 0.0);
        at_least("pricing.per_km", self.pricing.per_km, 0.0);
        at_least("pricing.per_minute", self.pricing.per_minute, 0.0);
        at_least(
            "pricing.pickup_cost_per_km",
            self.pricing.pickup_cost_per_km,
            0.0,
        );
        if self.demand.decline_max > 1.0 {
            out.push(format!(
                "demand.decline_max = {} must be at most 1",
                self.demand.decline_max
            ));
        }
        if let Err(e) = self.city.centre.check("city.centre") {
            out.push(e.0);
        }
        if self.city.start_hour > 23 {
            out.push(format!(
                "city.start_hour = {} must be 0 to 23",
                self.city.start_hour
            ));
        }
        if self.fleet.drivers == 0 {
            out.push("fleet.drivers = 0: a city needs at least one driver".into());
        }
        for (field, profile) in [
            ("fleet.online", &self.fleet.online),
            ("demand.profile", &self.demand.profile),
        ] {
            if profile.len() != 24 {
                out.push(format!(
                    "{field} has {} values; it needs one per hour (24)",
                    profile.len()
                ));
            }
            for (hour, v) in profile.iter().enumerate() {
                if !(v.is_finite() && *v >= 0.0) {
                    out.push(format!("{field}[{hour}] = {v} must be a number >= 0"));
                }
            }
        }
        if self.fleet.online.iter().any(|v| *v > 1.0) {
            out.push("fleet.online values are fractions of the fleet (0 to 1)".into());
        }
        if self.fleet.online.iter().all(|v| *v <= 0.0) {
            out.push("fleet.online is zero in every hour: no driver ever works".into());
        }
        if self.matching.nearest == 0 {
            out.push("matching.nearest = 0: each request must see at least one driver".into());
        }
        for (i, zone) in self.demand.zones.iter().enumerate() {
            let field = format!("demand.zones[{i}]");
            if let Err(e) = zone.centre.check(&format!("{field}.centre")) {
                out.push(e.0);
            } else if haversine_km(zone.centre, self.city.centre) > self.city.radius_km {
                out.push(format!(
                    "{field}.centre ({}) lies outside the city (radius {} km)",
                    zone.name, self.city.radius_km
                ));
            }
            for (name, v) in [
                ("spread_km", zone.spread_km),
                ("origin_weight", zone.origin_weight),
                ("destination_weight", zone.destination_weight),
            ] {
                let ok = if name == "spread_km" {
                    v.is_finite() && v > 0.0
                } else {
                    v.is_finite() && v >= 0.0
                };
                if !ok {
                    out.push(format!("{field}.{name} = {v} is out of range"));
                }
            }
        }
        let origin: f64 = self.demand.background.origin_weight
            + self
                .demand
                .zones
                .iter()
                .map(|z| z.origin_weight)
                .sum::<f64>();
        let destination: f64 = self.demand.background.destination_weight
            + self
                .demand
                .zones
                .iter()
                .map(|z| z.destination_weight)
                .sum::<f64>();
        if origin.is_finite() && origin <= 0.0 {
            out.push("demand: every origin weight is zero".into());
        }
        if destination.is_finite() && destination <= 0.0 {
            out.push("demand: every destination weight is zero".into());
        }
        if let Err(e) = self.value.check() {
            out.push(format!("value.{e}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_scenario_is_valid_and_bad_ones_name_the_field() {
        assert!(Scenario::default().problems().is_empty());
        let p = Path::new("city.toml");
        let e = Scenario::parse("[fleet]\ndrivers = 0\n", p).expect_err("no drivers");
        assert!(e.to_string().contains("fleet.drivers = 0"), "{e}");
        let e = Scenario::parse("[demand]\nrequests_per_hour = -5.0\n", p).expect_err("negative");
        assert!(
            e.to_string().contains("demand.requests_per_hour = -5"),
            "{e}"
        );
        let e = Scenario::parse("[city]\nradius = 3.0\n", p).expect_err("unknown field");
        let text = e.to_string();
        assert!(text.starts_with("city.toml:2:1: city.radius:"), "{text}");
        assert!(text.contains("unknown field `radius`"), "{text}");
        let e = Scenario::parse("[fleet]\nonline = [0.5]\n", p).expect_err("short profile");
        assert!(e.to_string().contains("fleet.online has 1 values"), "{e}");
        let e = Scenario::parse("[city\n", p).expect_err("syntax");
        assert!(e.to_string().starts_with("city.toml:1:"), "{e}");
        let e = Scenario::parse("[value]\nalpha = 2.0\n", p).expect_err("alpha");
        assert!(e.to_string().contains("value.alpha 2"), "{e}");
    }
}
