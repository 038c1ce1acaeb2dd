//! `count_by_key`: exchange keys to their owning worker and count them.

use prometheus::IntCounter;
use rustc_hash::FxHashMap;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::{Stream, StreamVec};

use crate::placement::route;

/// Counts keys on the worker that owns each key.
pub trait CountByKey<'scope> {
    /// Exchanges every key to its owner ([`route`]) and counts it there. When
    /// the input is exhausted the operator emits one `(key, total)` pair per
    /// key it owns. Until then it holds a single capability that follows its
    /// input frontier, so downstream progress (and the frontier lag a probe
    /// reports) tracks the input epoch by epoch rather than waiting at the
    /// first one. Records are counted in `records` as they arrive.
    ///
    /// ```
    /// use dataflows::jobs::count::CountByKey;
    /// use timely::dataflow::operators::{Capture, ToStream};
    /// use timely::dataflow::operators::capture::Extract;
    ///
    /// let captured = timely::example(|scope| {
    ///     let records = prometheus::IntCounter::new("records", "records").unwrap();
    ///     vec![7u64, 7, 3].to_stream(scope).count_by_key(records).capture()
    /// });
    /// let mut counts: Vec<(u64, u64)> = captured.extract().into_iter().flat_map(|(_, v)| v).collect();
    /// counts.sort();
    /// assert_eq!(counts, vec![(3, 1), (7, 2)]);
    /// ```
    fn count_by_key(self, records: IntCounter) -> StreamVec<'scope, u64, (u64, u64)>;
}

impl<'scope> CountByKey<'scope> for Stream<'scope, u64, Vec<u64>> {
    fn count_by_key(self, records: IntCounter) -> StreamVec<'scope, u64, (u64, u64)> {
        let pact = Exchange::new(|key: &u64| route(*key));
        self.unary_frontier(pact, "CountByKey", move |initial, _info| {
            let mut capability = Some(initial);
            let mut totals: FxHashMap<u64, u64> = FxHashMap::default();
            move |(input, frontier), output| {
                input.for_each(|_cap, keys| {
                    records.inc_by(keys.len() as u64);
                    for key in keys.drain(..) {
                        *totals.entry(key).or_insert(0) += 1;
                    }
                });
                let Some(cap) = capability.as_mut() else {
                    return;
                };
                match frontier.frontier().iter().min() {
                    // Follow the input: nothing earlier can be produced any more.
                    Some(earliest) => {
                        if cap.time() < earliest {
                            cap.downgrade(earliest);
                        }
                    }
                    // Input exhausted: emit the totals and let go.
                    None => {
                        output.session(&*cap).give_iterator(totals.drain());
                        capability = None;
                    }
                }
            }
        })
    }
}
