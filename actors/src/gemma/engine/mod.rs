//! Continuous batching over tensor-parallel shard actors.
//!
//! Two kinds of actix actors do the work:
//! - one [`ShardActor`] per rank owns that rank's [`Shard`]: its model (any
//!   backend of the forward pass: the CPU [`Gemma`] or a device model) and
//!   the KV cache of every running request, each in a slot. It runs
//!   whatever [`Schedule`] it is sent: free the slots of requests that
//!   left, run the earlier chunks of long prompts that join, then one pass
//!   (or as few as the backend takes) for the prompts' last chunks and
//!   every running request's next token together. Every rank runs the
//!   same schedule; the collectives inside the forward pass join them.
//! - one engine actor (private; [`Engine`] is its handle) keeps the queue
//!   and the running requests. Between steps it admits waiting requests
//!   within the limits, sends the step's schedule to every local shard,
//!   samples each request's next token from rank 0's logits with the
//!   request's own parameters and seed, and streams it to the client.
//!   Requests leave as soon as they finish or their client goes away; the
//!   next schedule frees their caches.
//!
//! Ranks in other processes ([`Engine::start`] with rank 0 only) get each
//! schedule from rank 0's shard through the collective
//! ([`Collective::broadcast_bytes`](kernels::collective::Collective::broadcast_bytes))
//! and run it in their own shard actor ([`follow`]). While idle, the engine
//! sends an empty schedule every `heartbeat`, so a rank that went away is
//! found (and reported by [`Engine::unavailable`]) before the next request.
//!
//! Each request's tokens are those of [`generate`](super::generate) run
//! alone: a batched step gives each sequence the logits it gets by itself
//! (bit for bit on the f32 kernels; within about 1e-6 where AMX tiles
//! compute batches of two or more, `kernels::quant::tiles`, so tokens agree
//! except at exact near-ties). A failed step (a rank went away, a collective timed out)
//! fails every running request and makes the engine refuse new ones with
//! the reason ([`Rejected::Unavailable`], an HTTP 503): the ranks' caches
//! can no longer be trusted to agree.
//!
//! Limits: at most `max_batch` requests decode together; at most
//! `max_waiting` wait for a place; a request over that is refused at once
//! ([`Rejected::Busy`], an HTTP 429), never queued without bound. KV is
//! charged by use, as vLLM's paged allocator does: a running choice holds
//! the positions it has filled plus a bounded look-ahead
//! ([`EngineConfig::lookahead`], or its remaining budget if smaller), not
//! its whole `max_tokens`, and a request is admitted (first come, first
//! served) while the charges stay within `max_tokens_in_flight`. So a
//! request that may run to the end of the context does not keep a short
//! one waiting. When the running choices would grow past
//! `max_tokens_in_flight` in the next step, the newest is preempted: its
//! cache is freed, and it waits at the head of the queue to be recomputed
//! (its prompt and the tokens it has so far prefilled again, its sampler
//! and grammar state kept), so its tokens are the ones it would have
//! produced without the interruption.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;

use kernels::device::Device;

use super::constrain::Constraint;
use super::device::{DeviceGemma, KvPool};
use super::forward::{Backend, Head, Row, forward};
use super::generate::END_OF_GENERATION;
use super::model::{Gemma, KvCache, KvSnapshot};
use super::sampling::{Sampler, Sampling, TokenLogprob, token_logprob};

mod prefix;
mod shard;

pub use shard::{
    CpuShard, DeviceShard, Shard, ShardActor, ShardBackend, ShardModel, Step, StepOutput, follow,
};

