//! Choosing the next token: greedy, or seeded sampling with temperature,
//! top-k and top-p (applied in llama.cpp's order: top-k, top-p, temperature).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling parameters, validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A sampling parameter out of range.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("--{flag} {value}: {reason}")]
pub struct SamplingError {
    /// The flag.
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// The allowed range.
    pub reason: &'static str,
}

impl Sampling {
    /// Checks the ranges.
    pub fn check(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError {
                flag: "temperature",
                value: self.temperature.to_string(),
                reason: "must be a finite number >= 0 (0 is greedy)",
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError {
                flag: "top-p",
                value: self.top_p.to_string(),
                reason: "must be in (0, 1]",
            });
        }
        Ok(())
    }
}

/// Draws tokens according to [`Sampling`].
#[derive(Debug)]
pub struct Sampler {
    params: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: Sampling) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    /// The next token for `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Highest logit first, ties by token id: a total order, so the
        // top k found by selection and then sorted are exactly the first k
        // of a full sort (which over a 262,144-token vocabulary costs far
        // more than the selection).
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let all = || -> Vec<(u32, f32)> {
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect()
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let top_p = f64::from(p.top_p);
        let mut candidates = if p.top_k > 0 && p.top_k < logits.len() {
            let mut top = all();
            top.select_nth_unstable_by(p.top_k - 1, order);
            top.truncate(p.top_k);
            top.sort_by(order);
            nucleus(top, max, None, top_p)
        } else if top_p < 1.0 {
            // The nucleus without sorting the vocabulary: the tokens within
            // `gap` of the top, sorted, are the first entries of the full
            // order (every other token is less likely than each of them);
            // once their mass reaches top-p the cut lies among them. The
            // gap widens until it does (a peaked distribution stops at
            // the first).
            let total: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
            let mut cut = None;
            for gap in GAPS {
                let mut near: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .filter(|&(_, &l)| l >= max - gap)
                    .map(|(i, &l)| (i as u32, l))
                    .collect();
                let mass: f64 = near.iter().map(|c| f64::from(c.1 - max).exp()).sum();
                if mass / total >= top_p || gap == f32::INFINITY {
                    near.sort_by(order);
                    cut = Some(nucleus(near, max, Some(total), top_p));
                    break;
                }
            }
            cut.unwrap_or_default()
        } else {
            // No cut: every token, in id order.
            all()
        };
        if candidates.is_empty() {
            candidates.push((argmax(logits), max));
        }
        let scaled: Vec<f64> = candidates
            .iter()
            .map(|c| (f64::from(c.1 - max) / f64::from(p.temperature)).exp())
            .collect();
        let total: f64 = scaled.iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (c, w) in candidates.iter().zip(&scaled) {
            if draw < *w {
                return c.0;
            }
            draw -= w;
        }
        candidates[candidates.len() - 1].0
    }
}

/// A token's log-probability under the model's raw distribution (the
/// log-softmax of the logits, before temperature, top-k or top-p: what
/// OpenAI's and vLLM's `logprobs` report), with the `k` most likely tokens
/// and theirs.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// log p(token).
    pub logprob: f32,
    /// The `k` most likely tokens, most likely first (ties by id): (id,
    /// log-probability).
    pub top: Vec<(u32, f32)>,
}

/// [`TokenLogprob`] of `token` under `logits`, with the top `k` (in f64,
/// then rounded: the sum over the vocabulary is exact to f32 precision).
pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    let norm = f64::from(max) + sum.ln();
    let lp = |id: u32| (f64::from(logits[id as usize]) - norm) as f32;
    let k = k.min(logits.len());
    let mut top = Vec::with_capacity(k);
    if k > 0 {
        let order = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        if k < ids.len() {
            ids.select_nth_unstable_by(k - 1, order);
            ids.truncate(k);
        }
        ids.sort_by(order);
        top.extend(ids.into_iter().map(|id| (id, lp(id))));
    }
    TokenLogprob {
        logprob: lp(token),
        top,
    }
}

/// How far below the largest logit the tries at a top-p cut look, in turn
/// (the last takes every token).
const GAPS: [f32; 5] = [4.0, 8.0, 16.0, 32.0, f32::INFINITY];

