//! `dima models ...`: fetch catalog models and inspect model files.

use actors::models::{ModelSource, resolve};
pub use actors::models::{gguf_path, model_path};
use kernels::gguf::{GgufFile, MetaArray, MetaValue};
use serde_json::{Value, json};

fn meta_json(value: &MetaValue) -> Value {
    match value {
        MetaValue::U8(v) => json!(v),
        MetaValue::I8(v) => json!(v),
        MetaValue::U16(v) => json!(v),
        MetaValue::I16(v) => json!(v),
        MetaValue::U32(v) => json!(v),
        MetaValue::I32(v) => json!(v),
        MetaValue::F32(v) => json!(v),
        MetaValue::Bool(v) => json!(v),
        MetaValue::String(v) => json!(v),
        MetaValue::U64(v) => json!(v),
        MetaValue::I64(v) => json!(v),
        MetaValue::F64(v) => json!(v),
        MetaValue::Array(a) => array_json(a),
    }
}

/// Arrays are summarised: element type, length, and the first few elements.
fn array_json(array: &MetaArray) -> Value {
    const SHOWN: usize = 8;
    let (element, head): (&str, Value) = match array {
        MetaArray::U8(v) => ("uint8", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::I8(v) => ("int8", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::U16(v) => ("uint16", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::I16(v) => ("int16", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::U32(v) => ("uint32", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::I32(v) => ("int32", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::F32(v) => ("float32", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::Bool(v) => ("bool", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::String(v) => ("string", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::Array(v) => (
            "array",
            Value::Array(v.iter().take(SHOWN).map(array_json).collect()),
        ),
        MetaArray::U64(v) => ("uint64", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::I64(v) => ("int64", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
        MetaArray::F64(v) => ("float64", json!(v.iter().take(SHOWN).collect::<Vec<_>>())),
    };
    json!({"array": element, "len": array.len(), "head": head})
}

/// What `dima models inspect DIR` prints for a checkpoint directory: the
/// resolved text config, the tensor prefix and every tensor.
fn inspect_checkpoint(dir: &std::path::Path) -> anyhow::Result<Value> {
    let checkpoint = actors::gemma::Checkpoint::open(dir)?;
    let c = checkpoint.config();
    let mut types = std::collections::BTreeMap::<String, usize>::new();
    let mut tensors: Vec<Value> = Vec::new();
    for file in checkpoint.files() {
        let name = file
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut entries: Vec<_> = file.tensors().collect();
        entries.sort_by_key(|t| t.start);
        for t in entries {
            *types.entry(t.dtype.clone()).or_default() += 1;
            tensors.push(json!({"name": t.name, "type": t.dtype, "shape": t.shape, "file": name, "start": t.start, "bytes": t.bytes}));
        }
    }
    Ok(json!({
        "path": dir.display().to_string(),
        "format": "safetensors",
        "prefix": checkpoint.prefix(),
        "config": {
            "vocab": c.vocab, "hidden": c.hidden, "layers": c.layers, "ffn": c.ffn,
            "heads": c.heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
            "rms_eps": c.rms_eps, "rope_global_base": c.rope_global_base,
            "rope_global_scale": c.rope_global_scale, "rope_local_base": c.rope_local_base,
            "window": c.window, "query_pre_attn_scalar": c.query_pre_attn_scalar,
            "context": c.context,
            "global_layers": c.layer_kinds.iter().enumerate()
                .filter(|(_, k)| **k == actors::gemma::LayerKind::Global)
                .map(|(i, _)| i).collect::<Vec<_>>(),
        },
        "tensor_types": types,
        "tensors": tensors,
    }))
}

/// What `dima models inspect MODEL` prints: the file's header as JSON.
pub fn inspect(model: &str) -> anyhow::Result<Value> {
    let path = match resolve(model)? {
        ModelSource::Gguf(path) => path,
        ModelSource::Checkpoint(dir) => return inspect_checkpoint(&dir),
    };
    let file = GgufFile::open(&path)?;
    let header = file.header();
    let mut metadata = serde_json::Map::new();
    for (key, value) in &header.metadata {
        metadata.insert(key.clone(), meta_json(value));
    }
    let mut types = std::collections::BTreeMap::<String, usize>::new();
    let tensors: Vec<Value> = header
        .tensors
        .iter()
        .map(|t| {
            *types.entry(t.ggml_type.name().to_owned()).or_default() += 1;
            json!({"name": t.name, "type": t.ggml_type.name(), "dims": t.dims, "start": t.start, "bytes": t.bytes})
        })
        .collect();
    Ok(json!({
        "path": path.display().to_string(),
        "version": header.version,
        "alignment": header.alignment,
        "data_start": header.data_start,
        "metadata": metadata,
        "tensor_types": types,
        "tensors": tensors,
    }))
}

/// The size preset a `--model` name names, for `--random-weights`:
/// `gemma3-27b` or `27b` (also 270m, 1b, 4b, 12b).
pub fn preset(model: &str) -> anyhow::Result<actors::gemma::GemmaConfig> {
    let size = model.strip_prefix("gemma3-").unwrap_or(model);
    actors::gemma::GemmaConfig::preset(size).ok_or_else(|| {
        anyhow::anyhow!(
            "--random-weights needs a size preset as --model: gemma3-270m, gemma3-1b, gemma3-4b, \
             gemma3-12b or gemma3-27b (got {model:?})"
        )
    })
}

/// A `--weight-type` for random weights.
pub fn random_weight_type(name: &str) -> anyhow::Result<kernels::gguf::GgmlType> {
    actors::gemma::Gemma::RANDOM_TYPES
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            anyhow::anyhow!("--weight-type {name:?}: random weights come in bf16, q8_0 or q4_k")
        })
}

/// The memory dima may allocate: `MemAvailable` from `/proc/meminfo`, or
/// `DIMA_MEMORY_LIMIT` (bytes) when that is set and smaller.
pub fn available_memory() -> Option<u64> {
    let limit = std::env::var("DIMA_MEMORY_LIMIT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        });
    match (meminfo, limit) {
        (Some(m), Some(l)) => Some(m.min(l)),
        (m, l) => m.or(l),
    }
}

pub(crate) fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// A single-rank model of `model`'s preset with random `weight_type`
/// weights. Before allocating, prints what it needs (the weights plus
/// `working_bytes` for caches and activations) against the memory
/// available, and refuses, naming the numbers, when it does not fit.
pub fn random_gemma(
    model: &str,
    weight_type: kernels::gguf::GgmlType,
    working_bytes: u64,
    seed: u64,
) -> anyhow::Result<actors::gemma::Gemma> {
    use actors::gemma::Gemma;
    let config = preset(model)?;
    let weights = Gemma::random_weight_bytes(&config, 1, 0, weight_type)? as u64;
    let need = weights + working_bytes;
    let available = available_memory();
    eprintln!(
        "{model} with random {} weights: {:.2} GiB of weights + {:.2} GiB of KV cache and activations = {:.2} GiB; {} available",
        weight_type.name(),
        gib(weights),
        gib(working_bytes),
        gib(need),
        available.map_or("unknown".to_owned(), |a| format!("{:.2} GiB", gib(a)))
    );
    if let Some(available) = available
        && need > available
    {
        anyhow::bail!(
            "{model} with random {} weights needs {:.2} GiB but this machine has {:.2} GiB available \
             (MemAvailable in /proc/meminfo, or DIMA_MEMORY_LIMIT): refusing to allocate. A smaller --weight-type \
             (q4_k holds 4.5 bits per weight), a smaller preset, or more memory would fit",
            weight_type.name(),
            gib(need),
            gib(available)
        );
    }
    let started = std::time::Instant::now();
    let tokenizer = actors::Tokenizer::synthetic(config.vocab)?;
    let gemma = Gemma::random(
        config,
        tokenizer,
        weight_type,
        seed,
        Box::new(kernels::collective::SingleRank),
    )?;
    eprintln!(
        "built {model} with random weights in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(gemma)
}
