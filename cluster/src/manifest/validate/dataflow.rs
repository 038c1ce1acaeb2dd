//! `[dataflow]`: the processes, their workers and addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::manifest::raw::RawProcess;
use crate::manifest::{DataflowSpec, ProcessSpec};

use super::{DEFAULT_PROCESS_ADDRESS, Problems, socket_address};

/// More workers than this in one process is almost certainly a typo.
const MAX_WORKERS: u64 = 1024;

pub(super) fn dataflow(
    processes: Option<Vec<RawProcess>>,
    default_metrics: Option<&str>,
    problems: &mut Problems,
) -> DataflowSpec {
    let processes = processes.unwrap_or_else(|| {
        vec![RawProcess {
            address: DEFAULT_PROCESS_ADDRESS.to_owned(),
            workers: None,
            metrics_address: None,
        }]
    });
    if processes.is_empty() {
        problems.add("dataflow.processes", "must list at least one process");
    }
    let default_metrics = default_metrics
        .and_then(|text| socket_address(text, "telemetry.metrics_address", problems));

    let mut resolved = Vec::with_capacity(processes.len());
    // Every address some process listens on, with the field that claims it.
    let mut claimed: HashMap<SocketAddr, String> = HashMap::new();
    let mut claim = |address: SocketAddr, field: String, problems: &mut Problems| {
        if address.port() == 0 {
            return;
        }
        if let Some(owner) = claimed.get(&address) {
            problems.add(&field, format!("{address} is already used by {owner}"));
        } else {
            claimed.insert(address, field);
        }
    };
    for (index, process) in processes.into_iter().enumerate() {
        let field = format!("dataflow.processes[{index}]");
        let address = socket_address(&process.address, &format!("{field}.address"), problems);
        if let Some(address) = address {
            if address.port() == 0 {
                problems.add(
                    format!("{field}.address"),
                    format!("{address}: port 0 is not allowed, peers must know where to connect"),
                );
            }
            claim(address, format!("{field}.address"), problems);
        }
        let workers = process.workers.unwrap_or(1);
        if workers == 0 {
            problems.add(format!("{field}.workers"), "must be at least 1");
        } else if workers > MAX_WORKERS {
            problems.add(
                format!("{field}.workers"),
                format!("{workers} is more than {MAX_WORKERS}"),
            );
        }
        let metrics_address = match process.metrics_address {
            Some(text) => socket_address(&text, &format!("{field}.metrics_address"), problems),
            None => default_metrics.and_then(|base| {
                // One host, several processes: each takes the next port.
                match u16::try_from(u32::from(base.port()) + index as u32) {
                    Ok(port) if base.port() != 0 => Some(SocketAddr::new(base.ip(), port)),
                    Ok(_) => Some(base),
                    Err(_) => {
                        problems.add(
                            "telemetry.metrics_address",
                            format!("port {} + process index {index} exceeds 65535", base.port()),
                        );
                        None
                    }
                }
            }),
        };
        if let Some(metrics) = metrics_address {
            claim(metrics, format!("{field}.metrics_address"), problems);
        }
        if let Some(address) = address {
            resolved.push(ProcessSpec {
                index,
                address,
                workers: workers.clamp(1, MAX_WORKERS) as usize,
                metrics_address,
            });
        }
    }
    if let Some(first) = resolved.first() {
        for other in resolved
            .iter()
            .skip(1)
            .filter(|p| p.workers != first.workers)
        {
            problems.add(
                format!("dataflow.processes[{}].workers", other.index),
                format!(
                    "{} differs from dataflow.processes[0].workers ({}): timely runs the same number of workers in every process",
                    other.workers, first.workers
                ),
            );
        }
    }
    DataflowSpec {
        processes: resolved,
        connect_timeout: Duration::ZERO,
    }
}
