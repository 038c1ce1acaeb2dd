//! `dima bench count`: the count job end to end, against a sequential anchor.
//!
//! For each layout (processes × workers) the bench writes a manifest on
//! loopback, runs `dima up` on it as a user would (process start-up, timely
//! connection set-up, the job, shutdown: all inside the clock), checks the
//! result against the anchor, and reports events/s. The anchor is
//! [`count_sequential`]: the same events counted by one plain loop in this
//! process, timed in the same run, so the ratio survives a noisy machine.

use std::path::Path;

use std::time::Instant;

use anyhow::{Context, bail};
use dataflows::{CountJob, count_sequential};

use super::{Layout, manifest_head, median, timed_up};

/// Writes a loopback manifest for `layout` running `job`.
pub fn write_manifest(path: &Path, layout: Layout, job: &CountJob) -> anyhow::Result<()> {
    let mut text = manifest_head(layout)?;
    text.push_str(&format!(
        "[jobs.count]\nevents = {}\nkeys = {}\nseed = {}\nepoch_events = {}\nmax_epochs_in_flight = {}\n",
        job.events, job.keys, job.seed, job.epoch_events, job.max_epochs_in_flight
    ));
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs the benchmark and prints one JSON line per layout on stdout.
pub fn bench_count(
    exe: &Path,
    job: &CountJob,
    layouts: &[Layout],
    repeat: usize,
) -> anyhow::Result<()> {
    let repeat = repeat.max(1);
    let mut anchor_times = Vec::new();
    let mut expected = None;
    for _ in 0..repeat {
        let started = Instant::now();
        expected = Some(count_sequential(job));
        anchor_times.push(started.elapsed().as_secs_f64());
    }
    let expected = expected.map(|s| s.to_json()).unwrap_or_default();
    let anchor_s = median(anchor_times);
    let anchor_rate = job.events as f64 / anchor_s;
    eprintln!(
        "anchor (sequential loop, one thread): {:.3} s, {:.0} events/s",
        anchor_s, anchor_rate
    );

    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    for layout in layouts {
        let manifest = dir.path().join(format!("bench-{layout}.toml"));
        let mut times = Vec::new();
        for _ in 0..repeat {
            write_manifest(&manifest, *layout, job)?;
            let (elapsed, got) = timed_up(exe, &manifest, "count", *layout)?;
            if got != expected {
                bail!("layout {layout}: result {got} differs from the anchor's {expected}");
            }
            times.push(elapsed);
        }
        let wall_s = median(times);
        let rate = job.events as f64 / wall_s;
        println!(
            "{}",
            serde_json::json!({
                "bench": "count",
                "layout": layout.to_string(),
                "events": job.events,
                "repeat": repeat,
                "wall_s": wall_s,
                "events_per_s": rate,
                "anchor": "sequential",
                "anchor_wall_s": anchor_s,
                "anchor_events_per_s": anchor_rate,
                "ratio_to_anchor": rate / anchor_rate,
                "result_matches_anchor": true,
            })
        );
    }
    Ok(())
}
