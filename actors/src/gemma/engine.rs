//! Continuous batching: one thread owns the model and runs decode steps for
//! every active request together ([`Gemma::decode`]); requests join between
//! steps (their prompt is prefilled, their first token sampled) and leave
//! as soon as they finish or their client goes away (their KV cache is
//! freed then). Each request samples with its own parameters and seed, so
//! its tokens are exactly those of [`generate`](super::generate) run alone.
//!
//! Limits: at most `max_batch` requests decode together; at most
//! `max_waiting` wait for a place; a request over that is refused at
//! once ([`Rejected::Busy`], an HTTP 429), never queued without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use super::generate::END_OF_GENERATION;
use super::model::{Gemma, KvCache};
use super::sampling::{Sampler, Sampling};

/// One generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Prompt token ids (BOS included).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters and seed.
    pub sampling: Sampling,
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token (included in the output).
    Stop,
    /// `max_tokens`, or the model's context, was reached.
    Length,
}

/// What the engine reports about a request, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The next generated token.
    Token(u32),
    /// The request is done.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The request failed (the model or a collective failed); nothing more follows.
    Failed(String),
}

/// Receives a request's events; returns `false` when the client has gone
/// away, which ends the request and frees its cache.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// Why a request was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The waiting queue is full.
    #[error("{waiting} requests are already waiting (the limit is {limit}); try again later")]
    Busy {
        /// Requests waiting.
        waiting: usize,
        /// The limit.
        limit: usize,
    },
    /// The prompt is empty or does not fit the context with room to generate.
    #[error("{0}")]
    Invalid(String),
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// The engine's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Requests decoding together.
    pub max_batch: usize,
    /// Requests waiting for a place.
    pub max_waiting: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_waiting: 64,
        }
    }
}

struct Job {
    request: Request,
    sink: Sink,
}

/// A running engine; dropping it lets the thread finish the active
/// requests and stop.
pub struct Engine {
    jobs: Option<mpsc::Sender<Job>>,
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    kv_bytes: Arc<AtomicUsize>,
    config: EngineConfig,
    context: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("waiting", &self.waiting())
            .field("running", &self.running())
            .finish()
    }
}

/// A request being decoded.
struct Active {
    sink: Sink,
    sampler: Sampler,
    cache: KvCache,
    prompt_tokens: usize,
    generated: usize,
    limit: usize,
    next: u32,
}

impl Engine {
    /// Starts the engine thread, which owns `gemma`.
    pub fn start(gemma: Gemma, config: EngineConfig) -> Self {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let waiting = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let kv_bytes = Arc::new(AtomicUsize::new(0));
        let context = gemma.config().context;
        let counters = Counters {
            waiting: Arc::clone(&waiting),
            running: Arc::clone(&running),
            kv_bytes: Arc::clone(&kv_bytes),
        };
        let thread = std::thread::Builder::new()
            .name("dima-engine".into())
            .spawn(move || run(&gemma, &inbox, config, &counters))
            .ok();
        Self {
            jobs: Some(jobs),
            waiting,
            running,
            kv_bytes,
            config,
            context,
            thread,
        }
    }

    /// Requests waiting for a place.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Requests decoding now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Bytes of KV cache held by the running requests (after the last step).
    pub fn kv_bytes(&self) -> usize {
        self.kv_bytes.load(Ordering::SeqCst)
    }

