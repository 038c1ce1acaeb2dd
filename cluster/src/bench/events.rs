//! `dima bench events`: the ads pipeline (parse, validate, keyed exchange,
//! count) through `dima up` from JSONL and, with `--kafka`, from a Kafka
//! topic, per layout, next to each source's ceiling in the same run.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};

use super::{Layout, manifest_head, median, timed_up};

/// One row of `dima bench events`.
fn events_row(
    source: &str,
    layout: &str,
    events: u64,
    wall_s: f64,
    ceiling: &str,
    ceiling_s: f64,
) -> serde_json::Value {
    let rate = events as f64 / wall_s;
    let ceiling_rate = events as f64 / ceiling_s;
    serde_json::json!({
        "bench": "events",
        "source": source,
        "layout": layout,
        "events": events,
        "wall_s": wall_s,
        "events_per_s": rate,
        "ceiling": ceiling,
        "ceiling_wall_s": ceiling_s,
        "ceiling_events_per_s": ceiling_rate,
        "ratio_to_ceiling": rate / ceiling_rate,
    })
}

/// Runs the `ads` pipeline (parse, validate, keyed exchange, count) over
/// `source_toml` on `layout` with `dima up`; returns the wall time after
/// checking that every event was read.
fn time_pipeline(
    exe: &Path,
    dir: &Path,
    layout: Layout,
    source_toml: &str,
    events: u64,
) -> anyhow::Result<f64> {
    let manifest = dir.join(format!("events-{layout}.toml"));
    let mut text = manifest_head(layout)?;
    text.push_str("[pipelines.ads]\nepoch_events = 20000\n\n[pipelines.ads.source]\n");
    text.push_str(source_toml);
    std::fs::write(&manifest, text).with_context(|| format!("writing {}", manifest.display()))?;
    let (elapsed, got) = timed_up(exe, &manifest, "pipelines", layout)?;
    let read = got["pipelines"][0]["read"].as_u64().unwrap_or(0);
    if read != events {
        bail!("layout {layout}: read {read} events, expected {events}");
    }
    Ok(elapsed)
}

/// `dima bench events`: events/s of the ads pipeline (parse + validate +
/// keyed exchange + count) from JSONL and, given a broker, from Kafka, per
/// layout, next to the ceiling of each source measured in the same run: one
/// thread reading the file's lines, and one plain rdkafka consumer draining
/// the topic (no parsing).
pub fn bench_events(
    exe: &Path,
    events: u64,
    layouts: &[Layout],
    repeat: usize,
    kafka: Option<&str>,
) -> anyhow::Result<()> {
    use std::io::BufRead;

    use dataflows::events::Family;
    use dataflows::pipelines::GeneratorSpec;

    let repeat = repeat.max(1);
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("ads.jsonl");
    let spec = GeneratorSpec {
        events,
        seed: 1,
        ..GeneratorSpec::new(Family::Ads)
    };
    crate::events::generate(
        &spec,
        &format!("jsonl:{}", path.display()),
        4,
        Default::default(),
    )?;

    let mut ceiling = Vec::new();
    for _ in 0..repeat {
        let started = Instant::now();
        let file = std::fs::File::open(&path)?;
        let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
        let mut line = Vec::new();
        let mut lines = 0u64;
        while reader.read_until(b'\n', &mut line)? > 0 {
            lines += 1;
            line.clear();
        }
        anyhow::ensure!(lines == events, "read {lines} lines of {events}");
        ceiling.push(started.elapsed().as_secs_f64());
    }
    let ceiling_s = median(ceiling);
    for layout in layouts {
        let mut times = Vec::new();
        for _ in 0..repeat {
            let source = format!("kind = \"jsonl\"\npath = \"{}\"\n", path.display());
            times.push(time_pipeline(exe, dir.path(), *layout, &source, events)?);
        }
        let row = events_row(
            "jsonl",
            &layout.to_string(),
            events,
            median(times),
            "line read, 1 thread",
            ceiling_s,
        );
        println!("{row}");
    }

    let Some(brokers) = kafka else {
        eprintln!("no --kafka BROKERS: Kafka rows skipped");
        return Ok(());
    };
    // The same events twice: uncompressed, and zstd-compressed (the codec
    // most deployments default to); each zstd row says its rate over the
    // uncompressed row of the same layout in this run.
    use dataflows::pipelines::kafka::Compression;
    let mut plain_rates: Vec<f64> = Vec::new();
    for codec in [Compression::None, Compression::Zstd] {
        let topic = format!("dima-bench-{}-{}", std::process::id(), codec.name());
        crate::events::generate(&spec, &format!("kafka:{brokers}/{topic}"), 4, codec)?;
        let mut ceiling = Vec::new();
        for _ in 0..repeat {
            let started = Instant::now();
            dataflows::pipelines::kafka::drain_topic(brokers, &topic, events)?;
            ceiling.push(started.elapsed().as_secs_f64());
        }
        let ceiling_s = median(ceiling);
        for (run, layout) in layouts.iter().enumerate() {
            let mut times = Vec::new();
            for attempt in 0..repeat {
                let source = format!(
                    "kind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup = \"bench-{run}-{attempt}-{}-{}\"\nstop_at_end = true\n",
                    std::process::id(),
                    codec.name()
                );
                times.push(time_pipeline(exe, dir.path(), *layout, &source, events)?);
            }
            let mut row = events_row(
                "kafka",
                &layout.to_string(),
                events,
                median(times),
                "rdkafka consumer, 1 thread, no parsing",
                ceiling_s,
            );
            row["compression"] = codec.name().into();
            let rate = row["events_per_s"].as_f64().unwrap_or(0.0);
            if codec == Compression::None {
                plain_rates.push(rate);
            } else if let Some(plain) = plain_rates.get(run) {
                row["over_uncompressed"] = (rate / plain).into();
            }
            println!("{row}");
        }
    }
    Ok(())
}
