//! Gemma 3 on a device (one rank): a backend of the one forward pass
//! ([`super::forward`]) over the operations of [`kernels::device::Device`].
//! On a GPU (`GpuGemma`, feature `cuda`) they are our CUDA kernels and cuBLAS; on
//! [`kernels::device::Host`] they are plain Rust, which is how CI checks
//! this code (cache slots, rings, chunking, batching) against the CPU model
//! without a GPU.
//!
//! Weights go up as bf16: GGUF blocks are dequantised row by row on upload,
//! bf16 weights (checkpoints, random weights) go up as they are; norm
//! multipliers stay f32. Projections are cuBLAS bf16 GEMMs with f32
//! accumulation over activations rounded to bf16; everything else (norms,
//! RoPE, attention, the residual stream) is f32, as on the CPU.
//!
//! The KV cache is one pool per layer shared by up to `sequences`
//! sequences, in the slots of [`super::kv`]: a global layer gives each
//! sequence `context` slots, a local layer a ring of `window + CHUNK` slots (a prompt goes through in chunks
//! of at most [`CHUNK`] tokens, and a chunk's later tokens then never
//! overwrite a slot an earlier token of the chunk still attends to).

use kernels::collective::{Collective, SingleRank};
use kernels::device::{Device, DeviceError};

use super::config::{GemmaConfig, LayerKind};
use super::forward::{Backend, Greedy, Head, Projection, Residual, Row, forward};
use super::generate::END_OF_GENERATION;
use super::kv::{LayerSlots, layout};
use super::model::{Gemma, LayerWeight, Weight};
use super::sampling::Sampler;
use super::shard::RankShard;
use crate::tokenizer::Tokenizer;

/// Most prompt tokens of one sequence run through the layers at once.
pub const CHUNK: usize = 512;

/// Most rows of one forward pass.
pub const MAX_ROWS: usize = CHUNK * 4;

/// Why the device model failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceModelError {
    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The ranks could not exchange data.
    #[error(transparent)]
    Collective(#[from] kernels::collective::CollectiveError),
    /// Something the device model does not do.
    #[error("{0}")]
    Unsupported(String),
}

/// The model on one GPU.
#[cfg(feature = "cuda")]
pub type GpuGemma = DeviceGemma<kernels::cuda::Gpu>;

struct DeviceLayer<D: Device> {
    kind: LayerKind,
    /// q|k|v (the three stacked), o, gate|up (stacked), down: bf16,
    /// rows × cols as in the files.
    matrices: Vec<(D::Buf<u16>, usize, usize)>,
    /// attn, q, k, post-attention, ffn, post-ffw.
    norms: Vec<D::Buf<f32>>,
}

/// A Gemma 3 model on a device.
pub struct DeviceGemma<D: Device> {
    gpu: D,
    config: GemmaConfig,
    tokenizer: Tokenizer,
    embd: D::Buf<u16>,
    embed_scale: f32,
    output_norm: D::Buf<f32>,
    layers: Vec<DeviceLayer<D>>,
    weight_bytes: usize,
    /// This rank's slices.
    shard: RankShard,
    /// Rows of every rank's vocabulary slice but the last (the gather's unit).
    vocab_chunk: usize,
    /// How this rank combines partial results with its peers (after the
    /// output and down projections, the embedding, around the LM head).
    collective: Box<dyn Collective>,
}

impl<D: Device> std::fmt::Debug for DeviceGemma<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGemma")
            .field("layers", &self.layers.len())
            .field("weight_bytes", &self.weight_bytes)
            .finish()
    }
}

/// The KV caches of up to `sequences` sequences.
pub struct KvPool<D: Device> {
    keys: Vec<D::Buf<f32>>,
    values: Vec<D::Buf<f32>>,
    /// Each layer's slots (`gemma::kv`).
    layout: Vec<LayerSlots>,
    /// Positions filled, per sequence.
    lengths: Vec<usize>,
    context: usize,
    /// Most new tokens of one sequence per forward pass.
    chunk: usize,
}

impl<D: Device> std::fmt::Debug for KvPool<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("sequences", &self.lengths.len())
            .field("lengths", &self.lengths)
            .finish()
    }
}

impl<D: Device> KvPool<D> {
    /// Positions filled in sequence `s`.
    pub fn len(&self, s: usize) -> usize {
        self.lengths.get(s).copied().unwrap_or(0)
    }

