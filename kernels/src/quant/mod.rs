//! GGML block formats: decoding and dot products that work on the blocks.
//!
//! A quantized weight row is a run of blocks; [`dequantize_row`] expands one
//! into f32 and [`dot_row`] multiplies one with an f32 activation vector
//! without expanding it first, so a matrix-vector product never needs the
//! dequantized matrix. The layouts follow ggml's `block_q8_0`, `block_q5_0`,
//! `block_q4_K` and `block_q6_K` exactly (little-endian, f16 scales); the
//! tests check every type against values produced by the `gguf` Python
//! package's own decoder (`scripts/reference/quant_fixture.py`).

use half::{bf16, f16};

pub use crate::cpu::Kernel;
use crate::gguf::GgmlType;

/// Why a row could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    /// The type has a layout but no decoder here yet.
    #[error(
        "tensor type {0} is not supported for compute (supported: f32, f16, bf16, q8_0, q5_0, q4_K, q6_K)"
    )]
    Unsupported(GgmlType),
    /// A safetensors dtype with no counterpart here (I64, F8_E4M3 …).
    #[error("dtype {0} is not supported for compute (supported: F32, F16, BF16)")]
    UnsupportedDtype(String),
    /// The element count is not a whole number of blocks.
    #[error("{elements} elements are not a whole number of {ggml_type} blocks of {block}")]
    PartialBlock {
        /// The type.
        ggml_type: GgmlType,
        /// Elements requested.
        elements: usize,
        /// Elements per block.
        block: usize,
    },
    /// The byte length does not match the element count.
    #[error("{ggml_type} row of {elements} elements needs {expected} bytes, got {got}")]
    Length {
        /// The type.
        ggml_type: GgmlType,
        /// Elements requested.
        elements: usize,
        /// Bytes that many elements take.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
}

/// Whether [`dequantize_row`] and [`dot_row`] handle `t`.
pub fn is_supported(t: GgmlType) -> bool {
    matches!(
        t,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q8_0
            | GgmlType::Q5_0
            | GgmlType::Q4K
            | GgmlType::Q6K
    )
}

fn check(t: GgmlType, bytes: &[u8], elements: usize) -> Result<(), QuantError> {
    if !is_supported(t) {
        return Err(QuantError::Unsupported(t));
    }
    let Some(expected) = t.bytes_for(elements as u64).map(|b| b as usize) else {
        return Err(QuantError::PartialBlock {
            ggml_type: t,
            elements,
            block: t.block_elements(),
        });
    };
    if expected != bytes.len() {
        return Err(QuantError::Length {
            ggml_type: t,
            elements,
            expected,
            got: bytes.len(),
        });
    }
    Ok(())
}

/// An f16 scale as f32. `to_f32_const` is plain inlinable code; the runtime
/// dispatch behind `to_f32` costs more than the conversion, once per block.
#[inline(always)]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32_const()
}

/// Decodes one Q8_0 block (34 bytes) into 32 values.
#[inline(always)]
fn block_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, q) in out.iter_mut().zip(&b[2..34]) {
        *o = d * f32::from(*q as i8);
    }
}

/// Decodes one Q5_0 block (22 bytes) into 32 values.
#[inline(always)]
pub(crate) fn block_q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let high0 = ((qh >> j) << 4) & 0x10;
        let high1 = (qh >> (j + 12)) & 0x10;
        let x0 = ((u32::from(qs[j]) & 0x0f) | high0) as i32 - 16;
        let x1 = ((u32::from(qs[j]) >> 4) | high1) as i32 - 16;
        out[j] = d * x0 as f32;
        out[j + 16] = d * x1 as f32;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes one Q4_K super-block (144 bytes) into 256 values.
#[inline(always)]
fn block_q4_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let q = &qs[32 * chunk..32 * chunk + 32];
        let o = &mut out[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            o[l] = d1 * f32::from(q[l] & 0x0f) - min1;
            o[l + 32] = d2 * f32::from(q[l] >> 4) - min2;
        }
    }
}

