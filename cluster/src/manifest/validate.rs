//! Raw manifest → [`Manifest`]: defaults filled in, every field checked, every
//! problem collected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use dataflows::CountJob;

use super::raw::{RawCountJob, RawManifest, RawProcess, RawTelemetry};
use super::{
    ClusterSpec, DataflowSpec, JobsSpec, LogFormat, Manifest, OtlpSpec, Problem, ProcessSpec,
    TelemetrySpec,
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

pub(super) fn validate(raw: RawManifest) -> Result<Manifest, Vec<Problem>> {
    let mut problems = Problems::default();

    if raw.inference.is_some() {
        problems.add(
            "inference",
            "not supported yet: it arrives with the sharded Gemma 3 inference work",
        );
    }
    if raw.checkpoints.is_some() {
        problems.add(
            "checkpoints",
            "not supported yet: it arrives with operator-state checkpointing",
        );
    }
    if let Some(pipelines) = &raw.pipelines {
        if pipelines.is_empty() {
            problems.add("pipelines", "not supported yet: no pipeline is implemented");
        }
        for name in pipelines.keys() {
            problems.add(
                format!("pipelines.{name}"),
                "not supported yet: no pipeline is implemented (run `--job count`)",
            );
        }
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

    if problems.0.is_empty() {
        Ok(Manifest {
            cluster,
            dataflow,
            telemetry,
            jobs: JobsSpec { count },
        })
    } else {
        Err(problems.0)
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

    use super::super::{Manifest, ManifestError};

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
            [pipelines.ads]
            source = "generator"
            [inference]
            model = "gemma3-270m"
            [checkpoints]
            dir = "/tmp"
            "#,
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p.iter().all(|m| m.contains("not supported yet")), "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("pipelines.ads:")));
        assert!(p.iter().any(|m| m.starts_with("inference:")));
        assert!(p.iter().any(|m| m.starts_with("checkpoints:")));
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
