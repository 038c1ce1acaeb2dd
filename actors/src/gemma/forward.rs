//! The Gemma 3 forward pass, written once over a [`Backend`]: the rows and
//! their positions, the vocabulary-parallel embedding, the layer sequence
//! with its collectives (Megatron recipe: an all-reduce after the
//! row-parallel output and down projections), and the LM head with the
//! gather of every rank's vocabulary slice.
//!
//! A backend supplies the operations and decides how they are fused and in
//! which precision they run: the CPU backend ([`super::Gemma`]) multiplies
//! quantized rows in f32; the device backend ([`super::device::DeviceGemma`],
//! on `kernels::device::Host` or a CUDA GPU) runs bf16 matrix products with
//! fused norm, RoPE and cache kernels. Each keeps its own KV storage
//! ([`Backend::Kv`]).
//!
//! One layer (`x` is the residual stream, `h` the next product's input):
//!
//! ```text
//! h = norm(x, attn_norm)                       // before the first layer
//! a = attention(h)                             // q|k|v, QK-norm, RoPE, cache, attend
//! o = all_reduce(W_o a)
//! x = x + norm(o, post_attention_norm);  h = norm(x, ffn_norm)
//! g = gelu_tanh(W_gate h) ⊙ W_up h
//! o = all_reduce(W_down g)
//! x = x + norm(o, post_ffw_norm);        h = norm(x, next layer's attn_norm, or output_norm)
//! ```

use kernels::collective::{Collective, CollectiveError};

use super::config::GemmaConfig;
use super::shard::RankShard;

/// One row of a forward pass: a token of sequence `seq` at `position`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    /// The token.
    pub token: u32,
    /// Its sequence (an index into the pass's caches).
    pub seq: usize,
    /// Its position in that sequence.
    pub position: usize,
}

/// The row-parallel projections, each followed by an all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projection {
    /// `attn_output`, over the attention output.
    Output,
    /// `ffn_down`, over the gated MLP activations.
    Down,
}

/// Which residual step: after a layer's attention or after its MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    /// `x += norm(o, post_attention_norm)`, then `norm(x, ffn_norm)`.
    Attention,
    /// `x += norm(o, post_ffw_norm)`, then the next layer's `attn_norm`
    /// (or `output_norm` after the last layer).
    Mlp,
}

/// What the operations of a forward pass run on.
pub trait Backend {
    /// Why an operation failed.
    type Error: From<CollectiveError>;
    /// The residual stream and the projections' outputs (rows × width).
    type Act;
    /// A matrix product's input (rows × width).
    type Input;
    /// The KV storage the pass reads and writes.
    type Kv<'k>: ?Sized
    where
        Self: 'k;
    /// What a pass prepares once (positions, slots, scratch).
    type Pass;

    /// The model's configuration.
    fn config(&self) -> &GemmaConfig;
    /// This rank's slices.
    fn shard(&self) -> &RankShard;
    /// This rank's peers.
    fn collective(&self) -> &dyn Collective;
    /// Vocabulary rows per rank before trimming (the gather's unit).
    fn vocab_per_rank(&self) -> usize;

