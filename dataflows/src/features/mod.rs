//! Event time, click attribution and windowed streaming features of the ads
//! pipeline.
//!
//! The clock of a pipeline is its records' `event_time`. Each source share
//! (a generator shard, a worker's byte range of a file, a Kafka partition)
//! keeps a [`ShareClock`]: a record more than `watermark_delay` behind the
//! greatest event time read before it from the same share is late and goes
//! to the dead-letter sink; the share's watermark (greatest seen − delay)
//! drives the worker's input capability, and timely's progress tracking
//! makes an operator's input frontier the minimum over every share. Timely
//! timestamps are event-time buckets: `bucket_ms`-aligned milliseconds.
//!
//! On the valid stream, [`WindowCounts`] computes each [`FeatureSpec`]
//! (events of a measure with the same key in `[t − window, t)`) by keyed
//! exchange, and [`Attribute`] joins impressions with their clicks and
//! their feature values into [`AdExample`]s once the frontier passes
//! `t_imp + window`. [`recompute`] is the from-scratch batch oracle of all
//! of it. `docs/features.md` states the semantics.

mod attribute;
mod clock;
mod oracle;
mod window_counts;

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::events::{AdClick, AdImpression};

pub use attribute::{Attribute, AttributionOutput, attribute_with};
pub use clock::{Admission, ShareClock, bucket};
pub use oracle::{Recomputed, recompute};
pub use window_counts::{
    FeatureValue, Keyed, WindowCounts, split_for_features, window_counts_with,
};

/// `[pipelines.<name>.time]`: the event-time clock of a pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventTime {
    /// Bounded out-of-orderness, ms: a record more than this behind the
    /// greatest event time its share has read is late.
    pub watermark_delay_ms: u64,
    /// A record more than this ahead of its share's greatest event time is
    /// refused (it would push the watermark past every other record).
    pub max_future_ms: u64,
    /// Timely timestamps are event times rounded down to this, ms.
    pub bucket_ms: u64,
    /// A share (a Kafka partition) that has read nothing for this long no
    /// longer holds the frontier back, ms.
    pub idle_ms: u64,
}

impl Default for EventTime {
    fn default() -> Self {
        Self {
            watermark_delay_ms: 20_000,
            max_future_ms: 3_600_000,
            bucket_ms: 10_000,
            idle_ms: 10_000,
        }
    }
}

/// What a feature counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// `ad_impression` events.
    Impressions,
    /// `ad_click` events.
    Clicks,
}

impl Measure {
    /// The manifest names.
    pub const NAMES: [&'static str; 2] = ["impressions", "clicks"];

    /// `impressions` or `clicks`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "impressions" => Some(Self::Impressions),
            "clicks" => Some(Self::Clicks),
            _ => None,
        }
    }

    /// The manifest name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Impressions => "impressions",
            Self::Clicks => "clicks",
        }
    }
}

/// A field of an impression (or click) that keys a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyField {
    /// `member_id`.
    MemberId,
    /// `item_id`.
    ItemId,
    /// `campaign_id`.
    CampaignId,
    /// `context.device` (impressions only).
    Device,
    /// `context.placement` (impressions only).
    Placement,
    /// `context.position` (impressions only).
    Position,
    /// `context.country` (impressions only).
    Country,
    /// `context.hour` (impressions only).
    Hour,
}

