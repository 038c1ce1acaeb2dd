//! `dima models ...`: fetch catalog models and inspect model files.

use actors::models::{ModelSource, resolve};
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

/// The GGUF file a `--model` argument names, for what only GGUF can do
/// (the llama.cpp anchor of `dima bench generate`).
pub fn gguf_path(model: &str) -> anyhow::Result<std::path::PathBuf> {
    match resolve(model)? {
        ModelSource::Gguf(path) => Ok(path),
        ModelSource::Checkpoint(path) => {
            anyhow::bail!(
                "{}: this command needs a GGUF file (llama.cpp reads only GGUF), not a checkpoint directory",
                path.display()
            )
        }
    }
}

/// The GGUF file or checkpoint directory a `--model` argument names.
pub fn model_path(model: &str) -> anyhow::Result<std::path::PathBuf> {
    Ok(match resolve(model)? {
        ModelSource::Gguf(path) | ModelSource::Checkpoint(path) => path,
    })
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
