//! `[jobs.*]`: the count job.

use dataflows::CountJob;

use crate::manifest::raw::RawCountJob;

use super::Problems;

pub(super) fn count_job(raw: RawCountJob, problems: &mut Problems) -> CountJob {
    let defaults = CountJob::default();
    let mut at_least_one = |value: Option<u64>, default: u64, field: &str| {
        let value = value.unwrap_or(default);
        if value == 0 {
            problems.add(format!("jobs.count.{field}"), "must be at least 1");
        }
        value.max(1)
    };
    let keys = at_least_one(raw.keys, defaults.keys, "keys");
    let epoch_events = at_least_one(raw.epoch_events, defaults.epoch_events, "epoch_events");
    let max_epochs_in_flight = at_least_one(
        raw.max_epochs_in_flight,
        defaults.max_epochs_in_flight,
        "max_epochs_in_flight",
    );
    if let Some(rate) = raw.events_per_second
        && !(rate.is_finite() && rate > 0.0)
    {
        problems.add(
            "jobs.count.events_per_second",
            format!("{rate} is not a positive rate"),
        );
    }
    CountJob {
        events: raw.events.unwrap_or(defaults.events),
        keys,
        seed: raw.seed.unwrap_or(defaults.seed),
        epoch_events,
        max_epochs_in_flight,
        events_per_second: raw.events_per_second.filter(|r| r.is_finite() && *r > 0.0),
    }
}
