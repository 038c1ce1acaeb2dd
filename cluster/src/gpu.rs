//! `dima gpu info` and `dima gpu check` (feature `cuda`): what the GPU is,
//! and every CUDA kernel against the CPU op it mirrors, on random inputs.
//! One JSON line per check: `{"kernel", "max_abs_err", "tolerance", "ok"}`.

use kernels::cuda::{Gpu, GpuError, bf16_bits};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

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
pub fn check(device: usize, seed: u64) -> Result<Vec<Value>, GpuError> {
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
        kernels::ops::rms_norm(xr, &w, 1e-6, o);
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
                kernels::ops::rope_neox(head, positions[t], base);
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
        .map(|(g, u)| kernels::ops::gelu_tanh(*g) * u)
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
    for (name, window, slots, positions) in [
        ("attention (global)", 0usize, 0usize, vec![0i32, 1, 700]),
        ("attention (local ring)", 512, 512, vec![3i32, 511, 1300]),
    ] {
        let (heads, kv_heads, hd) = (8, 2, 256);
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
    }

    // argmax_rows: exact (the lowest index among equals).
    let (r, n) = (3, 262_144);
    let mut x = random(r * n, 10.0);
    x[n + 5] = 50.0;
    x[n + 9] = 50.0;
    let want: Vec<f32> = x
        .chunks(n)
        .map(|row| actors::gemma::argmax(row) as f32)
        .collect();
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
    gpu.gemm_bf16(&dw, (wr, wc), &dxs, tokens, &mut dout)?;
    rows.push(row(
        "gemm_bf16 (640x1024, 16 rows)",
        max_err(&gpu.download(&dout)?, &want),
        1e-3,
    ));
    Ok(rows)
}

