//! `dima bench …`: end-to-end benchmarks, one file each, every one against
//! an anchor measured in the same run (the machines are shared and noisy, so
//! only ratios from one run are compared). This module holds what they
//! share: layouts, medians, loopback manifests, `dima up` timing and the
//! Python anchor scripts.

mod assign;
mod constrain;
mod count;
mod decode;
mod dispatch;
mod events;
mod features;
mod generate;
#[cfg(feature = "cuda")]
pub mod gpu;
mod learner;
mod matching;
mod serve;

pub use assign::bench_assign;
pub use constrain::bench_constrain;
pub use count::bench_count;
pub use decode::bench_decode;
pub use dispatch::{bench_dispatch, gain, plot_learning};
pub use events::bench_events;
pub use features::bench_features;
pub use generate::bench_generate;
pub use learner::{LearnerBench, bench_learner};
pub use matching::bench_matching;
pub use serve::{Mix, SharedPrefix, bench_serve, bench_serve_mix, bench_serve_shared_prefix};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

/// A processes × workers layout, written `PxW`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Processes.
    pub processes: usize,
    /// Workers per process.
    pub workers: usize,
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (p, w) = text
            .split_once('x')
            .ok_or_else(|| format!("{text:?} is not PxW, e.g. 2x1"))?;
        let parse = |s: &str| s.parse::<usize>().ok().filter(|n| (1..=64).contains(n));
        match (parse(p), parse(w)) {
            (Some(processes), Some(workers)) => Ok(Self { processes, workers }),
            _ => Err(format!(
                "{text:?} is not PxW with 1 to 64 of each, e.g. 2x1"
            )),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.processes, self.workers)
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The cluster part of a loopback manifest for `layout`, on free ports.
pub(crate) fn manifest_head(layout: Layout) -> anyhow::Result<String> {
    let mut text =
        String::from("[cluster]\nname = \"bench\"\n\n[telemetry]\nlog_level = \"warn\"\n\n");
    for _ in 0..layout.processes {
        text.push_str(&format!(
            "[[dataflow.processes]]\naddress = \"127.0.0.1:{}\"\nworkers = {}\n\n",
            free_port()?,
            layout.workers
        ));
    }
    Ok(text)
}

/// Runs `dima up MANIFEST --job JOB` as a user would; returns its wall time
/// and its result line.
pub(crate) fn timed_up(
    exe: &Path,
    manifest: &Path,
    job: &str,
    layout: Layout,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let started = Instant::now();
    let output = Command::new(exe)
        .arg("up")
        .arg(manifest)
        .args(["--job", job])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running dima up")?;
    let elapsed = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("dima up ({layout}) failed: {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let got = serde_json::from_str(last).with_context(|| format!("result line {last:?}"))?;
    Ok((elapsed, got))
}

/// The levels of a scaling benchmark: 1 (the anchor) and every positive
/// level asked for, ascending, once each.
pub(crate) fn levels_with_one(asked: &[usize]) -> Vec<usize> {
    let mut levels: Vec<usize> = std::iter::once(1)
        .chain(asked.iter().copied().filter(|l| *l > 0))
        .collect();
    levels.sort_unstable();
    levels.dedup();
    levels
}

/// A benchmark prompt of `len` tokens: BOS, then a fixed English text
/// repeated, starting `offset` tokens into it.
pub(crate) fn bench_prompt(tokenizer: &actors::Tokenizer, len: usize, offset: usize) -> Vec<u32> {
    let text = "The river carried the boat past quiet villages, old mills and green fields, \
                while the travellers counted bridges and told stories about the towns they had left behind. ";
    let unit = tokenizer.encode(text, false, false);
    let mut ids = vec![tokenizer.bos()];
    ids.extend(unit.iter().cycle().skip(offset).take(len.saturating_sub(1)));
    ids
}

pub(crate) fn median_ms<T>(repeat: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let started = std::time::Instant::now();
        last = Some(f());
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let result = last.unwrap_or_else(|| unreachable!("at least one run"));
    (median(times), result)
}

pub(crate) fn anchor(python: &str, args: &[String]) -> anyhow::Result<serde_json::Value> {
    run_script(python, "assignment_anchor.py", args)
}

/// Runs `scripts/bench/<name>` with `python`; its stdout's last line is JSON.
pub(crate) fn run_script(
    python: &str,
    name: &str,
    args: &[String],
) -> anyhow::Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/bench")
        .join(name);
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} {} failed: {}",
            python,
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.trim().lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .with_context(|| format!("{} printed {last:?}, not JSON", script.display()))
}