/// Decodes one Q6_K super-block (210 bytes) into 256 values.
#[inline(always)]
pub(crate) fn block_q6_k(b: &[u8], out: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let sc = &sc_all[8 * half..8 * half + 8];
        let o = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            o[l] = d * f32::from(sc[is] as i8) * q1 as f32;
            o[l + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
            o[l + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
            o[l + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
        }
    }
}

/// Decodes a row of `out.len()` elements of type `t` from `bytes`.
pub fn dequantize_row(t: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    check(t, bytes, out.len())?;
    let block = t.block_bytes();
    let n = t.block_elements();
    let blocks = bytes.chunks_exact(block).zip(out.chunks_exact_mut(n));
    match t {
        GgmlType::F32 => {
            blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::BF16 => {
            blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| block_q8_0(b, o)),
        GgmlType::Q5_0 => blocks.for_each(|(b, o)| block_q5_0(b, o)),
        GgmlType::Q4K => blocks.for_each(|(b, o)| block_q4_k(b, o)),
        GgmlType::Q6K => blocks.for_each(|(b, o)| block_q6_k(b, o)),
        other => return Err(QuantError::Unsupported(other)),
    }
    Ok(())
}

/// `acc[l] += a[i]·b[i]` over 16 lanes (`l = i mod 16`): 16 independent
/// partial sums let the compiler use whole vector registers, where a single
/// running sum would force every addition into sequence.
#[inline(always)]
fn accumulate(acc: &mut [f32; 16], a: &[f32], b: &[f32]) {
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        // Fixed-size arrays: no bounds checks inside, so the loop vectorizes.
        let (Ok(x), Ok(y)) = (<&[f32; 16]>::try_from(x), <&[f32; 16]>::try_from(y)) else {
            continue;
        };
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
}

/// A block format: how many bytes and elements a block has, and how to
/// decode one (scales applied) into f32.
trait Block {
    const BYTES: usize;
    const ELEMENTS: usize;
    fn decode(bytes: &[u8], out: &mut [f32]);
}

struct Q8_0;
struct Q5_0;
struct Q4K;
struct Q6K;

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const ELEMENTS: usize = 32;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        block_q8_0(bytes, out);
    }
}
impl Block for Q5_0 {
    const BYTES: usize = 22;
    const ELEMENTS: usize = 32;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        block_q5_0(bytes, out);
    }
}
impl Block for Q4K {
    const BYTES: usize = 144;
    const ELEMENTS: usize = 256;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        block_q4_k(bytes, out);
    }
}
impl Block for Q6K {
    const BYTES: usize = 210;
    const ELEMENTS: usize = 256;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        block_q6_k(bytes, out);
    }
}

/// Multiplies the blocks of `bytes` with `x`: each block is decoded into a
/// stack buffer and folded into 16 running lanes; one horizontal sum per row.
#[inline(always)]
fn dot_blocks<B: Block>(bytes: &[u8], x: &[f32]) -> f32 {
    let mut buf = [0f32; 256];
    let mut acc = [0f32; 16];
    for (b, xs) in bytes
        .chunks_exact(B::BYTES)
        .zip(x.chunks_exact(B::ELEMENTS))
    {
        B::decode(b, &mut buf[..B::ELEMENTS]);
        accumulate(&mut acc, &buf[..B::ELEMENTS], xs);
    }
    acc.iter().sum()
}

/// Most activation rows [`QMatrix::matmul`] multiplies per pass.
pub const MAX_BATCH: usize = 32;

/// One weight row times `n` activation rows (`xs`, row-major, `cols` each):
/// every block is decoded once and folded into each row's 16 lanes.
#[inline(always)]
fn dot_blocks_batch<B: Block>(bytes: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
    let n = out.len();
    let mut buf = [0f32; 256];
    let mut acc = [[0f32; 16]; MAX_BATCH];
    for (k, b) in bytes.chunks_exact(B::BYTES).enumerate() {
        B::decode(b, &mut buf[..B::ELEMENTS]);
        let at = k * B::ELEMENTS;
        for (t, lanes) in acc.iter_mut().enumerate().take(n) {
            accumulate(
                lanes,
                &buf[..B::ELEMENTS],
                &xs[t * cols + at..t * cols + at + B::ELEMENTS],
            );
        }
    }
    for (o, lanes) in out.iter_mut().zip(&acc) {
        *o = lanes.iter().sum();
    }
}

