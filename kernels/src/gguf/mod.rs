//! GGUF: the single-file model format of llama.cpp (versions 2 and 3).
//!
//! [`GgufFile::open`] memory-maps a file and parses its header: metadata
//! (every value type, arrays included, nested arrays too), tensor infos and
//! the aligned start of tensor data. Tensor bytes are never copied: each
//! tensor is a slice of the map ([`GgufFile::tensor_data`]). [`parse`] does the
//! same over any byte slice, which is what the fuzz target drives.
//!
//! Every failure is a [`GgufError`] naming the byte offset and what was
//! expected there; a count or length that could not fit in the rest of the
//! file is rejected before anything is allocated for it, so a corrupt header
//! cannot make the reader allocate gigabytes or panic.

mod types;
mod writer;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use types::GgmlType;
pub use writer::GgufBuilder;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// More dimensions than this is not a tensor any GGML program writes.
const MAX_DIMS: u32 = 4;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file ended before a value was complete.
    #[error(
        "truncated at byte {offset}: expected {expected} ({needed} bytes), but the file has {available} left"
    )]
    Truncated {
        /// Where the value starts.
        offset: u64,
        /// What was being read.
        expected: String,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: bytes 0..4 are {found:?}, expected \"GGUF\"")]
    BadMagic {
        /// What was there.
        found: [u8; 4],
    },
    /// A version this reader does not speak.
    #[error("GGUF version {version} at byte 4 is not supported (versions 2 and 3 are){hint}")]
    UnsupportedVersion {
        /// The version field.
        version: u32,
        /// Extra explanation (e.g. big-endian files).
        hint: &'static str,
    },
    /// A string is not UTF-8.
    #[error("byte {offset}: {what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Where the string's bytes start.
        offset: u64,
        /// Which string.
        what: String,
    },
    /// A metadata value has an unknown type tag.
    #[error("byte {offset}: metadata {key:?} has unknown value type {tag}")]
    UnknownValueType {
        /// Where the tag is.
        offset: u64,
        /// The key.
        key: String,
        /// The tag.
        tag: u32,
    },
    /// A tensor has a type id this reader does not know.
    #[error("byte {offset}: tensor {name:?} has unknown GGML type id {id}")]
    UnknownTensorType {
        /// Where the type id is.
        offset: u64,
        /// The tensor.
        name: String,
        /// The id.
        id: u32,
    },
    /// A tensor's shape is impossible.
    #[error("byte {offset}: tensor {name:?}: {reason}")]
    BadShape {
        /// Where the tensor info starts.
        offset: u64,
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's data lies outside the file or is misaligned.
    #[error("tensor {name:?}: data at bytes {start}..{end} {reason}")]
    BadTensorData {
        /// The tensor.
        name: String,
        /// Absolute start offset.
        start: u64,
        /// Absolute end offset.
        end: u64,
        /// What is wrong.
        reason: String,
    },
    /// The same key or tensor name appears twice.
    #[error("byte {offset}: duplicate {what} {name:?}")]
    Duplicate {
        /// Where the second one starts.
        offset: u64,
        /// `metadata key` or `tensor`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// `general.alignment` is not a positive power of two.
    #[error("general.alignment = {value} is not a power of two")]
    BadAlignment {
        /// The value.
        value: u64,
    },
}

impl GgufError {
    /// A stable name for the kind of error.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Truncated { .. } => "truncated",
            Self::BadMagic { .. } => "bad_magic",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::InvalidUtf8 { .. } => "invalid_utf8",
            Self::UnknownValueType { .. } => "unknown_value_type",
            Self::UnknownTensorType { .. } => "unknown_tensor_type",
            Self::BadShape { .. } => "bad_shape",
            Self::BadTensorData { .. } => "bad_tensor_data",
            Self::Duplicate { .. } => "duplicate",
            Self::BadAlignment { .. } => "bad_alignment",
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    String(String),
    /// `array`.
    Array(MetaArray),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

/// A metadata array, stored by element type.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    /// `uint8[]`.
    U8(Vec<u8>),
    /// `int8[]`.
    I8(Vec<i8>),
    /// `uint16[]`.
    U16(Vec<u16>),
    /// `int16[]`.
    I16(Vec<i16>),
    /// `uint32[]`.
    U32(Vec<u32>),
    /// `int32[]`.
    I32(Vec<i32>),
    /// `float32[]`.
    F32(Vec<f32>),
    /// `bool[]`.
    Bool(Vec<bool>),
    /// `string[]`.
    String(Vec<String>),
    /// `array[]` (arrays of arrays).
    Array(Vec<MetaArray>),
    /// `uint64[]`.
    U64(Vec<u64>),
    /// `int64[]`.
    I64(Vec<i64>),
    /// `float64[]`.
    F64(Vec<f64>),
}

impl MetaArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "uint8",
            Self::I8(_) => "int8",
            Self::U16(_) => "uint16",
            Self::I16(_) => "int16",
            Self::U32(_) => "uint32",
            Self::I32(_) => "int32",
            Self::F32(_) => "float32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "uint64",
            Self::I64(_) => "int64",
            Self::F64(_) => "float64",
        }
    }
}

