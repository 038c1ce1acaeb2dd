//! Keyed windowed counts: the streaming features of the ads pipeline.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::{Stream, StreamVec};

use super::{AdEvent, FeatureSpec};
use crate::placement::{mix64, route};

/// What [`WindowCounts`] emits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FeatureValue {
    /// The value of feature `feature` for one impression.
    Value {
        /// The impression's id (values go where the impression goes).
        impression_id: u64,
        /// The impression's fingerprint ([`fingerprint`]).
        impression: u64,
        /// Index into the features.
        feature: u32,
        /// Events counted.
        value: u64,
    },
    /// Distinct keys this worker has seen for `feature` (sent once, at the
    /// end of the stream; each key lives on one worker, so they add up).
    Keys {
        /// Index into the features.
        feature: u32,
        /// Distinct keys.
        distinct: u64,
    },
}

/// A stable fingerprint of an impression (its id, time and every field), so
/// that feature values find their impression even if a stream repeats an id.
pub fn fingerprint(i: &crate::events::AdImpression) -> u64 {
    let c = &i.context;
    let mut h = mix64(i.impression_id);
    for x in [
        i.event_time as u64,
        i.member_id,
        i.item_id,
        i.campaign_id,
        u64::from(c.position),
        u64::from(c.hour),
        super::text_key(&c.device),
        super::text_key(&c.placement),
        super::text_key(&c.country),
    ] {
        h = mix64(h ^ x);
    }
    h
}

/// One feature's view of one event: what [`WindowCounts`] exchanges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyed {
    feature: u32,
    key: u64,
    time: u64,
    /// Counted by the feature.
    counts: bool,
    /// An impression asking for its value: its id and fingerprint.
    query: Option<(u64, u64)>,
}

/// Gives each feature's view of `event` to `give`.
fn keyed(features: &[FeatureSpec], event: &AdEvent, mut give: impl FnMut(Keyed)) {
    let impression = match event {
        AdEvent::Impression(i) => Some(i),
        AdEvent::Click(_) => None,
    };
    let query = impression.map(|i| (i.impression_id, fingerprint(i)));
    let time = event.time();
    for (f, spec) in features.iter().enumerate() {
        let counted = spec.counted(event);
        let key = match impression {
            Some(i) => spec.key.of_impression(i),
            None => match counted {
                Some(key) => key,
                None => continue,
            },
        };
        give(Keyed {
            feature: f as u32,
            key,
            time,
            counts: counted.is_some(),
            query,
        });
    }
}

/// A feature's view of an event, or the event itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Split {
    Keyed(Keyed),
    Event(AdEvent),
}

/// Splits `events` into the features' views of them (for
/// [`WindowCounts`]) and the events themselves, moving each event once
/// (no copy for a second consumer).
pub fn split_for_features<'scope>(
    events: StreamVec<'scope, u64, AdEvent>,
    features: Rc<[FeatureSpec]>,
) -> (
    StreamVec<'scope, u64, Keyed>,
    StreamVec<'scope, u64, AdEvent>,
) {
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::vec::Partition;
    let split = events.unary(Pipeline, "SplitFeatures", move |_cap, _info| {
        move |input, output| {
            input.for_each(|cap, data| {
                let mut session = output.session(&cap);
                for event in data.drain(..) {
                    keyed(&features, &event, |k| session.give(Split::Keyed(k)));
                    session.give(Split::Event(event));
                }
            });
        }
    });
    let mut parts = split.partition(2, |s| match s {
        Split::Keyed(_) => (0, s),
        Split::Event(_) => (1, s),
    });
    let events = parts.pop().unwrap_or_else(|| unreachable!("two parts"));
    let keyed = parts.pop().unwrap_or_else(|| unreachable!("two parts"));
    (
        keyed.flat_map(|s| match s {
            Split::Keyed(k) => Some(k),
            Split::Event(_) => None,
        }),
        events.flat_map(|s| match s {
            Split::Event(e) => Some(e),
            Split::Keyed(_) => None,
        }),
    )
}

/// Event times of one (feature, key), sorted, within the window.
type Times = VecDeque<u64>;