/// Why the engine or one of its shards failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A schedule's bytes end before a field does.
    #[error("schedule: {what} at byte {at} runs past the end ({len} bytes)")]
    ScheduleTruncated {
        /// The field.
        what: &'static str,
        /// Its byte offset.
        at: usize,
        /// Bytes in the schedule.
        len: usize,
    },
    /// A schedule's count claims more items than its bytes hold.
    #[error("schedule: {what} at byte {at} says {count}, more than the {left} bytes left hold")]
    ScheduleCount {
        /// The field.
        what: &'static str,
        /// Its byte offset.
        at: usize,
        /// The count.
        count: usize,
        /// Bytes left after it.
        left: usize,
    },
    /// A schedule's stop flag is neither 0 nor 1.
    #[error("schedule: stop flag at byte 0 is {value}")]
    ScheduleStopFlag {
        /// The byte.
        value: u8,
    },
    /// A schedule's flag byte is neither 0 nor 1.
    #[error("schedule: {what} at byte {at} is {value}")]
    ScheduleFlag {
        /// The field.
        what: &'static str,
        /// Its byte offset.
        at: usize,
        /// The byte.
        value: u8,
    },
    /// A schedule reuses a prefix-cache entry this rank does not hold.
    #[error("rank {rank}: no prefix-cache entry {entry}")]
    NoPrefix {
        /// The rank.
        rank: usize,
        /// The entry.
        entry: u64,
    },
    /// A schedule reuses a prefix-cache entry on a backend without one.
    #[error("rank {rank}: this backend keeps no prefix cache")]
    NoPrefixCache {
        /// The rank.
        rank: usize,
    },
    /// Bytes after a schedule's last field.
    #[error("schedule: {left} bytes left over after byte {at}")]
    ScheduleTrailing {
        /// Bytes left over.
        left: usize,
        /// Where the schedule ended.
        at: usize,
    },
    /// The ranks could not exchange data.
    #[error(transparent)]
    Collective(#[from] kernels::collective::CollectiveError),
    /// The device model failed.
    #[error(transparent)]
    Device(#[from] super::device::DeviceModelError),
    /// A rank has no cache for a request it was told to decode.
    #[error("rank {rank}: no cache for request {id}")]
    NoCache {
        /// The rank.
        rank: usize,
        /// The request.
        id: u64,
    },
    /// Every sequence of the device's pool is taken.
    #[error("no free sequence for request {id}")]
    NoFreeSequence {
        /// The request.
        id: u64,
    },
    /// An admitted request without a prompt (the engine refuses those
    /// before they are scheduled).
    #[error("request {id} has an empty prompt")]
    EmptyPrompt {
        /// The request.
        id: u64,
    },
    /// A shard actor stopped answering.
    #[error("rank {rank}'s shard actor is gone: {source}")]
    ShardGone {
        /// The rank.
        rank: usize,
        /// Why.
        source: MailboxError,
    },
    /// Rank 0 was asked to follow.
    #[error("rank 0 runs the engine; it does not follow")]
    RankZeroFollows,
    /// An actor system (engine or shard) failed to run.
    #[error("the {which}'s actor system failed: {source}")]
    ActorSystem {
        /// `engine` or `shard`.
        which: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The shard actor panicked.
    #[error("the shard actor panicked")]
    ShardPanicked,
    /// The shard stopped without reporting why.
    #[error("the shard stopped without a reason")]
    NoReason,
    /// No rank 0 among the ranks given.
    #[error("the engine needs at least rank 0")]
    NoRankZero,
    /// The ranks given are neither the whole group nor rank 0 alone.
    #[error(
        "the engine runs either every rank of the group ({world}) or rank 0 alone; it was given ranks {given:?}"
    )]
    Ranks {
        /// The group's size.
        world: usize,
        /// The ranks given.
        given: Vec<usize>,
    },
    /// A limit of 0.
    #[error(
        "max_batch ({max_batch}), max_waiting ({max_waiting}) and max_tokens_in_flight ({max_tokens_in_flight}) must be at least 1"
    )]
    Limits {
        /// `max_batch`.
        max_batch: usize,
        /// `max_waiting`.
        max_waiting: usize,
        /// `max_tokens_in_flight`.
        max_tokens_in_flight: usize,
    },
    /// The engine's thread could not start.
    #[error("cannot start the engine thread: {0}")]
    Thread(std::io::Error),
    /// The engine's thread ended while starting.
    #[error("the engine thread stopped while starting")]
    StoppedWhileStarting,
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt token ids (BOS included).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (each choice).
    pub max_tokens: usize,
    /// Sampling parameters and seed (choice `i > 0` draws with a seed
    /// derived from this one and `i`: [`choice_seed`]).
    pub sampling: Sampling,
    /// Choices: samples of the same prompt, which is prefilled once and
    /// its cache copied to the others.
    pub n: usize,
    /// Tokens that end a choice like an end-of-generation token.
    pub stop_token_ids: Vec<u32>,
    /// Report each generated token's log-probability and this many most
    /// likely alternatives ([`TokenLogprob`]).
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-probability (after the first) and
    /// this many alternatives, once, before the first token
    /// ([`Event::Prompt`]).
    pub prompt_logprobs: Option<usize>,
    /// The grammar every choice follows (structured output); each choice
    /// gets its own copy of its state.
    pub constraint: Option<Constraint>,
    /// Keep generating after an end-of-generation token (vLLM's
    /// `ignore_eos`, used to measure fixed-length loads); a stop token id
    /// or a completed grammar still ends the choice.
    pub ignore_eos: bool,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            prompt: Vec::new(),
            max_tokens: 16,
            sampling: Sampling::default(),
            n: 1,
            stop_token_ids: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            constraint: None,
            ignore_eos: false,
        }
    }
}

/// Most alternatives a log-probability report lists (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Most choices of one request.
pub const MAX_CHOICES: usize = 16;

/// The seed choice `choice` of a request seeded `seed` samples with
/// (choice 0 keeps the request's seed, so `n = 1` is unchanged).
pub fn choice_seed(seed: u64, choice: usize) -> u64 {
    // SplitMix64's increment: a different, fixed stream per choice.
    seed.wrapping_add((choice as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token (included in the output).
    Stop,
    /// `max_tokens`, or the model's context, was reached.
    Length,
}

/// What the engine reports about a request, in order (each choice's
/// tokens in order, the choices interleaved).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// With [`Request::prompt_logprobs`]: the log-probability of each
    /// prompt token after the first, once, before any token.
    Prompt(Vec<TokenLogprob>),
    /// A choice's next generated token.
    Token {
        /// The choice (0 to `n - 1`).
        choice: usize,
        /// The token.
        id: u32,
        /// With [`Request::logprobs`]: its log-probability.
        logprob: Option<TokenLogprob>,
    },
    /// A choice is done.
    Finished {
        /// The choice.
        choice: usize,
        /// Why.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Tokens this choice generated.
        completion_tokens: usize,
    },
    /// The request failed (the model or a collective failed); nothing more
    /// follows for any choice.
    Failed(String),
}

/// Receives a request's events; returns `false` to end the choice the
/// event was about (a stop string matched, or the client has gone away:
/// then every choice ends at its next event), which frees its cache. No
/// `Finished` follows for a choice ended so.
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
    /// The prompt is empty or does not fit the context or the limits.
    #[error("{0}")]
    Invalid(String),
    /// A step failed (a rank went away): the engine takes no more requests.
    #[error("the model is unavailable: {0}")]
    Unavailable(String),
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// A prompt a step admits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admit {
    /// The request (its first choice).
    pub id: u64,
    /// Its prompt.
    pub prompt: Vec<u32>,
    /// The other choices: after the step each gets a copy of the prompt's
    /// cache (a backend that cannot copy prefills it again).
    pub siblings: Vec<u64>,
    /// Rank 0 reports the log-probabilities of the prompt's tokens with
    /// this many alternatives.
    pub prompt_logprobs: Option<u8>,
    /// Start from this prefix-cache entry's first positions (entry id,
    /// positions) and run only the rest of the prompt.
    pub reuse: Option<(u64, u32)>,
    /// Keep the prompt's keys and values as this prefix-cache entry.
    pub save: Option<u64>,
}

