//! The ads side of the learner: features of an impression, the click label
//! join, and the progressive-validation metrics.

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::{Stream, StreamVec};

use super::{Example, LearnerOutput};
use crate::events::{AdImpression, Event, WireEvent};

/// Names of the features [`ad_features`] computes, in order.
pub const AD_FEATURES: [&str; 7] = [
    "intercept",
    "device=desktop",
    "device=tablet",
    "placement=right_rail",
    "placement=search",
    "position",
    "evening",
];

/// The random-effect features of an impression: an intercept, one-hot
/// device and placement (mobile and feed are the baselines), the slot
/// position (0 for the first, scaled by 1/5), and the evening cycle
/// cos(2π(hour − 20)/24).
pub fn ad_features(impression: &AdImpression) -> Vec<f64> {
    let c = &impression.context;
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    vec![
        1.0,
        flag(c.device == "desktop"),
        flag(c.device == "tablet"),
        flag(c.placement == "right_rail"),
        flag(c.placement == "search"),
        f64::from(c.position.saturating_sub(1)) / 5.0,
        (2.0 * std::f64::consts::PI * (f64::from(c.hour) - 20.0) / 24.0).cos(),
    ]
}

/// A field of an impression that a hashed feature can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdField {
    /// `member`: the member id.
    Member,
    /// `item`: the sponsored item's id.
    Item,
    /// `campaign`: the campaign id.
    Campaign,
    /// `device`.
    Device,
    /// `placement`.
    Placement,
    /// `position`: the slot position.
    Position,
    /// `hour`: the hour of day.
    Hour,
}

impl AdField {
    /// The names a manifest may use.
    pub const NAMES: [&'static str; 7] = [
        "member",
        "item",
        "campaign",
        "device",
        "placement",
        "position",
        "hour",
    ];

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "member" => Self::Member,
            "item" => Self::Item,
            "campaign" => Self::Campaign,
            "device" => Self::Device,
            "placement" => Self::Placement,
            "position" => Self::Position,
            "hour" => Self::Hour,
            _ => return None,
        })
    }

    fn append(self, impression: &AdImpression, out: &mut String) {
        use std::fmt::Write;
        let c = &impression.context;
        // Writing to a String cannot fail.
        let _ = match self {
            Self::Member => write!(out, "{}", impression.member_id),
            Self::Item => write!(out, "{}", impression.item_id),
            Self::Campaign => write!(out, "{}", impression.campaign_id),
            Self::Device => write!(out, "{}", c.device),
            Self::Placement => write!(out, "{}", c.placement),
            Self::Position => write!(out, "{}", c.position),
            Self::Hour => write!(out, "{}", c.hour),
        };
    }
}

/// The hashed sparse features of the fixed effect: fields of an impression,
/// alone or crossed (`placement*hour`), each hashed into one of 2^bits slots
/// by [`hashed::slot`](super::hashed::slot). The name is the feature's
/// hash seed and a cross hashes its values joined by U+001F, exactly as
/// `dima learner evaluate --hashed-features` hashes CSV columns of the same
/// names: a `member` column of `dima learner dataset`'s CSV lands in the
/// same slots as the pipeline's `member` feature.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdHashing {
    names: Vec<String>,
    fields: Vec<Vec<AdField>>,
    bits: u32,
}

/// Hashed features that cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HashingError {
    /// `hash_bits` out of range.
    #[error("hash_bits {bits} must be between 1 and {max}")]
    Bits {
        /// The bits asked for.
        bits: u32,
        /// The most allowed.
        max: u32,
    },
    /// A feature names an unknown field.
    #[error("{name:?}: {field:?} is not one of {known}")]
    Field {
        /// The feature as written.
        name: String,
        /// The unknown field.
        field: String,
        /// The fields there are.
        known: String,
    },
}

