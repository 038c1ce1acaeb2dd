//! Checkpoints in one process: a run stopped after some checkpoints and
//! restored from the newest ends with the same outputs and summary as a
//! run never stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::*;
use crate::checkpoint::{CheckpointSpec, Checkpointing, Store};
use crate::pipelines::source::GeneratedLines;
use crate::pipelines::{GeneratorSpec, MatchingSpec, SinkSpec};

fn dispatch_spec(input: &Path, out: &Path) -> PipelineSpec {
    PipelineSpec {
        name: "dispatch".into(),
        family: Family::Dispatch,
        source: SourceSpec::Jsonl {
            path: input.to_owned(),
        },
        sink: SinkSpec::Jsonl {
            path: out.join("events.jsonl"),
        },
        dead_letter: out.join("dead.jsonl"),
        epoch_events: 300,
        epoch_ms: 1000,
        max_epochs_in_flight: 2,
        time: crate::features::EventTime::default(),
        attribution: None,
        features: Vec::new(),
        examples: SinkSpec::None,
        learner: None,
        matching: Some(MatchingSpec {
            config: crate::matching::operator::MatchConfig::default(),
            dispatches: SinkSpec::Jsonl {
                path: out.join("dispatches.jsonl"),
            },
        }),
    }
}

fn ckpt_spec(dir: &Path, workers: usize) -> CheckpointSpec {
    CheckpointSpec {
        dir: dir.to_owned(),
        every: Duration::ZERO,
        keep: 3,
        fingerprint: "test".into(),
        processes: 1,
        workers,
    }
}

/// Runs `spec` on `workers` workers; stops it once `stop_after`
/// checkpoints are complete, when given.
fn run(
    workers: usize,
    spec: &PipelineSpec,
    checkpoints: Option<Checkpointing>,
    stop_after: Option<usize>,
) -> PipelinesRun {
    let metrics = DataflowMetrics::detached();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = stop_after.zip(checkpoints.as_ref()).map(|(n, c)| {
        let (stop, dir) = (Arc::clone(&stop), c.spec.dir.clone());
        std::thread::spawn(move || {
            let store = Store::at(&dir);
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let complete = store
                    .list()
                    .map(|l| l.iter().filter(|c| c.complete).count())
                    .unwrap_or(0);
                if complete >= n {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            stop.store(true, Ordering::Relaxed);
        })
    });
    let spec = spec.clone();
    let flag = Arc::clone(&stop);
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        run_pipelines_with(
            worker,
            std::slice::from_ref(&spec),
            &metrics,
            &flag,
            checkpoints.as_ref(),
        )
    })
    .unwrap();
    let mut runs: Vec<PipelinesRun> = guards.join().into_iter().map(Result::unwrap).collect();

    stop.store(true, Ordering::Relaxed);
    if let Some(w) = watcher {
        w.join().unwrap();
    }
    for r in &runs {
        assert_eq!(r.error, None);
    }
    runs.swap_remove(0)
}

fn normalized(mut s: PipelineSummary) -> PipelineSummary {
    if let Some(m) = s.matching.as_mut() {
        // Wall-clock time of the solver: not a result.
        m.summary.window_p99_ms = 0.0;
    }
    s.dead_letter.path = String::new();
    s
}

/// The `names` files under `out`, with their bytes (empty when missing).
fn read_files(out: &Path, names: &[&str]) -> Vec<(PathBuf, Vec<u8>)> {
    names
        .iter()
        .map(|f| (out.join(f), std::fs::read(out.join(f)).unwrap_or_default()))
        .collect()
}

fn files(out: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    read_files(out, &["events.jsonl", "dead.jsonl", "dispatches.jsonl"])
}

