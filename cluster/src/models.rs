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

/// The GGUF file a `--model` argument names (checkpoint directories are
/// recognised but cannot be run yet).
pub fn gguf_path(model: &str) -> anyhow::Result<std::path::PathBuf> {
    match resolve(model)? {
        ModelSource::Gguf(path) => Ok(path),
        ModelSource::Checkpoint(path) => {
            anyhow::bail!(
                "{}: checkpoint directories are not supported yet (GGUF files are)",
                path.display()
            )
        }
    }
}

/// What `dima models inspect MODEL` prints: the file's header as JSON.
pub fn inspect(model: &str) -> anyhow::Result<Value> {
    let path = gguf_path(model)?;
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
