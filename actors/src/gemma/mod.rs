//! Gemma 3: configuration, weights and the forward pass.

pub mod config;
mod generate;
mod model;

pub use config::{ConfigError, GemmaConfig, LayerKind};
pub use generate::{END_OF_GENERATION, Scored, argmax, generate_greedy, score};
pub use model::{Gemma, KvCache, LoadError};
