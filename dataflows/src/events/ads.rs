//! The ads generator: impressions and the clicks they earn, from a known
//! logistic click model whose parameters ([`AdsTruth`]) drift per campaign
//! over time, so a learner's estimates can be checked against the truth.
//!
//! Shapes: impressions follow a daily cycle (peak mid-afternoon UTC, a
//! trough at night); members are skewed (a few very active ones); every
//! member has their own click propensity (the random effect a GLMix model
//! estimates); each campaign's click-through rate drifts linearly in logit
//! space at its own rate per day.

use std::f64::consts::PI;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{AdClick, AdContext, AdImpression, Event, SCHEMA_VERSION};
use crate::placement::mix64;

/// 2026-11-26T00:00:00Z, where simulated time starts by default.
pub const DEFAULT_START_MS: i64 = 1_795_651_200_000;

const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];
const PLACEMENTS: [&str; 3] = ["feed", "right_rail", "search"];
const COUNTRIES: [&str; 6] = ["US", "IN", "BR", "GB", "DE", "NG"];

/// The click model the generator draws from.
#[derive(Clone, Debug, PartialEq)]
pub struct AdsTruth {
    /// Logit intercept per campaign at the start time.
    pub campaign_bias: Vec<f64>,
    /// Change of each campaign's logit per simulated day.
    pub campaign_drift_per_day: Vec<f64>,
    /// Logit effect per device (mobile, desktop, tablet).
    pub device: [f64; 3],
    /// Logit effect per placement (feed, right_rail, search).
    pub placement: [f64; 3],
    /// Logit change per slot below the first.
    pub position_slope: f64,
    /// Amplitude of the evening lift (peaks at 20:00 UTC).
    pub evening_lift: f64,
    /// Standard deviation of the per-member effect.
    pub member_sd: f64,
    /// Generator seed (the member effects derive from it).
    pub seed: u64,
    /// Simulated start, ms since the epoch.
    pub start_ms: i64,
    /// Random-walk steps, per campaign and simulated hour, of the intercept
    /// and the search-placement coefficient (cumulated; empty when off).
    walk: Vec<[f64; 2]>,
    /// Hours the walk covers (it holds its last value afterwards).
    walk_hours: usize,
    /// Each campaign's active span in simulated hours since the start
    /// (always active when empty).
    lifetimes: Vec<(f64, f64)>,
    /// Logit change of every impression per simulated day.
    pub global_drift_per_day: f64,
}

/// How a drifting ads stream drifts (all zero: the plain linear drift).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Drift {
    /// Standard deviation per simulated hour of each campaign's random walk
    /// (intercept and search coefficient).
    pub walk_sd_per_hour: f64,
    /// Hours a campaign runs (0: always); starts are spread so that new
    /// campaigns keep arriving (cold starts).
    pub lifetime_hours: f64,
    /// Logit change of every impression per simulated day.
    pub global_per_day: f64,
    /// Hours of simulated time to prepare the walks and lifetimes for.
    pub horizon_hours: f64,
}