/// The engine's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Requests decoding together.
    pub max_batch: usize,
    /// Requests waiting for a place.
    pub max_waiting: usize,
    /// KV positions the running requests may hold together: each is
    /// charged what it has filled plus [`lookahead`](Self::lookahead); a
    /// request that cannot fit alone (prompt plus `max_tokens`, per
    /// choice) is refused.
    pub max_tokens_in_flight: usize,
    /// Positions a running choice is charged beyond those it has filled
    /// (at most its remaining budget): how far the running requests may
    /// grow before one is preempted.
    pub lookahead: usize,
    /// With ranks in other processes: how often an idle engine checks on
    /// them (keep it well under their collective timeout).
    pub heartbeat: Duration,
    /// Bytes of KV each rank may keep for the prefix cache (0: off). A
    /// backend that keeps none (the device model) ignores it, and
    /// [`Engine::prefix_cache_capacity`] says 0.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_waiting: 64,
            max_tokens_in_flight: 65_536,
            lookahead: 256,
            heartbeat: Duration::from_secs(5),
            prefix_cache_bytes: 512 << 20,
        }
    }
}

// ---------------------------------------------------------------------------
// The schedule and the shard actor.

/// One step, the same for every rank: free the caches of `free`, prefill
/// each of `admit` into a new cache, then decode one token for each of
/// `decode` (in this order, as one batch). `stop` ends ranks that follow
/// rank 0 from another process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Requests whose caches are dropped.
    pub free: Vec<u64>,
    /// Prefix-cache entries dropped.
    pub evict: Vec<u64>,
    /// New requests and their prompts.
    pub admit: Vec<Admit>,
    /// Running requests and the token each feeds.
    pub decode: Vec<(u64, u32)>,
    /// The engine is stopping.
    pub stop: bool,
}