    /// Queues `request`; its events go to `sink` from the engine thread.
    pub fn submit(&self, request: Request, sink: Sink) -> Result<(), Rejected> {
        if request.prompt.is_empty() {
            return Err(Rejected::Invalid("the prompt is empty".into()));
        }
        if request.prompt.len() >= self.context {
            return Err(Rejected::Invalid(format!(
                "the prompt has {} tokens; the model's context is {}",
                request.prompt.len(),
                self.context
            )));
        }
        let limit = self.config.max_waiting;
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= limit {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejected::Busy {
                waiting: before,
                limit,
            });
        }
        let sent = self
            .jobs
            .as_ref()
            .map(|jobs| jobs.send(Job { request, sink }).is_ok());
        if sent != Some(true) {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejected::Stopped);
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the engine thread reports to the outside.
struct Counters {
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    kv_bytes: Arc<AtomicUsize>,
}

impl Counters {
    /// Publishes how many requests run and the KV bytes they hold.
    fn publish(&self, active: &[Active]) {
        self.running.store(active.len(), Ordering::SeqCst);
        self.kv_bytes.store(
            active.iter().map(|a| a.cache.bytes()).sum(),
            Ordering::SeqCst,
        );
    }
}

/// The engine loop.
fn run(gemma: &Gemma, inbox: &mpsc::Receiver<Job>, config: EngineConfig, counters: &Counters) {
    let vocab = gemma.config().vocab;
    let context = gemma.config().context;
    let mut active: Vec<Active> = Vec::new();
    let mut open = true;
    let mut logits = Vec::new();
    loop {
        // Admit waiting requests between steps; block only when idle.
        while open && active.len() < config.max_batch.max(1) {
            let job = if active.is_empty() {
                inbox.recv().ok()
            } else {
                match inbox.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => None,
                }
            };
            let Some(job) = job else {
                open = false;
                break;
            };
            counters.waiting.fetch_sub(1, Ordering::SeqCst);
            if let Some(a) = admit(gemma, job, context) {
                active.push(a);
            }
        }
        counters.publish(&active);
        if active.is_empty() {
            if open {
                continue;
            }
            return;
        }
        // One step for everyone.
        let steps: Vec<u32> = active.iter().map(|a| a.next).collect();
        logits.resize(active.len() * vocab, 0.0);
        let mut caches: Vec<&mut KvCache> = active.iter_mut().map(|a| &mut a.cache).collect();
        if let Err(e) = gemma.decode(&steps, &mut caches, &mut logits) {
            for mut a in active.drain(..) {
                (a.sink)(Event::Failed(e.to_string()));
            }
            counters.publish(&active);
            continue;
        }
        let mut i = 0;
        active.retain_mut(|a| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            i += 1;
            emit(a, row)
        });
        // Before waiting for new work, say what is left.
        counters.publish(&active);
    }
}

/// Prefills a new request and emits its first token; `None` when it is
/// already done.
fn admit(gemma: &Gemma, job: Job, context: usize) -> Option<Active> {
    let Job { request, mut sink } = job;
    let mut cache = gemma.new_cache();
    let mut logits = vec![0f32; gemma.config().vocab];
    if let Err(e) = gemma.prefill(&request.prompt, &mut cache, Some(&mut logits)) {
        sink(Event::Failed(e.to_string()));
        return None;
    }
    let mut active = Active {
        sink,
        sampler: Sampler::new(request.sampling),
        cache,
        prompt_tokens: request.prompt.len(),
        generated: 0,
        limit: request
            .max_tokens
            .min(context.saturating_sub(request.prompt.len())),
        next: 0,
    };
    emit(&mut active, &logits).then_some(active)
}

/// Samples the next token from `logits` and reports it; `false` when the
/// request is finished (or its client gone).
fn emit(a: &mut Active, logits: &[f32]) -> bool {
    if a.generated >= a.limit {
        return finish(a, FinishReason::Length);
    }
    let next = a.sampler.sample(logits);
    a.generated += 1;
    a.next = next;
    if !(a.sink)(Event::Token(next)) {
        return false;
    }
    if END_OF_GENERATION.contains(&next) {
        return finish(a, FinishReason::Stop);
    }
    if a.generated >= a.limit {
        return finish(a, FinishReason::Length);
    }
    true
}

fn finish(a: &mut Active, reason: FinishReason) -> bool {
    (a.sink)(Event::Finished {
        reason,
        prompt_tokens: a.prompt_tokens,
        completion_tokens: a.generated,
    });
    false
}
