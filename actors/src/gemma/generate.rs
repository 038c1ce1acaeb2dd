//! Generation and scoring loops over [`Gemma::forward`].

use std::time::Instant;

use super::config::LayerKind;
use super::model::Gemma;
use super::sampling::Sampler;

/// llama.cpp's end-of-generation set for the Gemma 3 GGUF: `<eos>`,
/// `<end_of_turn>`, `</s>`.
pub const END_OF_GENERATION: [u32; 3] = [1, 106, 212];

/// What one generation did, for `--stats`.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationStats {
    /// Prompt tokens (BOS included).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Seconds spent on the prompt.
    pub prefill_s: f64,
    /// Seconds spent generating.
    pub decode_s: f64,
    /// KV-cache bytes per token per layer (K and V, f32).
    pub kv_bytes_per_token_per_layer: usize,
    /// KV-cache bytes held at the end.
    pub kv_bytes: usize,
    /// What the formula says they should be: Σ over layers of
    /// min(positions, window on local layers) × bytes per token per layer.
    pub kv_bytes_formula: usize,
}

/// Why generation could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GenerateError {
    /// The prompt does not fit the model's context.
    #[error("the prompt has {prompt} tokens; the model's context is {context}")]
    PromptTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Context length.
        context: usize,
    },
    /// Nothing to run.
    #[error("the prompt is empty (not even a BOS token)")]
    EmptyPrompt,
    /// A tensor-parallel peer failed.
    #[error(transparent)]
    Collective(#[from] kernels::collective::CollectiveError),
}

/// Runs the prompt, then generates up to `max_tokens` tokens with `sampler`
/// (never past the context), calling `on_token` with each; stops after an
/// end-of-generation token, which is included in the result as llama.cpp does.
pub fn generate(
    model: &Gemma,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerationStats), GenerateError> {
    let context = model.config().context;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() > context {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            context,
        });
    }
    let mut cache = model.new_cache();
    let mut logits = vec![0f32; model.config().vocab];
    let started = Instant::now();
    model.prefill(prompt, &mut cache, Some(&mut logits))?;
    let prefill_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut out = Vec::new();
    for _ in 0..max_tokens.min(context - prompt.len()) {
        let next = sampler.sample(&logits);
        out.push(next);
        on_token(next);
        if END_OF_GENERATION.contains(&next) {
            break;
        }
        model.forward(next, &mut cache, Some(&mut logits))?;
    }
    let c = model.config();
    let per_layer = c.kv_bytes_per_token_per_layer(4);
    let positions = cache.len();
    let kv_bytes_formula = c
        .layer_kinds
        .iter()
        .map(|k| match k {
            LayerKind::Local => positions.min(c.window),
            LayerKind::Global => positions,
        } * per_layer)
        .sum();
    let stats = GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: out.len(),
        prefill_s,
        decode_s: started.elapsed().as_secs_f64(),
        kv_bytes_per_token_per_layer: per_layer,
        kv_bytes: cache.bytes(),
        kv_bytes_formula,
    };
    Ok((out, stats))
}

/// One position of [`score`]: the top logits there and the log-probability
/// of the token that actually follows.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// Index into the sequence.
    pub position: usize,
    /// The `k` largest logits, largest first: (id, logit).
    pub top: Vec<(u32, f32)>,
    /// log p(ids[position + 1]) under this position's distribution.
    pub next_logprob: Option<f64>,
}

/// Runs `ids` through the model once and reports, for every position from
/// `from` on, the top-`k` logits and the log-probability of the next id.
pub fn score(
    model: &Gemma,
    ids: &[u32],
    from: usize,
    k: usize,
) -> Result<Vec<Scored>, kernels::collective::CollectiveError> {
    let mut cache = model.new_cache();
    let mut logits = vec![0f32; model.config().vocab];
    let mut out = Vec::new();
    model.prefill(&ids[..from.min(ids.len())], &mut cache, None)?;
    for (position, &token) in ids.iter().enumerate().skip(from) {
        model.forward(token, &mut cache, Some(&mut logits))?;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(order.len());
        if k > 0 {
            order.select_nth_unstable_by(k - 1, |a, b| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            });
        }
        let mut top: Vec<(u32, f32)> = order[..k]
            .iter()
            .map(|&i| (i, logits[i as usize]))
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let next_logprob = ids.get(position + 1).map(|&next| {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
            logits[next as usize] as f64 - max - sum.ln()
        });
        out.push(Scored {
            position,
            top,
            next_logprob,
        });
    }
    Ok(out)
}
