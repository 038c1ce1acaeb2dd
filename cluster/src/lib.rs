//! Dima's cluster layer: the manifest, the launcher, telemetry, and the
//! `dima` binary built on them.
//!
//! A cluster is described by one TOML [`Manifest`]. `dima up FILE` ([`up`])
//! starts every process the manifest places on this machine as a child
//! `dima run FILE --process I` ([`run_process`]), each of which runs one timely
//! process with the manifest's workers and joins its peers over TCP.
//! [`Telemetry`] gives every process logs, OTLP traces and metrics, and a
//! Prometheus endpoint.
//!
//! ```
//! use std::path::Path;
//! let manifest = cluster::Manifest::parse(
//!     "[[dataflow.processes]]\naddress = \"127.0.0.1:2101\"\nworkers = 2\n",
//!     Path::new("inline.toml"),
//! ).unwrap();
//! assert_eq!(manifest.dataflow.total_workers(), 2);
//! ```

pub mod assign;
pub mod bench;
pub mod events;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod inference;
pub mod launcher;
pub mod manifest;
pub mod mesh;
pub mod models;
pub mod plot;
pub mod process;
pub mod serve;
pub mod summary;
pub mod telemetry;

pub use launcher::{EXIT_PEER_LOST, UpError, UpOptions, up};
pub use manifest::{LogFormat, Manifest, ManifestError, Problem};
pub use process::{Job, RunError, RunOptions, communication, run_process};
pub use telemetry::{Identity, Telemetry, TelemetryError};
