//! Dima's inference side: the Gemma 3 model (config, weight loading with a
//! tensor-parallel sharding plan, tokenizer, forward pass, KV cache), the actix
//! shard and engine actors, and the OpenAI-compatible HTTP server.
//!
//! This crate is empty so far: it fills in with the Gemma 3 CPU inference and
//! tensor-parallel serving work. It builds on `kernels` and must not know
//! about timely (see `shared/ARCHITECTURE.md`).
