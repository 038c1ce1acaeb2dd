//! `dima gpu …`, and the GPU paths of `dima generate` and `dima bench
//! decode` (builds with `--features cuda`; without it they exit 2 saying
//! how to build one).

use actors::gemma::{Gemma, Sampling};

use super::Failure;

#[derive(Debug, clap::Subcommand)]
pub enum GpuCommand {
    /// Print the GPU's name, compute capability and memory as JSON.
    Info {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// The same model on the CPU and on GPU `device`: per prompt, the last
    /// position's logits and teacher-forced greedy steps; one JSON line each.
    Parity {
        /// A catalog name or model file; with --random-weights, a size preset.
        #[arg(long, default_value = "gemma3-270m")]
        model: String,
        /// Build the preset with random bf16 weights (seeded) instead.
        #[arg(long)]
        random_weights: bool,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Teacher-forced steps per prompt.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Run the device model on the plain-Rust host device instead of a
        /// GPU (the same forward pass and bf16 roundings; no CUDA needed).
        #[arg(long)]
        host: bool,
    },
    /// Time one decode step's matrix products of a size preset (each
    /// projection shape and the LM head) on cuBLAS and on our gemv kernel,
    /// per token count; one JSON line per shape and count.
    Gemm {
        /// A size preset: gemma3-270m, gemma3-1b, gemma3-4b, gemma3-12b or
        /// gemma3-27b.
        #[arg(long, default_value = "gemma3-27b")]
        model: String,
        /// Token counts (rows of activations).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
        tokens: Vec<usize>,
        /// Timed repetitions of each product.
        #[arg(long, default_value_t = 20)]
        repeat: usize,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Run every CUDA kernel on random inputs against its CPU reference; one
    /// JSON line each (`kernel`, `max_abs_err`, `tolerance`, `ok`). Exit 1
    /// when one is off.
    Check {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Failure {
    Failure::invalid(actors::ServeError::NoCuda)
}

/// `dima generate --backend cuda`: one rank on GPU `device`.
#[cfg(feature = "cuda")]
pub fn generate_on_gpu(
    gemma: &Gemma,
    device: usize,
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
) -> Result<Vec<u32>, Failure> {
    let model =
        actors::serve::upload_rank(gemma, device, Box::new(kernels::collective::SingleRank))?;
    let mut sampler = actors::gemma::Sampler::new(sampling);
    Ok(actors::gemma::device::generate(
        &model,
        prompt,
        max_tokens,
        &mut sampler,
        |_| {},
    )?)
}

/// `dima generate --backend cuda` without CUDA: exit 2.
#[cfg(not(feature = "cuda"))]
pub fn generate_on_gpu(
    _gemma: &Gemma,
    _device: usize,
    _prompt: &[u32],
    _max_tokens: usize,
    _sampling: Sampling,
) -> Result<Vec<u32>, Failure> {
    Err(no_cuda())
}

/// `dima bench decode --backend cuda`: every batch size on each `--gemm` path.
#[cfg(feature = "cuda")]
pub fn bench_decode_on_gpu(
    gemma: &Gemma,
    device: usize,
    batch: &[usize],
    prompt_tokens: usize,
    steps: usize,
    gemm: &[String],
) -> Result<Vec<serde_json::Value>, Failure> {
    let paths = gemm
        .iter()
        .map(|name| kernels::cuda::GemmPath::parse(name))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::usage(format!("--gemm: {e}")))?;
    let model =
        actors::serve::upload_rank(gemma, device, Box::new(kernels::collective::SingleRank))?;
    let mut rows = Vec::new();
    for path in paths {
        model.gpu().set_gemm_path(path);
        for mut row in crate::bench::gpu::bench_decode(&model, batch, prompt_tokens, steps)? {
            row["gemm"] = serde_json::json!(path.name());
            rows.push(row);
        }
    }
    Ok(rows)
}

/// `dima bench decode --backend cuda` without CUDA: exit 2.
#[cfg(not(feature = "cuda"))]
pub fn bench_decode_on_gpu(
    _gemma: &Gemma,
    _device: usize,
    _batch: &[usize],
    _prompt_tokens: usize,
    _steps: usize,
    _gemm: &[String],
) -> Result<Vec<serde_json::Value>, Failure> {
    Err(no_cuda())
}

/// `dima gpu …`.
#[cfg(feature = "cuda")]
pub fn run(command: &GpuCommand) -> Result<(), Failure> {
    match command {
        GpuCommand::Info { device } => {
            println!("{}", kernels::cuda::info(*device)?);
            Ok(())
        }
        GpuCommand::Parity {
            model,
            random_weights,
            device,
            steps,
            host,
        } => {
            let gemma = if *random_weights {
                crate::models::random_gemma(model, kernels::gguf::GgmlType::BF16, 1 << 30, 7)?
            } else {
                super::load_gemma(model)?
            };
            let texts = [
                "The capital of France is",
                "Write a haiku about the sea:",
                "def fibonacci(n):",
                "Les enfants jouent dans le jardin et",
                "1, 2, 3, 4,",
                "Explain why the sky is blue.",
            ];
            let prompts: Vec<Vec<u32>> = texts
                .iter()
                .map(|t| gemma.tokenizer().encode(t, true, false))
                .collect();
            let rows = if *host {
                let model = actors::gemma::device::DeviceGemma::upload(
                    &gemma,
                    kernels::device::Host,
                    |_, _| {},
                )?;
                actors::gemma::device::parity(&gemma, &model, &prompts, *steps, None)
            } else {
                let model = actors::serve::upload_rank(
                    &gemma,
                    *device,
                    Box::new(kernels::collective::SingleRank),
                )?;
                actors::gemma::device::parity(&gemma, &model, &prompts, *steps, None)
            };
            for row in rows? {
                println!("{row}");
            }
            Ok(())
        }
        GpuCommand::Gemm {
            model,
            tokens,
            repeat,
            device,
        } => {
            let config = crate::models::preset(model).map_err(Failure::invalid)?;
            for row in crate::bench::gpu::bench_gemm(*device, &config, tokens, *repeat)? {
                println!("{row}");
            }
            Ok(())
        }
        GpuCommand::Check { device, seed } => {
            let rows = kernels::cuda::check_kernels(*device, *seed)?;
            let failed: Vec<String> = rows
                .iter()
                .filter(|r| r["ok"] != true)
                .map(|r| r["kernel"].as_str().unwrap_or("?").to_owned())
                .collect();
            for row in &rows {
                println!("{row}");
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(Failure::failed(anyhow::anyhow!(
                    "{} of {} kernel checks failed: {}",
                    failed.len(),
                    rows.len(),
                    failed.join(", ")
                )))
            }
        }
    }
}

/// `dima gpu …` without CUDA: exit 2.
#[cfg(not(feature = "cuda"))]
pub fn run(_command: &GpuCommand) -> Result<(), Failure> {
    Err(no_cuda())
}
