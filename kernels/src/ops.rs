//! CPU ops on f32 activations: the building blocks of a transformer layer.
//!
//! Each op is a plain function over slices, written the straightforward way
//! and tested against a float64 recomputation; the matrix-vector product over
//! quantized weights lives in [`crate::quant::QMatrix`].

/// RMSNorm: `out[i] = x[i] / sqrt(mean(x²) + eps) * weight[i]`, in f32.
///
/// Gemma's `(1 + w)` convention is the caller's: GGUF files store `1 + w`
/// already (llama.cpp's converter adds it), Hugging Face checkpoints store `w`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// [`rms_norm`] in place.
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v *= scale * w;
    }
}

/// Rotary position embedding, "NeoX" layout (HF `rotate_half`): element `i`
/// of the first half pairs with element `i + d/2`. `position` is already
/// divided by any linear scaling factor.
pub fn rope_neox(head: &mut [f32], position: f32, base: f32) {
    let half = head.len() / 2;
    let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
    rope_angles(position, base, head.len(), &mut cos, &mut sin);
    rope_neox_with(head, &cos, &sin);
}

/// The cosines and sines [`rope_neox`] rotates a head of `dim` elements by
/// at `position`: computed once per token, applied to each of its heads
/// with [`rope_neox_with`] (the same values, bit for bit).
pub fn rope_angles(position: f32, base: f32, dim: usize, cos: &mut [f32], sin: &mut [f32]) {
    let d = dim as f32;
    for (i, (c, s)) in cos.iter_mut().zip(sin.iter_mut()).enumerate() {
        let inv_freq = base.powf(-((2 * i) as f32) / d);
        (*s, *c) = (position * inv_freq).sin_cos();
    }
}

/// [`rope_neox`] with angles from [`rope_angles`] (`head.len() / 2` each).
pub fn rope_neox_with(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (first, second) = head.split_at_mut(half);
    for (((a, b), c), s) in first.iter_mut().zip(second.iter_mut()).zip(cos).zip(sin) {
        let (x, y) = (*a, *b);
        *a = x * c - y * s;
        *b = y * c + x * s;
    }
}

/// `Σ a[i]·b[i]` over 16 independent lanes, so the loop vectorizes (a
/// single running sum would force the additions into sequence). Always
/// inlined, so the quantized row kernels get it compiled for their
/// instruction set.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut a16 = a.chunks_exact(16);
    let mut b16 = b.chunks_exact(16);
    for (x, y) in (&mut a16).zip(&mut b16) {
        let (Ok(x), Ok(y)) = (<&[f32; 16]>::try_from(x), <&[f32; 16]>::try_from(y)) else {
            continue;
        };
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// [`dot`] over four independent groups of 16 lanes: four running sums
/// per lane instead of one, so a long product (a 256-wide attention head)
/// does not wait on one chain of additions.
#[inline(always)]
fn dot_wide<const F: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [[0f32; 16]; 4];
    let mut a64 = a.chunks_exact(64);
    let mut b64 = b.chunks_exact(64);
    for (x, y) in (&mut a64).zip(&mut b64) {
        for (lanes, (x, y)) in acc
            .iter_mut()
            .zip(x.chunks_exact(16).zip(y.chunks_exact(16)))
        {
            let (Ok(x), Ok(y)) = (<&[f32; 16]>::try_from(x), <&[f32; 16]>::try_from(y)) else {
                continue;
            };
            for l in 0..16 {
                lanes[l] = mul_add::<F>(x[l], y[l], lanes[l]);
            }
        }
    }
    // Lane-wise, then halving: a tree the compiler keeps in vector
    // registers (a plain `sum()` is 64 additions in sequence).
    let mut lanes = [0f32; 16];
    for l in 0..16 {
        lanes[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    for width in [8, 4, 2, 1] {
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0] + dot(a64.remainder(), b64.remainder())
}

/// `out += weight · v`.
#[inline]
pub fn axpy(out: &mut [f32], weight: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += weight * x;
    }
}

/// Softmax in place, numerically stable.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// GELU, tanh approximation (PyTorch's `gelu(approximate="tanh")`).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
}