    /// Forgets sequence `s` (its slots are reused).
    pub fn clear(&mut self, s: usize) {
        if let Some(l) = self.lengths.get_mut(s) {
            *l = 0;
        }
    }

    /// Most positions a sequence holds.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Layer `li`'s slots per sequence, and whether they are a ring.
    fn slots(&self, li: usize) -> (usize, bool) {
        let layer = self.layout[li];
        (layer.per_sequence(self.context), layer.is_ring())
    }

    /// Sequences the pool holds.
    pub fn sequences(&self) -> usize {
        self.lengths.len()
    }

    /// Most new tokens of one sequence per forward pass.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Device bytes the pool holds.
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|b| D::len(b) * 4)
            .sum()
    }
}

type Matrix<D> = (<D as Device>::Buf<u16>, usize, usize);

/// What a forward pass returns: logits, or each row's greedy token.
enum Scored {
    Logits(Vec<f32>),
    Ids(Vec<u32>),
}

/// A weight matrix as bf16 bits: rows, cols, values.
fn bf16_matrix(gemma: &Gemma, which: Weight) -> (usize, usize, Vec<u16>) {
    match gemma.bf16_bits(which) {
        Some(raw) => raw,
        None => {
            use rayon::prelude::*;
            let (rows, cols, values) = gemma.dequantized(which);
            let bits = values
                .par_iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect();
            (rows, cols, bits)
        }
    }
}

fn upload_matrix<D: Device>(
    gpu: &D,
    gemma: &Gemma,
    which: Weight,
) -> Result<Matrix<D>, DeviceError> {
    let (rows, cols, bits) = bf16_matrix(gemma, which);
    Ok((gpu.upload(&bits)?, rows, cols))
}

/// Several weight matrices of the same width stacked row-wise into one
/// (so one matrix product computes all their outputs, side by side in each
/// output row).
fn upload_stacked<D: Device>(
    gpu: &D,
    gemma: &Gemma,
    which: &[Weight],
) -> Result<Matrix<D>, DeviceError> {
    let (mut rows, mut width, mut parts) = (0, None, Vec::new());
    for w in which {
        let (r, c, bits) = bf16_matrix(gemma, *w);
        if *width.get_or_insert(c) != c {
            return Err(DeviceError::Stacking {
                cols: c,
                width: width.unwrap_or(0),
            });
        }
        rows += r;
        parts.push(bits);
    }
    let parts: Vec<&[u16]> = parts.iter().map(Vec::as_slice).collect();
    Ok((gpu.upload_parts(&parts)?, rows, width.unwrap_or(0)))
}

