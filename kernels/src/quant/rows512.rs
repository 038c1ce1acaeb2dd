//! Hand-written AVX-512 row kernels for one token (decoding).
//!
//! A decode step multiplies every weight matrix once with one activation
//! vector, so its speed is how fast the weight bytes stream through the
//! cores. The generic kernels decode each block into a stack buffer and read
//! it back; at two cores that costs more cycles per block than memory needs
//! to deliver it. These decode the small integers straight into registers
//! (sign or zero extension to 16 lanes of i32, converted to f32), multiply
//! with the activations, and fold the block scale in with one FMA, keeping
//! two independent accumulators so consecutive blocks do not wait on each
//! other. Products are the same as the generic kernels' up to f32 rounding
//! order (the tests compare them on random blocks).
//!
//! Only [`super::Kernel::Avx512`] hands these out, after detection saw
//! AVX-512 F/BW/VL, FMA and F16C.

use std::arch::x86_64::{
    __m128i, __m512, __m512i, _MM_HINT_T0, _mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32,
    _mm_loadu_si128, _mm_prefetch, _mm512_add_ps, _mm512_and_si512, _mm512_cvtepi8_epi32,
    _mm512_cvtepi32_ps, _mm512_cvtepu8_epi32, _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_loadu_ps,
    _mm512_mask_or_epi32, _mm512_mul_ps, _mm512_or_si512, _mm512_reduce_add_ps, _mm512_set1_epi32,
    _mm512_set1_ps, _mm512_setzero_ps, _mm512_slli_epi32, _mm512_srli_epi32, _mm512_sub_epi32,
};

/// How far ahead of the block being multiplied the weights are prefetched.
const PREFETCH: usize = 4096;

/// Asks for the cache line [`PREFETCH`] + `at` bytes past the start of
/// `b`: the hardware prefetcher alone leaves the loads waiting at two cores.
#[inline]
#[target_feature(enable = "avx512f")]
fn prefetch(b: &[u8], at: usize) {
    // A hint: it never faults, whatever the address.
    _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(PREFETCH + at).cast());
}

