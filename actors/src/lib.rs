//! Dima's inference side: the Gemma 3 model and its serving.
//!
//! The three types to know first:
//! - [`Gemma`]: one tensor-parallel rank of a Gemma 3 model, loaded from a
//!   GGUF file or a Hugging Face checkpoint, with its tokenizer
//!   ([`Tokenizer`]), forward pass and KV cache ([`KvCache`]);
//! - [`Engine`]: continuous batching over the ranks (actix shard actors),
//!   step by step;
//! - [`Deployment`]: a model, its ranks' placement, backend and limits,
//!   started as the OpenAI-compatible HTTP server.
//!
//! Also: the model catalog and cache ([`models`]), sampling and
//! generation ([`gemma`]). This crate builds on `kernels` and knows
//! nothing of timely.
//!
//! ```no_run
//! let gemma = actors::Gemma::load(std::path::Path::new("gemma-3-270m-q4_k_m.gguf"))?;
//! let ids = gemma.tokenizer().encode("The capital of France is", true, false);
//! let mut sampler = actors::gemma::Sampler::new(actors::gemma::Sampling::default());
//! let (out, _stats) = actors::gemma::generate(&gemma, &ids, 8, &mut sampler, |_| {})?;
//! println!("{}", gemma.tokenizer().decode(&out));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod gemma;
mod metadata;
pub mod models;
pub mod serve;
pub mod tokenizer;

pub use gemma::engine::{Engine, EngineConfig};
pub use gemma::{Gemma, KvCache};
pub use metadata::MetadataError;
pub use serve::{Deployment, ServeError};
pub use tokenizer::Tokenizer;