/// `dima bench decode --backend cuda`: aggregate decode tokens/s per batch
/// size on the GPU (greedy, each sequence its own prompt), next to the
/// memory-bandwidth roofline: every step reads every weight once and each
/// sequence's KV cache, so at most `batch × bandwidth / bytes_per_step`
/// tokens/s, with the bandwidth measured by device-to-device copies in the
/// same run.
pub fn bench_decode(
    model: &actors::gemma::device::GpuGemma,
    batches: &[usize],
    prompt_tokens: usize,
    steps: usize,
) -> anyhow::Result<Vec<Value>> {
    let c = model.config().clone();
    let bandwidth = model.gpu().copy_bandwidth(1 << 30, 20)?;
    let mut sizes: Vec<usize> = std::iter::once(1)
        .chain(batches.iter().copied().filter(|b| *b > 0))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let most = sizes.last().copied().unwrap_or(1);
    let mut pool = model.new_pool(most, prompt_tokens + steps + 2)?;
    let kv_row = 2 * c.kv_heads * c.head_dim * 4;
    let mut rows = Vec::new();
    let mut single = None;
    for &b in &sizes {
        let mut next = Vec::with_capacity(b);
        for s in 0..b {
            pool.clear(s);
            let prompt: Vec<u32> = std::iter::once(2)
                .chain(
                    (0..prompt_tokens.saturating_sub(1))
                        .map(|i| (1000 + 37 * (i + 11 * s)) as u32 % 200_000 + 300),
                )
                .collect();
            let logits = model.prefill(&prompt, s, &mut pool)?;
            next.push(actors::gemma::argmax(&logits));
        }
        let seqs: Vec<usize> = (0..b).collect();
        let started = std::time::Instant::now();
        for _ in 0..steps {
            let logits = model.decode(&next, &seqs, &mut pool)?;
            for (t, row) in next.iter_mut().zip(logits.chunks_exact(c.vocab)) {
                *t = actors::gemma::argmax(row);
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let rate = (b * steps) as f64 / seconds;
        let base = *single.get_or_insert(rate);
        // KV read per step: each sequence's positions on every layer
        // (local layers within the window), at the run's middle step.
        let mid = prompt_tokens + steps / 2;
        let kv: usize = c
            .layer_kinds
            .iter()
            .map(|k| match k {
                actors::gemma::LayerKind::Local => mid.min(c.window),
                actors::gemma::LayerKind::Global => mid,
            } * kv_row)
            .sum::<usize>()
            * b;
        let bytes_per_step = model.weight_bytes() + kv;
        let roofline = b as f64 * bandwidth / bytes_per_step as f64;
        rows.push(json!({
            "bench": "decode",
            "backend": "cuda",
            "batch": b,
            "prompt_tokens": prompt_tokens,
            "steps": steps,
            "seconds": seconds,
            "tokens_per_s": rate,
            "over_batch_1": rate / base,
            "weight_bytes": model.weight_bytes(),
            "bytes_per_step": bytes_per_step,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "roofline_tokens_per_s": roofline,
            "of_roofline": rate / roofline,
        }));
    }
    Ok(rows)
}

/// Uploads `gemma` (a rank of its group, joined to its peers by
/// `collective`) to GPU `device`: refuses, before uploading, bf16 weights
/// larger than the GPU's free memory, and says what went up.
pub fn upload_rank(
    gemma: &actors::gemma::Gemma,
    device: usize,
    collective: Box<dyn kernels::collective::Collective>,
) -> anyhow::Result<actors::gemma::device::GpuGemma> {
    let gib = |b: usize| crate::models::gib(b as u64);
    let gpu = Gpu::new(device)?;
    let info = gpu.describe()?;
    let need = actors::gemma::Gemma::random_weight_bytes(
        gemma.config(),
        gemma.collective().world(),
        gemma.shard().rank,
        kernels::gguf::GgmlType::BF16,
    )?;
    if need > info.memory.0 {
        anyhow::bail!(
            "the model needs {:.2} GiB of bf16 weights on {} but only {:.2} GiB are free: refusing",
            gib(need),
            info.name,
            gib(info.memory.0)
        );
    }
    let started = std::time::Instant::now();
    let model = actors::gemma::device::GpuGemma::upload_rank(gemma, gpu, collective, |_, _| {})?;
    eprintln!(
        "uploaded to {} (GPU {device}): {:.2} GiB of bf16 weights in {:.1} s; {:.1} of {:.1} GiB were free",
        info.name,
        gib(model.weight_bytes()),
        started.elapsed().as_secs_f64(),
        gib(info.memory.0),
        gib(info.memory.1),
    );
    Ok(model)
}

/// The GPU shard models of a `devices.len()`-way group in this process:
/// one thread per GPU loads its rank's slices (on the CPU, from the file),
/// joins an NCCL group (the unique id travels over in-process ranks) and
/// uploads, each with `sequences` caches of `context` positions. One
/// device is the plain single-rank model. Returns them in rank order, with
/// the tokenizer.
pub fn gpu_shards(
    path: &std::path::Path,
    devices: &[usize],
    (sequences, context): (usize, usize),
    timeout: std::time::Duration,
) -> anyhow::Result<(
    Vec<Box<dyn actors::gemma::engine::ShardModel>>,
    actors::Tokenizer,
)> {
    use actors::gemma::engine::{DeviceShard, ShardModel};
    let tp = devices.len();
    if tp == 0 {
        anyhow::bail!("no GPU to run on");
    }
    let ranks = crate::serve::load_ranks(path, tp, crate::serve::Placement::InProcess, timeout)?;
    let tokenizer = ranks[0].tokenizer().clone();
    let boot = kernels::collective::local_group(tp, timeout);
    let handles: Vec<_> = ranks
        .into_iter()
        .zip(boot)
        .zip(devices.iter().copied())
        .map(|((gemma, link), device)| {
            std::thread::spawn(move || -> anyhow::Result<Box<dyn ShardModel>> {
                let collective: Box<dyn kernels::collective::Collective> = if tp == 1 {
                    Box::new(kernels::collective::SingleRank)
                } else {
                    Box::new(kernels::collective::NcclRank::connect(device, &link)?)
                };
                let model = upload_rank(&gemma, device, collective)?;
                let shard =
                    DeviceShard::new(model, sequences, context).map_err(|e| anyhow::anyhow!(e))?;
                Ok(Box::new(shard))
            })
        })
        .collect();
    let mut shards = Vec::with_capacity(tp);
    for (rank, h) in handles.into_iter().enumerate() {
        shards.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("GPU rank {rank} panicked"))??,
        );
    }
    Ok((shards, tokenizer))
}
