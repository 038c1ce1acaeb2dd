//! The request bodies of `/v1/completions` and `/v1/chat/completions` as
//! typed values (serde). A field of the wrong type is refused with a 400
//! that names it (`` `temperature` must be a number, not "hot" ``); the
//! checks that need several fields (`n`, the sampling ranges, a positive
//! `max_tokens`) follow.
//!
//! Fields the server does not read yet are ignored, as before; the
//! OpenAI fields it will honour or refuse come with the API issue.

use serde::Deserialize;
use serde::de::{Deserializer, Error as _};
use serde_json::Value;

use super::ServeError;
use crate::gemma::Sampling;
use crate::gemma::chat::{Message, Role};

/// What both endpoints take (`model` is checked before the body is typed).
#[derive(Debug, Deserialize)]
pub struct Common {
    /// Completions to generate: only 1.
    #[serde(default, deserialize_with = "whole")]
    pub n: Option<u64>,
    /// Sampling temperature (default 1; 0 is greedy).
    #[serde(default, deserialize_with = "number")]
    pub temperature: Option<f64>,
    /// Sample among the K most likely tokens (0: all).
    #[serde(default, deserialize_with = "whole")]
    pub top_k: Option<u64>,
    /// Nucleus sampling (default 1).
    #[serde(default, deserialize_with = "number")]
    pub top_p: Option<f64>,
    /// Sampling seed (default 0).
    #[serde(default, deserialize_with = "whole")]
    pub seed: Option<u64>,
    /// Most tokens to generate (default 16).
    #[serde(default, deserialize_with = "whole")]
    pub max_tokens: Option<u64>,
    /// Server-sent events instead of one answer.
    #[serde(default, deserialize_with = "boolean")]
    pub stream: Option<bool>,
}

/// A `/v1/completions` body.
#[derive(Debug)]
pub struct CompletionRequest {
    /// Parameters both endpoints share.
    pub common: Common,
    /// The prompt.
    pub prompt: String,
}

/// A `/v1/chat/completions` body.
#[derive(Debug)]
pub struct ChatRequest {
    /// Parameters both endpoints share.
    pub common: Common,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
}

#[derive(Debug, Deserialize)]
struct PromptField {
    #[serde(default, deserialize_with = "string")]
    prompt: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessagesField {
    #[serde(default, deserialize_with = "messages")]
    messages: Option<Vec<ChatMessage>>,
}

impl CompletionRequest {
    /// Types a body (a JSON object whose `model` was checked).
    pub fn from_body(body: Value) -> Result<Self, ServeError> {
        let common = typed(body.clone())?;
        let prompt = typed::<PromptField>(body)?
            .prompt
            .ok_or_else(|| ServeError::bad_request("`prompt` must be a string"))?;
        Ok(Self { common, prompt })
    }
}

impl ChatRequest {
    /// Types a body (a JSON object whose `model` was checked).
    pub fn from_body(body: Value) -> Result<Self, ServeError> {
        let common = typed(body.clone())?;
        let messages = typed::<MessagesField>(body)?
            .messages
            .ok_or_else(|| ServeError::bad_request("`messages` must be a non-empty array"))?;
        Ok(Self { common, messages })
    }
}

/// One message of a conversation.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant` (checked when the
    /// prompt is rendered, naming the message).
    #[serde(default)]
    pub role: Value,
    /// The text (required: checked when the prompt is rendered).
    #[serde(default, deserialize_with = "string")]
    pub content: Option<String>,
}

/// The parameters a request runs with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters and seed.
    pub sampling: Sampling,
    /// Stream server-sent events.
    pub stream: bool,
}

impl Common {
    /// The checked parameters; `default_max` when `max_tokens` is absent.
    pub fn params(&self, default_max: usize) -> Result<Params, ServeError> {
        if self.n.unwrap_or(1) != 1 {
            return Err(ServeError::bad_request("only `n` = 1 is supported"));
        }
        let sampling = Sampling {
            temperature: self.temperature.unwrap_or(1.0) as f32,
            top_k: self.top_k.unwrap_or(0) as usize,
            top_p: self.top_p.unwrap_or(1.0) as f32,
            seed: self.seed.unwrap_or(0),
        };
        sampling
            .check()
            .map_err(|e| ServeError::bad_request(e.to_string()))?;
        let max_tokens = self.max_tokens.unwrap_or(default_max as u64) as usize;
        if max_tokens == 0 {
            return Err(ServeError::bad_request("`max_tokens` must be at least 1"));
        }
        Ok(Params {
            max_tokens,
            sampling,
            stream: self.stream.unwrap_or(false),
        })
    }
}