impl<D: Device> DeviceGemma<D> {
    /// Uploads `gemma` (one rank: tp 1) to `gpu`. `progress(done, total)`
    /// is called per layer.
    pub fn upload(
        gemma: &Gemma,
        gpu: D,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, DeviceModelError> {
        Self::upload_rank(gemma, gpu, Box::new(SingleRank), progress)
    }

    /// Uploads rank `r` of a tensor-parallel group (`gemma` loaded with
    /// [`Gemma::load_rank`], so it holds only its slices) to `gpu`; the
    /// device ranks combine their partial results through `collective`
    /// (NCCL between GPUs), whose rank and size must be the model's.
    pub fn upload_rank(
        gemma: &Gemma,
        gpu: D,
        collective: Box<dyn Collective>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, DeviceModelError> {
        let (rank, world) = (gemma.shard().rank, gemma.collective().world());
        if (collective.rank(), collective.world()) != (rank, world) {
            return Err(DeviceModelError::Unsupported(format!(
                "the model is rank {rank} of {world}, the collective rank {} of {}",
                collective.rank(),
                collective.world()
            )));
        }
        let c = gemma.config().clone();
        let layout = super::shard::plan(&c, world)
            .map_err(|e| DeviceModelError::Unsupported(e.to_string()))?;
        let shard = gemma.shard().clone();
        // The attention kernel maps a local query head h to local KV head
        // h / group; that must be the global mapping shifted to this rank.
        let group = c.heads / c.kv_heads.max(1);
        for h in 0..shard.q_heads.len() {
            let global = (shard.q_heads.start + h) / group;
            if global < shard.kv_heads.start || global - shard.kv_heads.start != h / group {
                return Err(DeviceModelError::Unsupported(format!(
                    "rank {rank}: query head {} reads KV head {global}, which this rank's \
                     attention kernel cannot reach",
                    shard.q_heads.start + h
                )));
            }
        }
        if c.head_dim > 256 {
            return Err(DeviceModelError::Unsupported(format!(
                "head_dim {} is above the attention kernel's 256",
                c.head_dim
            )));
        }
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(c.layers);
        for (i, kind) in c.layer_kinds.iter().enumerate() {
            progress(i, c.layers + 1);
            let at = |w| Weight::Layer(i, w);
            let matrices = vec![
                upload_stacked(
                    &gpu,
                    gemma,
                    &[at(LayerWeight::Q), at(LayerWeight::K), at(LayerWeight::V)],
                )?,
                upload_matrix(&gpu, gemma, at(LayerWeight::O))?,
                upload_stacked(&gpu, gemma, &[at(LayerWeight::Gate), at(LayerWeight::Up)])?,
                upload_matrix(&gpu, gemma, at(LayerWeight::Down))?,
            ];
            weight_bytes += matrices.iter().map(|m| m.1 * m.2 * 2).sum::<usize>();
            let norms = gemma
                .layer_norms(i)
                .iter()
                .map(|n| {
                    weight_bytes += n.len() * 4;
                    gpu.upload(n)
                })
                .collect::<Result<Vec<_>, _>>()?;
            layers.push(DeviceLayer {
                kind: *kind,
                matrices,
                norms,
            });
        }
        let (embd, rows, cols) = upload_matrix(&gpu, gemma, Weight::TokenEmbd)?;
        weight_bytes += rows * cols * 2 + c.hidden * 4;
        let output_norm = gpu.upload(gemma.output_norm())?;
        progress(c.layers + 1, c.layers + 1);
        gpu.synchronize()?;
        Ok(Self {
            gpu,
            tokenizer: gemma.tokenizer().clone(),
            embed_scale: gemma.embed_scale(),
            config: c,
            embd,
            output_norm,
            layers,
            weight_bytes,
            shard,
            vocab_chunk: layout.vocab_chunk,
            collective,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &GemmaConfig {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The device.
    pub fn gpu(&self) -> &D {
        &self.gpu
    }

    /// Bytes of weights on the device (every decode step reads them all).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// KV caches for `sequences` sequences of up to `context` positions,
    /// prompts in chunks of [`CHUNK`].
    pub fn new_pool(
        &self,
        sequences: usize,
        context: usize,
    ) -> Result<KvPool<D>, DeviceModelError> {
        self.new_pool_chunked(sequences, context, CHUNK)
    }

    /// [`new_pool`](Self::new_pool) with prompts in chunks of `chunk`
    /// tokens (a local layer's ring then holds `window + chunk` slots).
    pub fn new_pool_chunked(
        &self,
        sequences: usize,
        context: usize,
        chunk: usize,
    ) -> Result<KvPool<D>, DeviceModelError> {
        let c = &self.config;
        let chunk = chunk.clamp(1, CHUNK);
        // This rank's KV heads only.
        let kv_dim = self.shard.kv_heads.len() * c.head_dim;
        let mut pool = KvPool {
            keys: Vec::new(),
            values: Vec::new(),
            layout: Vec::new(),
            lengths: vec![0; sequences],
            context: context.min(c.context),
            chunk,
        };
        // A chunk's keys are stored before it attends: rings of
        // `window + chunk` on local layers (`gemma::kv`).
        pool.layout = layout(c, chunk, pool.context);
        for li in 0..pool.layout.len() {
            let (slots, _) = pool.slots(li);
            pool.keys.push(self.gpu.zeros(sequences * slots * kv_dim)?);
            pool.values
                .push(self.gpu.zeros(sequences * slots * kv_dim)?);
        }
        Ok(pool)
    }

    /// Runs `tokens[i]` of sequence `seqs[i]` at each sequence's next
    /// position (a sequence may appear several times, in order: a prompt
    /// chunk), and returns the logits of the rows in `want` (indices into
    /// `tokens`), `want.len() × vocab`.
    pub fn forward(
        &self,
        tokens: &[u32],
        seqs: &[usize],
        pool: &mut KvPool<D>,
        want: &[usize],
    ) -> Result<Vec<f32>, DeviceModelError> {
        match self.run(tokens, seqs, pool, want, false)? {
            Scored::Logits(l) => Ok(l),
            Scored::Ids(_) => Err(DeviceModelError::Unsupported(
                "forward: ids instead of logits".into(),
            )),
        }
    }

    /// A decode step (as [`decode`](Self::decode)) that returns each row's
    /// greedy token, chosen on the device where it can be (one rank): only
    /// the ids come back, not the logits.
    pub fn decode_greedy(
        &self,
        tokens: &[u32],
        seqs: &[usize],
        pool: &mut KvPool<D>,
    ) -> Result<Vec<u32>, DeviceModelError> {
        let want: Vec<usize> = (0..tokens.len()).collect();
        match self.run(tokens, seqs, pool, &want, true)? {
            Scored::Ids(ids) => Ok(ids),
            Scored::Logits(l) => Ok(l
                .chunks(self.config.vocab.max(1))
                .map(super::argmax)
                .collect()),
        }
    }

    fn run(
        &self,
        tokens: &[u32],
        seqs: &[usize],
        pool: &mut KvPool<D>,
        want: &[usize],
        greedy: bool,
    ) -> Result<Scored, DeviceModelError> {
        let n = tokens.len();
        if n != seqs.len() {
            return Err(DeviceModelError::Unsupported(format!(
                "forward: {n} tokens for {} sequence entries",
                seqs.len()
            )));
        }
        // Each row at its sequence's next position.
        let mut next = pool.lengths.clone();
        let mut rows = Vec::with_capacity(n);
        for (&token, &seq) in tokens.iter().zip(seqs) {
            let position = next.get(seq).copied().unwrap_or(0);
            if let Some(l) = next.get_mut(seq) {
                *l += 1;
            }
            rows.push(Row {
                token,
                seq,
                position,
            });
        }
        if greedy && !want.is_empty() {
            self.check_rows(&rows, pool, want)?;
            return Ok(match forward(self, &rows, pool, Head::Greedy(want))? {
                Some(Greedy::Ids(ids)) => Scored::Ids(ids),
                Some(Greedy::Logits(l)) => Scored::Logits(l),
                None => Scored::Logits(Vec::new()),
            });
        }
        let mut logits = vec![0f32; want.len() * self.config.vocab];
        self.run_rows(&rows, pool, want, &mut logits)?;
        Ok(Scored::Logits(logits))
    }

    /// Refuses rows the pool cannot take: more than [`MAX_ROWS`], an
    /// unknown sequence or token, a position that is not its sequence's
    /// next, a full sequence, or more than the pool's chunk of one
    /// sequence (a local layer's ring holds `window + chunk` slots: more
    /// would overwrite slots still read).
    fn check_rows(
        &self,
        rows: &[Row],
        pool: &KvPool<D>,
        want: &[usize],
    ) -> Result<(), DeviceModelError> {
        let n = rows.len();
        if n == 0 || n > MAX_ROWS {
            return Err(DeviceModelError::Unsupported(format!(
                "forward: {n} tokens (1 to {MAX_ROWS} at once)"
            )));
        }
        let mut next = pool.lengths.clone();
        for r in rows {
            let (t, s) = (r.token, r.seq);
            if s >= next.len() || t as usize >= self.config.vocab {
                return Err(DeviceModelError::Unsupported(format!(
                    "token {t} of sequence {s}: no such sequence or token"
                )));
            }
            if next[s] >= pool.context {
                return Err(DeviceModelError::Unsupported(format!(
                    "sequence {s} is full ({} positions)",
                    pool.context
                )));
            }
            if r.position != next[s] {
                return Err(DeviceModelError::Unsupported(format!(
                    "sequence {s}: position {} is not its next ({})",
                    r.position, next[s]
                )));
            }
            if next[s] - pool.lengths[s] == pool.chunk {
                return Err(DeviceModelError::Unsupported(format!(
                    "forward: more than {} tokens of sequence {s} at once",
                    pool.chunk
                )));
            }
            next[s] += 1;
        }
        if let Some(&w) = want.iter().find(|&&w| w >= n) {
            return Err(DeviceModelError::Unsupported(format!(
                "row {w} of {n} does not exist"
            )));
        }
        Ok(())
    }

    /// Runs `rows` (each at its sequence's next position) through the
    /// model; the logits of the rows `want`, `vocab` each, into `logits`.
    pub fn run_rows(
        &self,
        rows: &[Row],
        pool: &mut KvPool<D>,
        want: &[usize],
        logits: &mut [f32],
    ) -> Result<(), DeviceModelError> {
        self.check_rows(rows, pool, want)?;
        let head = if want.is_empty() {
            Head::None
        } else {
            Head::Logits(want, logits)
        };
        forward(self, rows, pool, head)?;
        Ok(())
    }

    /// Sums `x` over the ranks (through the host: the collective's
    /// operations take host buffers).
    fn all_reduce_buf(&self, x: &mut D::Buf<f32>) -> Result<(), DeviceModelError> {
        let mut host = self.gpu.download(x)?;
        self.collective.all_reduce_sum(&mut host)?;
        *x = self.gpu.upload(&host)?;
        Ok(())
    }

    /// This rank's slices.
    pub fn shard(&self) -> &RankShard {
        &self.shard
    }

    /// How this rank reaches its peers.
    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    /// Runs a prompt for sequence `s` (in the pool's chunks) and returns its
    /// last position's logits.
    pub fn prefill(
        &self,
        prompt: &[u32],
        s: usize,
        pool: &mut KvPool<D>,
    ) -> Result<Vec<f32>, DeviceModelError> {
        let mut logits = Vec::new();
        let chunks = prompt.chunks(pool.chunk);
        let count = chunks.len();
        for (i, chunk) in chunks.enumerate() {
            let seqs = vec![s; chunk.len()];
            let want = if i + 1 == count {
                vec![chunk.len() - 1]
            } else {
                Vec::new()
            };
            logits = self.forward(chunk, &seqs, pool, &want)?;
        }
        Ok(logits)
    }

    /// One decode step: `tokens[i]` for sequence `seqs[i]`; their logits.
    pub fn decode(
        &self,
        tokens: &[u32],
        seqs: &[usize],
        pool: &mut KvPool<D>,
    ) -> Result<Vec<f32>, DeviceModelError> {
        let want: Vec<usize> = (0..tokens.len()).collect();
        self.forward(tokens, seqs, pool, &want)
    }
}

/// A kind of layer's (kind, slots per sequence, ring) RoPE positions,
/// destination slots and sequence bases for the rows of a pass.
type KindSlots<D> = (
    (LayerKind, usize, bool),
    <D as Device>::Buf<f32>,
    <D as Device>::Buf<i32>,
    <D as Device>::Buf<i32>,
);

/// What a device pass prepares once: the rows' positions and, per kind
/// of layer, their RoPE positions and cache slots; and scratch.
pub struct DevicePass<D: Device> {
    n: usize,
    positions: D::Buf<i32>,
    /// Per (layer kind, slots per sequence, ring): RoPE positions, the
    /// rows' destination slots, each row's sequence's first slot.
    kinds: Vec<KindSlots<D>>,
    qkv: D::Buf<f32>,
    qn: D::Buf<f32>,
    gu: D::Buf<f32>,
}

impl<D: Device> std::fmt::Debug for DevicePass<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePass").field("rows", &self.n).finish()
    }
}

impl<D: Device> Backend for DeviceGemma<D> {
    type Error = DeviceModelError;
    type Act = D::Buf<f32>;
    type Input = D::Buf<u16>;
    type Kv<'k>
        = KvPool<D>
    where
        D: 'k;
    type Pass = DevicePass<D>;

    fn config(&self) -> &GemmaConfig {
        &self.config
    }

    fn shard(&self) -> &RankShard {
        &self.shard
    }

    fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    fn vocab_per_rank(&self) -> usize {
        self.vocab_chunk
    }

    fn prepare(
        &self,
        rows: &[Row],
        pool: &mut KvPool<D>,
    ) -> Result<DevicePass<D>, DeviceModelError> {
        let c = &self.config;
        let gpu = &self.gpu;
        let n = rows.len();
        let me = &self.shard;
        let (q_dim, kv_dim) = (
            me.q_heads.len() * c.head_dim,
            me.kv_heads.len() * c.head_dim,
        );
        let pos_i: Vec<i32> = rows.iter().map(|r| r.position as i32).collect();
        let mut kinds: Vec<KindSlots<D>> = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            let (per, ring) = pool.slots(li);
            let key = (layer.kind, per, ring);
            if kinds.iter().any(|(k, ..)| *k == key) {
                continue;
            }
            let rope: Vec<f32> = rows
                .iter()
                .map(|r| match layer.kind {
                    LayerKind::Local => r.position as f32,
                    LayerKind::Global => r.position as f32 / c.rope_global_scale,
                })
                .collect();
            let dest: Vec<i32> = rows
                .iter()
                .map(|r| (r.seq * per + if ring { r.position % per } else { r.position }) as i32)
                .collect();
            let bases: Vec<i32> = rows.iter().map(|r| (r.seq * per) as i32).collect();
            kinds.push((
                key,
                gpu.upload(&rope)?,
                gpu.upload(&dest)?,
                gpu.upload(&bases)?,
            ));
        }
        Ok(DevicePass {
            n,
            positions: gpu.upload(&pos_i)?,
            kinds,
            qkv: gpu.zeros(n * (q_dim + 2 * kv_dim))?,
            qn: gpu.zeros(n * q_dim)?,
            gu: gpu.zeros(n * 2 * me.ffn.len())?,
        })
    }

    fn act(&self, len: usize) -> Result<D::Buf<f32>, DeviceModelError> {
        Ok(self.gpu.zeros(len)?)
    }

    fn input(&self, len: usize) -> Result<D::Buf<u16>, DeviceModelError> {
        Ok(self.gpu.zeros(len)?)
    }

    fn embed(&self, rows: &[Row], x: &mut D::Buf<f32>) -> Result<(), DeviceModelError> {
        // Vocabulary-parallel lookup: the rank holding a token's row fills
        // it (-1: a row of zeros elsewhere), the sum gives every rank the row.
        let me = &self.shard;
        let ids: Vec<i32> = rows
            .iter()
            .map(|r| {
                let t = r.token as usize;
                if me.vocab.contains(&t) {
                    (t - me.vocab.start) as i32
                } else {
                    -1
                }
            })
            .collect();
        let d_ids = self.gpu.upload(&ids)?;
        self.gpu.embed_bf16(
            &self.embd,
            &d_ids,
            x,
            (rows.len(), self.config.hidden),
            self.embed_scale,
        )?;
        Ok(())
    }

    fn all_reduce(&self, x: &mut D::Buf<f32>) -> Result<(), DeviceModelError> {
        self.all_reduce_buf(x)
    }

    fn first_norm(&self, x: &D::Buf<f32>, h: &mut D::Buf<u16>) -> Result<(), DeviceModelError> {
        let c = &self.config;
        if let Some(first) = self.layers.first() {
            let n = D::len(x) / c.hidden;
            self.gpu
                .rms_norm_bf16(x, &first.norms[0], h, (n, c.hidden), c.rms_eps)?;
        }
        Ok(())
    }

    fn attention(
        &self,
        li: usize,
        h: &D::Buf<u16>,
        out: &mut D::Buf<u16>,
        pass: &mut DevicePass<D>,
        pool: &mut KvPool<D>,
    ) -> Result<(), DeviceModelError> {
        let c = &self.config;
        let gpu = &self.gpu;
        let layer = &self.layers[li];
        let me = &self.shard;
        let hd = c.head_dim;
        let (heads, kv_heads) = (me.q_heads.len(), me.kv_heads.len());
        let kv_dim = kv_heads * hd;
        let group = c.heads / c.kv_heads.max(1);
        let n = pass.n;
        let (per, ring) = pool.slots(li);
        let key = (layer.kind, per, ring);
        let Some((_, rope, dest, bases)) = pass.kinds.iter().find(|(k, ..)| *k == key) else {
            return Err(DeviceModelError::Unsupported(format!(
                "layer {li}: no cache slots prepared"
            )));
        };
        let (base, window) = match layer.kind {
            LayerKind::Local => (c.rope_local_base, c.window),
            LayerKind::Global => (c.rope_global_base, 0),
        };
        let m = &layer.matrices;
        let nm = &layer.norms;
        let score_scale = 1.0 / c.query_pre_attn_scalar.sqrt();
        gpu.gemm_bf16(&m[0].0, (m[0].1, m[0].2), h, n, &mut pass.qkv)?;
        let slots = per * pool.lengths.len();
        gpu.qkv_prep(
            &pass.qkv,
            (&nm[1], &nm[2]),
            &mut pass.qn,
            (&mut pool.keys[li], &mut pool.values[li]),
            (rope, dest),
            (n, heads, kv_heads, hd),
            (base, score_scale, c.rms_eps),
            slots,
        )?;
        gpu.attention_bf16(
            &pass.qn,
            (&pool.keys[li], &pool.values[li]),
            out,
            (&pass.positions, bases),
            (n, heads, hd, kv_dim),
            group,
            (window, if ring { per } else { 0 }),
        )?;
        Ok(())
    }

    fn project(
        &self,
        li: usize,
        which: Projection,
        input: &D::Buf<u16>,
        out: &mut D::Buf<f32>,
    ) -> Result<(), DeviceModelError> {
        let m = &self.layers[li].matrices[match which {
            Projection::Output => 1,
            Projection::Down => 3,
        }];
        let n = D::len(out) / self.config.hidden;
        self.gpu.gemm_bf16(&m.0, (m.1, m.2), input, n, out)?;
        Ok(())
    }

    fn residual(
        &self,
        li: usize,
        which: Residual,
        x: &mut D::Buf<f32>,
        o: &mut D::Buf<f32>,
        h: &mut D::Buf<u16>,
    ) -> Result<(), DeviceModelError> {
        let c = &self.config;
        let nm = &self.layers[li].norms;
        let norms = match which {
            Residual::Attention => (&nm[3], &nm[4]),
            Residual::Mlp => (
                &nm[5],
                self.layers
                    .get(li + 1)
                    .map_or(&self.output_norm, |l| &l.norms[0]),
            ),
        };
        let n = D::len(x) / c.hidden;
        self.gpu
            .residual_norm(x, o, norms, h, (n, c.hidden), c.rms_eps)?;
        Ok(())
    }

    fn gated_mlp(
        &self,
        li: usize,
        h: &D::Buf<u16>,
        g: &mut D::Buf<u16>,
        pass: &mut DevicePass<D>,
    ) -> Result<(), DeviceModelError> {
        let m = &self.layers[li].matrices[2];
        let n = pass.n;
        self.gpu.gemm_bf16(&m.0, (m.1, m.2), h, n, &mut pass.gu)?;
        self.gpu
            .geglu_bf16(&pass.gu, g, (n, self.shard.ffn.len()))?;
        Ok(())
    }

    fn finish(&self, _pass: DevicePass<D>, rows: &[Row], pool: &mut KvPool<D>) {
        for r in rows {
            let len = &mut pool.lengths[r.seq];
            *len = (*len).max(r.position + 1);
        }
    }

    fn lm_head(
        &self,
        h: &D::Buf<u16>,
        want: &[usize],
        out: &mut [f32],
    ) -> Result<(), DeviceModelError> {
        let logits = self.head_logits(h, want)?;
        let scored = self.gpu.download(&logits)?;
        let rows = self.vocab_rows();
        let mine = out.len() / want.len().max(1);
        for (dst, src) in out
            .chunks_exact_mut(mine.max(1))
            .zip(scored.chunks(rows.max(1)))
        {
            let k = dst.len().min(src.len());
            dst[..k].copy_from_slice(&src[..k]);
        }
        Ok(())
    }

    fn lm_head_greedy(
        &self,
        h: &D::Buf<u16>,
        want: &[usize],
    ) -> Result<Option<Vec<u32>>, DeviceModelError> {
        let rows = self.vocab_rows();
        if rows != self.config.vocab {
            return Ok(None);
        }
        let m = want.len();
        let logits = self.head_logits(h, want)?;
        let mut ids = self.gpu.zeros::<i32>(m)?;
        self.gpu.argmax_rows(&logits, (m, rows), &mut ids)?;
        Ok(Some(
            self.gpu
                .download(&ids)?
                .iter()
                .map(|i| u32::try_from(*i).unwrap_or(0))
                .collect(),
        ))
    }
}

impl<D: Device> DeviceGemma<D> {
    /// Rows of this rank's embedding (its vocabulary slice).
    fn vocab_rows(&self) -> usize {
        D::len(&self.embd) / self.config.hidden.max(1)
    }

    /// The LM head over the rows `want` of `h` (the final norm, bf16): on
    /// the device, `want.len()` × this rank's vocabulary rows.
    fn head_logits(
        &self,
        h: &D::Buf<u16>,
        want: &[usize],
    ) -> Result<D::Buf<f32>, DeviceModelError> {
        let gpu = &self.gpu;
        let hidden = self.config.hidden;
        let n = D::len(h) / hidden.max(1);
        let m = want.len();
        // Every row (a decode step) is scored in place; a prompt's last
        // row is gathered on the host first.
        let gathered;
        let input = if want.iter().copied().eq(0..n) {
            h
        } else {
            let normed = gpu.download(h)?;
            let mut rows = Vec::with_capacity(m * hidden);
            for &w in want {
                let r = normed.get(w * hidden..(w + 1) * hidden).ok_or_else(|| {
                    DeviceModelError::Unsupported(format!("row {w} of {n} does not exist"))
                })?;
                rows.extend_from_slice(r);
            }
            gathered = gpu.upload(&rows)?;
            &gathered
        };
        let vocab_rows = self.vocab_rows();
        let mut logits = gpu.zeros::<f32>(m * vocab_rows)?;
        gpu.gemm_bf16(&self.embd, (vocab_rows, hidden), input, m, &mut logits)?;
        Ok(logits)
    }
}

/// Generates up to `max_tokens` after `prompt` on the GPU, sampling on the
/// host with `sampler` (greedy or seeded), stopping at an end-of-generation
/// token (included), as [`super::generate`] does on the CPU.
pub fn generate<D: Device>(
    model: &DeviceGemma<D>,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, DeviceModelError> {
    let context = model.config().context;
    if prompt.is_empty() || prompt.len() >= context {
        return Err(DeviceModelError::Unsupported(format!(
            "the prompt has {} tokens; it must have 1 to {} (the context is {context})",
            prompt.len(),
            context - 1
        )));
    }
    let budget = max_tokens.min(context - prompt.len());
    let mut pool = model.new_pool(1, prompt.len() + budget + 1)?;
    let mut logits = model.prefill(prompt, 0, &mut pool)?;
    let mut out = Vec::new();
    while out.len() < budget {
        let next = sampler.sample(&logits);
        out.push(next);
        on_token(next);
        if END_OF_GENERATION.contains(&next) || out.len() == budget {
            break;
        }
        logits = model.decode(&[next], &[0], &mut pool)?;
    }
    Ok(out)
}

/// The same model on the CPU and on a device, prompt by prompt: the last
/// prompt position's logits (largest difference, top-1 equal), then
/// `steps` teacher-forced steps on the CPU's greedy tokens (how often the
/// device's argmax agrees, the largest logit difference). One JSON object
/// per prompt. `chunk` sets the device's prompt chunk (default [`CHUNK`]).
pub fn parity<D: Device>(
    gemma: &Gemma,
    model: &DeviceGemma<D>,
    prompts: &[Vec<u32>],
    steps: usize,
    chunk: Option<usize>,
) -> Result<Vec<serde_json::Value>, DeviceModelError> {
    let fail = |e: kernels::collective::CollectiveError| {
        DeviceModelError::Unsupported(format!("CPU model: {e}"))
    };
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from((x - y).abs()))
            .fold(0.0f64, f64::max)
    };
    let argmax = super::argmax;
    let vocab = gemma.config().vocab;
    let mut rows = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let mut cache = gemma.new_cache();
        let mut cpu = vec![0f32; vocab];
        gemma
            .prefill(prompt, &mut cache, Some(&mut cpu))
            .map_err(fail)?;
        let mut pool =
            model.new_pool_chunked(1, prompt.len() + steps + 2, chunk.unwrap_or(CHUNK))?;
        let dev = model.prefill(prompt, 0, &mut pool)?;
        let first = max_diff(&cpu, &dev);
        let top1 = argmax(&cpu) == argmax(&dev);
        let (mut agree, mut worst) = (0usize, first);
        // Where the argmaxes differ: the step, both picks, and how far the
        // CPU's own logit of the device's pick is below its top-1 (a near
        // tie that the bf16 roundings flip, or a real difference).
        let mut differ = Vec::new();
        for step in 0..steps {
            let next = argmax(&cpu);
            gemma
                .forward(next, &mut cache, Some(&mut cpu))
                .map_err(fail)?;
            let d = model.decode(&[next], &[0], &mut pool)?;
            let (c1, d1) = (argmax(&cpu), argmax(&d));
            if c1 == d1 {
                agree += 1;
            } else {
                differ.push(serde_json::json!({
                    "step": step,
                    "cpu": c1,
                    "device": d1,
                    "cpu_margin": cpu[c1 as usize] - cpu[d1 as usize],
                    "device_margin": d[d1 as usize] - d[c1 as usize],
                }));
            }
            worst = worst.max(max_diff(&cpu, &d));
        }
        rows.push(serde_json::json!({
            "prompt": i,
            "prompt_tokens": prompt.len(),
            "last_position_max_abs_diff": first,
            "top1_equal": top1,
            "teacher_forced_steps": steps,
            "argmax_agreement": agree as f64 / steps.max(1) as f64,
            "max_abs_diff": worst,
            "disagreements": differ,
        }));
    }
    Ok(rows)
}
