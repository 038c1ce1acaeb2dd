//! `dima gpu info` and `dima gpu check`: what the GPU is, and every CUDA
//! kernel against the CPU op it mirrors, on random inputs. One JSON value
//! per check: `{"kernel", "max_abs_err", "tolerance", "ok"}`.

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::{GemmPath, Gpu, GpuError, bf16_bits};

/// `dima gpu info`.
pub fn info(device: usize) -> Result<Value, GpuError> {
    let gpu = Gpu::new(device)?;
    let d = gpu.describe()?;
    Ok(json!({
        "name": d.name,
        "ordinal": d.ordinal,
        "compute_capability": format!("{}.{}", d.compute_capability.0, d.compute_capability.1),
        "memory_free_bytes": d.memory.0,
        "memory_total_bytes": d.memory.1,
    }))
}

fn row(kernel: &str, err: f64, tolerance: f64) -> Value {
    json!({"kernel": kernel, "max_abs_err": err, "tolerance": tolerance, "ok": err <= tolerance})
}

fn max_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(
            0.0,
            |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
        )
}

/// The CPU's attention for one query head over positions `first..=pos`
/// (slot = p % slots when `slots` > 0), in f64.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv_dim: usize,
    off: usize,
    (first, pos): (usize, usize),
    slots: usize,
    out: &mut [f32],
) {
    let slot = |p: usize| if slots > 0 { p % slots } else { p };
    let hd = q.len();
    let scores: Vec<f64> = (first..=pos)
        .map(|p| {
            let at = slot(p) * kv_dim + off;
            (0..hd)
                .map(|d| f64::from(q[d]) * f64::from(k[at + d]))
                .sum()
        })
        .collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    for (d, o) in out.iter_mut().enumerate() {
        let mut acc = 0.0;
        for (p, w) in (first..=pos).zip(&weights) {
            acc += w * f64::from(v[slot(p) * kv_dim + off + d]);
        }
        *o = (acc / total) as f32;
    }
}

