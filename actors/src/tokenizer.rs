//! SentencePiece-style BPE tokenizer built from a GGUF vocabulary, behaving
//! as llama.cpp's SPM tokenizer does.
//!
//! Encoding has two stages, as in llama.cpp:
//!
//! 1. **Special-token partition.** The text is split at occurrences of
//!    special tokens, longest token text first: user-defined tokens always
//!    (Gemma's `\n`, `\n\n`, runs of spaces and tabs ...), control and unknown
//!    tokens (`<start_of_turn>`, `<bos>` ...) only when `parse_special` is set.
//! 2. **Bigram merging** of each remaining fragment: spaces become `▁`
//!    (U+2581), the fragment is split into UTF-8 characters, and the adjacent
//!    pair whose concatenation is a vocabulary entry with the highest score is
//!    merged (ties: leftmost first) until no pair is in the vocabulary. A
//!    character that is not a token falls back to byte tokens `<0xXX>`.
//!
//! With `add_bos` and a vocabulary that asks for it, `<bos>` comes first.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use kernels::gguf::{GgufHeader, MetaArray};

use crate::metadata::{MetadataError, array_of, opt_bool, u64_of};

/// What kind of entry a token is (GGUF `tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Ordinary text piece.
    Normal,
    /// `<unk>`.
    Unknown,
    /// Control token: `<bos>`, `<eos>`, `<start_of_turn>` ...
    Control,
    /// User-defined token, matched literally in the text.
    UserDefined,
    /// Reserved, never produced.
    Unused,
    /// One raw byte, `<0xXX>`.
    Byte,
}

