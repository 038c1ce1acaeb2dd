//! Dima's cluster layer: the manifest, the launcher, telemetry, and what
//! the `dima` binary is built on.
//!
//! The three types to know first:
//! - [`Manifest`]: one TOML file describing the cluster, parsed and
//!   validated before anything starts ([`ManifestError`] names the field);
//! - [`up`]: `dima up FILE` starts every process the manifest places on
//!   this machine as a child `dima run FILE --process I` ([`run_process`]),
//!   each one timely process with the manifest's workers, joined to its
//!   peers over TCP;
//! - [`Telemetry`]: logs, OTLP traces and metrics, and a Prometheus
//!   endpoint for every process.
//!
//! The `dima` binary adds the command line, `[inference]` deployments
//! (through `actors::serve`) and the end-to-end benchmarks.
//!
//! ```
//! use std::path::Path;
//! let manifest = cluster::Manifest::parse(
//!     "[[dataflow.processes]]\naddress = \"127.0.0.1:2101\"\nworkers = 2\n",
//!     Path::new("inline.toml"),
//! ).unwrap();
//! assert_eq!(manifest.dataflow.total_workers(), 2);
//! ```

pub mod launcher;
pub mod manifest;
pub mod mesh;
pub mod process;
pub mod summary;
pub mod telemetry;

pub use launcher::{EXIT_PEER_LOST, UpError, UpOptions, up};
pub use manifest::{LogFormat, Manifest, ManifestError, Problem};
pub use process::{Job, RunError, RunOptions, communication, run_process};
pub use telemetry::{Identity, Telemetry, TelemetryError};
