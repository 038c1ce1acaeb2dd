//! An answer being built from the engine's events: every choice of every
//! prompt ([`Choice`]), the prompts' echo, the usage, and the JSON of
//! OpenAI's completion and chat objects, whole or as stream chunks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::{HttpResponse, web};
use serde_json::{Value, json};

use super::ServeError;
use super::body::Endpoint;
use super::choice::{Choice, Names, Piece, chat_logprobs, completion_logprobs, token_text};
use crate::gemma::TokenLogprob;
use crate::gemma::engine::{Event, FinishReason};
use crate::tokenizer::Tokenizer;

/// What every object of the answer carries.
#[derive(Debug)]
pub struct Meta {
    /// `cmpl-…` or `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model's name.
    pub model: String,
    /// Which endpoint.
    pub endpoint: Endpoint,
}

/// A prompt as the answer shows it.
#[derive(Debug)]
pub struct Echo {
    /// Its token ids.
    pub ids: Vec<u32>,
    /// Its text, returned in front of each choice with `echo`.
    pub text: String,
}

/// Times a request's tokens into the server's histograms.
pub trait TokenClock: Send {
    /// A token arrived.
    fn token(&mut self);
    /// Seconds from the request's arrival to its first token, once there
    /// was one.
    fn first_token_s(&self) -> Option<f64>;
}

/// What the request log says about an answer.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Prompt tokens, over every prompt.
    pub prompt_tokens: usize,
    /// Tokens generated, over every choice.
    pub completion_tokens: usize,
    /// Each choice's finish reason (`-` where it has none), comma-separated.
    pub finish_reasons: String,
    /// Seconds to the first token.
    pub first_token_s: Option<f64>,
    /// The server's request timeout ended it.
    pub timed_out: bool,
}

/// How a streamed answer ended, for its log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Every choice finished.
    Done,
    /// The request timeout cut it.
    TimedOut,
    /// The engine failed it (an error event ended the stream).
    Failed,
    /// The client left before the end.
    ClientLeft,
}

impl Ending {
    /// The log's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::TimedOut => "timed out",
            Self::Failed => "failed",
            Self::ClientLeft => "client left",
        }
    }
}

/// Called once when a stream ends, however it ends.
pub type OnEnd = Box<dyn FnOnce(Summary, Ending) + Send>;

/// The answer to one request.
pub struct Answer {
    meta: Meta,
    tokenizer: Arc<Tokenizer>,
    prompts: Vec<Echo>,
    /// Per prompt, with `echo` and `logprobs`: its tokens' pieces.
    echoed: Vec<Option<Vec<Piece>>>,
    choices: Vec<Choice>,
    n: usize,
    stop: Arc<[String]>,
    hidden: Arc<[u32]>,
    logprobs: bool,
    tokens_as_ids: bool,
    echo: bool,
    include_usage: bool,
    /// Set for a choice a stop string ended: its sink tells the engine.
    ended: Arc<[AtomicBool]>,
    clock: Box<dyn TokenClock>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("id", &self.meta.id)
            .field("choices", &self.choices.len())
            .finish()
    }
}

/// How an answer is asked for.
#[derive(Debug)]
pub struct Shape {
    /// Choices per prompt.
    pub n: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Tokens that end a choice and show no text.
    pub hidden: Vec<u32>,
    /// Log-probabilities were asked for.
    pub logprobs: bool,
    /// Tokens in the listings are named `token_id:<id>`.
    pub tokens_as_ids: bool,
    /// The prompt goes in front of the text.
    pub echo: bool,
    /// A last stream chunk with the usage.
    pub include_usage: bool,
}

impl Answer {
    /// An answer to `prompts`, each with `shape.n` choices.
    pub fn new(
        meta: Meta,
        tokenizer: Arc<Tokenizer>,
        prompts: Vec<Echo>,
        shape: Shape,
        ended: Arc<[AtomicBool]>,
        clock: Box<dyn TokenClock>,
    ) -> Self {
        let choices = (0..prompts.len() * shape.n).map(Choice::new).collect();
        let echoed = prompts
            .iter()
            .map(|p| (shape.echo && !shape.logprobs).then(|| pieces_of(&tokenizer, &p.ids, None)))
            .collect();
        Self {
            meta,
            tokenizer,
            echoed,
            prompts,
            choices,
            n: shape.n,
            stop: shape.stop.into(),
            hidden: shape.hidden.into(),
            logprobs: shape.logprobs,
            tokens_as_ids: shape.tokens_as_ids,
            echo: shape.echo,
            include_usage: shape.include_usage,
            ended,
            clock,
        }
    }