impl AdHashing {
    /// Parses feature names (fields from [`AdField::NAMES`], crossed with
    /// `*`) with 2^`bits` slots; an error names the first bad one.
    pub fn parse(names: &[String], bits: u32) -> Result<Self, HashingError> {
        if !names.is_empty() && !(1..=super::hashed::MAX_BITS).contains(&bits) {
            return Err(HashingError::Bits {
                bits,
                max: super::hashed::MAX_BITS,
            });
        }
        let mut fields = Vec::new();
        for name in names {
            let parts = name
                .split('*')
                .map(|part| {
                    AdField::parse(part.trim()).ok_or_else(|| HashingError::Field {
                        name: name.clone(),
                        field: part.trim().to_owned(),
                        known: AdField::NAMES.join(", "),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            fields.push(parts);
        }
        Ok(Self {
            names: names.to_vec(),
            fields,
            bits: if names.is_empty() { 0 } else { bits },
        })
    }

    /// Hash bits (0 without hashed features).
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Whether there are no hashed features.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// One slot per hashed feature.
    pub fn slots(&self, impression: &AdImpression) -> Vec<u32> {
        let mut value = String::new();
        self.names
            .iter()
            .zip(&self.fields)
            .map(|(name, fields)| {
                value.clear();
                for (j, field) in fields.iter().enumerate() {
                    if j > 0 {
                        value.push('\u{1f}');
                    }
                    field.append(impression, &mut value);
                }
                super::hashed::slot(name, &value, self.bits)
            })
            .collect()
    }
}

/// Joins impressions with their clicks: an impression of window `t` is
/// labelled +1 if its click arrives in window `t` or `t + 1`, else −1, and
/// becomes an [`Example`] for its campaign's random effect once window `t + 1`
/// is complete (a one-window attribution delay). Input must be exchanged by
/// member (an impression and its click share the member).
pub trait LabelClicks<'scope> {
    /// The labelled examples, at the impression's window, with the slots of
    /// `hashing`'s features for the fixed effect.
    fn label_clicks(self, hashing: AdHashing) -> StreamVec<'scope, u64, Example>;
}

impl<'scope> LabelClicks<'scope> for Stream<'scope, u64, Vec<WireEvent>> {
    fn label_clicks(self, hashing: AdHashing) -> StreamVec<'scope, u64, Example> {
        let pact = Exchange::new(|e: &WireEvent| {
            crate::placement::route(match e {
                WireEvent::AdImpression(i) => i.member_id,
                WireEvent::AdClick(c) => c.member_id,
                _ => 0,
            })
        });
        self.unary_frontier(pact, "LabelClicks", move |_initial, _info| {
            let mut windows: BTreeMap<u64, (Capability<u64>, Vec<AdImpression>)> = BTreeMap::new();
            let mut clicked: FxHashMap<u64, u64> = FxHashMap::default();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    let Some(&time) = cap.least() else {
                        return;
                    };
                    for event in data.drain(..) {
                        match Event::from(event) {
                            Event::AdImpression(i) => {
                                if let Some((_, list)) = windows.get_mut(&time) {
                                    list.push(i);
                                } else if let Some(held) = cap.retain_least(0) {
                                    windows.insert(time, (held, vec![i]));
                                }
                            }
                            Event::AdClick(c) => {
                                clicked.insert(c.impression_id, time);
                            }
                            _ => {}
                        }
                    }
                });
                // Window t is final once the frontier is past t + 1.
                let done: Vec<u64> = windows
                    .keys()
                    .copied()
                    .filter(|t| !frontier.less_equal(&(t + 1)))
                    .collect();
                for t in done {
                    if let Some((cap, impressions)) = windows.remove(&t) {
                        let mut session = output.session(&cap);
                        for i in impressions {
                            let y = if clicked.remove(&i.impression_id).is_some() {
                                1.0
                            } else {
                                -1.0
                            };
                            session.give(Example {
                                id: i.impression_id,
                                entity: i.campaign_id,
                                x: ad_features(&i),
                                hashed: hashing.slots(&i),
                                y,
                                w: 1.0,
                                offset: 0.0,
                            });
                        }
                    }
                }
                // Clicks whose impression is gone (or never came) age out.
                let oldest = windows.keys().next().copied();
                let horizon = frontier.frontier().iter().min().copied();
                if let Some(now) = oldest.or(horizon) {
                    clicked.retain(|_, at| *at + 2 >= now);
                } else {
                    clicked.clear();
                }
            }
        })
    }
}

