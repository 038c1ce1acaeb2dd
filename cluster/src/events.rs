//! `dima events generate` and `dima events check`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use dataflows::events::{TYPES, parse_bytes};
use dataflows::pipelines::GeneratorSpec;
use dataflows::pipelines::source::GeneratedLines;
use serde_json::json;

/// Where `--to` sends events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Standard output.
    Stdout,
    /// A JSONL file (created or truncated).
    Jsonl(PathBuf),
    /// A Kafka topic.
    Kafka {
        /// Bootstrap servers, comma-separated.
        brokers: String,
        /// The topic.
        topic: String,
    },
}

/// Parses `stdout`, `jsonl:PATH` or `kafka:BROKERS/TOPIC`.
pub fn parse_target(text: &str) -> anyhow::Result<Target> {
    if text == "stdout" {
        return Ok(Target::Stdout);
    }
    if let Some(path) = text.strip_prefix("jsonl:") {
        anyhow::ensure!(!path.is_empty(), "--to jsonl:PATH needs a path");
        return Ok(Target::Jsonl(PathBuf::from(path)));
    }
    if let Some(rest) = text.strip_prefix("kafka:") {
        let (brokers, topic) = rest
            .rsplit_once('/')
            .filter(|(b, t)| !b.is_empty() && !t.is_empty())
            .with_context(|| {
                format!("--to {text}: expected kafka:BROKERS/TOPIC, e.g. kafka:127.0.0.1:9092/ads")
            })?;
        return Ok(Target::Kafka {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
        });
    }
    anyhow::bail!("--to {text:?}: expected stdout, jsonl:PATH or kafka:BROKERS/TOPIC")
}

/// Writes `spec.events` generated lines to `to` (creating a Kafka topic
/// with `partitions` partitions if it does not exist); returns how many.
pub fn generate(
    spec: &GeneratorSpec,
    to: &str,
    partitions: i32,
    compression: dataflows::pipelines::kafka::Compression,
) -> anyhow::Result<u64> {
    let lines = GeneratedLines::new(spec, 0, 1);
    match parse_target(to)? {
        Target::Stdout => write_lines(lines, std::io::stdout().lock(), Path::new("-")),
        Target::Jsonl(path) => {
            let file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            write_lines(lines, BufWriter::with_capacity(1 << 16, file), &path)
        }
        Target::Kafka { brokers, topic } => {
            use dataflows::pipelines::kafka::{KafkaProducer, KafkaSinkSpec, ensure_topic};
            ensure_topic(&brokers, &topic, partitions)?;
            let mut spec = KafkaSinkSpec::new(&brokers, &topic);
            spec.compression = compression;
            let producer = KafkaProducer::new(&spec).with_context(|| format!("kafka {brokers}"))?;
            let mut written = 0;
            for line in lines {
                // Keyed by the event's entity, so one member's (or one
                // request's) events stay in order on one partition.
                let key = dataflows::events::parse_line(&line)
                    .map(|e| e.key().to_be_bytes().to_vec())
                    .unwrap_or_default();
                producer
                    .send(&key, line.as_bytes())
                    .with_context(|| format!("kafka {brokers} topic {topic}"))?;
                written += 1;
            }
            producer.flush().map_err(anyhow::Error::msg)?;
            Ok(written)
        }
    }
}

fn write_lines(
    lines: impl Iterator<Item = String>,
    mut out: impl Write,
    path: &Path,
) -> anyhow::Result<u64> {
    let mut written = 0;
    for line in lines {
        out.write_all(line.as_bytes())
            .and_then(|()| out.write_all(b"\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        written += 1;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(written)
}

/// What `dima events check` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The file.
    pub path: String,
    /// Lines read.
    pub lines: u64,
    /// Valid events per type.
    pub by_type: BTreeMap<&'static str, u64>,
    /// (1-based line number, reason) of every malformed line.
    pub malformed: Vec<(u64, String)>,
}

impl CheckReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "path": self.path,
            "lines": self.lines,
            "valid": self.lines - self.malformed.len() as u64,
            "by_type": self.by_type,
            "malformed": self.malformed.iter().map(|(line, reason)| json!({"line": line, "reason": reason})).collect::<Vec<_>>(),
        })
    }

    /// The report as text: one line per malformed line, then the counts.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (line, reason) in &self.malformed {
            out.push_str(&format!("{}:{line}: {reason}\n", self.path));
        }
        out.push_str(&format!(
            "{}: {} lines, {} valid, {} malformed\n",
            self.path,
            self.lines,
            self.lines - self.malformed.len() as u64,
            self.malformed.len()
        ));
        for (t, n) in &self.by_type {
            out.push_str(&format!("  {t:<18} {n}\n"));
        }
        out
    }
}

