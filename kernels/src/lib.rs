//! Dima's compute kernels: tensor storage and views (f32, bf16, f16, GGUF
//! quantized blocks), CPU ops, CUDA ops behind the `cuda` feature, and the
//! collectives that join tensor-parallel ranks.
//!
//! So far: the GGUF reader ([`gguf::GgufFile`], [`gguf::parse`]) and the GGML
//! tensor types ([`gguf::GgmlType`]). The crate never depends on the model,
//! the actors or the dataflows (see `shared/ARCHITECTURE.md`).
//!
//! ```
//! use kernels::gguf::{GgufBuilder, MetaValue, parse};
//! let bytes = GgufBuilder::new()
//!     .meta("general.architecture", MetaValue::String("gemma3".into()))
//!     .tensor_f32("output_norm.weight", &[2], &[1.0, 2.0])
//!     .build();
//! let header = parse(&bytes).unwrap();
//! assert_eq!(header.get("general.architecture").and_then(MetaValue::as_str), Some("gemma3"));
//! assert_eq!(header.tensor("output_norm.weight").unwrap().dims, vec![2]);
//! ```

pub mod collective;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod gguf;
pub mod ops;
pub mod quant;
pub mod safetensors;