impl Schedule {
    /// Whether the step does nothing.
    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
            && self.evict.is_empty()
            && self.admit.is_empty()
            && self.decode.is_empty()
            && !self.stop
    }

    /// Little-endian bytes: stop (u8); free: count (u32), ids (u64);
    /// evict: count (u32), ids (u64); admit: count (u32), per request id
    /// (u64), siblings: count (u32), ids (u64), prompt log-probabilities
    /// (u8: 0 none, else one more than the alternatives), reuse (u8 flag,
    /// then entry u64 and positions u32), save (u8 flag, then entry u64),
    /// length (u32), tokens (u32); decode: count (u32), per request id
    /// (u64), token (u32).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.stop)];
        let count = |out: &mut Vec<u8>, n: usize| out.extend((n as u32).to_le_bytes());
        count(&mut out, self.free.len());
        for id in &self.free {
            out.extend(id.to_le_bytes());
        }
        count(&mut out, self.evict.len());
        for id in &self.evict {
            out.extend(id.to_le_bytes());
        }
        count(&mut out, self.admit.len());
        for a in &self.admit {
            out.extend(a.id.to_le_bytes());
            count(&mut out, a.siblings.len());
            for id in &a.siblings {
                out.extend(id.to_le_bytes());
            }
            out.push(a.prompt_logprobs.map_or(0, |k| k.saturating_add(1)));
            match a.reuse {
                Some((entry, len)) => {
                    out.push(1);
                    out.extend(entry.to_le_bytes());
                    out.extend(len.to_le_bytes());
                }
                None => out.push(0),
            }
            match a.save {
                Some(entry) => {
                    out.push(1);
                    out.extend(entry.to_le_bytes());
                }
                None => out.push(0),
            }
            count(&mut out, a.prompt.len());
            for t in &a.prompt {
                out.extend(t.to_le_bytes());
            }
        }
        count(&mut out, self.decode.len());
        for (id, t) in &self.decode {
            out.extend(id.to_le_bytes());
            out.extend(t.to_le_bytes());
        }
        out
    }

    /// Reads [`encode`](Self::encode)'s bytes; an error names the byte
    /// offset where they stop making sense.
    pub fn decode(bytes: &[u8]) -> Result<Self, EngineError> {
        struct Reader<'a> {
            bytes: &'a [u8],
            at: usize,
        }
        impl Reader<'_> {
            fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], EngineError> {
                let end = self.at + N;
                let chunk = self
                    .bytes
                    .get(self.at..end)
                    .ok_or(EngineError::ScheduleTruncated {
                        what,
                        at: self.at,
                        len: self.bytes.len(),
                    })?;
                self.at = end;
                let mut out = [0u8; N];
                out.copy_from_slice(chunk);
                Ok(out)
            }
            fn flag(&mut self, what: &'static str) -> Result<bool, EngineError> {
                let at = self.at;
                match self.take::<1>(what)?[0] {
                    0 => Ok(false),
                    1 => Ok(true),
                    value => Err(EngineError::ScheduleFlag { what, at, value }),
                }
            }
            fn u32(&mut self, what: &'static str) -> Result<u32, EngineError> {
                self.take::<4>(what).map(u32::from_le_bytes)
            }
            fn u64(&mut self, what: &'static str) -> Result<u64, EngineError> {
                self.take::<8>(what).map(u64::from_le_bytes)
            }
            /// A count of items of at least `unit` bytes each, checked
            /// against what is left.
            fn count(&mut self, what: &'static str, unit: usize) -> Result<usize, EngineError> {
                let at = self.at;
                let n = self.u32(what)? as usize;
                if n * unit > self.bytes.len() - self.at {
                    return Err(EngineError::ScheduleCount {
                        what,
                        at,
                        count: n,
                        left: self.bytes.len() - self.at,
                    });
                }
                Ok(n)
            }
        }
        let mut r = Reader { bytes, at: 0 };
        let stop = match r.take::<1>("stop flag")?[0] {
            0 => false,
            1 => true,
            other => return Err(EngineError::ScheduleStopFlag { value: other }),
        };
        let mut s = Schedule {
            stop,
            ..Schedule::default()
        };
        for _ in 0..r.count("free count", 8)? {
            s.free.push(r.u64("freed id")?);
        }
        for _ in 0..r.count("evict count", 8)? {
            s.evict.push(r.u64("evicted entry")?);
        }
        for _ in 0..r.count("admit count", 19)? {
            let id = r.u64("admitted id")?;
            let n = r.count("sibling count", 8)?;
            let siblings = (0..n)
                .map(|_| r.u64("sibling id"))
                .collect::<Result<_, _>>()?;
            let prompt_logprobs = r.take::<1>("prompt logprobs")?[0].checked_sub(1);
            let reuse = match r.flag("reuse flag")? {
                true => Some((r.u64("reused entry")?, r.u32("reused positions")?)),
                false => None,
            };
            let save = match r.flag("save flag")? {
                true => Some(r.u64("saved entry")?),
                false => None,
            };
            let n = r.count("prompt length", 4)?;
            let prompt = (0..n)
                .map(|_| r.u32("prompt token"))
                .collect::<Result<_, _>>()?;
            s.admit.push(Admit {
                id,
                prompt,
                siblings,
                prompt_logprobs,
                reuse,
                save,
            });
        }
        for _ in 0..r.count("decode count", 12)? {
            let id = r.u64("decoded id")?;
            s.decode.push((id, r.u32("decoded token")?));
        }
        if r.at != bytes.len() {
            return Err(EngineError::ScheduleTrailing {
                left: bytes.len() - r.at,
                at: r.at,
            });
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------
// The engine actor and its handle.

struct Job {
    request: Request,
    sink: Sink,
    /// When it was submitted (the queue's oldest wait).
    submitted: std::time::Instant,
}

/// A sink the choices of one request share (the engine's thread alone
/// calls it).
type Shared = Arc<Mutex<Sink>>;

fn send(sink: &Shared, event: Event) -> bool {
    sink.lock().map(|mut s| s(event)).unwrap_or(false)
}

/// A request waiting for a place: new, or a choice preempted to be
/// recomputed.
enum Waiting {
    New(Box<Job>),
    Resume {
        active: Box<Active>,
        since: std::time::Instant,
    },
}

impl Waiting {
    fn since(&self) -> std::time::Instant {
        match self {
            Self::New(job) => job.submitted,
            Self::Resume { since, .. } => *since,
        }
    }
}

/// A choice being decoded.
struct Active {
    /// Its cache's id (a new one each time it is admitted).
    id: u64,
    /// The first id its request got: the order of arrival, and the
    /// request's identity across its choices and preemptions.
    arrival: u64,
    choice: usize,
    sink: Shared,
    sampler: Sampler,
    stop_ids: Arc<[u32]>,
    logprobs: Option<usize>,
    constraint: Option<Constraint>,
    prompt: Arc<[u32]>,
    /// The tokens generated so far (the last is `next`, not yet fed).
    tokens: Vec<u32>,
    ignore_eos: bool,
    limit: usize,
    next: u32,
}

impl Active {
    /// Tokens generated so far.
    fn generated(&self) -> usize {
        self.tokens.len()
    }

    /// Positions its cache holds after the next step.
    fn held(&self) -> usize {
        self.prompt.len() + self.generated()
    }

    /// What it is charged against `max_tokens_in_flight`.
    fn charge(&self, lookahead: usize) -> usize {
        (self.held() + lookahead).min(self.prompt.len() + self.limit)
    }
}

/// What the engine publishes for the handle (and the server's metrics).
#[derive(Debug, Default)]
struct Counters {
    waiting: AtomicUsize,
    running: AtomicUsize,
    kv_bytes: AtomicUsize,
    prefix_queries: AtomicUsize,
    prefix_hits: AtomicUsize,
    preemptions: AtomicUsize,
    oldest_waiting: Mutex<Option<std::time::Instant>>,
    unavailable: Mutex<Option<String>>,
}

/// Queue a request.
#[derive(Message)]
#[rtype(result = "()")]
struct Submit(Job);

/// Finish the queued and running requests, then stop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Shutdown;

struct EngineActor {
    shards: Vec<Addr<ShardActor>>,
    config: EngineConfig,
    vocab: usize,
    context: usize,
    relay: bool,
    queue: VecDeque<Waiting>,
    active: Vec<Active>,
    to_free: Vec<u64>,
    stepping: bool,
    closing: bool,
    broken: Option<String>,
    next_id: u64,
    counters: Arc<Counters>,
    prefixes: Option<prefix::PrefixIndex>,
}

impl Actor for EngineActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.relay {
            ctx.run_interval(self.config.heartbeat, |act, ctx| {
                let idle = act.active.is_empty() && act.queue.is_empty();
                if idle && !act.stepping && act.broken.is_none() && !act.closing {
                    act.step(Schedule::default(), Vec::new(), ctx);
                }
            });
        }
    }
}

impl Handler<Submit> for EngineActor {
    type Result = ();

    fn handle(&mut self, Submit(mut job): Submit, ctx: &mut Self::Context) {
        if let Some(reason) = &self.broken {
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            (job.sink)(Event::Failed(format!("the model is unavailable: {reason}")));
            return;
        }
        self.queue.push_back(Waiting::New(Box::new(job)));
        self.publish_oldest();
        self.kick(ctx);
    }
}

impl Handler<Shutdown> for EngineActor {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Self::Context) {
        self.closing = true;
        self.kick(ctx);
    }
}

impl EngineActor {
    /// Frees the newest choices while the running ones would hold more
    /// than `max_tokens_in_flight` after the next step; each waits at the
    /// head of the queue to be recomputed. The oldest request always
    /// stays (it fits alone: [`Engine::submit`] checks).
    fn preempt(&mut self) {
        let max = self.config.max_tokens_in_flight;
        while self.active.len() > 1 && self.active.iter().map(Active::held).sum::<usize>() > max {
            let Some(newest) = (0..self.active.len())
                .max_by_key(|&i| (self.active[i].arrival, self.active[i].choice))
            else {
                break;
            };
            let a = self.active.remove(newest);
            tracing::info!(
                request = a.arrival,
                choice = a.choice,
                held = a.held(),
                max_tokens_in_flight = max,
                "KV short: the newest choice is preempted, to be recomputed"
            );
            self.to_free.push(a.id);
            self.counters.preemptions.fetch_add(1, Ordering::Relaxed);
            self.queue.push_front(Waiting::Resume {
                active: Box::new(a),
                since: std::time::Instant::now(),
            });
        }
    }

