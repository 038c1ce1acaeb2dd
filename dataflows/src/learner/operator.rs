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
    /// Features (an intercept first): the random effect's, and the fixed
    /// effect's dense part.
    pub x: Vec<f64>,
    /// The fixed effect's hashed slots (below 2^`hash_bits`; empty without
    /// hashed features).
    #[serde(default)]
    pub hashed: Vec<u32>,
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
    /// A new fixed-effect model (reported once, by worker 0).
    FixedEffect {
        /// Its version.
        version: u64,
        /// The coefficients.
        theta: Vec<f64>,
    },
}

/// The global fixed effect's schedule: refit every `every` windows on the
/// examples of the last `history` windows (0: all so far), ridge λ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FixedEffectConfig {
    /// Refit period, in windows.
    pub every: u64,
    /// Windows of history (0 keeps everything).
    pub history: u64,
    /// Ridge penalty.
    pub lambda: f64,
    /// What happens to the random effects when a new fixed effect arrives.
    pub reanchor: Reanchor,
    /// Hash bits of the examples' hashed slots (0: none; the fixed effect
    /// then has p coefficients, else p + 2^bits).
    pub hash_bits: u32,
}

/// How random effects follow a new fixed effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reanchor {
    /// Keep them as they are.
    Keep,
    /// Back to the prior (the "lambda architecture" restart).
    Reset,
    /// Shift every mean by minus the fixed effect's change, so that every
    /// prediction is unchanged at the switch (the random effects' features
    /// must be the fixed effect's).
    Shift,
}

/// Applies `mode` to `models` as the fixed effect goes from `old` to `new`.
fn reanchor(
    models: &mut BTreeMap<u64, EntityModel>,
    mode: Reanchor,
    old: Option<&FixedModel>,
    new: &FixedModel,
) {
    match mode {
        Reanchor::Keep => {}
        Reanchor::Reset => models.clear(),
        Reanchor::Shift => {
            for model in models.values_mut() {
                for (j, t) in model.posterior.theta.iter_mut().enumerate() {
                    let before = old.and_then(|m| m.theta.get(j)).copied().unwrap_or(0.0);
                    *t -= new.theta.get(j).copied().unwrap_or(0.0) - before;
                }
            }
        }
    }
}

/// A fitted fixed effect, as it flows between operators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FixedModel {
    /// The last window its data came from.
    pub window: u64,
    /// Its version (1, 2, …).
    pub version: u64,
    /// The coefficients.
    pub theta: Vec<f64>,
}

/// Keeps the fixed effect's training history and refits on schedule.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FixedTrainer {
    windows: std::collections::VecDeque<(u64, Vec<Example>)>,
    version: u64,
}

impl FixedTrainer {
    /// Adds window `window`'s examples and, when the schedule says so,
    /// returns the refit model.
    pub fn window_done(
        &mut self,
        window: u64,
        mut examples: Vec<Example>,
        p: usize,
        config: &FixedEffectConfig,
    ) -> Option<FixedModel> {
        examples.sort_by_key(|e| e.id);
        self.windows.push_back((window, examples));
        if config.history > 0 {
            while self.windows.len() as u64 > config.history {
                self.windows.pop_front();
            }
        }
        if !(window + 1).is_multiple_of(config.every.max(1)) {
            return None;
        }
        let lambda = config.lambda.max(1e-6);
        let theta = if config.hash_bits > 0 {
            let k = self
                .windows
                .iter()
                .find_map(|(_, examples)| examples.first())
                .map_or(0, |e| e.hashed.len());
            let mut rows = super::hashed::HashedRows::new(p, k);
            for (_, examples) in &self.windows {
                for e in examples
                    .iter()
                    .filter(|e| e.x.len() == p && e.hashed.len() == k)
                {
                    rows.push(&e.x, &e.hashed, e.y, e.w, 0.0);
                }
            }
            super::hashed::fit(&rows, config.hash_bits, lambda).ok()?
        } else {
            let mut batch = Batch::new(p);
            for (_, examples) in &self.windows {
                for e in examples.iter().filter(|e| e.x.len() == p) {
                    batch.push(&e.x, e.y, e.w, 0.0);
                }
            }
            step(
                &Posterior::unseen(p, lambda, true),
                &batch,
                StepParams { delta: 0.0, lambda },
            )
            .ok()?
            .posterior
            .theta
        };
        self.version += 1;
        Some(FixedModel {
            window,
            version: self.version,
            theta,
        })
    }
}

