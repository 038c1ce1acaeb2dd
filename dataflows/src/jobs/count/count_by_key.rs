//! `count_by_key`: exchange keys to their owning worker and count them per epoch.

use std::collections::{BTreeMap, HashMap};

use prometheus::IntCounter;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::{Stream, StreamVec};

use crate::placement::route;

/// Counts keys per epoch on the worker that owns each key.
pub trait CountByKey<'scope> {
    /// Exchanges every key to its owner ([`route`]) and emits, once an epoch
    /// is complete at the input, one `(key, occurrences)` pair for each key
    /// seen in that epoch. The counts of a key over all epochs add up to its
    /// total; records are counted in `records` as they arrive.
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
        self.unary_frontier(pact, "CountByKey", move |_initial, _info| {
            // Counts of the epochs that are still open at the input, oldest first.
            let mut open: BTreeMap<u64, (Capability<u64>, HashMap<u64, u64>)> = BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each(|cap, keys| {
                    let (Some(epoch), Some(retained)) = (cap.least().copied(), cap.retain_least(0))
                    else {
                        return;
                    };
                    records.inc_by(keys.len() as u64);
                    let (_, counts) = open
                        .entry(epoch)
                        .or_insert_with(|| (retained, HashMap::new()));
                    for key in keys.drain(..) {
                        *counts.entry(key).or_insert(0) += 1;
                    }
                });
                while let Some(entry) = open.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (cap, mut counts) = entry.remove();
                    output.session(&cap).give_iterator(counts.drain());
                }
            }
        })
    }
}