impl KeyField {
    /// Every key field, by its path.
    pub const ALL: [(&'static str, Self); 8] = [
        ("member_id", Self::MemberId),
        ("item_id", Self::ItemId),
        ("campaign_id", Self::CampaignId),
        ("context.device", Self::Device),
        ("context.placement", Self::Placement),
        ("context.position", Self::Position),
        ("context.country", Self::Country),
        ("context.hour", Self::Hour),
    ];

    /// The field at `path`, if impressions have one.
    pub fn parse(path: &str) -> Option<Self> {
        Self::ALL.iter().find(|(p, _)| *p == path).map(|(_, f)| *f)
    }

    /// Its path.
    pub fn path(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("", |(p, _)| p)
    }

    /// Whether clicks carry it (the context is the impression's only).
    pub fn on_clicks(self) -> bool {
        matches!(self, Self::MemberId | Self::ItemId | Self::CampaignId)
    }

    /// The key of an impression: the id itself, or a stable hash of the
    /// text, so that every process agrees.
    pub fn of_impression(self, i: &AdImpression) -> u64 {
        let c = &i.context;
        match self {
            Self::MemberId => i.member_id,
            Self::ItemId => i.item_id,
            Self::CampaignId => i.campaign_id,
            Self::Device => text_key(&c.device),
            Self::Placement => text_key(&c.placement),
            Self::Position => u64::from(c.position),
            Self::Country => text_key(&c.country),
            Self::Hour => u64::from(c.hour),
        }
    }

    /// The key of a click, when clicks carry the field.
    pub fn of_click(self, c: &AdClick) -> Option<u64> {
        match self {
            Self::MemberId => Some(c.member_id),
            Self::ItemId => Some(c.item_id),
            Self::CampaignId => Some(c.campaign_id),
            _ => None,
        }
    }
}

/// The key of a text field: stable across processes and builds.
fn text_key(text: &str) -> u64 {
    crate::placement::fnv1a(text.bytes())
}

/// One windowed feature: the number of `measure` events with the same `key`
/// as the impression and event time in `[t − window_ms, t)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureSpec {
    /// Its name (a key of the example's `features`).
    pub name: String,
    /// The field whose value the events must share with the impression.
    pub key: KeyField,
    /// What is counted.
    pub measure: Measure,
    /// How far back, ms (> 0).
    pub window_ms: u64,
}

impl FeatureSpec {
    /// The key of `event` under this feature if it is counted by it.
    fn counted(&self, event: &AdEvent) -> Option<u64> {
        match (self.measure, event) {
            (Measure::Impressions, AdEvent::Impression(i)) => Some(self.key.of_impression(i)),
            (Measure::Clicks, AdEvent::Click(c)) => self.key.of_click(c),
            _ => None,
        }
    }
}

/// `[pipelines.<name>.attribution]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttributionSpec {
    /// A click labels its impression when it is at most this much later, ms.
    pub window_ms: u64,
}

impl Default for AttributionSpec {
    fn default() -> Self {
        Self { window_ms: 600_000 }
    }
}

/// The ads events that attribution and features read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AdEvent {
    /// `ad_impression`.
    Impression(AdImpression),
    /// `ad_click`.
    Click(AdClick),
}

impl AdEvent {
    /// Event time, ms (negative times are refused at the source).
    pub fn time(&self) -> u64 {
        match self {
            Self::Impression(i) => i.event_time.max(0) as u64,
            Self::Click(c) => c.event_time.max(0) as u64,
        }
    }

    /// The impression it is about.
    pub fn impression_id(&self) -> u64 {
        match self {
            Self::Impression(i) => i.impression_id,
            Self::Click(c) => c.impression_id,
        }
    }
}

/// One training example: a non-late impression, its label and its
/// streaming features (in the pipeline's feature order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdExample {
    /// The impression.
    pub impression: AdImpression,
    /// Whether a click labelled it.
    pub clicked: bool,
    /// Feature values, in [`FeatureSpec`] order.
    pub features: Vec<u64>,
}

impl AdExample {
    /// The examples sink's JSON line: `impression_id`, `event_time`,
    /// `campaign_id`, `member_id`, `item_id`, `label`, `features` by name and
    /// the impression's `context`.
    pub fn to_line(&self, names: &[String]) -> String {
        let i = &self.impression;
        let mut line = String::with_capacity(256);
        // Writing to a String cannot fail.
        let _ = write!(
            line,
            "{{\"impression_id\":{},\"event_time\":{},\"campaign_id\":{},\"member_id\":{},\"item_id\":{},\"label\":{},\"features\":{{",
            i.impression_id,
            i.event_time,
            i.campaign_id,
            i.member_id,
            i.item_id,
            u8::from(self.clicked)
        );
        for (j, (name, value)) in names.iter().zip(&self.features).enumerate() {
            if j > 0 {
                line.push(',');
            }
            let _ = write!(line, "{}:{value}", serde_json::Value::String(name.clone()));
        }
        line.push_str("},\"context\":");
        line.push_str(&serde_json::to_string(&i.context).unwrap_or_else(|_| "{}".into()));
        line.push('}');
        line
    }
}

/// The streaming-feature transform the learner applies: `ln(1 + n)`.
pub fn learner_value(count: u64) -> f64 {
    (count as f64).ln_1p()
}

#[cfg(test)]
mod tests;
