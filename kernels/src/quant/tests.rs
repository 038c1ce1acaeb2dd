use super::*;

/// Blocks and decoded values from the `gguf` Python package
/// (`scripts/reference/quant_fixture.py`).
fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("../../testdata/quant_blocks.json")).unwrap()
}

fn case(name: &str) -> (Vec<u8>, Vec<f32>) {
    let all = fixture();
    let case = &all[name];
    let hex = case["hex"].as_str().unwrap();
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let values = case["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    (bytes, values)
}

const TYPES: [(&str, GgmlType); 6] = [
    ("q8_0", GgmlType::Q8_0),
    ("q5_0", GgmlType::Q5_0),
    ("q4_K", GgmlType::Q4K),
    ("q6_K", GgmlType::Q6K),
    ("f16", GgmlType::F16),
    ("bf16", GgmlType::BF16),
];

#[test]
fn every_type_decodes_like_the_gguf_package() {
    for (name, t) in TYPES {
        let (bytes, expected) = case(name);
        let mut out = vec![0f32; expected.len()];
        dequantize_row(t, &bytes, &mut out).unwrap();
        for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
            // Both sides compute the same f32 products; allow one rounding step.
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{name} element {i}: {got} vs the reference {want}"
            );
        }
    }
}

#[test]
fn dot_row_matches_decode_then_multiply() {
    for (name, t) in TYPES {
        let (bytes, values) = case(name);
        let x: Vec<f32> = (0..values.len())
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let exact: f64 = values
            .iter()
            .zip(&x)
            .map(|(w, v)| f64::from(*w) * f64::from(*v))
            .sum();
        let norm: f64 = values
            .iter()
            .zip(&x)
            .map(|(w, v)| (f64::from(*w) * f64::from(*v)).abs())
            .sum();
        let got = dot_row(t, &bytes, &x).unwrap();
        assert!(
            (f64::from(got) - exact).abs() <= 1e-5 * norm.max(1e-6),
            "{name}: dot {got} vs {exact} (sum of |terms| {norm})"
        );
        // Every compiled variant this CPU runs, the portable one included.
        for kernel in Kernel::available() {
            let got = kernel.dot()(t, &bytes, &x);
            assert!(
                (f64::from(got) - exact).abs() <= 1e-5 * norm.max(1e-6),
                "{name} with {kernel:?}: dot {got} vs {exact}"
            );
        }
    }
}

#[test]
fn f32_rows_and_partial_groups_work() {
    let w: Vec<f32> = (0..40).map(|i| i as f32 * 0.5 - 3.0).collect();
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let x: Vec<f32> = (0..40).map(|i| 1.0 / (i as f32 + 1.0)).collect();
    let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
    assert!((dot_row(GgmlType::F32, &bytes, &x).unwrap() - exact).abs() < 1e-4);
    // 40 f16 values: one whole group of 32 and a tail of 8.
    let halves: Vec<u8> = w
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect();
    assert!((dot_row(GgmlType::F16, &halves, &x).unwrap() - exact).abs() < 1e-3);
}

#[test]
fn wrong_lengths_and_unsupported_types_are_errors() {
    let mut out = vec![0f32; 32];
    assert_eq!(
        dequantize_row(GgmlType::Q8_0, &[0u8; 33], &mut out),
        Err(QuantError::Length {
            ggml_type: GgmlType::Q8_0,
            elements: 32,
            expected: 34,
            got: 33
        })
    );
    assert_eq!(
        dot_row(GgmlType::Q2K, &[0u8; 84], &[0.0; 256]),
        Err(QuantError::Unsupported(GgmlType::Q2K))
    );
    let e = dequantize_row(GgmlType::Q4K, &[0u8; 144], &mut [0f32; 100]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "100 elements are not a whole number of q4_K blocks of 256"
    );
}

