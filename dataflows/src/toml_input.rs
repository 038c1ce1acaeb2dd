//! Reading TOML files that users write (the cluster manifest, city
//! scenarios): every error carries its 1-based line and column and, for a
//! field that is unknown or of the wrong type, its dotted path.

use serde::de::DeserializeOwned;

/// Why TOML text could not become a `T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TomlError {
    /// `None` for a syntax error; otherwise the dotted path of the field
    /// ("(top level)" when there is none).
    pub field: Option<String>,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The parser's description.
    pub message: String,
}

/// Parses `text` into a `T`, rejecting what `T`'s serde rules reject.
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, TomlError> {
    let position = |span: Option<std::ops::Range<usize>>| {
        let offset = span.map_or(0, |s| s.start).min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    };
    let deserializer = toml::Deserializer::parse(text).map_err(|e| {
        let (line, column) = position(e.span());
        TomlError {
            field: None,
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = match e.path().to_string() {
            p if p == "." => "(top level)".to_owned(),
            p => p,
        };
        let (line, column) = position(e.inner().span());
        TomlError {
            field: Some(field),
            line,
            column,
            message: e.inner().message().trim().to_owned(),
        }
    })
}