/// AUC (Mann–Whitney, ties averaged) of scores `p` for labels ±1; `None`
/// with only one class.
pub fn auc(scored: &mut [(f64, f64)]) -> Option<f64> {
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = scored.iter().filter(|(_, y)| *y > 0.0).count() as f64;
    let negatives = scored.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < scored.len() {
        let mut j = i;
        while j + 1 < scored.len() && scored[j + 1].0 == scored[i].0 {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += rank * scored[i..=j].iter().filter(|(_, y)| *y > 0.0).count() as f64;
        i = j + 1;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// Mean log loss of probabilities `p` for labels ±1 (p clamped to 1e-15).
pub fn logloss(scored: &[(f64, f64)]) -> Option<f64> {
    if scored.is_empty() {
        return None;
    }
    let total: f64 = scored
        .iter()
        .map(|(p, y)| {
            let p = p.clamp(1e-15, 1.0 - 1e-15);
            if *y > 0.0 { -p.ln() } else { -(1.0 - p).ln() }
        })
        .sum();
    Some(total / scored.len() as f64)
}

/// Progressive-validation metrics of one window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowMetrics {
    /// The window (epoch).
    pub window: u64,
    /// Examples scored.
    pub examples: u64,
    /// AUC, when both classes occur.
    pub auc: Option<f64>,
    /// Mean log loss.
    pub logloss: Option<f64>,
}

/// What the learner did in one run, gathered on worker 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LearnerSummary {
    /// Examples learned from.
    pub examples: u64,
    /// Clicks among them.
    pub positives: u64,
    /// Model updates (entity × window).
    pub updates: u64,
    /// Updates that failed (previous model kept).
    pub failed: u64,
    /// Entities with a model.
    pub entities: u64,
    /// Fixed-effect refits.
    pub fixed_effect_refits: u64,
    /// Progressive AUC over the whole run.
    pub auc: Option<f64>,
    /// Progressive mean log loss over the whole run.
    pub logloss: Option<f64>,
    /// Per window.
    pub windows: Vec<WindowMetrics>,
}

/// Scores as (p, y) in example-id order: sums then do not depend on the
/// order in which workers' scores arrived.
fn in_id_order<'a>(scored: impl Iterator<Item = &'a (u64, f64, f64)>) -> Vec<(f64, f64)> {
    let mut all: Vec<(u64, f64, f64)> = scored.copied().collect();
    all.sort_by(|a, b| {
        (a.0, a.1, a.2)
            .partial_cmp(&(b.0, b.1, b.2))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    all.into_iter().map(|(_, p, y)| (p, y)).collect()
}

/// Accumulates learner outputs (on worker 0) into a [`LearnerSummary`].
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LearnerTally {
    /// Per window: (example id, p, y).
    scored: BTreeMap<u64, Vec<(u64, f64, f64)>>,
    entities: FxHashSet<u64>,
    updates: u64,
    failed: u64,
    fixed_versions: u64,
}

impl LearnerTally {
    /// Adds one output of window `window`.
    pub fn add(&mut self, window: u64, output: LearnerOutput) {
        match output {
            LearnerOutput::Scored { id, p, y } => {
                self.scored.entry(window).or_default().push((id, p, y))
            }
            LearnerOutput::Snapshot { entity, .. } => {
                self.updates += 1;
                self.entities.insert(entity);
            }
            LearnerOutput::Failed { .. } => self.failed += 1,
            LearnerOutput::FixedEffect { version, .. } => {
                self.fixed_versions = self.fixed_versions.max(version);
            }
        }
    }

    /// The windows with scores from `first` on, in order.
    pub fn windows_from(&self, first: u64) -> Vec<u64> {
        self.scored.range(first..).map(|(w, _)| *w).collect()
    }

    /// One past the last window with scores (0 when none).
    pub fn next_window(&self) -> u64 {
        self.scored.keys().next_back().map_or(0, |w| w + 1)
    }

    /// AUC and logloss of `window`, when it has scores.
    pub fn window_metrics(&self, window: u64) -> Option<(Option<f64>, Option<f64>, u64)> {
        let mut scored = in_id_order(self.scored.get(&window)?.iter());
        let logloss = logloss(&scored);
        Some((auc(&mut scored), logloss, scored.len() as u64))
    }

    /// The summary so far.
    pub fn summary(&self) -> LearnerSummary {
        let mut all = in_id_order(self.scored.values().flatten());
        let windows = self
            .scored
            .iter()
            .map(|(w, s)| {
                let mut s = in_id_order(s.iter());
                WindowMetrics {
                    window: *w,
                    examples: s.len() as u64,
                    auc: auc(&mut s),
                    logloss: logloss(&s),
                }
            })
            .collect();
        LearnerSummary {
            examples: all.len() as u64,
            positives: all.iter().filter(|(_, y)| *y > 0.0).count() as u64,
            updates: self.updates,
            failed: self.failed,
            entities: self.entities.len() as u64,
            fixed_effect_refits: self.fixed_versions,
            logloss: logloss(&all),
            auc: auc(&mut all),
            windows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_and_logloss_on_known_values() {
        let mut perfect = vec![(0.9, 1.0), (0.8, 1.0), (0.2, -1.0), (0.1, -1.0)];
        assert_eq!(auc(&mut perfect), Some(1.0));
        let mut ties = vec![(0.5, 1.0), (0.5, -1.0)];
        assert_eq!(auc(&mut ties), Some(0.5));
        let mut mixed = vec![(0.1, 1.0), (0.4, -1.0), (0.35, 1.0), (0.8, 1.0)];
        // Positives at ranks 1, 2, 4; one negative at rank 3: (1+2+4 − 6)/3.
        assert!((auc(&mut mixed).unwrap() - 1.0 / 3.0).abs() < 1e-15);
        assert_eq!(auc(&mut [(0.3, 1.0)]), None);
        let ll = logloss(&[(0.5, 1.0), (0.5, -1.0)]).unwrap();
        assert!((ll - 2f64.ln()).abs() < 1e-15);
        assert!(logloss(&[(0.0, 1.0)]).unwrap().is_finite());
    }
}