/// Sets every example's offset to the fixed effect's score.
fn apply_offsets(examples: &mut [Example], fixed: Option<&FixedModel>) {
    if let Some(model) = fixed {
        for e in examples {
            e.offset = super::hashed::score(&e.x, &e.hashed, &model.theta);
        }
    }
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
    /// The fixed effect, when there is one (offsets stay as given otherwise).
    pub fixed: Option<FixedEffectConfig>,
    /// Window length in timestamp units: the examples at timestamp `t` are
    /// window `t / window_ms` (1 when every timestamp is its own window).
    pub window_ms: u64,
}

/// The state of one entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

/// The oracle: every window in order, one loop, one thread. Window `t` is
/// scored and learned with the newest fixed effect fitted on windows before
/// `t`; the fixed effect then takes window `t` into its history.
pub fn learn_sequential(
    windows: &[Vec<Example>],
    config: &LearnerConfig,
) -> (BTreeMap<u64, EntityModel>, Vec<LearnerOutput>) {
    let mut models = BTreeMap::new();
    let mut out = Vec::new();
    let mut trainer = FixedTrainer::default();
    let mut fixed: Option<FixedModel> = None;
    for (t, window) in windows.iter().enumerate() {
        let mut examples = window.clone();
        apply_offsets(&mut examples, fixed.as_ref());
        learn_window(&mut models, examples.clone(), config, &mut out);
        if let Some(fe) = &config.fixed
            && let Some(model) = trainer.window_done(t as u64, examples, config.p, fe)
        {
            reanchor(&mut models, fe.reanchor, fixed.as_ref(), &model);
            out.push(LearnerOutput::FixedEffect {
                version: model.version,
                theta: model.theta.clone(),
            });
            fixed = Some(model);
        }
    }
    (models, out)
}

/// The learner as an operator on a stream of examples.
pub trait Learn<'scope> {
    /// Exchanges examples by entity and learns one window per epoch; emits
    /// scores, snapshots and failures at the window's timestamp. With a fixed
    /// effect configured, worker 0 refits it on schedule and broadcasts it;
    /// window `t` uses the newest model fitted on windows before `t` (so it is
    /// at most `every` windows stale).
    fn learn(self, config: LearnerConfig) -> StreamVec<'scope, u64, LearnerOutput>;

    /// [`Learn::learn`], its state registered in `states` (checkpoints):
    /// `learner` (every entity's posterior and version, the fixed effects
    /// received and the one in use, examples of unfinished windows) and
    /// `fixed_effect` (the refit history and version, examples waiting).
    fn learn_with(
        self,
        config: LearnerConfig,
        states: &crate::checkpoint::States,
    ) -> StreamVec<'scope, u64, LearnerOutput>;
}

/// The learner in a checkpoint.
#[derive(Serialize, Deserialize)]
struct SavedLearner {
    models: BTreeMap<u64, EntityModel>,
    fixed: BTreeMap<u64, FixedModel>,
    current: Option<FixedModel>,
    pending: Vec<(u64, Vec<Example>)>,
}

/// The fixed effect's trainer in a checkpoint.
#[derive(Serialize, Deserialize)]
struct SavedTrainer {
    trainer: FixedTrainer,
    pending: Vec<(u64, Vec<Example>)>,
}

/// The examples of `pending` at timestamps before `time` (later ones are
/// read again after a restore).
fn pending_before(pending: &Pending, time: u64) -> Vec<(u64, Vec<Example>)> {
    pending
        .range(..time)
        .map(|(t, (_, examples))| (*t, examples.clone()))
        .collect()
}

/// Restored examples back into `pending`, with capabilities from `initial`.
fn restore_pending(
    pending: &mut Pending,
    initial: &timely::dataflow::operators::Capability<u64>,
    saved: Vec<(u64, Vec<Example>)>,
    span: u64,
) {
    for (time, examples) in saved {
        pending.insert(time, (initial.delayed(&window_end(time, span)), examples));
    }
}

/// Examples waiting for their window to complete, by timestamp, each
/// timestamp's with a capability for it.
type Pending = BTreeMap<u64, (timely::dataflow::operators::Capability<u64>, Vec<Example>)>;