/// Windowed counts per feature, sharded by key.
pub trait WindowCounts<'scope> {
    /// Every feature's value for every impression, at the impression's
    /// timestamp, once the frontier has passed it; at the end, each feature's
    /// distinct keys. The stream must carry on-time events only, at
    /// timestamps no later than their event time.
    ///
    /// ```
    /// use dataflows::features::{FeatureSpec, FeatureValue, KeyField, Measure, WindowCounts};
    /// use dataflows::events::{AdClick, AdContext, AdImpression};
    /// use dataflows::features::AdEvent;
    /// use timely::dataflow::operators::{Capture, ToStream};
    /// use timely::dataflow::operators::capture::Extract;
    ///
    /// let impression = |id, t| AdEvent::Impression(AdImpression {
    ///     schema_version: 1, event_time: t, impression_id: id, member_id: 7, item_id: 1,
    ///     campaign_id: 2, context: AdContext { device: "mobile".into(), placement: "feed".into(),
    ///     position: 1, country: "US".into(), hour: 0 },
    /// });
    /// let click = |t| AdEvent::Click(AdClick {
    ///     schema_version: 1, event_time: t, impression_id: 1, member_id: 7, item_id: 1, campaign_id: 2,
    /// });
    /// let features = vec![FeatureSpec {
    ///     name: "member_clicks".into(), key: KeyField::MemberId, measure: Measure::Clicks, window_ms: 1_000,
    /// }];
    /// let captured = timely::example(move |scope| {
    ///     // Clicks at 50 and 1_050; an impression at 1_100 sees the second only
    ///     // (the first is more than 1 s before it).
    ///     let events: timely::dataflow::StreamVec<_, AdEvent> =
    ///         vec![click(50), click(1_050), impression(9, 1_100)].to_stream(scope);
    ///     events
    ///         .window_counts(features.clone().into())
    ///         .capture()
    /// });
    /// let values: Vec<u64> = captured.extract().into_iter().flat_map(|(_, v)| v)
    ///     .filter_map(|v| match v { FeatureValue::Value { value, .. } => Some(value), _ => None })
    ///     .collect();
    /// assert_eq!(values, vec![1]);
    /// ```
    fn window_counts(self, features: Rc<[FeatureSpec]>) -> StreamVec<'scope, u64, FeatureValue>;
}

impl<'scope> WindowCounts<'scope> for Stream<'scope, u64, Vec<AdEvent>> {
    fn window_counts(self, features: Rc<[FeatureSpec]>) -> StreamVec<'scope, u64, FeatureValue> {
        let (keyed, _events) = split_for_features(self, Rc::clone(&features));
        keyed.window_counts(features)
    }
}

/// The counts over features' views made by [`split_for_features`].
impl<'scope> WindowCounts<'scope> for Stream<'scope, u64, Vec<Keyed>> {
    fn window_counts(self, features: Rc<[FeatureSpec]>) -> StreamVec<'scope, u64, FeatureValue> {
        window_counts_with(self, features, (&crate::checkpoint::States::off(), 1))
    }
}

/// The feature windows in a checkpoint: each (feature, key)'s event times
/// and each feature's keys with when each was first counted.
#[derive(Serialize, Deserialize)]
struct SavedWindows {
    state: Vec<((u32, u64), Vec<u64>)>,
    seen: Vec<Vec<(u64, u64)>>,
}

