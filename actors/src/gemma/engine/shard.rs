//! The shards of the engine: one [`Shard`] per rank, the same for every
//! backend (a rank's model and its requests' caches, each in a slot), run
//! by a [`ShardActor`] on its own arbiter; and [`follow`], a rank in
//! another process that runs rank 0's schedules.

use super::*;

/// What a shard reports after a step.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Rank 0: one row of logits per admitted request, then one per decoded
    /// request, in schedule order. Other ranks: empty.
    pub logits: Vec<f32>,
    /// Bytes of KV cache this rank holds after the step.
    pub kv_bytes: usize,
    /// Rank 0: the prompt log-probabilities asked for, by request.
    pub prompt_logprobs: Vec<(u64, Vec<TokenLogprob>)>,
}

/// Most prompt rows whose logits one pass computes when a prompt's
/// log-probabilities are asked for (32 rows of a 262,144-token vocabulary
/// are 32 MiB of logits).
const SCORED_ROWS: usize = 32;

/// Run this step.
#[derive(Debug, Message)]
#[rtype(result = "Result<StepOutput, EngineError>")]
pub struct Step(pub Schedule);

/// Keep receiving schedules from rank 0 (a rank in another process).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Follow;

/// How a follower ended.
type Outcome = Arc<Mutex<Option<Result<(), EngineError>>>>;

/// What a shard actor runs: one rank's model and the caches of the running
/// requests. Every backend's is a [`Shard`] ([`CpuShard`]: a rank of the CPU
/// model; [`DeviceShard`]: the model on a device, e.g. a GPU); the trait
/// lets an engine hold shards of any backend.
pub trait ShardModel: Send + 'static {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// Logits per row.
    fn vocab(&self) -> usize;
    /// Most positions a request may use (prompt plus generation).
    fn context(&self) -> usize;
    /// Bytes of keys and values one position takes on this rank (every
    /// layer, stored linearly): the prefix cache's unit; `None` when the
    /// backend keeps no prefix cache.
    fn kv_bytes_per_token(&self) -> Option<usize>;
    /// Copies rank 0's bytes to every rank (the schedule, for ranks in
    /// other processes).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<(), EngineError>;
    /// Runs one schedule: free, admit (prefill), decode. Rank 0 returns the
    /// logits of the admitted, then the decoded, requests.
    fn step(&mut self, s: &Schedule) -> Result<StepOutput, EngineError>;
}

/// What an engine shard runs: a backend of the forward pass whose
/// sequences' KV caches live in numbered slots. The CPU model keeps one
/// growable [`KvCache`] per slot; the device model one pool of
/// preallocated slots ([`KvPool`]).
pub trait ShardBackend: Backend + Send + 'static {
    /// The KV caches of the shard's sequences.
    type Slots: Send;

    /// Caches for up to `sequences` sequences of up to `context` positions.
    fn slots(&self, sequences: usize, context: usize) -> Result<Self::Slots, EngineError>;
    /// How many slots there are (`None`: as many as needed).
    fn capacity(&self, slots: &Self::Slots) -> Option<usize>;
    /// Most positions a sequence holds.
    fn context(&self, slots: &Self::Slots) -> usize;
    /// Forgets slot `slot`'s sequence.
    fn clear(&self, slots: &mut Self::Slots, slot: usize);
    /// Positions filled in slot `slot`.
    fn filled(&self, slots: &Self::Slots, slot: usize) -> usize;
    /// Bytes the caches hold.
    fn bytes(&self, slots: &Self::Slots) -> usize;
    /// Most new tokens of one sequence in one pass.
    fn chunk(&self, slots: &Self::Slots) -> usize;
    /// Most rows in one pass.
    fn max_rows(&self) -> usize;
    /// Makes slot `to` a copy of slot `from` (a request's other choices
    /// share its prefill); `false` when this backend cannot, and the
    /// prompt is run again for `to`.
    fn fork(&self, _slots: &mut Self::Slots, _from: usize, _to: usize) -> bool {
        false
    }
    /// Bytes of keys and values one position takes (the prefix cache's
    /// unit); `None` when this backend keeps no prefix cache.
    fn kv_bytes_per_token(&self) -> Option<usize> {
        None
    }
    /// Appends slot `slot`'s positions `snapshot.len()..to` to `snapshot`;
    /// `false` when this backend cannot.
    fn copy_out(
        &self,
        _slots: &Self::Slots,
        _slot: usize,
        _to: usize,
        _snapshot: &mut KvSnapshot,
    ) -> bool {
        false
    }
    /// Makes slot `slot` hold `snapshot`'s first `len` positions; `false`
    /// when this backend cannot.
    fn restore(
        &self,
        _slots: &mut Self::Slots,
        _slot: usize,
        _snapshot: &KvSnapshot,
        _len: usize,
    ) -> bool {
        false
    }
    /// One forward pass of `rows` (`Row::seq` is a slot); the logits of the
    /// rows `want`, `vocab` each, into `logits`.
    fn pass(
        &self,
        slots: &mut Self::Slots,
        rows: &[Row],
        want: &[usize],
        logits: &mut [f32],
    ) -> Result<(), EngineError>;
}

