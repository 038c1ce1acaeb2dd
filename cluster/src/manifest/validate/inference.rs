//! `[inference]`: the served model, its ranks, limits and load.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::manifest::raw::RawInference;
use crate::manifest::{ApiKey, Backend, DataflowSpec, InferenceLoad, InferenceSpec};

use super::{Problems, resolve_path, socket_address};

/// Resolves `[inference]`.
pub(super) fn inference(
    raw: RawInference,
    dataflow: &DataflowSpec,
    base: &Path,
    problems: &mut Problems,
) -> InferenceSpec {
    let field = |name: &str| format!("inference.{name}");
    let model = match raw.model {
        Some(m) if actors::models::catalog_entry(&m).is_some() => m,
        Some(m) if m.trim().is_empty() => {
            problems.add(field("model"), "is empty");
            m
        }
        Some(m) => resolve_path(base, &m).display().to_string(),
        None => {
            problems.add(
                field("model"),
                "is required: a catalog name (gemma3-270m), a .gguf file or a checkpoint directory",
            );
            String::new()
        }
    };
    let positive = |value: Option<u64>, default: u64, name: &str, problems: &mut Problems| {
        let v = value.unwrap_or(default);
        if v == 0 {
            problems.add(field(name), "must be at least 1");
        }
        usize::try_from(v).unwrap_or(usize::MAX)
    };
    let seconds = |value: Option<f64>, default: f64, name: &str, problems: &mut Problems| {
        Duration::from_secs_f64(match value {
            None => default,
            Some(s) if s.is_finite() && s > 0.0 => s,
            Some(s) => {
                problems.add(
                    field(name),
                    format!("{s} must be a positive number of seconds"),
                );
                default
            }
        })
    };
    let tp = positive(raw.tp, 1, "tp", problems);
    if tp > 64 {
        problems.add(
            field("tp"),
            format!("{tp} ranks is more than the 64 supported"),
        );
    }
    let processes = dataflow.processes.len();
    let ranks: Vec<usize> = match raw.ranks {
        None => vec![0; tp.min(64)],
        Some(ranks) => {
            if ranks.len() != tp {
                problems.add(
                    field("ranks"),
                    format!(
                        "lists {} process(es) for tp = {tp} ranks (one process index per rank)",
                        ranks.len()
                    ),
                );
            }
            ranks
                .iter()
                .enumerate()
                .map(|(r, &p)| {
                    let p = usize::try_from(p).unwrap_or(usize::MAX);
                    if p >= processes {
                        problems.add(
                            format!("inference.ranks[{r}]"),
                            format!(
                                "process {p} does not exist (dataflow.processes has {processes})"
                            ),
                        );
                    }
                    p
                })
                .collect()
        }
    };
    let backend = match raw.backend.as_deref().unwrap_or("cpu") {
        "cpu" => {
            for (name, set) in [
                ("devices", raw.devices.is_some()),
                ("max_context", raw.max_context.is_some()),
            ] {
                if set {
                    problems.add(field(name), "applies to backend = \"cuda\" only");
                }
            }
            Backend::Cpu
        }
        "cuda" => {
            if ranks.iter().any(|p| Some(p) != ranks.first()) {
                problems.add(
                    field("backend"),
                    format!(
                        "\"cuda\" runs every rank in one process for now (one GPU each, NCCL \
                         between them); ranks {ranks:?} spread them over processes"
                    ),
                );
            }
            let devices: Vec<usize> = match raw.devices {
                None => (0..tp.min(64)).collect(),
                Some(d) => {
                    if d.len() != tp {
                        problems.add(
                            field("devices"),
                            format!("lists {} device(s) for tp = {tp} ranks", d.len()),
                        );
                    }
                    d.into_iter()
                        .map(|v| usize::try_from(v).unwrap_or(usize::MAX))
                        .collect()
                }
            };
            Backend::Cuda {
                devices,
                max_context: positive(raw.max_context, 4096, "max_context", problems),
            }
        }
        other => {
            problems.add(
                field("backend"),
                format!("{other:?} is not a backend (expected \"cpu\" or \"cuda\")"),
            );
            Backend::Cpu
        }
    };
    let one_process = ranks.iter().all(|p| Some(p) == ranks.first());
    let mut distinct = ranks.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if !one_process && distinct.len() != ranks.len() {
        problems.add(
            field("ranks"),
            format!(
                "{ranks:?} puts some ranks together and others apart: a group runs either \
                 in one process (threads) or one rank per process (over TCP)"
            ),
        );
    }
    let root = raw
        .root
        .as_deref()
        .and_then(|t| socket_address(t, &field("root"), problems));
    if !one_process && root.is_none() && raw.root.is_none() {
        problems.add(
            field("root"),
            "is required when ranks run in different processes: the address where rank 0 \
             meets the others, e.g. 127.0.0.1:2201",
        );
    }
    let listen = match raw.listen.as_deref() {
        Some(t) => socket_address(t, &field("listen"), problems),
        None => Some(SocketAddr::from(([127, 0, 0, 1], 8000))),
    };
    let mut taken: Vec<(String, SocketAddr)> = Vec::new();
    for p in &dataflow.processes {
        taken.push((
            format!("dataflow.processes[{}].address", p.index),
            p.address,
        ));
        if let Some(m) = p.metrics_address {
            taken.push((
                format!("dataflow.processes[{}].metrics_address", p.index),
                m,
            ));
        }
    }
    for (name, address) in [("listen", listen), ("root", root)] {
        let Some(address) = address else { continue };
        if let Some((other, _)) = taken.iter().find(|(_, a)| *a == address) {
            problems.add(field(name), format!("{address} is already {other}"));
        }
        taken.push((field(name), address));
    }
    let api_key = match (raw.api_key, raw.api_key_env) {
        (Some(_), Some(_)) => {
            problems.add(field("api_key"), "set api_key or api_key_env, not both");
            None
        }
        (Some(k), None) if k.is_empty() => {
            problems.add(field("api_key"), "is empty");
            None
        }
        (Some(k), None) => Some(ApiKey::Literal(k)),
        (None, Some(v)) if v.is_empty() || v.contains('=') => {
            problems.add(
                field("api_key_env"),
                format!("{v:?} is not an environment variable name"),
            );
            None
        }
        (None, Some(v)) => Some(ApiKey::Env(v)),
        (None, None) => None,
    };
    let timeout = raw.collective_timeout_s.unwrap_or(30.0);
    if !(timeout.is_finite() && (0.1..=3600.0).contains(&timeout)) {
        problems.add(
            field("collective_timeout_s"),
            format!("{timeout} is not between 0.1 and 3600 seconds"),
        );
    }
    let raw_load = raw.load.unwrap_or_default();
    let load = InferenceLoad {
        requests: usize::try_from(raw_load.requests.unwrap_or(8)).unwrap_or(usize::MAX),
        concurrency: positive(raw_load.concurrency, 4, "load.concurrency", problems),
        max_tokens: positive(raw_load.max_tokens, 16, "load.max_tokens", problems),
    };
    if load.requests > 100_000 {
        problems.add(
            field("load.requests"),
            format!("{} is more than the 100000 allowed", load.requests),
        );
    }
    InferenceSpec {
        served_model_name: raw.served_model_name.unwrap_or_else(|| {
            std::path::Path::new(&model)
                .file_name()
                .map_or_else(|| model.clone(), |n| n.to_string_lossy().into_owned())
        }),
        model,
        backend,
        tp,
        ranks,
        root,
        listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000))),
        api_key,
        max_batch: positive(raw.max_batch, 16, "max_batch", problems),
        max_waiting: positive(raw.max_waiting, 64, "max_waiting", problems),
        max_tokens_in_flight: positive(
            raw.max_tokens_in_flight,
            65_536,
            "max_tokens_in_flight",
            problems,
        ),
        prefix_cache_mib: raw.prefix_cache_mib.unwrap_or(512) as usize,
        public_health: raw.public_health.unwrap_or(false),
        public_metrics: raw.public_metrics.unwrap_or(false),
        max_tokens_cap: raw
            .max_tokens_cap
            .map(|c| positive(Some(c), 1, "max_tokens_cap", problems)),
        body_timeout: seconds(raw.body_timeout_s, 30.0, "body_timeout_s", problems),
        degraded_after: seconds(raw.degraded_after_s, 10.0, "degraded_after_s", problems),
        header_timeout: seconds(raw.header_timeout_s, 10.0, "header_timeout_s", problems),
        request_timeout: raw
            .request_timeout_s
            .map(|s| seconds(Some(s), 600.0, "request_timeout_s", problems)),
        max_connections: positive(raw.max_connections, 1024, "max_connections", problems),
        max_streams_per_client: usize::try_from(raw.max_streams_per_client.unwrap_or(0))
            .unwrap_or(usize::MAX),
        collective_timeout: Duration::from_secs_f64(if timeout.is_finite() && timeout > 0.0 {
            timeout
        } else {
            30.0
        }),
        keep_serving: raw.keep_serving.unwrap_or(false),
        load,
    }
}
