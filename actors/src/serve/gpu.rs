//! GPU shard assembly (`--features cuda`): the ranks of a group in this
//! process, one GPU each, joined by NCCL.

use std::path::Path;
use std::time::Duration;

use kernels::collective::Collective;
use kernels::cuda::Gpu;

use super::{Placement, ServeError, load_ranks};
use crate::Tokenizer;
use crate::gemma::Gemma;
use crate::gemma::device::GpuGemma;
use crate::gemma::engine::{DeviceShard, ShardModel};

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Uploads `gemma` (a rank of its group, joined to its peers by
/// `collective`) to GPU `device`: refuses, before uploading, bf16 weights
/// larger than the GPU's free memory, and says what went up.
pub fn upload_rank(
    gemma: &Gemma,
    device: usize,
    collective: Box<dyn Collective>,
) -> Result<GpuGemma, ServeError> {
    let gpu = Gpu::new(device)?;
    let info = gpu.describe()?;
    let need = Gemma::random_weight_bytes(
        gemma.config(),
        gemma.collective().world(),
        gemma.shard().rank,
        kernels::gguf::GgmlType::BF16,
    )?;
    if need > info.memory.0 {
        return Err(ServeError::GpuTooSmall {
            need_gib: gib(need),
            gpu: info.name,
            free_gib: gib(info.memory.0),
        });
    }
    let started = std::time::Instant::now();
    let model = GpuGemma::upload_rank(gemma, gpu, collective, |_, _| {})?;
    eprintln!(
        "uploaded to {} (GPU {device}): {:.2} GiB of bf16 weights in {:.1} s; {:.1} of {:.1} GiB were free",
        info.name,
        gib(model.weight_bytes()),
        started.elapsed().as_secs_f64(),
        gib(info.memory.0),
        gib(info.memory.1),
    );
    Ok(model)
}

/// The GPU shard models of a `devices.len()`-way group in this process:
/// one thread per GPU loads its rank's slices (on the CPU, from the file),
/// joins an NCCL group (the unique id travels over in-process ranks) and
/// uploads, each with `sequences` caches of `context` positions. One
/// device is the plain single-rank model. Returns them in rank order, with
/// the tokenizer.
pub fn gpu_shards(
    path: &Path,
    devices: &[usize],
    (sequences, context): (usize, usize),
    timeout: Duration,
) -> Result<(Vec<Box<dyn ShardModel>>, Tokenizer), ServeError> {
    let tp = devices.len();
    if tp == 0 {
        return Err(ServeError::NoGpu);
    }
    let ranks = load_ranks(path, tp, Placement::InProcess, timeout)?;
    let tokenizer = ranks[0].tokenizer().clone();
    let boot = kernels::collective::local_group(tp, timeout);
    let handles: Vec<_> = ranks
        .into_iter()
        .zip(boot)
        .zip(devices.iter().copied())
        .map(|((gemma, link), device)| {
            std::thread::spawn(move || -> Result<Box<dyn ShardModel>, ServeError> {
                let collective: Box<dyn Collective> = if tp == 1 {
                    Box::new(kernels::collective::SingleRank)
                } else {
                    Box::new(kernels::collective::NcclRank::connect(device, &link)?)
                };
                let model = upload_rank(&gemma, device, collective)?;
                let shard = DeviceShard::new(model, sequences, context)?;
                Ok(Box::new(shard))
            })
        })
        .collect();
    let mut shards = Vec::with_capacity(tp);
    for (rank, h) in handles.into_iter().enumerate() {
        shards.push(h.join().map_err(|_| ServeError::RankPanicked { rank })??);
    }
    Ok((shards, tokenizer))
}
