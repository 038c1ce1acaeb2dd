//! Loading a rank's weights: a GGUF file or a Hugging Face checkpoint
//! directory, mapped, found by their GGUF names, sliced for this rank.

use super::*;

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
        if let Some(at) = out.iter().position(|w| !w.is_finite()) {
            return Err(LoadError::NotFinite {
                name: found.name,
                index: at,
                value: out[at],
            });
        }
        Ok(out)
    }
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
    /// only this rank's slices of the weights (see [`crate::gemma::shard`]) are
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

    pub(super) fn assemble(
        store: Store,
        config: GemmaConfig,
        tokenizer: Tokenizer,
        (layers, shared, owned): (Vec<Layer>, Shared, Vec<Vec<u8>>),
        embed_scale: f32,
        (layout, collective): (&ShardPlan, Box<dyn Collective>),
    ) -> Result<Self, LoadError> {
        kernels::quant::Kernel::check_env().map_err(LoadError::Kernels)?;
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

    /// Repacks every Q8_0, Q5_0, Q4_K and Q6_K matrix for the int8 path of
    /// this CPU (`kernels::quant::Int8`: the AMX tiles or AVX-512 VNNI):
    /// products of two or more tokens (prompts, batched decode steps) then
    /// run there.
    #[cfg(target_arch = "x86_64")]
    fn pack_for_tiles(&mut self) {
        use kernels::quant::Int8;
        use kernels::quant::tiles::Packed;
        if Int8::detect() == Int8::None {
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
}
