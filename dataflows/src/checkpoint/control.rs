//! The checkpoint protocol between workers, on a small control dataflow.
//!
//! Worker 0 starts a checkpoint every `every`: it holds each pipeline's
//! input frontier at that pipeline's next checkpoint time and broadcasts
//! the times (a request). Each worker writes its part once every pipeline's
//! output frontier has reached its time there, and tells worker 0 (an ack).
//! With every worker's ack, worker 0 writes the manifest (the checkpoint
//! becomes visible) and lets the frontiers go.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use timely::dataflow::InputHandleVec;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::Input;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::worker::Worker;

use super::{
    CheckpointError, CheckpointSpec, FORMAT_VERSION, Manifest, PartInfo, PipelineTime, Store,
    WorkerPart,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Control {
    /// Checkpoint `id` at these times (one per pipeline, in order).
    Request { id: u64, times: Vec<u64> },
    /// A worker's part of checkpoint `id`, or why it could not write it.
    Ack {
        id: u64,
        part: Result<PartInfo, String>,
    },
}

/// Requests received: checkpoint id and times.
type Requests = Rc<RefCell<VecDeque<(u64, Vec<u64>)>>>;
/// Acks received (worker 0): checkpoint id and the part or why not.
type Acks = Rc<RefCell<Vec<(u64, Result<PartInfo, String>)>>>;

/// One worker's end of the protocol.
pub struct Coordinator {
    spec: CheckpointSpec,
    store: Store,
    worker: usize,
    peers: usize,
    input: Option<InputHandleVec<u64, Control>>,
    requests: Requests,
    acks: Acks,
    /// This worker: the checkpoint it still has to write its part of.
    owed: Option<(u64, Vec<u64>)>,
    /// Worker 0: the checkpoint under way and when it started.
    under_way: Option<(u64, Vec<u64>, Instant)>,
    /// Worker 0: the next checkpoint's id, and when the last one started.
    next_id: u64,
    last: Instant,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("worker", &self.worker)
            .field("owed", &self.owed)
            .finish_non_exhaustive()
    }
}

/// What a worker's pipelines offer the protocol.
pub trait Checkpointed {
    /// Worker 0: holds each pipeline's input frontier at its next
    /// checkpoint time and returns the times (`u64::MAX`: finished); `None`
    /// when some pipeline cannot take one now (any holds are let go).
    fn hold(&mut self) -> Option<Vec<u64>>;
    /// Worker 0: lets every held frontier go.
    fn release(&mut self);
    /// Whether every pipeline has applied everything before its time.
    fn ready(&self, times: &[u64]) -> bool;
    /// This worker's part as of `times`.
    fn save(&mut self, times: &[u64]) -> Result<WorkerPart, String>;
    /// The pipelines' names, in order.
    fn names(&self) -> Vec<String>;
}

impl Coordinator {
    /// Builds the control dataflow (every worker, before the pipelines).
    pub fn new(worker: &mut Worker, spec: CheckpointSpec) -> Result<Self, CheckpointError> {
        let store = Store::open(&spec.dir)?;
        let spec_every = spec.every;
        let next_id = store.next_id()?;
        let requests: Requests = Rc::default();
        let acks: Acks = Rc::default();
        let mut input = InputHandleVec::<u64, Control>::new();
        {
            let (requests, acks) = (Rc::clone(&requests), Rc::clone(&acks));
            worker.dataflow::<u64, _, _>(|scope| {
                let stream = scope.input_from(&mut input);
                stream
                    .clone()
                    .flat_map(|c| match c {
                        Control::Request { .. } => Some(c),
                        Control::Ack { .. } => None,
                    })
                    .broadcast()
                    .sink(Pipeline, "CheckpointRequests", move |(input, _)| {
                        input.for_each(|_, data| {
                            for c in data.drain(..) {
                                if let Control::Request { id, times } = c {
                                    requests.borrow_mut().push_back((id, times));
                                }
                            }
                        });
                    });
                // Through an operator of its own: an input's pushes reach
                // another worker only when an operator's output is done.
                stream
                    .flat_map(|c| match c {
                        Control::Ack { .. } => Some(c),
                        Control::Request { .. } => None,
                    })
                    .sink(
                        Exchange::new(|_: &Control| 0),
                        "CheckpointAcks",
                        move |(input, _)| {
                            input.for_each(|_, data| {
                                for c in data.drain(..) {
                                    if let Control::Ack { id, part } = c {
                                        acks.borrow_mut().push((id, part));
                                    }
                                }
                            });
                        },
                    );
            });
        }
        Ok(Self {
            worker: worker.index(),
            peers: worker.peers(),
            spec,
            store,
            input: Some(input),
            requests,
            acks,
            owed: None,
            under_way: None,
            next_id,
            // The first checkpoint is taken at once: a run killed before the
            // next restarts from it rather than from nothing.
            last: Instant::now()
                .checked_sub(spec_every)
                .unwrap_or_else(Instant::now),
        })
    }

