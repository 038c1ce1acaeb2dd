//! Raw manifest → [`Manifest`]: defaults filled in, every field checked, every
//! problem collected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dataflows::CountJob;
use dataflows::events::Family;
use dataflows::pipelines::kafka::{KafkaSinkSpec, KafkaSourceSpec, Until};
use dataflows::pipelines::{
    GeneratorSpec, LearnerSpec, MatchingSpec, PipelineSpec, SinkSpec, SourceSpec,
};

use super::raw::{
    RawCountJob, RawInference, RawManifest, RawMatching, RawPipeline, RawProcess, RawSink,
    RawSource, RawTelemetry,
};
use super::{
    ApiKey, Backend, ClusterSpec, DataflowSpec, InferenceLoad, InferenceSpec, JobsSpec, LogFormat,
    Manifest, OtlpSpec, Problem, ProcessSpec, TelemetrySpec,
};

/// The process list when the manifest has none: one local process, one worker.
pub const DEFAULT_PROCESS_ADDRESS: &str = "127.0.0.1:2101";
/// More workers than this in one process is almost certainly a typo.
const MAX_WORKERS: u64 = 1024;

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

pub(super) fn validate(raw: RawManifest, base: &Path) -> Result<Manifest, Vec<Problem>> {
    let mut problems = Problems::default();

    if raw.checkpoints.is_some() {
        problems.add(
            "checkpoints",
            "not supported yet: it arrives with operator-state checkpointing",
        );
    }
    let cluster = cluster(raw.cluster.and_then(|c| c.name), &mut problems);
    let raw_dataflow = raw.dataflow.unwrap_or_default();
    let telemetry_raw = raw.telemetry.unwrap_or_default();
    let mut dataflow = dataflow(
        raw_dataflow.processes,
        telemetry_raw.metrics_address.as_deref(),
        &mut problems,
    );
    let timeout_ms = raw_dataflow.connect_timeout_ms.unwrap_or(60_000);
    if timeout_ms < 100 {
        problems.add(
            "dataflow.connect_timeout_ms",
            format!("{timeout_ms} is below the minimum of 100"),
        );
    }
    dataflow.connect_timeout = Duration::from_millis(timeout_ms);
    let telemetry = telemetry(telemetry_raw, &mut problems);
    let count = count_job(
        raw.jobs.and_then(|j| j.count).unwrap_or_default(),
        &mut problems,
    );

    let pipelines = raw
        .pipelines
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, raw)| pipeline(name, raw, base, &mut problems))
        .collect();

    let inference = raw
        .inference
        .map(|raw| inference(raw, &dataflow, base, &mut problems));

    if problems.0.is_empty() {
        Ok(Manifest {
            cluster,
            dataflow,
            telemetry,
            jobs: JobsSpec { count },
            pipelines,
            inference,
        })
    } else {
        Err(problems.0)
    }
}

/// Resolves `[inference]`.
fn inference(
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
        collective_timeout: Duration::from_secs_f64(if timeout.is_finite() && timeout > 0.0 {
            timeout
        } else {
            30.0
        }),
        keep_serving: raw.keep_serving.unwrap_or(false),
        load,
    }
}

fn cluster(name: Option<String>, problems: &mut Problems) -> ClusterSpec {
    let name = name.unwrap_or_else(|| "dima".to_owned());
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 63 || !name.chars().all(valid) {
        problems.add(
            "cluster.name",
            format!("{name:?} is not a valid name (1 to 63 of A-Z a-z 0-9 - _ .)"),
        );
    }
    ClusterSpec { name }
}

fn socket_address(text: &str, field: &str, problems: &mut Problems) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(address) => Some(address),
        Err(_) => {
            problems.add(
                field,
                format!("{text:?} is not a socket address (expected IP:PORT, e.g. 127.0.0.1:2101)"),
            );
            None
        }
    }
}

fn dataflow(
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

fn telemetry(raw: RawTelemetry, problems: &mut Problems) -> TelemetrySpec {
    let log_level = raw.log_level.unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
        problems.add(
            "telemetry.log_level",
            format!("{log_level:?} is not a log filter: {e}"),
        );
    }
    let log_format = match raw.log_format.as_deref() {
        None | Some("human") => LogFormat::Human,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.add(
                "telemetry.log_format",
                format!("{other:?} is not one of \"human\", \"json\""),
            );
            LogFormat::Human
        }
    };
    let service_name = raw.service_name.unwrap_or_else(|| "dima".to_owned());
    if service_name.trim().is_empty() {
        problems.add("telemetry.service_name", "must not be empty");
    }
    let interval_ms = raw.export_interval_ms.unwrap_or(5_000);
    if interval_ms < 100 {
        problems.add(
            "telemetry.export_interval_ms",
            format!("{interval_ms} is below the minimum of 100"),
        );
    }
    let otlp = raw.otlp_endpoint.and_then(|endpoint| {
        let rest = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://"));
        match rest {
            Some(authority) if !authority.is_empty() && !authority.starts_with('/') => Some(OtlpSpec {
                endpoint,
                export_interval: Duration::from_millis(interval_ms),
            }),
            _ => {
                problems.add(
                    "telemetry.otlp_endpoint",
                    format!("{endpoint:?} is not an http:// or https:// URL (e.g. http://127.0.0.1:4317)"),
                );
                None
            }
        }
    });
    TelemetrySpec {
        log_level,
        log_format,
        service_name,
        otlp,
    }
}

