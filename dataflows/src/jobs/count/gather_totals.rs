//! `gather_totals`: bring every worker's per-key counts to worker 0 and total them.

use std::cell::RefCell;
use std::rc::Rc;

use prometheus::IntCounter;
use rustc_hash::FxHashMap;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::{Stream, StreamVec};

use super::CountSummary;

/// Totals per-key counts on worker 0.
pub trait GatherTotals<'scope> {
    /// Sends every `(key, count)` to worker 0, which adds them up per key.
    /// When the input is exhausted (its frontier is empty) the operator writes
    /// the [`CountSummary`] into `result` on worker 0 only; pass `None` on the
    /// other workers, which receive nothing. The
    /// returned stream carries no data: its frontier says how far the totals
    /// have got, which is what a probe placed after it measures.
    fn gather_totals(
        self,
        records: IntCounter,
        result: Option<Rc<RefCell<Option<CountSummary>>>>,
    ) -> StreamVec<'scope, u64, ()>;
}

impl<'scope> GatherTotals<'scope> for Stream<'scope, u64, Vec<(u64, u64)>> {
    fn gather_totals(
        self,
        records: IntCounter,
        mut result: Option<Rc<RefCell<Option<CountSummary>>>>,
    ) -> StreamVec<'scope, u64, ()> {
        let pact = Exchange::new(|_: &(u64, u64)| 0);
        self.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
            pact,
            "GatherTotals",
            move |_initial, _info| {
                let mut totals: FxHashMap<u64, u64> = FxHashMap::default();
                move |(input, frontier), _output| {
                    input.for_each(|_cap, counts| {
                        records.inc_by(counts.len() as u64);
                        for (key, count) in counts.drain(..) {
                            *totals.entry(key).or_insert(0) += count;
                        }
                    });
                    if frontier.is_empty()
                        && let Some(slot) = result.take()
                    {
                        *slot.borrow_mut() = Some(CountSummary::from_totals(totals.drain()));
                    }
                }
            },
        )
    }
}