/// The f16 at `b[0..2]` as f32 (one F16C conversion).
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn half(b: &[u8]) -> f32 {
    let bits = i32::from(u16::from_le_bytes([b[0], b[1]]));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// 16 bytes from the start of `b` (which holds at least 16).
#[inline]
#[target_feature(enable = "avx512f")]
fn load16(b: &[u8]) -> __m128i {
    assert!(b.len() >= 16);
    // SAFETY: 16 readable bytes, checked above; unaligned load.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

/// 16 f32 from the start of `x` (which holds at least 16).
#[inline]
#[target_feature(enable = "avx512f")]
fn load_ps(x: &[f32]) -> __m512 {
    assert!(x.len() >= 16);
    // SAFETY: 16 readable f32, checked above; unaligned load.
    unsafe { _mm512_loadu_ps(x.as_ptr()) }
}

/// i32 lanes to f32.
#[inline]
#[target_feature(enable = "avx512f")]
fn float(v: __m512i) -> __m512 {
    _mm512_cvtepi32_ps(v)
}

/// Q8_0: 34-byte blocks of an f16 scale and 32 signed bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn q8_0(bytes: &[u8], x: &[f32]) -> f32 {
    let block = |b: &[u8], xs: &[f32], acc: __m512| {
        let w0 = float(_mm512_cvtepi8_epi32(load16(&b[2..18])));
        let w1 = float(_mm512_cvtepi8_epi32(load16(&b[18..34])));
        let p = _mm512_fmadd_ps(
            w1,
            load_ps(&xs[16..32]),
            _mm512_mul_ps(w0, load_ps(&xs[..16])),
        );
        _mm512_fmadd_ps(_mm512_set1_ps(half(b)), p, acc)
    };
    in_pairs(bytes, 34, x, block)
}

/// Folds the 32-element blocks of `bytes` (`size` bytes each) with `x`
/// through `block`, alternating two accumulators so consecutive blocks do
/// not wait on each other, and prefetching ahead once per pair.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn in_pairs(
    bytes: &[u8],
    size: usize,
    x: &[f32],
    block: impl Fn(&[u8], &[f32], __m512) -> __m512,
) -> f32 {
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for (b, xs) in bytes.chunks_exact(2 * size).zip(x.chunks_exact(64)) {
        prefetch(b, 0);
        a0 = block(&b[..size], &xs[..32], a0);
        a1 = block(&b[size..], &xs[32..], a1);
    }
    let blocks = bytes.len() / size;
    if blocks % 2 == 1 {
        let k = blocks - 1;
        a0 = block(&bytes[size * k..], &x[32 * k..], a0);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

/// Q5_0: 22-byte blocks of an f16 scale, 32 high bits and 16 bytes of
/// nibbles (elements `j` and `j + 16` share byte `j`); values are 5-bit
/// minus 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn q5_0(bytes: &[u8], x: &[f32]) -> f32 {
    let (nibble, bit4, offset) = (
        _mm512_set1_epi32(0x0f),
        _mm512_set1_epi32(0x10),
        _mm512_set1_epi32(16),
    );
    let block = |b: &[u8], xs: &[f32], acc: __m512| {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let v = _mm512_cvtepu8_epi32(load16(&b[6..22]));
        let low = _mm512_and_si512(v, nibble);
        let high = _mm512_srli_epi32::<4>(v);
        // Bit j of `qh` is the fifth bit of element j.
        let low = _mm512_mask_or_epi32(low, qh as u16, low, bit4);
        let high = _mm512_mask_or_epi32(high, (qh >> 16) as u16, high, bit4);
        let w0 = float(_mm512_sub_epi32(low, offset));
        let w1 = float(_mm512_sub_epi32(high, offset));
        let p = _mm512_fmadd_ps(
            w1,
            load_ps(&xs[16..32]),
            _mm512_mul_ps(w0, load_ps(&xs[..16])),
        );
        _mm512_fmadd_ps(_mm512_set1_ps(half(b)), p, acc)
    };
    in_pairs(bytes, 22, x, block)
}

/// Q4_K: 144-byte super-blocks of 256 elements: f16 `d` and `dmin`, twelve
/// bytes of 6-bit sub-block scales and mins, 128 bytes of nibbles. Each
/// 32-byte group holds two sub-blocks (low nibbles, then high nibbles);
/// `Σ (d·sc·q − dmin·m)·x = d·sc·Σ q·x − dmin·m·Σ x`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn q4_k(bytes: &[u8], x: &[f32]) -> f32 {
    let nibble = _mm512_set1_epi32(0x0f);
    let mut acc = [_mm512_setzero_ps(); 2];
    for (b, xs) in bytes.chunks_exact(144).zip(x.chunks_exact(256)) {
        for at in [0, 64, 128] {
            prefetch(b, at);
        }
        let (d, dmin) = (half(&b[0..2]), half(&b[2..4]));
        let scales = &b[4..16];
        let qs = &b[16..144];
        for chunk in 0..4 {
            let (sc1, m1) = super::scale_min_k4(2 * chunk, scales);
            let (sc2, m2) = super::scale_min_k4(2 * chunk + 1, scales);
            let q = &qs[32 * chunk..32 * chunk + 32];
            let xs = &xs[64 * chunk..64 * chunk + 64];
            let v0 = _mm512_cvtepu8_epi32(load16(&q[..16]));
            let v1 = _mm512_cvtepu8_epi32(load16(&q[16..32]));
            let (x0, x1, x2, x3) = (
                load_ps(&xs[..16]),
                load_ps(&xs[16..32]),
                load_ps(&xs[32..48]),
                load_ps(&xs[48..64]),
            );
            let lo = _mm512_fmadd_ps(
                float(_mm512_and_si512(v1, nibble)),
                x1,
                _mm512_mul_ps(float(_mm512_and_si512(v0, nibble)), x0),
            );
            let hi = _mm512_fmadd_ps(
                float(_mm512_srli_epi32::<4>(v1)),
                x3,
                _mm512_mul_ps(float(_mm512_srli_epi32::<4>(v0)), x2),
            );
            let a = &mut acc[chunk & 1];
            *a = _mm512_fmadd_ps(_mm512_set1_ps(d * f32::from(sc1)), lo, *a);
            *a = _mm512_fnmadd_ps(
                _mm512_set1_ps(dmin * f32::from(m1)),
                _mm512_add_ps(x0, x1),
                *a,
            );
            *a = _mm512_fmadd_ps(_mm512_set1_ps(d * f32::from(sc2)), hi, *a);
            *a = _mm512_fnmadd_ps(
                _mm512_set1_ps(dmin * f32::from(m2)),
                _mm512_add_ps(x2, x3),
                *a,
            );
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// Q6_K: 210-byte super-blocks of 256 elements: 128 bytes of low nibbles,
/// 64 bytes of high bit pairs, 16 signed sub-block scales, f16 `d`. Values
/// are 6-bit minus 32; each half (128 elements) is four runs of 32 that
/// share the bytes at the same offsets.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn q6_k(bytes: &[u8], x: &[f32]) -> f32 {
    let (nibble, pair, offset) = (
        _mm512_set1_epi32(0x0f),
        _mm512_set1_epi32(3),
        _mm512_set1_epi32(32),
    );
    let mut acc = [_mm512_setzero_ps(); 2];
    for (b, xs) in bytes.chunks_exact(210).zip(x.chunks_exact(256)) {
        for at in [0, 64, 128, 192] {
            prefetch(b, at);
        }
        let d = half(&b[208..210]);
        for h in 0..2 {
            let ql = &b[64 * h..64 * h + 64];
            let qh = &b[128 + 32 * h..128 + 32 * h + 32];
            let sc = &b[192 + 8 * h..192 + 8 * h + 8];
            let xs = &xs[128 * h..128 * h + 128];
            for g in 0..2 {
                let l = 16 * g;
                let a = _mm512_cvtepu8_epi32(load16(&ql[l..l + 16]));
                let c = _mm512_cvtepu8_epi32(load16(&ql[l + 32..l + 48]));
                let hb = _mm512_cvtepu8_epi32(load16(&qh[l..l + 16]));
                let high = |shift: u32| {
                    let bits = match shift {
                        0 => hb,
                        2 => _mm512_srli_epi32::<2>(hb),
                        4 => _mm512_srli_epi32::<4>(hb),
                        _ => _mm512_srli_epi32::<6>(hb),
                    };
                    _mm512_slli_epi32::<4>(_mm512_and_si512(bits, pair))
                };
                let runs = [
                    (_mm512_and_si512(a, nibble), high(0)),
                    (_mm512_and_si512(c, nibble), high(2)),
                    (_mm512_srli_epi32::<4>(a), high(4)),
                    (_mm512_srli_epi32::<4>(c), high(6)),
                ];
                for (run, (low, high)) in runs.into_iter().enumerate() {
                    let q = _mm512_sub_epi32(_mm512_or_si512(low, high), offset);
                    let p = _mm512_mul_ps(float(q), load_ps(&xs[32 * run + l..32 * run + l + 16]));
                    let s = d * f32::from(sc[g + 2 * run] as i8);
                    acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(s), p, acc[g]);
                }
            }
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}
