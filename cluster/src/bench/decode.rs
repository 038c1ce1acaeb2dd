//! `dima bench decode`: aggregate decode tokens/s when several sequences
//! take each step together (the core of continuous batching), per batch
//! size, next to one sequence alone in the same run.

use std::time::Instant;

use super::{bench_prompt, levels_with_one};

/// `dima bench decode`: aggregate decode tokens per second when `batch`
/// sequences take each step together ([`actors::gemma::Gemma::decode`]),
/// for each batch size, next to one sequence alone in the same run (the
/// anchor, batch 1). Each sequence has its own prompt of `prompt_tokens`
/// tokens, prefilled first (not timed); then `steps` greedy steps are
/// timed. One JSON value per batch size.
pub fn bench_decode(
    gemma: &actors::gemma::Gemma,
    batches: &[usize],
    prompt_tokens: usize,
    steps: usize,
    threads: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    use actors::gemma::{KvCache, argmax};
    let vocab = gemma.config().vocab;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()?;
    let sizes = levels_with_one(batches);
    let mut rows = Vec::new();
    let mut single = None;
    for &b in &sizes {
        let (seconds, generated) = pool.install(|| -> anyhow::Result<(f64, usize)> {
            let mut caches: Vec<KvCache> = Vec::with_capacity(b);
            let mut next = Vec::with_capacity(b);
            let mut logits = vec![0f32; vocab];
            for s in 0..b {
                // Different prompts: each starts at its own offset of the text.
                let ids = bench_prompt(gemma.tokenizer(), prompt_tokens, s * 7);
                let mut cache = gemma.new_cache();
                gemma.prefill(&ids, &mut cache, Some(&mut logits))?;
                next.push(argmax(&logits));
                caches.push(cache);
            }
            let mut step_logits = vec![0f32; b * vocab];
            let started = Instant::now();
            for _ in 0..steps {
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                gemma.decode(&next, &mut refs, &mut step_logits)?;
                for (t, row) in next.iter_mut().zip(step_logits.chunks_exact(vocab)) {
                    *t = argmax(row);
                }
            }
            Ok((started.elapsed().as_secs_f64(), b * steps))
        })?;
        let rate = generated as f64 / seconds;
        let base = *single.get_or_insert(rate);
        rows.push(serde_json::json!({
            "bench": "decode",
            "batch": b,
            "prompt_tokens": prompt_tokens,
            "steps": steps,
            "threads": threads,
            "seconds": seconds,
            "tokens_per_s": rate,
            "per_sequence_tokens_per_s": rate / b as f64,
            "over_batch_1": rate / base,
            "weight_bytes": gemma.weight_bytes(),
            "weight_bytes_per_s": gemma.weight_bytes() as f64 * steps as f64 / seconds,
        }));
    }
    Ok(rows)
}