/// [`WindowCounts::window_counts`] over [`split_for_features`]' keyed view,
/// its state registered in `states` as `feature_windows` (checkpoints);
/// records are timestamped at `bucket(event_time, bucket_ms)`.
pub fn window_counts_with<'scope>(
    keyed: Stream<'scope, u64, Vec<Keyed>>,
    features: Rc<[FeatureSpec]>,
    (states, bucket_ms): (&crate::checkpoint::States, u64),
) -> StreamVec<'scope, u64, FeatureValue> {
    use std::cell::RefCell;
    {
        let windows: Vec<u64> = features.iter().map(|f| f.window_ms).collect();
        let longest = windows.iter().copied().max().unwrap_or(0);
        keyed.unary_frontier(
            Exchange::new(|k: &Keyed| route(mix64(u64::from(k.feature)) ^ k.key)),
            "WindowCounts",
            move |initial, _info| {
                let mut end_cap = Some(initial);
                let mut state: FxHashMap<(u32, u64), Times> = FxHashMap::default();
                // Each feature's keys, with the earliest event time counted.
                let mut seen: Vec<FxHashMap<u64, u64>> = vec![FxHashMap::default(); windows.len()];
                if let Some(saved) = states.take::<SavedWindows>("feature_windows") {
                    state = saved
                        .state
                        .into_iter()
                        .map(|(k, t)| (k, t.into()))
                        .collect();
                    for (f, keys) in saved.seen.into_iter().enumerate() {
                        if let Some(s) = seen.get_mut(f) {
                            s.extend(keys);
                        }
                    }
                }
                let shared = Rc::new(RefCell::new((state, seen)));
                {
                    let shared = Rc::clone(&shared);
                    states.register("feature_windows", move |time| {
                        let (state, seen) = &*shared.borrow();
                        let kept = |t: &u64| super::bucket(*t, bucket_ms) < time;
                        let mut saved_state: Vec<((u32, u64), Vec<u64>)> = state
                            .iter()
                            .map(|(k, times)| {
                                (*k, times.iter().copied().filter(kept).collect::<Vec<u64>>())
                            })
                            .filter(|(_, times)| !times.is_empty())
                            .collect();
                        saved_state.sort_unstable_by_key(|(k, _)| *k);
                        let saved_seen = seen
                            .iter()
                            .map(|keys| {
                                let mut v: Vec<(u64, u64)> = keys
                                    .iter()
                                    .filter(|(_, t)| kept(t))
                                    .map(|(k, t)| (*k, *t))
                                    .collect();
                                v.sort_unstable();
                                v
                            })
                            .collect();
                        crate::checkpoint::encode(&SavedWindows {
                            state: saved_state,
                            seen: saved_seen,
                        })
                    });
                }
                let mut queries: BTreeMap<u64, (Capability<u64>, Vec<Keyed>)> = BTreeMap::new();
                let mut swept_at = 0u64;
                move |(input, frontier), output| {
                    let (state, seen) = &mut *shared.borrow_mut();
                    input.for_each(|cap, data| {
                        for k in data.drain(..) {
                            if k.counts {
                                let first = seen[k.feature as usize].entry(k.key).or_insert(k.time);
                                *first = (*first).min(k.time);
                                let times = state.entry((k.feature, k.key)).or_default();
                                let at = times.partition_point(|&t| t <= k.time);
                                times.insert(at, k.time);
                            }
                            if k.query.is_some() {
                                let Some(&time) = cap.least() else { continue };
                                match queries.get_mut(&time) {
                                    Some((_, list)) => list.push(k),
                                    None => {
                                        if let Some(held) = cap.retain_least(0) {
                                            queries.insert(time, (held, vec![k]));
                                        }
                                    }
                                }
                            }
                        }
                    });
                    // A query at t is answered once every event before t is
                    // in: its timestamp (≤ t's bucket) is complete.
                    while let Some(entry) = queries.first_entry() {
                        if frontier.less_equal(entry.key()) {
                            break;
                        }
                        let (cap, asked) = entry.remove();
                        let mut session = output.session(&cap);
                        for q in asked {
                            let window = windows[q.feature as usize];
                            let value = state.get(&(q.feature, q.key)).map_or(0, |times| {
                                let from =
                                    times.partition_point(|&t| t < q.time.saturating_sub(window));
                                let to = times.partition_point(|&t| t < q.time);
                                (to - from) as u64
                            });
                            if let Some((impression_id, impression)) = q.query {
                                session.give(FeatureValue::Value {
                                    impression_id,
                                    impression,
                                    feature: q.feature,
                                    value,
                                });
                            }
                        }
                    }
                    // Expire: later queries are at or after the frontier, so
                    // events more than a window before it are never counted
                    // again. Swept every quarter of the longest window.
                    let lower = frontier.frontier().iter().min().copied();
                    if let Some(now) = lower
                        && now >= swept_at + longest / 4
                    {
                        swept_at = now;
                        state.retain(|(f, _), times| {
                            let horizon = now.saturating_sub(windows[*f as usize]);
                            let old = times.partition_point(|&t| t < horizon);
                            times.drain(..old);
                            !times.is_empty()
                        });
                    }
                    if lower.is_none()
                        && let Some(cap) = end_cap.take()
                    {
                        let mut session = output.session(&cap);
                        for (f, keys) in seen.iter().enumerate() {
                            session.give(FeatureValue::Keys {
                                feature: f as u32,
                                distinct: keys.len() as u64,
                            });
                        }
                    } else if let (Some(cap), Some(now)) = (end_cap.as_mut(), lower)
                        && *cap.time() < now
                    {
                        cap.downgrade(&now);
                    }
                }
            },
        )
    }
}
