//! `[telemetry]`: logs, metrics and OTLP.

use std::time::Duration;

use crate::manifest::raw::RawTelemetry;
use crate::manifest::{LogFormat, OtlpSpec, TelemetrySpec};

use super::Problems;

pub(super) fn telemetry(raw: RawTelemetry, problems: &mut Problems) -> TelemetrySpec {
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