/// `e^z` for |z| ≤ 30: `z = n·ln 2 + r` with |r| ≤ ln 2 / 2, `e^r` by its
/// Taylor polynomial of degree 7 (relative error below 2e-8 there),
/// `2^n` built from its exponent bits. Plain arithmetic, no library call,
/// so loops over it vectorize.
#[inline]
pub fn exp_small(z: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: n · LN2_HI is exact for |n| < 2^11.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let n = (z * LOG2E + SHIFT) - SHIFT;
    let r = (z - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `tanh(y)` as `1 − 2 / (e^{2y} + 1)` through [`exp_small`] (|y| clamped
/// to 15, where tanh is ±1 in f32): absolute error below 3e-7, and no
/// library call, so the MLP's GELU loop vectorizes.
#[inline]
pub fn tanh(y: f32) -> f32 {
    let e = exp_small((2.0 * y).clamp(-30.0, 30.0));
    1.0 - 2.0 / (e + 1.0)
}

/// Attention of the query heads that share one KV head (grouped-query
/// attention) over `positions`: per head, scores `q·k_p` (the queries are
/// already scaled), a numerically stable softmax, then `out = Σ_p w_p · v_p`.
/// `qs` and `out` hold the heads back to back, `head_dim` each; `kv(p)`
/// gives position `p`'s key and value of the shared KV head; `scores` is
/// scratch. Each key and value is read once for all the heads.
///
/// Compiled for each [`Kernel`](crate::cpu::Kernel) variant and chosen at
/// run time, like the row kernels: the products are the same up to f32
/// rounding order. The exponentials are [`exp_small`] with the exponent
/// clamped at −30 (e^−30 ≈ 1e-13 of the largest weight, below f32's
/// resolution of a sum that includes 1).
pub fn attend_heads<'a>(
    qs: &[f32],
    head_dim: usize,
    positions: std::ops::RangeInclusive<usize>,
    kv: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    use crate::cpu::Kernel;
    match Kernel::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` returned Avx512 only after finding these features.
        Kernel::Avx512 => unsafe { x86::attend_avx512(qs, head_dim, positions, kv, scores, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` returned Avx2 only after finding these features.
        Kernel::Avx2 => unsafe { x86::attend_avx2(qs, head_dim, positions, kv, scores, out) },
        _ => attend_body::<false>(qs, head_dim, positions, kv, scores, out),
    }
}

/// `a·b + c`, fused where the variant has FMA (`F`): Rust never fuses a
/// multiply and an add on its own.
#[inline(always)]
fn mul_add<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F { a.mul_add(b, c) } else { a * b + c }
}

/// [`attend_heads`]' body; `F`: the variant has FMA.
#[inline(always)]
fn attend_body<'a, const F: bool>(
    qs: &[f32],
    head_dim: usize,
    positions: std::ops::RangeInclusive<usize>,
    kv: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let heads = qs.len() / head_dim.max(1);
    let rows: Vec<(&[f32], &[f32])> = positions.map(kv).collect();
    let n = rows.len();
    scores.clear();
    scores.resize(heads * n, 0.0);
    for (i, (k, _)) in rows.iter().enumerate() {
        for (h, q) in qs.chunks_exact(head_dim).enumerate() {
            scores[h * n + i] = dot_wide::<F>(q, k);
        }
    }
    softmax_rows(scores, n);
    match heads {
        1 if head_dim.is_multiple_of(16) => values::<1, F>(head_dim, &rows, scores, out),
        2 if head_dim.is_multiple_of(16) => values::<2, F>(head_dim, &rows, scores, out),
        4 if head_dim.is_multiple_of(16) => values::<4, F>(head_dim, &rows, scores, out),
        _ => {
            out.fill(0.0);
            for (i, (_, v)) in rows.iter().enumerate() {
                for (h, o) in out.chunks_exact_mut(head_dim).enumerate() {
                    let w = scores[h * n + i];
                    for (o, x) in o.iter_mut().zip(v.iter()) {
                        *o = mul_add::<F>(w, *x, *o);
                    }
                }
            }
        }
    }
}