    /// Whether every choice has finished.
    pub fn done(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    /// Ends every unfinished choice with `length` (the request timeout):
    /// the engine stops each at its next token. The indices it ended.
    fn cut(&mut self) -> Vec<usize> {
        let mut cut = Vec::new();
        for (k, c) in self.choices.iter_mut().enumerate() {
            self.ended[k].store(true, Ordering::SeqCst);
            if c.finish.is_none() {
                c.end("length", &self.stop);
                cut.push(k);
            }
        }
        cut
    }

    /// What the request log says about it.
    pub fn summary(&self, timed_out: bool) -> Summary {
        Summary {
            prompt_tokens: self.prompts.iter().map(|p| p.ids.len()).sum(),
            completion_tokens: self.choices.iter().map(|c| c.generated).sum(),
            finish_reasons: self
                .choices
                .iter()
                .map(|c| c.finish.unwrap_or("-"))
                .collect::<Vec<_>>()
                .join(","),
            first_token_s: self.clock.first_token_s(),
            timed_out,
        }
    }

    /// Applies prompt `p`'s event; the index of the choice it changed.
    fn apply(&mut self, p: usize, event: Event) -> Result<Option<usize>, ServeError> {
        match event {
            Event::Prompt(scored) => {
                let ids = &self.prompts[p].ids;
                self.echoed[p] = Some(pieces_of(&self.tokenizer, ids, Some(scored)));
                Ok(None)
            }
            Event::Token {
                choice,
                id,
                logprob,
            } => {
                self.clock.token();
                let k = p * self.n + choice;
                let c = &mut self.choices[k];
                let logprob = if self.logprobs { logprob } else { None };
                if !c.token(&self.tokenizer, id, logprob, &self.stop, &self.hidden) {
                    self.ended[k].store(true, Ordering::SeqCst);
                }
                Ok(Some(k))
            }
            Event::Finished { choice, reason, .. } => {
                let k = p * self.n + choice;
                let reason = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                };
                self.choices[k].end(reason, &self.stop);
                Ok(Some(k))
            }
            Event::Failed(reason) => Err(ServeError::Failed { reason }),
        }
    }

