//! The batch oracle: lateness, attribution and features recomputed from
//! scratch, straight from the semantics in `docs/features.md`.

use rustc_hash::FxHashMap;

use super::window_counts::fingerprint;
use super::{AdEvent, AdExample, Admission, AttributionSpec, EventTime, FeatureSpec, ShareClock};

/// What [`recompute`] finds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recomputed {
    /// Every example, sorted by impression id, then fingerprint.
    pub examples: Vec<AdExample>,
    /// Late records.
    pub late: u64,
    /// Records refused for being too far ahead.
    pub future: u64,
    /// Clicks that labelled nothing.
    pub orphan_clicks: u64,
    /// Distinct keys per feature among counted events.
    pub keys: Vec<u64>,
}

/// Recomputes everything from the events of each source share, in the order
/// each share reads them.
pub fn recompute(
    shares: &[Vec<AdEvent>],
    time: EventTime,
    attribution: AttributionSpec,
    features: &[FeatureSpec],
) -> Recomputed {
    let mut out = Recomputed::default();
    let mut on_time = Vec::new();
    for share in shares {
        let mut clock = ShareClock::new(time.watermark_delay_ms, time.max_future_ms);
        for event in share {
            match clock.admit(event.time()) {
                Admission::OnTime => on_time.push(event),
                Admission::Late { .. } | Admission::AfterIdle { .. } => out.late += 1,
                Admission::Future { .. } => out.future += 1,
            }
        }
    }
    // Clicks by impression id; counted event times per (feature, key).
    let mut clicks: FxHashMap<u64, Vec<u64>> = FxHashMap::default();
    let mut counted: FxHashMap<(usize, u64), Vec<u64>> = FxHashMap::default();
    let mut impressions = Vec::new();
    for event in &on_time {
        match event {
            AdEvent::Impression(i) => impressions.push(i),
            AdEvent::Click(c) => clicks
                .entry(c.impression_id)
                .or_default()
                .push(event.time()),
        }
        for (f, spec) in features.iter().enumerate() {
            if let Some(key) = spec.counted(event) {
                counted.entry((f, key)).or_default().push(event.time());
            }
        }
    }
    for times in counted.values_mut() {
        times.sort_unstable();
    }
    out.keys = (0..features.len())
        .map(|f| counted.keys().filter(|(g, _)| *g == f).count() as u64)
        .collect();
    let window = attribution.window_ms;
    let mut labels: FxHashMap<u64, Vec<u64>> = FxHashMap::default();
    for i in &impressions {
        labels
            .entry(i.impression_id)
            .or_default()
            .push(i.event_time.max(0) as u64);
    }
    for (id, times) in &clicks {
        for &c in times {
            let labels_one = labels
                .get(id)
                .is_some_and(|ts| ts.iter().any(|&t| t <= c && c <= t + window));
            if !labels_one {
                out.orphan_clicks += 1;
            }
        }
    }
    for i in impressions {
        let t = i.event_time.max(0) as u64;
        let clicked = clicks
            .get(&i.impression_id)
            .is_some_and(|cs| cs.iter().any(|&c| t <= c && c <= t + window));
        let values = features
            .iter()
            .enumerate()
            .map(|(f, spec)| {
                let key = spec.key.of_impression(i);
                counted.get(&(f, key)).map_or(0, |times| {
                    let from = times.partition_point(|&x| x < t.saturating_sub(spec.window_ms));
                    let to = times.partition_point(|&x| x < t);
                    (to - from) as u64
                })
            })
            .collect();
        out.examples.push(AdExample {
            impression: i.clone(),
            clicked,
            features: values,
        });
    }
    out.examples
        .sort_by_key(|e| (e.impression.impression_id, fingerprint(&e.impression)));
    out
}
