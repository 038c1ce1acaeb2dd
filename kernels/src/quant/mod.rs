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

use crate::gguf::GgmlType;

/// Why a row could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    /// The type has a layout but no decoder here yet.
    #[error(
        "tensor type {0} is not supported for compute (supported: f32, f16, bf16, q8_0, q5_0, q4_K, q6_K)"
    )]
    Unsupported(GgmlType),
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

#[inline]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes one Q8_0 block (34 bytes) into 32 values.
fn block_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, q) in out.iter_mut().zip(&b[2..34]) {
        *o = d * f32::from(*q as i8);
    }
}

/// Decodes one Q5_0 block (22 bytes) into 32 values.
fn block_q5_0(b: &[u8], out: &mut [f32]) {
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
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
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
fn block_q6_k(b: &[u8], out: &mut [f32]) {
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

/// Multiplies the blocks of `bytes` with `x`, decoding each block into a
/// stack buffer with `decode` (`n` elements of `size` bytes per block).
#[inline(always)]
fn dot_blocks(
    bytes: &[u8],
    x: &[f32],
    size: usize,
    n: usize,
    decode: impl Fn(&[u8], &mut [f32]),
) -> f32 {
    let mut buf = [0f32; 256];
    let mut sum = 0.0f32;
    for (b, xs) in bytes.chunks_exact(size).zip(x.chunks_exact(n)) {
        decode(b, &mut buf[..n]);
        sum += buf[..n].iter().zip(xs).map(|(w, v)| w * v).sum::<f32>();
    }
    sum
}

/// The dot product of a row of type `t` (in `bytes`) with `x`, block by
/// block: each block is decoded on the stack and multiplied at once, so no
/// dequantized row is ever materialised.
pub fn dot_row(t: GgmlType, bytes: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    check(t, bytes, x.len())?;
    Ok(match t {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .zip(x)
            .map(|(b, v)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v)
            .sum(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .zip(x)
            .map(|(b, v)| f16::from_le_bytes([b[0], b[1]]).to_f32() * v)
            .sum(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .zip(x)
            .map(|(b, v)| bf16::from_le_bytes([b[0], b[1]]).to_f32() * v)
            .sum(),
        GgmlType::Q8_0 => {
            // d · Σ q·x per block: no decode buffer needed.
            let mut sum = 0.0f32;
            for (b, xs) in bytes.chunks_exact(34).zip(x.chunks_exact(32)) {
                let d = f16_at(b, 0);
                let mut block = 0.0f32;
                for (q, v) in b[2..34].iter().zip(xs) {
                    block += f32::from(*q as i8) * v;
                }
                sum += d * block;
            }
            sum
        }
        GgmlType::Q5_0 => dot_blocks(bytes, x, 22, 32, block_q5_0),
        GgmlType::Q4K => dot_blocks(bytes, x, 144, 256, block_q4_k),
        GgmlType::Q6K => dot_blocks(bytes, x, 210, 256, block_q6_k),
        other => return Err(QuantError::Unsupported(other)),
    })
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
        use rayon::prelude::*;
        debug_assert_eq!(x.len(), self.cols);
        debug_assert_eq!(out.len(), self.rows);
        let n = self.row_bytes();
        out.par_chunks_mut(64)
            .enumerate()
            .for_each(|(chunk, outs)| {
                for (i, o) in outs.iter_mut().enumerate() {
                    let r = chunk * 64 + i;
                    *o = dot_row(self.ggml_type, &self.data[r * n..(r + 1) * n], x)
                        .unwrap_or(f32::NAN);
                }
            });
    }
}

#[cfg(test)]
mod tests;