/// The shortest prefix of `sorted` (most likely first) whose probability
/// at temperature 1 reaches `top_p`, as llama.cpp cuts; `total` is the
/// mass of the whole distribution (`None`: of `sorted`), relative to the
/// largest logit `max`.
fn nucleus(
    mut sorted: Vec<(u32, f32)>,
    max: f32,
    total: Option<f64>,
    top_p: f64,
) -> Vec<(u32, f32)> {
    let weights: Vec<f64> = sorted.iter().map(|c| f64::from(c.1 - max).exp()).collect();
    let total = total.unwrap_or_else(|| weights.iter().sum());
    let mut kept = 0;
    let mut mass = 0.0;
    for w in &weights {
        kept += 1;
        mass += w / total;
        if mass >= top_p {
            break;
        }
    }
    sorted.truncate(kept.max(1));
    sorted
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_temperature_is_greedy_and_seeds_repeat() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(Sampling::default()).sample(&logits), 1);
        let params = Sampling {
            temperature: 1.0,
            seed: 7,
            ..Sampling::default()
        };
        let a: Vec<u32> = (0..50)
            .scan(Sampler::new(params), |s, _| Some(s.sample(&logits)))
            .collect();
        let b: Vec<u32> = (0..50)
            .scan(Sampler::new(params), |s, _| Some(s.sample(&logits)))
            .collect();
        assert_eq!(a, b);
        assert!(
            a.contains(&1) && a.contains(&2),
            "both likely tokens are drawn: {a:?}"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_draw() {
        let logits = [5.0f32, 4.9, 0.0, 0.0, 0.0];
        let top_k = Sampling {
            temperature: 5.0,
            top_k: 2,
            seed: 1,
            ..Sampling::default()
        };
        let mut s = Sampler::new(top_k);
        assert!((0..200).all(|_| s.sample(&logits) < 2));
        let top_p = Sampling {
            temperature: 5.0,
            top_p: 0.5,
            seed: 1,
            ..Sampling::default()
        };
        let mut s = Sampler::new(top_p);
        assert!(
            (0..200).all(|_| s.sample(&logits) == 0),
            "token 0 alone holds half the mass"
        );
    }

    /// The top-p cut found among the tokens near the top is the cut of a
    /// full sort: the same draws, seed for seed, as sorting everything.
    #[test]
    fn top_p_cut_equals_a_full_sort() {
        // The old way: sort the whole vocabulary, cut, draw in that order.
        fn full_sort(logits: &[f32], p: Sampling, rng: &mut StdRng) -> u32 {
            let mut all: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let max = all[0].1;
            let total: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
            let kept = nucleus(all, max, Some(total), f64::from(p.top_p));
            let scaled: Vec<f64> = kept
                .iter()
                .map(|c| (f64::from(c.1 - max) / f64::from(p.temperature)).exp())
                .collect();
            let mut draw = rng.random::<f64>() * scaled.iter().sum::<f64>();
            for (c, w) in kept.iter().zip(&scaled) {
                if draw < *w {
                    return c.0;
                }
                draw -= w;
            }
            kept[kept.len() - 1].0
        }
        let mut values = StdRng::seed_from_u64(9);
        for (spread, top_p) in [(1.0f32, 0.9f32), (6.0, 0.95), (20.0, 0.5), (0.1, 0.99)] {
            let logits: Vec<f32> = (0..5000).map(|_| values.random::<f32>() * spread).collect();
            let p = Sampling {
                temperature: 0.7,
                top_k: 0,
                top_p,
                seed: 4,
            };
            let mut fast = Sampler::new(p);
            let mut slow = StdRng::seed_from_u64(4);
            for _ in 0..50 {
                assert_eq!(fast.sample(&logits), full_sort(&logits, p, &mut slow));
            }
        }
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let t = token_logprob(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&v| f64::from(v).exp()).sum();
        assert!((f64::from(t.logprob) - (2.0 - z.ln())).abs() < 1e-6);
        // Most likely first, ties by id.
        let ids: Vec<u32> = t.top.iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        let mass: f64 = logits
            .iter()
            .enumerate()
            .map(|(i, _)| f64::from(token_logprob(&logits, i as u32, 0).logprob).exp())
            .sum();
        assert!((mass - 1.0).abs() < 1e-6, "{mass}");
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = Sampling {
            temperature: -1.0,
            ..Sampling::default()
        }
        .check()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--temperature -1: must be a finite number >= 0 (0 is greedy)"
        );
        let e = Sampling {
            top_p: 0.0,
            ..Sampling::default()
        }
        .check()
        .unwrap_err();
        assert_eq!(e.to_string(), "--top-p 0: must be in (0, 1]");
    }
}
