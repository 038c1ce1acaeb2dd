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
    for &token in prompt {
        model.forward(token, &mut cache, &mut logits);
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
        model.forward(next, &mut cache, &mut logits);
    }
    out
}
