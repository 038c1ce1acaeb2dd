//! The Gemma 3 forward pass over GGUF or safetensors weights.
//!
//! Field names follow the GGUF tensor names (`blk.N.attn_q` …) so a reader can
//! go from a weight to the code that uses it; a Hugging Face checkpoint's
//! names are mapped onto them ([`super::checkpoint::hf_name`]). Weights stay
//! in their (quantized or bf16/f32) rows inside the memory-mapped files;
//! matrix products run on those rows ([`QMatrix::matvec`]); only the small
//! norm vectors are copied out.
//!
//! One layer, as llama.cpp's `llm_build_gemma3` and HF's `Gemma3DecoderLayer`:
//!
//! ```text
//! h   = rmsnorm(x, attn_norm)
//! q,k,v = Wq h, Wk h, Wv h;  q,k = rmsnorm per head (attn_q_norm, attn_k_norm)
//! q,k = rope(base = 10k on local layers, 1M / scale on global layers)
//! a   = attention(q · query_pre_attn_scalar^-0.5, cache; local layers see the
//!       last `window` positions, global layers all)
//! x   = x + rmsnorm(Wo a, post_attention_norm)
//! x   = x + rmsnorm(Wdown (gelu_tanh(Wgate h') ⊙ Wup h'), post_ffw_norm),  h' = rmsnorm(x, ffn_norm)
//! ```
//!
//! GGUF norm weights already hold `1 + w` (llama.cpp's converter adds the
//! one), so they multiply directly; Hugging Face checkpoints store `w`, and
//! `1 + w` is formed in f32 at load, as HF's `Gemma3RMSNorm` does.

use std::path::{Path, PathBuf};

use kernels::collective::{Collective, CollectiveError, SingleRank};
use kernels::gguf::{GgmlType, GgufError, GgufFile};
use kernels::ops::{
    attend_heads, gelu_tanh, rms_norm, rms_norm_in_place, rope_angles, rope_neox_with,
};
use kernels::quant::{QMatrix, QuantError};
use kernels::safetensors::SafetensorsFile;
use rayon::prelude::*;

use super::checkpoint::{Checkpoint, CheckpointError, hf_name};
use super::config::{ConfigError, GemmaConfig, LayerKind};
use super::shard::{RankShard, ShardError, ShardPlan, plan};
use crate::gemma::forward::{Head, Row, forward, leading_chunks};
use crate::gemma::kv::{LayerSlots, layout};
use crate::tokenizer::{Tokenizer, VocabError};

mod cpu;
mod load;
mod random;

pub use load::load_tokenizer;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not a readable GGUF.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `DIMA_KERNELS` names no kernel path.
    #[error("{0}")]
    Kernels(String),
    /// The configuration is missing or unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The tokenizer is missing or unusable.
    #[error(transparent)]
    Vocab(#[from] VocabError),
    /// The Hugging Face checkpoint directory is unusable.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor the architecture needs is absent.
    #[error("{path}: tensor {name:?} is missing")]
    MissingTensor {
        /// The model file or checkpoint directory.
        path: PathBuf,
        /// The tensor, as that file names it.
        name: String,
    },
    /// The tokenizer has ids the embedding has no row for.
    #[error("the tokenizer has {tokens} tokens but the embedding only {rows} rows")]
    VocabTooLarge {
        /// Tokenizer size.
        tokens: usize,
        /// Embedding rows.
        rows: usize,
    },
    /// A norm tensor holds a NaN or an infinity.
    #[error("tensor {name:?}: value {index} is {value}, not a finite number")]
    NotFinite {
        /// The tensor.
        name: String,
        /// The first bad value's index.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A tensor's dims are not what the configuration says.
    #[error("tensor {name:?} has dims {dims:?}, expected {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its dims.
        dims: Vec<u64>,
        /// What the config implies.
        expected: Vec<u64>,
    },
    /// A tensor's type cannot be computed with.
    #[error("tensor {name:?}: {source}")]
    Type {
        /// The tensor.
        name: String,
        /// Why.
        source: QuantError,
    },
    /// The tensor-parallel layout is impossible for this model.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// The collective's group does not match the layout asked for.
    #[error(
        "tp={tp} needs a {tp}-rank collective, but this one has {world} ranks (this is rank {rank})"
    )]
    Group {
        /// The collective's rank.
        rank: usize,
        /// Its world size.
        world: usize,
        /// The tp asked for.
        tp: usize,
    },
}

