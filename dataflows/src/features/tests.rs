use std::rc::Rc;
use std::sync::{Arc, Mutex};

use timely::dataflow::operators::capture::Event;
use timely::dataflow::operators::{Capture, ToStream};

use super::*;
use crate::events::AdContext;

fn impression(id: u64, t: i64, member: u64) -> AdEvent {
    AdEvent::Impression(AdImpression {
        schema_version: 1,
        event_time: t,
        impression_id: id,
        member_id: member,
        item_id: 1 + member % 3,
        campaign_id: member % 2,
        context: AdContext {
            device: if member.is_multiple_of(2) {
                "mobile"
            } else {
                "desktop"
            }
            .into(),
            placement: "feed".into(),
            position: 1,
            country: "US".into(),
            hour: 0,
        },
    })
}

fn click(id: u64, t: i64, member: u64) -> AdEvent {
    AdEvent::Click(AdClick {
        schema_version: 1,
        event_time: t,
        impression_id: id,
        member_id: member,
        item_id: 1 + member % 3,
        campaign_id: member % 2,
    })
}

fn feature(name: &str, key: KeyField, measure: Measure, window_ms: u64) -> FeatureSpec {
    FeatureSpec {
        name: name.into(),
        key,
        measure,
        window_ms,
    }
}

/// Runs attribution and features over `events` (all at timestamp 0) on
/// `workers` workers; returns examples sorted like the oracle's, and the
/// orphans.
fn run(
    events: Vec<AdEvent>,
    features: Vec<FeatureSpec>,
    window_ms: u64,
    workers: usize,
) -> (Vec<AdExample>, u64) {
    let events = Arc::new(events);
    let outputs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&outputs);
    timely::execute(timely::Config::process(workers), move |worker| {
        let index = worker.index();
        let mine: Vec<AdEvent> = events
            .iter()
            .enumerate()
            .filter(|(k, _)| k % workers == index)
            .map(|(_, e)| e.clone())
            .collect();
        let features: Rc<[FeatureSpec]> = features.clone().into();
        let captured = worker.dataflow::<u64, _, _>(|scope| {
            let stream = mine.to_stream(scope);
            let values = stream.clone().window_counts(Rc::clone(&features));
            stream
                .attribute(values, AttributionSpec { window_ms }, 1_000, features.len())
                .capture()
        });
        while worker.step() {}
        let got: Vec<AttributionOutput> = captured
            .try_iter()
            .flat_map(|e| match e {
                Event::Messages(_, v) => v,
                Event::Progress(_) => Vec::new(),
            })
            .collect();
        sink.lock().unwrap().extend(got);
    })
    .unwrap();
    let all = std::mem::take(&mut *outputs.lock().unwrap());
    let mut examples = Vec::new();
    let mut orphans = 0;
    for o in all {
        match o {
            AttributionOutput::Example(e) => examples.push(e),
            AttributionOutput::Orphan(_) => orphans += 1,
            AttributionOutput::Keys { .. } => {}
        }
    }
    examples.sort_by_key(|e| {
        (
            e.impression.impression_id,
            window_counts::fingerprint(&e.impression),
        )
    });
    (examples, orphans)
}

#[test]
fn a_click_at_exactly_the_window_end_counts_one_ms_later_is_an_orphan() {
    let events = vec![
        impression(1, 10_000, 7),
        click(1, 10_600, 7),
        impression(2, 20_000, 8),
        click(2, 20_601, 8),
        // Two clicks on one impression: one positive.
        impression(3, 30_000, 9),
        click(3, 30_100, 9),
        click(3, 30_200, 9),
        // Before its impression, and for an unknown id: orphans.
        click(4, 39_999, 9),
        impression(4, 40_000, 9),
        click(99, 50_000, 9),
    ];
    let (examples, orphans) = run(events, Vec::new(), 600, 2);
    let labels: Vec<(u64, bool)> = examples
        .iter()
        .map(|e| (e.impression.impression_id, e.clicked))
        .collect();
    assert_eq!(labels, vec![(1, true), (2, false), (3, true), (4, false)]);
    assert_eq!(orphans, 3);
}

#[test]
fn a_feature_counts_events_from_t_minus_window_up_to_but_not_at_t() {
    let events = vec![
        // Member 7's clicks at 5_000 (= t − window), 5_999 and 6_000 (= t).
        click(100, 5_000, 7),
        click(101, 5_999, 7),
        click(102, 6_000, 7),
        click(103, 4_999, 7),
        impression(1, 6_000, 7),
        // Impressions of member 7 before: at 5_000 and 5_500; itself not.
        impression(2, 5_500, 7),
        impression(3, 5_000, 7),
    ];
    let features = vec![
        feature("clicks", KeyField::MemberId, Measure::Clicks, 1_000),
        feature(
            "impressions",
            KeyField::MemberId,
            Measure::Impressions,
            1_000,
        ),
    ];
    let (examples, _) = run(events, features, 600, 3);
    let first = examples
        .iter()
        .find(|e| e.impression.impression_id == 1)
        .unwrap();
    assert_eq!(first.features, vec![2, 2]);
}

#[test]
fn the_operators_match_the_batch_oracle_on_1_2_and_4_workers() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut events = Vec::new();
    for id in 0..3_000u64 {
        let t = 1_000_000 + (id as i64) * 300 + rng.random_range(0..2_000);
        let member = rng.random_range(0..40);
        events.push(impression(id, t, member));
        if rng.random::<f64>() < 0.3 {
            events.push(click(id, t + rng.random_range(0..1_500), member));
        }
        if rng.random::<f64>() < 0.05 {
            events.push(click(id + 7, t + rng.random_range(0..900), member));
        }
    }
    let features = vec![
        feature("member_clicks", KeyField::MemberId, Measure::Clicks, 60_000),
        feature(
            "device_impressions",
            KeyField::Device,
            Measure::Impressions,
            20_000,
        ),
        feature("item_clicks", KeyField::ItemId, Measure::Clicks, 5_000),
    ];
    let time = EventTime {
        watermark_delay_ms: u64::MAX / 4,
        ..EventTime::default()
    };
    let expected = recompute(
        std::slice::from_ref(&events),
        time,
        AttributionSpec { window_ms: 1_000 },
        &features,
    );
    assert!(expected.orphan_clicks > 0);
    assert!(expected.examples.iter().any(|e| e.clicked));
    assert!(expected.examples.iter().any(|e| e.features[0] > 3));
    for workers in [1, 2, 4] {
        let (examples, orphans) = run(events.clone(), features.clone(), 1_000, workers);
        assert_eq!(orphans, expected.orphan_clicks, "{workers} workers");
        assert_eq!(examples, expected.examples, "{workers} workers");
    }
}