impl ShardBackend for Gemma {
    type Slots = Vec<KvCache>;

    fn slots(&self, _sequences: usize, _context: usize) -> Result<Vec<KvCache>, EngineError> {
        Ok(Vec::new())
    }

    fn capacity(&self, _slots: &Vec<KvCache>) -> Option<usize> {
        None
    }

    fn context(&self, _slots: &Vec<KvCache>) -> usize {
        self.config().context
    }

    fn clear(&self, slots: &mut Vec<KvCache>, slot: usize) {
        if let Some(cache) = slots.get_mut(slot) {
            *cache = self.new_cache();
        }
    }

    fn filled(&self, slots: &Vec<KvCache>, slot: usize) -> usize {
        slots.get(slot).map_or(0, KvCache::len)
    }

    fn bytes(&self, slots: &Vec<KvCache>) -> usize {
        slots.iter().map(KvCache::bytes).sum()
    }

    fn chunk(&self, _slots: &Vec<KvCache>) -> usize {
        crate::gemma::PREFILL_CHUNK
    }

    fn max_rows(&self) -> usize {
        usize::MAX
    }

    fn kv_bytes_per_token(&self) -> Option<usize> {
        let c = self.config();
        Some(c.layers * 2 * self.shard().kv_heads.len() * c.head_dim * 4)
    }

    fn copy_out(
        &self,
        slots: &Vec<KvCache>,
        slot: usize,
        to: usize,
        snapshot: &mut KvSnapshot,
    ) -> bool {
        match slots.get(slot) {
            Some(cache) => {
                cache.copy_out(snapshot.len(), to, snapshot);
                true
            }
            None => false,
        }
    }

    fn restore(
        &self,
        slots: &mut Vec<KvCache>,
        slot: usize,
        snapshot: &KvSnapshot,
        len: usize,
    ) -> bool {
        while slots.len() <= slot {
            slots.push(self.new_cache());
        }
        let mut cache = self.new_cache();
        cache.restore(snapshot, len);
        slots[slot] = cache;
        true
    }

    fn fork(&self, slots: &mut Vec<KvCache>, from: usize, to: usize) -> bool {
        let Some(copy) = slots.get(from).cloned() else {
            return false;
        };
        while slots.len() <= to {
            slots.push(self.new_cache());
        }
        slots[to] = copy;
        true
    }

    fn pass(
        &self,
        slots: &mut Vec<KvCache>,
        rows: &[Row],
        want: &[usize],
        logits: &mut [f32],
    ) -> Result<(), EngineError> {
        if let Some(most) = rows.iter().map(|r| r.seq).max() {
            while slots.len() <= most {
                slots.push(self.new_cache());
            }
        }
        let mut caches: Vec<&mut KvCache> = slots.iter_mut().collect();
        let head = if want.is_empty() {
            Head::None
        } else {
            Head::Logits(want, logits)
        };
        forward(self, rows, &mut caches, head)?;
        Ok(())
    }
}

impl<D: Device + Send + 'static> ShardBackend for DeviceGemma<D>
where
    DeviceGemma<D>: Send,
    KvPool<D>: Send,
{
    type Slots = KvPool<D>;

    fn slots(&self, sequences: usize, context: usize) -> Result<KvPool<D>, EngineError> {
        Ok(self.new_pool(sequences, context)?)
    }

    fn capacity(&self, pool: &KvPool<D>) -> Option<usize> {
        Some(pool.sequences())
    }

    fn context(&self, pool: &KvPool<D>) -> usize {
        pool.context()
    }

    fn clear(&self, pool: &mut KvPool<D>, slot: usize) {
        pool.clear(slot);
    }

    fn filled(&self, pool: &KvPool<D>, slot: usize) -> usize {
        pool.len(slot)
    }

    fn bytes(&self, pool: &KvPool<D>) -> usize {
        pool.bytes()
    }

    fn chunk(&self, pool: &KvPool<D>) -> usize {
        pool.chunk()
    }

    fn max_rows(&self) -> usize {
        crate::gemma::device::MAX_ROWS
    }

    fn pass(
        &self,
        pool: &mut KvPool<D>,
        rows: &[Row],
        want: &[usize],
        logits: &mut [f32],
    ) -> Result<(), EngineError> {
        self.run_rows(rows, pool, want, logits)?;
        Ok(())
    }
}