/// What a rank loads: its layout, layers, shared tensors and the column
/// slices it copied.
type Parts = (ShardPlan, Vec<Layer>, Shared, Vec<Vec<u8>>);

/// Most prompt tokens one pass through the weights takes: a weight block is
/// read once for all of them (the tiles multiply it with every 16 tokens
/// while it is in cache), and the activations stay small (about 34 KB per
/// token for the 270M).
pub const PREFILL_CHUNK: usize = 256;

/// For each row, the index of the first row of its sequence's run (the
/// rows before it of the same sequence at consecutive positions). Every
/// caller of the forward pass gives each sequence one ascending run.
fn run_starts(rows: &[Row]) -> Vec<usize> {
    let mut starts: Vec<usize> = Vec::with_capacity(rows.len());
    let mut seen = std::collections::HashSet::new();
    for (t, r) in rows.iter().enumerate() {
        let continues = t > 0 && rows[t - 1].seq == r.seq && rows[t - 1].position + 1 == r.position;
        if continues {
            starts.push(starts[t - 1]);
        } else {
            assert!(
                seen.insert(r.seq),
                "sequence {} is not one ascending run of rows",
                r.seq
            );
            starts.push(t);
        }
    }
    starts
}

/// `x[t] += rmsnorm(o[t]) · weight` for every token row: the sandwich
/// norm after attention and after the MLP (Gemma 2/3 residual wiring).
fn add_normed(x: &mut [f32], o: &mut [f32], weight: &[f32], hidden: usize, eps: f32) {
    for (xr, or) in x.chunks_exact_mut(hidden).zip(o.chunks_exact_mut(hidden)) {
        rms_norm_in_place(or, weight, eps);
        xr.iter_mut().zip(or.iter()).for_each(|(x, o)| *x += o);
    }
}

/// Where the weights live.
#[derive(Debug)]
enum Store {
    Gguf(GgufFile),
    Safetensors(Vec<SafetensorsFile>),
    /// Nothing mapped: every matrix is one of the rank's own buffers
    /// ([`Gemma::random`]).
    Memory,
}

impl Store {
    fn bytes(&self, file: usize) -> &[u8] {
        match self {
            Store::Gguf(f) => f.bytes(),
            Store::Safetensors(files) => files[file].bytes(),
            Store::Memory => &[],
        }
    }
}

/// Where a matrix lives: which file of the store, and where in it, or
/// which of the rank's own copies (a column slice of a row-parallel weight).
#[derive(Clone, Copy, Debug)]
struct MatrixRef {
    file: usize,
    owned: Option<usize>,
    ggml_type: GgmlType,
    rows: usize,
    cols: usize,
    start: usize,
    bytes: usize,
    /// Its int8 repacking (AMX tiles or VNNI) in [`Gemma::packed`], where
    /// it has one.
    packed: Option<usize>,
}

impl MatrixRef {
    /// Rows `range` only: a sub-range of the same bytes.
    fn rows(self, range: std::ops::Range<usize>) -> Self {
        let row_bytes = self.bytes / self.rows.max(1);
        Self {
            start: self.start + range.start * row_bytes,
            rows: range.len(),
            bytes: range.len() * row_bytes,
            ..self
        }
    }
}

#[derive(Debug)]
struct Layer {
    kind: LayerKind,
    attn_norm: Vec<f32>,
    attn_q: MatrixRef,
    attn_k: MatrixRef,
    attn_v: MatrixRef,
    attn_q_norm: Vec<f32>,
    attn_k_norm: Vec<f32>,
    attn_output: MatrixRef,
    post_attention_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    ffn_gate: MatrixRef,
    ffn_up: MatrixRef,
    ffn_down: MatrixRef,
    post_ffw_norm: Vec<f32>,
}

/// The tensors outside the layers.
struct Shared {
    token_embd: MatrixRef,
    output_norm: Vec<f32>,
}

