//! Gemma 3: configuration, weights and the forward pass.

pub mod config;

pub use config::{ConfigError, GemmaConfig, LayerKind};