impl ChatRequest {
    /// The messages as the chat template takes them.
    pub fn turns(&self) -> Result<Vec<Message<'_>>, ServeError> {
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = m.content.as_deref().ok_or_else(|| {
                    ServeError::bad_request(format!("messages[{i}].content must be a string"))
                })?;
                let role = m.role.as_str().unwrap_or("");
                let role = Role::from_openai(role).ok_or_else(|| {
                    ServeError::bad_request(format!(
                        "messages[{i}].role {role:?} is not system, user or assistant"
                    ))
                })?;
                Ok(Message { role, content })
            })
            .collect()
    }
}

/// Types `body` (a JSON object whose `model` was checked) as `T`; a field
/// of the wrong type is a 400 naming it.
fn typed<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ServeError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        ServeError::bad_request(
            if inner.starts_with("messages[") || path.is_empty() || path == "." {
                inner
            } else {
                format!("`{path}` {inner}")
            },
        )
    })
}

fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("must be a number, not {v}"))),
    }
}

fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("must be a non-negative integer, not {v}"))),
    }
}

fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(v) => Err(D::Error::custom(format!("must be true or false, not {v}"))),
    }
}

fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        Some(Value::String(s)) => Ok(Some(s)),
        _ => Err(D::Error::custom("must be a string")),
    }
}

fn messages<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<ChatMessage>>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        Some(Value::Array(list)) if !list.is_empty() => {
            let mut out = Vec::with_capacity(list.len());
            for (i, m) in list.into_iter().enumerate() {
                let message =
                    serde_path_to_error::deserialize::<_, ChatMessage>(m).map_err(|e| {
                        let path = e.path().to_string();
                        D::Error::custom(format!("messages[{i}].{path} {}", e.into_inner()))
                    })?;
                out.push(message);
            }
            Ok(Some(out))
        }
        _ => Err(D::Error::custom("must be a non-empty array")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion(body: Value) -> Result<CompletionRequest, ServeError> {
        CompletionRequest::from_body(body)
    }

    fn chat(body: Value) -> Result<ChatRequest, ServeError> {
        ChatRequest::from_body(body)
    }

    fn error<T: std::fmt::Debug>(typed: Result<T, ServeError>) -> String {
        typed.unwrap_err().to_string()
    }

    #[test]
    fn fields_of_the_wrong_type_are_named() {
        let m = "gemma3-270m";
        assert_eq!(
            error(completion(json!({"model": m, "prompt": 7}))),
            "`prompt` must be a string"
        );
        assert_eq!(
            error(completion(
                json!({"model": m, "prompt": "x", "temperature": "hot"})
            )),
            "`temperature` must be a number, not \"hot\""
        );
        assert_eq!(
            error(completion(
                json!({"model": m, "prompt": "x", "max_tokens": -1})
            )),
            "`max_tokens` must be a non-negative integer, not -1"
        );
        assert_eq!(
            error(completion(json!({"model": m, "prompt": "x", "stream": 1}))),
            "`stream` must be true or false, not 1"
        );
        assert_eq!(
            error(chat(json!({"model": m, "messages": []}))),
            "`messages` must be a non-empty array"
        );
        assert_eq!(
            error(chat(
                json!({"model": m, "messages": [{"role": "user", "content": 3}]})
            )),
            "messages[0].content must be a string"
        );
    }

    #[test]
    fn parameters_are_checked_together() {
        let body = |extra: Value| {
            let mut b = json!({"model": "m", "prompt": "x"});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            completion(b).unwrap().common.params(16)
        };
        let p = body(json!({})).unwrap();
        assert_eq!(
            (p.max_tokens, p.stream, p.sampling.temperature),
            (16, false, 1.0)
        );
        assert!(
            body(json!({"n": 2}))
                .unwrap_err()
                .to_string()
                .contains("`n` = 1")
        );
        assert!(
            body(json!({"max_tokens": 0}))
                .unwrap_err()
                .to_string()
                .contains("max_tokens")
        );
        assert!(
            body(json!({"temperature": -1}))
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
        let good = chat(json!({"model": "m", "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}
        ]}))
        .unwrap();
        assert_eq!(good.turns().unwrap()[0].role, Role::System);
        let bad =
            chat(json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]})).unwrap();
        assert!(
            bad.turns()
                .unwrap_err()
                .to_string()
                .contains("messages[0].role \"tool\"")
        );
    }
}