/// A loaded Gemma 3 model.
#[derive(Debug)]
pub struct Gemma {
    store: Store,
    config: GemmaConfig,
    tokenizer: Tokenizer,
    token_embd: MatrixRef,
    embed_scale: f32,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// How this rank combines partial results with its peers (Megatron
    /// recipe: after `attn_output` and `ffn_down`, after the
    /// vocabulary-parallel embedding lookup, around the LM head).
    collective: Box<dyn Collective>,
    /// This rank's slices (everything with one rank).
    shard: RankShard,
    /// Vocabulary rows per rank before trimming (the all-gather's unit).
    vocab_per_rank: usize,
    /// This rank's copies of column slices (row-parallel weights, tp > 1).
    owned: Vec<Vec<u8>>,
    /// Block-quantized matrices repacked for this CPU's int8 path (the AMX
    /// tiles or AVX-512 VNNI; see `kernels::quant::Int8`), indexed by
    /// `MatrixRef::packed`.
    #[cfg(target_arch = "x86_64")]
    packed: Vec<kernels::quant::tiles::Packed>,
}

/// A weight matrix, for [`Gemma::dequantized`] and [`Gemma::bf16_bits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weight {
    /// The tied embedding / LM head (this rank's vocabulary rows).
    TokenEmbd,
    /// A matrix of layer `i`.
    Layer(usize, LayerWeight),
}

/// The matrices of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerWeight {
    /// `attn_q`.
    Q,
    /// `attn_k`.
    K,
    /// `attn_v`.
    V,
    /// `attn_output`.
    O,
    /// `ffn_gate`.
    Gate,
    /// `ffn_up`.
    Up,
    /// `ffn_down`.
    Down,
}

/// A prefix-cache entry: the keys and values of a prompt's first `len`
/// positions, every layer linear (a local layer's too, not only its
/// window), so any shorter prefix can be restored, rings included.
#[derive(Debug, Clone, Default)]
pub struct KvSnapshot {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
}

impl KvSnapshot {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|v| v.len() * 4)
            .sum()
    }

    /// The first `len` positions (a new entry starts from a reused one).
    pub fn prefix(&self, len: usize) -> Self {
        let len = len.min(self.len);
        let cut = |v: &Vec<Vec<f32>>| {
            v.iter()
                .map(|layer| layer[..len * self.kv_dim].to_vec())
                .collect()
        };
        Self {
            keys: cut(&self.keys),
            values: cut(&self.values),
            kv_dim: self.kv_dim,
            len,
        }
    }
}

/// The key/value cache of one sequence.
///
/// Local layers keep only their window in a ring buffer (slot = position
/// mod window); global layers keep every position.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    slots: Vec<LayerSlots>,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    /// Positions stored so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of K and V held now (f32).
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|v| v.len() * 4)
            .sum()
    }

    fn slot(&self, layer: usize, position: usize) -> usize {
        self.slots[layer].slot(position)
    }

    /// Appends the keys and values of positions `from..to` (every layer;
    /// on a ring layer they must still be in its window) to `into`, which
    /// holds every position up to `from`.
    pub fn copy_out(&self, from: usize, to: usize, into: &mut KvSnapshot) {
        let kv = self.kv_dim;
        if into.keys.is_empty() {
            into.keys = vec![Vec::new(); self.keys.len()];
            into.values = vec![Vec::new(); self.values.len()];
            into.kv_dim = kv;
        }
        debug_assert_eq!(into.len, from, "a snapshot grows from its end");
        for layer in 0..self.keys.len() {
            for p in from..to {
                let at = self.slot(layer, p) * kv;
                into.keys[layer].extend_from_slice(&self.keys[layer][at..at + kv]);
                into.values[layer].extend_from_slice(&self.values[layer][at..at + kv]);
            }
        }
        into.len = to;
    }

    /// Makes this cache hold the first `len` positions of `snapshot`: a
    /// global layer all of them, a ring layer the last window's.
    pub fn restore(&mut self, snapshot: &KvSnapshot, len: usize) {
        let kv = self.kv_dim;
        let len = len.min(snapshot.len);
        for layer in 0..self.keys.len() {
            let (keys, values) = (&snapshot.keys[layer], &snapshot.values[layer]);
            match self.slots[layer] {
                LayerSlots::All => {
                    self.keys[layer] = keys[..len * kv].to_vec();
                    self.values[layer] = values[..len * kv].to_vec();
                }
                LayerSlots::Ring(window) => {
                    let size = len.min(window) * kv;
                    self.keys[layer] = vec![0.0; size];
                    self.values[layer] = vec![0.0; size];
                    for p in len.saturating_sub(window)..len {
                        let at = (p % window) * kv;
                        self.keys[layer][at..at + kv].copy_from_slice(&keys[p * kv..(p + 1) * kv]);
                        self.values[layer][at..at + kv]
                            .copy_from_slice(&values[p * kv..(p + 1) * kv]);
                    }
                }
            }
        }
        self.len = len;
    }

    fn store(&mut self, layer: usize, position: usize, k: &[f32], v: &[f32]) {
        let slot = self.slot(layer, position);
        let at = slot * self.kv_dim;
        for (cache, new) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            if cache.len() < at + self.kv_dim {
                cache.resize(at + self.kv_dim, 0.0);
            }
            cache[at..at + self.kv_dim].copy_from_slice(new);
        }
    }
}