/// A required, non-empty text field.
fn required_text(value: Option<String>, field: &str, problems: &mut Problems) -> Option<String> {
    match value {
        Some(text) if !text.trim().is_empty() => Some(text),
        Some(_) => {
            problems.add(field, "must not be empty");
            None
        }
        None => {
            problems.add(field, "is required for kind = \"kafka\"");
            None
        }
    }
}

/// A manifest path: absolute, or relative to the manifest's directory.
/// Resolves a sink table (`field` is its dotted path, for problems).
fn sink_spec(
    sink_raw: RawSink,
    field: &str,
    base: &Path,
    problems: &mut Problems,
) -> Option<SinkSpec> {
    let sink_kind = sink_raw.kind.as_deref().unwrap_or("none");
    if sink_kind != "jsonl" && sink_raw.path.is_some() {
        problems.add(
            format!("{field}.path"),
            format!("does not apply to kind = {sink_kind:?}"),
        );
    }
    if sink_kind != "kafka" {
        for (set, name) in [
            (sink_raw.brokers.is_some(), "brokers"),
            (sink_raw.topic.is_some(), "topic"),
        ] {
            if set {
                problems.add(
                    format!("{field}.{name}"),
                    format!("does not apply to kind = {sink_kind:?}"),
                );
            }
        }
    }
    match sink_kind {
        "none" => Some(SinkSpec::None),
        "stdout" => Some(SinkSpec::Stdout),
        "jsonl" => match &sink_raw.path {
            Some(path) => Some(SinkSpec::Jsonl {
                path: resolve_path(base, path),
            }),
            None => {
                problems.add(format!("{field}.path"), "is required for kind = \"jsonl\"");
                None
            }
        },
        "kafka" => {
            let brokers = required_text(
                sink_raw.brokers.clone(),
                &format!("{field}.brokers"),
                problems,
            );
            let topic = required_text(sink_raw.topic.clone(), &format!("{field}.topic"), problems);
            match (brokers, topic) {
                (Some(brokers), Some(topic)) => {
                    Some(SinkSpec::Kafka(KafkaSinkSpec { brokers, topic }))
                }
                _ => None,
            }
        }
        other => {
            problems.add(
                format!("{field}.kind"),
                format!("{other:?} is not one of \"none\", \"stdout\", \"jsonl\", \"kafka\""),
            );
            None
        }
    }
}

fn resolve_path(base: &Path, text: &str) -> PathBuf {
    let path = Path::new(text);
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

/// Fields of `[pipelines.<name>.source]` that are set but do not belong to `kind`.
fn foreign_fields(raw: &RawSource, kind: &str) -> Vec<&'static str> {
    let generator = [
        ("events", raw.events.is_some()),
        ("seed", raw.seed.is_some()),
        ("malformed_fraction", raw.malformed_fraction.is_some()),
        ("simulated_rate", raw.simulated_rate.is_some()),
        ("members", raw.members.is_some()),
        ("campaigns", raw.campaigns.is_some()),
        ("drivers", raw.drivers.is_some()),
        ("campaign_walk_sd", raw.campaign_walk_sd.is_some()),
        (
            "campaign_lifetime_hours",
            raw.campaign_lifetime_hours.is_some(),
        ),
        ("global_drift_per_day", raw.global_drift_per_day.is_some()),
    ];
    let jsonl = [("path", raw.path.is_some())];
    let kafka = [
        ("brokers", raw.brokers.is_some()),
        ("topic", raw.topic.is_some()),
        ("group", raw.group.is_some()),
        ("stop_at_end", raw.stop_at_end.is_some()),
    ];
    let mut foreign = Vec::new();
    for (owner, fields) in [
        ("generator", &generator[..]),
        ("jsonl", &jsonl[..]),
        ("kafka", &kafka[..]),
    ] {
        if owner != kind {
            foreign.extend(fields.iter().filter(|(_, set)| *set).map(|(name, _)| *name));
        }
    }
    foreign
}

