//! The device seam of the bf16 forward pass: the operations the GPU model
//! (`actors::gemma::device::DeviceGemma`) runs, over buffers that live on
//! the device. Two implementations: [`Host`], plain Rust on this CPU
//! (always built: it is how CI checks the model's indexing, caches and
//! chunking against the CPU model without a GPU), and the CUDA GPU
//! (`crate::cuda::Gpu`, feature `cuda`), whose kernels `dima gpu check`
//! compares with these.
//!
//! Semantics shared by both: activations f32, row-major; bf16 values are
//! raw 16-bit patterns, rounded to nearest even; GEMMs multiply bf16 by
//! bf16 with f32 accumulation.

/// A value a device buffer holds.
#[cfg(feature = "cuda")]
pub trait Elem:
    Copy
    + Default
    + Send
    + Sync
    + Unpin
    + 'static
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
{
}
/// A value a device buffer holds.
#[cfg(not(feature = "cuda"))]
pub trait Elem: Copy + Default + Send + Sync + Unpin + 'static {}

impl Elem for f32 {}
impl Elem for u16 {}
impl Elem for i32 {}

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A buffer is shorter than the operation reads or writes.
    #[error("{what}: {len} values, the operation needs {need}")]
    TooShort {
        /// The operation and buffer.
        what: &'static str,
        /// Values in the buffer.
        len: usize,
        /// Values the operation needs.
        need: usize,
    },
    /// A token id past the embedding table.
    #[error("embed: token {id} is past the table")]
    TokenPastTable {
        /// The id.
        id: usize,
    },
    /// A cache slot past the cache.
    #[error("{op}: slot {slot} of {slots}")]
    SlotPastCache {
        /// The operation.
        op: &'static str,
        /// The slot.
        slot: usize,
        /// Slots in the cache.
        slots: usize,
    },
    /// Matrices of different widths cannot be stacked.
    #[error("stacking matrices of {cols} and {width} columns")]
    Stacking {
        /// The new matrix's columns.
        cols: usize,
        /// The stack's columns.
        width: usize,
    },
    /// The GPU failed.
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Gpu(#[from] crate::cuda::GpuError),
}

/// Shapes for [`Device::attention`]: tokens, heads, head_dim, kv_dim.
pub type AttentionShape = (usize, usize, usize, usize);

/// The operations of the bf16 forward pass.
pub trait Device {
    /// A buffer of `T` on the device.
    type Buf<T: Elem>;

    /// Copies `values` to the device.
    fn upload<T: Elem>(&self, values: &[T]) -> Result<Self::Buf<T>, DeviceError>;
    /// One buffer holding `parts` one after another (stacked weight
    /// matrices), without joining them on the host first where the device
    /// can copy into parts of a buffer.
    fn upload_parts<T: Elem>(&self, parts: &[&[T]]) -> Result<Self::Buf<T>, DeviceError> {
        self.upload(&parts.concat())
    }
    /// A zeroed buffer of `n` values.
    fn zeros<T: Elem>(&self, n: usize) -> Result<Self::Buf<T>, DeviceError>;
    /// Copies a buffer back.
    fn download<T: Elem>(&self, buffer: &Self::Buf<T>) -> Result<Vec<T>, DeviceError>;
    /// Values in a buffer.
    fn len<T: Elem>(buffer: &Self::Buf<T>) -> usize;
    /// Waits for queued work.
    fn synchronize(&self) -> Result<(), DeviceError>;