    fn names(&self) -> Names<'_> {
        Names {
            tokenizer: &self.tokenizer,
            as_ids: self.tokens_as_ids,
        }
    }

    fn usage(&self) -> Value {
        let prompt: usize = self.prompts.iter().map(|p| p.ids.len()).sum();
        let completion: usize = self.choices.iter().map(|c| c.generated).sum();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        })
    }

    fn object(&self, choices: Vec<Value>, streamed: bool) -> Value {
        let object = match (self.meta.endpoint, streamed) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        };
        let mut value = json!({
            "id": self.meta.id,
            "object": object,
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if !streamed {
            value["usage"] = self.usage();
        } else if self.include_usage {
            value["usage"] = Value::Null;
        }
        value
    }

    /// The echoed prompt's text and pieces in front of choice `k`.
    fn echo_of(&self, k: usize) -> (&str, &[Piece]) {
        let p = k / self.n;
        let pieces = self.echoed[p].as_deref().unwrap_or(&[]);
        (&self.prompts[p].text, pieces)
    }

    /// The whole answer's JSON.
    fn whole(&self) -> Value {
        let choices = self
            .choices
            .iter()
            .map(|c| match self.meta.endpoint {
                Endpoint::Completions => {
                    let (prefix, echoed) = if self.echo {
                        self.echo_of(c.index)
                    } else {
                        ("", &[][..])
                    };
                    let logprobs = self.logprobs.then(|| {
                        let shift = prefix.chars().count();
                        let mut all = echoed.to_vec();
                        all.extend(c.pieces.iter().map(|p| Piece {
                            offset: p.offset + shift,
                            ..p.clone()
                        }));
                        completion_logprobs(self.names(), &all, 0)
                    });
                    json!({
                        "index": c.index,
                        "text": format!("{prefix}{}", c.text),
                        "logprobs": logprobs,
                        "finish_reason": c.finish,
                    })
                }
                Endpoint::Chat => json!({
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": null},
                    "logprobs": self.logprobs.then(|| chat_logprobs(self.names(), &c.pieces)),
                    "finish_reason": c.finish,
                }),
            })
            .collect();
        self.object(choices, false)
    }

    /// Stream chunks for choice `k`'s new text (none when nothing is new).
    fn chunk(&mut self, k: usize) -> Option<Value> {
        let d = self.choices[k].delta();
        if d.text.is_empty() && d.pieces.is_empty() && d.finish.is_none() {
            return None;
        }
        let choice = match self.meta.endpoint {
            Endpoint::Completions => json!({
                "index": k,
                "text": d.text,
                "logprobs": self.logprobs.then(|| {
                    let shift = if self.echo { self.prompts[k / self.n].text.chars().count() } else { 0 };
                    completion_logprobs(self.names(), &d.pieces, shift)
                }),
                "finish_reason": d.finish,
            }),
            Endpoint::Chat => {
                let delta = if d.text.is_empty() && d.finish.is_some() {
                    json!({})
                } else {
                    json!({"content": d.text})
                };
                json!({
                    "index": k,
                    "delta": delta,
                    "logprobs": self.logprobs.then(|| chat_logprobs(self.names(), &d.pieces)),
                    "finish_reason": d.finish,
                })
            }
        };
        Some(self.object(vec![choice], true))
    }

    /// The chunks a stream starts with: chat's role, or the echoed prompts
    /// (whose log-probabilities come later, with the prompt's event).
    fn opening(&self) -> Vec<Value> {
        match self.meta.endpoint {
            Endpoint::Chat => (0..self.choices.len())
                .map(|k| {
                    let choice = json!({
                        "index": k,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": null,
                        "finish_reason": null,
                    });
                    self.object(vec![choice], true)
                })
                .collect(),
            Endpoint::Completions if self.echo && !self.logprobs => (0..self.choices.len())
                .map(|k| self.echo_chunk(k))
                .collect(),
            Endpoint::Completions => Vec::new(),
        }
    }

    fn echo_chunk(&self, k: usize) -> Value {
        let (text, pieces) = self.echo_of(k);
        let choice = json!({
            "index": k,
            "text": text,
            "logprobs": self.logprobs.then(|| completion_logprobs(self.names(), pieces, 0)),
            "finish_reason": null,
        });
        self.object(vec![choice], true)
    }
}

/// A prompt's tokens as pieces: offsets from their texts, and (with
/// `scored`) every token's log-probability but the first's.
fn pieces_of(tokenizer: &Tokenizer, ids: &[u32], scored: Option<Vec<TokenLogprob>>) -> Vec<Piece> {
    let mut scored = scored.map(Vec::into_iter);
    let mut offset = 0;
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            let logprob = match (&mut scored, i) {
                (Some(s), i) if i > 0 => s.next(),
                _ => None,
            };
            let piece = Piece {
                id,
                offset,
                logprob,
            };
            offset += token_text(tokenizer, id).chars().count();
            piece
        })
        .collect()
}

/// Events of every prompt, tagged with the prompt's index.
pub type Events = tokio::sync::mpsc::UnboundedReceiver<(usize, Event)>;

/// Waits for every choice and answers with one JSON object; at the
/// `deadline` (the request timeout) the unfinished choices end with
/// `length`, and the answer holds what they had.
pub async fn whole(
    mut answer: Answer,
    mut rx: Events,
    deadline: Option<tokio::time::Instant>,
) -> Result<(Value, Summary), ServeError> {
    let mut timed_out = false;
    while !answer.done() {
        let event = match deadline {
            Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                Ok(event) => event,
                Err(_) => {
                    answer.cut();
                    timed_out = true;
                    break;
                }
            },
            None => rx.recv().await,
        };
        let Some((p, event)) = event else {
            return Err(ServeError::Failed {
                reason: "the engine stopped before the request finished".into(),
            });
        };
        answer.apply(p, event)?;
    }
    Ok((answer.whole(), answer.summary(timed_out)))
}