/// Takes the examples of the first pending window (`span` timestamps) once
/// `complete(end)` says its last timestamp is complete: the window, a
/// capability at its end, its examples.
fn take_window(
    pending: &mut Pending,
    span: u64,
    complete: impl Fn(u64, u64) -> bool,
) -> Option<(
    u64,
    timely::dataflow::operators::Capability<u64>,
    Vec<Example>,
)> {
    let (&first, _) = pending.first_key_value()?;
    let window = first / span;
    let end = window_end(first, span);
    if !complete(window, end) {
        return None;
    }
    let rest = pending.split_off(&end.saturating_add(1));
    let taken = std::mem::replace(pending, rest);
    let mut cap = None;
    let mut examples = Vec::new();
    for (_, (held, mut these)) in taken {
        cap.get_or_insert_with(|| held.delayed(&end));
        examples.append(&mut these);
    }
    Some((window, cap?, examples))
}

/// Adds `data` to its window in `pending`, retaining a capability for the
/// window the first time it is seen.
fn hold(
    pending: &mut Pending,
    cap: &timely::dataflow::operators::InputCapability<u64>,
    data: &mut Vec<Example>,
    span: u64,
) {
    let Some(&time) = cap.least() else {
        return;
    };
    if let Some((_, examples)) = pending.get_mut(&time) {
        examples.append(data);
    } else {
        // Held at the window's end, not at the example's time: what comes
        // before the end completes downstream while the window fills.
        let held = cap.delayed(&window_end(time, span), 0);
        pending.insert(time, (held, std::mem::take(data)));
    }
}

/// The last timestamp of the `span`-long window of `time`.
fn window_end(time: u64, span: u64) -> u64 {
    (time / span).saturating_mul(span).saturating_add(span - 1)
}