/// `dima gpu check`: each kernel against its CPU reference.
pub fn check_kernels(device: usize, seed: u64) -> Result<Vec<Value>, GpuError> {
    let gpu = Gpu::new(device)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut random = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect()
    };
    let mut rows = Vec::new();

    // to_bf16: exact.
    let x = random(4099, 3.0);
    let dx = gpu.upload(&x)?;
    let mut dy = gpu.zeros::<u16>(x.len())?;
    gpu.to_bf16(&dx, &mut dy, x.len())?;
    let got = gpu.download(&dy)?;
    let wrong = got
        .iter()
        .zip(bf16_bits(&x))
        .filter(|(a, b)| **a != *b)
        .count();
    rows.push(row("f32_to_bf16", wrong as f64, 0.0));

    // rms_norm.
    let (r, dim) = (5, 640);
    let x = random(r * dim, 2.0);
    let w = random(dim, 1.5);
    let mut want = vec![0f32; r * dim];
    for (xr, o) in x.chunks(dim).zip(want.chunks_mut(dim)) {
        crate::ops::rms_norm(xr, &w, 1e-6, o);
    }
    let (dx, dw) = (gpu.upload(&x)?, gpu.upload(&w)?);
    let mut dy = gpu.zeros::<f32>(r * dim)?;
    gpu.rms_norm(&dx, &dw, &mut dy, (r, dim), 1e-6)?;
    rows.push(row("rms_norm", max_err(&gpu.download(&dy)?, &want), 1e-5));

    // rope_neox, local and global bases.
    for (name, base) in [
        ("rope_neox (base 10k)", 10_000f32),
        ("rope_neox (base 1M)", 1e6),
    ] {
        let (tokens, heads, hd) = (3, 4, 256);
        let positions = [0f32, 17.0, 4095.5];
        let x = random(tokens * heads * hd, 1.0);
        let mut want = x.clone();
        for (t, token) in want.chunks_mut(heads * hd).enumerate() {
            for head in token.chunks_mut(hd) {
                crate::ops::rope_neox(head, positions[t], base);
            }
        }
        let mut dx = gpu.upload(&x)?;
        let dp = gpu.upload(&positions)?;
        gpu.rope_neox(&mut dx, &dp, (tokens, heads, hd), base)?;
        rows.push(row(name, max_err(&gpu.download(&dx)?, &want), 2e-3));
    }

    // geglu.
    let n = 8192;
    let (g, u) = (random(n, 4.0), random(n, 2.0));
    let want: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| crate::ops::gelu_tanh(*g) * u)
        .collect();
    let (dg, du) = (gpu.upload(&g)?, gpu.upload(&u)?);
    let mut dout = gpu.zeros::<f32>(n)?;
    gpu.geglu(&dg, &du, &mut dout, n)?;
    rows.push(row("geglu", max_err(&gpu.download(&dout)?, &want), 1e-5));

    // embed_bf16: exact.
    let (vocab, dim) = (300, 640);
    let table = bf16_bits(&random(vocab * dim, 0.1));
    let ids = [2i32, 299, 0, -1, 2];
    let scale = (dim as f32).sqrt();
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&id| {
            if id < 0 {
                return vec![0f32; dim];
            }
            table[id as usize * dim..(id as usize + 1) * dim]
                .iter()
                .map(|b| half::bf16::from_bits(*b).to_f32() * scale)
                .collect::<Vec<_>>()
        })
        .collect();
    let (dt, di) = (gpu.upload(&table)?, gpu.upload(&ids)?);
    let mut dout = gpu.zeros::<f32>(ids.len() * dim)?;
    gpu.embed_bf16(&dt, &di, &mut dout, (ids.len(), dim), scale)?;
    rows.push(row(
        "embed_bf16",
        max_err(&gpu.download(&dout)?, &want),
        0.0,
    ));

    // scale_in_place: exact (one multiply each).
    let a = random(777, 3.0);
    let want: Vec<f32> = a.iter().map(|v| v * 0.0625).collect();
    let mut da = gpu.upload(&a)?;
    gpu.scale_in_place(&mut da, 0.0625, a.len())?;
    rows.push(row(
        "scale_in_place",
        max_err(&gpu.download(&da)?, &want),
        0.0,
    ));

    // store_kv: rows land in their slots, the rest stays zero.
    let (kv_dim, slots) = (512, 10);
    let (kr, vr) = (random(3 * kv_dim, 1.0), random(3 * kv_dim, 1.0));
    let dest = [7i32, 0, 4];
    let mut want_k = vec![0f32; slots * kv_dim];
    let mut want_v = vec![0f32; slots * kv_dim];
    for (r, &d) in dest.iter().enumerate() {
        let d = d as usize;
        want_k[d * kv_dim..(d + 1) * kv_dim].copy_from_slice(&kr[r * kv_dim..(r + 1) * kv_dim]);
        want_v[d * kv_dim..(d + 1) * kv_dim].copy_from_slice(&vr[r * kv_dim..(r + 1) * kv_dim]);
    }
    let (dk, dv, dd) = (gpu.upload(&kr)?, gpu.upload(&vr)?, gpu.upload(&dest)?);
    let (mut ck, mut cv) = (
        gpu.zeros::<f32>(slots * kv_dim)?,
        gpu.zeros::<f32>(slots * kv_dim)?,
    );
    gpu.store_kv((&dk, &dv), (&mut ck, &mut cv), &dd, (3, kv_dim), slots)?;
    let err = max_err(&gpu.download(&ck)?, &want_k).max(max_err(&gpu.download(&cv)?, &want_v));
    rows.push(row("store_kv", err, 0.0));

    // add_in_place: exact.
    let (a, b) = (random(1000, 1.0), random(1000, 1.0));
    let want: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a + b).collect();
    let (mut da, db) = (gpu.upload(&a)?, gpu.upload(&b)?);
    gpu.add_in_place(&mut da, &db, a.len())?;
    rows.push(row(
        "add_in_place",
        max_err(&gpu.download(&da)?, &want),
        0.0,
    ));

    // attention: a global layer over a linear cache, and a local layer
    // (window 512) over a ring of 512 slots; 8 query heads on 2 KV heads.
    for (name, window, slots, positions, hd) in [
        (
            "attention (global)",
            0usize,
            0usize,
            vec![0i32, 1, 700],
            256,
        ),
        (
            "attention (local ring)",
            512,
            512,
            vec![3i32, 511, 1300],
            256,
        ),
        (
            "attention (global, head_dim 128)",
            0,
            0,
            vec![5i32, 0, 333],
            128,
        ),
    ] {
        let (heads, kv_heads) = (8, 2);
        let kv_dim = kv_heads * hd;
        let group = heads / kv_heads;
        let cache_rows = if slots > 0 { slots } else { 701 };
        let tokens = positions.len();
        let q = random(tokens * heads * hd, 0.1);
        let k = random(cache_rows * kv_dim, 1.0);
        let v = random(cache_rows * kv_dim, 1.0);
        let mut want = vec![0f32; tokens * heads * hd];
        for (t, &pos) in positions.iter().enumerate() {
            let pos = pos as usize;
            let first = if window > 0 {
                (pos + 1).saturating_sub(window)
            } else {
                0
            };
            for h in 0..heads {
                let at = (t * heads + h) * hd;
                attend(
                    &q[at..at + hd],
                    &k,
                    &v,
                    kv_dim,
                    (h / group) * hd,
                    (first, pos),
                    slots,
                    &mut want[at..at + hd],
                );
            }
        }
        let (dq, dk, dv) = (gpu.upload(&q)?, gpu.upload(&k)?, gpu.upload(&v)?);
        let dp = gpu.upload(&positions)?;
        let db = gpu.upload(&vec![0i32; tokens])?;
        let mut dout = gpu.zeros::<f32>(want.len())?;
        gpu.attention(
            &dq,
            (&dk, &dv),
            &mut dout,
            (&dp, &db),
            (tokens, heads, hd, kv_dim),
            group,
            (window, slots),
        )?;
        rows.push(row(name, max_err(&gpu.download(&dout)?, &want), 1e-4));
        let mut d16 = gpu.zeros::<u16>(want.len())?;
        gpu.attention_bf16(
            &dq,
            (&dk, &dv),
            &mut d16,
            (&dp, &db),
            (tokens, heads, hd, kv_dim),
            group,
            (window, slots),
        )?;
        // bf16 of nearly equal values: at most one rounding apart.
        let err = gpu
            .download(&d16)?
            .iter()
            .zip(&want)
            .map(|(b, w)| {
                let b = f64::from(half::bf16::from_bits(*b).to_f32());
                (b - f64::from(*w)).abs() / f64::from(w.abs()).max(1e-3)
            })
            .fold(0.0, f64::max);
        rows.push(row(
            &format!("{name}, bf16 out (relative)"),
            err,
            1.0 / 128.0,
        ));
    }

    // argmax_rows: exact (the lowest index among equals).
    let (r, n) = (3, 262_144);
    let mut x = random(r * n, 10.0);
    x[n + 5] = 50.0;
    x[n + 9] = 50.0;
    let want: Vec<f32> = x.chunks(n).map(|row| argmax(row) as f32).collect();
    let dx = gpu.upload(&x)?;
    let mut dout = gpu.zeros::<i32>(r)?;
    gpu.argmax_rows(&dx, (r, n), &mut dout)?;
    let got: Vec<f32> = gpu.download(&dout)?.iter().map(|i| *i as f32).collect();
    rows.push(row("argmax_rows", max_err(&got, &want), 0.0));

    // gemm_bf16 against f64 over the same bf16 values.
    let (wr, wc, tokens) = (640, 1024, 16);
    let w = bf16_bits(&random(wr * wc, 0.05));
    let xs = bf16_bits(&random(tokens * wc, 1.0));
    let f = |b: u16| f64::from(half::bf16::from_bits(b).to_f32());
    let mut want = vec![0f32; tokens * wr];
    for t in 0..tokens {
        for r in 0..wr {
            let s: f64 = (0..wc).map(|c| f(w[r * wc + c]) * f(xs[t * wc + c])).sum();
            want[t * wr + r] = s as f32;
        }
    }
    let (dw, dxs) = (gpu.upload(&w)?, gpu.upload(&xs)?);
    let mut dout = gpu.zeros::<f32>(tokens * wr)?;
    let path = gpu.gemm_path();
    gpu.set_gemm_path(GemmPath::Blas);
    gpu.gemm_bf16(&dw, (wr, wc), &dxs, tokens, &mut dout)?;
    rows.push(row(
        "gemm_bf16 cuBLAS (640x1024, 16 rows)",
        max_err(&gpu.download(&dout)?, &want),
        1e-3,
    ));
    // gemv_bf16 (decode's few tokens), on a row count that leaves a
    // partial warp's worth of rows and a column count that is not a
    // multiple of the warp's stride.
    gpu.set_gemm_path(GemmPath::Gemv);
    let (wr, wc) = (1001, 1096);
    let w = bf16_bits(&random(wr * wc, 0.05));
    let dw = gpu.upload(&w)?;
    for tokens in [1, 5, 16] {
        let xs = bf16_bits(&random(tokens * wc, 1.0));
        let mut want = vec![0f32; tokens * wr];
        for t in 0..tokens {
            for r in 0..wr {
                let s: f64 = (0..wc).map(|c| f(w[r * wc + c]) * f(xs[t * wc + c])).sum();
                want[t * wr + r] = s as f32;
            }
        }
        let dxs = gpu.upload(&xs)?;
        let mut dout = gpu.zeros::<f32>(tokens * wr)?;
        gpu.gemm_bf16(&dw, (wr, wc), &dxs, tokens, &mut dout)?;
        rows.push(row(
            &format!("gemv_bf16 ({wr}x{wc}, {tokens} rows)"),
            max_err(&gpu.download(&dout)?, &want),
            1e-3,
        ));
    }
    gpu.set_gemm_path(path);

    // The fused kernels against the compositions `Host` runs (the trait's
    // defaults). bf16 outputs may differ by a rounding where the f32
    // values differ in their last bits: compared relative to the value.
    use crate::device::{Device, Host};
    let bf16_err = |a: &[u16], b: &[u16]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let (x, y) = (
                    f64::from(half::bf16::from_bits(*x).to_f32()),
                    f64::from(half::bf16::from_bits(*y).to_f32()),
                );
                (x - y).abs() / x.abs().max(y.abs()).max(1e-3)
            })
            .fold(0.0, f64::max)
    };
    let host = |e: crate::device::DeviceError| GpuError::Shape(e.to_string());
    let (r, dim, eps) = (5, 1152, 1e-6f32);
    let (x, o) = (random(r * dim, 2.0), random(r * dim, 3.0));
    let (w1, w2) = (random(dim, 1.5), random(dim, 1.5));
    let mut want = vec![0u16; r * dim];
    Host.rms_norm_bf16(&x, &w1, &mut want, (r, dim), eps)
        .map_err(host)?;
    let mut got = gpu.zeros::<u16>(r * dim)?;
    gpu.rms_norm_bf16(&gpu.upload(&x)?, &gpu.upload(&w1)?, &mut got, (r, dim), eps)?;
    rows.push(row(
        "rms_norm_bf16 (relative)",
        bf16_err(&gpu.download(&got)?, &want),
        1.0 / 128.0,
    ));
    let (mut hx, mut hnext) = (x.clone(), vec![0u16; r * dim]);
    Host.residual_norm(&mut hx, &o, (&w1, &w2), &mut hnext, (r, dim), eps)
        .map_err(host)?;
    let (mut dx, mut dnext) = (gpu.upload(&x)?, gpu.zeros::<u16>(r * dim)?);
    let (dw1, dw2) = (gpu.upload(&w1)?, gpu.upload(&w2)?);
    gpu.residual_norm(
        &mut dx,
        &gpu.upload(&o)?,
        (&dw1, &dw2),
        &mut dnext,
        (r, dim),
        eps,
    )?;
    rows.push(row(
        "residual_norm (residual)",
        max_err(&gpu.download(&dx)?, &hx),
        1e-4,
    ));
    rows.push(row(
        "residual_norm (next, relative)",
        bf16_err(&gpu.download(&dnext)?, &hnext),
        1.0 / 128.0,
    ));
    // q|k|v for 3 tokens, 4 query heads and 2 KV heads of 128, into a
    // cache of 7 slots.
    let (tokens, heads, kvh, hd, cache) = (3, 4, 2, 128, 7);
    let width = (heads + 2 * kvh) * hd;
    let qkv = random(tokens * width, 2.0);
    let (qw, kw) = (random(hd, 1.5), random(hd, 1.5));
    let rope = vec![3.0f32, 517.0, 40.25];
    let dest = vec![6i32, 0, 2];
    let scalars = (10_000.0f32, 0.0625f32, eps);
    let (mut hq, mut hk, mut hv) = (
        vec![0f32; tokens * heads * hd],
        vec![0f32; cache * kvh * hd],
        vec![0f32; cache * kvh * hd],
    );
    Host.qkv_prep(
        &qkv,
        (&qw, &kw),
        &mut hq,
        (&mut hk, &mut hv),
        (&rope, &dest),
        (tokens, heads, kvh, hd),
        scalars,
        cache,
    )
    .map_err(host)?;
    let (mut dq, mut dk, mut dv) = (
        gpu.zeros::<f32>(tokens * heads * hd)?,
        gpu.zeros::<f32>(cache * kvh * hd)?,
        gpu.zeros::<f32>(cache * kvh * hd)?,
    );
    gpu.qkv_prep(
        &gpu.upload(&qkv)?,
        (&gpu.upload(&qw)?, &gpu.upload(&kw)?),
        &mut dq,
        (&mut dk, &mut dv),
        (&gpu.upload(&rope)?, &gpu.upload(&dest)?),
        (tokens, heads, kvh, hd),
        scalars,
        cache,
    )?;
    rows.push(row("qkv_prep (q)", max_err(&gpu.download(&dq)?, &hq), 1e-4));
    rows.push(row(
        "qkv_prep (k cache)",
        max_err(&gpu.download(&dk)?, &hk),
        2e-3,
    ));
    rows.push(row(
        "qkv_prep (v cache)",
        max_err(&gpu.download(&dv)?, &hv),
        0.0,
    ));
    let (tokens, ffn) = (3, 2048);
    let gu = random(tokens * 2 * ffn, 4.0);
    let mut want = vec![0u16; tokens * ffn];
    Host.geglu_bf16(&gu, &mut want, (tokens, ffn))
        .map_err(host)?;
    let mut got = gpu.zeros::<u16>(tokens * ffn)?;
    gpu.geglu_bf16(&gpu.upload(&gu)?, &mut got, (tokens, ffn))?;
    rows.push(row(
        "geglu_bf16 (relative)",
        bf16_err(&gpu.download(&got)?, &want),
        1.0 / 128.0,
    ));

    // NCCL in a world of one (one GPU allows no more): the id goes through
    // the bootstrap, the communicator forms, and a sum, a gather and a
    // broadcast give back what went in.
    use crate::collective::{Collective, CollectiveError, NcclRank, SingleRank};
    let values = random(1000, 3.0);
    let nccl = || -> Result<f64, CollectiveError> {
        let rank = NcclRank::connect(device, &SingleRank)?;
        let mut summed = values.clone();
        rank.all_reduce_sum(&mut summed)?;
        let mut gathered = vec![0f32; values.len()];
        rank.all_gather(&values, &mut gathered)?;
        let mut sent = values.clone();
        rank.broadcast(&mut sent, 0)?;
        rank.barrier()?;
        Ok(max_err(&summed, &values)
            .max(max_err(&gathered, &values))
            .max(max_err(&sent, &values)))
    };
    let name = "NCCL, world of one (sum, gather, broadcast)";
    match nccl() {
        Ok(err) => rows.push(row(name, err, 0.0)),
        // A failure is this row's result, not the end of the check.
        Err(e) => rows.push(json!({"kernel": name, "error": e.to_string(), "ok": false})),
    }
    Ok(rows)
}

/// The index of the largest value (the first of equals).
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}
