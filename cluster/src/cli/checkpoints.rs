//! `dima checkpoints list` and `dima checkpoints inspect`: what a
//! `[checkpoints] dir` holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use dataflows::checkpoint::{Listing, Loaded, Store};
use serde_json::{Value, json};

use super::{Failure, OutputFormat};

#[derive(Debug, clap::Subcommand)]
pub enum CheckpointsCommand {
    /// Every checkpoint in a directory, oldest first, checked against its
    /// manifest (sizes and CRC-32 of its parts).
    List {
        /// The `[checkpoints] dir`.
        dir: PathBuf,
        /// `text` (a table) or `json` (an array of objects).
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// One checkpoint: its manifest and, per worker and pipeline, the
    /// checkpoint time, where each share resumes, the counts and the size
    /// of each operator's state.
    Inspect {
        /// The checkpoint's directory (`DIR/ID`).
        path: PathBuf,
        /// `text` or `json`.
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
}

pub fn run(command: &CheckpointsCommand) -> Result<(), Failure> {
    match command {
        CheckpointsCommand::List { dir, format } => list(dir, *format),
        CheckpointsCommand::Inspect { path, format } => inspect(path, *format),
    }
}

/// Each operator's state size, summed over the workers' parts.
fn state_bytes(loaded: &Loaded) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for info in &loaded.manifest.parts {
        let part = loaded.part(info.worker)?;
        for (pipeline, state) in &part.pipelines {
            for (operator, bytes) in &state.operators {
                *out.entry(format!("{pipeline}.{operator}")).or_default() += bytes.len() as u64;
            }
        }
    }
    Ok(out)
}

fn listing_json(l: &Listing) -> Value {
    let m = l.manifest.as_ref();
    let state = match (m, l.complete) {
        (Some(m), true) => state_bytes(&Loaded {
            path: l.path.clone(),
            manifest: m.clone(),
        })
        .ok(),
        _ => None,
    };
    json!({
        "id": l.id,
        "path": l.path.display().to_string(),
        "complete": l.complete,
        "problem": l.problem,
        "bytes": l.bytes,
        // The least checkpoint time of its pipelines (event time, ms).
        "epoch": m.and_then(|m| m.pipelines.iter().map(|p| p.time).min()),
        "pipelines": m.map(|m| m.pipelines.iter().map(|p| json!({"name": p.name, "time": p.time})).collect::<Vec<_>>()),
        "created_unix_ms": m.map(|m| m.created_unix_ms),
        "format_version": m.map(|m| m.format_version),
        "fingerprint": m.map(|m| m.fingerprint.clone()),
        "layout": m.map(|m| json!({"processes": m.processes, "workers_per_process": m.workers_per_process})),
        "state_bytes": state,
    })
}

fn list(dir: &Path, format: OutputFormat) -> Result<(), Failure> {
    if !dir.is_dir() {
        return Err(Failure::usage(format!(
            "{}: not a directory",
            dir.display()
        )));
    }
    let listings = Store::at(dir)
        .list()
        .with_context(|| format!("listing {}", dir.display()))?;
    let rows: Vec<Value> = listings.iter().map(listing_json).collect();
    match format {
        OutputFormat::Json => println!("{}", Value::Array(rows)),
        OutputFormat::Text => {
            println!(
                "{:>10}  {:<8}  {:>10}  {:<7}  {:>22}  state",
                "id", "complete", "bytes", "layout", "epoch"
            );
            for r in &rows {
                let layout = r["layout"]
                    .as_object()
                    .map(|l| format!("{}x{}", l["processes"], l["workers_per_process"]))
                    .unwrap_or_else(|| "-".into());
                let state = r["state_bytes"]
                    .as_object()
                    .map(|s| {
                        s.iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .or_else(|| r["problem"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                println!(
                    "{:>10}  {:<8}  {:>10}  {:<7}  {:>22}  {state}",
                    r["id"].to_string(),
                    r["complete"].to_string(),
                    r["bytes"].to_string(),
                    layout,
                    r["epoch"].to_string(),
                );
            }
        }
    }
    Ok(())
}

fn inspect(path: &Path, format: OutputFormat) -> Result<(), Failure> {
    let id: u64 = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Failure::usage(format!(
                "{}: not a checkpoint directory (expected DIR/ID, ID a number)",
                path.display()
            ))
        })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let listing = Store::at(dir)
        .list()
        .with_context(|| format!("listing {}", dir.display()))?
        .into_iter()
        .find(|l| l.id == id)
        .ok_or_else(|| Failure::usage(format!("{}: no such checkpoint", path.display())))?;
    let Some(manifest) = listing.manifest.clone().filter(|_| listing.complete) else {
        return Err(Failure::failed(anyhow::anyhow!(
            "{}: not a complete checkpoint: {}",
            path.display(),
            listing.problem.unwrap_or_default()
        )));
    };
    let loaded = Loaded {
        path: listing.path.clone(),
        manifest,
    };
    let mut workers = Vec::new();
    for info in &loaded.manifest.parts {
        let part = loaded.part(info.worker).map_err(Failure::failed)?;
        let pipelines: BTreeMap<&String, Value> = part
            .pipelines
            .iter()
            .map(|(name, s)| {
                (
                    name,
                    json!({
                        "time": s.time,
                        "finished": s.finished,
                        "counts": s.counts,
                        "shares": s.shares.iter().map(|sh| json!({
                            "share": sh.share, "offset": sh.resume.offset,
                            "line": sh.resume.line, "greatest_event_time": sh.greatest,
                        })).collect::<Vec<_>>(),
                        "operators": s.operators.iter().map(|(k, v)| (k.clone(), v.len())).collect::<BTreeMap<_, _>>(),
                    }),
                )
            })
            .collect();
        workers.push(json!({"worker": info.worker, "file": info.file, "bytes": info.bytes, "crc32": info.crc32, "pipelines": pipelines}));
    }
    let out = json!({
        "checkpoint": listing_json(&listing),
        "workers": workers,
    });
    match format {
        OutputFormat::Json => println!("{out}"),
        OutputFormat::Text => {
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default())
        }
    }
    Ok(())
}
