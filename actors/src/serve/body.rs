//! The request bodies of `/v1/completions` and `/v1/chat/completions`,
//! checked field by field against OpenAI's API.
//!
//! Every field OpenAI documents (and the vLLM extensions clients send) is
//! in one of three groups, each listed in `docs/inference.md`:
//! - honoured: `prompt`, `messages`, `max_tokens`, `max_completion_tokens`,
//!   `n`, `stop`, `stop_token_ids`, `logprobs`, `top_logprobs`, `echo`,
//!   `seed`, `temperature`, `top_p`, `top_k`, `stream`, `stream_options`,
//!   `add_generation_prompt`, `add_special_tokens`, `best_of` (= `n`),
//!   `return_tokens_as_token_ids`, `ignore_eos` (vLLM);
//! - accepted because they ask nothing of the output (`user`, `metadata`,
//!   `prompt_cache_key`, `safety_identifier`, `service_tier`), or because
//!   the value given is the neutral one (`frequency_penalty: 0`,
//!   `logit_bias: {}`, `tools: []`, `response_format: {"type":"text"}`, …);
//! - refused with a 400 naming the field (`param`), for any other value.
//!
//! A field OpenAI does not know is refused as OpenAI refuses it
//! ("Unrecognized request argument supplied"), so a misspelt parameter is
//! never silently dropped. `null` is the same as leaving a field out.

use serde_json::{Map, Value};

use super::ServeError;
use crate::gemma::Sampling;
use crate::gemma::chat::Role;
use crate::gemma::constrain::Grammar;
use crate::gemma::engine::{MAX_CHOICES, MAX_TOP_LOGPROBS};

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

/// Most prompts one `/v1/completions` request may batch.
pub const MAX_PROMPTS: usize = 64;

/// Which endpoint a body came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// One prompt of `/v1/completions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Text, tokenized by the server (special-token strings stay text).
    Text(String),
    /// Token ids, run as given.
    Ids(Vec<u32>),
}

/// One message of a conversation, its content parts joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    /// Who said it.
    pub role: Role,
    /// The text.
    pub content: String,
}

/// What the request asks the model to continue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// `/v1/completions`: one or more prompts.
    Prompts {
        /// The prompts, in order (choice `i` of prompt `p` is choice
        /// `p * n + i` of the answer).
        prompts: Vec<Prompt>,
        /// Put BOS before text prompts (vLLM's `add_special_tokens`,
        /// default true).
        add_special_tokens: bool,
    },
    /// `/v1/chat/completions`: a conversation.
    Chat {
        /// The messages.
        messages: Vec<Turn>,
        /// End with the start of the model's turn (HF's
        /// `add_generation_prompt`, default true).
        add_generation_prompt: bool,
    },
}

/// A checked request: everything the server does with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The prompt(s) or conversation.
    pub input: Input,
    /// Most tokens per choice; `None`: until end of generation or the
    /// context.
    pub max_tokens: Option<usize>,
    /// Sampling parameters and seed.
    pub sampling: Sampling,
    /// Choices per prompt.
    pub n: usize,
    /// Stop strings, matched on the decoded text.
    pub stop: Vec<String>,
    /// Stop token ids.
    pub stop_token_ids: Vec<u32>,
    /// Log-probabilities of the generated tokens, with this many
    /// alternatives each.
    pub logprobs: Option<usize>,
    /// Return the prompt (and, with `logprobs`, its tokens' log-probabilities).
    pub echo: bool,
    /// Name the tokens of log-probability listings `token_id:<id>` (vLLM's
    /// `return_tokens_as_token_ids`).
    pub tokens_as_ids: bool,
    /// Server-sent events.
    pub stream: bool,
    /// A last streamed chunk with the usage.
    pub include_usage: bool,
    /// Structured output: the grammar every choice follows.
    pub grammar: Option<Grammar>,
    /// Generate past end-of-generation tokens (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

