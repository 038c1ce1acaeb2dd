//! Products of several tokens on quantized weights (prompts, batched
//! decode steps), per block format and kernel path.
//!
//! Isolates: `QMatrix::matmul` of 64 tokens through a 2,048 × 2,048 matrix
//! (the 270M's `ffn_down` is 640 × 2,048; this square shape keeps every
//! format's 256-column super-blocks whole) in Q8_0, Q5_0, Q4_K and Q6_K,
//! on each path this CPU runs: `f32` (blocks decoded to f32 and multiplied
//! in 16 lanes, the AVX-512/AVX2/portable row kernels of
//! `Kernel::detect`), `avx512vnni` and `avxvnni` (`kernels::quant::vnni`,
//! int8 `VPDPBUSD` on the repacked blocks, 512 and 256 bits wide),
//! `avx2` (the same products as `VPMADDUBSW` + `VPMADDWD`) and
//! `amx` (`kernels::quant::tiles`),
//! each with its activation quantization included.
//! Leaves out: the rest of the model, repacking (done once at load).
//! Anchor: `anchor_read_bytes`, a sum over the matrix's bytes with the same
//! rayon pool: what reading the weights once costs. A product of 64 tokens
//! reads them once too, so product time / anchor time is how many reads'
//! worth of time the arithmetic takes.
//! Run: `cargo bench -p dima-benches --bench quant_matmul` (with
//! `DIMA_KERNELS=avx2` the f32 rows are AVX2's, `f32_avx2f32`, the anchor
//! of `avx2`).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use kernels::gguf::GgmlType;
use kernels::quant::QMatrix;
use rayon::prelude::*;

const ROWS: usize = 2048;
const COLS: usize = 2048;
const TOKENS: usize = 64;

/// Random blocks of `t` whose f16 scales are ordinary numbers.
fn random_blocks(t: GgmlType) -> Vec<u8> {
    let (size, scales): (usize, &[usize]) = match t {
        GgmlType::Q8_0 => (34, &[0]),
        GgmlType::Q5_0 => (22, &[0]),
        GgmlType::Q4K => (144, &[0, 2]),
        _ => (210, &[208]),
    };
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let blocks = ROWS * COLS / t.block_elements();
    let mut bytes = vec![0u8; blocks * size];
    for block in bytes.chunks_exact_mut(size) {
        for b in block.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        for &at in scales {
            let scale = f16::from_f32(0.001 + (state % 1000) as f32 * 1e-5);
            block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
        }
        if t == GgmlType::Q8_0 {
            // As llama.cpp writes Q8_0: −127..127.
            for q in &mut block[2..] {
                if *q == 0x80 {
                    *q = 0x81;
                }
            }
        }
    }
    bytes
}

fn read_bytes(bytes: &[u8]) -> u64 {
    bytes
        .par_chunks(1 << 16)
        .map(|chunk| {
            chunk.chunks_exact(8).fold(0u64, |a, w| {
                a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
            })
        })
        .reduce(|| 0, u64::wrapping_add)
}

fn quant_matmul(c: &mut Criterion) {
    let xs: Vec<f32> = (0..TOKENS * COLS)
        .map(|i| ((i * 31 % 113) as f32 - 56.0) / 17.0)
        .collect();
    let mut out = vec![0f32; TOKENS * ROWS];
    for (name, t) in [
        ("q8_0", GgmlType::Q8_0),
        ("q5_0", GgmlType::Q5_0),
        ("q4_k", GgmlType::Q4K),
        ("q6_k", GgmlType::Q6K),
    ] {
        let bytes = random_blocks(t);
        let m = QMatrix::new(t, ROWS, COLS, &bytes).expect("shape");
        let mut group = c.benchmark_group(format!("matmul_{name}_{ROWS}x{COLS}_{TOKENS}_tokens"));
        group.throughput(Throughput::Elements((ROWS * COLS * TOKENS) as u64));
        group.sample_size(20);
        group.bench_function("anchor_read_bytes", |b| b.iter(|| read_bytes(&bytes)));
        group.bench_function(
            format!("f32_{}", kernels::quant::Kernel::detect().name()),
            |b| b.iter(|| m.matmul(&xs, TOKENS, &mut out)),
        );
        #[cfg(target_arch = "x86_64")]
        for path in [
            kernels::quant::Int8::Avx512Vnni,
            kernels::quant::Int8::AvxVnni,
            kernels::quant::Int8::Avx2,
            kernels::quant::Int8::Amx,
        ] {
            let Some(packed) = kernels::quant::tiles::Packed::new_for(&m, path) else {
                continue;
            };
            let mut with = m;
            with.packed = Some(&packed);
            group.bench_function(path.name(), |b| {
                b.iter(|| with.matmul(&xs, TOKENS, &mut out))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, quant_matmul);
criterion_main!(benches);