/// One rank's model and the KV caches of its running requests, each
/// request in a slot: what a [`ShardActor`] runs, the same for every
/// backend.
pub struct Shard<M: ShardBackend> {
    model: M,
    slots: M::Slots,
    /// Request id → slot.
    live: HashMap<u64, usize>,
    /// Slots given back.
    free: Vec<usize>,
    /// Slots handed out so far.
    used: usize,
    /// Prefix-cache entries, by id.
    prefixes: HashMap<u64, KvSnapshot>,
}

/// A rank of the CPU model and its requests' caches.
pub type CpuShard = Shard<Gemma>;

/// The model on a device and its pool of sequence caches.
pub type DeviceShard<D> = Shard<DeviceGemma<D>>;

impl<M: ShardBackend> std::fmt::Debug for Shard<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("rank", &self.model.shard().rank)
            .field("requests", &self.live.len())
            .finish()
    }
}

impl<M: ShardBackend> Shard<M> {
    /// `model` with caches for up to `sequences` requests of up to
    /// `context` positions (the CPU model's caches grow as needed).
    pub fn new(model: M, sequences: usize, context: usize) -> Result<Self, EngineError> {
        let slots = model.slots(sequences, context)?;
        Ok(Self {
            model,
            slots,
            live: HashMap::new(),
            free: Vec::new(),
            used: 0,
            prefixes: HashMap::new(),
        })
    }

    /// A slot for request `id`.
    fn take(&mut self, id: u64) -> Result<usize, EngineError> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self
                .model
                .capacity(&self.slots)
                .is_none_or(|n| self.used < n) =>
            {
                self.used += 1;
                self.used - 1
            }
            None => return Err(EngineError::NoFreeSequence { id }),
        };
        self.live.insert(id, slot);
        Ok(slot)
    }

    /// `tokens` of the sequence in `slot`, at its next positions.
    fn rows(&self, slot: usize, tokens: &[u32]) -> impl Iterator<Item = Row> {
        let start = self.model.filled(&self.slots, slot);
        tokens.iter().enumerate().map(move |(t, &token)| Row {
            token,
            seq: slot,
            position: start + t,
        })
    }
}

impl<M: ShardBackend> ShardModel for Shard<M> {
    fn rank(&self) -> usize {
        self.model.shard().rank
    }

    fn world(&self) -> usize {
        self.model.collective().world()
    }

    fn vocab(&self) -> usize {
        self.model.config().vocab
    }