impl Generation {
    /// Checks `body` (a JSON object whose `model` was checked) for
    /// `endpoint`.
    pub fn from_body(endpoint: Endpoint, body: Value) -> Result<Self, ServeError> {
        let Value::Object(map) = body else {
            return Err(ServeError::bad_request("the body must be a JSON object"));
        };
        let mut f = Fields { map };
        f.map.remove("model");
        let chat = endpoint == Endpoint::Chat;

        let input = if chat {
            let messages = messages(f.take("messages"))?;
            let add_generation_prompt = f.boolean("add_generation_prompt")?.unwrap_or(true);
            f.neutral("continue_final_message", |v| v == &Value::Bool(false))?;
            f.neutral("chat_template_kwargs", empty_object)?;
            Input::Chat {
                messages,
                add_generation_prompt,
            }
        } else {
            let prompts = prompts(f.take("prompt"))?;
            let add_special_tokens = f.boolean("add_special_tokens")?.unwrap_or(true);
            Input::Prompts {
                prompts,
                add_special_tokens,
            }
        };

        // Lengths: chat's `max_completion_tokens` wins over the older
        // `max_tokens`.
        let max_completion = if chat {
            f.whole("max_completion_tokens")?
        } else {
            None
        };
        let max_tokens = f.whole("max_tokens")?;
        let (length_param, max_tokens) = match (max_completion, max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let echo = if chat {
            false
        } else {
            f.boolean("echo")?.unwrap_or(false)
        };
        if max_tokens == Some(0) && !echo {
            return Err(ServeError::invalid(
                length_param,
                format!("`{length_param}` must be at least 1 (0 is allowed only with `echo`)"),
            ));
        }

        let n = f.whole("n")?.unwrap_or(1);
        if !(1..=MAX_CHOICES as u64).contains(&n) {
            return Err(ServeError::invalid(
                "n",
                format!("`n` must be between 1 and {MAX_CHOICES}, not {n}"),
            ));
        }
        if !chat
            && let Some(best_of) = f.whole("best_of")?
            && best_of != n
        {
            return Err(ServeError::invalid(
                "best_of",
                format!(
                    "`best_of` {best_of} is not supported: this server returns every \
                     sample it draws (`best_of` must equal `n`, {n})"
                ),
            ));
        }

        let temperature = f.number("temperature")?.unwrap_or(1.0);
        let top_p = f.number("top_p")?.unwrap_or(1.0);
        let top_k = match f.integer("top_k")? {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ServeError::invalid(
                    "top_k",
                    format!("`top_k` must be a positive integer, or 0 or -1 for all, not {k}"),
                ));
            }
        };
        // Any integer: a negative seed is taken as its two's complement.
        let seed = f.integer("seed")?.unwrap_or(0) as u64;
        let sampling = Sampling {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            seed,
        };
        if let Err(e) = sampling.check() {
            let param = if e.flag == "top-p" { "top_p" } else { e.flag };
            return Err(ServeError::invalid(
                param,
                format!("`{param}` {}: {}", e.value, e.reason),
            ));
        }

