//! Hugging Face Gemma 3 checkpoint directories: `config.json`, the weights in
//! `model.safetensors` or in shards listed by `model.safetensors.index.json`,
//! and the SentencePiece `tokenizer.model`.
//!
//! Text-only checkpoints (`Gemma3ForCausalLM`) name their tensors
//! `model.layers.N…`; multimodal ones (`Gemma3ForConditionalGeneration`) put
//! the text model under `language_model.model.` (older transformers) or
//! `model.language_model.` (newer) next to the vision tower. The prefix is
//! found from the embedding's name, so every layout works; vision tensors
//! are never read.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use kernels::safetensors::{SafetensorsError, SafetensorsFile, TensorEntry};

use super::config::{ConfigError, GemmaConfig};
use crate::tokenizer::{Tokenizer, VocabError};

/// Why a checkpoint directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` is unusable.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ConfigError,
    },
    /// A weights file is unusable.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// `model.safetensors.index.json` is unusable or disagrees with the shards.
    #[error("{path}: {reason}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The directory holds no weights.
    #[error(
        "{dir}: no model.safetensors or model.safetensors.index.json (a Hugging Face checkpoint directory needs one)"
    )]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// No tensor looks like the text embedding.
    #[error("{dir}: no tensor named …embed_tokens.weight: not a Gemma 3 text checkpoint")]
    NoEmbedding {
        /// The directory.
        dir: PathBuf,
    },
    /// The tokenizer file is unusable.
    #[error("{path}: {source}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// Why.
        source: VocabError,
    },
}

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: GemmaConfig,
    bos: u32,
    files: Vec<SafetensorsFile>,
    /// Tensor name (full, with prefix) → index into `files`.
    index: HashMap<String, usize>,
    prefix: String,
}

fn read(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    })
}

fn config_error(path: &Path, reason: String) -> CheckpointError {
    CheckpointError::Config {
        path: path.to_owned(),
        source: ConfigError::Json(reason),
    }
}

