//! Dima's inference side: the Gemma 3 model (config, weight loading with a
//! tensor-parallel sharding plan, tokenizer, forward pass, KV cache), the actix
//! shard and engine actors, and the OpenAI-compatible HTTP server.
//!
//! So far: the model catalog and cache ([`models`]): `dima models fetch
//! gemma3-270m` and the resolution of `--model` arguments. The model itself
//! lands next. This crate builds on `kernels` and must not know about timely
//! (see `shared/ARCHITECTURE.md`).

pub mod gemma;
mod metadata;
pub mod models;
pub mod tokenizer;

pub use metadata::MetadataError;
pub use tokenizer::Tokenizer;