/// Streams the answer as server-sent events: each choice's text as it
/// becomes final, its last chunk with `finish_reason`, with
/// `include_usage` a last chunk with no choices and the usage, then
/// `[DONE]`. At the `deadline` (the request timeout) the unfinished
/// choices end with `length`. `on_end` runs once when the stream ends or
/// is dropped (the client left).
pub fn stream(
    answer: Answer,
    rx: Events,
    deadline: Option<tokio::time::Instant>,
    on_end: OnEnd,
) -> HttpResponse {
    struct Progress {
        answer: Answer,
        rx: Events,
        queue: VecDeque<web::Bytes>,
        over: bool,
        deadline: Option<tokio::time::Instant>,
        ending: Ending,
        on_end: Option<OnEnd>,
    }
    impl Drop for Progress {
        fn drop(&mut self) {
            if let Some(on_end) = self.on_end.take() {
                let timed_out = self.ending == Ending::TimedOut;
                if !self.over {
                    // Dropped before the end: the client left. Every choice
                    // stops at its next token.
                    self.answer.cut();
                }
                on_end(self.answer.summary(timed_out), self.ending);
            }
        }
    }
    fn sse(value: &Value) -> web::Bytes {
        web::Bytes::from(format!("data: {value}\n\n"))
    }
    let queue = answer.opening().iter().map(sse).collect();
    let start = Progress {
        answer,
        rx,
        queue,
        over: false,
        deadline,
        ending: Ending::ClientLeft,
        on_end: Some(on_end),
    };
    let events = futures_util::stream::unfold(start, |mut p| async move {
        loop {
            if let Some(bytes) = p.queue.pop_front() {
                return Some((Ok::<_, actix_web::Error>(bytes), p));
            }
            if p.over {
                return None;
            }
            if p.answer.done() {
                p.over = true;
                if p.ending == Ending::ClientLeft {
                    p.ending = Ending::Done;
                }
                if p.answer.include_usage {
                    let mut last = p.answer.object(Vec::new(), true);
                    last["usage"] = p.answer.usage();
                    p.queue.push_back(sse(&last));
                }
                p.queue
                    .push_back(web::Bytes::from_static(b"data: [DONE]\n\n"));
                continue;
            }
            let next = match p.deadline {
                Some(at) => tokio::time::timeout_at(at, p.rx.recv()).await,
                None => Ok(p.rx.recv().await),
            };
            let Ok(next) = next else {
                // The request timeout: the unfinished choices end here.
                p.ending = Ending::TimedOut;
                for k in p.answer.cut() {
                    if let Some(chunk) = p.answer.chunk(k) {
                        p.queue.push_back(sse(&chunk));
                    }
                }
                continue;
            };
            let Some((prompt, event)) = next else {
                p.over = true;
                p.ending = Ending::Failed;
                let err = ServeError::Failed {
                    reason: "the engine stopped before the request finished".into(),
                };
                p.queue.push_back(sse(&error_body(&err)));
                continue;
            };
            let is_prompt = matches!(event, Event::Prompt(_));
            match p.answer.apply(prompt, event) {
                Ok(Some(k)) => {
                    if let Some(chunk) = p.answer.chunk(k) {
                        p.queue.push_back(sse(&chunk));
                    }
                }
                Ok(None) if is_prompt && p.answer.echo => {
                    let n = p.answer.n;
                    for k in prompt * n..(prompt + 1) * n {
                        let chunk = p.answer.echo_chunk(k);
                        p.queue.push_back(sse(&chunk));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    p.over = true;
                    p.ending = Ending::Failed;
                    p.queue.push_back(sse(&error_body(&e)));
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(events)
}

/// OpenAI's error object for `error`.
pub fn error_body(error: &ServeError) -> Value {
    json!({
        "error": {
            "message": error.to_string(),
            "type": error.error_type(),
            "param": error.param(),
            "code": error.code(),
        }
    })
}
