//! Gemma 3: configuration, weights and the forward pass.

pub mod config;
mod generate;
mod model;
mod sampling;

pub use config::{ConfigError, GemmaConfig, LayerKind};
pub use generate::{
    END_OF_GENERATION, GenerateError, GenerationStats, Scored, argmax, generate, score,
};
pub use model::{Gemma, KvCache, LoadError};
pub use sampling::{Sampler, Sampling, SamplingError};
