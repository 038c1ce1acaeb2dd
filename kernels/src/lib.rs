//! Dima's compute kernels: tensor storage and views (f32, bf16, f16, GGUF
//! quantized blocks), CPU ops, CUDA ops behind the `cuda` feature, and the
//! collectives that join tensor-parallel ranks.
//!
//! This crate is empty so far: the workspace layout is fixed, and the kernels
//! arrive with the Gemma 3 CPU inference work. It must never depend on the
//! model, the actors or the dataflows (see `shared/ARCHITECTURE.md`).