impl Gemma {
    /// A weight matrix of this rank as f32 rows (`rows × cols`), decoded
    /// from its stored type: what another backend uploads.
    pub fn dequantized(&self, which: Weight) -> (usize, usize, Vec<f32>) {
        use rayon::prelude::*;
        let m = self.matrix(self.weight_ref(which));
        let mut out = vec![0f32; m.rows * m.cols];
        out.par_chunks_mut(m.cols.max(1))
            .enumerate()
            .for_each(|(r, row)| m.dequantize_row(r, row));
        (m.rows, m.cols, out)
    }

    /// A weight matrix's raw bf16 bits when it is stored as bf16 (a
    /// checkpoint's or random weights), so it can go up as it is.
    pub fn bf16_bits(&self, which: Weight) -> Option<(usize, usize, Vec<u16>)> {
        use rayon::prelude::*;
        let m = self.matrix(self.weight_ref(which));
        (m.ggml_type == GgmlType::BF16).then(|| {
            let bits = m
                .data
                .par_chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            (m.rows, m.cols, bits)
        })
    }

    fn weight_ref(&self, which: Weight) -> &MatrixRef {
        match which {
            Weight::TokenEmbd => &self.token_embd,
            Weight::Layer(i, w) => {
                let l = &self.layers[i];
                match w {
                    LayerWeight::Q => &l.attn_q,
                    LayerWeight::K => &l.attn_k,
                    LayerWeight::V => &l.attn_v,
                    LayerWeight::O => &l.attn_output,
                    LayerWeight::Gate => &l.ffn_gate,
                    LayerWeight::Up => &l.ffn_up,
                    LayerWeight::Down => &l.ffn_down,
                }
            }
        }
    }

    /// Layer `i`'s norm multipliers: attention input, q, k, after attention,
    /// MLP input, after the MLP.
    pub fn layer_norms(&self, i: usize) -> [&[f32]; 6] {
        let l = &self.layers[i];
        [
            &l.attn_norm,
            &l.attn_q_norm,
            &l.attn_k_norm,
            &l.post_attention_norm,
            &l.ffn_norm,
            &l.post_ffw_norm,
        ]
    }

    /// The final norm's multiplier.
    pub fn output_norm(&self) -> &[f32] {
        &self.output_norm
    }

    /// What embeddings are multiplied by (sqrt(hidden), rounded as the
    /// reference does for the weights' type).
    pub fn embed_scale(&self) -> f32 {
        self.embed_scale
    }

    /// How this rank reaches its peers.
    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    /// This rank's slices.
    pub fn shard(&self) -> &RankShard {
        &self.shard
    }

    /// Bytes of weights this rank computes with: its slices of every
    /// matrix (in the mapped file or copied) and the norm vectors.
    pub fn weight_bytes(&self) -> usize {
        let norms = |l: &Layer| {
            4 * (l.attn_norm.len()
                + l.attn_q_norm.len()
                + l.attn_k_norm.len()
                + l.post_attention_norm.len()
                + l.ffn_norm.len()
                + l.post_ffw_norm.len())
        };
        self.layers
            .iter()
            .map(|l| {
                [
                    l.attn_q,
                    l.attn_k,
                    l.attn_v,
                    l.attn_output,
                    l.ffn_gate,
                    l.ffn_up,
                    l.ffn_down,
                ]
                .iter()
                .map(|m| m.bytes)
                .sum::<usize>()
                    + norms(l)
            })
            .sum::<usize>()
            + self.token_embd.bytes
            + 4 * self.output_norm.len()
    }