#[test]
fn matvec_agrees_across_kernel_variants() {
    let (bytes, values) = case("q4_K");
    // Three rows of 256.
    let m = QMatrix::new(GgmlType::Q4K, 3, 256, &bytes).unwrap();
    let x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
    let want: Vec<f64> = values
        .chunks(256)
        .map(|row| {
            row.iter()
                .zip(&x)
                .map(|(w, v)| f64::from(*w) * f64::from(*v))
                .sum()
        })
        .collect();
    assert!(Kernel::available().contains(&Kernel::Portable));
    for kernel in Kernel::available() {
        let mut out = [0f32; 3];
        m.matvec_with(kernel, &x, &mut out);
        for (got, want) in out.iter().zip(&want) {
            assert!(
                (f64::from(*got) - want).abs() < 1e-3,
                "{kernel:?}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn matmul_equals_matvec_per_row() {
    for (name, t) in [
        ("q8_0", GgmlType::Q8_0),
        ("q5_0", GgmlType::Q5_0),
        ("q6_K", GgmlType::Q6K),
        ("f16", GgmlType::F16),
    ] {
        let (bytes, values) = case(name);
        let cols = if t.block_elements() == 256 { 256 } else { 64 };
        let rows = values.len() / cols;
        let m = QMatrix::new(t, rows, cols, &bytes).unwrap();
        // 35 activation rows: one full batch of 32 and a partial one.
        let n = 35;
        let xs: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 13 % 97) as f32 - 48.0) / 40.0)
            .collect();
        let mut batched = vec![0f32; n * rows];
        m.matmul(&xs, n, &mut batched);
        for t_ in 0..n {
            let mut single = vec![0f32; rows];
            m.matvec(&xs[t_ * cols..(t_ + 1) * cols], &mut single);
            for (a, b) in batched[t_ * rows..(t_ + 1) * rows].iter().zip(&single) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{name} row {t_}: {a} vs {b}"
                );
            }
        }
    }
}

/// A token's result does not depend on how many tokens share the batch or
/// on its place in a tile: bit for bit, for every block format.
#[test]
fn batched_rows_are_bit_identical_whatever_the_batch() {
    for (name, t) in [
        ("q8_0", GgmlType::Q8_0),
        ("q5_0", GgmlType::Q5_0),
        ("q4_K", GgmlType::Q4K),
        ("q6_K", GgmlType::Q6K),
    ] {
        let (bytes, values) = case(name);
        let cols = if t.block_elements() == 256 { 256 } else { 64 };
        let rows = values.len() / cols;
        let m = QMatrix::new(t, rows, cols, &bytes).unwrap();
        let n = 31;
        let xs: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 29 % 101) as f32 - 50.0) / 37.0)
            .collect();
        let mut all = vec![0f32; n * rows];
        m.matmul(&xs, n, &mut all);
        // The last 2 and the last 7 tokens alone (tiles of 2, and 4 + 2 + 1).
        for k in [2, 7] {
            let mut part = vec![0f32; k * rows];
            m.matmul(&xs[(n - k) * cols..], k, &mut part);
            let tail = &all[(n - k) * rows..];
            assert!(
                part.iter()
                    .zip(tail)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: {k} tokens alone differ from the same tokens in a batch of {n}"
            );
        }
    }
}

/// Random blocks of `t` (`blocks` of them) whose f16 scales are ordinary
/// numbers; every other byte is arbitrary, as any byte is a valid quant.
fn random_blocks(t: GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as u32
    };
    let (size, scales): (usize, &[usize]) = match t {
        GgmlType::Q8_0 => (34, &[0]),
        GgmlType::Q5_0 => (22, &[0]),
        GgmlType::Q4K => (144, &[0, 2]),
        GgmlType::Q6K => (210, &[208]),
        _ => unreachable!("block types only"),
    };
    let mut bytes: Vec<u8> = (0..size * blocks).map(|_| next() as u8).collect();
    for block in bytes.chunks_exact_mut(size) {
        for &at in scales {
            let scale = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
        }
    }
    bytes
}

/// The hand-written one-token kernels (AVX-512) against the generic ones,
/// on random blocks of every format over many rows.
#[test]
fn every_row_kernel_variant_agrees_on_random_blocks() {
    for t in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4K, GgmlType::Q6K] {
        let (rows, cols) = (37, 1024);
        let bytes = random_blocks(t, rows * cols / t.block_elements(), 7);
        let m = QMatrix::new(t, rows, cols, &bytes).unwrap();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 31 % 113) as f32 - 56.0) / 17.0)
            .collect();
        let mut want = vec![0f32; rows];
        m.matvec_with(Kernel::Portable, &x, &mut want);
        // The same products in f64 from the decoded rows: the scale of
        // rounding the variants may differ by.
        let mut row = vec![0f32; cols];
        for kernel in Kernel::available() {
            let mut got = vec![0f32; rows];
            m.matvec_with(kernel, &x, &mut got);
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                let magnitude: f64 = row
                    .iter()
                    .zip(&x)
                    .map(|(w, v)| (f64::from(*w) * f64::from(*v)).abs())
                    .sum();
                assert!(
                    f64::from((got[r] - want[r]).abs()) <= 1e-5 * magnitude,
                    "{t} {kernel:?} row {r}: {} vs portable {} (Σ|w·x| {magnitude})",
                    got[r],
                    want[r]
                );
            }
        }
    }
}