/// One tensor's description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost first (GGML's `ne`): a weight of `rows` rows of
    /// `cols` elements has `dims == [cols, rows]`.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Absolute byte offset of its data in the file.
    pub start: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl TensorInfo {
    /// Total elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: metadata and tensor infos.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of tensor data.
    pub alignment: u64,
    /// Absolute offset where tensor data starts.
    pub data_start: u64,
    index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl GgufHeader {
    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    header: GgufHeader,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("tensors", &self.header.tensors.len())
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; like every
        // memory-mapped reader we rely on nobody truncating the file meanwhile.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let header = parse(&map)?;
        Ok(Self {
            path: path.to_owned(),
            map,
            header,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The bytes of `tensor` (validated at parse time to lie inside the file).
    pub fn tensor_data(&self, tensor: &TensorInfo) -> &[u8] {
        &self.map[tensor.start as usize..(tensor.start + tensor.bytes) as usize]
    }
}

/// A cursor over the header bytes that reports where it failed.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(
        &mut self,
        needed: usize,
        expected: impl FnOnce() -> String,
    ) -> Result<&'a [u8], GgufError> {
        let available = self.bytes.len() - self.pos;
        if needed > available {
            return Err(GgufError::Truncated {
                offset: self.pos as u64,
                expected: expected(),
                needed: needed as u64,
                available: available as u64,
            });
        }
        let slice = &self.bytes[self.pos..self.pos + needed];
        self.pos += needed;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let slice = self.take(N, || what.to_owned())?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_item` bytes each, checked against
    /// what is left so nothing is allocated for a count the file cannot hold.
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize, GgufError> {
        let at = self.pos as u64;
        let count = self.u64(what)?;
        let available = (self.bytes.len() - self.pos) as u64;
        match count.checked_mul(min_item as u64) {
            Some(needed) if needed <= available => Ok(count as usize),
            _ => Err(GgufError::Truncated {
                offset: at,
                expected: format!("{what} = {count}, each at least {min_item} bytes"),
                needed: count.saturating_mul(min_item as u64),
                available,
            }),
        }
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.count(&format!("length of {what}"), 1)?;
        let at = self.pos as u64;
        let bytes = self.take(len, || what.to_owned())?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            offset: at,
            what: what.to_owned(),
        })
    }
}

fn value(r: &mut Reader<'_>, tag: u32, key: &str, tag_at: u64) -> Result<MetaValue, GgufError> {
    let what = || format!("value of {key:?}");
    Ok(match tag {
        0 => MetaValue::U8(r.array::<1>(&what())?[0]),
        1 => MetaValue::I8(r.array::<1>(&what())?[0] as i8),
        2 => MetaValue::U16(u16::from_le_bytes(r.array(&what())?)),
        3 => MetaValue::I16(i16::from_le_bytes(r.array(&what())?)),
        4 => MetaValue::U32(r.u32(&what())?),
        5 => MetaValue::I32(i32::from_le_bytes(r.array(&what())?)),
        6 => MetaValue::F32(f32::from_le_bytes(r.array(&what())?)),
        7 => MetaValue::Bool(r.array::<1>(&what())?[0] != 0),
        8 => MetaValue::String(r.string(&what())?),
        9 => MetaValue::Array(array(r, key, 0)?),
        10 => MetaValue::U64(r.u64(&what())?),
        11 => MetaValue::I64(i64::from_le_bytes(r.array(&what())?)),
        12 => MetaValue::F64(f64::from_le_bytes(r.array(&what())?)),
        _ => {
            return Err(GgufError::UnknownValueType {
                offset: tag_at,
                key: key.to_owned(),
                tag,
            });
        }
    })
}

/// Arrays may nest; GGML writers never go deeper than a few levels.
const MAX_NESTING: usize = 8;

fn array(r: &mut Reader<'_>, key: &str, depth: usize) -> Result<MetaArray, GgufError> {
    let tag_at = r.pos as u64;
    let tag = r.u32(&format!("element type of array {key:?}"))?;
    let what = format!("elements of array {key:?}");
    macro_rules! numbers {
        ($variant:ident, $ty:ty) => {{
            const SIZE: usize = std::mem::size_of::<$ty>();
            let n = r.count(&format!("length of array {key:?}"), SIZE)?;
            let bytes = r.take(n * SIZE, || what.clone())?;
            MetaArray::$variant(
                bytes
                    .chunks_exact(SIZE)
                    .map(|c| <$ty>::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect(),
            )
        }};
    }
    Ok(match tag {
        0 => numbers!(U8, u8),
        1 => numbers!(I8, i8),
        2 => numbers!(U16, u16),
        3 => numbers!(I16, i16),
        4 => numbers!(U32, u32),
        5 => numbers!(I32, i32),
        6 => numbers!(F32, f32),
        7 => {
            let n = r.count(&format!("length of array {key:?}"), 1)?;
            MetaArray::Bool(
                r.take(n, || what.clone())?
                    .iter()
                    .map(|b| *b != 0)
                    .collect(),
            )
        }
        8 => {
            let n = r.count(&format!("length of array {key:?}"), 8)?;
            let mut strings = Vec::with_capacity(n);
            for i in 0..n {
                strings.push(r.string(&format!("{key}[{i}]"))?);
            }
            MetaArray::String(strings)
        }
        9 if depth < MAX_NESTING => {
            let n = r.count(&format!("length of array {key:?}"), 12)?;
            let mut arrays = Vec::with_capacity(n);
            for _ in 0..n {
                arrays.push(array(r, key, depth + 1)?);
            }
            MetaArray::Array(arrays)
        }
        10 => numbers!(U64, u64),
        11 => numbers!(I64, i64),
        12 => numbers!(F64, f64),
        _ => {
            return Err(GgufError::UnknownValueType {
                offset: tag_at,
                key: key.to_owned(),
                tag,
            });
        }
    })
}

/// Parses a GGUF header from `bytes` (the whole file) and checks that every
/// tensor's data lies, aligned, inside it.
pub fn parse(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
    let mut r = Reader { bytes, pos: 0 };
    let magic: [u8; 4] = r.array("the magic \"GGUF\"")?;
    if &magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = r.u32("the version")?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            "; this looks like a big-endian GGUF, which is not supported"
        } else if version == 1 {
            "; version 1 files predate 64-bit counts: convert them with llama.cpp"
        } else {
            ""
        };
        return Err(GgufError::UnsupportedVersion { version, hint });
    }
    // A tensor info is at least 8 (name length) + 4 + 4 + 8 bytes; a metadata
    // pair at least 8 + 4 + 1.
    let tensor_count = r.count("the tensor count", 24)?;
    let kv_count = r.count("the metadata count", 13)?;

    let mut metadata = Vec::with_capacity(kv_count);
    let mut index = HashMap::with_capacity(kv_count);
    for _ in 0..kv_count {
        let at = r.pos as u64;
        let key = r.string("a metadata key")?;
        let tag_at = r.pos as u64;
        let tag = r.u32(&format!("the value type of {key:?}"))?;
        let value = value(&mut r, tag, &key, tag_at)?;
        if index.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::Duplicate {
                offset: at,
                what: "metadata key",
                name: key,
            });
        }
        metadata.push((key, value));
    }
    let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(GgufError::BadAlignment {
                    value: v.as_u64().unwrap_or(0),
                });
            }
        },
    };

    let mut tensors = Vec::with_capacity(tensor_count);
    let mut tensor_index = HashMap::with_capacity(tensor_count);
    let mut relative = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let at = r.pos as u64;
        let name = r.string("a tensor name")?;
        let n_dims = r.u32(&format!("the dimension count of {name:?}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::BadShape {
                offset: at,
                name,
                reason: format!("{n_dims} dimensions (1 to {MAX_DIMS} expected)"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(&format!("dimension {d} of {name:?}"))?);
        }
        let type_at = r.pos as u64;
        let id = r.u32(&format!("the type of {name:?}"))?;
        let ggml_type = GgmlType::from_id(id).ok_or_else(|| GgufError::UnknownTensorType {
            offset: type_at,
            name: name.clone(),
            id,
        })?;
        let offset = r.u64(&format!("the data offset of {name:?}"))?;
        let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let bytes = match elements {
            None => None,
            Some(_) if !dims[0].is_multiple_of(ggml_type.block_elements() as u64) => None,
            Some(n) => ggml_type.bytes_for(n),
        }
        .ok_or_else(|| GgufError::BadShape {
            offset: at,
            name: name.clone(),
            reason: format!(
                "dims {dims:?} of type {ggml_type} do not fill whole blocks of {} elements",
                ggml_type.block_elements()
            ),
        })?;
        if tensor_index.insert(name.clone(), tensors.len()).is_some() {
            return Err(GgufError::Duplicate {
                offset: at,
                what: "tensor",
                name,
            });
        }
        relative.push(offset);
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            start: 0,
            bytes,
        });
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    for (tensor, offset) in tensors.iter_mut().zip(relative) {
        let start = data_start.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(tensor.bytes));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(GgufError::BadTensorData {
                name: tensor.name.clone(),
                start: u64::MAX,
                end: u64::MAX,
                reason: "overflows a 64-bit offset".into(),
            });
        };
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::BadTensorData {
                name: tensor.name.clone(),
                start,
                end,
                reason: format!("is not aligned to {alignment} bytes"),
            });
        }
        if end > file_len {
            return Err(GgufError::BadTensorData {
                name: tensor.name.clone(),
                start,
                end,
                reason: format!("lies past the end of the file ({file_len} bytes)"),
            });
        }
        tensor.start = start;
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
        index,
        tensor_index,
    })
}

#[cfg(test)]
mod tests;