/// The batched row kernel without checks (`out.len()` rows of `xs`, at most [`MAX_BATCH`]).
#[inline(always)]
fn dot_batch_unchecked(t: GgmlType, bytes: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
    match t {
        GgmlType::Q8_0 => dot_blocks_batch::<Q8_0>(bytes, xs, cols, out),
        GgmlType::Q5_0 => dot_blocks_batch::<Q5_0>(bytes, xs, cols, out),
        GgmlType::Q4K => dot_blocks_batch::<Q4K>(bytes, xs, cols, out),
        GgmlType::Q6K => dot_blocks_batch::<Q6K>(bytes, xs, cols, out),
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = dot_unchecked(t, bytes, &xs[i * cols..(i + 1) * cols]);
            }
        }
    }
}

/// Two-byte element types, 256 at a time through the vector dot.
#[inline(always)]
fn dot_halves(bytes: &[u8], x: &[f32], decode: fn([u8; 2]) -> f32) -> f32 {
    let mut buf = [0f32; 256];
    let mut sum = 0.0;
    for (b, xs) in bytes.chunks(512).zip(x.chunks(256)) {
        for (o, w) in buf.iter_mut().zip(b.chunks_exact(2)) {
            *o = decode([w[0], w[1]]);
        }
        sum += crate::ops::dot(&buf[..xs.len()], xs);
    }
    sum
}

/// The row kernel without checks: `bytes` holds `x.len()` elements of `t`.
#[inline(always)]
fn dot_unchecked(t: GgmlType, bytes: &[u8], x: &[f32]) -> f32 {
    match t {
        GgmlType::F32 => {
            let mut buf = [0f32; 256];
            let mut sum = 0.0;
            for (b, xs) in bytes.chunks(1024).zip(x.chunks(256)) {
                for (o, w) in buf.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                }
                sum += crate::ops::dot(&buf[..xs.len()], xs);
            }
            sum
        }
        GgmlType::F16 => dot_halves(bytes, x, |b| f16::from_le_bytes(b).to_f32_const()),
        GgmlType::BF16 => dot_halves(bytes, x, |b| bf16::from_le_bytes(b).to_f32_const()),
        GgmlType::Q8_0 => dot_blocks::<Q8_0>(bytes, x),
        GgmlType::Q5_0 => dot_blocks::<Q5_0>(bytes, x),
        GgmlType::Q4K => dot_blocks::<Q4K>(bytes, x),
        GgmlType::Q6K => dot_blocks::<Q6K>(bytes, x),
        // `check` admits only the types above.
        _ => f32::NAN,
    }
}

impl Kernel {
    /// The batched row kernel compiled for this variant.
    pub fn dot_batch(self) -> fn(GgmlType, &[u8], &[f32], usize, &mut [f32]) {
        match self {
            Self::Portable => dot_batch_unchecked,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => x86::dot_batch_avx2,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => x86::dot_batch_avx512,
            #[cfg(not(target_arch = "x86_64"))]
            _ => dot_batch_unchecked,
        }
    }