    /// `y = bf16(x)`, `n` values.
    fn to_bf16(
        &self,
        x: &Self::Buf<f32>,
        y: &mut Self::Buf<u16>,
        n: usize,
    ) -> Result<(), DeviceError>;
    /// `rows` × `dim`: `y = x / sqrt(mean(x²) + eps) · w`.
    fn rms_norm(
        &self,
        x: &Self::Buf<f32>,
        w: &Self::Buf<f32>,
        y: &mut Self::Buf<f32>,
        shape: (usize, usize),
        eps: f32,
    ) -> Result<(), DeviceError>;
    /// NeoX RoPE in place on (tokens, heads, head_dim), one position per token.
    fn rope_neox(
        &self,
        x: &mut Self::Buf<f32>,
        positions: &Self::Buf<f32>,
        shape: (usize, usize, usize),
        base: f32,
    ) -> Result<(), DeviceError>;
    /// `out = gelu_tanh(gate) · up`.
    fn geglu(
        &self,
        gate: &Self::Buf<f32>,
        up: &Self::Buf<f32>,
        out: &mut Self::Buf<f32>,
        n: usize,
    ) -> Result<(), DeviceError>;
    /// `out[t] = table[ids[t]] · scale` over a bf16 table; a negative id
    /// gives a row of zeros (another rank's vocabulary slice holds it).
    fn embed_bf16(
        &self,
        table: &Self::Buf<u16>,
        ids: &Self::Buf<i32>,
        out: &mut Self::Buf<f32>,
        shape: (usize, usize),
        scale: f32,
    ) -> Result<(), DeviceError>;
    /// `x += y`.
    fn add_in_place(
        &self,
        x: &mut Self::Buf<f32>,
        y: &Self::Buf<f32>,
        n: usize,
    ) -> Result<(), DeviceError>;
    /// `x *= s`.
    fn scale_in_place(&self, x: &mut Self::Buf<f32>, s: f32, n: usize) -> Result<(), DeviceError>;
    /// Row `r` of the K/V rows into slot `dest[r]` of the caches.
    fn store_kv(
        &self,
        rows: (&Self::Buf<f32>, &Self::Buf<f32>),
        caches: (&mut Self::Buf<f32>, &mut Self::Buf<f32>),
        dest: &Self::Buf<i32>,
        shape: (usize, usize),
        cache_slots: usize,
    ) -> Result<(), DeviceError>;
    /// Attention of each (token, head) query over its sequence's cached
    /// positions (see `kernels/cuda/gemma3.cu`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf<f32>,
        kv: (&Self::Buf<f32>, &Self::Buf<f32>),
        out: &mut Self::Buf<f32>,
        positions_and_bases: (&Self::Buf<i32>, &Self::Buf<i32>),
        shape: AttentionShape,
        group: usize,
        window_and_slots: (usize, usize),
    ) -> Result<(), DeviceError>;
    /// `out (tokens × rows) = xs (tokens × cols, bf16) · Wᵀ (rows × cols, bf16)`.
    fn gemm_bf16(
        &self,
        w: &Self::Buf<u16>,
        shape: (usize, usize),
        xs: &Self::Buf<u16>,
        tokens: usize,
        out: &mut Self::Buf<f32>,
    ) -> Result<(), DeviceError>;

    /// `out[r]` = the index of the largest of row `r` (`rows` × `n`), the
    /// lowest among equals.
    fn argmax_rows(
        &self,
        x: &Self::Buf<f32>,
        shape: (usize, usize),
        out: &mut Self::Buf<i32>,
    ) -> Result<(), DeviceError>;

    // The fused operations of a decode step. Each default composes the
    // operations above (what `Host` runs and what `dima gpu check` compares
    // a device's fused kernel with); a device overrides them with one
    // kernel each, so a layer is four matrix products and six small
    // kernels.

    /// `rows` × `dim`: `y = bf16(rms_norm(x) · w)`.
    fn rms_norm_bf16(
        &self,
        x: &Self::Buf<f32>,
        w: &Self::Buf<f32>,
        y: &mut Self::Buf<u16>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<(), DeviceError> {
        let mut normed = self.zeros::<f32>(rows * dim)?;
        self.rms_norm(x, w, &mut normed, (rows, dim), eps)?;
        self.to_bf16(&normed, y, rows * dim)
    }

    /// The residual step between two matrix products, `rows` × `dim`:
    /// `x += rms_norm(o) · w_post`, then `next = bf16(rms_norm(x) · w_next)`
    /// (the input of the next product).
    fn residual_norm(
        &self,
        x: &mut Self::Buf<f32>,
        o: &Self::Buf<f32>,
        (w_post, w_next): (&Self::Buf<f32>, &Self::Buf<f32>),
        next: &mut Self::Buf<u16>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<(), DeviceError> {
        let mut normed = self.zeros::<f32>(rows * dim)?;
        self.rms_norm(o, w_post, &mut normed, (rows, dim), eps)?;
        self.add_in_place(x, &normed, rows * dim)?;
        self.rms_norm_bf16(x, w_next, next, (rows, dim), eps)
    }

    /// Attention's inputs from one fused projection: row `t` of `qkv` is
    /// token t's `[q (heads × head_dim) | k (kv_heads × head_dim) | v]`.
    /// Writes `qn` = RoPE(rms_norm(q) · q_norm) · `q_scale` (tokens × heads
    /// × head_dim) and stores RoPE(rms_norm(k) · k_norm) and v in slot
    /// `dest[t]` of the caches (`cache_slots` slots of kv_heads ×
    /// head_dim). `rope[t]` is token t's RoPE position.
    #[allow(clippy::too_many_arguments)]
    fn qkv_prep(
        &self,
        qkv: &Self::Buf<f32>,
        (q_norm, k_norm): (&Self::Buf<f32>, &Self::Buf<f32>),
        qn: &mut Self::Buf<f32>,
        caches: (&mut Self::Buf<f32>, &mut Self::Buf<f32>),
        (rope, dest): (&Self::Buf<f32>, &Self::Buf<i32>),
        (tokens, heads, kv_heads, hd): (usize, usize, usize, usize),
        (base, q_scale, eps): (f32, f32, f32),
        cache_slots: usize,
    ) -> Result<(), DeviceError> {
        let (q_dim, kv_dim) = (heads * hd, kv_heads * hd);
        let width = q_dim + 2 * kv_dim;
        let all = self.download(qkv)?;
        need("qkv_prep qkv", all.len(), tokens * width)?;
        let (mut q, mut k, mut v) = (
            Vec::with_capacity(tokens * q_dim),
            Vec::with_capacity(tokens * kv_dim),
            Vec::with_capacity(tokens * kv_dim),
        );
        for row in all[..tokens * width].chunks_exact(width) {
            q.extend_from_slice(&row[..q_dim]);
            k.extend_from_slice(&row[q_dim..q_dim + kv_dim]);
            v.extend_from_slice(&row[q_dim + kv_dim..]);
        }
        let (q, k, v) = (self.upload(&q)?, self.upload(&k)?, self.upload(&v)?);
        let mut kn = self.zeros::<f32>(tokens * kv_dim)?;
        self.rms_norm(&q, q_norm, qn, (tokens * heads, hd), eps)?;
        self.rms_norm(&k, k_norm, &mut kn, (tokens * kv_heads, hd), eps)?;
        self.rope_neox(qn, rope, (tokens, heads, hd), base)?;
        self.rope_neox(&mut kn, rope, (tokens, kv_heads, hd), base)?;
        self.scale_in_place(qn, q_scale, tokens * q_dim)?;
        self.store_kv((&kn, &v), caches, dest, (tokens, kv_dim), cache_slots)
    }

    /// [`Device::attention`] with the output rounded to bf16 (the output
    /// projection's input).
    #[allow(clippy::too_many_arguments)]
    fn attention_bf16(
        &self,
        q: &Self::Buf<f32>,
        kv: (&Self::Buf<f32>, &Self::Buf<f32>),
        out: &mut Self::Buf<u16>,
        positions_and_bases: (&Self::Buf<i32>, &Self::Buf<i32>),
        shape: AttentionShape,
        group: usize,
        window_and_slots: (usize, usize),
    ) -> Result<(), DeviceError> {
        let (tokens, heads, hd, _) = shape;
        let mut attn = self.zeros::<f32>(tokens * heads * hd)?;
        self.attention(
            q,
            kv,
            &mut attn,
            positions_and_bases,
            shape,
            group,
            window_and_slots,
        )?;
        self.to_bf16(&attn, out, tokens * heads * hd)
    }

    /// The MLP's activation from one fused projection: row `t` of `gu` is
    /// token t's `[gate (ffn) | up (ffn)]`; `out = bf16(gelu_tanh(gate) ·
    /// up)` (tokens × ffn).
    fn geglu_bf16(
        &self,
        gu: &Self::Buf<f32>,
        out: &mut Self::Buf<u16>,
        (tokens, ffn): (usize, usize),
    ) -> Result<(), DeviceError> {
        let all = self.download(gu)?;
        need("geglu_bf16 gu", all.len(), tokens * 2 * ffn)?;
        let (mut gate, mut up) = (
            Vec::with_capacity(tokens * ffn),
            Vec::with_capacity(tokens * ffn),
        );
        for row in all[..tokens * 2 * ffn].chunks_exact(2 * ffn) {
            gate.extend_from_slice(&row[..ffn]);
            up.extend_from_slice(&row[ffn..]);
        }
        let (gate, up) = (self.upload(&gate)?, self.upload(&up)?);
        let mut act = self.zeros::<f32>(tokens * ffn)?;
        self.geglu(&gate, &up, &mut act, tokens * ffn)?;
        self.to_bf16(&act, out, tokens * ffn)
    }
}

/// bf16 bits of `x`, rounded to nearest even (the GPU kernel's rule).
fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn value(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

fn need(what: &'static str, len: usize, n: usize) -> Result<(), DeviceError> {
    if len < n {
        return Err(DeviceError::TooShort { what, len, need: n });
    }
    Ok(())
}

/// The device seam on this CPU, in plain Rust: buffers are `Vec`s.
#[derive(Clone, Copy, Debug, Default)]
pub struct Host;

impl Device for Host {
    type Buf<T: Elem> = Vec<T>;

    fn upload<T: Elem>(&self, values: &[T]) -> Result<Vec<T>, DeviceError> {
        Ok(values.to_vec())
    }

    fn zeros<T: Elem>(&self, n: usize) -> Result<Vec<T>, DeviceError> {
        Ok(vec![T::default(); n])
    }

    fn download<T: Elem>(&self, buffer: &Vec<T>) -> Result<Vec<T>, DeviceError> {
        Ok(buffer.clone())
    }

    fn len<T: Elem>(buffer: &Vec<T>) -> usize {
        buffer.len()
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn to_bf16(&self, x: &Vec<f32>, y: &mut Vec<u16>, n: usize) -> Result<(), DeviceError> {
        need("to_bf16", x.len().min(y.len()), n)?;
        for (o, v) in y.iter_mut().zip(&x[..n]) {
            *o = bf16(*v);
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        y: &mut Vec<f32>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<(), DeviceError> {
        need("rms_norm", x.len().min(y.len()), rows * dim)?;
        need("rms_norm w", w.len(), dim)?;
        for (xr, yr) in x[..rows * dim]
            .chunks(dim)
            .zip(y[..rows * dim].chunks_mut(dim))
        {
            crate::ops::rms_norm(xr, &w[..dim], eps, yr);
        }
        Ok(())
    }

    fn rope_neox(
        &self,
        x: &mut Vec<f32>,
        positions: &Vec<f32>,
        (tokens, heads, hd): (usize, usize, usize),
        base: f32,
    ) -> Result<(), DeviceError> {
        need("rope", x.len(), tokens * heads * hd)?;
        need("rope positions", positions.len(), tokens)?;
        for (t, token) in x[..tokens * heads * hd].chunks_mut(heads * hd).enumerate() {
            for head in token.chunks_mut(hd) {
                crate::ops::rope_neox(head, positions[t], base);
            }
        }
        Ok(())
    }

    fn geglu(
        &self,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        out: &mut Vec<f32>,
        n: usize,
    ) -> Result<(), DeviceError> {
        need("geglu", gate.len().min(up.len()).min(out.len()), n)?;
        for ((o, g), u) in out.iter_mut().zip(&gate[..n]).zip(&up[..n]) {
            *o = crate::ops::gelu_tanh(*g) * u;
        }
        Ok(())
    }

    fn embed_bf16(
        &self,
        table: &Vec<u16>,
        ids: &Vec<i32>,
        out: &mut Vec<f32>,
        (tokens, dim): (usize, usize),
        scale: f32,
    ) -> Result<(), DeviceError> {
        need("embed", out.len(), tokens * dim)?;
        for (t, o) in out[..tokens * dim].chunks_mut(dim).enumerate() {
            if ids[t] < 0 {
                // Another rank's vocabulary slice holds this token.
                o.fill(0.0);
                continue;
            }
            let id = usize::try_from(ids[t]).unwrap_or(usize::MAX);
            let row = table
                .get(id * dim..(id + 1) * dim)
                .ok_or(DeviceError::TokenPastTable { id })?;
            for (o, b) in o.iter_mut().zip(row) {
                *o = value(*b) * scale;
            }
        }
        Ok(())
    }

    fn add_in_place(&self, x: &mut Vec<f32>, y: &Vec<f32>, n: usize) -> Result<(), DeviceError> {
        need("add", x.len().min(y.len()), n)?;
        for (a, b) in x.iter_mut().zip(&y[..n]) {
            *a += b;
        }
        Ok(())
    }

    fn scale_in_place(&self, x: &mut Vec<f32>, s: f32, n: usize) -> Result<(), DeviceError> {
        need("scale", x.len(), n)?;
        x[..n].iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn store_kv(
        &self,
        (k, v): (&Vec<f32>, &Vec<f32>),
        (kc, vc): (&mut Vec<f32>, &mut Vec<f32>),
        dest: &Vec<i32>,
        (rows, kv_dim): (usize, usize),
        cache_slots: usize,
    ) -> Result<(), DeviceError> {
        need("store_kv rows", k.len().min(v.len()), rows * kv_dim)?;
        need(
            "store_kv caches",
            kc.len().min(vc.len()),
            cache_slots * kv_dim,
        )?;
        for r in 0..rows {
            let d = usize::try_from(dest[r]).unwrap_or(usize::MAX);
            if d >= cache_slots {
                return Err(DeviceError::SlotPastCache {
                    op: "store_kv",
                    slot: d,
                    slots: cache_slots,
                });
            }
            kc[d * kv_dim..(d + 1) * kv_dim].copy_from_slice(&k[r * kv_dim..(r + 1) * kv_dim]);
            vc[d * kv_dim..(d + 1) * kv_dim].copy_from_slice(&v[r * kv_dim..(r + 1) * kv_dim]);
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        (k, v): (&Vec<f32>, &Vec<f32>),
        out: &mut Vec<f32>,
        (positions, bases): (&Vec<i32>, &Vec<i32>),
        (tokens, heads, hd, kv_dim): AttentionShape,
        group: usize,
        (window, slots): (usize, usize),
    ) -> Result<(), DeviceError> {
        need("attention q", q.len().min(out.len()), tokens * heads * hd)?;
        let mut scores = Vec::new();
        for t in 0..tokens {
            let pos = usize::try_from(positions[t]).unwrap_or(0);
            let base = usize::try_from(bases[t]).unwrap_or(0);
            let first = if window > 0 {
                (pos + 1).saturating_sub(window)
            } else {
                0
            };
            let slot = |p: usize| base + if slots > 0 { p % slots } else { p };
            for h in 0..heads {
                let qh = &q[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                let off = (h / group.max(1)) * hd;
                scores.clear();
                for p in first..=pos {
                    let at = slot(p) * kv_dim + off;
                    let key = k.get(at..at + hd).ok_or(DeviceError::SlotPastCache {
                        op: "attention",
                        slot: slot(p),
                        slots: k.len() / kv_dim.max(1),
                    })?;
                    scores.push(crate::ops::dot(qh, key));
                }
                crate::ops::softmax(&mut scores);
                let o = &mut out[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                o.fill(0.0);
                for (p, w) in (first..=pos).zip(&scores) {
                    let at = slot(p) * kv_dim + off;
                    crate::ops::axpy(o, *w, &v[at..at + hd]);
                }
            }
        }
        Ok(())
    }

    fn argmax_rows(
        &self,
        x: &Vec<f32>,
        (rows, n): (usize, usize),
        out: &mut Vec<i32>,
    ) -> Result<(), DeviceError> {
        need("argmax x", x.len(), rows * n)?;
        need("argmax out", out.len(), rows)?;
        for (o, row) in out.iter_mut().zip(x[..rows * n].chunks(n.max(1))) {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            *o = i32::try_from(best).unwrap_or(i32::MAX);
        }
        Ok(())
    }

    fn gemm_bf16(
        &self,
        w: &Vec<u16>,
        (rows, cols): (usize, usize),
        xs: &Vec<u16>,
        tokens: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), DeviceError> {
        use rayon::prelude::*;
        need("gemm w", w.len(), rows * cols)?;
        need("gemm xs", xs.len(), tokens * cols)?;
        need("gemm out", out.len(), tokens * rows)?;
        let x: Vec<f32> = xs[..tokens * cols].iter().map(|b| value(*b)).collect();
        // Weight-row-major scratch, transposed into `out` below.
        let mut scratch = vec![0f32; rows * tokens];
        scratch
            .par_chunks_mut(tokens.max(1) * 64)
            .enumerate()
            .for_each(|(chunk, outs)| {
                let mut wr = vec![0f32; cols];
                for (i, o) in outs.chunks_mut(tokens.max(1)).enumerate() {
                    let r = chunk * 64 + i;
                    for (d, b) in wr.iter_mut().zip(&w[r * cols..(r + 1) * cols]) {
                        *d = value(*b);
                    }
                    for (t, o) in o.iter_mut().enumerate() {
                        *o = crate::ops::dot(&wr, &x[t * cols..(t + 1) * cols]);
                    }
                }
            });
        for t in 0..tokens {
            for r in 0..rows {
                out[t * rows + r] = scratch[r * tokens + t];
            }
        }
        Ok(())
    }
}