    /// The model's configuration.
    pub fn config(&self) -> &GemmaConfig {
        &self.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn matrix(&self, m: &MatrixRef) -> QMatrix<'_> {
        let bytes = match m.owned {
            Some(i) => &self.owned[i],
            None => self.store.bytes(m.file),
        };
        QMatrix {
            ggml_type: m.ggml_type,
            rows: m.rows,
            cols: m.cols,
            data: &bytes[m.start..m.start + m.bytes],
            #[cfg(target_arch = "x86_64")]
            packed: m.packed.map(|i| &self.packed[i]),
        }
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        let c = &self.config;
        KvCache {
            keys: vec![Vec::new(); c.layers],
            values: vec![Vec::new(); c.layers],
            // Attention reads a pass's own keys from the pass: a ring of
            // exactly `window` on local layers.
            slots: layout(c, 0, c.context),
            kv_dim: self.shard.kv_heads.len() * c.head_dim,
            len: 0,
        }
    }

    /// Runs `tokens` at the next positions of `cache`, up to
    /// [`PREFILL_CHUNK`] at a time through the weight matrices (each weight
    /// block read once per chunk); every token attends to exactly the
    /// positions up to its own. Writes the last token's logits when
    /// `logits` is given.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        mut logits: Option<&mut [f32]>,
    ) -> Result<(), CollectiveError> {
        let chunks: Vec<&[u32]> = tokens.chunks(PREFILL_CHUNK).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            self.forward_batch(
                chunk,
                cache,
                if last { logits.as_deref_mut() } else { None },
            )?;
        }
        Ok(())
    }

    fn forward_batch(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Option<&mut [f32]>,
    ) -> Result<(), CollectiveError> {
        let start = cache.len;
        let rows: Vec<Row> = tokens
            .iter()
            .enumerate()
            .map(|(t, &token)| Row {
                token,
                seq: 0,
                position: start + t,
            })
            .collect();
        let last = tokens.len().saturating_sub(1);
        let head = match logits {
            Some(out) => Head::Logits(&[last], out),
            None => Head::None,
        };
        forward(self, &rows, &mut [cache], head).map(|_| ())
    }

    /// One decode step for several sequences at once (continuous batching):
    /// `steps[i]` is the next token of the sequence cached in `caches[i]`.
    /// The weight matrices run once over all rows (each block decoded once
    /// for up to [`MAX_BATCH`](kernels::quant::MAX_BATCH) rows); attention
    /// runs per sequence on its own cache. `logits` receives one row of
    /// `vocab` logits per sequence, in order. Each sequence's logits equal
    /// what [`forward`](Self::forward) gives it alone (to rounding): it is
    /// [`step`](Self::step) with one token per sequence.
    pub fn decode(
        &self,
        steps: &[u32],
        caches: &mut [&mut KvCache],
        logits: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let runs: Vec<&[u32]> = steps.chunks(1).collect();
        self.step(&runs, caches, logits)
    }

    /// One engine step for several sequences at once: `tokens[i]` are the
    /// next tokens of the sequence cached in `caches[i]` (a newly admitted
    /// prompt, or one decode token), all through the weight matrices in
    /// one pass, so admitted prompts share the pass (and the LM head) with
    /// the running sequences. `logits` receives, in order, one row of
    /// `vocab` logits per sequence: its last token's. A prompt longer than
    /// [`PREFILL_CHUNK`] runs its earlier chunks alone first.
    pub fn step(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        logits: &mut [f32],
    ) -> Result<(), CollectiveError> {
        assert_eq!(tokens.len(), caches.len(), "one token run per cache");
        // The engine refuses empty prompts before they get here.
        assert!(
            tokens.iter().all(|run| !run.is_empty()),
            "every sequence of a step has at least one token"
        );
        let mut rows = Vec::new();
        let mut logits_for = Vec::with_capacity(tokens.len());
        for (seq, (run, cache)) in tokens.iter().zip(caches.iter_mut()).enumerate() {
            let keep = leading_chunks(run.len(), PREFILL_CHUNK);
            if keep > 0 {
                self.prefill(&run[..keep], cache, None)?;
            }
            let start = cache.len;
            rows.extend(run[keep..].iter().enumerate().map(|(t, &token)| Row {
                token,
                seq,
                position: start + t,
            }));
            logits_for.push(rows.len() - 1);
        }
        forward(self, &rows, caches, Head::Logits(&logits_for, logits)).map(|_| ())
    }

    /// Runs `token` at the next position of `cache` and, when `logits` is
    /// given, writes the logits over the vocabulary into it (a prompt's
    /// earlier positions skip the LM head, the largest matrix of the model).
    pub fn forward(
        &self,
        token: u32,
        cache: &mut KvCache,
        logits: Option<&mut [f32]>,
    ) -> Result<(), CollectiveError> {
        self.forward_batch(&[token], cache, logits)
    }
}