/// Reads `path` line by line and checks every line.
pub fn check(path: &Path) -> anyhow::Result<CheckReport> {
    let mut report = CheckReport {
        path: path.display().to_string(),
        ..CheckReport::default()
    };
    for_each_line(path, |line| {
        report.lines += 1;
        match parse_bytes(line) {
            Ok(event) => *report.by_type.entry(TYPES[event.type_index()]).or_insert(0) += 1,
            Err(reason) => report.malformed.push((report.lines, reason.0)),
        }
    })?;
    Ok(report)
}

/// Calls `f` with every line of `path` (without its newline).
fn for_each_line(path: &Path, mut f: impl FnMut(&[u8])) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        let n = reader
            .read_until(b'\n', &mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        if buffer.last() == Some(&b'\n') {
            buffer.pop();
        }
        f(&buffer);
    }
}

/// `dima learner dataset`: a JSONL file of ads events as a labelled CSV for
/// `dima learner evaluate`, one row per impression in file order, labelled 1
/// when a click names it anywhere in the file. Columns: `impression_id`,
/// `campaign`, `member`, `clicked`, then the learner's ad features
/// (`desktop`, `tablet`, `right_rail`, `search`, `position`, `evening`).
/// Returns (rows, clicks); malformed lines are skipped and counted by
/// `dima events check`.
pub fn ads_dataset(input: &Path, output: &Path) -> anyhow::Result<(u64, u64)> {
    use dataflows::events::Event;
    use dataflows::learner::ads::ad_features;

    let mut impressions = Vec::new();
    let mut clicked = std::collections::HashSet::new();
    for_each_line(input, |line| match parse_bytes(line) {
        Ok(Event::AdImpression(i)) => impressions.push(i),
        Ok(Event::AdClick(c)) => {
            clicked.insert(c.impression_id);
        }
        _ => {}
    })?;
    let out = File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let mut out = BufWriter::with_capacity(1 << 16, out);
    let write = |out: &mut BufWriter<File>, text: String| {
        out.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", output.display()))
    };
    write(
        &mut out,
        "impression_id,campaign,member,clicked,desktop,tablet,right_rail,search,position,evening\n"
            .into(),
    )?;
    let mut clicks = 0;
    for i in &impressions {
        let y = u8::from(clicked.contains(&i.impression_id));
        clicks += u64::from(y);
        let f = ad_features(i);
        write(
            &mut out,
            format!(
                "{},{},{},{y},{},{},{},{},{:.4},{:.4}\n",
                i.impression_id, i.campaign_id, i.member_id, f[1], f[2], f[3], f[4], f[5], f[6]
            ),
        )?;
    }
    out.flush()
        .with_context(|| format!("writing {}", output.display()))?;
    Ok((impressions.len() as u64, clicks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_say_why() {
        assert_eq!(parse_target("stdout").unwrap(), Target::Stdout);
        assert_eq!(
            parse_target("jsonl:/tmp/x.jsonl").unwrap(),
            Target::Jsonl("/tmp/x.jsonl".into())
        );
        assert_eq!(
            parse_target("kafka:127.0.0.1:9092,127.0.0.2:9092/ads").unwrap(),
            Target::Kafka {
                brokers: "127.0.0.1:9092,127.0.0.2:9092".into(),
                topic: "ads".into()
            }
        );
        assert!(
            parse_target("kafka:nobrokers")
                .unwrap_err()
                .to_string()
                .contains("kafka:BROKERS/TOPIC")
        );
        assert!(parse_target("file.jsonl").is_err());
    }
}