    /// Starts the next step if there is work and none is running.
    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.stepping {
            return;
        }
        if self.broken.is_some() {
            self.fail_queue();
            if self.closing {
                System::current().stop();
            }
            return;
        }
        self.preempt();
        let mut schedule = Schedule {
            free: std::mem::take(&mut self.to_free),
            decode: self.active.iter().map(|a| (a.id, a.next)).collect(),
            ..Schedule::default()
        };
        let mut joining = Vec::new();
        let lookahead = self.config.lookahead;
        let mut charged: usize = self.active.iter().map(|a| a.charge(lookahead)).sum();
        let mut places = self.active.len();
        while let Some(waiting) = self.queue.front() {
            let (n, need) = match waiting {
                Waiting::New(job) => {
                    let n = job.request.n.max(1);
                    let r = &job.request;
                    let first = (r.prompt.len() + lookahead).min(budget(r, self.context));
                    (n, n * first)
                }
                Waiting::Resume { active, .. } => (1, active.charge(lookahead)),
            };
            if places + n > self.config.max_batch.max(1) && places > 0 {
                break;
            }
            // First come, first served: a big request is not overtaken.
            if charged + need > self.config.max_tokens_in_flight && charged > 0 {
                break;
            }
            // A prompt sharing a long prefix with one this step saves waits
            // a step and reuses it (16 streams with one system prompt
            // compute it once, not 16 times side by side).
            if let Waiting::New(job) = waiting
                && job.request.prompt_logprobs.is_none()
                && self
                    .prefixes
                    .as_ref()
                    .is_some_and(|index| index.worth_waiting(&job.request.prompt))
            {
                break;
            }
            let Some(waiting) = self.queue.pop_front() else {
                break;
            };
            charged += need;
            places += n;
            let id = self.next_id;
            self.next_id += n as u64;
            let job = match waiting {
                Waiting::New(job) => job,
                Waiting::Resume { active, since } => {
                    // Its prompt and the tokens it has so far, prefilled
                    // again (from the prefix cache where it can).
                    let tokens: Vec<u32> = active
                        .prompt
                        .iter()
                        .chain(&active.tokens)
                        .copied()
                        .collect();
                    let reuse = self.prefixes.as_mut().and_then(|i| i.lookup(&tokens));
                    schedule.admit.push(Admit {
                        id,
                        prompt: tokens,
                        siblings: Vec::new(),
                        prompt_logprobs: None,
                        reuse: reuse.map(|(entry, r)| (entry, r as u32)),
                        save: None,
                    });
                    joining.push((id, Waiting::Resume { active, since }));
                    continue;
                }
            };
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            let prompt = &job.request.prompt;
            // A prompt whose every token is scored runs whole; others reuse
            // and save prefix-cache entries.
            let (mut reuse, mut save) = (None, None);
            if job.request.prompt_logprobs.is_none()
                && let Some(index) = self.prefixes.as_mut()
            {
                reuse = index.lookup(prompt);
                self.counters
                    .prefix_queries
                    .fetch_add(prompt.len(), Ordering::Relaxed);
                let reused = reuse.map_or(0, |(_, r)| r);
                self.counters
                    .prefix_hits
                    .fetch_add(reused, Ordering::Relaxed);
                let mut keep: Vec<u64> = schedule
                    .admit
                    .iter()
                    .filter_map(|a| a.reuse.map(|r| r.0))
                    .collect();
                keep.extend(reuse.map(|r| r.0));
                if let Some((entry, evicted)) = index.save(prompt, reused, &keep) {
                    save = Some(entry);
                    schedule.evict.extend(evicted);
                }
            }
            schedule.admit.push(Admit {
                id,
                prompt: prompt.clone(),
                siblings: (1..n as u64).map(|i| id + i).collect(),
                prompt_logprobs: job
                    .request
                    .prompt_logprobs
                    .map(|k| k.min(MAX_TOP_LOGPROBS) as u8),
                reuse: reuse.map(|(entry, r)| (entry, r as u32)),
                save,
            });
            joining.push((id, Waiting::New(job)));
        }
        self.publish_oldest();
        if schedule.is_empty() {
            if self.closing && self.queue.is_empty() {
                self.stepping = true;
                let stop = Schedule {
                    stop: true,
                    ..Schedule::default()
                };
                let sent = self.shards.first().map(|s| s.send(Step(stop)));
                ctx.spawn(
                    async move {
                        if let Some(sent) = sent {
                            let _ = sent.await;
                        }
                    }
                    .into_actor(self)
                    .map(|(), _act, _ctx| System::current().stop()),
                );
            }
            return;
        }
        self.step(schedule, joining, ctx);
    }

    /// Sends `schedule` to every local shard and handles the outcome.
    fn step(&mut self, schedule: Schedule, joining: Vec<(u64, Waiting)>, ctx: &mut Context<Self>) {
        self.stepping = true;
        let sends: Vec<_> = self
            .shards
            .iter()
            .map(|s| s.send(Step(schedule.clone())))
            .collect();
        ctx.spawn(futures_util::future::join_all(sends).into_actor(self).map(
            move |results, act, ctx| {
                act.stepping = false;
                act.finish_step(results, joining);
                act.kick(ctx);
            },
        ));
    }

    fn finish_step(
        &mut self,
        results: Vec<Result<Result<StepOutput, EngineError>, MailboxError>>,
        joining: Vec<(u64, Waiting)>,
    ) {
        let mut outputs = Vec::with_capacity(results.len());
        let mut failure = None;
        for (rank, r) in results.into_iter().enumerate() {
            match r {
                Ok(Ok(out)) => outputs.push(out),
                Ok(Err(e)) => {
                    failure.get_or_insert(e.to_string());
                }
                Err(source) => {
                    failure.get_or_insert(EngineError::ShardGone { rank, source }.to_string());
                }
            }
        }
        if let Some(reason) = failure {
            tracing::error!(%reason, "a step failed; the engine takes no more requests");
            // Unavailable before anyone hears of the failure: a client that
            // retries after its error must find the engine refusing at once.
            if let Ok(mut slot) = self.counters.unavailable.lock() {
                *slot = Some(reason.clone());
            }
            // One `Failed` per request, not per choice.
            let mut told: Vec<u64> = Vec::new();
            for a in self.active.drain(..) {
                tell_failed(&mut told, &a, &reason);
            }
            for (_, waiting) in joining {
                match waiting {
                    Waiting::New(mut job) => {
                        (job.sink)(Event::Failed(reason.clone()));
                    }
                    Waiting::Resume { active, .. } => tell_failed(&mut told, &active, &reason),
                }
            }
            self.broken = Some(reason);
            self.publish(0);
            return;
        }
        if let Some(index) = self.prefixes.as_mut() {
            index.step_done();
        }
        let kv_bytes = outputs.iter().map(|o| o.kv_bytes).sum();
        let (logits, mut prompts) = outputs
            .into_iter()
            .next()
            .map(|o| (o.logits, o.prompt_logprobs))
            .unwrap_or_default();
        let vocab = self.vocab;
        let row = |i: usize| &logits[i * vocab..(i + 1) * vocab];
        let admitted = joining.len();
        // Running requests first (their rows follow the admitted ones).
        let mut i = admitted;
        let mut to_free = Vec::new();
        self.active.retain_mut(|a| {
            let keep = emit(a, row(i));
            i += 1;
            if !keep {
                to_free.push(a.id);
            }
            keep
        });
        for (k, (id, waiting)) in joining.into_iter().enumerate() {
            let job = match waiting {
                Waiting::New(job) => job,
                Waiting::Resume { mut active, .. } => {
                    active.id = id;
                    if emit(&mut active, row(k)) {
                        self.active.push(*active);
                    } else {
                        to_free.push(id);
                    }
                    continue;
                }
            };
            let r = job.request;
            let sink: Shared = Arc::new(Mutex::new(job.sink));
            if r.prompt_logprobs.is_some() {
                let scored = prompts
                    .iter_mut()
                    .find(|(of, _)| *of == id)
                    .map(|(_, list)| std::mem::take(list))
                    .unwrap_or_default();
                if !send(&sink, Event::Prompt(scored)) {
                    to_free.extend((0..r.n.max(1) as u64).map(|i| id + i));
                    continue;
                }
            }
            let stop_ids: Arc<[u32]> = r.stop_token_ids.clone().into();
            let prompt: Arc<[u32]> = r.prompt.clone().into();
            for choice in 0..r.n.max(1) {
                let mut sampling = r.sampling;
                sampling.seed = choice_seed(sampling.seed, choice);
                let mut a = Active {
                    id: id + choice as u64,
                    arrival: id,
                    choice,
                    sink: Arc::clone(&sink),
                    sampler: Sampler::new(sampling),
                    stop_ids: Arc::clone(&stop_ids),
                    logprobs: r.logprobs.map(|k| k.min(MAX_TOP_LOGPROBS)),
                    constraint: r.constraint.clone(),
                    prompt: Arc::clone(&prompt),
                    tokens: Vec::new(),
                    ignore_eos: r.ignore_eos,
                    limit: limit(&r, self.context),
                    next: 0,
                };
                if emit(&mut a, row(k)) {
                    self.active.push(a);
                } else {
                    to_free.push(a.id);
                }
            }
        }
        self.to_free.extend(to_free);
        self.publish(kv_bytes);
    }

    fn fail_queue(&mut self) {
        let reason = self.broken.clone().unwrap_or_default();
        let failed = format!("the model is unavailable: {reason}");
        let mut told: Vec<u64> = Vec::new();
        for waiting in self.queue.drain(..) {
            match waiting {
                Waiting::New(mut job) => {
                    self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
                    (job.sink)(Event::Failed(failed.clone()));
                }
                Waiting::Resume { active, .. } => tell_failed(&mut told, &active, &failed),
            }
        }
        self.publish_oldest();
    }

    /// When the oldest waiting request was submitted, for `/health`.
    fn publish_oldest(&self) {
        if let Ok(mut oldest) = self.counters.oldest_waiting.lock() {
            *oldest = self.queue.front().map(Waiting::since);
        }
    }

    fn publish(&self, kv_bytes: usize) {
        self.publish_oldest();
        self.counters
            .running
            .store(self.active.len(), Ordering::SeqCst);
        self.counters.kv_bytes.store(kv_bytes, Ordering::SeqCst);
    }
}

