//! `dima bench generate`: Gemma's prefill and decode speed on this CPU,
//! next to llama.cpp (llama-cpp-python) on the same file, prompt ids and
//! thread count, in the same run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use super::bench_prompt;

/// The llama.cpp anchor script, run with the machine's python3.
const LLAMA_CPP_BENCH: &str = include_str!("../../../scripts/reference/llama_cpp_bench.py");

/// `dima bench generate`: prefill and decode speed of Gemma on this CPU,
/// next to llama.cpp on the same file, prompt and thread count, same run.
///
/// The prompt is `prompt_tokens` ids (BOS, then a fixed English text,
/// repeated as needed); decoding is greedy for `new_tokens` steps and does
/// not stop at end-of-generation tokens, so both sides do the same work.
pub fn bench_generate(
    model_path: &Path,
    prompt_tokens: usize,
    new_tokens: usize,
    threads: usize,
    python: &str,
) -> anyhow::Result<serde_json::Value> {
    use actors::gemma::{Gemma, argmax};
    let gemma = Gemma::load(model_path)?;
    let ids = bench_prompt(gemma.tokenizer(), prompt_tokens, 0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()?;
    let (prefill_s, decode_s) = pool.install(|| {
        let mut cache = gemma.new_cache();
        let mut logits = vec![0f32; gemma.config().vocab];
        let started = Instant::now();
        gemma.prefill(&ids, &mut cache, Some(&mut logits))?;
        let prefill_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for _ in 0..new_tokens {
            let next = argmax(&logits);
            gemma.forward(next, &mut cache, Some(&mut logits))?;
        }
        Ok::<_, kernels::collective::CollectiveError>((prefill_s, started.elapsed().as_secs_f64()))
    })?;
    let prefill = ids.len() as f64 / prefill_s;
    let decode = new_tokens as f64 / decode_s;

    let anchor = Command::new(python)
        .args(["-c", LLAMA_CPP_BENCH])
        .arg(model_path)
        .arg(serde_json::to_string(&ids)?)
        .arg(new_tokens.to_string())
        .arg(threads.to_string())
        .stdin(Stdio::null())
        .output();
    let anchor = match anchor {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            serde_json::from_str::<serde_json::Value>(text.lines().last().unwrap_or_default()).ok()
        }
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            eprintln!(
                "anchor unavailable (install llama-cpp-python, see scripts/reference/llama_cpp_gemma3.py): {}",
                err.lines().last().unwrap_or_default()
            );
            None
        }
        Err(e) => {
            eprintln!("anchor unavailable: cannot run {python}: {e}");
            None
        }
    };
    let field = |key: &str| anchor.as_ref().and_then(|a| a[key].as_f64());
    let (anchor_prefill, anchor_decode) =
        (field("prefill_tokens_per_s"), field("decode_tokens_per_s"));
    Ok(serde_json::json!({
        "bench": "generate",
        "model": model_path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "kernel": format!("{:?}", kernels::quant::Kernel::detect()),
        "kernel_prompt": kernels::quant::paths().0,
        "kernel_one_token": kernels::quant::paths().1,
        "amx": kernels::quant::Int8::Amx.supported(),
        "threads": threads,
        "prompt_tokens": ids.len(),
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": decode,
        "anchor": anchor.as_ref().map(|a| format!("llama.cpp (llama-cpp-python {})", a["version"].as_str().unwrap_or("?"))),
        "anchor_prefill_tokens_per_s": anchor_prefill,
        "anchor_decode_tokens_per_s": anchor_decode,
        "prefill_ratio": anchor_prefill.map(|a| prefill / a),
        "decode_ratio": anchor_decode.map(|a| decode / a),
    }))
}
