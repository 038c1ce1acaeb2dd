//! One-token matrix-vector products on quantized weights (decoding).
//!
//! Isolates: `QMatrix::matvec_with` on the shape that carries most of a
//! Gemma 3 270M decode step's bytes: the tied LM head, 262,144 × 640 in
//! Q8_0 (178 MB), plus a Q5_0 matrix of the same shape, for each kernel
//! variant this CPU runs (`avx512` is the hand-written `rows512` kernels,
//! `avx2` and `portable` the generic decode-then-multiply ones).
//! Leaves out: the rest of the model, the AMX tiles (two or more tokens).
//! Anchor: `anchor_read_bytes`, a sum over the same bytes with the same
//! rayon pool and split: the memory bandwidth a one-token product can at
//! best reach. The ratio matvec time / anchor time is how far from
//! bandwidth-bound a kernel is.
//! Run: `cargo bench -p dima-benches --bench quant_matvec`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use kernels::gguf::GgmlType;
use kernels::quant::{Kernel, QMatrix};
use rayon::prelude::*;

const ROWS: usize = 262_144;
const COLS: usize = 640;

/// Random blocks whose f16 scales are ordinary numbers.
fn random_blocks(t: GgmlType) -> Vec<u8> {
    let size = match t {
        GgmlType::Q8_0 => 34,
        _ => 22,
    };
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut bytes = vec![0u8; ROWS * COLS / 32 * size];
    for block in bytes.chunks_exact_mut(size) {
        for b in block.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        let scale = f16::from_f32(0.001 + (state % 1000) as f32 * 1e-5);
        block[..2].copy_from_slice(&scale.to_le_bytes());
    }
    bytes
}

fn read_bytes(bytes: &[u8], row_bytes: usize) -> u64 {
    bytes
        .par_chunks(64 * row_bytes)
        .map(|chunk| {
            chunk.chunks_exact(8).fold(0u64, |a, w| {
                a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
            })
        })
        .reduce(|| 0, u64::wrapping_add)
}

fn quant_matvec(c: &mut Criterion) {
    let x: Vec<f32> = (0..COLS)
        .map(|i| ((i * 31 % 113) as f32 - 56.0) / 17.0)
        .collect();
    let mut out = vec![0f32; ROWS];
    for (name, t) in [("q8_0", GgmlType::Q8_0), ("q5_0", GgmlType::Q5_0)] {
        let bytes = random_blocks(t);
        let m = QMatrix::new(t, ROWS, COLS, &bytes).expect("shape");
        let mut group = c.benchmark_group(format!("matvec_{name}_262144x640"));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.sample_size(20);
        group.bench_function("anchor_read_bytes", |b| {
            b.iter(|| read_bytes(&bytes, bytes.len() / ROWS))
        });
        for kernel in Kernel::available() {
            group.bench_function(format!("{kernel:?}").to_lowercase(), |b| {
                b.iter(|| m.matvec_with(kernel, &x, &mut out))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, quant_matvec);
criterion_main!(benches);
