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
use crate::tokenizer::{Tokenizer, VocabError};

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not a readable GGUF.
    #[error(transparent)]
    Gguf(#[from] GgufError),
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
    /// A tensor has the wrong shape.
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

/// One row of a forward pass: a token of sequence `seq` at `position`.
#[derive(Clone, Copy, Debug)]
struct Row {
    token: u32,
    seq: usize,
    position: usize,
}

/// Most prompt tokens one pass through the weights takes: a weight block is
/// read once for all of them (the tiles multiply it with every 16 tokens
/// while it is in cache), and the activations stay small (about 34 KB per
/// token for the 270M).
pub const PREFILL_CHUNK: usize = 256;

/// For each row, the index of the first row of its sequence's run (the
/// rows before it of the same sequence at consecutive positions). Every
/// caller of [`Gemma::run_rows`] gives each sequence one ascending run.
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
    /// Its AMX tile copy in [`Gemma::packed`], where it has one.
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
    /// Ranks.
    tp: usize,
    /// Vocabulary rows per rank before trimming (the all-gather's unit).
    vocab_per_rank: usize,
    /// This rank's copies of column slices (row-parallel weights, tp > 1).
    owned: Vec<Vec<u8>>,
    /// Q8_0 and Q5_0 matrices repacked for AMX tiles (where the CPU has
    /// them; see `kernels::quant::tiles`), indexed by `MatrixRef::packed`.
    #[cfg(target_arch = "x86_64")]
    packed: Vec<kernels::quant::tiles::Packed>,
}

/// One tensor found by [`Loader::find`].
struct Found {
    /// Its name in the file.
    name: String,
    file: usize,
    ggml_type: Option<GgmlType>,
    type_name: String,
    /// Dims in the file's own order (GGUF: innermost first; safetensors:
    /// outermost first).
    dims: Vec<u64>,
    start: usize,
    bytes: usize,
}

