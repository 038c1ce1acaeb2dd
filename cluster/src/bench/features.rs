//! `dima bench features`: the ads pipeline with its event-time stages —
//! source → parse → watermark → attribution → four windowed features →
//! examples (counted, not written; no learner) — through `dima up` per
//! layout, next to the plain parse-and-count pipeline (`dima bench events`)
//! on the same file in the same run.
//!
//! Isolates: what attribution and the features cost on top of reading,
//! parsing and counting. Leaves out: the learner, sinks, Kafka.
//! Anchor: the plain pipeline on the same file and layout, same run.
//! Run: `target/release/dima bench features --events 1000000 --repeat 3`.

use std::path::Path;

use anyhow::{Context, bail};

use super::{Layout, manifest_head, median, timed_up};

/// The event-time stages of the benchmark: attribution and four features.
const STAGES: &str = r#"
[pipelines.ads.time]
watermark_delay_s = 20

[pipelines.ads.attribution]
window_s = 600

[[pipelines.ads.features]]
name = "member_clicks_1h"
key = "member_id"
measure = "clicks"
window_s = 3600

[[pipelines.ads.features]]
name = "member_impressions_1h"
key = "member_id"
measure = "impressions"
window_s = 3600

[[pipelines.ads.features]]
name = "campaign_clicks_10m"
key = "campaign_id"
measure = "clicks"
window_s = 600

[[pipelines.ads.features]]
name = "country_impressions_10m"
key = "context.country"
measure = "impressions"
window_s = 600
"#;

/// Runs the ads pipeline over `path` on `layout` (with the event-time
/// stages when `stages`); returns the wall time after checking the counts.
fn time_run(
    exe: &Path,
    dir: &Path,
    layout: Layout,
    path: &Path,
    stages: bool,
    events: u64,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let name = if stages { "features" } else { "plain" };
    let manifest = dir.join(format!("{name}-{layout}.toml"));
    let mut text = manifest_head(layout)?;
    text.push_str(&format!(
        "[pipelines.ads]\nepoch_events = 20000\n\n[pipelines.ads.source]\nkind = \"jsonl\"\npath = \"{}\"\n\n[pipelines.ads.dead_letter]\npath = \"{}\"\n",
        path.display(),
        dir.join(format!("dead-{name}-{layout}.jsonl")).display()
    ));
    if stages {
        text.push_str(STAGES);
    }
    std::fs::write(&manifest, text).with_context(|| format!("writing {}", manifest.display()))?;
    let (elapsed, got) = timed_up(exe, &manifest, "pipelines", layout)?;
    let ads = &got["pipelines"][0];
    if ads["read"].as_u64() != Some(events) {
        bail!(
            "layout {layout}: read {} events, expected {events}",
            ads["read"]
        );
    }
    if stages && ads["examples"]["written"].as_u64().unwrap_or(0) == 0 {
        bail!("layout {layout}: no examples: {ads}");
    }
    Ok((elapsed, ads.clone()))
}

/// `dima bench features`: events/s of the ads pipeline with attribution and
/// four windowed features, per layout, next to the plain pipeline on the
/// same file in the same run. One JSON line per layout.
pub fn bench_features(
    exe: &Path,
    events: u64,
    layouts: &[Layout],
    repeat: usize,
) -> anyhow::Result<()> {
    use dataflows::events::Family;
    use dataflows::pipelines::GeneratorSpec;

    let repeat = repeat.max(1);
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("ads.jsonl");
    // Out of order (up to 10 s) with 0.2% of the events 5 minutes late.
    let spec = GeneratorSpec {
        events,
        seed: 1,
        jitter_ms: 10_000,
        late_fraction: 0.002,
        ..GeneratorSpec::new(Family::Ads)
    };
    crate::events::generate(
        &spec,
        &format!("jsonl:{}", path.display()),
        4,
        Default::default(),
    )?;
    let mut one_process: Option<f64> = None;
    for layout in layouts {
        let (mut plain, mut staged) = (Vec::new(), Vec::new());
        let mut summary = serde_json::Value::Null;
        for _ in 0..repeat {
            plain.push(time_run(exe, dir.path(), *layout, &path, false, events)?.0);
            let (wall, ads) = time_run(exe, dir.path(), *layout, &path, true, events)?;
            staged.push(wall);
            summary = ads;
        }
        let (plain_s, staged_s) = (median(plain), median(staged));
        let rate = events as f64 / staged_s;
        if layout.processes == 1 && layout.workers == 1 {
            one_process = Some(rate);
        }
        let row = serde_json::json!({
            "bench": "features",
            "layout": layout.to_string(),
            "events": events,
            "features_wall_s": staged_s,
            "features_events_per_s": rate,
            "plain_wall_s": plain_s,
            "plain_events_per_s": events as f64 / plain_s,
            "ratio_to_plain": plain_s / staged_s,
            "ratio_to_1x1": one_process.map(|r| rate / r),
            "late": summary["late"],
            "examples": summary["examples"]["written"],
            "positives": summary["attribution"]["positives"],
            "orphan_clicks": summary["attribution"]["orphan_clicks"],
        });
        println!("{row}");
    }
    Ok(())
}