/// Writes the generator's two shards, interleaved as one stream, to `path`.
fn write_interleaved(path: &Path, generator: &GeneratorSpec) {
    let text: String = GeneratedLines::new(generator, 0, 2)
        .zip(GeneratedLines::new(generator, 1, 2))
        .flat_map(|(a, b)| [a, b])
        .map(|l| l + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_stopped_run_restored_from_its_newest_checkpoint_ends_as_one_never_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let generator = GeneratorSpec {
        events: 30_000,
        malformed_fraction: 0.01,
        jitter_ms: 30_000,
        late_fraction: 0.01,
        ..GeneratorSpec::new(Family::Dispatch)
    };
    write_interleaved(&input, &generator);
    for workers in [1, 2] {
        let reference = dir.path().join(format!("reference-{workers}"));
        let spec = dispatch_spec(&input, &reference);
        let expected = run(workers, &spec, None, None);
        let expected_summary = normalized(expected.summaries.unwrap().remove(0));
        assert!(expected_summary.late > 0 && expected_summary.malformed > 0);

        let out = dir.path().join(format!("restored-{workers}"));
        let store_dir = dir.path().join(format!("checkpoints-{workers}"));
        let spec = dispatch_spec(&input, &out);
        let checkpoints = Checkpointing {
            spec: ckpt_spec(&store_dir, workers),
            restore: None,
        };
        let stopped = run(workers, &spec, Some(checkpoints.clone()), Some(2));
        let store = Store::at(&store_dir);
        let loaded = store.newest(&checkpoints.spec).unwrap();
        let loaded = loaded.expect("a checkpoint was written");
        assert!(
            loaded.manifest.pipelines[0].time < u64::MAX,
            "the checkpoint is from before the end"
        );
        assert!(stopped.interrupted, "the run was stopped before its end");
        let restored = run(
            workers,
            &spec,
            Some(Checkpointing {
                restore: Some(loaded),
                ..checkpoints
            }),
            None,
        );
        let summary = restored.summaries.unwrap().remove(0);
        assert_eq!(normalized(summary), expected_summary, "{workers} workers");
        for ((path, got), (_, want)) in files(&out).into_iter().zip(files(&reference)) {
            assert!(
                got == want,
                "{} differs ({workers} workers)",
                path.display()
            );
        }
    }
}

#[test]
fn restoring_from_any_of_several_checkpoints_ends_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let generator = GeneratorSpec {
        events: 30_000,
        ..GeneratorSpec::new(Family::Dispatch)
    };
    let text: String = GeneratedLines::new(&generator, 0, 1)
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&input, text).unwrap();
    let reference = dir.path().join("reference");
    let want = run(1, &dispatch_spec(&input, &reference), None, None);
    let want = normalized(want.summaries.unwrap().remove(0));
    let mut times = Vec::new();
    for n in [1usize, 2, 4, 8] {
        let out = dir.path().join(format!("out-{n}"));
        let store_dir = dir.path().join(format!("checkpoints-{n}"));
        let spec = dispatch_spec(&input, &out);
        let checkpoints = Checkpointing {
            spec: ckpt_spec(&store_dir, 1),
            restore: None,
        };
        run(1, &spec, Some(checkpoints.clone()), Some(n));
        let loaded = Store::at(&store_dir)
            .newest(&checkpoints.spec)
            .unwrap()
            .unwrap();
        times.push(loaded.manifest.pipelines[0].time);
        let restored = Checkpointing {
            restore: Some(loaded),
            ..checkpoints
        };
        let got = run(1, &spec, Some(restored), None);
        assert_eq!(
            normalized(got.summaries.unwrap().remove(0)),
            want,
            "restored at checkpoint {n}"
        );
        for ((path, got), (_, want)) in files(&out).into_iter().zip(files(&reference)) {
            assert!(got == want, "{} differs (checkpoint {n})", path.display());
        }
    }
    // Different points of the stream, not one point four times.
    times.dedup();
    assert!(times.len() >= 3, "{times:?}");
}

