//! Gemma 3 text configuration: from GGUF metadata, from Hugging Face
//! `config.json` (old flat fields or `layer_types` + `rope_parameters`), and
//! presets for every released size.
//!
//! Facts GGUF does not carry are fixed by Gemma 3 itself (Gemma 3 technical
//! report §2, and Hugging Face's `Gemma3TextConfig`): the local RoPE base is 10,000
//! and every sixth layer (5, 11, 17, …) is global; `query_pre_attn_scalar` is
//! head_dim except on 27B, where it is hidden/heads.

use kernels::gguf::GgufHeader;

use crate::metadata::{MetadataError, f64_of, opt_u64, str_of, u64_of};

/// Which attention a layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Sliding-window attention with the local RoPE base.
    Local,
    /// Full attention with the global RoPE base (and its scaling).
    Global,
}

/// Everything the forward pass needs to know about the model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmaConfig {
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// MLP intermediate size.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimension of each head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base of global layers.
    pub rope_global_base: f32,
    /// Linear RoPE scaling factor of global layers (1 = none).
    pub rope_global_scale: f32,
    /// RoPE base of local layers.
    pub rope_local_base: f32,
    /// Sliding window of local layers: a query sees the last `window` tokens, itself included.
    pub window: usize,
    /// Kind of every layer.
    pub layer_kinds: Vec<LayerKind>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f32,
    /// Maximum context.
    pub context: usize,
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A metadata key is missing or mistyped.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The file is not a Gemma 3 model.
    #[error("general.architecture is {0:?}; only \"gemma3\" is supported")]
    Architecture(String),
    /// A value is impossible.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// `config.json` could not be understood.
    #[error("config.json: {0}")]
    Json(String),
}

/// The Gemma 3 pattern: layer `i` is global iff `(i + 1) % 6 == 0`.
pub fn default_layer_kinds(layers: usize) -> Vec<LayerKind> {
    (0..layers)
        .map(|i| {
            if (i + 1) % 6 == 0 {
                LayerKind::Global
            } else {
                LayerKind::Local
            }
        })
        .collect()
}

impl GemmaConfig {
    /// Reads the configuration from GGUF metadata (`gemma3.*`).
    pub fn from_gguf(header: &GgufHeader) -> Result<Self, ConfigError> {
        let arch = str_of(header, "general.architecture")?;
        if arch != "gemma3" {
            return Err(ConfigError::Architecture(arch.to_owned()));
        }
        let int = |key: &str| u64_of(header, key).map(|v| v as usize);
        let layers = int("gemma3.block_count")?;
        let hidden = int("gemma3.embedding_length")?;
        let heads = int("gemma3.attention.head_count")?;
        let head_dim = int("gemma3.attention.key_length")?;
        let vocab = match header.tensor("token_embd.weight") {
            Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
            _ => {
                return Err(ConfigError::Invalid {
                    field: "token_embd.weight",
                    reason: "missing or not a matrix".into(),
                });
            }
        };
        let scale = match header
            .get("gemma3.rope.scaling.type")
            .and_then(|v| v.as_str())
        {
            Some("linear") => f64_of(header, "gemma3.rope.scaling.factor")? as f32,
            _ => 1.0,
        };
        let config = Self {
            vocab,
            hidden,
            layers,
            ffn: int("gemma3.feed_forward_length")?,
            heads,
            kv_heads: opt_u64(header, "gemma3.attention.head_count_kv")?
                .map_or(heads, |v| v as usize),
            head_dim,
            rms_eps: f64_of(header, "gemma3.attention.layer_norm_rms_epsilon")? as f32,
            rope_global_base: f64_of(header, "gemma3.rope.freq_base")? as f32,
            rope_global_scale: scale,
            rope_local_base: 10_000.0,
            window: int("gemma3.attention.sliding_window")?,
            layer_kinds: default_layer_kinds(layers),
            // 27B is the one size whose scalar is not head_dim (llama.cpp
            // detects it by its layer count the same way).
            query_pre_attn_scalar: if layers == 62 {
                (hidden / heads) as f32
            } else {
                head_dim as f32
            },
            context: int("gemma3.context_length")?,
        };
        config.check()?;
        Ok(config)
    }

