//! `dima gpu gemm` and `dima bench decode --backend cuda` (feature `cuda`):
//! the GPU's matrix products and batched decode, next to the memory
//! bandwidth measured in the same run.

use kernels::cuda::{GemmPath, Gpu, GpuError, bf16_bits};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// `dima gpu gemm`: the matrix products of one decode step of `config`
/// (every projection shape of a layer and the LM head) at each token count,
/// timed on both paths (cuBLAS and our `gemv_bf16`), as bytes of weights
/// read per second and as a fraction of the measured copy bandwidth.
pub fn bench_gemm(
    device: usize,
    config: &actors::gemma::GemmaConfig,
    tokens: &[usize],
    repeat: usize,
) -> Result<Vec<Value>, GpuError> {
    let gpu = Gpu::new(device)?;
    let bandwidth = gpu.copy_bandwidth(1 << 30, 20)?;
    let c = config;
    let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let shapes = [
        ("q", q, c.hidden),
        ("k/v", kv, c.hidden),
        ("o", c.hidden, q),
        ("gate/up", c.ffn, c.hidden),
        ("down", c.hidden, c.ffn),
        ("lm_head", c.vocab, c.hidden),
    ];
    let most = tokens.iter().copied().max().unwrap_or(1).max(1);
    let biggest = shapes.iter().map(|s| s.1 * s.2).max().unwrap_or(1);
    let widest = shapes.iter().map(|s| s.1.max(s.2)).max().unwrap_or(1);
    // Random bf16 weights made on the host once (small values); every
    // shape reads a prefix of them.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let table: Vec<u16> = (0..1 << 20)
        .map(|_| half::bf16::from_f32(rng.random_range(-0.05f32..0.05)).to_bits())
        .collect();
    let host: Vec<u16> = (0..biggest).map(|i| table[i & ((1 << 20) - 1)]).collect();
    let w = gpu.upload(&host)?;
    drop(host);
    let xs = gpu.upload(&bf16_bits(
        &(0..most * widest)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect::<Vec<_>>(),
    ))?;
    let mut out = gpu.zeros::<f32>(most * widest)?;
    let saved = gpu.gemm_path();
    let mut rows = Vec::new();
    for (name, r, k) in shapes {
        for &t in tokens {
            let mut row = json!({
                "bench": "gemm", "shape": name, "rows": r, "cols": k, "tokens": t,
                "weight_bytes": r * k * 2, "copy_bandwidth_bytes_per_s": bandwidth,
            });
            for path in [GemmPath::Blas, GemmPath::Gemv] {
                gpu.set_gemm_path(path);
                // The shared weights' first r × k values.
                gpu.gemm_bf16(&w, (r, k), &xs, t, &mut out)?;
                gpu.synchronize()?;
                let started = std::time::Instant::now();
                for _ in 0..repeat {
                    gpu.gemm_bf16(&w, (r, k), &xs, t, &mut out)?;
                }
                gpu.synchronize()?;
                let each = started.elapsed().as_secs_f64() / repeat.max(1) as f64;
                let rate = (r * k * 2) as f64 / each;
                row[format!("{}_us", path.name())] = json!(each * 1e6);
                row[format!("{}_of_bandwidth", path.name())] = json!(rate / bandwidth);
            }
            rows.push(row);
        }
    }
    gpu.set_gemm_path(saved);
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
        // Greedy on the device (argmax_rows): only the ids come back, as in
        // the transformers anchor.
        for _ in 0..steps {
            next = model.decode_greedy(&next, &seqs, &mut pool)?;
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