impl<'scope> Learn<'scope> for Stream<'scope, u64, Vec<Example>> {
    fn learn(self, config: LearnerConfig) -> StreamVec<'scope, u64, LearnerOutput> {
        self.learn_with(config, &crate::checkpoint::States::off())
    }

    fn learn_with(
        self,
        config: LearnerConfig,
        states: &crate::checkpoint::States,
    ) -> StreamVec<'scope, u64, LearnerOutput> {
        use std::cell::RefCell;
        use std::rc::Rc;
        use timely::dataflow::channels::pact::Pipeline;
        use timely::dataflow::operators::Concat;
        use timely::dataflow::operators::vec::Broadcast;

        let worker = self.scope().index();
        let span = config.window_ms.max(1);
        // The fixed effect: every example to worker 0, refit on schedule,
        // broadcast to every worker. Without one, nothing is sent.
        let fitted = match config.fixed {
            None => timely::dataflow::operators::generic::operator::empty(self.scope()),
            Some(fe) => self
                .clone()
                .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<FixedModel>>, _, _, _>(
                    Exchange::new(|_: &Example| 0),
                    "FitFixedEffect",
                    move |initial, _info| {
                        let mut pending = Pending::new();
                        let mut trainer = FixedTrainer::default();
                        if let Some(saved) = states.take::<SavedTrainer>("fixed_effect") {
                            trainer = saved.trainer;
                            restore_pending(&mut pending, &initial, saved.pending, span);
                        }
                        let state = Rc::new(RefCell::new((trainer, pending)));
                        {
                            let state = Rc::clone(&state);
                            states.register("fixed_effect", move |time| {
                                let (trainer, pending) = &*state.borrow();
                                crate::checkpoint::encode(&SavedTrainer {
                                    trainer: trainer.clone(),
                                    pending: pending_before(pending, time),
                                })
                            });
                        }
                        drop(initial);
                        move |(input, frontier), output| {
                            let (trainer, pending) = &mut *state.borrow_mut();
                            input.for_each(|cap, data| hold(pending, &cap, data, span));
                            while let Some((window, cap, examples)) =
                                take_window(pending, span, |_, end| !frontier.less_equal(&end))
                            {
                                if let Some(model) =
                                    trainer.window_done(window, examples, config.p, &fe)
                                {
                                    output.session(&cap).give(model);
                                }
                            }
                        }
                    },
                )
                .broadcast(),
        };

        let pact = Exchange::new(|e: &Example| route(e.entity));
        let learned = self.binary_frontier(
            fitted.clone(),
            pact,
            Pipeline,
            "Learn",
            move |initial, _info| {
                let mut saved = SavedLearner {
                    models: BTreeMap::new(),
                    fixed: BTreeMap::new(),
                    current: None,
                    pending: Vec::new(),
                };
                let mut pending = Pending::new();
                if let Some(restored) = states.take::<SavedLearner>("learner") {
                    restore_pending(&mut pending, &initial, restored.pending, span);
                    saved = SavedLearner {
                        pending: Vec::new(),
                        ..restored
                    };
                }
                drop(initial);
                let SavedLearner {
                    models,
                    fixed,
                    current,
                    ..
                } = saved;
                let state = Rc::new(RefCell::new((pending, fixed, models, current)));
                {
                    let state = Rc::clone(&state);
                    // Fixed effects reach the learner only once the window
                    // they were fitted on is complete: none from later.
                    states.register("learner", move |time| {
                        let (pending, fixed, models, current) = &*state.borrow();
                        crate::checkpoint::encode(&SavedLearner {
                            models: models.clone(),
                            fixed: fixed.clone(),
                            current: current.clone(),
                            pending: pending_before(pending, time),
                        })
                    });
                }
                move |(input, frontier), (fixed_input, fixed_frontier), output| {
                    let (pending, fixed, models, current) = &mut *state.borrow_mut();
                    input.for_each(|cap, data| hold(pending, &cap, data, span));
                    fixed_input.for_each(|_cap, data| {
                        for model in data.drain(..) {
                            fixed.insert(model.window, model);
                        }
                    });
                    // Windows complete in time order; window t also waits for
                    // every fixed effect fitted on windows before t (the
                    // previous window's is fitted at its last timestamp).
                    while let Some((window, cap, mut examples)) =
                        take_window(pending, span, |window, end| {
                            !(frontier.less_equal(&end)
                                || (window > 0 && fixed_frontier.less_equal(&(window * span - 1))))
                        })
                    {
                        let newest = fixed.range(..window).next_back().map(|(_, m)| m);
                        if let Some(model) = newest
                            && current.as_ref().map(|c| c.version) != Some(model.version)
                        {
                            if let Some(fe) = &config.fixed {
                                reanchor(models, fe.reanchor, current.as_ref(), model);
                            }
                            *current = Some(model.clone());
                        }
                        apply_offsets(&mut examples, newest);
                        let mut out = Vec::new();
                        learn_window(models, examples, &config, &mut out);
                        output.session(&cap).give_iterator(out.into_iter());
                    }
                }
            },
        );
        // Report each fixed-effect model once: worker 0's copy.
        let reported = fitted.unary(Pipeline, "ReportFixedEffect", move |_cap, _info| {
            move |input, output| {
                input.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for model in data.drain(..).filter(|_| worker == 0) {
                        session.give(LearnerOutput::FixedEffect {
                            version: model.version,
                            theta: model.theta,
                        });
                    }
                });
            }
        });
        learned.concat(reported)
    }
}

/// Why [`learn_in_process`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LearnInProcessError {
    /// Timely could not run the workers.
    #[error("the learner's timely workers failed: {reason}")]
    Workers {
        /// Timely's reason.
        reason: String,
    },
    /// A worker panicked.
    #[error("a learner worker panicked")]
    Panicked,
}