    /// Checks the shape is one the forward pass can run.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.layers == 0
            || self.hidden == 0
            || self.heads == 0
            || self.head_dim == 0
            || self.ffn == 0
        {
            return invalid("shape", format!("zero-sized dimension in {self:?}"));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return invalid(
                "kv_heads",
                format!(
                    "{} query heads are not a multiple of {} kv heads",
                    self.heads, self.kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return invalid(
                "head_dim",
                format!("{} is odd; RoPE rotates pairs", self.head_dim),
            );
        }
        if self.layer_kinds.len() != self.layers {
            return invalid(
                "layer_types",
                format!(
                    "{} entries for {} layers",
                    self.layer_kinds.len(),
                    self.layers
                ),
            );
        }
        if self.window == 0 {
            return invalid("sliding_window", "must be at least 1".into());
        }
        // Bad numbers load silently and generate garbage: refuse them.
        let positive = [
            ("rms_norm_eps", f64::from(self.rms_eps)),
            ("rope_theta (global)", f64::from(self.rope_global_base)),
            ("rope_local_base_freq", f64::from(self.rope_local_base)),
            ("rope_scaling.factor", f64::from(self.rope_global_scale)),
            (
                "query_pre_attn_scalar",
                f64::from(self.query_pre_attn_scalar),
            ),
        ];
        for (field, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return invalid(field, format!("{value} is not a positive finite number"));
            }
        }
        Ok(())
    }

    /// Presets for the released sizes: `270m`, `1b`, `4b`, `12b`, `27b`.
    pub fn preset(name: &str) -> Option<Self> {
        let (layers, hidden, ffn, heads, kv_heads, head_dim, window, scale, vocab, context) =
            match name {
                "270m" => (18, 640, 2048, 4, 1, 256, 512, 1.0, 262_144, 32_768),
                "1b" => (26, 1152, 6912, 4, 1, 256, 512, 1.0, 262_144, 32_768),
                "4b" => (34, 2560, 10_240, 8, 4, 256, 1024, 8.0, 262_208, 131_072),
                "12b" => (48, 3840, 15_360, 16, 8, 256, 1024, 8.0, 262_208, 131_072),
                "27b" => (62, 5376, 21_504, 32, 16, 128, 1024, 8.0, 262_208, 131_072),
                _ => return None,
            };
        Some(Self {
            vocab,
            hidden,
            layers,
            ffn,
            heads,
            kv_heads,
            head_dim,
            rms_eps: 1e-6,
            rope_global_base: 1_000_000.0,
            rope_global_scale: scale,
            rope_local_base: 10_000.0,
            window,
            layer_kinds: default_layer_kinds(layers),
            query_pre_attn_scalar: if name == "27b" {
                168.0
            } else {
                head_dim as f32
            },
            context,
        })
    }

