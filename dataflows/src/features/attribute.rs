//! Click attribution: impressions joined with their clicks and their
//! feature values into examples.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::{Stream, StreamVec};

use super::window_counts::fingerprint;
use super::{AdEvent, AdExample, AttributionSpec, FeatureValue, bucket};
use crate::events::{AdClick, AdImpression};
use crate::placement::route;

/// What [`Attribute`] emits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AttributionOutput {
    /// A labelled impression with its features, at `bucket(t_imp + window)`.
    Example(AdExample),
    /// A click that labelled no impression, at its own timestamp.
    Orphan(AdClick),
    /// A feature's distinct keys on one worker (passed through, at the end).
    Keys {
        /// Index into the features.
        feature: u32,
        /// Distinct keys.
        distinct: u64,
    },
}

/// An impression waiting for its attribution window to close.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Waiting {
    impression: AdImpression,
    fingerprint: u64,
    clicked: bool,
}

/// Joins each impression with the clicks that name it.
pub trait Attribute<'scope> {
    /// An impression at `t` is positive iff a click names its id with event
    /// time in `[t, t + window]`; its example (with `features` values from
    /// `values`, in feature order) is emitted once both inputs' frontiers
    /// pass `bucket(t + window)`. A click that labels nothing is an orphan.
    /// Both streams carry on-time records only.
    ///
    /// ```
    /// use dataflows::features::{AdEvent, Attribute, AttributionOutput, AttributionSpec};
    /// use dataflows::events::{AdClick, AdContext, AdImpression};
    /// use timely::dataflow::operators::{Capture, ToStream};
    /// use timely::dataflow::operators::capture::Event;
    ///
    /// let impression = AdEvent::Impression(AdImpression {
    ///     schema_version: 1, event_time: 1_000, impression_id: 5, member_id: 7, item_id: 1,
    ///     campaign_id: 2, context: AdContext { device: "mobile".into(), placement: "feed".into(),
    ///     position: 1, country: "US".into(), hour: 0 },
    /// });
    /// let click = |id, t| AdEvent::Click(AdClick {
    ///     schema_version: 1, event_time: t, impression_id: id, member_id: 7, item_id: 1, campaign_id: 2,
    /// });
    /// let captured = timely::example(move |scope| {
    ///     let events = vec![impression.clone(), click(5, 1_600), click(6, 1_700)].to_stream(scope);
    ///     let values = Vec::<dataflows::features::FeatureValue>::new().to_stream(scope);
    ///     events.attribute(values, AttributionSpec { window_ms: 600 }, 1_000, 0).capture()
    /// });
    /// let out: Vec<AttributionOutput> = captured.try_iter()
    ///     .flat_map(|e| match e { Event::Messages(_, v) => v, Event::Progress(_) => Vec::new() })
    ///     .collect();
    /// // The click at exactly t + window labels the impression; the other is an orphan.
    /// assert!(out.iter().any(|o| matches!(o, AttributionOutput::Example(e) if e.clicked)));
    /// assert!(out.iter().any(|o| matches!(o, AttributionOutput::Orphan(c) if c.impression_id == 6)));
    /// ```
    fn attribute(
        self,
        values: StreamVec<'scope, u64, FeatureValue>,
        spec: AttributionSpec,
        bucket_ms: u64,
        features: usize,
    ) -> StreamVec<'scope, u64, AttributionOutput>;
}

impl<'scope> Attribute<'scope> for Stream<'scope, u64, Vec<AdEvent>> {
    fn attribute(
        self,
        values: StreamVec<'scope, u64, FeatureValue>,
        spec: AttributionSpec,
        bucket_ms: u64,
        features: usize,
    ) -> StreamVec<'scope, u64, AttributionOutput> {
        attribute_with(
            self,
            values,
            spec,
            (bucket_ms, features),
            &crate::checkpoint::States::off(),
        )
    }
}

/// The attribution in a checkpoint: the impressions still waiting (with
/// whether a click labelled them) and the feature values found for them.
#[derive(Serialize, Deserialize)]
struct SavedAttribution {
    waiting: Vec<(u64, Vec<Waiting>)>,
    found: Vec<(u64, Vec<Option<u64>>)>,
}