    /// The row dot product compiled for this variant.
    pub fn dot(self) -> fn(GgmlType, &[u8], &[f32]) -> f32 {
        match self {
            Self::Portable => dot_unchecked,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => x86::dot_avx2,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => x86::dot_avx512,
            #[cfg(not(target_arch = "x86_64"))]
            _ => dot_unchecked,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod rows512;
#[cfg(target_arch = "x86_64")]
pub mod tiles;
#[cfg(target_arch = "x86_64")]
mod vnni;

/// Activation parts of the VNNI path (`vnni`): 2 gives about 15 bits per
/// activation, 3 about 23 (as the tiles).
pub const VNNI_PARTS: usize = 3;

/// Activation parts of the plain AVX2 int8 path ([`Int8::parts`]).
pub const AVX2_PARTS: usize = 2;

/// The int8 path products of two or more tokens take (chosen once per
/// process): the AMX tiles, AVX-512 VNNI, or none (the f32 row kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8 {
    /// Intel AMX tiles (`tiles`).
    Amx,
    /// AVX-512 VNNI `VPDPBUSD` (`vnni`).
    Avx512Vnni,
    /// AVX-VNNI: the same products 256 bits wide (`vnni`), for CPUs with
    /// AVX-VNNI and no AVX-512.
    AvxVnni,
    /// Plain AVX2: each `VPDPBUSD` done as `VPMADDUBSW` + `VPMADDWD`
    /// (`vnni`), for CPUs with neither AVX-512 nor AVX-VNNI.
    Avx2,
    /// No int8 products: the f32 row kernels.
    None,
}

impl Int8 {
    /// The path for this CPU and `DIMA_KERNELS`/`DIMA_AMX`.
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Int8> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(Self::probe)
    }

    fn probe() -> Self {
        use crate::cpu::Choice;
        #[cfg(target_arch = "x86_64")]
        {
            if tiles::available() {
                return Self::Amx;
            }
            let choice = Choice::from_env();
            if Self::Avx512Vnni.supported()
                && matches!(choice, Ok(Choice::Auto | Choice::Amx | Choice::Avx512Vnni))
            {
                return Self::Avx512Vnni;
            }
            if Self::AvxVnni.supported()
                && matches!(
                    choice,
                    Ok(Choice::Auto | Choice::Amx | Choice::Avx512Vnni | Choice::AvxVnni)
                )
            {
                return Self::AvxVnni;
            }
            if Self::Avx2.supported()
                && matches!(
                    choice,
                    Ok(Choice::Auto
                        | Choice::Amx
                        | Choice::Avx512Vnni
                        | Choice::AvxVnni
                        | Choice::Avx2)
                )
            {
                return Self::Avx2;
            }
        }
        Self::None
    }

    /// Whether one token (a decode step alone) takes this path too, not
    /// the f32 row kernels: on VNNI, and on plain AVX2 where AVX-512 does
    /// not run, it is faster (measured: `docs/benchmarks.md`), and a
    /// token's result is then the same alone and in any batch, bit for
    /// bit; on the tiles one token costs more.
    pub fn one_token(self) -> bool {
        match self {
            Self::Avx512Vnni | Self::AvxVnni => true,
            // Measured against the AVX2 f32 rows: 1.6× the decode speed;
            // where AVX-512 runs, its hand-written f32 rows are kept.
            Self::Avx2 => Kernel::detect() < Kernel::Avx512,
            _ => false,
        }
    }

    /// Activation parts per block (`vnni`): 3 (about 23 bits) on the tiles
    /// and VNNI; 2 (about 15 bits) on plain AVX2, where each part costs
    /// three instructions instead of one and two hold the float64 bound
    /// (`tests/gemma.rs`).
    pub fn parts(self) -> usize {
        match self {
            Self::Avx2 => AVX2_PARTS,
            _ => VNNI_PARTS,
        }
    }

    /// Whether this CPU (and process) can run the path.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Amx => tiles::available(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => {
                Kernel::detect() == Kernel::Avx512 && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Self::AvxVnni => {
                Kernel::detect() >= Kernel::Avx2 && is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => Kernel::detect() >= Kernel::Avx2,
            _ => false,
        }
    }

    /// The path's name (`dima generate --stats`, the benchmarks' JSON).
    pub fn name(self) -> &'static str {
        match self {
            Self::Amx => "amx",
            Self::Avx512Vnni => "avx512vnni",
            Self::AvxVnni => "avxvnni",
            Self::Avx2 => "avx2",
            Self::None => "f32",
        }
    }
}

