//! Greedy generation loop over [`Gemma::forward`].

use super::model::Gemma;

/// llama.cpp's end-of-generation set for the Gemma 3 GGUF: `<eos>`,
/// `<end_of_turn>`, `</s>`.
pub const END_OF_GENERATION: [u32; 3] = [1, 106, 212];

/// The index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs the prompt, then generates up to `max_tokens` tokens greedily,
/// calling `on_token` with each; stops after an end-of-generation token.
/// Returns the generated ids (the end token included, as llama.cpp does).
pub fn generate_greedy(
    model: &Gemma,
    prompt: &[u32],
    max_tokens: usize,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut logits = vec![0f32; model.config().vocab];
    for (i, &token) in prompt.iter().enumerate() {
        let last = i + 1 == prompt.len();
        model.forward(token, &mut cache, last.then_some(&mut logits[..]));
    }
    let mut out = Vec::new();
    if prompt.is_empty() {
        return out;
    }
    for _ in 0..max_tokens {
        let next = argmax(&logits);
        out.push(next);
        on_token(next);
        if END_OF_GENERATION.contains(&next) {
            break;
        }
        model.forward(next, &mut cache, Some(&mut logits));
    }
    out
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
pub fn score(model: &Gemma, ids: &[u32], from: usize, k: usize) -> Vec<Scored> {
    let mut cache = model.new_cache();
    let mut logits = vec![0f32; model.config().vocab];
    let mut out = Vec::new();
    for (position, &token) in ids.iter().enumerate() {
        if position < from {
            model.forward(token, &mut cache, None);
            continue;
        }
        model.forward(token, &mut cache, Some(&mut logits));
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
    out
}