/// Tokens a request may generate: `max_tokens`, within the context.
fn limit(request: &Request, context: usize) -> usize {
    request
        .max_tokens
        .min(context.saturating_sub(request.prompt.len()))
}

/// Tokens a request's cache may grow to.
fn budget(request: &Request, context: usize) -> usize {
    request.prompt.len() + limit(request, context)
}

/// Tells `a`'s request it failed, once for all its choices (`told`: the
/// requests, by arrival, already told).
fn tell_failed(told: &mut Vec<u64>, a: &Active, reason: &str) {
    if !told.contains(&a.arrival) {
        told.push(a.arrival);
        send(&a.sink, Event::Failed(reason.to_owned()));
    }
}

/// Samples the next token from `logits` and reports it; `false` when the
/// request is finished (or its client gone).
fn emit(a: &mut Active, logits: &[f32]) -> bool {
    if a.generated() >= a.limit {
        return finish(a, FinishReason::Length);
    }
    // A model gone numerically wrong (a NaN weight, an overflow) ends the
    // request with the reason, never a made-up token.
    if let Some(bad) = logits.iter().find(|v| !v.is_finite()) {
        send(
            &a.sink,
            Event::Failed(format!(
                "the model produced a non-finite logit ({bad}) at generated token {}; \
                 the request is ended",
                a.generated() + 1
            )),
        );
        return false;
    }
    // A grammar masks what it does not allow; log-probabilities stay the
    // model's own.
    let next = match a.constraint.as_mut() {
        Some(c) => {
            let mut masked = logits.to_vec();
            if let Err(e) = c.mask(&mut masked) {
                send(&a.sink, Event::Failed(e.to_string()));
                return false;
            }
            a.sampler.sample(&masked)
        }
        None => a.sampler.sample(logits),
    };
    let complete = match a.constraint.as_mut() {
        Some(c) if !END_OF_GENERATION.contains(&next) => match c.advance(next) {
            Ok(done) => done,
            Err(e) => {
                send(&a.sink, Event::Failed(e.to_string()));
                return false;
            }
        },
        _ => false,
    };
    a.next = next;
    a.tokens.push(next);
    let logprob = a.logprobs.map(|k| token_logprob(logits, next, k));
    let token = Event::Token {
        choice: a.choice,
        id: next,
        logprob,
    };
    if !send(&a.sink, token) {
        return false;
    }
    // Under `ignore_eos` an end-of-generation token ends the choice only
    // where a grammar allowed it (the grammar is then complete).
    let end = END_OF_GENERATION.contains(&next) && (!a.ignore_eos || a.constraint.is_some());
    if end || a.stop_ids.contains(&next) || complete {
        return finish(a, FinishReason::Stop);
    }
    if a.generated() >= a.limit {
        return finish(a, FinishReason::Length);
    }
    true
}