impl TokenKind {
    fn from_gguf(kind: i32) -> Self {
        match kind {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Why a vocabulary could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VocabError {
    /// A tokenizer key is missing or mistyped.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The GGUF tokenizer is not SentencePiece.
    #[error("tokenizer.ggml.model is {0:?}; only \"llama\" (SentencePiece BPE) is supported")]
    UnsupportedModel(String),
    /// The token, score and type lists differ in length.
    #[error("tokenizer.ggml.tokens has {tokens} entries but {field} has {other}")]
    Mismatch {
        /// Number of tokens.
        tokens: usize,
        /// The other list.
        field: &'static str,
        /// Its length.
        other: usize,
    },
    /// A byte token `<0xXX>` is missing.
    #[error("the vocabulary has no byte token <0x{0:02X}> (needed for byte fallback)")]
    MissingByte(u8),
    /// A special id is out of range.
    #[error("{field} = {id} is not a token id (vocabulary of {size})")]
    BadId {
        /// The metadata key.
        field: &'static str,
        /// The id.
        id: u32,
        /// Vocabulary size.
        size: usize,
    },
    /// A SentencePiece `tokenizer.model` file is malformed.
    #[error("tokenizer.model: byte {offset}: {reason}")]
    SentencePiece {
        /// Byte offset in the file where reading failed.
        offset: usize,
        /// What was expected there.
        reason: String,
    },
}

/// A SentencePiece vocabulary.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    pieces: Vec<String>,
    scores: Vec<f32>,
    kinds: Vec<TokenKind>,
    by_text: HashMap<String, u32>,
    bytes: [u32; 256],
    /// Special tokens for the partition stage, longest text first.
    specials: Vec<u32>,
    bos: u32,
    add_bos: bool,
    /// The model's chat template (Jinja), when its file has one.
    chat_template: Option<String>,
}

/// A piece of text awaiting tokenization, or a token already found.
#[derive(Clone, Copy, Debug)]
enum Fragment {
    Raw(usize, usize),
    Token(u32),
}

#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

#[derive(Clone, Copy, Debug)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Highest score first; among equal scores, the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl Tokenizer {
    /// The vocabulary stored in a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(header: &GgufHeader) -> Result<Self, VocabError> {
        let model = crate::metadata::str_of(header, "tokenizer.ggml.model")?;
        if model != "llama" {
            return Err(VocabError::UnsupportedModel(model.to_owned()));
        }
        let wrong = |key: &str, expected: &'static str| MetadataError::WrongType {
            key: key.to_owned(),
            expected,
            found: "an array of another element type",
        };
        let pieces = match array_of(header, "tokenizer.ggml.tokens")? {
            MetaArray::String(v) => v.clone(),
            _ => return Err(wrong("tokenizer.ggml.tokens", "an array of strings").into()),
        };
        let scores = match array_of(header, "tokenizer.ggml.scores")? {
            MetaArray::F32(v) => v.clone(),
            _ => return Err(wrong("tokenizer.ggml.scores", "an array of float32").into()),
        };
        let kinds = match array_of(header, "tokenizer.ggml.token_type")? {
            MetaArray::I32(v) => v.clone(),
            MetaArray::U32(v) => v.iter().map(|&k| k as i32).collect(),
            _ => return Err(wrong("tokenizer.ggml.token_type", "an array of int32").into()),
        };
        let bos = u64_of(header, "tokenizer.ggml.bos_token_id")? as u32;
        let add_bos = opt_bool(header, "tokenizer.ggml.add_bos_token")?.unwrap_or(true);
        let template = header
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        Ok(Self::new(pieces, scores, kinds, bos, add_bos)?.with_chat_template(template))
    }

    /// The vocabulary of a SentencePiece `tokenizer.model` file (the
    /// protobuf `ModelProto` that Hugging Face Gemma checkpoints ship): its
    /// pieces with their scores and types, in id order. Piece types use the
    /// same numbers as GGUF's token types (1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte). `bos` comes from `config.json`.
    pub fn from_sentencepiece(model: &[u8], bos: u32) -> Result<Self, VocabError> {
        let mut pieces = Vec::new();
        let mut scores = Vec::new();
        let mut kinds = Vec::new();
        let mut reader = ProtoReader {
            bytes: model,
            at: 0,
            base: 0,
        };
        while let Some((field, value)) = reader.field()? {
            // ModelProto field 1: repeated SentencePiece; the trainer and
            // normalizer specs (fields 2, 3 ...) are not needed to encode.
            let (1, ProtoValue::Bytes(start, len)) = (field, value) else {
                continue;
            };
            let mut piece = ProtoReader {
                bytes: &model[start..start + len],
                at: 0,
                base: start,
            };
            let (mut text, mut score, mut kind) = (None, 0f32, 1i32);
            while let Some((field, value)) = piece.field()? {
                match (field, value) {
                    (1, ProtoValue::Bytes(s, l)) => {
                        let raw = &model[s..s + l];
                        text = Some(String::from_utf8(raw.to_vec()).map_err(|_| {
                            VocabError::SentencePiece {
                                offset: s,
                                reason: "piece text is not UTF-8".into(),
                            }
                        })?);
                    }
                    (2, ProtoValue::Fixed32(bits)) => score = f32::from_bits(bits),
                    (3, ProtoValue::Varint(v)) => kind = v as i32,
                    _ => {}
                }
            }
            pieces.push(text.ok_or(VocabError::SentencePiece {
                offset: start,
                reason: format!("piece {} has no text (field 1)", pieces.len()),
            })?);
            scores.push(score);
            kinds.push(kind);
        }
        if pieces.is_empty() {
            return Err(VocabError::SentencePiece {
                offset: 0,
                reason: "no pieces (field 1 of ModelProto)".into(),
            });
        }
        Self::new(pieces, scores, kinds, bos, true)
    }

    /// Builds a vocabulary from GGUF's token texts, scores and types.
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        kinds: Vec<i32>,
        bos: u32,
        add_bos: bool,
    ) -> Result<Self, VocabError> {
        let n = pieces.len();
        if scores.len() != n {
            return Err(VocabError::Mismatch {
                tokens: n,
                field: "tokenizer.ggml.scores",
                other: scores.len(),
            });
        }
        if kinds.len() != n {
            return Err(VocabError::Mismatch {
                tokens: n,
                field: "tokenizer.ggml.token_type",
                other: kinds.len(),
            });
        }
        if bos as usize >= n {
            return Err(VocabError::BadId {
                field: "tokenizer.ggml.bos_token_id",
                id: bos,
                size: n,
            });
        }
        let kinds: Vec<TokenKind> = kinds.into_iter().map(TokenKind::from_gguf).collect();
        let mut by_text = HashMap::with_capacity(n);
        for (id, piece) in pieces.iter().enumerate() {
            // Later entries win, as in llama.cpp's token_to_id map.
            by_text.insert(piece.clone(), id as u32);
        }
        let mut bytes = [0u32; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = *by_text
                .get(&format!("<0x{b:02X}>"))
                .ok_or(VocabError::MissingByte(b as u8))?;
        }
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                matches!(
                    kinds[id as usize],
                    TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                ) && !pieces[id as usize].is_empty()
            })
            .collect();
        specials.sort_by_key(|&id| std::cmp::Reverse(pieces[id as usize].len()));
        Ok(Self {
            pieces,
            scores,
            kinds,
            by_text,
            bytes,
            specials,
            bos,
            add_bos,
            chat_template: None,
        })
    }

    /// A stand-in vocabulary of `size` tokens for models with random
    /// weights: `<pad>`, `<eos>`, `<bos>` (id 2), `<unk>`, the 256 byte
    /// tokens, then `<unused_N>` placeholders. Text encodes byte by byte.
    pub fn synthetic(size: usize) -> Result<Self, VocabError> {
        Self::synthetic_with(&[], size)
    }

    /// [`synthetic`](Self::synthetic) with `own` pieces (text, GGUF token
    /// type: 1 normal, 3 control, …) right after the byte tokens, from id
    /// 260, then placeholders up to `size`.
    pub fn synthetic_with(own: &[(&str, i32)], size: usize) -> Result<Self, VocabError> {
        let mut pieces: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>"]
            .map(String::from)
            .to_vec();
        let mut kinds = vec![3, 3, 3, 2];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            kinds.push(6);
        }
        for (piece, kind) in own {
            pieces.push((*piece).to_owned());
            kinds.push(*kind);
        }
        while pieces.len() < size {
            pieces.push(format!("<unused_{}>", pieces.len()));
            kinds.push(5);
        }
        let scores = vec![0f32; pieces.len()];
        Self::new(pieces, scores, kinds, 2, true)
    }

    /// The same vocabulary with the model's chat template (Jinja).
    pub fn with_chat_template(mut self, template: Option<String>) -> Self {
        self.chat_template = template;
        self
    }

    /// The model's chat template (Jinja), when its file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Whether the vocabulary is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The id whose text is exactly `text`.
    pub fn id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    /// The token's text as stored in the vocabulary.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// The token's kind.
    pub fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// `<bos>`.
    pub fn bos(&self) -> u32 {
        self.bos
    }

    /// Token ids of `text`. `add_bos` prepends `<bos>` if the vocabulary asks
    /// for it; `parse_special` recognises control-token strings in the text.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        self.encode_fragments(text, add_bos, self.partition(text, parse_special, &[]))
    }

    /// Token ids of `text` with control-token strings recognised except
    /// inside the `text_only` byte ranges (what a chat template put in
    /// from the messages: a message's `<end_of_turn>` stays text).
    pub fn encode_guarded(&self, text: &str, text_only: &[std::ops::Range<usize>]) -> Vec<u32> {
        self.encode_fragments(text, false, self.partition(text, true, text_only))
    }

    fn encode_fragments(&self, text: &str, add_bos: bool, fragments: Vec<Fragment>) -> Vec<u32> {
        let mut out = Vec::new();
        if add_bos && self.add_bos {
            out.push(self.bos);
        }
        for fragment in fragments {
            match fragment {
                Fragment::Token(id) => out.push(id),
                Fragment::Raw(start, end) => {
                    let escaped = text[start..end].replace(' ', "\u{2581}");
                    self.merge(&escaped, &mut out);
                }
            }
        }
        out
    }

    fn partition(
        &self,
        text: &str,
        parse_special: bool,
        text_only: &[std::ops::Range<usize>],
    ) -> Vec<Fragment> {
        let mut fragments = vec![Fragment::Raw(0, text.len())];
        if text.is_empty() {
            return Vec::new();
        }
        for &id in &self.specials {
            let kind = self.kinds[id as usize];
            let control = matches!(kind, TokenKind::Control | TokenKind::Unknown);
            if !parse_special && control {
                continue;
            }
            let guarded = |at: usize, len: usize| {
                control && text_only.iter().any(|r| at < r.end && r.start < at + len)
            };
            let needle = self.pieces[id as usize].as_str();
            if !fragments
                .iter()
                .any(|f| matches!(f, Fragment::Raw(s, e) if text[*s..*e].contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Raw(mut start, end) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut from = start;
                while let Some(at) = text[from..end].find(needle) {
                    let at = from + at;
                    if guarded(at, needle.len()) {
                        // Text here: look again after this match's start.
                        from = at + text[at..].chars().next().map_or(1, char::len_utf8);
                        continue;
                    }
                    if at > start {
                        next.push(Fragment::Raw(start, at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + needle.len();
                    from = start;
                }
                if start < end {
                    next.push(Fragment::Raw(start, end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Queues the merge of symbols `left` and `right` if their text is a token.
    fn try_merge(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: isize,
        right: isize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        let joined = &text[l.start..l.start + l.len + r.len];
        if let Some(&id) = self.by_text.get(joined) {
            queue.push(Bigram {
                left: left as usize,
                right: right as usize,
                score: self.scores[id as usize],
                size: joined.len(),
            });
        }
    }

    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i as isize - 1,
                next: i as isize + 1,
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = -1;
        }
        let mut queue = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.try_merge(text, &symbols, i as isize - 1, i as isize, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
            // Stale: one side has been merged into something else since.
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
                continue;
            }
            symbols[bigram.left].len += r.len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = r.next;
            if r.next >= 0 {
                symbols[r.next as usize].prev = bigram.left as isize;
            }
            let left = symbols[bigram.left];
            self.try_merge(text, &symbols, left.prev, bigram.left as isize, &mut queue);
            self.try_merge(text, &symbols, bigram.left as isize, left.next, &mut queue);
        }
        // Every merged symbol is a token (merges only form vocabulary
        // entries); a single character that is not one becomes its bytes.
        let mut i = 0isize;
        while i != -1 {
            let symbol = symbols[i as usize];
            let piece = &text[symbol.start..symbol.start + symbol.len];
            match self.by_text.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().map(|b| self.bytes[b as usize])),
            }
            i = symbol.next;
        }
    }

    /// The bytes a token stands for in output text: `▁` becomes a space, byte
    /// tokens their byte; control tokens render as nothing unless `special`.
    pub fn piece_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(kind) = self.kind(id) else {
            return Vec::new();
        };
        let piece = &self.pieces[id as usize];
        match kind {
            TokenKind::Normal => piece.replace('\u{2581}', " ").into_bytes(),
            TokenKind::Byte => {
                u8::from_str_radix(piece.trim_start_matches("<0x").trim_end_matches('>'), 16)
                    .map(|b| vec![b])
                    .unwrap_or_default()
            }
            TokenKind::UserDefined => piece.as_bytes().to_vec(),
            TokenKind::Control | TokenKind::Unknown if special => piece.as_bytes().to_vec(),
            _ => Vec::new(),
        }
    }

    /// Text of `ids` (invalid UTF-8 replaced), control tokens omitted.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.piece_bytes(id, false))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A protobuf field value, as far as `tokenizer.model` needs.
enum ProtoValue {
    Varint(u64),
    Fixed32(u32),
    /// Offset into the whole file and length.
    Bytes(usize, usize),
}

/// Reads protobuf wire-format fields from `bytes` (which start at byte
/// `base` of the file, for error offsets).
struct ProtoReader<'a> {
    bytes: &'a [u8],
    at: usize,
    base: usize,
}

impl ProtoReader<'_> {
    fn error(&self, reason: &str) -> VocabError {
        VocabError::SentencePiece {
            offset: self.base + self.at,
            reason: reason.to_owned(),
        }
    }

    fn varint(&mut self) -> Result<u64, VocabError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.bytes.get(self.at) else {
                return Err(self.error("truncated varint"));
            };
            self.at += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<usize, VocabError> {
        if self.bytes.len() - self.at < n {
            return Err(self.error(&format!(
                "truncated {what}: {n} bytes expected, {} left",
                self.bytes.len() - self.at
            )));
        }
        let start = self.at;
        self.at += n;
        Ok(start)
    }

    /// The next field number and value, or `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, ProtoValue)>, VocabError> {
        if self.at == self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => ProtoValue::Varint(self.varint()?),
            1 => {
                self.take(8, "fixed64")?;
                ProtoValue::Varint(0)
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| self.error("length does not fit in memory"))?;
                let start = self.take(len, "length-delimited field")?;
                ProtoValue::Bytes(self.base + start, len)
            }
            5 => {
                let at = self.take(4, "fixed32")?;
                let b = &self.bytes[at..at + 4];
                ProtoValue::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            wire => return Err(self.error(&format!("unsupported protobuf wire type {wire}"))),
        };
        Ok(Some((key >> 3, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny vocabulary: bytes, a few merges, and special tokens.
    fn vocab() -> Tokenizer {
        let mut pieces = vec![
            "<pad>".to_owned(),
            "<eos>".into(),
            "<bos>".into(),
            "<unk>".into(),
        ];
        let mut kinds = vec![3, 3, 3, 2];
        let mut scores = vec![0.0; 4];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            kinds.push(6);
            scores.push(0.0);
        }
        for (piece, score, kind) in [
            ("<start_of_turn>", 0.0, 3),
            ("\n", 0.0, 4),
            ("\n\n", 0.0, 4),
            ("h", -1.0, 1),
            ("e", -1.0, 1),
            ("l", -1.0, 1),
            ("o", -1.0, 1),
            ("\u{2581}", -1.0, 1),
            ("he", -5.0, 1),
            ("ll", -3.0, 1),
            ("llo", -4.0, 1),
            ("hello", -2.0, 1),
            ("\u{2581}he", -6.0, 1),
        ] {
            pieces.push(piece.to_owned());
            scores.push(score);
            kinds.push(kind);
        }
        Tokenizer::new(pieces, scores, kinds, 2, true).unwrap()
    }

    /// `t`'s vocabulary as a SentencePiece `ModelProto`, with a trainer
    /// spec (field 2) in front that the reader must skip.
    fn sentencepiece_model(t: &Tokenizer) -> Vec<u8> {
        fn varint(out: &mut Vec<u8>, mut v: u64) {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        let mut out = vec![0x12, 3, 0x08, 0x96, 0x01];
        for id in 0..t.len() {
            let mut piece = Vec::new();
            let text = t.pieces[id].as_bytes();
            piece.push(0x0a);
            varint(&mut piece, text.len() as u64);
            piece.extend_from_slice(text);
            piece.push(0x15);
            piece.extend_from_slice(&t.scores[id].to_le_bytes());
            let kind = match t.kinds[id] {
                TokenKind::Normal => 1,
                TokenKind::Unknown => 2,
                TokenKind::Control => 3,
                TokenKind::UserDefined => 4,
                TokenKind::Unused => 5,
                TokenKind::Byte => 6,
            };
            if kind != 1 {
                piece.extend_from_slice(&[0x18, kind]);
            }
            out.push(0x0a);
            varint(&mut out, piece.len() as u64);
            out.extend_from_slice(&piece);
        }
        out
    }

    #[test]
    fn sentencepiece_model_file_gives_the_same_vocabulary() {
        let t = vocab();
        let model = sentencepiece_model(&t);
        let u = Tokenizer::from_sentencepiece(&model, 2).unwrap();
        assert_eq!(
            (u.pieces.clone(), u.scores.clone(), u.kinds.clone()),
            (t.pieces.clone(), t.scores.clone(), t.kinds.clone())
        );
        for text in ["hello\n\nhe said <start_of_turn>é", "  llo"] {
            assert_eq!(u.encode(text, true, true), t.encode(text, true, true));
        }
        // Every truncation is an error naming a byte offset, never a panic.
        for cut in [1, 7, 100, model.len() - 1] {
            let e = Tokenizer::from_sentencepiece(&model[..cut], 2).unwrap_err();
            assert!(e.to_string().starts_with("tokenizer.model: byte "), "{e}");
        }
        let e = Tokenizer::from_sentencepiece(&[0x12, 0], 2).unwrap_err();
        assert!(e.to_string().contains("no pieces"), "{e}");
    }

    fn ids(t: &Tokenizer, pieces: &[&str]) -> Vec<u32> {
        pieces.iter().map(|p| t.id(p).unwrap()).collect()
    }

    #[test]
    fn merges_follow_scores_then_position() {
        let t = vocab();
        // ll (-3) merges first, then llo (-4), he (-5), then hello (-2).
        assert_eq!(t.encode("hello", false, false), ids(&t, &["hello"]));
        assert_eq!(t.encode("hello", true, false), ids(&t, &["<bos>", "hello"]));
        // A space becomes ▁; "▁he" (-6) is the only merge across it.
        assert_eq!(
            t.encode("he he", false, false),
            ids(&t, &["he", "\u{2581}he"])
        );
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let t = vocab();
        // é is two UTF-8 bytes; no piece covers it.
        assert_eq!(t.encode("é", false, false), ids(&t, &["<0xC3>", "<0xA9>"]));
        assert_eq!(t.decode(&t.encode("hé llo", true, false)), "hé llo");
    }

    #[test]
    fn user_defined_tokens_always_split_control_tokens_only_when_asked() {
        let t = vocab();
        assert_eq!(
            t.encode("he\n\nhe\n", false, false),
            ids(&t, &["he", "\n\n", "he", "\n"])
        );
        let raw = t.encode("<start_of_turn>h", false, false);
        assert!(!raw.contains(&t.id("<start_of_turn>").unwrap()));
        assert_eq!(
            t.encode("<start_of_turn>h", false, true),
            ids(&t, &["<start_of_turn>", "h"])
        );
        assert_eq!(t.encode("", true, true), vec![2]);
    }

    #[test]
    fn mismatched_lists_and_missing_bytes_are_errors() {
        let e = Tokenizer::new(vec!["a".into()], vec![], vec![1], 0, false).unwrap_err();
        assert!(e.to_string().contains("tokenizer.ggml.scores has 0"), "{e}");
        let e = Tokenizer::new(vec!["a".into()], vec![0.0], vec![1], 0, false).unwrap_err();
        assert_eq!(e, VocabError::MissingByte(0));
    }
}
