//! `dima bench matching`: the dispatch pipeline's matcher through
//! `dima up`, per layout: simulated seconds per wall second and the window
//! p99.

use std::path::Path;

use anyhow::Context;

use super::{Layout, manifest_head, timed_up};

/// `dima bench matching`: the dispatch pipeline with its matcher (value
/// policy) over a JSONL file of city events, through `dima up`, per layout.
/// The file's span of event time over the wall time of the run is the
/// simulated seconds per wall second; the matcher reports its window p99.
pub fn bench_matching(
    exe: &Path,
    input: &Path,
    layouts: &[Layout],
    repeat: usize,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    let (mut first, mut last, mut lines) = (i64::MAX, i64::MIN, 0u64);
    let file =
        std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        lines += 1;
        if let Ok(event) = dataflows::events::parse_line(&line) {
            first = first.min(event.event_time());
            last = last.max(event.event_time());
        }
    }
    anyhow::ensure!(
        first < last,
        "{}: no events with a time span",
        input.display()
    );
    let span_s = (last - first) as f64 / 1000.0;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    for layout in layouts {
        let mut runs = Vec::new();
        for _ in 0..repeat.max(1) {
            let manifest = dir.path().join(format!("matching-{layout}.toml"));
            let mut text = manifest_head(*layout)?;
            text.push_str(&format!(
                "[pipelines.dispatch]\nepoch_events = 20000\n\n[pipelines.dispatch.source]\nkind = \"jsonl\"\npath = \"{}\"\n\n[pipelines.dispatch.matching]\npolicy = \"value\"\n",
                input.display()
            ));
            std::fs::write(&manifest, text)
                .with_context(|| format!("writing {}", manifest.display()))?;
            let (elapsed, got) = timed_up(exe, &manifest, "pipelines", *layout)?;
            let p = &got["pipelines"][0];
            anyhow::ensure!(
                p["read"].as_u64() == Some(lines),
                "layout {layout}: read {} of {lines} lines",
                p["read"]
            );
            runs.push((elapsed, p["matching"].clone()));
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (wall_s, m) = runs.swap_remove(runs.len() / 2);
        println!(
            "{}",
            serde_json::json!({
                "bench": "matching",
                "layout": layout.to_string(),
                "events": lines,
                "simulated_s": span_s,
                "wall_s": wall_s,
                "simulated_s_per_wall_s": span_s / wall_s,
                "window_p99_ms": m["window_p99_ms"],
                "windows": m["windows"],
                "requests": m["requests"],
                "dispatched": m["dispatched"],
                "late_events": m["late_events"],
                "value_states": m["value_states"],
            })
        );
    }
    Ok(())
}