/// Runs [`Learn`] in this process on `workers` timely worker threads over
/// `windows` (window t at epoch t) and returns every output, each worker's
/// in the order it emitted them. Each worker feeds a strided share of every
/// window; the examples are moved, not copied. With the same windows the
/// models equal [`learn_sequential`]'s for any number of workers.
pub fn learn_in_process(
    windows: Vec<Vec<Example>>,
    config: LearnerConfig,
    workers: usize,
) -> Result<Vec<LearnerOutput>, LearnInProcessError> {
    use std::sync::{Arc, Mutex};
    use timely::dataflow::InputHandleVec;
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::{Input, Probe};

    let workers = workers.max(1);
    let mut shares: Vec<Vec<Vec<Example>>> = vec![Vec::new(); workers];
    for window in windows {
        let mut split: Vec<Vec<Example>> = vec![Vec::new(); workers];
        for (i, e) in window.into_iter().enumerate() {
            split[i % workers].push(e);
        }
        for (share, part) in shares.iter_mut().zip(split) {
            share.push(part);
        }
    }
    let shares = Arc::new(Mutex::new(shares.into_iter().map(Some).collect::<Vec<_>>()));
    let gathered = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&gathered);
    timely::execute(timely::Config::process(workers), move |worker| {
        let mine = shares
            .lock()
            .ok()
            .and_then(|mut s| s.get_mut(worker.index()).and_then(Option::take))
            .unwrap_or_default();
        let mut input = InputHandleVec::<u64, Example>::new();
        let local = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let collect = std::rc::Rc::clone(&local);
        let probe = worker.dataflow::<u64, _, _>(|scope| {
            let (probe, learned) = scope.input_from(&mut input).learn(config).probe();
            learned.sink(Pipeline, "Collect", move |(input, _frontier)| {
                input.for_each(|_cap, data| collect.borrow_mut().append(data));
            });
            probe
        });
        for (epoch, window) in mine.into_iter().enumerate() {
            for e in window {
                input.send(e);
            }
            input.advance_to(epoch as u64 + 1);
        }
        input.close();
        while !probe.done() {
            worker.step();
        }
        if let Ok(mut all) = sink.lock() {
            all.append(&mut local.borrow_mut());
        }
    })
    .map_err(|reason| LearnInProcessError::Workers { reason })?;
    let outputs = std::mem::take(&mut *gathered.lock().map_err(|_| LearnInProcessError::Panicked)?);
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

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
                            hashed: vec![(id % 7) as u32],
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
        window_ms: 1,
        p: 3,
        params: StepParams {
            delta: 0.8,
            lambda: 1.0,
        },
        full: true,
        fixed: Some(FixedEffectConfig {
            every: 2,
            history: 3,
            lambda: 1.0,
            reanchor: Reanchor::Shift,
            hash_bits: 0,
        }),
    };

    /// The distributed operator with 1, 2 and 4 workers gives exactly the
    /// models of the sequential loop.
    #[test]
    fn the_operator_matches_the_sequential_oracle_for_1_2_and_4_workers() {
        matches_the_oracle(CONFIG);
    }

    /// The same with a fixed effect on hashed slots too (2^3 of them).
    #[test]
    fn with_hashed_features_the_operator_matches_the_oracle() {
        let mut config = CONFIG;
        if let Some(fe) = &mut config.fixed {
            fe.hash_bits = 3;
        }
        let (_, out) = learn_sequential(&windows(7, 6, 400, 25), &config);
        let fixed: Vec<&Vec<f64>> = out
            .iter()
            .filter_map(|o| match o {
                LearnerOutput::FixedEffect { theta, .. } => Some(theta),
                _ => None,
            })
            .collect();
        assert!(fixed.iter().all(|t| t.len() == 3 + 8));
        assert!(fixed.iter().all(|t| t[3..].iter().any(|w| *w != 0.0)));
        matches_the_oracle(config);
    }

    /// Every model an output list holds, bit for bit and sorted: campaign
    /// snapshots as (entity, version, θ), fixed effects as (u64::MAX, version, θ).
    fn models(outputs: &[LearnerOutput]) -> Vec<(u64, u64, Vec<u64>)> {
        let bits = |theta: &[f64]| theta.iter().map(|t| t.to_bits()).collect();
        let mut all: Vec<(u64, u64, Vec<u64>)> = outputs
            .iter()
            .filter_map(|o| match o {
                LearnerOutput::FixedEffect { version, theta } => {
                    Some((u64::MAX, *version, bits(theta)))
                }
                LearnerOutput::Snapshot {
                    entity,
                    version,
                    theta,
                } => Some((*entity, *version, bits(theta))),
                _ => None,
            })
            .collect();
        all.sort();
        all
    }

    fn matches_the_oracle(config: LearnerConfig) {
        let data = windows(7, 6, 400, 25);
        let (_, expected) = learn_sequential(&data, &config);
        let expected = models(&expected);
        assert!(expected.len() > 100);
        let refits: Vec<u64> = expected
            .iter()
            .filter(|m| m.0 == u64::MAX)
            .map(|m| m.1)
            .collect();
        assert_eq!(refits, [1, 2, 3], "6 windows, a refit every 2");
        for workers in [1, 2, 4] {
            let outputs = learn_in_process(data.clone(), config, workers).unwrap();
            // Each refit is reported once (by worker 0), and every model,
            // fixed effects included, equals the oracle's bit for bit.
            assert!(
                models(&outputs) == expected,
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
