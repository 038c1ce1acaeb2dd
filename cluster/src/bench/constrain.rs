//! `dima bench constrain`: what structured output costs per token. A JSON
//! document valid under a schema is fed token by token through the
//! llguidance constraint (mask the logits, follow the token); next to it,
//! in the same run, the two things every decoded token costs anyway: the
//! sampler's draw over the vocabulary and one decode step of the model.

use std::time::Instant;

use actors::gemma::constrain::{Grammar, Guide};
use actors::gemma::{Gemma, Sampler, Sampling};
use anyhow::{Context, bail};

/// The schema the benchmark document follows.
fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "people": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "age": {"type": "integer", "minimum": 0},
                        "city": {"type": "string"},
                        "tags": {"type": "array", "items": {"type": "string"}}
                    },
                    "required": ["name", "age", "city", "tags"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["people"],
        "additionalProperties": false
    })
}

/// A document of at least `tokens` tokens that the schema accepts.
fn document(gemma: &Gemma, tokens: usize) -> String {
    let names = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald"];
    let cities = ["London", "Arlington", "Manchester", "Austin", "Boston"];
    let mut people = Vec::new();
    loop {
        let i = people.len();
        let tags = &["math", "code", "logic"][..1 + i % 3];
        people.push(serde_json::json!({
            "name": format!("{} {}", names[i % names.len()], i),
            "age": 20 + (i * 7) % 60,
            "city": cities[i % cities.len()],
            "tags": tags,
        }));
        let text = serde_json::json!({ "people": people }).to_string();
        if gemma.tokenizer().encode(&text, false, false).len() >= tokens {
            return text;
        }
    }
}

/// `dima bench constrain`: one JSON row.
pub fn bench_constrain(
    model: &std::path::Path,
    tokens: usize,
) -> anyhow::Result<serde_json::Value> {
    let gemma = Gemma::load(model)?;
    let tokenizer = std::sync::Arc::new(gemma.tokenizer().clone());
    let started = Instant::now();
    let guide = Guide::new(tokenizer).context("setting up llguidance")?;
    let setup_s = started.elapsed().as_secs_f64();
    let text = document(&gemma, tokens.max(1));
    let ids = gemma.tokenizer().encode(&text, false, false);
    let vocab = gemma.config().vocab;

    // The constraint: compile, then mask and follow every token.
    let started = Instant::now();
    let mut constraint = guide.constraint(&Grammar::JsonSchema(schema()))?;
    let compile_s = started.elapsed().as_secs_f64();
    let mut logits = vec![0f32; vocab];
    let started = Instant::now();
    let mut complete = false;
    for (i, &id) in ids.iter().enumerate() {
        logits.fill(0.0);
        constraint.mask(&mut logits)?;
        if logits[id as usize] == f32::NEG_INFINITY {
            bail!("token {i} ({id}) of a valid document was masked");
        }
        complete = constraint.advance(id)?;
    }
    let constrained_s = started.elapsed().as_secs_f64() / ids.len() as f64;
    if !complete {
        bail!("the schema did not end with the document");
    }

    // What every token costs anyway: a decode step, and a draw from the
    // logits it gives.
    let mut cache = gemma.new_cache();
    let mut out = vec![0f32; vocab];
    gemma.prefill(&ids[..16.min(ids.len())], &mut cache, None)?;
    let steps = 16;
    let started = Instant::now();
    for &id in ids.iter().cycle().take(steps) {
        gemma.forward(id, &mut cache, Some(&mut out))?;
    }
    let decode_s = started.elapsed().as_secs_f64() / steps as f64;
    let mut sampler = Sampler::new(Sampling {
        temperature: 0.8,
        top_k: 0,
        top_p: 0.95,
        seed: 1,
    });
    let started = Instant::now();
    for _ in 0..ids.len() {
        std::hint::black_box(sampler.sample(&out));
    }
    let sample_s = started.elapsed().as_secs_f64() / ids.len() as f64;
    Ok(serde_json::json!({
        "bench": "constrain",
        "grammar": "json_schema (an array of objects with strings, integers and string arrays)",
        "tokens": ids.len(),
        "guide_setup_s": setup_s,
        "schema_compile_s": compile_s,
        "mask_and_follow_us_per_token": constrained_s * 1e6,
        "sample_us_per_token": sample_s * 1e6,
        "decode_step_us": decode_s * 1e6,
        "over_decode_step": constrained_s / decode_s,
        "over_sample": constrained_s / sample_s,
    }))
}