fn finish(a: &mut Active, reason: FinishReason) -> bool {
    send(
        &a.sink,
        Event::Finished {
            choice: a.choice,
            reason,
            prompt_tokens: a.prompt.len(),
            completion_tokens: a.generated(),
        },
    );
    false
}

/// A running engine: its actor system runs on its own thread, each shard on
/// its own arbiter. Dropping the handle lets the engine finish the queued
/// and running requests, tells ranks in other processes to stop, and waits.
pub struct Engine {
    addr: Addr<EngineActor>,
    counters: Arc<Counters>,
    config: EngineConfig,
    context: usize,
    prefix_capacity: usize,
    world: usize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("world", &self.world)
            .field("waiting", &self.waiting())
            .field("running", &self.running())
            .finish()
    }
}

impl Engine {
    /// Starts the engine over `ranks`: either every rank of the group
    /// (threads of this process), or rank 0 alone when the other ranks run
    /// in other processes ([`follow`]) and are reached through rank 0's
    /// collective.
    pub fn start(ranks: Vec<Gemma>, config: EngineConfig) -> Result<Self, EngineError> {
        let mut shards = Vec::with_capacity(ranks.len());
        for gemma in ranks {
            shards.push(Box::new(CpuShard::new(gemma, 0, 0)?) as Box<dyn ShardModel>);
        }
        Self::start_shards(shards, config)
    }