fn pipeline(
    name: String,
    raw: RawPipeline,
    base: &Path,
    problems: &mut Problems,
) -> Option<PipelineSpec> {
    let field = format!("pipelines.{name}");
    let valid_name = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if !valid_name {
        problems.add(&field, "a pipeline name is 1 to 63 of A-Z a-z 0-9 - _");
    }
    let family = match raw.family.as_deref().unwrap_or(name.as_str()) {
        "ads" => Some(Family::Ads),
        "dispatch" => Some(Family::Dispatch),
        other => {
            let what = if raw.family.is_some() {
                format!("{other:?} is not \"ads\" or \"dispatch\"")
            } else {
                "is missing (needed when the pipeline is not named ads or dispatch): \"ads\" or \"dispatch\"".to_owned()
            };
            problems.add(format!("{field}.family"), what);
            None
        }
    };
    let epoch_events = raw.epoch_events.unwrap_or(10_000);
    if epoch_events == 0 {
        problems.add(format!("{field}.epoch_events"), "must be at least 1");
    }
    let epoch_ms = raw.epoch_ms.unwrap_or(1_000);
    if epoch_ms == 0 {
        problems.add(format!("{field}.epoch_ms"), "must be at least 1");
    }
    let max_epochs_in_flight = raw.max_epochs_in_flight.unwrap_or(4);
    if max_epochs_in_flight == 0 {
        problems.add(
            format!("{field}.max_epochs_in_flight"),
            "must be at least 1",
        );
    }
    let family = family?;

    let source_raw = raw.source.unwrap_or_default();
    let kind = source_raw
        .kind
        .clone()
        .unwrap_or_else(|| "generator".to_owned());
    for foreign in foreign_fields(&source_raw, &kind) {
        problems.add(
            format!("{field}.source.{foreign}"),
            format!("does not apply to kind = {kind:?}"),
        );
    }
    if kind == "jsonl" && source_raw.events_per_second.is_some() {
        problems.add(
            format!("{field}.source.events_per_second"),
            "does not apply to kind = \"jsonl\"",
        );
    }
    if let Some(rate) = source_raw.events_per_second
        && !(rate.is_finite() && rate > 0.0)
    {
        problems.add(
            format!("{field}.source.events_per_second"),
            format!("{rate} is not a positive rate"),
        );
    }
    let source = match kind.as_str() {
        "generator" => {
            let defaults = GeneratorSpec::new(family);
            let fraction = source_raw.malformed_fraction.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&fraction) {
                problems.add(
                    format!("{field}.source.malformed_fraction"),
                    format!("{fraction} is not between 0 and 1"),
                );
            }
            let simulated_rate = source_raw.simulated_rate.unwrap_or(defaults.simulated_rate);
            if !(simulated_rate.is_finite() && simulated_rate > 0.0) {
                problems.add(
                    format!("{field}.source.simulated_rate"),
                    format!("{simulated_rate} is not a positive rate"),
                );
            }
            for (value, name) in [
                (source_raw.members, "members"),
                (source_raw.campaigns, "campaigns"),
                (source_raw.drivers, "drivers"),
            ] {
                if value == Some(0) {
                    problems.add(format!("{field}.source.{name}"), "must be at least 1");
                }
            }
            let walk_sd = source_raw.campaign_walk_sd.unwrap_or(0.0);
            let lifetime_hours = source_raw.campaign_lifetime_hours.unwrap_or(0.0);
            let global_drift = source_raw.global_drift_per_day.unwrap_or(0.0);
            for (value, name) in [
                (walk_sd, "campaign_walk_sd"),
                (lifetime_hours, "campaign_lifetime_hours"),
            ] {
                if !(value.is_finite() && value >= 0.0) {
                    problems.add(
                        format!("{field}.source.{name}"),
                        format!("{value} is not a non-negative number"),
                    );
                }
            }
            if !global_drift.is_finite() {
                problems.add(
                    format!("{field}.source.global_drift_per_day"),
                    format!("{global_drift} is not a number"),
                );
            }
            Some(SourceSpec::Generator(GeneratorSpec {
                family,
                events: source_raw.events.unwrap_or(defaults.events),
                seed: source_raw.seed.unwrap_or(defaults.seed),
                malformed_fraction: fraction.clamp(0.0, 1.0),
                events_per_second: source_raw
                    .events_per_second
                    .filter(|r| r.is_finite() && *r > 0.0),
                simulated_rate,
                members: source_raw.members.unwrap_or(defaults.members).max(1),
                campaigns: source_raw.campaigns.unwrap_or(defaults.campaigns).max(1),
                drivers: source_raw.drivers.unwrap_or(defaults.drivers).max(1),
                drift: dataflows::events::Drift {
                    walk_sd_per_hour: walk_sd,
                    lifetime_hours,
                    global_per_day: global_drift,
                    horizon_hours: 0.0,
                },
            }))
        }
        "jsonl" => match source_raw.path {
            Some(path) => Some(SourceSpec::Jsonl {
                path: resolve_path(base, &path),
            }),
            None => {
                problems.add(
                    format!("{field}.source.path"),
                    "is required for kind = \"jsonl\"",
                );
                None
            }
        },
        "kafka" => {
            let brokers = required_text(
                source_raw.brokers,
                &format!("{field}.source.brokers"),
                problems,
            );
            let topic = required_text(source_raw.topic, &format!("{field}.source.topic"), problems);
            let group = source_raw.group.unwrap_or_else(|| format!("dima.{name}"));
            if group.trim().is_empty() {
                problems.add(format!("{field}.source.group"), "must not be empty");
            }
            match (brokers, topic) {
                (Some(brokers), Some(topic)) => Some(SourceSpec::Kafka(KafkaSourceSpec {
                    brokers,
                    topic,
                    group,
                    until: if source_raw.stop_at_end.unwrap_or(false) {
                        Until::End
                    } else {
                        Until::Stopped
                    },
                    events_per_second: source_raw
                        .events_per_second
                        .filter(|r| r.is_finite() && *r > 0.0),
                })),
                _ => None,
            }
        }
        other => {
            problems.add(
                format!("{field}.source.kind"),
                format!("{other:?} is not one of \"generator\", \"jsonl\", \"kafka\""),
            );
            None
        }
    };

    let sink = sink_spec(
        raw.sink.unwrap_or_default(),
        &format!("{field}.sink"),
        base,
        problems,
    );
    let dead_letter = resolve_path(
        base,
        raw.dead_letter
            .and_then(|d| d.path)
            .as_deref()
            .unwrap_or(&format!("dead-letter/{name}.jsonl")),
    );
    let learner = raw.learner.and_then(|l| {
        if family != Family::Ads {
            problems.add(
                format!("{field}.learner"),
                "the incremental learner runs on ads pipelines only",
            );
            return None;
        }
        let delta = l.delta.unwrap_or(0.8);
        if !(0.0..=1.0).contains(&delta) {
            problems.add(
                format!("{field}.learner.delta"),
                format!("{delta} is not between 0 and 1"),
            );
        }
        let lambda = l.lambda.unwrap_or(1.0);
        if !(lambda.is_finite() && lambda >= 0.0) {
            problems.add(
                format!("{field}.learner.lambda"),
                format!("{lambda} is not a non-negative number"),
            );
        }
        let full = match l.hessian.as_deref().unwrap_or("full") {
            "full" => true,
            "diagonal" => false,
            other => {
                problems.add(
                    format!("{field}.learner.hessian"),
                    format!("{other:?} is not \"full\" or \"diagonal\""),
                );
                true
            }
        };
        use dataflows::learner::Reanchor;
        let reanchor = match l.reanchor.as_deref().unwrap_or("shift") {
            "keep" => Reanchor::Keep,
            "reset" => Reanchor::Reset,
            "shift" => Reanchor::Shift,
            other => {
                problems.add(
                    format!("{field}.learner.reanchor"),
                    format!("{other:?} is not \"shift\", \"keep\" or \"reset\""),
                );
                Reanchor::Shift
            }
        };
        let fe_lambda = l.fixed_effect_lambda.unwrap_or(lambda);
        if !(fe_lambda.is_finite() && fe_lambda >= 0.0) {
            problems.add(
                format!("{field}.learner.fixed_effect_lambda"),
                format!("{fe_lambda} is not a non-negative number"),
            );
        }
        let names = l.hashed_features.unwrap_or_default();
        let hashing =
            match dataflows::learner::ads::AdHashing::parse(&names, l.hash_bits.unwrap_or(18)) {
                Ok(hashing) => hashing,
                Err(e) => {
                    let which = if e.starts_with("hash_bits") {
                        "hash_bits"
                    } else {
                        "hashed_features"
                    };
                    problems.add(format!("{field}.learner.{which}"), e);
                    dataflows::learner::ads::AdHashing::default()
                }
            };
        let every = l.fixed_effect_every.unwrap_or(0);
        if !names.is_empty() && every == 0 {
            problems.add(
                format!("{field}.learner.hashed_features"),
                "hashed features feed the fixed effect: set fixed_effect_every too",
            );
        }
        let fixed = match every {
            0 => None,
            every => Some(dataflows::learner::operator::FixedEffectConfig {
                every,
                history: l.fixed_effect_history.unwrap_or(0),
                lambda: fe_lambda,
                reanchor,
                hash_bits: hashing.bits(),
            }),
        };
        Some(LearnerSpec {
            delta,
            lambda,
            full,
            snapshots: l.snapshots.map(|s| resolve_path(base, &s)),
            fixed,
            hashing,
        })
    });
    let matching = raw.matching.and_then(|m| {
        if family != Family::Dispatch {
            problems.add(
                format!("{field}.matching"),
                "the matcher runs on dispatch pipelines only",
            );
            return None;
        }
        matching_spec(m, &format!("{field}.matching"), base, problems)
    });
    Some(PipelineSpec {
        name,
        family,
        source: source?,
        sink: sink?,
        dead_letter,
        epoch_events: epoch_events.max(1),
        epoch_ms: epoch_ms.max(1),
        max_epochs_in_flight: max_epochs_in_flight.max(1),
        learner,
        matching,
    })
}