/// The kernel paths block-quantized products take here: (two or more
/// tokens, one token), e.g. `("amx", "avx512")` or `("avx512vnni",
/// "avx512vnni")`; the f32 row kernels are named by their instruction set
/// (`avx512`, `avx2`, `portable`).
pub fn paths() -> (&'static str, &'static str) {
    let rows = Kernel::detect().name();
    match Int8::detect() {
        Int8::None => (rows, rows),
        path if path.one_token() => (path.name(), path.name()),
        path => (path.name(), rows),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The same kernels compiled with wider instruction sets; chosen only
    //! after [`super::Kernel::detect`] saw the CPU support them.
    use super::{GgmlType, dot_batch_unchecked, dot_unchecked};

    #[target_feature(enable = "avx2,fma")]
    unsafe fn batch_avx2(t: GgmlType, bytes: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
        dot_batch_unchecked(t, bytes, xs, cols, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn batch_avx512(t: GgmlType, bytes: &[u8], xs: &[f32], cols: usize, out: &mut [f32]) {
        dot_batch_unchecked(t, bytes, xs, cols, out)
    }

    pub(super) fn dot_batch_avx2(
        t: GgmlType,
        bytes: &[u8],
        xs: &[f32],
        cols: usize,
        out: &mut [f32],
    ) {
        // SAFETY: only handed out by `Kernel::dot_batch` after detection found AVX2 and FMA.
        unsafe { batch_avx2(t, bytes, xs, cols, out) }
    }

    pub(super) fn dot_batch_avx512(
        t: GgmlType,
        bytes: &[u8],
        xs: &[f32],
        cols: usize,
        out: &mut [f32],
    ) {
        // SAFETY: only handed out by `Kernel::dot_batch` after detection found AVX-512 F/BW/VL and FMA.
        unsafe { batch_avx512(t, bytes, xs, cols, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(t: GgmlType, bytes: &[u8], x: &[f32]) -> f32 {
        dot_unchecked(t, bytes, x)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn avx512(t: GgmlType, bytes: &[u8], x: &[f32]) -> f32 {
        use super::rows512;
        match t {
            GgmlType::Q8_0 => rows512::q8_0(bytes, x),
            GgmlType::Q5_0 => rows512::q5_0(bytes, x),
            GgmlType::Q4K => rows512::q4_k(bytes, x),
            GgmlType::Q6K => rows512::q6_k(bytes, x),
            _ => dot_unchecked(t, bytes, x),
        }
    }

    pub(super) fn dot_avx2(t: GgmlType, bytes: &[u8], x: &[f32]) -> f32 {
        // SAFETY: only handed out by `Kernel::dot` after detection found AVX2 and FMA.
        unsafe { avx2(t, bytes, x) }
    }

    pub(super) fn dot_avx512(t: GgmlType, bytes: &[u8], x: &[f32]) -> f32 {
        // SAFETY: only handed out by `Kernel::dot` after detection found AVX-512 F/BW/VL, FMA and F16C.
        unsafe { avx512(t, bytes, x) }
    }
}

/// The dot product of a row of type `t` (in `bytes`) with `x`, block by
/// block: each block is decoded on the stack and multiplied at once, so no
/// dequantized row is ever materialised. Uses the best [`Kernel`] for this CPU.
pub fn dot_row(t: GgmlType, bytes: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    check(t, bytes, x.len())?;
    Ok(Kernel::detect().dot()(t, bytes, x))
}

/// A row-major matrix of `rows` rows of `cols` elements of one GGML type,
/// borrowed from the bytes of a model file.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    /// Element type.
    pub ggml_type: GgmlType,
    /// Rows (output features).
    pub rows: usize,
    /// Elements per row (input features).
    pub cols: usize,
    /// `rows` rows of encoded data, back to back.
    pub data: &'a [u8],
    /// The same matrix in AMX tile order, where it was repacked
    /// ([`tiles::Packed`]): products then run on the tiles.
    #[cfg(target_arch = "x86_64")]
    pub packed: Option<&'a tiles::Packed>,
}

impl<'a> QMatrix<'a> {
    /// Wraps `data`, checking its length and that the type can be computed with.
    pub fn new(
        ggml_type: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, QuantError> {
        if !is_supported(ggml_type) {
            return Err(QuantError::Unsupported(ggml_type));
        }
        let Some(row_bytes) = ggml_type.bytes_for(cols as u64).map(|b| b as usize) else {
            return Err(QuantError::PartialBlock {
                ggml_type,
                elements: cols,
                block: ggml_type.block_elements(),
            });
        };
        if row_bytes * rows != data.len() {
            return Err(QuantError::Length {
                ggml_type,
                elements: rows * cols,
                expected: row_bytes * rows,
                got: data.len(),
            });
        }
        Ok(Self {
            ggml_type,
            rows,
            cols,
            data,
            #[cfg(target_arch = "x86_64")]
            packed: None,
        })
    }

    fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// The encoded bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Decodes row `r` into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        // Shapes were checked in `new`.
        let _ = dequantize_row(self.ggml_type, self.row(r), out);
    }

    /// `out = self · x`, rows split across the rayon pool.
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        self.matvec_with(Kernel::detect(), x, out);
    }

    /// `out[t] = self · xs[t]` for `n` activation rows (row-major: `xs` is
    /// `n × cols`, `out` is `n × rows`). Each weight block is decoded once
    /// per [`MAX_BATCH`] rows instead of once per row: this is what makes a
    /// prompt cheaper than the same number of single-token steps.
    pub fn matmul(&self, xs: &[f32], n: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        assert_eq!(
            (xs.len(), out.len()),
            (n * self.cols, n * self.rows),
            "matmul shapes"
        );
        #[cfg(target_arch = "x86_64")]
        let int8_one = self.packed.is_some() && Int8::detect().one_token();
        #[cfg(not(target_arch = "x86_64"))]
        let int8_one = false;
        if n == 1 && !int8_one {
            // One token (decoding): the plain row kernel, no scratch. On
            // the tiles one token costs more than it does here (each block
            // is three tile products for one row of activations).
            return self.matvec(xs, out);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = self.packed {
            return p.matmul(xs, n, out);
        }
        let kernel = Kernel::detect().dot_batch();
        let bytes = self.row_bytes();
        for start in (0..n).step_by(MAX_BATCH) {
            let m = (n - start).min(MAX_BATCH);
            let block = &xs[start * self.cols..(start + m) * self.cols];
            // Weight-row-major scratch, transposed into `out` below.
            let mut scratch = vec![0f32; self.rows * m];
            scratch
                .par_chunks_mut(m * 16)
                .enumerate()
                .for_each(|(chunk, rows)| {
                    for (i, o) in rows.chunks_mut(m).enumerate() {
                        let r = chunk * 16 + i;
                        kernel(
                            self.ggml_type,
                            &self.data[r * bytes..(r + 1) * bytes],
                            block,
                            self.cols,
                            o,
                        );
                    }
                });
            for t in 0..m {
                let row = &mut out[(start + t) * self.rows..(start + t + 1) * self.rows];
                for (r, o) in row.iter_mut().enumerate() {
                    *o = scratch[r * m + t];
                }
            }
        }
    }

    /// [`matvec`](Self::matvec) with a chosen kernel variant.
    pub fn matvec_with(&self, kernel: Kernel, x: &[f32], out: &mut [f32]) {
        use rayon::prelude::*;
        assert_eq!(
            (x.len(), out.len()),
            (self.cols, self.rows),
            "matvec shapes"
        );
        let dot = kernel.dot();
        let n = self.row_bytes();
        out.par_chunks_mut(64)
            .enumerate()
            .for_each(|(chunk, outs)| {
                for (i, o) in outs.iter_mut().enumerate() {
                    let r = chunk * 64 + i;
                    *o = dot(self.ggml_type, &self.data[r * n..(r + 1) * n], x);
                }
            });
    }
}

#[cfg(test)]
mod tests;
