//! Dima's end-to-end tests: one binary, one module per area.
//! They run the real `dima` executable; see `lib.rs` for how it is found.

#![allow(clippy::unwrap_used)]

mod batching;
mod checkpoints;
mod cli;
mod cluster;
mod device_model;
mod events;
mod features;
mod gemma;
mod kafka;
mod learner;
mod manifest;
mod matching;
mod models;
mod serve;
mod telemetry;
mod tensor_parallel;