/// The shard file names of a `model.safetensors.index.json`, with the names
/// it promises each one holds.
fn shard_map(path: &Path) -> Result<Vec<(String, Vec<String>)>, CheckpointError> {
    let bad = |reason: String| CheckpointError::Index {
        path: path.to_owned(),
        reason,
    };
    let text = read(path)?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("weight_map is missing or not an object".into()))?;
    let mut shards: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{name:?}]: {file} is not a file name")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!(
                "weight_map[{name:?}]: {file:?} is not a file in the checkpoint directory"
            )));
        }
        shards
            .entry(file.to_owned())
            .or_default()
            .push(name.clone());
    }
    if shards.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok(shards.into_iter().collect())
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json`, maps the weight files and finds the
    /// text model's tensor prefix.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let config_path = dir.join("config.json");
        let config_text = read(&config_path)?;
        let config_text = String::from_utf8(config_text)
            .map_err(|_| config_error(&config_path, "not UTF-8".into()))?;
        let json: serde_json::Value = serde_json::from_str(&config_text)
            .map_err(|e| config_error(&config_path, e.to_string()))?;
        let text = json
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(&json);
        for obj in [&json, text] {
            if let Some(kind) = obj.get("model_type").and_then(|v| v.as_str())
                && !matches!(kind, "gemma3" | "gemma3_text")
            {
                return Err(config_error(
                    &config_path,
                    format!("model_type is {kind:?}; only gemma3 and gemma3_text are supported"),
                ));
            }
        }
        let bos = text
            .get("bos_token_id")
            .or_else(|| json.get("bos_token_id"))
            .and_then(|v| v.as_u64())
            .unwrap_or(2) as u32;

        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.is_file() {
            for (file, names) in shard_map(&index_path)? {
                let shard = SafetensorsFile::open(&dir.join(&file))?;
                if let Some(name) = names.iter().find(|n| shard.tensor(n).is_none()) {
                    return Err(CheckpointError::Index {
                        path: index_path,
                        reason: format!(
                            "weight_map puts {name:?} in {file}, which has no such tensor"
                        ),
                    });
                }
                for t in shard.tensors() {
                    index.insert(t.name.clone(), files.len());
                }
                files.push(shard);
            }
        } else if single.is_file() {
            let file = SafetensorsFile::open(&single)?;
            for t in file.tensors() {
                index.insert(t.name.clone(), 0);
            }
            files.push(file);
        } else {
            return Err(CheckpointError::NoWeights {
                dir: dir.to_owned(),
            });
        }

        let candidates: BTreeSet<&str> = index
            .keys()
            .filter_map(|name| name.strip_suffix("embed_tokens.weight"))
            .collect();
        let prefix = candidates
            .iter()
            .find(|p| p.contains("language_model"))
            .or_else(|| candidates.iter().min_by_key(|p| p.len()))
            .ok_or_else(|| CheckpointError::NoEmbedding {
                dir: dir.to_owned(),
            })?
            .to_string();

        let mut config =
            GemmaConfig::from_hf_value(&json).map_err(|source| CheckpointError::Config {
                path: config_path.clone(),
                source,
            })?;
        if text.get("vocab_size").is_none_or(|v| v.is_null()) {
            // Older configs leave it out; the embedding says.
            let name = format!("{prefix}embed_tokens.weight");
            if let Some(rows) = index
                .get(&name)
                .and_then(|&f| files[f].tensor(&name))
                .and_then(|t| t.shape.first())
            {
                config.vocab = *rows;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            config,
            bos,
            files,
            index,
            prefix,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The text model's configuration.
    pub fn config(&self) -> &GemmaConfig {
        &self.config
    }

    /// The prefix of the text model's tensor names (`model.`,
    /// `language_model.model.` …).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The mapped weight files.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Gives up the mapped weight files (for the model to own).
    pub fn into_files(self) -> Vec<SafetensorsFile> {
        self.files
    }

    /// The tensor `name` (without the prefix) and the index of its file.
    pub fn tensor(&self, name: &str) -> Option<(usize, &TensorEntry)> {
        let full = format!("{}{name}", self.prefix);
        let &file = self.index.get(&full)?;
        self.files[file].tensor(&full).map(|t| (file, t))
    }

    /// The vocabulary from `tokenizer.model`.
    pub fn tokenizer(&self) -> Result<Tokenizer, CheckpointError> {
        let path = self.dir.join("tokenizer.model");
        let bytes = read(&path)?;
        let tokenizer = Tokenizer::from_sentencepiece(&bytes, self.bos)
            .map_err(|source| CheckpointError::Tokenizer { path, source })?;
        // Hugging Face keeps the chat template in tokenizer_config.json.
        let template = std::fs::read(self.dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("chat_template")?.as_str().map(str::to_owned));
        Ok(tokenizer.with_chat_template(template))
    }
}

/// The Hugging Face name (without prefix) of a GGUF-named Gemma 3 tensor.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("embed_tokens.weight".into()),
        "output_norm.weight" => return Some("norm.weight".into()),
        _ => {}
    }
    let (layer, part) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let hf = match part.strip_suffix(".weight")? {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "post_ffw_norm" => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("layers.{layer}.{hf}.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.12.ffn_norm.weight").as_deref(),
            Some("layers.12.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.0.nonsense.weight"), None);
    }

    fn testdata(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(path)
    }

    /// Every layout of the tiny random checkpoint (bf16 single file, f32
    /// shards, multimodal prefix) gives the float64 reference's logits at
    /// every position, across the sliding window and the global layer.
    #[test]
    fn tiny_checkpoints_match_the_float64_reference() {
        use crate::gemma::Gemma;
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(testdata("tiny_gemma3_reference.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = reference["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let layouts = reference["layouts"].as_object().unwrap();
        assert_eq!(layouts.len(), 3);
        for (name, layout) in layouts {
            let gemma = Gemma::load(&testdata(&format!("tiny-gemma3/{name}"))).unwrap();
            assert_eq!(gemma.config().vocab, 287, "{name}");
            assert_eq!(gemma.tokenizer().len(), 279, "{name}");
            let mut cache = gemma.new_cache();
            let mut logits = vec![0f32; gemma.config().vocab];
            let mut worst = 0f64;
            for (t, &id) in ids.iter().enumerate() {
                gemma.forward(id, &mut cache, Some(&mut logits)).unwrap();
                let expected = layout["logits"][t].as_array().unwrap();
                assert_eq!(expected.len(), logits.len());
                for (got, want) in logits.iter().zip(expected) {
                    worst = worst.max((f64::from(*got) - want.as_f64().unwrap()).abs());
                }
            }
            // f32 against f64 over 7 layers: a few 1e-5; the two embedding
            // scales (bf16 vs f32) move logits by up to 0.019.
            assert!(worst < 2e-3, "{name}: max |logit - reference| = {worst}");
            // The batched prompt path gives the same last-position logits.
            let mut cache = gemma.new_cache();
            let mut batched = vec![0f32; gemma.config().vocab];
            gemma.prefill(&ids, &mut cache, Some(&mut batched)).unwrap();
            let max = batched
                .iter()
                .zip(&logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-4, "{name}: prefill vs forward {max}");
        }
    }

    #[test]
    fn missing_pieces_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("only gemma3 and gemma3_text"), "{e}");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "gemma3_text"}"#,
        )
        .unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no model.safetensors"), "{e}");
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}"#,
        )
        .unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a file in the checkpoint directory"), "{e}");
    }
}
