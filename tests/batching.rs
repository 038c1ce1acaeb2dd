//! Continuous batching's core on the real Gemma 3 270M model: one decode
//! step for several sequences at once gives each sequence what decoding it
//! alone gives.

use actors::gemma::{Gemma, KvCache, argmax};

fn model() -> Gemma {
    match actors::models::resolve("gemma3-270m").unwrap() {
        actors::models::ModelSource::Gguf(path) => Gemma::load(&path).unwrap(),
        other => panic!("{other:?}"),
    }
}

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "1, 2, 3, 4,",
];

/// Greedy steps of one sequence alone: (tokens, logits per step).
fn alone(gemma: &Gemma, prompt: &str, steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let vocab = gemma.config().vocab;
    let ids = gemma.tokenizer().encode(prompt, true, false);
    let mut cache = gemma.new_cache();
    let mut logits = vec![0f32; vocab];
    gemma.prefill(&ids, &mut cache, Some(&mut logits)).unwrap();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        all.push(logits.clone());
        let next = argmax(&logits);
        tokens.push(next);
        gemma.forward(next, &mut cache, Some(&mut logits)).unwrap();
    }
    (tokens, all)
}

#[test]
fn a_batched_decode_step_equals_decoding_each_sequence_alone() {
    let gemma = model();
    let vocab = gemma.config().vocab;
    let steps = 5;
    let expected: Vec<_> = PROMPTS.iter().map(|p| alone(&gemma, p, steps)).collect();

    // Prefill each sequence, then decode all three together.
    let mut caches: Vec<KvCache> = Vec::new();
    let mut next = Vec::new();
    for p in PROMPTS {
        let ids = gemma.tokenizer().encode(p, true, false);
        let mut cache = gemma.new_cache();
        let mut logits = vec![0f32; vocab];
        gemma.prefill(&ids, &mut cache, Some(&mut logits)).unwrap();
        next.push(argmax(&logits));
        caches.push(cache);
    }
    let mut tokens: Vec<Vec<u32>> = next.iter().map(|t| vec![*t]).collect();
    let mut worst = 0f32;
    let mut logits = vec![0f32; PROMPTS.len() * vocab];
    for step in 1..steps {
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        gemma.decode(&next, &mut refs, &mut logits).unwrap();
        for (s, row) in logits.chunks_exact(vocab).enumerate() {
            let want = &expected[s].1[step];
            worst = row
                .iter()
                .zip(want)
                .fold(worst, |w, (a, b)| w.max((a - b).abs()));
            next[s] = argmax(row);
            tokens[s].push(next[s]);
        }
    }
    eprintln!("batched decode: largest logit difference from decoding alone {worst:e}");
    for (s, (want, _)) in expected.iter().enumerate() {
        assert_eq!(&tokens[s], want, "sequence {s}: greedy tokens");
    }
    assert!(worst < 1e-4, "logits differ by {worst}");
    // The caches hold each sequence's own length.
    for (cache, p) in caches.iter().zip(PROMPTS) {
        let prompt = gemma.tokenizer().encode(p, true, false).len();
        assert_eq!(cache.len(), prompt + steps - 1);
    }
}
