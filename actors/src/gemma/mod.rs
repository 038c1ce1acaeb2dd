//! Gemma 3: configuration, weights, the forward pass, generation, the chat
//! template and the continuous-batching engine.

pub mod chat;
mod checkpoint;
pub mod config;
pub mod constrain;
pub mod device;
pub mod engine;
pub mod forward;
mod generate;
pub mod kv;
mod model;
mod sampling;
pub mod shard;

pub use checkpoint::{Checkpoint, CheckpointError, hf_name};
pub use config::{ConfigError, GemmaConfig, LayerKind};
pub use generate::{END_OF_GENERATION, GenerateError, GenerationStats, Scored, generate, score};
pub use model::{
    Gemma, KvCache, KvSnapshot, LayerWeight, LoadError, PREFILL_CHUNK, Weight, load_tokenizer,
};
pub use sampling::{Sampler, Sampling, SamplingError, TokenLogprob, argmax, token_logprob};
