//! Constrained decoding: structured output (`response_format` JSON object
//! or JSON Schema, a Lark `grammar`) enforced token by token with
//! `llguidance`, the library vLLM and SGLang use.
//!
//! [`Guide`] is built once per model: llguidance's token trie over the
//! vocabulary (each token's bytes; control tokens under llguidance's
//! special-token marker, so a grammar never produces them) and its parser
//! factory. [`Guide::constraint`] compiles one request's grammar; a
//! [`Constraint`] then masks the logits before each draw (disallowed
//! tokens get −∞, so temperature, top-k and top-p choose among allowed
//! tokens only) and follows the drawn token. When the grammar is complete
//! the choice ends (`finish_reason: "stop"`).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::tokenizer::{TokenKind, Tokenizer};

/// A grammar a request asks its output to follow.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON Schema (`response_format: {"type": "json_schema", …}`).
    JsonSchema(serde_json::Value),
    /// A Lark grammar (llguidance's dialect; the `grammar` extension).
    Lark(String),
}

/// Why a grammar cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The grammar or schema does not compile.
    #[error("{0}")]
    Invalid(String),
    /// Following a token failed (the grammar reached a dead end).
    #[error("constrained decoding failed: {0}")]
    Failed(String),
}

/// The model's vocabulary as llguidance sees it.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.tokenizer
            .encode(&String::from_utf8_lossy(s), false, false)
    }
}

/// What constrained decoding needs of a model, built once.
pub struct Guide {
    factory: ParserFactory,
    vocab: usize,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide").field("vocab", &self.vocab).finish()
    }
}

impl Guide {
    /// llguidance's view of `tokenizer`: every token's bytes (control and
    /// unused tokens marked special), end of sequence `<eos>`, end of turn
    /// `end_of_turn` (when the vocabulary has it).
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Self, ConstraintError> {
        let vocab = tokenizer.len();
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| match tokenizer.kind(id) {
                Some(TokenKind::Normal | TokenKind::Byte | TokenKind::UserDefined) => {
                    tokenizer.piece_bytes(id, false)
                }
                _ => {
                    let mut special = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    special.extend(tokenizer.piece(id).unwrap_or_default().as_bytes());
                    special
                }
            })
            .collect();
        let eos = tokenizer.id("<eos>").unwrap_or(1);
        let mut info = TokRxInfo::new(vocab as u32, eos);
        info.tok_bos = Some(tokenizer.bos());
        info.tok_end_of_turn = tokenizer.id("<end_of_turn>");
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Invalid(format!("cannot set up llguidance: {e}")))?;
        Ok(Self { factory, vocab })
    }

    /// A constraint for one request's `grammar`; an invalid grammar or
    /// schema is an error naming the problem.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint, ConstraintError> {
        let top = match grammar {
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"}))
            }
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(schema.clone()),
            Grammar::Lark(text) => {
                // GBNF (llama.cpp's grammars) defines rules with `::=`;
                // llguidance's Rust library reads Lark only.
                if text.lines().any(|l| l.contains("::=")) {
                    return Err(ConstraintError::Invalid(
                        "this looks like GBNF (`::=`); the `grammar` field takes Lark \
                         (`rule: …`, see llguidance's syntax)"
                            .into(),
                    ));
                }
                TopLevelGrammar::from_lark(text.clone())
            }
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| ConstraintError::Invalid(e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Invalid(readable(e)));
        }
        // A grammar that admits nothing at all is refused up front.
        let first = matcher
            .compute_mask()
            .map_err(|e| ConstraintError::Invalid(readable(e.to_string())))?;
        if first.is_zero() {
            return Err(ConstraintError::Invalid(
                "the grammar cannot match any text".into(),
            ));
        }
        Ok(Constraint {
            matcher,
            vocab: self.vocab,
        })
    }
}

/// llguidance reports a parser that no token can start as
/// `NoExtensionBias` with a dump of its state; say what it means.
fn readable(error: String) -> String {
    if error.starts_with("NoExtensionBias") {
        "the grammar cannot match any text (no token can start it)".into()
    } else {
        error
    }
}

/// One choice's grammar state.
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            vocab: self.vocab,
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// Sets every token the grammar does not allow next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let allowed = self
            .matcher
            .compute_mask()
            .map_err(|e| ConstraintError::Failed(e.to_string()))?;
        if allowed.is_zero() {
            return Err(ConstraintError::Failed(
                "no token can continue the grammar".into(),
            ));
        }
        for (id, logit) in logits.iter_mut().enumerate().take(self.vocab) {
            if !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Follows the drawn `token`; `true` when the grammar is complete.
    pub fn advance(&mut self, token: u32) -> Result<bool, ConstraintError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Failed(e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}
