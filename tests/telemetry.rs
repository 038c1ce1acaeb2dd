//! Telemetry that something actually receives: the Prometheus endpoint of a
//! running process, OTLP spans and metrics in an in-process collector, and
//! JSON log lines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dima_tests::{
    eventually, free_port, http_get, layout_manifest, run_dima, spawn_dima, wait, write,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::resource::v1::Resource;

#[test]
fn prometheus_endpoint_serves_operator_counts_and_frontier_lag() {
    let port = free_port();
    let job = format!(
        "[telemetry]\nmetrics_address = \"127.0.0.1:{port}\"\n\n\
         [jobs.count]\nevents = 6_000\nepoch_events = 500\nevents_per_second = 3_000.0\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.toml", &layout_manifest(1, 2, &job));
    let up = spawn_dima(&["up", path.to_str().unwrap()]);
    let address = format!("127.0.0.1:{port}");
    let body = eventually(Duration::from_secs(15), || {
        http_get(&address, "/metrics").filter(|b| {
            b.contains(r#"dima_operator_records_total{dataflow="count",operator="count_by_key",worker="1"}"#)
                && b.contains("dima_epochs_completed_total")
        })
    })
    .expect("the endpoint reports the running job");
    for family in [
        r#"dima_operator_records_total{dataflow="count",operator="generate",worker="0"}"#,
        r#"dima_frontier_lag_epochs{dataflow="count",worker="0"}"#,
        r#"dima_frontier_lag_seconds{dataflow="count",worker="1"}"#,
        "# TYPE dima_operator_records_total counter",
        "# TYPE dima_frontier_lag_epochs gauge",
    ] {
        assert!(body.contains(family), "missing {family} in:\n{body}");
    }
    assert!(
        http_get(&address, "/nope").is_none(),
        "only /metrics is served"
    );
    let done = wait(up, Duration::from_secs(30));
    done.assert_success();
    assert!(
        done.last_line()
            .starts_with(r#"{"job":"count","events":6000,"#),
        "{}",
        done.stdout
    );
}

/// An OTLP/gRPC collector that keeps what it receives.
#[derive(Clone, Default)]
struct Collector {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute(resource: Option<&Resource>, key: &str) -> Option<String> {
    resource?
        .attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

#[test]
fn otlp_collector_receives_spans_and_metrics_from_every_process() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let collector = Collector::default();
    let port = free_port();
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_shutdown(address, async {
                let _ = stop_rx.await;
            }),
    );
    let extra = format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nservice_name = \"dima-e2e\"\nexport_interval_ms = 200\n\n\
         [jobs.count]\nevents = 20_000\nepoch_events = 1_000\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.toml", &layout_manifest(2, 1, &extra));
    let done = run_dima(&["up", path.to_str().unwrap()], Duration::from_secs(60));
    done.assert_success();

    // The exporters flush on shutdown, so everything has arrived by now.
    let traces = collector.traces.lock().unwrap().clone();
    let mut span_processes = std::collections::BTreeSet::new();
    let mut names = std::collections::BTreeSet::new();
    for request in &traces {
        for resource_spans in &request.resource_spans {
            let resource = resource_spans.resource.as_ref();
            assert_eq!(
                attribute(resource, "service.name").as_deref(),
                Some("dima-e2e")
            );
            assert_eq!(attribute(resource, "dima.cluster").as_deref(), Some("e2e"));
            let process = attribute(resource, "dima.process").unwrap();
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    names.insert(span.name.clone());
                    span_processes.insert(process.clone());
                    if span.name == "worker" {
                        assert!(
                            !span.parent_span_id.is_empty(),
                            "worker spans are children of dima.run"
                        );
                    }
                }
            }
        }
    }
    assert!(
        names.contains("dima.run") && names.contains("worker"),
        "span names: {names:?}"
    );
    assert_eq!(
        span_processes.into_iter().collect::<Vec<_>>(),
        vec!["0", "1"]
    );

    let metrics = collector.metrics.lock().unwrap().clone();
    let mut metric_processes = std::collections::BTreeSet::new();
    for request in &metrics {
        for resource_metrics in &request.resource_metrics {
            let process = attribute(resource_metrics.resource.as_ref(), "dima.process").unwrap();
            for scope in &resource_metrics.scope_metrics {
                if scope
                    .metrics
                    .iter()
                    .any(|m| m.name == "dima_operator_records_total")
                {
                    metric_processes.insert(process.clone());
                }
            }
        }
    }
    assert_eq!(
        metric_processes.into_iter().collect::<Vec<_>>(),
        vec!["0", "1"]
    );

    let _ = stop_tx.send(());
    let _ = runtime.block_on(server);
}

#[test]
fn json_log_format_writes_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "m.toml",
        &layout_manifest(2, 1, "[jobs.count]\nevents = 1000\n"),
    );
    let done = run_dima(
        &["--log-format", "json", "up", path.to_str().unwrap()],
        Duration::from_secs(30),
    );
    done.assert_success();
    let lines: Vec<serde_json::Value> = done
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let finished: Vec<_> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "job finished")
        .collect();
    assert_eq!(finished.len(), 2, "one per process:\n{}", done.stderr);
    let processes: std::collections::BTreeSet<_> = finished
        .iter()
        .map(|l| l["span"]["process"].as_u64().unwrap())
        .collect();
    assert_eq!(processes.into_iter().collect::<Vec<_>>(), vec![0, 1]);
}