/// [`Attribute::attribute`], its state registered in `states` as
/// `attribution` (checkpoints).
pub fn attribute_with<'scope>(
    events: Stream<'scope, u64, Vec<AdEvent>>,
    values: StreamVec<'scope, u64, FeatureValue>,
    spec: AttributionSpec,
    (bucket_ms, features): (u64, usize),
    states: &crate::checkpoint::States,
) -> StreamVec<'scope, u64, AttributionOutput> {
    use std::cell::RefCell;
    use std::rc::Rc;
    {
        let window = spec.window_ms;
        events.binary_frontier(
            values,
            Exchange::new(|e: &AdEvent| route(e.impression_id())),
            Exchange::new(|v: &FeatureValue| match v {
                FeatureValue::Value { impression_id, .. } => route(*impression_id),
                FeatureValue::Keys { .. } => 0,
            }),
            "Attribute",
            move |initial, _info| {
                // Capabilities for the times something is due, and what is.
                let mut caps: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
                let mut due: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
                let mut clicks: BTreeMap<u64, Vec<AdClick>> = BTreeMap::new();
                let mut waiting: FxHashMap<u64, Vec<Waiting>> = FxHashMap::default();
                let mut found: FxHashMap<u64, Vec<Option<u64>>> = FxHashMap::default();
                if let Some(saved) = states.take::<SavedAttribution>("attribution") {
                    for (id, list) in saved.waiting {
                        for w in &list {
                            let at = bucket(event_ms(w.impression.event_time) + window, bucket_ms);
                            due.entry(at).or_default().push(id);
                            caps.entry(at).or_insert_with(|| initial.delayed(&at));
                        }
                        waiting.insert(id, list);
                    }
                    found.extend(saved.found);
                }
                drop(initial);
                let shared = Rc::new(RefCell::new((waiting, found)));
                {
                    let shared = Rc::clone(&shared);
                    // Clicks are applied once their timestamp is complete:
                    // every click before a checkpoint time already is.
                    states.register("attribution", move |time| {
                        let (waiting, found) = &*shared.borrow();
                        let mut kept: Vec<(u64, Vec<Waiting>)> = waiting
                            .iter()
                            .map(|(id, list)| {
                                let before: Vec<Waiting> = list
                                    .iter()
                                    .filter(|w| {
                                        bucket(event_ms(w.impression.event_time), bucket_ms) < time
                                    })
                                    .cloned()
                                    .collect();
                                (*id, before)
                            })
                            .filter(|(_, list)| !list.is_empty())
                            .collect();
                        kept.sort_unstable_by_key(|(id, _)| *id);
                        let mut values: Vec<(u64, Vec<Option<u64>>)> =
                            found.iter().map(|(k, v)| (*k, v.clone())).collect();
                        values.sort_unstable_by_key(|(k, _)| *k);
                        crate::checkpoint::encode(&SavedAttribution {
                            waiting: kept,
                            found: values,
                        })
                    });
                }
                move |(events, events_frontier), (values, values_frontier), output| {
                    let (waiting, found) = &mut *shared.borrow_mut();
                    events.for_each(|cap, data| {
                        for event in data.drain(..) {
                            let at = match &event {
                                AdEvent::Impression(i) => {
                                    bucket(event_ms(i.event_time) + window, bucket_ms)
                                }
                                AdEvent::Click(c) => bucket(event_ms(c.event_time), bucket_ms),
                            };
                            if !caps.contains_key(&at)
                                && let Some(&now) = cap.least()
                            {
                                caps.insert(at, cap.delayed(&at.max(now), 0));
                            }
                            match event {
                                AdEvent::Impression(i) => {
                                    due.entry(at).or_default().push(i.impression_id);
                                    waiting.entry(i.impression_id).or_default().push(Waiting {
                                        fingerprint: fingerprint(&i),
                                        impression: i,
                                        clicked: false,
                                    });
                                }
                                AdEvent::Click(c) => clicks.entry(at).or_default().push(c),
                            }
                        }
                    });
                    values.for_each(|cap, data| {
                        for value in data.drain(..) {
                            match value {
                                FeatureValue::Value {
                                    impression,
                                    feature,
                                    value,
                                    ..
                                } => {
                                    let slots = found
                                        .entry(impression)
                                        .or_insert_with(|| vec![None; features]);
                                    if let Some(slot) = slots.get_mut(feature as usize) {
                                        *slot = Some(value);
                                    }
                                }
                                FeatureValue::Keys { feature, distinct } => {
                                    if let Some(held) = cap.retain_least(0) {
                                        output
                                            .session(&held)
                                            .give(AttributionOutput::Keys { feature, distinct });
                                    }
                                }
                            }
                        }
                    });
                    // Everything before `complete` has arrived on both inputs.
                    let lower = |f: timely::progress::frontier::AntichainRef<'_, u64>| {
                        f.iter().min().copied().unwrap_or(u64::MAX)
                    };
                    let complete =
                        lower(events_frontier.frontier()).min(lower(values_frontier.frontier()));
                    let ready: Vec<u64> = caps.range(..complete).map(|(t, _)| *t).collect();
                    for t in ready {
                        let Some(cap) = caps.remove(&t) else { continue };
                        let mut session = output.session(&cap);
                        // Clicks first: every impression they may label
                        // (t_imp ≤ click) is in, and none is emitted yet
                        // whose window reaches the click.
                        for click in clicks.remove(&t).unwrap_or_default() {
                            let c = event_ms(click.event_time);
                            let mut labelled = false;
                            for w in waiting.get_mut(&click.impression_id).into_iter().flatten() {
                                let t_imp = event_ms(w.impression.event_time);
                                if t_imp <= c && c <= t_imp + window {
                                    w.clicked = true;
                                    labelled = true;
                                }
                            }
                            if !labelled {
                                session.give(AttributionOutput::Orphan(click));
                            }
                        }
                        for id in due.remove(&t).unwrap_or_default() {
                            let Some(list) = waiting.get_mut(&id) else {
                                continue;
                            };
                            // The copies of this id due now (a stream may repeat an id).
                            let mut k = 0;
                            while k < list.len() {
                                let t_imp = event_ms(list[k].impression.event_time);
                                if bucket(t_imp + window, bucket_ms) != t {
                                    k += 1;
                                    continue;
                                }
                                let w = list.swap_remove(k);
                                // An exact repeat shares the values of its twin.
                                let twin = list.iter().any(|o| o.fingerprint == w.fingerprint);
                                let values = if twin {
                                    found.get(&w.fingerprint).cloned()
                                } else {
                                    found.remove(&w.fingerprint)
                                }
                                .unwrap_or_default();
                                session.give(AttributionOutput::Example(AdExample {
                                    features: (0..features)
                                        .map(|f| values.get(f).copied().flatten().unwrap_or(0))
                                        .collect(),
                                    impression: w.impression,
                                    clicked: w.clicked,
                                }));
                                break;
                            }
                            if list.is_empty() {
                                waiting.remove(&id);
                            }
                        }
                    }
                }
            },
        )
    }
}

/// Event time as the unsigned ms the clock uses (negative times are refused
/// at the source).
fn event_ms(t: i64) -> u64 {
    t.max(0) as u64
}