    fn context(&self) -> usize {
        self.model.context(&self.slots)
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<(), EngineError> {
        Ok(self.model.collective().broadcast_bytes(bytes, 0)?)
    }

    fn kv_bytes_per_token(&self) -> Option<usize> {
        self.model.kv_bytes_per_token()
    }

    fn step(&mut self, s: &Schedule) -> Result<StepOutput, EngineError> {
        for id in &s.free {
            if let Some(slot) = self.live.remove(id) {
                self.model.clear(&mut self.slots, slot);
                self.free.push(slot);
            }
        }
        for entry in &s.evict {
            self.prefixes.remove(entry);
        }
        let vocab = self.model.config().vocab;
        let rank = self.model.shard().rank;
        let chunk = self.model.chunk(&self.slots).max(1);
        // Every sequence of the step: its slot and the tokens it runs now.
        let mut work: Vec<(usize, &[u32])> = Vec::with_capacity(s.admit.len() + s.decode.len());
        let mut prompt_logprobs = Vec::new();
        // Prompts saved to the prefix cache: entry, slot, what is copied.
        let mut saving: Vec<(u64, usize, KvSnapshot)> = Vec::new();
        for a in &s.admit {
            let prompt = &a.prompt;
            if prompt.is_empty() {
                return Err(EngineError::EmptyPrompt { id: a.id });
            }
            let slot = self.take(a.id)?;
            // From a prefix-cache entry: its first positions, restored.
            let mut start = 0;
            let mut saved = a.save.map(|_| KvSnapshot::default());
            if let Some((entry, len)) = a.reuse {
                let len = len as usize;
                let snapshot = self
                    .prefixes
                    .get(&entry)
                    .ok_or(EngineError::NoPrefix { rank, entry })?;
                if len >= prompt.len() || !self.model.restore(&mut self.slots, slot, snapshot, len)
                {
                    return Err(EngineError::NoPrefixCache { rank });
                }
                if saved.is_some() {
                    saved = Some(snapshot.prefix(len));
                }
                start = len;
            }
            let keep = match a.prompt_logprobs {
                // Every row but the last is scored, a few rows a pass.
                Some(k) => {
                    let scored = self.score_prompt(slot, prompt, usize::from(k), chunk)?;
                    if rank == 0 {
                        prompt_logprobs.push((a.id, scored));
                    }
                    prompt.len() - 1
                }
                // A prompt longer than a chunk runs its earlier chunks
                // alone first.
                None => {
                    let rest = &prompt[start..];
                    let keep = crate::gemma::forward::leading_chunks(rest.len(), chunk);
                    for part in rest[..keep].chunks(chunk) {
                        self.prefill(slot, part, chunk)?;
                        // Each chunk's positions are copied out while a
                        // local layer's ring still holds them.
                        if let Some(snapshot) = saved.as_mut() {
                            let to = self.model.filled(&self.slots, slot);
                            if !self.model.copy_out(&self.slots, slot, to, snapshot) {
                                return Err(EngineError::NoPrefixCache { rank });
                            }
                        }
                    }
                    start + keep
                }
            };
            if let (Some(entry), Some(snapshot)) = (a.save, saved) {
                saving.push((entry, slot, snapshot));
            }
            // Its last chunk joins the step.
            work.push((slot, &prompt[keep..]));
        }
        for (id, token) in &s.decode {
            let slot = *self
                .live
                .get(id)
                .ok_or(EngineError::NoCache { rank, id: *id })?;
            work.push((slot, std::slice::from_ref(token)));
        }
        // Admitted prompts and running sequences' next tokens go through
        // the weights together, in as few passes as the backend takes.
        // Every rank computes the logits (the LM head is gathered); rank 0
        // keeps them.
        let mut logits = vec![0f32; work.len() * vocab];
        let most = self.model.max_rows().max(chunk);
        let mut done = 0;
        while done < work.len() {
            let (mut rows, mut want) = (Vec::new(), Vec::new());
            let mut end = done;
            while end < work.len() && (end == done || rows.len() + work[end].1.len() <= most) {
                let (slot, tokens) = work[end];
                rows.extend(self.rows(slot, tokens));
                want.push(rows.len() - 1);
                end += 1;
            }
            let out = &mut logits[done * vocab..end * vocab];
            self.model.pass(&mut self.slots, &rows, &want, out)?;
            done = end;
        }
        // The saved prompts' last chunks, then the entries are complete.
        for (entry, slot, mut snapshot) in saving {
            let to = self.model.filled(&self.slots, slot);
            if !self.model.copy_out(&self.slots, slot, to, &mut snapshot) {
                return Err(EngineError::NoPrefixCache { rank });
            }
            self.prefixes.insert(entry, snapshot);
        }
        // The other choices of each admitted request get its cache.
        for a in &s.admit {
            let from = self.live.get(&a.id).copied();
            for &sibling in &a.siblings {
                let to = self.take(sibling)?;
                let copied = from.is_some_and(|from| self.model.fork(&mut self.slots, from, to));
                if !copied {
                    self.prefill(to, &a.prompt, chunk)?;
                }
            }
        }
        if rank != 0 {
            logits = Vec::new();
        }
        Ok(StepOutput {
            logits,
            kv_bytes: self.model.bytes(&self.slots),
            prompt_logprobs,
        })
    }
}

impl<M: ShardBackend> Shard<M> {
    /// Runs `tokens` into `slot`'s cache, `chunk` at a time, without logits.
    fn prefill(&mut self, slot: usize, tokens: &[u32], chunk: usize) -> Result<(), EngineError> {
        for part in tokens.chunks(chunk) {
            let rows: Vec<Row> = self.rows(slot, part).collect();
            self.model.pass(&mut self.slots, &rows, &[], &mut [])?;
        }
        Ok(())
    }

