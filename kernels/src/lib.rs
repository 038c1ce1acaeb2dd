//! Dima's compute kernels: GGUF and safetensors files, quantized weight
//! formats and their CPU products, CPU ops, the CUDA backend (feature
//! `cuda`), and the collectives that join tensor-parallel ranks. The crate
//! never depends on the model, the actors or the dataflows.
//!
//! The three types to know first:
//! - [`GgufFile`]: a GGUF model file, memory-mapped, with its metadata and
//!   tensors ([`gguf::parse`] reads a header from bytes);
//! - [`QMatrix`]: a matrix in a GGML quantized format, multiplied by f32
//!   activations with the kernels this CPU runs best ([`cpu::Kernel`]);
//! - [`Collective`]: how a tensor-parallel rank sums and gathers with its
//!   peers (one rank, in-process threads, TCP, or NCCL on GPUs).
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
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod gguf;
pub mod ops;
pub mod quant;
pub mod safetensors;

pub use collective::{Collective, CollectiveError};
pub use gguf::{GgmlType, GgufFile};
pub use quant::QMatrix;