fn ads_spec(input: &Path, out: &Path) -> PipelineSpec {
    use crate::features::{AttributionSpec, FeatureSpec, KeyField, Measure};
    let feature = |name: &str, key, measure, window_ms| FeatureSpec {
        name: name.into(),
        key,
        measure,
        window_ms,
    };
    PipelineSpec {
        name: "ads".into(),
        family: Family::Ads,
        source: SourceSpec::Jsonl {
            path: input.to_owned(),
        },
        sink: SinkSpec::None,
        dead_letter: out.join("dead.jsonl"),
        epoch_events: 300,
        epoch_ms: 1000,
        max_epochs_in_flight: 2,
        time: crate::features::EventTime::default(),
        attribution: Some(AttributionSpec { window_ms: 600_000 }),
        features: vec![
            feature(
                "member_clicks_1h",
                KeyField::MemberId,
                Measure::Clicks,
                3_600_000,
            ),
            feature(
                "campaign_impressions_10m",
                KeyField::CampaignId,
                Measure::Impressions,
                600_000,
            ),
        ],
        examples: SinkSpec::Jsonl {
            path: out.join("examples.jsonl"),
        },
        learner: Some(crate::pipelines::LearnerSpec {
            delta: 0.8,
            lambda: 1.0,
            full: false,
            snapshots: Some(out.join("models.jsonl")),
            fixed: Some(crate::learner::FixedEffectConfig {
                every: 2,
                history: 0,
                lambda: 1.0,
                reanchor: crate::learner::Reanchor::Shift,
                hash_bits: 10,
            }),
            hashing: crate::learner::ads::AdHashing::parse(&["member".into()], 10).unwrap(),
            features: vec![0, 1],
            window_ms: 1_800_000,
        }),
        matching: None,
    }
}

fn ads_files(out: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    read_files(out, &["examples.jsonl", "dead.jsonl", "models.jsonl"])
}

#[test]
fn the_ads_stages_and_the_learner_restore_to_the_same_models() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ads.jsonl");
    let generator = GeneratorSpec {
        events: 40_000,
        malformed_fraction: 0.005,
        jitter_ms: 20_000,
        late_fraction: 0.005,
        ..GeneratorSpec::new(Family::Ads)
    };
    write_interleaved(&input, &generator);
    for workers in [1, 2] {
        let reference = dir.path().join(format!("ads-reference-{workers}"));
        let expected = run(workers, &ads_spec(&input, &reference), None, None);
        let expected_summary = normalized(expected.summaries.unwrap().remove(0));
        let learner = expected_summary.learner.as_ref().unwrap();
        assert!(
            learner.updates > 0 && learner.fixed_effect_refits > 0,
            "{learner:?}"
        );
        for n in [2usize, 3] {
            let out = dir.path().join(format!("ads-{workers}-{n}"));
            let store_dir = dir.path().join(format!("ads-checkpoints-{workers}-{n}"));
            let spec = ads_spec(&input, &out);
            let checkpoints = Checkpointing {
                spec: ckpt_spec(&store_dir, workers),
                restore: None,
            };
            run(workers, &spec, Some(checkpoints.clone()), Some(n));
            let loaded = Store::at(&store_dir)
                .newest(&checkpoints.spec)
                .unwrap()
                .expect("a checkpoint");
            assert!(
                loaded.manifest.pipelines[0].time < u64::MAX,
                "from before the end"
            );
            let restored = Checkpointing {
                restore: Some(loaded),
                ..checkpoints
            };
            let got = run(workers, &spec, Some(restored), None);
            assert_eq!(
                normalized(got.summaries.unwrap().remove(0)),
                expected_summary,
                "{workers} workers, checkpoint {n}"
            );
            for ((path, got), (_, want)) in ads_files(&out).into_iter().zip(ads_files(&reference)) {
                assert!(
                    got == want,
                    "{} differs ({workers} workers, checkpoint {n})",
                    path.display()
                );
            }
        }
    }
}