/// Each row of `n` attention scores (one per head) into its softmax
/// weights, through [`exp_small`] (scores more than 30 below the row's
/// largest count as 30 below).
#[inline(always)]
fn softmax_rows(scores: &mut [f32], n: usize) {
    for row in scores.chunks_exact_mut(n.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in row.iter_mut() {
            *s = exp_small((*s - max).max(-30.0));
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

/// `out[h] = Σ_i weights[h][i] · v_i` for `H` heads (1, 2 or 4) sharing
/// the values, 16 columns at a time: each head's sums for those columns
/// are a named local (so they stay in registers across every position;
/// as an array indexed by head the compiler split the loop per head),
/// and each value chunk is read once for all the heads.
#[inline(always)]
fn values<const H: usize, const F: bool>(
    head_dim: usize,
    rows: &[(&[f32], &[f32])],
    weights: &[f32],
    out: &mut [f32],
) {
    let n = rows.len();
    let lane = |acc: &mut [f32; 16], w: f32, v: &[f32; 16]| {
        for l in 0..16 {
            acc[l] = mul_add::<F>(w, v[l], acc[l]);
        }
    };
    for j in (0..head_dim).step_by(16) {
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
        for (i, (_, v)) in rows.iter().enumerate() {
            let Ok(v) = <&[f32; 16]>::try_from(&v[j..j + 16]) else {
                continue;
            };
            lane(&mut a0, weights[i], v);
            if H >= 2 {
                lane(&mut a1, weights[n + i], v);
            }
            if H >= 4 {
                lane(&mut a2, weights[2 * n + i], v);
                lane(&mut a3, weights[3 * n + i], v);
            }
        }
        for (h, acc) in [a0, a1, a2, a3].iter().enumerate().take(H) {
            out[h * head_dim + j..h * head_dim + j + 16].copy_from_slice(acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! [`super::attend_body`] compiled with wider instruction sets.
    use super::attend_body;
    use std::ops::RangeInclusive;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_avx2<'a>(
        qs: &[f32],
        head_dim: usize,
        positions: RangeInclusive<usize>,
        kv: impl Fn(usize) -> (&'a [f32], &'a [f32]),
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        attend_body::<true>(qs, head_dim, positions, kv, scores, out)
    }

    /// [`attend_body`] on AVX-512; with 2 or 4 query heads per KV head
    /// and a head size that is a multiple of 16 · 16 / heads (Gemma 3's
    /// 256 always is), the register-blocked passes below instead.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn attend_avx512<'a>(
        qs: &[f32],
        head_dim: usize,
        positions: RangeInclusive<usize>,
        kv: impl Fn(usize) -> (&'a [f32], &'a [f32]),
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let heads = qs.len() / head_dim.max(1);
        let blocked = |h: usize| heads == h && head_dim.is_multiple_of(256 / h);
        // SAFETY: the caller saw AVX-512 (F, BW, VL) and FMA.
        unsafe {
            if blocked(4) {
                attend_blocked::<4>(qs, head_dim, positions, kv, scores, out)
            } else if blocked(2) {
                attend_blocked::<2>(qs, head_dim, positions, kv, scores, out)
            } else {
                attend_body::<true>(qs, head_dim, positions, kv, scores, out)
            }
        }
    }

    /// Attention for `H` query heads sharing one KV head, every product
    /// register-blocked so a vector load feeds two or more FMAs:
    /// - scores: `16 / H` keys × `H` heads at a time, 16 sums in 16
    ///   registers over the head's 16-wide chunks (each key and query chunk
    ///   loaded once for all of them), then one transposing reduction of
    ///   the 16 registers into their 16 totals;
    /// - softmax per head, as [`attend_body`];
    /// - values: `16 / H` chunks of 16 columns × `H` heads at a time in 16
    ///   registers, each value chunk loaded once for every head.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW, VL) and FMA; `head_dim` is a multiple
    /// of `256 / H` and `qs` holds `H` heads.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn attend_blocked<'a, const H: usize>(
        qs: &[f32],
        head_dim: usize,
        positions: RangeInclusive<usize>,
        kv: impl Fn(usize) -> (&'a [f32], &'a [f32]),
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::{
            __m512, _mm512_add_ps, _mm512_castpd_ps, _mm512_castps_pd, _mm512_fmadd_ps,
            _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_shuffle_f32x4,
            _mm512_storeu_ps, _mm512_unpackhi_pd, _mm512_unpackhi_ps, _mm512_unpacklo_pd,
            _mm512_unpacklo_ps,
        };
        // Keys per score tile, and 16-column chunks per value tile.
        let keys_per: usize = 16 / H;
        assert!(qs.len() == H * head_dim && out.len() == H * head_dim);
        assert!(head_dim.is_multiple_of(16 * keys_per));
        let rows: Vec<(&[f32], &[f32])> = positions.map(kv).collect();
        let n = rows.len();
        assert!(
            rows.iter()
                .all(|(k, v)| k.len() == head_dim && v.len() == head_dim)
        );
        scores.clear();
        scores.resize(H * n, 0.0);
        // SAFETY: (the whole body) every load reads 16 floats at offsets
        // below `head_dim` of a key, value or query row (all `head_dim`
        // long, checked above), and every store writes within `out` (H ·
        // head_dim, checked) or a local array.
        unsafe {
            // 16 registers → their 16 totals. Lane 4a + b of the result is
            // the total of register 4b + a.
            let reduce = |x: [__m512; 16]| -> [f32; 16] {
                let mut v = [_mm512_setzero_ps(); 8];
                for (i, v) in v.iter_mut().enumerate() {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    *v = _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                        _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
                    );
                }
                let mut w = [_mm512_setzero_ps(); 4];
                for (i, w) in w.iter_mut().enumerate() {
                    let (a, b) = (v[2 * i], v[2 * i + 1]);
                    *w = _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                        _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
                    );
                }
                let t0 = _mm512_add_ps(
                    _mm512_unpacklo_ps(w[0], w[1]),
                    _mm512_unpackhi_ps(w[0], w[1]),
                );
                let t1 = _mm512_add_ps(
                    _mm512_unpacklo_ps(w[2], w[3]),
                    _mm512_unpackhi_ps(w[2], w[3]),
                );
                let r = _mm512_add_ps(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(
                        _mm512_castps_pd(t0),
                        _mm512_castps_pd(t1),
                    )),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(
                        _mm512_castps_pd(t0),
                        _mm512_castps_pd(t1),
                    )),
                );
                let mut lanes = [0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), r);
                lanes
            };
            let full = n - n % keys_per;
            for i0 in (0..full).step_by(keys_per) {
                // Register 4b + a ... in order h · keys_per + j.
                let mut acc = [_mm512_setzero_ps(); 16];
                for d in (0..head_dim).step_by(16) {
                    let mut k = [_mm512_setzero_ps(); 16];
                    for (j, k) in k.iter_mut().enumerate().take(keys_per) {
                        *k = _mm512_loadu_ps(rows[i0 + j].0.as_ptr().add(d));
                    }
                    for h in 0..H {
                        let q = _mm512_loadu_ps(qs.as_ptr().add(h * head_dim + d));
                        let sums = &mut acc[h * keys_per..(h + 1) * keys_per];
                        for (a, k) in sums.iter_mut().zip(&k) {
                            *a = _mm512_fmadd_ps(q, *k, *a);
                        }
                    }
                }
                let lanes = reduce(acc);
                for (lane, total) in lanes.iter().enumerate() {
                    let x = 4 * (lane % 4) + lane / 4;
                    let (h, j) = (x / keys_per, x % keys_per);
                    scores[h * n + i0 + j] = *total;
                }
            }
            for (i, (k, _)) in rows.iter().enumerate().skip(full) {
                for (h, q) in qs.chunks_exact(head_dim).enumerate() {
                    scores[h * n + i] = super::dot_wide::<true>(q, k);
                }
            }
            super::softmax_rows(scores, n);
            let chunks = keys_per;
            for c0 in (0..head_dim).step_by(16 * chunks) {
                let mut acc = [_mm512_setzero_ps(); 16];
                for (i, (_, v)) in rows.iter().enumerate() {
                    let mut x = [_mm512_setzero_ps(); 16];
                    for (c, x) in x.iter_mut().enumerate().take(chunks) {
                        *x = _mm512_loadu_ps(v.as_ptr().add(c0 + 16 * c));
                    }
                    for h in 0..H {
                        let w = _mm512_set1_ps(*scores.get_unchecked(h * n + i));
                        let sums = &mut acc[h * chunks..(h + 1) * chunks];
                        for (a, x) in sums.iter_mut().zip(&x) {
                            *a = _mm512_fmadd_ps(w, *x, *a);
                        }
                    }
                }
                for h in 0..H {
                    for c in 0..chunks {
                        _mm512_storeu_ps(
                            out.as_mut_ptr().add(h * head_dim + c0 + 16 * c),
                            acc[h * chunks + c],
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant of [`attend_heads`] against a float64 recomputation,
    /// for one to four query heads sharing one KV head (1, 2 and 4 take the
    /// register-blocked value pass, 3 the general one).
    #[test]
    fn attention_follows_float64() {
        for heads in 1..=4 {
            for hd in [64, 128] {
                attention_follows_float64_with(heads, hd);
            }
        }
    }

    fn attention_follows_float64_with(heads: usize, hd: usize) {
        let keys: Vec<f32> = (0..40 * hd)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let values: Vec<f32> = (0..40 * hd)
            .map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0)
            .collect();
        let qs: Vec<f32> = (0..heads * hd)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 9.0)
            .collect();
        let (first, last) = (5, 33);
        let kv = |p: usize| (&keys[p * hd..(p + 1) * hd], &values[p * hd..(p + 1) * hd]);
        let mut scratch = Vec::new();
        let mut got = vec![0f32; heads * hd];
        attend_heads(&qs, hd, first..=last, kv, &mut scratch, &mut got);
        let mut portable = vec![0f32; heads * hd];
        attend_body::<false>(&qs, hd, first..=last, kv, &mut scratch, &mut portable);
        for (h, q) in qs.chunks_exact(hd).enumerate() {
            let scores: Vec<f64> = (first..=last)
                .map(|p| {
                    q.iter()
                        .zip(&keys[p * hd..(p + 1) * hd])
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for i in 0..hd {
                let want: f64 = (first..=last)
                    .zip(&weights)
                    .map(|(p, w)| w / total * f64::from(values[p * hd + i]))
                    .sum();
                for (name, v) in [
                    ("detected", got[h * hd + i]),
                    ("portable", portable[h * hd + i]),
                ] {
                    assert!(
                        (f64::from(v) - want).abs() < 1e-5,
                        "{name}, {heads} heads: head {h} element {i}: {v} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn tanh_and_exp_follow_float64() {
        let mut worst_tanh = 0f64;
        let mut worst_exp = 0f64;
        for i in -200_000..=200_000 {
            let y = i as f32 * 1e-4; // -20 .. 20
            let want = f64::from(y).tanh();
            worst_tanh = worst_tanh.max((f64::from(tanh(y)) - want).abs());
            let z = (y * 1.5).clamp(-30.0, 30.0);
            let e = f64::from(z).exp();
            worst_exp = worst_exp.max((f64::from(exp_small(z)) - e).abs() / e);
        }
        assert!(worst_tanh < 3e-7, "tanh is {worst_tanh} off");
        assert!(worst_exp < 3e-7, "exp is {worst_exp} off (relative)");
        // GELU near its tails and at zero.
        assert_eq!(gelu_tanh(0.0), 0.0);
        assert!((gelu_tanh(-10.0)).abs() < 1e-6);
        assert!((gelu_tanh(10.0) - 10.0).abs() < 1e-5);
    }

    #[test]
    fn rms_norm_matches_float64() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 0.5, 2.0, 1.5];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-6, &mut out);
        let ms: f64 = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 4.0;
        for i in 0..4 {
            let want = f64::from(x[i]) / (ms + 1e-6).sqrt() * f64::from(w[i]);
            assert!((f64::from(out[i]) - want).abs() < 1e-6, "{i}");
        }
        let mut y = x;
        rms_norm_in_place(&mut y, &w, 1e-6);
        assert_eq!(y, out);
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        let mut head = [1.0f32, 0.0, 0.0, 1.0];
        rope_neox(&mut head, 0.0, 10_000.0);
        assert_eq!(head, [1.0, 0.0, 0.0, 1.0], "position 0 is the identity");
        let mut head = [1.0f32, 2.0, 3.0, 4.0];
        rope_neox(&mut head, 3.0, 100.0);
        // Pair (0, 2) turns by 3 rad; pair (1, 3) by 3 / 100^(2/4) = 0.3 rad.
        let (s0, c0) = 3.0f64.sin_cos();
        let (s1, c1) = 0.3f64.sin_cos();
        let want = [
            1.0 * c0 - 3.0 * s0,
            2.0 * c1 - 4.0 * s1,
            3.0 * c0 + 1.0 * s0,
            4.0 * c1 + 2.0 * s1,
        ];
        for i in 0..4 {
            assert!(
                (f64::from(head[i]) - want[i]).abs() < 1e-5,
                "{i}: {} vs {}",
                head[i],
                want[i]
            );
        }
        let norm: f32 = head.iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4, "rotation keeps the norm");
    }

    #[test]
    fn dot_and_axpy() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.01).collect();
        let want: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-3);
        let mut out = vec![1.0f32; 3];
        axpy(&mut out, 2.0, &[1.0, 2.0, 3.0]);
        assert_eq!(out, [3.0, 5.0, 7.0]);
    }

    #[test]
    fn softmax_and_gelu() {
        let mut x = [1.0f32, 2.0, 3.0, 1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[3] > 0.999);
        // Reference values of PyTorch's tanh-approximate GELU.
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_tanh(-2.0) - (-0.045_402_3)).abs() < 1e-5);
        assert_eq!(gelu_tanh(0.0), 0.0);
    }
}