    /// One turn of the protocol; an error ends the run.
    pub fn turn(&mut self, pipelines: &mut dyn Checkpointed) -> Result<(), String> {
        if self.worker == 0
            && self.under_way.is_none()
            && self.last.elapsed() >= self.spec.every
            && let Some(times) = pipelines.hold()
        {
            if times.iter().all(|&t| t == u64::MAX) {
                // Everything has finished: nothing to checkpoint.
                pipelines.release();
                self.last = Instant::now();
            } else {
                let id = self.next_id;
                self.next_id += 1;
                tracing::debug!(checkpoint = id, ?times, "checkpoint started");
                if let Some(input) = self.input.as_mut() {
                    input.send(Control::Request {
                        id,
                        times: times.clone(),
                    });
                    input.flush();
                }
                self.under_way = Some((id, times, Instant::now()));
            }
        }
        while let Some(request) = self.requests.borrow_mut().pop_front() {
            self.owed = Some(request);
        }
        if let Some((id, times)) = &self.owed
            && pipelines.ready(times)
        {
            let id = *id;
            let part = pipelines.save(times).and_then(|mut part| {
                part.worker = self.worker;
                self.store.write_part(id, &part).map_err(|e| e.to_string())
            });
            if let Some(input) = self.input.as_mut() {
                input.send(Control::Ack { id, part });
                input.flush();
            }
            self.owed = None;
        }
        if self.worker == 0 {
            self.gather(pipelines)?;
        }
        Ok(())
    }

    /// Worker 0: with every worker's part of the checkpoint under way,
    /// writes its manifest and lets the frontiers go.
    fn gather(&mut self, pipelines: &mut dyn Checkpointed) -> Result<(), String> {
        let Some((id, times, started)) = &self.under_way else {
            return Ok(());
        };
        let id = *id;
        let mut acks = self.acks.borrow_mut();
        let mine = acks.iter().filter(|(a, _)| *a == id).count();
        if mine < self.peers {
            return Ok(());
        }
        let mut parts = Vec::with_capacity(self.peers);
        for (_, part) in acks.drain(..).filter(|(a, _)| *a == id) {
            parts.push(part.map_err(|e| format!("checkpoint {id}: {e}"))?);
        }
        parts.sort_by_key(|p| p.worker);
        let bytes: u64 = parts.iter().map(|p| p.bytes).sum();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            id,
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            fingerprint: self.spec.fingerprint.clone(),
            processes: self.spec.processes,
            workers_per_process: self.spec.workers,
            pipelines: pipelines
                .names()
                .into_iter()
                .zip(times)
                .map(|(name, &time)| PipelineTime { name, time })
                .collect(),
            parts,
        };
        self.store
            .commit(&manifest, self.spec.keep)
            .map_err(|e| format!("checkpoint {id}: {e}"))?;
        tracing::info!(
            checkpoint = id,
            bytes,
            ms = started.elapsed().as_secs_f64() * 1000.0,
            times = ?manifest.pipelines.iter().map(|p| (&p.name, p.time)).collect::<Vec<_>>(),
            "checkpoint written"
        );
        pipelines.release();
        self.under_way = None;
        self.last = Instant::now();
        Ok(())
    }

    /// Abandons the checkpoint under way (the run is ending early).
    pub fn abandon(&mut self, pipelines: &mut dyn Checkpointed) {
        if self.under_way.take().is_some() {
            pipelines.release();
        }
    }

    /// Whether this worker still owes a part or waits for acks.
    pub fn busy(&self) -> bool {
        self.owed.is_some() || self.under_way.is_some()
    }

    /// Closes the control dataflow's input.
    pub fn close(&mut self) {
        self.input = None;
    }

    /// How long until worker 0 starts the next checkpoint.
    pub fn due_in(&self) -> Duration {
        self.spec.every.saturating_sub(self.last.elapsed())
    }
}
