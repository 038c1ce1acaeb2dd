//! Telemetry for one `dima` process: `tracing` logs, OpenTelemetry traces and
//! metrics over OTLP, and a Prometheus text endpoint.
//!
//! [`Telemetry::init`] installs the global `tracing` subscriber (human or JSON
//! lines on stderr, filtered by the manifest's `log_level` unless `RUST_LOG`
//! is set) and, when the manifest names an OTLP endpoint, an OpenTelemetry
//! tracer behind it. Every metric lives in one [`prometheus::Registry`]: the
//! endpoint ([`Telemetry::serve_metrics`]) renders it as Prometheus text, and
//! [`Telemetry::export_metrics`] bridges the same values to OTLP, so the two
//! views can never disagree.

mod otlp;
mod prometheus_endpoint;

use std::net::SocketAddr;

use prometheus::Registry;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::manifest::{LogFormat, TelemetrySpec};

pub use prometheus_endpoint::MetricsEndpoint;

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("telemetry.otlp_endpoint {endpoint}: {message}")]
    Otlp {
        /// The configured endpoint.
        endpoint: String,
        /// The exporter's error.
        message: String,
    },
    /// The metrics endpoint could not listen.
    #[error("{field} {address}: cannot listen: {source}")]
    Listen {
        /// The manifest field that named the address.
        field: String,
        /// The address.
        address: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The tokio runtime for exporters could not start.
    #[error("cannot start the telemetry runtime: {0}")]
    Runtime(std::io::Error),
}

/// Who is reporting: becomes resource attributes and log fields.
#[derive(Clone, Debug)]
pub struct Identity {
    /// `cluster.name`.
    pub cluster: String,
    /// The process index, for `dima run`; `None` for the launcher.
    pub process: Option<usize>,
}

/// The running telemetry of one process. Call [`Telemetry::shutdown`] before
/// exit so buffered spans and the last metric values reach the collector.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    otlp: Option<otlp::Otlp>,
    endpoint: Option<MetricsEndpoint>,
}

/// Log lines on stderr for a command without a manifest (`dima serve`):
/// `RUST_LOG`, else `level`, else `info`; actix-server's worker lines only
/// at warn. Does nothing if a subscriber is already installed.
pub fn stderr_logging(level: Option<&str>, format: LogFormat) {
    let (filter, fmt) = stderr_layer(level.unwrap_or("info"), format);
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .try_init();
}

/// The filter (`RUST_LOG`, else `level`; actix-server's worker lines only
/// at warn unless `level` names actix) and the stderr line format.
fn stderr_layer<S>(level: &str, format: LogFormat) -> (EnvFilter, Box<dyn Layer<S> + Send + Sync>)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    // actix-server announces every worker start and stop at INFO; that is
    // noise next to the dataflow's own lines unless asked for.
    let level = if level.contains("actix") {
        level.to_owned()
    } else {
        format!("{level},actix_server=warn")
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::builder().parse(&level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(true);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    (filter, fmt)
}

impl Telemetry {
    /// Installs logging (and OTLP tracing when configured) for this process.
    pub fn init(spec: &TelemetrySpec, identity: &Identity) -> Result<Self, TelemetryError> {
        let otlp = spec
            .otlp
            .as_ref()
            .map(|o| otlp::Otlp::start(o, &spec.service_name, identity))
            .transpose()?;
        let (filter, fmt) = stderr_layer(&spec.log_level, spec.log_format);
        let tracer = otlp
            .as_ref()
            .map(|o| tracing_opentelemetry::layer().with_tracer(o.tracer()));
        // A second init in one process (tests) keeps the first subscriber.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(tracer)
            .try_init();
        Ok(Self {
            registry: Registry::new(),
            otlp,
            endpoint: None,
        })
    }

    /// The registry every metric of this process is registered in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves the registry as Prometheus text at `http://ADDRESS/metrics`.
    /// `field` names the manifest field the address came from, for errors.
    pub fn serve_metrics(
        &mut self,
        address: SocketAddr,
        field: &str,
    ) -> Result<SocketAddr, TelemetryError> {
        let endpoint =
            MetricsEndpoint::start(address, self.registry.clone()).map_err(|source| {
                TelemetryError::Listen {
                    field: field.to_owned(),
                    address,
                    source,
                }
            })?;
        let bound = endpoint.address();
        self.endpoint = Some(endpoint);
        Ok(bound)
    }

    /// Starts exporting the registry's `families` over OTLP, when configured.
    pub fn export_metrics(&mut self, families: &[dataflows::MetricFamily]) {
        if let Some(otlp) = &mut self.otlp {
            otlp.export_registry(self.registry.clone(), families);
        }
    }

    /// Flushes and stops every exporter and the metrics endpoint.
    pub fn shutdown(self) {
        if let Some(otlp) = self.otlp {
            otlp.shutdown();
        }
        if let Some(endpoint) = self.endpoint {
            endpoint.stop();
        }
    }
}