    /// KV-cache bytes per token per layer at `bytes_per_value` (K and V).
    pub fn kv_bytes_per_token_per_layer(&self, bytes_per_value: usize) -> usize {
        2 * self.kv_heads * self.head_dim * bytes_per_value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sixth_layer_is_global() {
        let kinds = default_layer_kinds(18);
        let global: Vec<usize> = (0..18).filter(|&i| kinds[i] == LayerKind::Global).collect();
        assert_eq!(global, vec![5, 11, 17]);
    }

    #[test]
    fn bad_numbers_are_refused_naming_the_key() {
        let mut c = GemmaConfig::preset("270m").unwrap();
        c.rms_eps = f32::NAN;
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("rms_norm_eps") && e.contains("NaN"), "{e}");
        let mut c = GemmaConfig::preset("270m").unwrap();
        c.rope_global_scale = 0.0;
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("rope_scaling.factor"), "{e}");
        assert!(GemmaConfig::preset("270m").unwrap().check().is_ok());
    }

    #[test]
    fn presets_match_the_reference_table() {
        let p = GemmaConfig::preset("27b").unwrap();
        assert_eq!(
            (p.heads * p.head_dim, p.query_pre_attn_scalar),
            (4096, 168.0)
        );
        assert_eq!(
            p.layer_kinds
                .iter()
                .filter(|k| **k == LayerKind::Global)
                .count(),
            10
        );
        assert_eq!(p.kv_bytes_per_token_per_layer(2), 8192);
        let p = GemmaConfig::preset("270m").unwrap();
        assert_eq!(
            (p.rope_global_scale, p.window, p.query_pre_attn_scalar),
            (1.0, 512, 256.0)
        );
        assert_eq!(p.kv_bytes_per_token_per_layer(2), 1024);
        for name in ["270m", "1b", "4b", "12b", "27b"] {
            GemmaConfig::preset(name).unwrap().check().unwrap();
        }
        assert!(GemmaConfig::preset("2b").is_none());
    }
}

/// Reads a number field of a `config.json` object.
fn json_f64(obj: &serde_json::Value, key: &str) -> Result<Option<f64>, ConfigError> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ConfigError::Json(format!("{key}: {v} is not a number"))),
    }
}

fn json_usize(obj: &serde_json::Value, key: &str) -> Result<Option<usize>, ConfigError> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| ConfigError::Json(format!("{key}: {v} is not a non-negative integer"))),
    }
}

fn required(obj: &serde_json::Value, key: &str) -> Result<usize, ConfigError> {
    json_usize(obj, key)?.ok_or_else(|| ConfigError::Json(format!("{key} is missing")))
}

/// Linear scaling factor of a `rope_scaling` / `rope_parameters` entry (1 when absent or not linear).
fn linear_factor(rope: Option<&serde_json::Value>) -> Result<f32, ConfigError> {
    let Some(rope) = rope.filter(|r| !r.is_null()) else {
        return Ok(1.0);
    };
    let kind = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(1.0),
        "linear" => Ok(json_f64(rope, "factor")?
            .ok_or_else(|| ConfigError::Json("rope scaling \"linear\" without a factor".into()))?
            as f32),
        other => Err(ConfigError::Json(format!(
            "rope type {other:?} is not supported (default, linear)"
        ))),
    }
}

