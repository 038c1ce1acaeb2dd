//! The random-effect learner as a timely operator.
//!
//! Examples are exchanged to the worker that owns their entity. When the
//! input frontier passes an epoch (a window), each entity with examples in
//! it gets one [`step`](super::step) from its current posterior, in entity
//! order; before learning, every example is scored with the model as it was
//! (progressive validation). Examples of one (window, entity) are sorted by
//! their id first, so the models do not depend on how many workers there are
//! or in which order records arrived: [`learn_sequential`] is the oracle.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::{Stream, StreamVec};

use super::{Batch, Posterior, StepParams, sigmoid, step};
use crate::placement::route;

/// One labelled example for an entity's random effect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// A unique id (the impression id): orders examples deterministically.
    pub id: u64,
    /// The entity whose random effect learns from it.
    pub entity: u64,
    /// Features (an intercept first).
    pub x: Vec<f64>,
    /// −1 or +1.
    pub y: f64,
    /// Weight.
    pub w: f64,
    /// The fixed effect's score.
    pub offset: f64,
}

/// What the learner emits per window and entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LearnerOutput {
    /// A new model version for an entity.
    Snapshot {
        /// The entity.
        entity: u64,
        /// Its version (number of successful updates).
        version: u64,
        /// The coefficients.
        theta: Vec<f64>,
    },
    /// A progressive-validation score: the model before this window's update.
    Scored {
        /// The example's id.
        id: u64,
        /// Predicted click probability.
        p: f64,
        /// The label (−1/+1).
        y: f64,
    },
    /// An update that failed; the previous model was kept.
    Failed {
        /// The entity.
        entity: u64,
        /// Why.
        reason: String,
    },
}

/// The learner's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LearnerConfig {
    /// Features per example.
    pub p: usize,
    /// δ and λ.
    pub params: StepParams,
    /// Full (true) or diagonal precision.
    pub full: bool,
}

/// The state of one entity.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityModel {
    /// The posterior.
    pub posterior: Posterior,
    /// Successful updates so far.
    pub version: u64,
}

/// Learns one window: scores, then updates every entity present, in entity
/// order. Appends to `out`.
pub fn learn_window(
    models: &mut BTreeMap<u64, EntityModel>,
    mut examples: Vec<Example>,
    config: &LearnerConfig,
    out: &mut Vec<LearnerOutput>,
) {
    examples.sort_by_key(|e| (e.entity, e.id));
    let mut start = 0;
    while start < examples.len() {
        let entity = examples[start].entity;
        let end = start + examples[start..].partition_point(|e| e.entity == entity);
        let group = &examples[start..end];
        let model = models.entry(entity).or_insert_with(|| EntityModel {
            posterior: Posterior::unseen(config.p, config.params.lambda, config.full),
            version: 0,
        });
        let mut batch = Batch::new(config.p);
        for e in group {
            let s: f64 =
                e.x.iter()
                    .zip(&model.posterior.theta)
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    + e.offset;
            out.push(LearnerOutput::Scored {
                id: e.id,
                p: sigmoid(s),
                y: e.y,
            });
            if e.x.len() == config.p {
                batch.push(&e.x, e.y, e.w, e.offset);
            }
        }
        match step(&model.posterior, &batch, config.params) {
            Ok(done) => {
                model.posterior = done.posterior;
                model.version += 1;
                out.push(LearnerOutput::Snapshot {
                    entity,
                    version: model.version,
                    theta: model.posterior.theta.clone(),
                });
            }
            Err(e) => out.push(LearnerOutput::Failed {
                entity,
                reason: e.to_string(),
            }),
        }
        start = end;
    }
}

/// The oracle: every window in order, one loop, one thread.
pub fn learn_sequential(
    windows: &[Vec<Example>],
    config: &LearnerConfig,
) -> (BTreeMap<u64, EntityModel>, Vec<LearnerOutput>) {
    let mut models = BTreeMap::new();
    let mut out = Vec::new();
    for window in windows {
        learn_window(&mut models, window.clone(), config, &mut out);
    }
    (models, out)
}

/// The learner as an operator on a stream of examples.
pub trait Learn<'scope> {
    /// Exchanges examples by entity and learns one window per epoch; emits
    /// scores, snapshots and failures at the window's timestamp.
    fn learn(self, config: LearnerConfig) -> StreamVec<'scope, u64, LearnerOutput>;
}

