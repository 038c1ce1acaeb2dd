//! Typed access to GGUF metadata, with errors that name the key.

use kernels::gguf::{GgufHeader, MetaArray, MetaValue};

/// A metadata key that is missing or has the wrong type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    /// The key is absent.
    #[error("GGUF metadata {key:?} is missing")]
    Missing {
        /// The key.
        key: String,
    },
    /// The key holds another type.
    #[error("GGUF metadata {key:?} is {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What was wanted.
        expected: &'static str,
        /// What is there.
        found: &'static str,
    },
}

fn get<'h>(header: &'h GgufHeader, key: &str) -> Result<&'h MetaValue, MetadataError> {
    header.get(key).ok_or_else(|| MetadataError::Missing {
        key: key.to_owned(),
    })
}

fn wrong(key: &str, expected: &'static str, found: &MetaValue) -> MetadataError {
    MetadataError::WrongType {
        key: key.to_owned(),
        expected,
        found: found.type_name(),
    }
}

/// An unsigned integer value.
pub fn u64_of(header: &GgufHeader, key: &str) -> Result<u64, MetadataError> {
    let value = get(header, key)?;
    value
        .as_u64()
        .ok_or_else(|| wrong(key, "a non-negative integer", value))
}

/// An optional unsigned integer value.
pub fn opt_u64(header: &GgufHeader, key: &str) -> Result<Option<u64>, MetadataError> {
    header.get(key).map(|_| u64_of(header, key)).transpose()
}

/// A float value.
pub fn f64_of(header: &GgufHeader, key: &str) -> Result<f64, MetadataError> {
    let value = get(header, key)?;
    value.as_f64().ok_or_else(|| wrong(key, "a number", value))
}

/// A string value.
pub fn str_of<'h>(header: &'h GgufHeader, key: &str) -> Result<&'h str, MetadataError> {
    let value = get(header, key)?;
    value.as_str().ok_or_else(|| wrong(key, "a string", value))
}

/// An optional bool value.
pub fn opt_bool(header: &GgufHeader, key: &str) -> Result<Option<bool>, MetadataError> {
    header
        .get(key)
        .map(|value| value.as_bool().ok_or_else(|| wrong(key, "a bool", value)))
        .transpose()
}

/// An array value.
pub fn array_of<'h>(header: &'h GgufHeader, key: &str) -> Result<&'h MetaArray, MetadataError> {
    let value = get(header, key)?;
    value
        .as_array()
        .ok_or_else(|| wrong(key, "an array", value))
}