        let stop = stops(f.take("stop"))?;
        let stop_token_ids = match f.take("stop_token_ids") {
            None => Vec::new(),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| {
                            ServeError::invalid(
                                "stop_token_ids",
                                format!("`stop_token_ids` must hold token ids, not {v}"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(ServeError::invalid(
                    "stop_token_ids",
                    format!("`stop_token_ids` must be an array of token ids, not {v}"),
                ));
            }
        };

        let logprobs = if chat {
            let on = f.boolean("logprobs")?.unwrap_or(false);
            let top = f.whole("top_logprobs")?;
            match (on, top) {
                (false, Some(_)) => {
                    return Err(ServeError::invalid(
                        "top_logprobs",
                        "`top_logprobs` needs `logprobs: true`",
                    ));
                }
                (false, None) => None,
                (true, top) => Some(top.unwrap_or(0)),
            }
        } else {
            f.whole("logprobs")?
        };
        if let Some(k) = logprobs
            && k > MAX_TOP_LOGPROBS as u64
        {
            let param = if chat { "top_logprobs" } else { "logprobs" };
            return Err(ServeError::invalid(
                param,
                format!("`{param}` must be between 0 and {MAX_TOP_LOGPROBS}, not {k}"),
            ));
        }

        let tokens_as_ids = f.boolean("return_tokens_as_token_ids")?.unwrap_or(false);
        let stream = f.boolean("stream")?.unwrap_or(false);
        let include_usage = match f.take("stream_options") {
            None => false,
            Some(_) if !stream => {
                return Err(ServeError::invalid(
                    "stream_options",
                    "`stream_options` is only allowed with `stream: true`",
                ));
            }
            Some(Value::Object(options)) => {
                let mut o = Fields { map: options };
                let usage = o.boolean("include_usage")?.unwrap_or(false);
                o.neutral("continuous_usage_stats", |v| v == &Value::Bool(false))?;
                o.done_in("stream_options")?;
                usage
            }
            Some(v) => {
                return Err(ServeError::invalid(
                    "stream_options",
                    format!("`stream_options` must be an object, not {v}"),
                ));
            }
        };

        let grammar = structured(f.take("response_format"), f.take("grammar"))?;
        f.neutral("frequency_penalty", zero)?;
        f.neutral("presence_penalty", zero)?;
        f.neutral("repetition_penalty", |v| v.as_f64() == Some(1.0))?;
        f.neutral("min_p", zero)?;
        f.neutral("logit_bias", empty_object)?;
        let ignore_eos = f.boolean("ignore_eos")?.unwrap_or(false);
        f.neutral("include_stop_str_in_output", |v| v == &Value::Bool(false))?;
        f.neutral("skip_special_tokens", |v| v == &Value::Bool(true))?;
        if chat {
            f.neutral("tools", empty_array)?;
            f.neutral("functions", empty_array)?;
            f.neutral("tool_choice", |v| v == "none")?;
            f.neutral("function_call", |v| v == "none")?;
            f.neutral("parallel_tool_calls", |v| v.is_boolean())?;
            f.neutral("modalities", |v| v == &serde_json::json!(["text"]))?;
            f.neutral("store", |v| v == &Value::Bool(false))?;
            f.neutral("service_tier", |v| v == "auto" || v == "default")?;
            f.metadata("metadata", Value::is_object)?;
            f.metadata("prompt_cache_key", Value::is_string)?;
            f.metadata("safety_identifier", Value::is_string)?;
        } else {
            f.neutral("suffix", |v| v == "")?;
        }
        f.metadata("user", Value::is_string)?;
        f.done()?;

        Ok(Self {
            input,
            max_tokens: max_tokens.map(|m| m as usize),
            sampling,
            n: n as usize,
            stop,
            stop_token_ids,
            logprobs: logprobs.map(|k| k as usize),
            echo,
            tokens_as_ids,
            stream,
            include_usage,
            grammar,
            ignore_eos,
        })
    }
}

/// A `POST /tokenize` body (vLLM's shape): a `prompt`, or chat
/// `messages` rendered with the chat template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenize {
    /// What to tokenize.
    pub input: Input,
    /// Also return each token's text (`token_strs`).
    pub return_token_strs: bool,
}

impl Tokenize {
    /// Checks a body (its `model`, if any, was checked).
    pub fn from_body(body: Value) -> Result<Self, ServeError> {
        let Value::Object(map) = body else {
            return Err(ServeError::bad_request("the body must be a JSON object"));
        };
        let mut f = Fields { map };
        f.map.remove("model");
        let input = match (f.take("prompt"), f.take("messages")) {
            (Some(_), Some(_)) => {
                return Err(ServeError::invalid(
                    "messages",
                    "give `prompt` or `messages`, not both",
                ));
            }
            (Some(Value::String(text)), None) => Input::Prompts {
                prompts: vec![Prompt::Text(text)],
                add_special_tokens: f.boolean("add_special_tokens")?.unwrap_or(true),
            },
            (Some(v), None) => {
                return Err(ServeError::invalid(
                    "prompt",
                    format!("`prompt` must be a string, not {}", short(&v)),
                ));
            }
            (None, Some(m)) => {
                // The template puts BOS in; vLLM adds no other.
                f.neutral("add_special_tokens", |v| v == &Value::Bool(false))?;
                f.neutral("continue_final_message", |v| v == &Value::Bool(false))?;
                f.neutral("chat_template_kwargs", empty_object)?;
                Input::Chat {
                    messages: messages(Some(m))?,
                    add_generation_prompt: f.boolean("add_generation_prompt")?.unwrap_or(true),
                }
            }
            (None, None) => {
                return Err(ServeError::invalid(
                    "prompt",
                    "`prompt` (a string) or `messages` is required",
                ));
            }
        };
        let return_token_strs = f.boolean("return_token_strs")?.unwrap_or(false);
        f.done()?;
        Ok(Self {
            input,
            return_token_strs,
        })
    }
}