/// Resolves `[pipelines.<name>.matching]` (`field` is its dotted path).
fn matching_spec(
    m: RawMatching,
    field: &str,
    base: &Path,
    problems: &mut Problems,
) -> Option<MatchingSpec> {
    use dataflows::matching::Policy;
    use dataflows::matching::operator::MatchConfig;
    let policy = match m.policy.as_deref().unwrap_or("value") {
        "value" => Policy::Value,
        "myopic" => Policy::Myopic,
        "nearest" => Policy::Nearest,
        other => {
            problems.add(
                format!("{field}.policy"),
                format!("{other:?} is not one of \"value\", \"myopic\", \"nearest\""),
            );
            Policy::Value
        }
    };
    let mut config = MatchConfig::default();
    config.plan.policy = policy;
    let mut positive = |name: &str, value: Option<f64>, default: f64| -> f64 {
        let v = value.unwrap_or(default);
        if !(v.is_finite() && v > 0.0) {
            problems.add(
                format!("{field}.{name}"),
                format!("{v} is not a positive number"),
            );
            return default;
        }
        v
    };
    config.plan.matching.window_s = positive("window_s", m.window_s, config.plan.matching.window_s);
    config.plan.matching.radius_km =
        positive("radius_km", m.radius_km, config.plan.matching.radius_km);
    config.plan.travel.speed_kmh = positive("speed_kmh", m.speed_kmh, config.plan.travel.speed_kmh);
    let max_wait_s = positive("max_wait_s", m.max_wait_s, 300.0);
    let driver_stale_s = positive("driver_stale_s", m.driver_stale_s, 120.0);
    config.max_wait_ms = (max_wait_s * 1000.0) as i64;
    config.driver_stale_ms = (driver_stale_s * 1000.0) as i64;
    let lateness_s = m.lateness_s.unwrap_or(4.0);
    if !(lateness_s.is_finite() && lateness_s >= 0.0) {
        problems.add(
            format!("{field}.lateness_s"),
            format!("{lateness_s} is not a number >= 0"),
        );
    } else {
        config.lateness_ms = (lateness_s * 1000.0) as i64;
    }
    let rider_value = m.rider_value.unwrap_or(config.plan.matching.rider_value);
    if !(rider_value.is_finite() && rider_value >= 0.0) {
        problems.add(
            format!("{field}.rider_value"),
            format!("{rider_value} is not a number >= 0"),
        );
    } else {
        config.plan.matching.rider_value = rider_value;
    }
    let detour = m.detour.unwrap_or(config.plan.travel.detour);
    if !(detour.is_finite() && detour >= 1.0) {
        problems.add(
            format!("{field}.detour"),
            format!("{detour} is not a number >= 1"),
        );
    } else {
        config.plan.travel.detour = detour;
    }
    match m.nearest {
        Some(0) => problems.add(format!("{field}.nearest"), "must be at least 1"),
        Some(k) => config.plan.matching.nearest = k,
        None => {}
    }
    match m.region_resolution {
        Some(r) if r > 15 => problems.add(
            format!("{field}.region_resolution"),
            format!("{r} is not an H3 resolution (0 to 15)"),
        ),
        Some(r) => config.region_resolution = r,
        None => {}
    }
    if let Some(pricing) = m.pricing {
        for (name, v) in [
            ("base", pricing.base),
            ("per_km", pricing.per_km),
            ("per_minute", pricing.per_minute),
            ("pickup_cost_per_km", pricing.pickup_cost_per_km),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                problems.add(
                    format!("{field}.pricing.{name}"),
                    format!("{v} is not a number >= 0"),
                );
            }
        }
        config.plan.pricing = pricing;
    }
    if let Some(value) = m.value {
        if let Err(e) = value.check() {
            problems.add(format!("{field}.value"), e);
        }
        config.plan.value = value;
    }
    let dispatches = match m.dispatches {
        Some(raw) => sink_spec(raw, &format!("{field}.dispatches"), base, problems)?,
        None => SinkSpec::None,
    };
    Some(MatchingSpec { config, dispatches })
}