    /// Starts the engine over the model on a device (one rank), with a
    /// cache of `context` positions for each of `config.max_batch`
    /// requests.
    pub fn start_device<D: Device + Send + 'static>(
        model: DeviceGemma<D>,
        config: EngineConfig,
        context: usize,
    ) -> Result<Self, EngineError>
    where
        DeviceGemma<D>: Send,
        KvPool<D>: Send,
    {
        let shard = DeviceShard::new(model, config.max_batch.max(1), context)?;
        Self::start_shards(vec![Box::new(shard)], config)
    }

    /// [`start`](Self::start) over any shard models.
    pub fn start_shards(
        ranks: Vec<Box<dyn ShardModel>>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let Some(first) = ranks.first() else {
            return Err(EngineError::NoRankZero);
        };
        let world = first.world();
        let vocab = first.vocab();
        let context = first.context();
        let prefix_capacity = first
            .kv_bytes_per_token()
            .filter(|&b| b > 0)
            .map_or(0, |b| config.prefix_cache_bytes / b);
        let mut seen: Vec<usize> = ranks.iter().map(|g| g.rank()).collect();
        seen.sort_unstable();
        let relay = if ranks.len() == world && seen.iter().copied().eq(0..world) {
            false
        } else if ranks.len() == 1 && seen == [0] {
            true
        } else {
            return Err(EngineError::Ranks { world, given: seen });
        };
        if config.max_batch == 0 || config.max_waiting == 0 || config.max_tokens_in_flight == 0 {
            return Err(EngineError::Limits {
                max_batch: config.max_batch,
                max_waiting: config.max_waiting,
                max_tokens_in_flight: config.max_tokens_in_flight,
            });
        }
        let mut ranks = ranks;
        ranks.sort_by_key(|g| g.rank());
        let counters = Arc::new(Counters::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("dima-engine".into())
            .spawn(move || {
                let system = System::new();
                system.block_on(async move {
                    let shards: Vec<Addr<ShardActor>> = ranks
                        .into_iter()
                        .map(|gemma| {
                            let arbiter = Arbiter::new();
                            ShardActor::start_in_arbiter(&arbiter.handle(), move |_| {
                                ShardActor::new(gemma, relay)
                            })
                        })
                        .collect();
                    let engine = EngineActor {
                        shards,
                        config,
                        vocab,
                        context,
                        relay,
                        queue: VecDeque::new(),
                        active: Vec::new(),
                        to_free: Vec::new(),
                        stepping: false,
                        closing: false,
                        broken: None,
                        next_id: 1,
                        counters: shared,
                        prefixes: (prefix_capacity > 0)
                            .then(|| prefix::PrefixIndex::new(prefix_capacity)),
                    }
                    .start();
                    let _ = tx.send(engine);
                });
                if let Err(e) = system.run() {
                    tracing::error!(error = %e, "the engine's actor system failed");
                }
            })
            .map_err(EngineError::Thread)?;
        let addr = rx.recv().map_err(|_| EngineError::StoppedWhileStarting)?;
        Ok(Self {
            addr,
            counters,
            config,
            context,
            prefix_capacity,
            world,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Requests waiting for a place.
    pub fn waiting(&self) -> usize {
        self.counters.waiting.load(Ordering::SeqCst)
    }

    /// Requests decoding now.
    pub fn running(&self) -> usize {
        self.counters.running.load(Ordering::SeqCst)
    }

    /// Bytes of KV cache held by the running requests on this process's
    /// ranks (after the last step).
    pub fn kv_bytes(&self) -> usize {
        self.counters.kv_bytes.load(Ordering::SeqCst)
    }

    /// Tensor-parallel ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Positions the prefix cache holds at most (0: off, or a backend
    /// without one).
    pub fn prefix_cache_capacity(&self) -> usize {
        self.prefix_capacity
    }

    /// Prompt tokens looked up in the prefix cache, and those found there
    /// (reused instead of computed), since the start.
    pub fn prefix_cache_counts(&self) -> (usize, usize) {
        (
            self.counters.prefix_queries.load(Ordering::Relaxed),
            self.counters.prefix_hits.load(Ordering::Relaxed),
        )
    }

    /// Choices preempted (their caches freed to be recomputed) since the
    /// start.
    pub fn preemptions(&self) -> usize {
        self.counters.preemptions.load(Ordering::Relaxed)
    }

    /// How long the oldest waiting request has waited (zero when none
    /// waits).
    pub fn oldest_wait(&self) -> std::time::Duration {
        self.counters
            .oldest_waiting
            .lock()
            .ok()
            .and_then(|o| o.map(|t| t.elapsed()))
            .unwrap_or_default()
    }

    /// Most positions a request may use (prompt plus generation).
    pub fn context(&self) -> usize {
        self.context
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Why the engine takes no more requests, once a step has failed.
    pub fn unavailable(&self) -> Option<String> {
        self.counters
            .unavailable
            .lock()
            .map_or_else(|_| Some("the engine panicked".into()), |s| s.clone())
    }

    /// Queues `request`; its events go to `sink` from the engine's thread.
    pub fn submit(&self, request: Request, sink: Sink) -> Result<(), Rejected> {
        if let Some(reason) = self.unavailable() {
            return Err(Rejected::Unavailable(reason));
        }
        if request.prompt.is_empty() {
            return Err(Rejected::Invalid("the prompt is empty".into()));
        }
        let n = request.n.max(1);
        if n > self.config.max_batch || n > MAX_CHOICES {
            return Err(Rejected::Invalid(format!(
                "`n` is {n}; this server decodes at most {} choices of one request",
                self.config.max_batch.min(MAX_CHOICES)
            )));
        }
        for (what, k) in [
            ("logprobs", request.logprobs),
            ("prompt_logprobs", request.prompt_logprobs),
        ] {
            if k.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
                return Err(Rejected::Invalid(format!(
                    "`{what}` asks for more than {MAX_TOP_LOGPROBS} alternatives"
                )));
            }
        }
        if request.prompt.len() >= self.context {
            return Err(Rejected::Invalid(format!(
                "the prompt has {} tokens; the model's context is {}",
                request.prompt.len(),
                self.context
            )));
        }
        // Never a silent cap: more than the context is refused, naming it.
        if request.max_tokens > self.context {
            return Err(Rejected::Invalid(format!(
                "`max_tokens` {} is more than the model's context ({} tokens)",
                request.max_tokens, self.context
            )));
        }
        let need = n * budget(&request, self.context);
        if need > self.config.max_tokens_in_flight {
            return Err(Rejected::Invalid(format!(
                "the prompt ({} tokens) plus max_tokens ({}), times {n} choice(s), is {need} \
                 tokens; the server holds at most {} tokens in flight",
                request.prompt.len(),
                limit(&request, self.context),
                self.config.max_tokens_in_flight
            )));
        }
        let cap = self.config.max_waiting;
        let before = self.counters.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= cap {
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejected::Busy {
                waiting: before,
                limit: cap,
            });
        }
        // The mailbox holds at most `max_waiting` submissions (counted
        // above), so `do_send`'s unbounded mailbox stays bounded.
        if !self.addr.connected() {
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejected::Stopped);
        }
        self.addr.do_send(Submit(Job {
            request,
            sink,
            submitted: std::time::Instant::now(),
        }));
        Ok(())
    }
}

impl Engine {
    /// Finishes the queued and running requests, tells ranks in other
    /// processes to stop, and waits for the engine to end; later requests
    /// are refused. Dropping the handle does the same.
    pub fn shutdown(&self) {
        if self.addr.connected() {
            self.addr.do_send(Shutdown);
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_round_trip_and_bad_bytes_are_named() {
        let s = Schedule {
            free: vec![3, u64::MAX],
            evict: vec![1],
            admit: vec![
                Admit {
                    id: 7,
                    prompt: vec![2, 818, 262_143],
                    siblings: vec![9, 10],
                    prompt_logprobs: Some(5),
                    reuse: Some((3, 2)),
                    save: Some(4),
                },
                Admit {
                    id: 8,
                    ..Admit::default()
                },
            ],
            decode: vec![(1, 5), (2, 106)],
            stop: false,
        };
        let bytes = s.encode();
        assert_eq!(Schedule::decode(&bytes).unwrap(), s);
        let empty = Schedule::default();
        assert!(empty.is_empty());
        assert_eq!(Schedule::decode(&empty.encode()).unwrap(), empty);
        let e = Schedule::decode(&bytes[..bytes.len() - 2]).unwrap_err();
        assert!(
            matches!(
                e,
                EngineError::ScheduleCount {
                    at: 123,
                    count: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("decode count at byte 123 says 2"),
            "{e}"
        );
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(
            Schedule::decode(&extra)
                .unwrap_err()
                .to_string()
                .contains("1 bytes left over")
        );
        let mut huge = empty.encode();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = Schedule::decode(&huge).unwrap_err();
        assert!(e.to_string().contains("free count at byte 1"), "{e}");
        assert!(matches!(
            Schedule::decode(&[2]).unwrap_err(),
            EngineError::ScheduleStopFlag { value: 2 }
        ));
    }
}