/// Finds the architecture's tensors by their GGUF names in either store.
enum Loader<'a> {
    Gguf(&'a GgufFile),
    Checkpoint(&'a Checkpoint),
}

impl Loader<'_> {
    fn path(&self) -> PathBuf {
        match self {
            Loader::Gguf(f) => f.path().to_owned(),
            Loader::Checkpoint(c) => c.dir().to_owned(),
        }
    }

    fn find(&self, gguf_name: &str) -> Result<Found, LoadError> {
        let missing = |name: String| LoadError::MissingTensor {
            path: self.path(),
            name,
        };
        match self {
            Loader::Gguf(file) => {
                let info = file
                    .header()
                    .tensor(gguf_name)
                    .ok_or_else(|| missing(gguf_name.to_owned()))?;
                Ok(Found {
                    name: gguf_name.to_owned(),
                    file: 0,
                    ggml_type: Some(info.ggml_type),
                    type_name: info.ggml_type.name().to_owned(),
                    dims: info.dims.clone(),
                    start: info.start as usize,
                    bytes: info.bytes as usize,
                })
            }
            Loader::Checkpoint(c) => {
                let hf = hf_name(gguf_name).ok_or_else(|| missing(gguf_name.to_owned()))?;
                let (file, t) = c
                    .tensor(&hf)
                    .ok_or_else(|| missing(format!("{}{hf}", c.prefix())))?;
                Ok(Found {
                    name: t.name.clone(),
                    file,
                    ggml_type: t.ggml_type,
                    type_name: t.dtype.clone(),
                    dims: t.shape.iter().map(|&d| d as u64).collect(),
                    start: t.start,
                    bytes: t.bytes,
                })
            }
        }
    }

    fn data(&self, found: &Found) -> &[u8] {
        let bytes = match self {
            Loader::Gguf(file) => file.bytes(),
            Loader::Checkpoint(c) => c.files()[found.file].bytes(),
        };
        &bytes[found.start..found.start + found.bytes]
    }

    fn ggml_type(found: &Found) -> Result<GgmlType, LoadError> {
        found.ggml_type.ok_or_else(|| LoadError::Type {
            name: found.name.clone(),
            source: QuantError::UnsupportedDtype(found.type_name.clone()),
        })
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<MatrixRef, LoadError> {
        let found = self.find(name)?;
        let expected = match self {
            Loader::Gguf(_) => vec![cols as u64, rows as u64],
            Loader::Checkpoint(_) => vec![rows as u64, cols as u64],
        };
        if found.dims != expected {
            return Err(LoadError::Shape {
                name: found.name,
                dims: found.dims,
                expected,
            });
        }
        let ggml_type = Self::ggml_type(&found)?;
        QMatrix::new(ggml_type, rows, cols, self.data(&found)).map_err(|source| {
            LoadError::Type {
                name: found.name.clone(),
                source,
            }
        })?;
        Ok(MatrixRef {
            file: found.file,
            owned: None,
            ggml_type,
            rows,
            cols,
            start: found.start,
            bytes: found.bytes,
            packed: None,
        })
    }

    /// Columns `range` of `m` as a copy (each row's blocks in the range),
    /// pushed to `owned`; `m` itself when the range is every column.
    fn columns(
        &self,
        name: &str,
        m: MatrixRef,
        range: std::ops::Range<usize>,
        owned: &mut Vec<Vec<u8>>,
    ) -> Result<MatrixRef, LoadError> {
        if range == (0..m.cols) {
            return Ok(m);
        }
        let block = m.ggml_type.block_elements();
        let block_bytes = m
            .ggml_type
            .bytes_for(block as u64)
            .map_or(0, |b| b as usize);
        if !(range.start.is_multiple_of(block) && range.len().is_multiple_of(block)) {
            return Err(LoadError::Shape {
                name: format!("{name} columns {range:?} (blocks of {block})"),
                dims: vec![m.cols as u64, m.rows as u64],
                expected: vec![],
            });
        }
        let bytes = match self {
            Loader::Gguf(file) => file.bytes(),
            Loader::Checkpoint(c) => c.files()[m.file].bytes(),
        };
        let data = &bytes[m.start..m.start + m.bytes];
        let row_bytes = m.bytes / m.rows.max(1);
        let (from, len) = (
            range.start / block * block_bytes,
            range.len() / block * block_bytes,
        );
        let mut copy = Vec::with_capacity(m.rows * len);
        for row in data.chunks_exact(row_bytes) {
            copy.extend_from_slice(&row[from..from + len]);
        }
        owned.push(copy);
        Ok(MatrixRef {
            owned: Some(owned.len() - 1),
            start: 0,
            cols: range.len(),
            bytes: m.rows * len,
            ..m
        })
    }

    /// A norm weight, as the multiplier `1 + w` (GGUF stores it so already).
    fn norm(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        let found = self.find(name)?;
        if found.dims != [len as u64] {
            return Err(LoadError::Shape {
                name: found.name,
                dims: found.dims,
                expected: vec![len as u64],
            });
        }
        let mut out = vec![0f32; len];
        kernels::quant::dequantize_row(Self::ggml_type(&found)?, self.data(&found), &mut out)
            .map_err(|source| LoadError::Type {
                name: found.name.clone(),
                source,
            })?;
        if let Loader::Checkpoint(_) = self {
            out.iter_mut().for_each(|w| *w += 1.0);
        }
        Ok(out)
    }
}

/// This rank's matrices in [`Gemma::random`]'s order: per layer q, k, v,
/// output, gate, up, down; then the embedding. (name, rows, cols).
fn random_shapes(
    c: &GemmaConfig,
    layout: &ShardPlan,
    rank: usize,
) -> Result<Vec<(String, usize, usize)>, LoadError> {
    let me = layout.ranks.get(rank).ok_or(LoadError::Group {
        rank,
        world: layout.tp,
        tp: layout.tp,
    })?;
    let hd = c.head_dim;
    let q = me.q_heads.len() * hd;
    let kv = me.kv_heads.len() * hd;
    let f = me.ffn.len();
    let mut shapes = Vec::with_capacity(7 * c.layers + 1);
    for i in 0..c.layers {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        shapes.extend([
            (n("attn_q"), q, c.hidden),
            (n("attn_k"), kv, c.hidden),
            (n("attn_v"), kv, c.hidden),
            (n("attn_output"), c.hidden, q),
            (n("ffn_gate"), f, c.hidden),
            (n("ffn_up"), f, c.hidden),
            (n("ffn_down"), c.hidden, f),
        ]);
    }
    shapes.push(("token_embd.weight".into(), me.vocab.len(), c.hidden));
    Ok(shapes)
}

/// Bytes of a `rows` × `cols` matrix of `ty`; an error when a row is not
/// whole blocks.
fn matrix_bytes(ty: GgmlType, name: &str, rows: usize, cols: usize) -> Result<usize, LoadError> {
    let row = ty.bytes_for(cols as u64).ok_or_else(|| LoadError::Shape {
        name: format!(
            "{name}: rows of {cols} values are not whole {}-value blocks of {}",
            ty.block_elements(),
            ty.name()
        ),
        dims: vec![cols as u64, rows as u64],
        expected: Vec::new(),
    })?;
    Ok(rows * row as usize)
}

/// `len` bytes of valid `ty` blocks with small random weights, filled by
/// every core (xorshift per chunk; block scales set to small values).
fn random_bytes(ty: GgmlType, len: usize, seed: u64) -> Vec<u8> {
    let block_bytes = ty.bytes_for(ty.block_elements() as u64).unwrap_or(1) as usize;
    let mut out = vec![0u8; len];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Whole blocks per chunk, at least 1 MiB.
    let per = (len / threads).max(1 << 20).div_ceil(block_bytes) * block_bytes;
    let d_q8 = half::f16::from_f32(0.02 / 127.0).to_bits().to_le_bytes();
    let d_q4k = half::f16::from_f32(1e-4).to_bits().to_le_bytes();
    std::thread::scope(|scope| {
        for (k, chunk) in out.chunks_mut(per).enumerate() {
            scope.spawn(move || {
                let mut state = seed ^ (k as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
                let mut next = move || {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state
                };
                for word in chunk.chunks_mut(8) {
                    let r = next().to_le_bytes();
                    word.copy_from_slice(&r[..word.len()]);
                }
                match ty {
                    GgmlType::BF16 => {
                        // Sign and 7 mantissa bits random; exponent 118..=121:
                        // magnitudes between 2^-9 and 2^-5.
                        for v in chunk.chunks_exact_mut(2) {
                            let r = u16::from_le_bytes([v[0], v[1]]);
                            let exp = 118 + ((r >> 7) & 3);
                            v.copy_from_slice(&((r & 0x807F) | (exp << 7)).to_le_bytes());
                        }
                    }
                    GgmlType::Q8_0 => {
                        for b in chunk.chunks_exact_mut(block_bytes) {
                            b[..2].copy_from_slice(&d_q8);
                        }
                    }
                    GgmlType::Q4K => {
                        for b in chunk.chunks_exact_mut(block_bytes) {
                            b[..2].copy_from_slice(&d_q4k);
                            b[2..4].copy_from_slice(&d_q4k);
                        }
                    }
                    _ => {}
                }
            });
        }
    });
    out
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

/// Only the tokenizer of a model (GGUF file or checkpoint directory), without
/// mapping the weights.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, LoadError> {
    if path.is_dir() {
        Ok(Checkpoint::open(path)?.tokenizer()?)
    } else {
        Ok(Tokenizer::from_gguf(GgufFile::open(path)?.header())?)
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
    ring: Vec<Option<usize>>,
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
        self.ring[layer].map_or(position, |window| position % window)
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
    /// Loads a Gemma 3 model: a GGUF file, or a Hugging Face checkpoint
    /// directory (`config.json`, safetensors weights, `tokenizer.model`).
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::load_with_progress(path, |_, _| {})
    }

    /// [`load`](Self::load), calling `progress(done, total)` as layers are
    /// checked and their norm weights read (for a progress bar).
    pub fn load_with_progress(
        path: &Path,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, LoadError> {
        Self::load_rank(path, 1, Box::new(SingleRank), progress)
    }

    /// Loads rank `collective.rank()` of a `tp`-way tensor-parallel model:
    /// only this rank's slices of the weights (see [`super::shard`]) are
    /// read. Row slices stay in the memory-mapped file; the column slices of
    /// the row-parallel weights (`attn_output`, `ffn_down`) are copied.
    /// Every rank of the group must load and then run the same steps.
    pub fn load_rank(
        path: &Path,
        tp: usize,
        collective: Box<dyn Collective>,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, LoadError> {
        if collective.world() != tp || collective.rank() >= tp {
            return Err(LoadError::Group {
                rank: collective.rank(),
                world: collective.world(),
                tp,
            });
        }
        let rank = collective.rank();
        if path.is_dir() {
            let checkpoint = Checkpoint::open(path)?;
            let tokenizer = checkpoint.tokenizer()?;
            let config = checkpoint.config().clone();
            let (layout, layers, parts, owned) = Self::load_parts(
                &Loader::Checkpoint(&checkpoint),
                &config,
                tp,
                rank,
                progress,
            )?;
            // HF rounds sqrt(hidden) to the weights' dtype before multiplying
            // (bf16: sqrt(3072) = 55.4 becomes 55.5).
            let root = (config.hidden as f32).sqrt();
            let embed_scale = match parts.token_embd.ggml_type {
                GgmlType::BF16 => half::bf16::from_f32(root).to_f32(),
                GgmlType::F16 => half::f16::from_f32(root).to_f32(),
                _ => root,
            };
            Self::assemble(
                Store::Safetensors(checkpoint.into_files()),
                config,
                tokenizer,
                (layers, parts, owned),
                embed_scale,
                (&layout, collective),
            )
        } else {
            let file = GgufFile::open(path)?;
            let config = GemmaConfig::from_gguf(file.header())?;
            let tokenizer = Tokenizer::from_gguf(file.header())?;
            let (layout, layers, parts, owned) =
                Self::load_parts(&Loader::Gguf(&file), &config, tp, rank, progress)?;
            // llama.cpp scales GGUF embeddings by sqrtf(n_embd) in f32.
            let embed_scale = (config.hidden as f32).sqrt();
            Self::assemble(
                Store::Gguf(file),
                config,
                tokenizer,
                (layers, parts, owned),
                embed_scale,
                (&layout, collective),
            )
        }
    }

    /// The layout for `tp` ranks and rank `rank`'s layers, shared tensors
    /// and copied column slices.
    fn load_parts(
        l: &Loader<'_>,
        config: &GemmaConfig,
        tp: usize,
        rank: usize,
        progress: impl FnMut(usize, usize),
    ) -> Result<Parts, LoadError> {
        let layout = plan(config, tp)?;
        let mut owned = Vec::new();
        let (layers, shared) = Self::load_layers(l, config, &layout, rank, &mut owned, progress)?;
        Ok((layout, layers, shared, owned))
    }

    fn load_layers(
        l: &Loader<'_>,
        c: &GemmaConfig,
        layout: &ShardPlan,
        rank: usize,
        owned: &mut Vec<Vec<u8>>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<(Vec<Layer>, Shared), LoadError> {
        let (q_dim, kv_dim) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let me = &layout.ranks[rank];
        let hd = c.head_dim;
        let q_rows = me.q_heads.start * hd..me.q_heads.end * hd;
        let kv_rows = me.kv_heads.start * hd..me.kv_heads.end * hd;
        let mut layers = Vec::with_capacity(c.layers);
        for (i, kind) in c.layer_kinds.iter().enumerate() {
            progress(i, c.layers + 1);
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            // In the file's order, so that the first missing tensor is named.
            let attn_norm = l.norm(&n("attn_norm"), c.hidden)?;
            let attn_q = l
                .matrix(&n("attn_q"), q_dim, c.hidden)?
                .rows(q_rows.clone());
            let attn_k = l
                .matrix(&n("attn_k"), kv_dim, c.hidden)?
                .rows(kv_rows.clone());
            let attn_v = l
                .matrix(&n("attn_v"), kv_dim, c.hidden)?
                .rows(kv_rows.clone());
            let attn_q_norm = l.norm(&n("attn_q_norm"), c.head_dim)?;
            let attn_k_norm = l.norm(&n("attn_k_norm"), c.head_dim)?;
            let attn_output = l.matrix(&n("attn_output"), c.hidden, q_dim)?;
            let post_attention_norm = l.norm(&n("post_attention_norm"), c.hidden)?;
            let ffn_norm = l.norm(&n("ffn_norm"), c.hidden)?;
            let ffn_gate = l
                .matrix(&n("ffn_gate"), c.ffn, c.hidden)?
                .rows(me.ffn.clone());
            let ffn_up = l
                .matrix(&n("ffn_up"), c.ffn, c.hidden)?
                .rows(me.ffn.clone());
            let ffn_down = l.matrix(&n("ffn_down"), c.hidden, c.ffn)?;
            let post_ffw_norm = l.norm(&n("post_ffw_norm"), c.hidden)?;
            if layout.tp > 1 {
                layout.check_blocks(attn_output.ggml_type.block_elements())?;
                layout.check_blocks(ffn_down.ggml_type.block_elements())?;
            }
            layers.push(Layer {
                kind: *kind,
                attn_norm,
                attn_q,
                attn_k,
                attn_v,
                attn_q_norm,
                attn_k_norm,
                attn_output: l.columns(&n("attn_output"), attn_output, q_rows.clone(), owned)?,
                post_attention_norm,
                ffn_norm,
                ffn_gate,
                ffn_up,
                ffn_down: l.columns(&n("ffn_down"), ffn_down, me.ffn.clone(), owned)?,
                post_ffw_norm,
            });
        }
        let shared = Shared {
            token_embd: l
                .matrix("token_embd.weight", c.vocab, c.hidden)?
                .rows(me.vocab.clone()),
            output_norm: l.norm("output_norm.weight", c.hidden)?,
        };
        progress(c.layers + 1, c.layers + 1);
        Ok((layers, shared))
    }

    fn assemble(
        store: Store,
        config: GemmaConfig,
        tokenizer: Tokenizer,
        (layers, shared, owned): (Vec<Layer>, Shared, Vec<Vec<u8>>),
        embed_scale: f32,
        (layout, collective): (&ShardPlan, Box<dyn Collective>),
    ) -> Result<Self, LoadError> {
        if tokenizer.len() > config.vocab {
            return Err(LoadError::VocabTooLarge {
                tokens: tokenizer.len(),
                rows: config.vocab,
            });
        }
        let mut model = Self {
            store,
            config,
            tokenizer,
            token_embd: shared.token_embd,
            embed_scale,
            output_norm: shared.output_norm,
            layers,
            shard: layout.ranks[collective.rank()].clone(),
            tp: layout.tp,
            vocab_per_rank: layout.vocab_chunk,
            collective,
            owned,
            #[cfg(target_arch = "x86_64")]
            packed: Vec::new(),
        };
        // Random weights are for measuring sizes that barely fit: no
        // second copy of them.
        #[cfg(target_arch = "x86_64")]
        if !matches!(model.store, Store::Memory) {
            model.pack_for_tiles();
        }
        Ok(model)
    }

    /// Repacks every Q8_0 and Q5_0 matrix for the AMX tiles, when this CPU
    /// has them (`kernels::quant::tiles`): their products (prompts, batched
    /// and single decode steps alike) then run there.
    #[cfg(target_arch = "x86_64")]
    fn pack_for_tiles(&mut self) {
        use kernels::quant::tiles::{Packed, available};
        if !available() {
            return;
        }
        let mut layers = std::mem::take(&mut self.layers);
        let mut token_embd = self.token_embd;
        let mut packed = Vec::new();
        let mut pack = |model: &Self, r: &mut MatrixRef| {
            if let Some(p) = Packed::new(&model.matrix(r)) {
                packed.push(p);
                r.packed = Some(packed.len() - 1);
            }
        };
        for l in &mut layers {
            for r in [
                &mut l.attn_q,
                &mut l.attn_k,
                &mut l.attn_v,
                &mut l.attn_output,
                &mut l.ffn_gate,
                &mut l.ffn_up,
                &mut l.ffn_down,
            ] {
                pack(self, r);
            }
        }
        pack(self, &mut token_embd);
        self.layers = layers;
        self.token_embd = token_embd;
        self.packed = packed;
    }

    /// The weight types [`random`](Self::random) can build.
    pub const RANDOM_TYPES: [GgmlType; 3] = [GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4K];

    /// Bytes of weights one rank of a `tp`-way group holds with every
    /// matrix in `weight_type`: what [`random`](Self::random) allocates
    /// (norm vectors included), known before allocating anything.
    pub fn random_weight_bytes(
        config: &GemmaConfig,
        tp: usize,
        rank: usize,
        weight_type: GgmlType,
    ) -> Result<usize, LoadError> {
        let layout = plan(config, tp)?;
        let shapes = random_shapes(config, &layout, rank)?;
        let mut total = 0usize;
        for (name, rows, cols) in shapes {
            total += matrix_bytes(weight_type, &name, rows, cols)?;
        }
        let c = config;
        let norms = c.layers * (4 * c.hidden + 2 * c.head_dim) + c.hidden;
        Ok(total + 4 * norms)
    }

    /// A model in the exact shape of `config` (every matrix of this rank's
    /// slices, in `weight_type`) with random weights: for benchmarks of
    /// sizes whose real weights are not at hand. Norm multipliers are 1;
    /// weights are small (|w| up to about 0.1), so activations stay finite
    /// but the text means nothing. Filling uses every core; the same
    /// `seed` gives the same weights.
    pub fn random(
        config: GemmaConfig,
        tokenizer: Tokenizer,
        weight_type: GgmlType,
        seed: u64,
        collective: Box<dyn Collective>,
    ) -> Result<Self, LoadError> {
        if !Self::RANDOM_TYPES.contains(&weight_type) {
            return Err(LoadError::Type {
                name: "random weights".into(),
                source: QuantError::UnsupportedDtype(format!(
                    "{} (random weights come in bf16, q8_0 or q4_k)",
                    weight_type.name()
                )),
            });
        }
        config.check()?;
        let tp = collective.world();
        let rank = collective.rank();
        let layout = plan(&config, tp)?;
        let shapes = random_shapes(&config, &layout, rank)?;
        let mut owned = Vec::with_capacity(shapes.len());
        let mut refs = Vec::with_capacity(shapes.len());
        for (i, (name, rows, cols)) in shapes.into_iter().enumerate() {
            let bytes = matrix_bytes(weight_type, &name, rows, cols)?;
            owned.push(random_bytes(
                weight_type,
                bytes,
                seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            refs.push(MatrixRef {
                file: 0,
                owned: Some(i),
                ggml_type: weight_type,
                rows,
                cols,
                start: 0,
                bytes,
                packed: None,
            });
        }
        let c = &config;
        let ones = |n: usize| vec![1f32; n];
        let mut it = refs.into_iter();
        let mut next = || {
            it.next().ok_or_else(|| LoadError::Shape {
                name: "random weights".into(),
                dims: Vec::new(),
                expected: Vec::new(),
            })
        };
        let mut layers = Vec::with_capacity(c.layers);
        for kind in &c.layer_kinds {
            layers.push(Layer {
                kind: *kind,
                attn_norm: ones(c.hidden),
                attn_q: next()?,
                attn_k: next()?,
                attn_v: next()?,
                attn_q_norm: ones(c.head_dim),
                attn_k_norm: ones(c.head_dim),
                attn_output: next()?,
                post_attention_norm: ones(c.hidden),
                ffn_norm: ones(c.hidden),
                ffn_gate: next()?,
                ffn_up: next()?,
                ffn_down: next()?,
                post_ffw_norm: ones(c.hidden),
            });
        }
        let shared = Shared {
            token_embd: next()?,
            output_norm: ones(c.hidden),
        };
        let embed_scale = (c.hidden as f32).sqrt();
        Self::assemble(
            Store::Memory,
            config,
            tokenizer,
            (layers, shared, owned),
            embed_scale,
            (&layout, collective),
        )
    }

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
            ring: c
                .layer_kinds
                .iter()
                .map(|k| (*k == LayerKind::Local).then_some(c.window))
                .collect(),
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
        match logits {
            Some(out) => self.run_rows(&rows, &mut [cache], &[last], out),
            None => self.run_rows(&rows, &mut [cache], &[], &mut []),
        }
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
            let keep = run.len().saturating_sub(1) / PREFILL_CHUNK * PREFILL_CHUNK;
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
        self.run_rows(&rows, caches, &logits_for, logits)
    }

    /// Runs `rows` (tokens of one or more sequences, each sequence's rows
    /// one run of consecutive positions) through the model; writes the logits of
    /// the rows listed in `logits_for` into consecutive `vocab`-long rows of
    /// `logits`.
    fn run_rows(
        &self,
        rows: &[Row],
        caches: &mut [&mut KvCache],
        logits_for: &[usize],
        logits: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let c = &self.config;
        let n = rows.len();
        if n == 0 {
            return Ok(());
        }
        // This rank's share: its query and KV heads, its intermediate
        // features (everything with one rank).
        let me = &self.shard;
        let hd = c.head_dim;
        let (q_dim, kv_dim) = (me.q_heads.len() * hd, me.kv_heads.len() * hd);
        let ffn = me.ffn.len();
        let group = c.heads / c.kv_heads;
        let score_scale = 1.0 / c.query_pre_attn_scalar.sqrt();

        // Vocabulary-parallel lookup: the rank holding a token's row fills
        // it, the others leave zeros, and the sum gives every rank the row.
        let mut x = vec![0f32; n * c.hidden];
        for (row, r) in x.chunks_exact_mut(c.hidden).zip(rows) {
            let token = r.token as usize;
            if me.vocab.contains(&token) {
                self.matrix(&self.token_embd)
                    .dequantize_row(token - me.vocab.start, row);
                row.iter_mut().for_each(|v| *v *= self.embed_scale);
            }
        }
        if self.tp > 1 {
            self.collective.all_reduce_sum(&mut x)?;
        }
        let mut h = vec![0f32; n * c.hidden];
        let mut q = vec![0f32; n * q_dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * q_dim];
        let mut o = vec![0f32; n * c.hidden];
        let mut gate = vec![0f32; n * ffn];
        let mut up = vec![0f32; n * ffn];
        let runs = run_starts(rows);
        // This rank's query heads in runs that share a KV head, each with
        // that KV head's offset into a token's K/V row.
        let mut groups: Vec<(std::ops::Range<usize>, usize)> = Vec::new();
        for head in 0..me.q_heads.len() {
            let off = ((me.q_heads.start + head) / group - me.kv_heads.start) * hd;
            match groups.last_mut() {
                Some((heads, last)) if *last == off => heads.end = head + 1,
                _ => groups.push((head..head + 1, off)),
            }
        }

        for (li, layer) in self.layers.iter().enumerate() {
            for (hr, xr) in h.chunks_exact_mut(c.hidden).zip(x.chunks_exact(c.hidden)) {
                rms_norm(xr, &layer.attn_norm, c.rms_eps, hr);
            }
            self.matrix(&layer.attn_q).matmul(&h, n, &mut q);
            self.matrix(&layer.attn_k).matmul(&h, n, &mut k);
            self.matrix(&layer.attn_v).matmul(&h, n, &mut v);
            let (base, scale) = match layer.kind {
                LayerKind::Local => (c.rope_local_base, 1.0),
                LayerKind::Global => (c.rope_global_base, c.rope_global_scale),
            };
            // QK-norm and RoPE, token by token in parallel.
            q.par_chunks_exact_mut(q_dim)
                .zip(k.par_chunks_exact_mut(kv_dim))
                .zip(rows.par_iter())
                .for_each_init(
                    || (vec![0f32; hd / 2], vec![0f32; hd / 2]),
                    |(cos, sin), ((qt, kt), r)| {
                        rope_angles(r.position as f32 / scale, base, hd, cos, sin);
                        for head in qt.chunks_exact_mut(hd) {
                            rms_norm_in_place(head, &layer.attn_q_norm, c.rms_eps);
                            rope_neox_with(head, cos, sin);
                            head.iter_mut().for_each(|v| *v *= score_scale);
                        }
                        for head in kt.chunks_exact_mut(hd) {
                            rms_norm_in_place(head, &layer.attn_k_norm, c.rms_eps);
                            rope_neox_with(head, cos, sin);
                        }
                    },
                );
            let first_position = |position: usize| match layer.kind {
                LayerKind::Local => (position + 1).saturating_sub(c.window),
                LayerKind::Global => 0,
            };
            // Tokens in parallel. A position inside this batch is read
            // from `k`/`v` (not stored yet: a later token may take an
            // earlier one's ring slot on a local layer); earlier
            // positions from the cache, which still holds them all.
            let cached: Vec<&KvCache> = caches.iter().map(|cache| &**cache).collect();
            let (k, v) = (&k, &v);
            attn.par_chunks_exact_mut(q_dim).enumerate().for_each_init(
                Vec::new,
                |scores, (t, out_t)| {
                    let r = &rows[t];
                    let cache = cached[r.seq];
                    let (r0, p0) = (runs[t], rows[runs[t]].position);
                    for (heads, off) in &groups {
                        let off = *off;
                        let kv = |p: usize| {
                            if p >= p0 {
                                let at = (r0 + p - p0) * kv_dim + off;
                                (&k[at..at + hd], &v[at..at + hd])
                            } else {
                                let at = cache.slot(li, p) * kv_dim + off;
                                (&cache.keys[li][at..at + hd], &cache.values[li][at..at + hd])
                            }
                        };
                        let span = heads.start * hd..heads.end * hd;
                        attend_heads(
                            &q[t * q_dim..(t + 1) * q_dim][span.clone()],
                            hd,
                            first_position(r.position)..=r.position,
                            kv,
                            scores,
                            &mut out_t[span],
                        );
                    }
                },
            );
            for (t, r) in rows.iter().enumerate() {
                caches[r.seq].store(
                    li,
                    r.position,
                    &k[t * kv_dim..(t + 1) * kv_dim],
                    &v[t * kv_dim..(t + 1) * kv_dim],
                );
            }
            self.matrix(&layer.attn_output).matmul(&attn, n, &mut o);
            self.collective.all_reduce_sum(&mut o)?;
            add_normed(
                &mut x,
                &mut o,
                &layer.post_attention_norm,
                c.hidden,
                c.rms_eps,
            );
            for (hr, xr) in h.chunks_exact_mut(c.hidden).zip(x.chunks_exact(c.hidden)) {
                rms_norm(xr, &layer.ffn_norm, c.rms_eps, hr);
            }
            self.matrix(&layer.ffn_gate).matmul(&h, n, &mut gate);
            self.matrix(&layer.ffn_up).matmul(&h, n, &mut up);
            gate.iter_mut()
                .zip(&up)
                .for_each(|(g, u)| *g = gelu_tanh(*g) * u);
            self.matrix(&layer.ffn_down).matmul(&gate, n, &mut o);
            self.collective.all_reduce_sum(&mut o)?;
            add_normed(&mut x, &mut o, &layer.post_ffw_norm, c.hidden, c.rms_eps);
        }
        for r in rows {
            let cache = &mut *caches[r.seq];
            cache.len = cache.len.max(r.position + 1);
        }
        if logits_for.is_empty() {
            return Ok(());
        }
        let m = logits_for.len();
        let mut last = Vec::with_capacity(m * c.hidden);
        for &i in logits_for {
            let row = &mut x[i * c.hidden..(i + 1) * c.hidden];
            rms_norm_in_place(row, &self.output_norm, c.rms_eps);
            last.extend_from_slice(row);
        }
        let vocab = c.vocab;
        let head = self.matrix(&self.token_embd);
        if self.tp == 1 {
            head.matmul(&last, m, &mut logits[..m * vocab]);
        } else {
            // Each rank scores its vocabulary slice; the slices are gathered
            // in rank order (padded to equal lengths) and trimmed.
            let per = self.vocab_per_rank;
            let mine_rows = me.vocab.len();
            let mut scored = vec![0f32; m * mine_rows];
            head.matmul(&last, m, &mut scored);
            let mut mine = vec![0f32; m * per];
            for (dst, src) in mine
                .chunks_exact_mut(per)
                .zip(scored.chunks_exact(mine_rows.max(1)))
            {
                dst[..mine_rows].copy_from_slice(src);
            }
            let mut all = vec![0f32; m * per * self.tp];
            self.collective.all_gather(&mine, &mut all)?;
            for (rank, part) in all.chunks_exact(m * per).enumerate() {
                for (t, slice) in part.chunks_exact(per).enumerate() {
                    let from = rank * per;
                    let to = (from + per).min(vocab);
                    if from < to {
                        logits[t * vocab + from..t * vocab + to]
                            .copy_from_slice(&slice[..to - from]);
                    }
                }
            }
        }
        Ok(())
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