    /// Checks `rows` against `kv` and prepares the pass.
    fn prepare(&self, rows: &[Row], kv: &mut Self::Kv<'_>) -> Result<Self::Pass, Self::Error>;
    /// A zeroed activation buffer of `len` values.
    fn act(&self, len: usize) -> Result<Self::Act, Self::Error>;
    /// A zeroed product-input buffer of `len` values.
    fn input(&self, len: usize) -> Result<Self::Input, Self::Error>;
    /// The embedding rows (times the embedding scale) of the tokens this
    /// rank's vocabulary slice holds; zeros for the others.
    fn embed(&self, rows: &[Row], x: &mut Self::Act) -> Result<(), Self::Error>;
    /// Sums `x` over the ranks.
    fn all_reduce(&self, x: &mut Self::Act) -> Result<(), Self::Error>;
    /// `h = norm(x, layer 0's attn_norm)`.
    fn first_norm(&self, x: &Self::Act, h: &mut Self::Input) -> Result<(), Self::Error>;
    /// Layer `layer`'s attention over `h` (its q, k, v products, QK-norm,
    /// RoPE, the cache's new entries and the attention itself) into `out`
    /// (rows × this rank's query width).
    fn attention(
        &self,
        layer: usize,
        h: &Self::Input,
        out: &mut Self::Input,
        pass: &mut Self::Pass,
        kv: &mut Self::Kv<'_>,
    ) -> Result<(), Self::Error>;
    /// `out = W input` for a row-parallel projection of `layer`.
    fn project(
        &self,
        layer: usize,
        which: Projection,
        input: &Self::Input,
        out: &mut Self::Act,
    ) -> Result<(), Self::Error>;
    /// The residual step after `layer`'s attention or MLP, and the next
    /// product's input.
    fn residual(
        &self,
        layer: usize,
        which: Residual,
        x: &mut Self::Act,
        o: &mut Self::Act,
        h: &mut Self::Input,
    ) -> Result<(), Self::Error>;
    /// `g = gelu_tanh(W_gate h) ⊙ W_up h` of `layer`.
    fn gated_mlp(
        &self,
        layer: usize,
        h: &Self::Input,
        g: &mut Self::Input,
        pass: &mut Self::Pass,
    ) -> Result<(), Self::Error>;
    /// The pass is done: the sequences' lengths grow by their rows.
    fn finish(&self, pass: Self::Pass, rows: &[Row], kv: &mut Self::Kv<'_>);
    /// This rank's logits (its vocabulary slice, `want.len()` rows) of the
    /// rows `want` of `h` (the output-normed rows) into `out`.
    fn lm_head(&self, h: &Self::Input, want: &[usize], out: &mut [f32]) -> Result<(), Self::Error>;
    /// Each wanted row's greedy token, chosen where the logits are (one
    /// rank only); `None` when this backend does not, and the logits come
    /// back instead.
    fn lm_head_greedy(
        &self,
        _h: &Self::Input,
        _want: &[usize],
    ) -> Result<Option<Vec<u32>>, Self::Error> {
        Ok(None)
    }
}

/// How many leading tokens of a `len`-token run go through alone, in
/// chunks of `chunk`, before its last chunk (1 to `chunk` tokens) joins a
/// pass with other sequences.
pub fn leading_chunks(len: usize, chunk: usize) -> usize {
    len.saturating_sub(1) / chunk * chunk
}

/// What a pass asks of the LM head.
#[derive(Debug)]
pub enum Head<'a> {
    /// Nothing (a prompt's earlier chunks).
    None,
    /// The logits of these rows, `vocab` each, into this buffer.
    Logits(&'a [usize], &'a mut [f32]),
    /// The greedy token of these rows, on the device where it can be;
    /// otherwise their logits come back (`vocab` per row).
    Greedy(&'a [usize]),
}

/// What a greedy head gave.
#[derive(Debug)]
pub enum Greedy {
    /// The tokens, chosen on the device.
    Ids(Vec<u32>),
    /// The logits (the backend could not choose).
    Logits(Vec<f32>),
}

/// Runs `rows` (tokens of one or more sequences, each sequence's rows one
/// run of consecutive positions) through the model; `head` says which
/// rows' logits (or greedy tokens) come out.
pub fn forward<B: Backend>(
    b: &B,
    rows: &[Row],
    kv: &mut B::Kv<'_>,
    head: Head<'_>,
) -> Result<Option<Greedy>, B::Error> {
    let c = b.config();
    let n = rows.len();
    if n == 0 {
        return Ok(None);
    }
    let me = b.shard();
    let (q_dim, ffn) = (me.q_heads.len() * c.head_dim, me.ffn.len());
    let tp = b.collective().world();
    let mut pass = b.prepare(rows, kv)?;
    let mut x = b.act(n * c.hidden)?;
    b.embed(rows, &mut x)?;
    if tp > 1 {
        b.all_reduce(&mut x)?;
    }
    let mut h = b.input(n * c.hidden)?;
    let mut a = b.input(n * q_dim)?;
    let mut g = b.input(n * ffn)?;
    let mut o = b.act(n * c.hidden)?;
    b.first_norm(&x, &mut h)?;
    for layer in 0..c.layers {
        b.attention(layer, &h, &mut a, &mut pass, kv)?;
        b.project(layer, Projection::Output, &a, &mut o)?;
        if tp > 1 {
            b.all_reduce(&mut o)?;
        }
        b.residual(layer, Residual::Attention, &mut x, &mut o, &mut h)?;
        b.gated_mlp(layer, &h, &mut g, &mut pass)?;
        b.project(layer, Projection::Down, &g, &mut o)?;
        if tp > 1 {
            b.all_reduce(&mut o)?;
        }
        b.residual(layer, Residual::Mlp, &mut x, &mut o, &mut h)?;
    }
    b.finish(pass, rows, kv);
    let vocab = c.vocab;
    let (want, logits) = match head {
        Head::None => return Ok(None),
        Head::Logits(want, logits) => (want, Some(logits)),
        Head::Greedy(want) => {
            if tp == 1
                && let Some(ids) = b.lm_head_greedy(&h, want)?
            {
                return Ok(Some(Greedy::Ids(ids)));
            }
            (want, None)
        }
    };
    let m = want.len();
    if m == 0 {
        return Ok(None);
    }
    let mut owned = Vec::new();
    let logits = match logits {
        Some(out) => out,
        None => {
            owned.resize(m * vocab, 0f32);
            &mut owned[..]
        }
    };
    if tp == 1 {
        b.lm_head(&h, want, &mut logits[..m * vocab])?;
    } else {
        // Each rank scores its vocabulary slice; the slices are gathered in
        // rank order (padded to equal lengths) and trimmed.
        let per = b.vocab_per_rank();
        let mine_rows = me.vocab.len();
        let mut scored = vec![0f32; m * mine_rows];
        b.lm_head(&h, want, &mut scored)?;
        let mut mine = vec![0f32; m * per];
        for (dst, src) in mine
            .chunks_exact_mut(per)
            .zip(scored.chunks_exact(mine_rows.max(1)))
        {
            dst[..mine_rows].copy_from_slice(src);
        }
        let mut all = vec![0f32; m * per * tp];
        b.collective().all_gather(&mine, &mut all)?;
        for (rank, part) in all.chunks_exact(m * per).enumerate() {
            for (t, slice) in part.chunks_exact(per).enumerate() {
                let from = rank * per;
                let to = (from + per).min(vocab);
                if from < to {
                    logits[t * vocab + from..t * vocab + to].copy_from_slice(&slice[..to - from]);
                }
            }
        }
    }
    Ok((!owned.is_empty()).then_some(Greedy::Logits(owned)))
}
