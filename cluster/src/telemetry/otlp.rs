//! OpenTelemetry over OTLP/gRPC: a tracer for `tracing` spans and a meter that
//! mirrors the Prometheus registry.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{MeterProvider, ObservableCounter, ObservableGauge};
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use prometheus::Registry;

use dataflows::{MetricFamily, MetricKind};

use super::{Identity, TelemetryError};
use crate::manifest::OtlpSpec;

/// The OTLP exporters of one process and the runtime their gRPC client needs.
pub(super) struct Otlp {
    spec: OtlpSpec,
    resource: Resource,
    runtime: tokio::runtime::Runtime,
    tracer_provider: SdkTracerProvider,
    meter_provider: Option<SdkMeterProvider>,
    // Observable instruments stay registered while these handles live.
    counters: Vec<ObservableCounter<u64>>,
    gauges: Vec<ObservableGauge<f64>>,
}

impl std::fmt::Debug for Otlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otlp")
            .field("endpoint", &self.spec.endpoint)
            .finish_non_exhaustive()
    }
}

impl Otlp {
    pub(super) fn start(
        spec: &OtlpSpec,
        service: &str,
        identity: &Identity,
    ) -> Result<Self, TelemetryError> {
        let failed = |message: String| TelemetryError::Otlp {
            endpoint: spec.endpoint.clone(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp")
            .enable_all()
            .build()
            .map_err(TelemetryError::Runtime)?;
        let mut attributes = vec![KeyValue::new("dima.cluster", identity.cluster.clone())];
        if let Some(process) = identity.process {
            attributes.push(KeyValue::new("dima.process", process as i64));
        }
        let resource = Resource::builder()
            .with_service_name(service.to_owned())
            .with_attributes(attributes)
            .build();
        let _entered = runtime.enter();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(spec.endpoint.clone())
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let tracer_provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.clone())
            .build();
        drop(_entered);
        Ok(Self {
            spec: spec.clone(),
            resource,
            runtime,
            tracer_provider,
            meter_provider: None,
            counters: Vec::new(),
            gauges: Vec::new(),
        })
    }

    pub(super) fn tracer(&self) -> SdkTracer {
        self.tracer_provider.tracer("dima")
    }

    /// Exports every family of `registry` named in `families`, read at each
    /// export, so OTLP sees exactly what `/metrics` shows.
    pub(super) fn export_registry(&mut self, registry: Registry, families: &[MetricFamily]) {
        let _entered = self.runtime.enter();
        let exporter = match opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(self.spec.endpoint.clone())
            .build()
        {
            Ok(exporter) => exporter,
            Err(e) => {
                tracing::error!(endpoint = %self.spec.endpoint, error = %e, "cannot export metrics over OTLP");
                return;
            }
        };
        let reader = PeriodicReader::builder(exporter)
            .with_interval(self.spec.export_interval)
            .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(self.resource.clone())
            .build();
        let meter = provider.meter("dima");
        for family in families {
            let registry = registry.clone();
            let name = family.name;
            match family.kind {
                MetricKind::Counter => self.counters.push(
                    meter
                        .u64_observable_counter(name)
                        .with_description(family.help)
                        .with_callback(move |observer| {
                            for (value, labels) in samples(&registry, name) {
                                observer.observe(value as u64, &labels);
                            }
                        })
                        .build(),
                ),
                MetricKind::Gauge => self.gauges.push(
                    meter
                        .f64_observable_gauge(name)
                        .with_description(family.help)
                        .with_callback(move |observer| {
                            for (value, labels) in samples(&registry, name) {
                                observer.observe(value, &labels);
                            }
                        })
                        .build(),
                ),
            }
        }
        self.meter_provider = Some(provider);
    }

    /// Flushes spans and a final metric export, then stops the runtime.
    pub(super) fn shutdown(self) {
        if let Some(provider) = &self.meter_provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: OTLP metrics to {}: {e}", self.spec.endpoint);
        }
        if let Err(e) = self.tracer_provider.shutdown() {
            eprintln!("warning: OTLP traces to {}: {e}", self.spec.endpoint);
        }
        drop(self.counters);
        drop(self.gauges);
        self.runtime
            .shutdown_timeout(std::time::Duration::from_secs(2));
    }
}

/// Current samples of the family `name`: value and labels as attributes.
fn samples(registry: &Registry, name: &str) -> Vec<(f64, Vec<KeyValue>)> {
    let mut out = Vec::new();
    for family in registry.gather().iter().filter(|f| f.name() == name) {
        let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
        for metric in family.get_metric() {
            let value = if counter {
                metric.get_counter().get_value()
            } else {
                metric.get_gauge().get_value()
            };
            let labels = metric
                .get_label()
                .iter()
                .map(|l| KeyValue::new(l.name().to_owned(), l.value().to_owned()))
                .collect();
            out.push((value, labels));
        }
    }
    out
}