fn count_job(raw: RawCountJob, problems: &mut Problems) -> CountJob {
    let defaults = CountJob::default();
    let mut at_least_one = |value: Option<u64>, default: u64, field: &str| {
        let value = value.unwrap_or(default);
        if value == 0 {
            problems.add(format!("jobs.count.{field}"), "must be at least 1");
        }
        value.max(1)
    };
    let keys = at_least_one(raw.keys, defaults.keys, "keys");
    let epoch_events = at_least_one(raw.epoch_events, defaults.epoch_events, "epoch_events");
    let max_epochs_in_flight = at_least_one(
        raw.max_epochs_in_flight,
        defaults.max_epochs_in_flight,
        "max_epochs_in_flight",
    );
    if let Some(rate) = raw.events_per_second
        && !(rate.is_finite() && rate > 0.0)
    {
        problems.add(
            "jobs.count.events_per_second",
            format!("{rate} is not a positive rate"),
        );
    }
    CountJob {
        events: raw.events.unwrap_or(defaults.events),
        keys,
        seed: raw.seed.unwrap_or(defaults.seed),
        epoch_events,
        max_epochs_in_flight,
        events_per_second: raw.events_per_second.filter(|r| r.is_finite() && *r > 0.0),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::super::{ApiKey, InferenceLoad, Manifest, ManifestError};

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, Path::new("m.toml"))
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ManifestError::Invalid { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[test]
    fn empty_manifest_gets_every_default() {
        let m = parse("").unwrap();
        assert_eq!(m.cluster.name, "dima");
        assert_eq!(m.dataflow.processes.len(), 1);
        assert_eq!(
            m.dataflow.processes[0].address.to_string(),
            "127.0.0.1:2101"
        );
        assert_eq!(m.dataflow.processes[0].workers, 1);
        assert_eq!(m.dataflow.processes[0].metrics_address, None);
        assert_eq!(m.telemetry.log_level, "info");
        assert_eq!(m.telemetry.otlp, None);
        assert_eq!(m.jobs.count, dataflows::CountJob::default());
    }

    #[test]
    fn bad_address_is_named_exactly() {
        let p = problems(
            r#"
            [[dataflow.processes]]
            address = "127.0.0.1:2101"
            [[dataflow.processes]]
            address = "127.0.0.1:x"
            "#,
        );
        assert_eq!(
            p,
            vec![
                r#"dataflow.processes[1].address: "127.0.0.1:x" is not a socket address (expected IP:PORT, e.g. 127.0.0.1:2101)"#
            ]
        );
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let p = problems(
            r#"
            cluster = { name = "" }
            [[dataflow.processes]]
            address = "127.0.0.1:2101"
            workers = 0
            [[dataflow.processes]]
            address = "127.0.0.1:2101"
            [telemetry]
            log_format = "xml"
            otlp_endpoint = "localhost:4317"
            [jobs.count]
            keys = 0
            "#,
        );
        let joined = p.join("\n");
        for needle in [
            "cluster.name:",
            "dataflow.processes[0].workers: must be at least 1",
            "dataflow.processes[1].address: 127.0.0.1:2101 is already used by dataflow.processes[0].address",
            "telemetry.log_format:",
            "telemetry.otlp_endpoint:",
            "jobs.count.keys: must be at least 1",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
    }

    #[test]
    fn unequal_workers_are_rejected() {
        let p = problems(
            r#"
            [[dataflow.processes]]
            address = "127.0.0.1:2101"
            workers = 2
            [[dataflow.processes]]
            address = "127.0.0.1:2102"
            workers = 1
            "#,
        );
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("dataflow.processes[1].workers: 1 differs"),
            "{p:?}"
        );
    }

    #[test]
    fn metrics_ports_follow_the_process_index_and_must_not_collide() {
        let m = parse(
            r#"
            [[dataflow.processes]]
            address = "127.0.0.1:2101"
            [[dataflow.processes]]
            address = "127.0.0.1:2102"
            [telemetry]
            metrics_address = "127.0.0.1:9464"
            "#,
        )
        .unwrap();
        let ports: Vec<_> = m
            .dataflow
            .processes
            .iter()
            .map(|p| p.metrics_address.unwrap().port())
            .collect();
        assert_eq!(ports, vec![9464, 9465]);

        let p = problems(
            r#"
            [[dataflow.processes]]
            address = "127.0.0.1:2101"
            [[dataflow.processes]]
            address = "127.0.0.1:2102"
            [telemetry]
            metrics_address = "127.0.0.1:2101"
            "#,
        );
        assert!(p.iter().any(|m| m.contains("already used")), "{p:?}");
    }

    #[test]
    fn unimplemented_sections_say_not_supported_yet() {
        let p = problems(
            r#"
            [checkpoints]
            dir = "/tmp"
            "#,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("checkpoints:") && p[0].contains("not supported yet"));
    }

    #[test]
    fn inference_resolves_with_defaults() {
        let m = parse(
            r#"
            [inference]
            model = "gemma3-270m"
            "#,
        )
        .unwrap();
        let i = m.inference.unwrap();
        assert_eq!((i.tp, i.ranks.clone(), i.root), (1, vec![0], None));
        assert_eq!(i.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(i.served_model_name, "gemma3-270m");
        assert_eq!(
            (i.max_batch, i.max_waiting, i.max_tokens_in_flight),
            (16, 64, 65_536)
        );
        assert_eq!(i.collective_timeout, Duration::from_secs(30));
        assert_eq!(
            i.load,
            InferenceLoad {
                requests: 8,
                concurrency: 4,
                max_tokens: 16
            }
        );
        assert!(i.in_one_process() && !i.keep_serving && i.api_key.is_none());

        let m = parse(
            r#"
            [[dataflow.processes]]
            address = "127.0.0.1:2101"
            [[dataflow.processes]]
            address = "127.0.0.1:2102"
            [inference]
            model = "models/my.gguf"
            tp = 2
            ranks = [0, 1]
            root = "127.0.0.1:2201"
            api_key_env = "MY_KEY"
            load = { requests = 0 }
            "#,
        )
        .unwrap();
        let i = m.inference.unwrap();
        assert!(!i.in_one_process());
        assert_eq!(i.root.unwrap().to_string(), "127.0.0.1:2201");
        assert_eq!(i.api_key, Some(ApiKey::Env("MY_KEY".into())));
        assert!(i.model.ends_with("models/my.gguf"), "{}", i.model);
        assert_eq!(i.served_model_name, "my.gguf");
        assert_eq!(i.load.requests, 0);
    }

    #[test]
    fn inference_problems_name_their_fields() {
        let p = problems(
            r#"
            [[dataflow.processes]]
            address = "127.0.0.1:2101"
            [[dataflow.processes]]
            address = "127.0.0.1:2102"
            [[dataflow.processes]]
            address = "127.0.0.1:2103"
            [inference]
            backend = "tpu"
            tp = 3
            ranks = [0, 0, 5]
            listen = "127.0.0.1:2102"
            api_key = "a"
            api_key_env = "B"
            collective_timeout_s = 0
            max_batch = 0
            load = { concurrency = 0 }
            "#,
        );
        let want = [
            "inference.model: is required",
            "inference.backend: \"tpu\" is not a backend",
            "inference.ranks[2]: process 5 does not exist (dataflow.processes has 3)",
            "inference.ranks: [0, 0, 5] puts some ranks together and others apart",
            "inference.root: is required when ranks run in different processes",
            "inference.listen: 127.0.0.1:2102 is already dataflow.processes[1].address",
            "inference.api_key: set api_key or api_key_env, not both",
            "inference.collective_timeout_s: 0 is not between 0.1 and 3600 seconds",
            "inference.load.concurrency: must be at least 1",
            "inference.max_batch: must be at least 1",
        ];
        for w in want {
            assert!(
                p.iter().any(|m| m.starts_with(w)),
                "missing {w:?} in {p:#?}"
            );
        }
        let p = problems(
            "[inference]\nmodel = \"gemma3-270m\"\nbackend = \"cuda\"\ntp = 2\nranks = [0]\n",
        );
        assert!(
            p.iter().all(|m| !m.starts_with("inference.backend")),
            "tp 2 in one process is fine on GPUs: {p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("inference.ranks: lists 1 process(es) for tp = 2")),
            "{p:?}"
        );
    }

    #[test]
    fn pipelines_resolve_with_defaults_and_paths_next_to_the_manifest() {
        let m = Manifest::parse(
            r#"
            [pipelines.ads]
            [pipelines.replay]
            family = "dispatch"
            epoch_events = 500
            [pipelines.replay.source]
            kind = "jsonl"
            path = "data/d.jsonl"
            [pipelines.replay.sink]
            kind = "jsonl"
            path = "/abs/out.jsonl"
            [pipelines.replay.dead_letter]
            path = "dl/replay.jsonl"
            "#,
            Path::new("/etc/dima/m.toml"),
        )
        .unwrap();
        use dataflows::events::Family;
        use dataflows::pipelines::{GeneratorSpec, SinkSpec, SourceSpec};
        assert_eq!(m.pipelines.len(), 2);
        let ads = &m.pipelines[0];
        assert_eq!((ads.name.as_str(), ads.family), ("ads", Family::Ads));
        assert_eq!(
            ads.source,
            SourceSpec::Generator(GeneratorSpec::new(Family::Ads))
        );
        assert_eq!(ads.sink, SinkSpec::None);
        assert_eq!(
            ads.dead_letter,
            Path::new("/etc/dima/dead-letter/ads.jsonl")
        );
        assert_eq!((ads.epoch_events, ads.max_epochs_in_flight), (10_000, 4));
        let replay = &m.pipelines[1];
        assert_eq!(replay.family, Family::Dispatch);
        assert_eq!(
            replay.source,
            SourceSpec::Jsonl {
                path: "/etc/dima/data/d.jsonl".into()
            }
        );
        assert_eq!(
            replay.sink,
            SinkSpec::Jsonl {
                path: "/abs/out.jsonl".into()
            }
        );
        assert_eq!(replay.dead_letter, Path::new("/etc/dima/dl/replay.jsonl"));
        assert_eq!(replay.epoch_events, 500);
    }

    #[test]
    fn pipeline_problems_name_their_fields() {
        let p = problems(
            r#"
            [pipelines.clicks]
            [pipelines.ads]
            epoch_events = 0
            [pipelines.ads.source]
            kind = "generator"
            path = "x.jsonl"
            malformed_fraction = 1.5
            [pipelines.ads.sink]
            kind = "jsonl"
            [pipelines.dispatch.source]
            kind = "jsonl"
            [pipelines.dispatch.sink]
            kind = "carrier-pigeon"
            [pipelines.k]
            family = "ads"
            [pipelines.k.source]
            kind = "kafka"
            brokers = "127.0.0.1:9092"
            [pipelines.k.sink]
            kind = "kafka"
            topic = "out"
            "#,
        );
        let expected = [
            "pipelines.ads.epoch_events: must be at least 1",
            "pipelines.ads.source.path: does not apply to kind = \"generator\"",
            "pipelines.ads.source.malformed_fraction: 1.5 is not between 0 and 1",
            "pipelines.ads.sink.path: is required for kind = \"jsonl\"",
            "pipelines.clicks.family: is missing (needed when the pipeline is not named ads or dispatch): \"ads\" or \"dispatch\"",
            "pipelines.dispatch.source.path: is required for kind = \"jsonl\"",
            "pipelines.dispatch.sink.kind: \"carrier-pigeon\" is not one of \"none\", \"stdout\", \"jsonl\", \"kafka\"",
            "pipelines.k.source.topic: is required for kind = \"kafka\"",
            "pipelines.k.sink.brokers: is required for kind = \"kafka\"",
        ];
        assert_eq!(p, expected, "{p:#?}");
    }

    #[test]
    fn hashed_features_are_checked_and_reach_the_fixed_effect() {
        let p = problems(
            r#"
            [pipelines.ads.learner]
            hashed_features = ["member", "placement*weekday"]
            [pipelines.a2]
            family = "ads"
            [pipelines.a2.learner]
            hashed_features = ["member"]
            hash_bits = 40
            fixed_effect_every = 2
            "#,
        );
        let expected = [
            "pipelines.a2.learner.hash_bits: hash_bits 40 must be between 1 and 24",
            "pipelines.ads.learner.hashed_features: \"placement*weekday\": \"weekday\" is not one of member, item, campaign, device, placement, position, hour",
            "pipelines.ads.learner.hashed_features: hashed features feed the fixed effect: set fixed_effect_every too",
        ];
        assert_eq!(p, expected, "{p:#?}");
        let m = parse(
            r#"
            [pipelines.ads.learner]
            hashed_features = ["member", "placement*hour"]
            hash_bits = 16
            fixed_effect_every = 3
            "#,
        )
        .unwrap();
        let learner = m.pipelines[0].learner.as_ref().unwrap();
        assert_eq!(learner.hashing.bits(), 16);
        assert!(!learner.hashing.is_empty());
        assert_eq!(learner.fixed.unwrap().hash_bits, 16);
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        match parse("[cluster]\nname = \"a\"\nworkers = = 3\n") {
            Err(ManifestError::Syntax { line, column, .. }) => assert_eq!((line, column), (3, 11)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_fields_and_wrong_types_name_the_field() {
        match parse("[[dataflow.processes]]\naddress = \"127.0.0.1:1\"\nadress = \"x\"\n") {
            Err(e @ ManifestError::Schema { .. }) => {
                let text = e.to_string();
                assert!(text.contains("dataflow.processes[0]"), "{text}");
                assert!(text.contains("unknown field `adress`"), "{text}");
                assert!(text.starts_with("m.toml:3:"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        match parse("[[dataflow.processes]]\naddress = \"127.0.0.1:1\"\nworkers = \"two\"\n") {
            Err(e @ ManifestError::Schema { .. }) => {
                let text = e.to_string();
                assert!(text.contains("dataflow.processes[0].workers"), "{text}");
                assert!(text.contains("invalid type"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }
}
