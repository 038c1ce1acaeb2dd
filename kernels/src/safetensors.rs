//! Memory-mapped safetensors files (Hugging Face checkpoints).
//!
//! The header is parsed and checked by the `safetensors` crate (offsets
//! contiguous, sizes matching dtype × shape, buffer length exact); tensors
//! stay in the mapped file and are handed out as byte ranges with the
//! [`GgmlType`] the quantized kernels compute with. A safetensors matrix of
//! shape `[rows, cols]` is row-major, exactly the layout of a GGUF matrix with
//! dims `[cols, rows]`, so [`crate::quant::QMatrix`] runs on it unchanged.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::gguf::GgmlType;

/// Why a safetensors file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The header is malformed or disagrees with the data.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What the parser found wrong.
        reason: String,
    },
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// The tensor's name in the file.
    pub name: String,
    /// The dtype as the file spells it (`BF16`, `F32`, `I64` ...).
    pub dtype: String,
    /// The element type for computing, when it is one we compute with.
    pub ggml_type: Option<GgmlType>,
    /// Shape, outermost first (PyTorch order: a linear layer is `[out, in]`).
    pub shape: Vec<usize>,
    /// Offset of the first byte in the file.
    pub start: usize,
    /// Length in bytes.
    pub bytes: usize,
}

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: memmap2::Mmap,
    tensors: HashMap<String, TensorEntry>,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

fn ggml_type(dtype: Dtype) -> Option<GgmlType> {
    match dtype {
        Dtype::F32 => Some(GgmlType::F32),
        Dtype::F16 => Some(GgmlType::F16),
        Dtype::BF16 => Some(GgmlType::BF16),
        _ => None,
    }
}

/// Reads the tensor table of a safetensors image held in `bytes`.
pub fn parse(bytes: &[u8]) -> Result<HashMap<String, TensorEntry>, safetensors::SafeTensorError> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes)?;
    let data_start = 8 + header_len;
    Ok(metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let entry = TensorEntry {
                name: name.clone(),
                dtype: format!("{:?}", info.dtype),
                ggml_type: ggml_type(info.dtype),
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0,
                bytes: info.data_offsets.1 - info.data_offsets.0,
            };
            (name, entry)
        })
        .collect())
}

impl SafetensorsFile {
    /// Maps `path` and reads its tensor table.
    pub fn open(path: &Path) -> Result<Self, SafetensorsError> {
        let io = |source| SafetensorsError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; like every
        // memory-mapped reader we rely on nobody truncating the file meanwhile.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let tensors = parse(&map).map_err(|e| SafetensorsError::Header {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_owned(),
            map,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Every tensor, in no particular order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorEntry> {
        self.tensors.values()
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The bytes of `tensor` (an entry of this file).
    pub fn data(&self, tensor: &TensorEntry) -> &[u8] {
        &self.map[tensor.start..tensor.start + tensor.bytes]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors image written by hand: 8-byte header length, JSON, data.
    fn image(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_offsets_shapes_and_types() {
        let header = r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"I64","shape":[1],"data_offsets":[12,20]},"__metadata__":{"format":"pt"}}"#;
        let bytes = image(header, &[7u8; 20]);
        let tensors = parse(&bytes).unwrap();
        let a = &tensors["a"];
        assert_eq!(
            (a.ggml_type, a.shape.clone(), a.start, a.bytes),
            (Some(GgmlType::BF16), vec![2, 3], 8 + header.len(), 12)
        );
        assert_eq!(tensors["b"].ggml_type, None);
        assert_eq!(tensors["b"].dtype, "I64");
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let header = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
        // Truncated data, short header, garbage JSON, wrong size for shape.
        assert!(parse(&image(header, &[0; 20])).is_err());
        assert!(parse(&[1, 2, 3]).is_err());
        assert!(parse(&image("{not json", &[])).is_err());
        let wrong = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,24]}}"#;
        assert!(parse(&image(wrong, &[0; 24])).is_err());
        for cut in 0..image(header, &[0; 24]).len() {
            let _ = parse(&image(header, &[0; 24])[..cut]);
        }
    }

    #[test]
    fn open_names_the_file() {
        let dir = std::env::temp_dir().join(format!("dima-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.safetensors");
        std::fs::write(&path, b"\x05\x00\x00\x00\x00\x00\x00\x00{").unwrap();
        let e = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(
            e.contains("bad.safetensors") && e.contains("not a valid safetensors file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