    /// Runs every token of `prompt` but the last into `slot`'s cache, a few
    /// rows a pass with their logits, and scores each next prompt token
    /// (rank 0; every rank runs the same passes, the LM head gathers).
    fn score_prompt(
        &mut self,
        slot: usize,
        prompt: &[u32],
        k: usize,
        chunk: usize,
    ) -> Result<Vec<TokenLogprob>, EngineError> {
        let vocab = self.model.config().vocab;
        let rank = self.model.shard().rank;
        let body = &prompt[..prompt.len() - 1];
        let mut scored = Vec::with_capacity(body.len());
        let piece = SCORED_ROWS.min(chunk).max(1);
        let mut logits = vec![0f32; piece * vocab];
        for (p, part) in body.chunks(piece).enumerate() {
            let rows: Vec<Row> = self.rows(slot, part).collect();
            let want: Vec<usize> = (0..rows.len()).collect();
            let out = &mut logits[..rows.len() * vocab];
            self.model.pass(&mut self.slots, &rows, &want, out)?;
            if rank == 0 {
                for (r, row) in out.chunks_exact(vocab).enumerate() {
                    let next = prompt[p * piece + r + 1];
                    scored.push(token_logprob(row, next, k));
                }
            }
        }
        Ok(scored)
    }
}

/// One tensor-parallel rank (a [`ShardModel`]). Runs on its own arbiter
/// (thread): a step blocks it.
pub struct ShardActor {
    model: Box<dyn ShardModel>,
    /// Rank 0 of a group spread over processes: send every schedule on.
    relay: bool,
    /// A rank in another process: where its end is reported.
    outcome: Option<Outcome>,
}

impl std::fmt::Debug for ShardActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardActor")
            .field("rank", &self.model.rank())
            .field("relay", &self.relay)
            .finish()
    }
}

impl Actor for ShardActor {
    type Context = Context<Self>;
}

impl ShardActor {
    pub(super) fn new(model: Box<dyn ShardModel>, relay: bool) -> Self {
        Self {
            model,
            relay,
            outcome: None,
        }
    }

    /// Runs `s` on this rank (sending it on first, as rank 0 of a group
    /// spread over processes).
    fn run(&mut self, s: &Schedule) -> Result<StepOutput, EngineError> {
        if self.relay {
            let mut bytes = s.encode();
            self.model.broadcast_bytes(&mut bytes)?;
        }
        self.model.step(s)
    }

    fn end(&mut self, result: Result<(), EngineError>) {
        if let Some(outcome) = &self.outcome
            && let Ok(mut slot) = outcome.lock()
        {
            *slot = Some(result);
        }
        System::current().stop();
    }
}

impl Handler<Step> for ShardActor {
    type Result = Result<StepOutput, EngineError>;

    fn handle(&mut self, msg: Step, _ctx: &mut Self::Context) -> Self::Result {
        self.run(&msg.0)
    }
}

impl Handler<Follow> for ShardActor {
    type Result = ();

    fn handle(&mut self, _msg: Follow, ctx: &mut Self::Context) {
        let mut bytes = Vec::new();
        let schedule = self
            .model
            .broadcast_bytes(&mut bytes)
            .and_then(|()| Schedule::decode(&bytes));
        match schedule {
            Ok(s) if s.stop => self.end(Ok(())),
            Ok(s) => match self.run(&s) {
                Ok(_) => ctx.notify(Follow),
                Err(e) => self.end(Err(e)),
            },
            Err(e) => self.end(Err(e)),
        }
    }
}

/// Runs `gemma`, a rank other than 0 of a group spread over processes:
/// every schedule comes from rank 0's engine. Returns when rank 0 stops
/// (`Ok`) or when a collective fails, e.g. rank 0 went away (`Err`, the
/// reason).
pub fn follow(gemma: Gemma) -> Result<(), EngineError> {
    if gemma.shard().rank == 0 {
        return Err(EngineError::RankZeroFollows);
    }
    let outcome: Outcome = Arc::new(Mutex::new(None));
    let model = CpuShard::new(gemma, 0, 0)?;
    let system = System::new();
    let slot = Arc::clone(&outcome);
    system.block_on(async move {
        let mut shard = ShardActor::new(Box::new(model), false);
        shard.outcome = Some(slot);
        let addr = shard.start();
        addr.do_send(Follow);
    });
    system.run().map_err(|source| EngineError::ActorSystem {
        which: "shard",
        source,
    })?;
    let result = outcome
        .lock()
        .map_err(|_| EngineError::ShardPanicked)?
        .take();
    result.unwrap_or(Err(EngineError::NoReason))
}
