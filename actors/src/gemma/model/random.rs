//! Random weights in the exact shapes of a configuration, for benchmarks
//! of sizes whose real weights are not at hand (`dima bench decode
//! --random-weights`, `dima gpu parity --random-weights`).

use super::*;

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

impl Gemma {
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
}