/// A `POST /detokenize` body: the token ids.
pub fn detokenize(body: Value) -> Result<Vec<u32>, ServeError> {
    let Value::Object(map) = body else {
        return Err(ServeError::bad_request("the body must be a JSON object"));
    };
    let mut f = Fields { map };
    f.map.remove("model");
    let tokens = match f.take("tokens") {
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| ServeError::invalid("tokens", "`tokens` must hold token ids"))?,
        _ => {
            return Err(ServeError::invalid(
                "tokens",
                "`tokens` (an array of token ids) is required",
            ));
        }
    };
    f.done()?;
    Ok(tokens)
}

/// `response_format` and the `grammar` extension (a Lark grammar) as one
/// grammar, or none for plain text.
fn structured(
    format: Option<Value>,
    grammar: Option<Value>,
) -> Result<Option<Grammar>, ServeError> {
    let from_format = match format {
        None => None,
        Some(Value::Object(mut o)) => {
            let kind = o.remove("type");
            let grammar = match kind.as_ref().and_then(Value::as_str) {
                Some("text") => None,
                Some("json_object") => Some(Grammar::JsonObject),
                Some("json_schema") => {
                    let Some(Value::Object(mut spec)) = o.remove("json_schema") else {
                        return Err(ServeError::invalid(
                            "response_format.json_schema",
                            "`response_format.json_schema` must be an object with a `schema`",
                        ));
                    };
                    match spec.remove("name") {
                        None | Some(Value::String(_)) => {}
                        Some(v) => {
                            return Err(ServeError::invalid(
                                "response_format.json_schema.name",
                                format!(
                                    "`response_format.json_schema.name` must be a string, not {}",
                                    short(&v)
                                ),
                            ));
                        }
                    }
                    for metadata in ["description", "strict"] {
                        spec.remove(metadata);
                    }
                    let schema = match spec.remove("schema") {
                        Some(schema @ (Value::Object(_) | Value::Bool(_))) => schema,
                        None => serde_json::json!({}),
                        Some(v) => {
                            return Err(ServeError::invalid(
                                "response_format.json_schema.schema",
                                format!(
                                    "`response_format.json_schema.schema` must be a JSON Schema (an object), not {}",
                                    short(&v)
                                ),
                            ));
                        }
                    };
                    Fields { map: spec }.done_in("response_format.json_schema")?;
                    Some(Grammar::JsonSchema(schema))
                }
                _ => {
                    return Err(ServeError::invalid(
                        "response_format.type",
                        format!(
                            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\", not {}",
                            kind.map_or("nothing".into(), |k| short(&k))
                        ),
                    ));
                }
            };
            if let Some((extra, _)) = o.into_iter().next() {
                return Err(ServeError::invalid(
                    format!("response_format.{extra}"),
                    format!("Unrecognized argument in `response_format`: {extra}"),
                ));
            }
            grammar
        }
        Some(v) => {
            return Err(ServeError::invalid(
                "response_format",
                format!("`response_format` must be an object, not {}", short(&v)),
            ));
        }
    };
    let from_grammar = match grammar {
        None => None,
        Some(Value::String(text)) if !text.trim().is_empty() => Some(Grammar::Lark(text)),
        Some(v) => {
            return Err(ServeError::invalid(
                "grammar",
                format!(
                    "`grammar` must be a Lark grammar (a non-empty string), not {}",
                    short(&v)
                ),
            ));
        }
    };
    match (from_format, from_grammar) {
        (Some(_), Some(_)) => Err(ServeError::invalid(
            "grammar",
            "give `response_format` or `grammar`, not both",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

fn zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

fn empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(Map::is_empty)
}

fn empty_array(v: &Value) -> bool {
    v.as_array().is_some_and(Vec::is_empty)
}

/// A body's fields, taken one by one; what is left at the end is unknown.
struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    /// The field's value; `None` when absent or `null`.
    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn wrong(name: &str, what: &str, v: &Value) -> ServeError {
        ServeError::invalid(name, format!("`{name}` must be {what}, not {v}"))
    }

    fn number(&mut self, name: &str) -> Result<Option<f64>, ServeError> {
        self.take(name)
            .map(|v| v.as_f64().ok_or_else(|| Self::wrong(name, "a number", &v)))
            .transpose()
    }

    fn whole(&mut self, name: &str) -> Result<Option<u64>, ServeError> {
        self.take(name)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| Self::wrong(name, "a non-negative integer", &v))
            })
            .transpose()
    }

    fn integer(&mut self, name: &str) -> Result<Option<i64>, ServeError> {
        self.take(name)
            .map(|v| {
                v.as_i64()
                    .or_else(|| v.as_u64().map(|u| u as i64))
                    .ok_or_else(|| Self::wrong(name, "an integer", &v))
            })
            .transpose()
    }

    fn boolean(&mut self, name: &str) -> Result<Option<bool>, ServeError> {
        self.take(name)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| Self::wrong(name, "true or false", &v))
            })
            .transpose()
    }

    /// A field this server does not act on, accepted only with the value
    /// that asks for nothing.
    fn neutral(&mut self, name: &str, ok: impl Fn(&Value) -> bool) -> Result<(), ServeError> {
        match self.take(name) {
            Some(v) if !ok(&v) => Err(ServeError::invalid(
                name,
                format!(
                    "`{name}` {} is not supported by this server (see docs/inference.md)",
                    short(&v)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// A field that asks nothing of the output (a caller's label), checked
    /// for its type only.
    fn metadata(&mut self, name: &str, ok: impl Fn(&Value) -> bool) -> Result<(), ServeError> {
        match self.take(name) {
            Some(v) if !ok(&v) => Err(ServeError::invalid(
                name,
                format!("`{name}` has the wrong type: {}", short(&v)),
            )),
            _ => Ok(()),
        }
    }

    fn done(self) -> Result<(), ServeError> {
        match self.map.into_iter().next() {
            Some((name, _)) => Err(ServeError::invalid(
                name.clone(),
                format!("Unrecognized request argument supplied: {name}"),
            )),
            None => Ok(()),
        }
    }

    fn done_in(self, parent: &str) -> Result<(), ServeError> {
        match self.map.into_iter().next() {
            Some((name, _)) => Err(ServeError::invalid(
                format!("{parent}.{name}"),
                format!("Unrecognized argument in `{parent}`: {name}"),
            )),
            None => Ok(()),
        }
    }
}

/// A value for an error message, cut to a readable length.
fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

fn prompts(value: Option<Value>) -> Result<Vec<Prompt>, ServeError> {
    let bad = |what: String| ServeError::invalid("prompt", what);
    let ids = |list: &[Value]| -> Option<Vec<u32>> {
        list.iter()
            .map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
            .collect()
    };
    let out = match value {
        None => return Err(bad("`prompt` is required".into())),
        Some(Value::String(s)) => vec![Prompt::Text(s)],
        Some(Value::Array(list)) if list.is_empty() => {
            return Err(bad("`prompt` must not be an empty array".into()));
        }
        Some(Value::Array(list)) => match &list[0] {
            Value::String(_) => list
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(Prompt::Text(s)),
                    v => Err(bad(format!(
                        "`prompt[{i}]` must be a string, not {}",
                        short(&v)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![Prompt::Ids(ids(&list).ok_or_else(|| {
                bad("`prompt` must be a string, strings, token ids or arrays of token ids".into())
            })?)],
            Value::Array(_) => list
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_array().and_then(|l| ids(l)) {
                    Some(t) if !t.is_empty() => Ok(Prompt::Ids(t)),
                    _ => Err(bad(format!(
                        "`prompt[{i}]` must be a non-empty array of token ids"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            v => {
                return Err(bad(format!(
                    "`prompt` must be a string, strings, token ids or arrays of token ids, not \
                     an array of {}",
                    short(v)
                )));
            }
        },
        Some(v) => return Err(bad(format!("`prompt` must be a string, not {}", short(&v)))),
    };
    if out.len() > MAX_PROMPTS {
        return Err(bad(format!(
            "`prompt` has {} prompts; at most {MAX_PROMPTS} go in one request",
            out.len()
        )));
    }
    Ok(out)
}

fn stops(value: Option<Value>) -> Result<Vec<String>, ServeError> {
    let bad = |what: String| ServeError::invalid("stop", what);
    let list = match value {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![Value::String(s)],
        Some(Value::Array(list)) => list,
        Some(v) => {
            return Err(bad(format!(
                "`stop` must be a string or an array of strings, not {}",
                short(&v)
            )));
        }
    };
    if list.len() > MAX_STOPS {
        return Err(bad(format!(
            "`stop` has {} strings; at most {MAX_STOPS} are allowed",
            list.len()
        )));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) if !s.is_empty() => Ok(s),
            Value::String(_) => Err(bad(format!("`stop[{i}]` is empty"))),
            v => Err(bad(format!(
                "`stop[{i}]` must be a string, not {}",
                short(&v)
            ))),
        })
        .collect()
}

fn messages(value: Option<Value>) -> Result<Vec<Turn>, ServeError> {
    let Some(Value::Array(list)) = value else {
        return Err(ServeError::invalid(
            "messages",
            "`messages` must be a non-empty array",
        ));
    };
    if list.is_empty() {
        return Err(ServeError::invalid(
            "messages",
            "`messages` must be a non-empty array",
        ));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect()
}

fn message(i: usize, value: Value) -> Result<Turn, ServeError> {
    let at = format!("messages[{i}]");
    let Value::Object(map) = value else {
        return Err(ServeError::invalid(
            at.clone(),
            format!("`{at}` must be an object"),
        ));
    };
    let mut f = Fields { map };
    let role = match f.take("role") {
        Some(Value::String(r)) => match Role::from_openai(&r) {
            Some(role) => role,
            None if r == "tool" || r == "function" => {
                return Err(ServeError::invalid(
                    format!("{at}.role"),
                    format!("`{at}.role` {r:?}: tool calling is not supported by this server"),
                ));
            }
            None => {
                return Err(ServeError::invalid(
                    format!("{at}.role"),
                    format!("`{at}.role` {r:?} is not system, developer, user or assistant"),
                ));
            }
        },
        _ => {
            return Err(ServeError::invalid(
                format!("{at}.role"),
                format!("`{at}.role` must be a string"),
            ));
        }
    };
    let content = match f.take("content") {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.into_iter().enumerate() {
                texts.push(text_part(&at, j, part)?);
            }
            texts.join("\n")
        }
        None => {
            return Err(ServeError::invalid(
                format!("{at}.content"),
                format!("`{at}.content` is required (a string or an array of text parts)"),
            ));
        }
        Some(v) => {
            return Err(ServeError::invalid(
                format!("{at}.content"),
                format!(
                    "`{at}.content` must be a string or an array of text parts, not {}",
                    short(&v)
                ),
            ));
        }
    };
    f.neutral("refusal", |_| false)?;
    f.neutral("tool_calls", empty_array)?;
    if let Some(v) = f.take("name") {
        return Err(ServeError::invalid(
            format!("{at}.name"),
            format!(
                "`{at}.name` {}: participant names are not supported (Gemma's chat \
                 template has no place for them)",
                short(&v)
            ),
        ));
    }
    f.done_in(&at)?;
    Ok(Turn { role, content })
}

fn text_part(at: &str, j: usize, part: Value) -> Result<String, ServeError> {
    let here = format!("{at}.content[{j}]");
    let Value::Object(map) = part else {
        return Err(ServeError::invalid(
            here.clone(),
            format!("`{here}` must be an object"),
        ));
    };
    let mut f = Fields { map };
    match f.take("type") {
        Some(Value::String(t)) if t == "text" => {}
        Some(Value::String(t)) => {
            let kind = match t.as_str() {
                "image_url" | "input_image" | "image" => "an image",
                "input_audio" | "audio" => "audio",
                "file" => "a file",
                _ => "an unknown part",
            };
            return Err(ServeError::invalid(
                format!("{here}.type"),
                format!(
                    "`{here}.type` is {t:?} ({kind}): this model takes text only; \
                     content parts must be {{\"type\": \"text\", \"text\": …}}"
                ),
            ));
        }
        _ => {
            return Err(ServeError::invalid(
                format!("{here}.type"),
                format!("`{here}.type` must be \"text\""),
            ));
        }
    }
    let text = match f.take("text") {
        Some(Value::String(s)) => s,
        _ => {
            return Err(ServeError::invalid(
                format!("{here}.text"),
                format!("`{here}.text` must be a string"),
            ));
        }
    };
    f.done_in(&here)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion(extra: Value) -> Result<Generation, ServeError> {
        let mut body = json!({"model": "m", "prompt": "x"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Generation::from_body(Endpoint::Completions, body)
    }

    fn chat(body: Value) -> Result<Generation, ServeError> {
        Generation::from_body(Endpoint::Chat, body)
    }

    /// The error's `param` and message.
    fn refused(r: Result<Generation, ServeError>) -> (String, String) {
        let e = r.unwrap_err();
        (e.param().unwrap_or("").to_owned(), e.to_string())
    }

    #[test]
    fn defaults_and_honoured_fields() {
        let g = completion(json!({})).unwrap();
        assert_eq!(
            g.max_tokens, None,
            "no max_tokens: until the end or the context"
        );
        assert_eq!(
            (g.n, g.echo, g.stream, g.sampling.temperature),
            (1, false, false, 1.0)
        );
        let g = completion(json!({
            "max_tokens": 0, "echo": true, "logprobs": 1, "stop": ["\n", "Q:"],
            "n": 3, "best_of": 3, "seed": -1, "top_k": -1, "stop_token_ids": [1, 106],
            "stream": true, "stream_options": {"include_usage": true}, "user": "u",
            "frequency_penalty": 0, "logit_bias": {}, "prompt": [[2, 5], [2, 6]],
        }))
        .unwrap();
        assert_eq!(g.max_tokens, Some(0));
        assert_eq!(g.grammar, None);
        assert_eq!(g.stop, ["\n", "Q:"]);
        assert_eq!(g.stop_token_ids, [1, 106]);
        assert_eq!((g.n, g.logprobs, g.include_usage), (3, Some(1), true));
        assert_eq!(g.sampling.seed, u64::MAX);
        assert_eq!(
            g.input,
            Input::Prompts {
                prompts: vec![Prompt::Ids(vec![2, 5]), Prompt::Ids(vec![2, 6])],
                add_special_tokens: true
            }
        );
        let g = chat(
            json!({"model": "m", "max_tokens": 5, "max_completion_tokens": 9,
            "logprobs": true, "top_logprobs": 2,
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                      {"type": "text", "text": "there"}]}]}),
        )
        .unwrap();
        assert_eq!((g.max_tokens, g.logprobs), (Some(9), Some(2)));
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let structured = completion(json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "thing", "strict": true, "schema": schema.clone()}}}))
        .unwrap();
        assert_eq!(structured.grammar, Some(Grammar::JsonSchema(schema)));
        let lark = completion(json!({"grammar": "start: /[0-9]+/"})).unwrap();
        assert_eq!(lark.grammar, Some(Grammar::Lark("start: /[0-9]+/".into())));
        let text = completion(json!({"response_format": {"type": "text"}})).unwrap();
        assert_eq!(text.grammar, None);
        let Input::Chat {
            messages,
            add_generation_prompt,
        } = g.input
        else {
            panic!("chat input")
        };
        assert!(add_generation_prompt);
        assert_eq!(messages[0].role, Role::System);
        assert_eq!(messages[1].content, "Hi\nthere");
    }

    #[test]
    fn tokenize_bodies() {
        let t = Tokenize::from_body(json!({"prompt": "Hi", "add_special_tokens": false})).unwrap();
        assert_eq!(
            t.input,
            Input::Prompts {
                prompts: vec![Prompt::Text("Hi".into())],
                add_special_tokens: false
            }
        );
        let t = Tokenize::from_body(
            json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
            "add_generation_prompt": false, "return_token_strs": true}),
        )
        .unwrap();
        assert!(t.return_token_strs);
        assert!(matches!(
            t.input,
            Input::Chat {
                add_generation_prompt: false,
                ..
            }
        ));
        let e = Tokenize::from_body(json!({})).unwrap_err();
        assert_eq!(e.param(), Some("prompt"));
        let e = Tokenize::from_body(json!({"prompt": "x", "foo": 1})).unwrap_err();
        assert_eq!(e.param(), Some("foo"));
        assert_eq!(detokenize(json!({"tokens": [2, 9259]})).unwrap(), [2, 9259]);
        assert_eq!(
            detokenize(json!({"tokens": ["a"]})).unwrap_err().param(),
            Some("tokens")
        );
    }

    #[test]
    fn every_refusal_names_its_param() {
        let cases = [
            (
                json!({"stop": ["a", "b", "c", "d", "e"]}),
                "stop",
                "at most 4",
            ),
            (json!({"stop": ["a", ""]}), "stop", "`stop[1]` is empty"),
            (json!({"stop": 3}), "stop", "string or an array"),
            (json!({"logprobs": 21}), "logprobs", "between 0 and 20"),
            (json!({"n": 17}), "n", "between 1 and 16"),
            (json!({"n": 0}), "n", "between 1 and 16"),
            (json!({"best_of": 2}), "best_of", "must equal `n`"),
            (json!({"max_tokens": 0}), "max_tokens", "only with `echo`"),
            (
                json!({"temperature": "hot"}),
                "temperature",
                "must be a number, not \"hot\"",
            ),
            (
                json!({"temperature": -1}),
                "temperature",
                "finite number >= 0",
            ),
            (json!({"top_p": 0}), "top_p", "(0, 1]"),
            (
                json!({"presence_penalty": 0.5}),
                "presence_penalty",
                "not supported",
            ),
            (
                json!({"logit_bias": {"5": 1}}),
                "logit_bias",
                "not supported",
            ),
            (json!({"suffix": "end"}), "suffix", "not supported"),
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
                "\"json_schema\"",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}),
                "response_format.json_schema.schema",
                "must be a JSON Schema",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
                "with a `schema`",
            ),
            (
                json!({"response_format": {"type": "json_object", "x": 1}}),
                "response_format.x",
                "Unrecognized",
            ),
            (json!({"grammar": ""}), "grammar", "Lark grammar"),
            (
                json!({"grammar": "start: /a/", "response_format": {"type": "json_object"}}),
                "grammar",
                "not both",
            ),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
                "only allowed with `stream: true`",
            ),
            (
                json!({"stream": true, "stream_options": {"x": 1}}),
                "stream_options.x",
                "Unrecognized",
            ),
            (
                json!({"temprature": 0}),
                "temprature",
                "Unrecognized request argument supplied: temprature",
            ),
            (json!({"prompt": 7}), "prompt", "must be a string"),
            (json!({"prompt": []}), "prompt", "empty array"),
            (
                json!({"prompt": [[1], []]}),
                "prompt",
                "`prompt[1]` must be a non-empty array",
            ),
            (
                json!({"stop_token_ids": [-1]}),
                "stop_token_ids",
                "token ids",
            ),
            (json!({"stream": 1}), "stream", "true or false, not 1"),
            (
                json!({"max_tokens": -1}),
                "max_tokens",
                "non-negative integer, not -1",
            ),
        ];
        for (extra, param, text) in cases {
            let (p, message) = refused(completion(extra.clone()));
            assert_eq!(p, param, "{extra}: {message}");
            assert!(message.contains(text), "{extra}: {message}");
        }
        let chat_cases = [
            (json!([]), "messages", "non-empty array"),
            (
                json!([{"role": "tool", "content": "x"}]),
                "messages[0].role",
                "tool calling",
            ),
            (
                json!([{"role": "critic", "content": "x"}]),
                "messages[0].role",
                "\"critic\"",
            ),
            (
                json!([{"role": "user", "content": 3}]),
                "messages[0].content",
                "string or an array",
            ),
            (json!([{"role": "user"}]), "messages[0].content", "required"),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                "messages[0].content[0].type",
                "text only",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text"}]}]),
                "messages[0].content[0].text",
                "must be a string",
            ),
            (
                json!([{"role": "user", "content": "x", "name": "bob"}]),
                "messages[0].name",
                "not supported",
            ),
            (
                json!([{"role": "user", "content": "x", "extra": 1}]),
                "messages[0].extra",
                "Unrecognized",
            ),
        ];
        for (messages, param, text) in chat_cases {
            let (p, message) = refused(chat(json!({"model": "m", "messages": messages})));
            assert_eq!(p, param, "{message}");
            assert!(message.contains(text), "{message}");
        }
        let (p, m) = refused(chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
        ));
        assert_eq!(
            (p.as_str(), m.contains("needs `logprobs: true`")),
            ("top_logprobs", true)
        );
        let (p, _) = refused(chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
        ));
        assert_eq!(p, "tools");
        let (p, _) = refused(chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "echo": true}),
        ));
        assert_eq!(p, "echo", "echo is a completions field");
    }
}