impl<'scope> Learn<'scope> for Stream<'scope, u64, Vec<Example>> {
    fn learn(self, config: LearnerConfig) -> StreamVec<'scope, u64, LearnerOutput> {
        let pact = Exchange::new(|e: &Example| route(e.entity));
        self.unary_frontier(pact, "Learn", move |_initial, _info| {
            let mut pending: FxHashMap<
                u64,
                (timely::dataflow::operators::Capability<u64>, Vec<Example>),
            > = FxHashMap::default();
            let mut models: BTreeMap<u64, EntityModel> = BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    let Some(&time) = cap.least() else {
                        return;
                    };
                    if let Some((_, examples)) = pending.get_mut(&time) {
                        examples.append(data);
                    } else if let Some(held) = cap.retain_least(0) {
                        pending.insert(time, (held, std::mem::take(data)));
                    }
                });
                let mut ready: Vec<u64> = pending
                    .keys()
                    .copied()
                    .filter(|t| !frontier.less_equal(t))
                    .collect();
                ready.sort_unstable();
                for time in ready {
                    if let Some((cap, examples)) = pending.remove(&time) {
                        let mut out = Vec::new();
                        learn_window(&mut models, examples, &config, &mut out);
                        output.session(&cap).give_iterator(out.into_iter());
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use timely::dataflow::InputHandleVec;
    use timely::dataflow::operators::{Input, Inspect, Probe};

    use super::*;

    fn windows(seed: u64, count: usize, per_window: usize, entities: u64) -> Vec<Vec<Example>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut id = 0;
        (0..count)
            .map(|_| {
                (0..per_window)
                    .map(|_| {
                        id += 1;
                        let entity = rng.random_range(0..entities);
                        let x = vec![
                            1.0,
                            rng.random_range(-1.0..1.0),
                            f64::from(rng.random_range(0..2u8)),
                        ];
                        let s = 0.4 * x[1] - 0.3 + entity as f64 * 0.05;
                        let y = if rng.random::<f64>() < sigmoid(s) {
                            1.0
                        } else {
                            -1.0
                        };
                        Example {
                            id,
                            entity,
                            x,
                            y,
                            w: 1.0,
                            offset: 0.1,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    const CONFIG: LearnerConfig = LearnerConfig {
        p: 3,
        params: StepParams {
            delta: 0.8,
            lambda: 1.0,
        },
        full: true,
    };

    /// The distributed operator with 1, 2 and 4 workers gives exactly the
    /// models of the sequential loop.
    #[test]
    fn the_operator_matches_the_sequential_oracle_for_1_2_and_4_workers() {
        let data = windows(7, 6, 400, 25);
        let (_, expected) = learn_sequential(&data, &CONFIG);
        let mut expected_snapshots: Vec<(u64, u64, Vec<u64>)> = expected
            .iter()
            .filter_map(|o| match o {
                LearnerOutput::Snapshot {
                    entity,
                    version,
                    theta,
                } => Some((
                    *entity,
                    *version,
                    theta.iter().map(|t| t.to_bits()).collect(),
                )),
                _ => None,
            })
            .collect();
        expected_snapshots.sort();
        assert!(expected_snapshots.len() > 100);
        for workers in [1, 2, 4] {
            let data = data.clone();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&seen);
            timely::execute(timely::Config::process(workers), move |worker| {
                let mut input = InputHandleVec::<u64, Example>::new();
                let sink = Arc::clone(&sink);
                let probe = worker.dataflow::<u64, _, _>(|scope| {
                    scope
                        .input_from(&mut input)
                        .learn(CONFIG)
                        .inspect(move |o| {
                            if let LearnerOutput::Snapshot {
                                entity,
                                version,
                                theta,
                            } = o
                            {
                                sink.lock().unwrap().push((
                                    *entity,
                                    *version,
                                    theta.iter().map(|t| t.to_bits()).collect::<Vec<u64>>(),
                                ));
                            }
                        })
                        .probe()
                        .0
                });
                // Each worker feeds a strided share of every window.
                for (epoch, window) in data.iter().enumerate() {
                    for e in window.iter().skip(worker.index()).step_by(worker.peers()) {
                        input.send(e.clone());
                    }
                    input.advance_to(epoch as u64 + 1);
                }
                input.close();
                while !probe.done() {
                    worker.step();
                }
            })
            .unwrap();
            let mut got = seen.lock().unwrap().clone();
            got.sort();
            assert!(
                got == expected_snapshots,
                "{workers} workers differ from the oracle"
            );
        }
    }

    #[test]
    fn progressive_validation_scores_before_learning() {
        let data = windows(3, 2, 50, 3);
        let (_, out) = learn_sequential(&data, &CONFIG);
        // The first window is scored by unseen models: θ = 0, so p = σ(offset).
        let first: Vec<f64> = out
            .iter()
            .take_while(|o| !matches!(o, LearnerOutput::Snapshot { .. }))
            .filter_map(|o| match o {
                LearnerOutput::Scored { p, .. } => Some(*p),
                _ => None,
            })
            .collect();
        assert!(!first.is_empty());
        assert!(first.iter().all(|p| (p - sigmoid(0.1)).abs() < 1e-15));
    }
}