impl GemmaConfig {
    /// Reads a Hugging Face Gemma 3 `config.json`: the text model's fields,
    /// under `text_config` for multimodal checkpoints, in either the old flat
    /// form (`sliding_window_pattern`, `rope_scaling`, `rope_local_base_freq`,
    /// `rope_theta`) or the newer one (`layer_types`, `rope_parameters` per
    /// layer type).
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let root: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_hf_value(&root)
    }

    /// [`from_hf_json`](Self::from_hf_json) on an already parsed document.
    pub fn from_hf_value(root: &serde_json::Value) -> Result<Self, ConfigError> {
        let c = root
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(root);
        let layers = required(c, "num_hidden_layers")?;
        let hidden = required(c, "hidden_size")?;
        let heads = required(c, "num_attention_heads")?;
        let head_dim = json_usize(c, "head_dim")?.unwrap_or(256);
        let layer_kinds = match c.get("layer_types").and_then(|v| v.as_array()) {
            Some(types) => types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(LayerKind::Local),
                    Some("full_attention") => Ok(LayerKind::Global),
                    _ => Err(ConfigError::Json(format!(
                        "layer_types[{i}]: {t} is not sliding_attention or full_attention"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                let pattern = json_usize(c, "sliding_window_pattern")?.unwrap_or(6).max(1);
                (0..layers)
                    .map(|i| {
                        if (i + 1) % pattern == 0 {
                            LayerKind::Global
                        } else {
                            LayerKind::Local
                        }
                    })
                    .collect()
            }
        };
        let (global_base, global_scale, local_base) =
            match c.get("rope_parameters").filter(|v| v.is_object()) {
                Some(params) => {
                    let full = params.get("full_attention");
                    let sliding = params.get("sliding_attention");
                    let base =
                        |p: Option<&serde_json::Value>, default: f64| -> Result<f64, ConfigError> {
                            Ok(p.map(|p| json_f64(p, "rope_theta"))
                                .transpose()?
                                .flatten()
                                .unwrap_or(default))
                        };
                    (
                        base(full, 1_000_000.0)?,
                        linear_factor(full)?,
                        base(sliding, 10_000.0)?,
                    )
                }
                None => (
                    json_f64(c, "rope_theta")?.unwrap_or(1_000_000.0),
                    linear_factor(c.get("rope_scaling"))?,
                    json_f64(c, "rope_local_base_freq")?.unwrap_or(10_000.0),
                ),
            };
        let config = Self {
            vocab: json_usize(c, "vocab_size")?.unwrap_or(262_208),
            hidden,
            layers,
            ffn: required(c, "intermediate_size")?,
            heads,
            kv_heads: json_usize(c, "num_key_value_heads")?.unwrap_or(heads),
            head_dim,
            rms_eps: json_f64(c, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_global_base: global_base as f32,
            rope_global_scale: global_scale,
            rope_local_base: local_base as f32,
            window: json_usize(c, "sliding_window")?.unwrap_or(4096),
            layer_kinds,
            query_pre_attn_scalar: json_f64(c, "query_pre_attn_scalar")?.unwrap_or(head_dim as f64)
                as f32,
            context: json_usize(c, "max_position_embeddings")?.unwrap_or(131_072),
        };
        config.check()?;
        Ok(config)
    }
}

#[cfg(test)]
mod hf_tests {
    use super::*;

    /// The flat form of a 27B-like multimodal config.
    const FLAT: &str = r#"{
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {
            "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
            "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
            "query_pre_attn_scalar": 168, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024, "sliding_window_pattern": 6, "vocab_size": 262208,
            "max_position_embeddings": 131072
        }
    }"#;

    /// The same model in the newer `layer_types` / `rope_parameters` form.
    fn new_form() -> String {
        let types: Vec<String> = (0..62)
            .map(|i| {
                if (i + 1) % 6 == 0 {
                    "\"full_attention\"".into()
                } else {
                    "\"sliding_attention\"".into()
                }
            })
            .collect();
        format!(
            r#"{{"hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
            "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
            "query_pre_attn_scalar": 168, "sliding_window": 1024, "vocab_size": 262208,
            "max_position_embeddings": 131072, "layer_types": [{}],
            "rope_parameters": {{
                "full_attention": {{"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
                "sliding_attention": {{"rope_type": "default", "rope_theta": 10000.0}}
            }}}}"#,
            types.join(",")
        )
    }

    #[test]
    fn both_config_forms_give_the_27b_preset() {
        let preset = GemmaConfig::preset("27b").unwrap();
        assert_eq!(GemmaConfig::from_hf_json(FLAT).unwrap(), preset);
        assert_eq!(GemmaConfig::from_hf_json(&new_form()).unwrap(), preset);
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = GemmaConfig::from_hf_json(r#"{"hidden_size": 640}"#).unwrap_err();
        assert_eq!(e.to_string(), "config.json: num_hidden_layers is missing");
        let e = GemmaConfig::from_hf_json(&FLAT.replace("\"linear\"", "\"yarn\"")).unwrap_err();
        assert!(
            e.to_string()
                .contains("rope type \"yarn\" is not supported"),
            "{e}"
        );
        let e = GemmaConfig::from_hf_json(&new_form().replacen(
            "\"sliding_attention\"",
            "\"chunked\"",
            1,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("layer_types[0]"), "{e}");
        assert!(GemmaConfig::from_hf_json("{not json").is_err());
    }
}