/// The int8 paths this CPU runs (the AMX tiles, AVX-512 VNNI, AVX-VNNI,
/// plain AVX2), each
/// against exact f64 products of the decoded rows, on random blocks of
/// every packed format: within the activations' quantization bound, and a
/// token's result bit for bit the same alone and in any batch. A packing
/// with one block's scales swapped between rows fails the same check.
#[cfg(target_arch = "x86_64")]
#[test]
fn int8_products_follow_the_exact_product_and_ignore_the_batch() {
    use super::tiles::Packed;
    let paths: Vec<Int8> = [Int8::Amx, Int8::Avx512Vnni, Int8::AvxVnni, Int8::Avx2]
        .into_iter()
        .filter(|p| p.supported())
        .collect();
    if paths.is_empty() {
        eprintln!("skipped: no int8 path on this CPU");
        return;
    }
    // Per format, the products of each VNNI width (the same arithmetic
    // lane for lane: equal bit for bit where no activation sum enters).
    let mut widths: Vec<(GgmlType, Int8, Vec<f32>)> = Vec::new();
    for path in paths {
        for t in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4K, GgmlType::Q6K] {
            let (rows, cols) = (37, if t.block_elements() == 256 { 768 } else { 640 });
            let mut bytes = random_blocks(t, rows * cols / t.block_elements(), 11);
            if path == Int8::Avx2 && t == GgmlType::Q8_0 {
                // Plain AVX2 keeps the f32 rows for a Q8_0 matrix holding
                // −128 (llama.cpp writes −127..127): take it out.
                let m = QMatrix::new(t, rows, cols, &bytes).unwrap();
                assert!(Packed::new_for(&m, path).is_none(), "−128 is refused");
                for block in bytes.chunks_mut(34) {
                    for q in &mut block[2..] {
                        if *q == 0x80 {
                            *q = 0x81;
                        }
                    }
                }
            }
            let m = QMatrix::new(t, rows, cols, &bytes).unwrap();
            let mut packed = Packed::new_for(&m, path).unwrap();
            let mut weights = vec![0f32; rows * cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut weights[r * cols..(r + 1) * cols]);
            }
            let n = 21;
            let xs: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0 * (1.0 + (i % 7) as f32))
                .collect();
            // The bound: each activation is off by at most half a unit of
            // its last part (amax / 127 / 254 for two parts, / 254² for
            // three; the tiles use three).
            let parts = if path == Int8::Amx { 3 } else { path.parts() };
            let unit = 1.0 / (127.0 * 254f64.powi(parts as i32 - 1));
            let check = |all: &[f32]| -> Result<(), String> {
                for tok in 0..n {
                    let x = &xs[tok * cols..(tok + 1) * cols];
                    for r in 0..rows {
                        let w = &weights[r * cols..(r + 1) * cols];
                        let exact: f64 = w
                            .iter()
                            .zip(x)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum();
                        let size: f64 =
                            w.iter().zip(x).map(|(a, b)| f64::from((a * b).abs())).sum();
                        let bound: f64 = w
                            .chunks(32)
                            .zip(x.chunks(32))
                            .map(|(wb, xb)| {
                                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                                let wsum: f64 = wb.iter().map(|v| f64::from(v.abs())).sum();
                                wsum * f64::from(amax) * unit
                            })
                            .sum::<f64>()
                            + 1e-6 * size;
                        let got = f64::from(all[tok * rows + r]);
                        if (got - exact).abs() > bound {
                            return Err(format!(
                                "{path:?} {t:?} token {tok} row {r}: {got} vs {exact} (bound {bound})"
                            ));
                        }
                    }
                }
                Ok(())
            };
            let mut all = vec![0f32; n * rows];
            packed.matmul(&xs, n, &mut all);
            check(&all).unwrap();
            if matches!(path, Int8::Avx512Vnni | Int8::AvxVnni) && t != GgmlType::Q4K {
                if let Some((_, other, theirs)) = widths.iter().find(|w| w.0 == t) {
                    assert!(
                        all.iter()
                            .zip(theirs)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{t:?}: {path:?} and {other:?} differ"
                    );
                }
                widths.push((t, path, all.clone()));
            }
            for (start, k) in [(0, 1), (5, 2), (n - 7, 7)] {
                let mut part = vec![0f32; k * rows];
                packed.matmul(&xs[start * cols..(start + k) * cols], k, &mut part);
                assert!(
                    part.iter()
                        .zip(&all[start * rows..(start + k) * rows])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{path:?} {t:?}: tokens {start}..{} alone differ from them in a batch of {n}",
                    start + k
                );
            }
            // A wrong scale index (rows 0 and 1 of the first block swapped)
            // must fail the check.
            packed.scales.swap(0, 1);
            packed.matmul(&xs, n, &mut all);
            assert!(
                check(&all).is_err(),
                "{path:?} {t:?}: the check does not see swapped scales"
            );
        }
    }
}