/// A standard normal value derived from a hash (Box–Muller on two hashes).
fn hashed_normal(h: u64) -> f64 {
    let u1 = ((mix64(h) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = ((mix64(h ^ 0xA5A5) >> 11) as f64) / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

impl AdsTruth {
    /// The model for `campaigns` campaigns, drawn from `seed`.
    pub fn new(seed: u64, campaigns: usize, start_ms: i64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(mix64(seed ^ 0xAD5));
        Self {
            campaign_bias: (0..campaigns)
                .map(|_| -3.4 + 0.6 * (rng.random::<f64>() * 2.0 - 1.0))
                .collect(),
            campaign_drift_per_day: (0..campaigns)
                .map(|_| 0.8 * (rng.random::<f64>() * 2.0 - 1.0))
                .collect(),
            device: [0.0, -0.35, -0.15],
            placement: [0.0, -0.6, 0.45],
            position_slope: -0.18,
            evening_lift: 0.25,
            member_sd: 0.5,
            seed,
            start_ms,
            walk: Vec::new(),
            walk_hours: 0,
            lifetimes: Vec::new(),
            global_drift_per_day: 0.0,
        }
    }

    /// The model with `drift`: random walks, campaign lifetimes, global drift.
    pub fn with_drift(seed: u64, campaigns: usize, start_ms: i64, drift: Drift) -> Self {
        let mut truth = Self::new(seed, campaigns, start_ms);
        let hours = drift.horizon_hours.max(1.0).ceil() as usize;
        if drift.walk_sd_per_hour > 0.0 {
            truth.walk_hours = hours;
            truth.walk = Vec::with_capacity(campaigns * hours);
            for c in 0..campaigns {
                let mut level = [0.0, 0.0];
                for h in 0..hours {
                    for (k, l) in level.iter_mut().enumerate() {
                        let key = seed ^ mix64((c * hours + h) as u64 * 2 + k as u64);
                        *l += drift.walk_sd_per_hour * hashed_normal(key);
                    }
                    truth.walk.push(level);
                }
            }
        }
        if drift.lifetime_hours > 0.0 {
            let mut rng = ChaCha8Rng::seed_from_u64(mix64(seed ^ 0x11FE));
            let span = drift.horizon_hours + drift.lifetime_hours;
            truth.lifetimes = (0..campaigns)
                .map(|_| {
                    let start = rng.random::<f64>() * span - drift.lifetime_hours;
                    (start, start + drift.lifetime_hours)
                })
                .collect();
        }
        truth.global_drift_per_day = drift.global_per_day;
        truth
    }

    /// Whether campaign `c` runs `hours` after the start.
    pub fn active(&self, c: usize, hours: f64) -> bool {
        self.lifetimes
            .get(c)
            .is_none_or(|(from, to)| (*from..*to).contains(&hours))
    }

    fn walked(&self, c: usize, hours: f64) -> [f64; 2] {
        if self.walk.is_empty() {
            return [0.0, 0.0];
        }
        let h = (hours.max(0.0) as usize).min(self.walk_hours - 1);
        self.walk[c * self.walk_hours + h]
    }

    /// The member's own logit offset.
    pub fn member_effect(&self, member_id: u64) -> f64 {
        self.member_sd * hashed_normal(self.seed ^ member_id.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Click log-odds of an impression.
    pub fn logit(&self, impression: &AdImpression) -> f64 {
        let c = impression.campaign_id as usize % self.campaign_bias.len().max(1);
        let days = (impression.event_time - self.start_ms) as f64 / 86_400_000.0;
        let ctx = &impression.context;
        let index = |names: &[&str], name: &str| names.iter().position(|n| *n == name).unwrap_or(0);
        let walked = self.walked(c, days * 24.0);
        let search = if ctx.placement == "search" {
            walked[1]
        } else {
            0.0
        };
        self.campaign_bias[c]
            + walked[0]
            + search
            + self.global_drift_per_day * days
            + self.campaign_drift_per_day[c] * days
            + self.device[index(&DEVICES, &ctx.device)]
            + self.placement[index(&PLACEMENTS, &ctx.placement)]
            + self.position_slope * (ctx.position.saturating_sub(1)) as f64
            + self.evening_lift * (2.0 * PI * (f64::from(ctx.hour) - 20.0) / 24.0).cos()
            + self.member_effect(impression.member_id)
    }

    /// Click probability of an impression.
    pub fn click_probability(&self, impression: &AdImpression) -> f64 {
        1.0 / (1.0 + (-self.logit(impression)).exp())
    }
}

/// Relative event rate at `ms` (daily cycle, mean 1): 0.4 at 03:00 UTC,
/// 1.6 at 15:00.
pub fn daily_intensity(ms: i64) -> f64 {
    let hour = (ms.rem_euclid(86_400_000)) as f64 / 3_600_000.0;
    1.0 + 0.6 * (2.0 * PI * (hour - 9.0) / 24.0).sin()
}

/// One shard of the ads stream: deterministic for (seed, shard, shards).
#[derive(Debug)]
pub struct AdsGenerator {
    rng: ChaCha8Rng,
    truth: Arc<AdsTruth>,
    members: u64,
    items_per_campaign: u64,
    clock_ms: f64,
    /// Mean simulated gap between this shard's impressions at intensity 1.
    gap_ms: f64,
    shard: u64,
    shards: u64,
    sequence: u64,
    pending: Option<AdClick>,
}

impl AdsGenerator {
    /// Shard `shard` of `shards` (the shards together make the stream):
    /// `members` members, `truth`'s campaigns, `impressions_per_second`
    /// simulated impressions per second across all shards at mean intensity.
    pub fn new(
        truth: Arc<AdsTruth>,
        members: u64,
        impressions_per_second: f64,
        shard: u64,
        shards: u64,
    ) -> Self {
        let shards = shards.max(1);
        Self {
            rng: ChaCha8Rng::seed_from_u64(mix64(truth.seed) ^ mix64(shard + 1)),
            members: members.max(1),
            items_per_campaign: 25,
            clock_ms: truth.start_ms as f64,
            gap_ms: 1000.0 * shards as f64 / impressions_per_second.max(1e-9),
            truth,
            shard,
            shards,
            sequence: 0,
            pending: None,
        }
    }

    /// The click model.
    pub fn truth(&self) -> &AdsTruth {
        &self.truth
    }

    fn impression(&mut self) -> AdImpression {
        // Exponential gaps, thinned by the daily cycle.
        let u: f64 = self.rng.random::<f64>().max(1e-12);
        self.clock_ms += -u.ln() * self.gap_ms / daily_intensity(self.clock_ms as i64);
        let event_time = self.clock_ms as i64;
        // Skewed activity: low member ids are the heavy users.
        let x: f64 = self.rng.random();
        let member_id = 1 + ((x * x * self.members as f64) as u64).min(self.members - 1);
        let profile = mix64(self.truth.seed ^ member_id);
        let device = match profile % 10 {
            0..=6 => 0,
            7..=8 => 1,
            _ => 2,
        };
        let country = COUNTRIES[((profile >> 8) % COUNTRIES.len() as u64) as usize];
        let campaigns = self.truth.campaign_bias.len().max(1) as u64;
        let hours = (event_time - self.truth.start_ms) as f64 / 3_600_000.0;
        // A campaign that runs now (a few tries; any campaign if none does).
        let mut campaign_id = self.rng.random_range(0..campaigns);
        for _ in 0..64 {
            if self.truth.active(campaign_id as usize, hours) {
                break;
            }
            campaign_id = self.rng.random_range(0..campaigns);
        }
        let item_id = campaign_id * self.items_per_campaign
            + self.rng.random_range(0..self.items_per_campaign)
            + 1;
        let placement = match self.rng.random_range(0..10u32) {
            0..=5 => 0,
            6..=7 => 1,
            _ => 2,
        };
        let position = 1 + self
            .rng
            .random_range(0..6u32)
            .min(self.rng.random_range(0..6u32));
        self.sequence += 1;
        AdImpression {
            schema_version: SCHEMA_VERSION,
            event_time,
            impression_id: self.sequence * self.shards + self.shard,
            member_id,
            item_id,
            campaign_id,
            context: AdContext {
                device: DEVICES[device].into(),
                placement: PLACEMENTS[placement].into(),
                position,
                country: country.into(),
                hour: ((event_time.rem_euclid(86_400_000)) / 3_600_000) as u32,
            },
        }
    }
}

impl Iterator for AdsGenerator {
    type Item = Event;

    /// The next event: an impression, or the click an earlier impression
    /// earned (clicks come right after their impression, 2–60 s later in
    /// event time).
    fn next(&mut self) -> Option<Event> {
        if let Some(click) = self.pending.take() {
            return Some(Event::AdClick(click));
        }
        let impression = self.impression();
        if self.rng.random::<f64>() < self.truth.click_probability(&impression) {
            self.pending = Some(AdClick {
                schema_version: SCHEMA_VERSION,
                event_time: impression.event_time + self.rng.random_range(2_000..60_000),
                impression_id: impression.impression_id,
                member_id: impression.member_id,
                item_id: impression.item_id,
                campaign_id: impression.campaign_id,
            });
        }
        Some(Event::AdImpression(impression))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator_at(seed: u64, shard: u64, shards: u64, rate: f64) -> AdsGenerator {
        AdsGenerator::new(
            Arc::new(AdsTruth::new(seed, 40, DEFAULT_START_MS)),
            50_000,
            rate,
            shard,
            shards,
        )
    }

    fn generator(seed: u64, shard: u64, shards: u64) -> AdsGenerator {
        generator_at(seed, shard, shards, 2.5)
    }

    #[test]
    fn same_seed_same_stream_and_every_event_is_valid() {
        let a: Vec<Event> = generator(7, 0, 1).take(2000).collect();
        let b: Vec<Event> = generator(7, 0, 1).take(2000).collect();
        let c: Vec<Event> = generator(8, 0, 1).take(2000).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        for e in &a {
            e.validate().unwrap();
            assert_eq!(super::super::parse_line(&e.to_line()).unwrap(), *e);
        }
    }

    #[test]
    fn clicks_follow_their_impression_at_the_model_rate() {
        let g = generator(3, 0, 1);
        let truth = g.truth().clone();
        let (mut expected, mut clicks, mut impressions) = (0.0, 0u64, 0u64);
        let mut last: Option<AdImpression> = None;
        for e in g.take(200_000) {
            match e {
                Event::AdImpression(i) => {
                    expected += truth.click_probability(&i);
                    impressions += 1;
                    last = Some(i);
                }
                Event::AdClick(c) => {
                    let i = last.as_ref().unwrap();
                    assert_eq!(c.impression_id, i.impression_id);
                    assert!(c.event_time > i.event_time);
                    clicks += 1;
                }
                _ => unreachable!(),
            }
        }
        // Binomial: the count is within 4 standard deviations of its mean.
        let sd = expected.sqrt();
        assert!(
            (clicks as f64 - expected).abs() < 4.0 * sd,
            "{clicks} clicks, {expected:.0} expected of {impressions}"
        );
        let ctr = clicks as f64 / impressions as f64;
        assert!((0.01..0.08).contains(&ctr), "ctr {ctr}");
    }

    #[test]
    fn shards_split_time_and_ids() {
        let a: Vec<Event> = generator(1, 0, 2).take(500).collect();
        let b: Vec<Event> = generator(1, 1, 2).take(500).collect();
        let ids = |v: &[Event]| -> Vec<u64> {
            v.iter()
                .filter_map(|e| match e {
                    Event::AdImpression(i) => Some(i.impression_id),
                    _ => None,
                })
                .collect()
        };
        assert!(ids(&a).iter().all(|i| i % 2 == 0));
        assert!(ids(&b).iter().all(|i| i % 2 == 1));
        assert_ne!(a[0], b[0]);
    }

    #[test]
    fn the_daily_cycle_shapes_event_times() {
        // A week of simulated time: more impressions in the afternoon than at night.
        let mut by_hour = [0u64; 24];
        for e in generator_at(5, 0, 1, 0.1).take(60_000) {
            if let Event::AdImpression(i) = e {
                by_hour[i.context.hour as usize] += 1;
            }
        }
        assert!(by_hour[15] > 2 * by_hour[3], "{by_hour:?}");
    }
}
