//! The OpenAI-compatible HTTP server (actix-web) in front of the
//! continuous-batching engine ([`crate::gemma::engine`]).
//!
//! - `POST /v1/completions` and `POST /v1/chat/completions`, both with
//!   `"stream": true` as server-sent events (`data: {…}` chunks, the last
//!   one with `usage`, then `data: [DONE]`);
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus: requests
//!   by status, running and waiting requests, KV cache bytes,
//!   time-to-first-token and inter-token latency, generated tokens);
//! - an optional bearer token;
//! - errors in OpenAI's shape (`{"error":{"message","type","param","code"}}`):
//!   bad JSON or parameters 400, wrong token 401, unknown model 404, queue
//!   full 429, engine gone 503. A client that disconnects ends its request
//!   and frees its KV cache.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

use super::ServeError;
use super::answer::{self, Answer, Echo, Ending, Meta, Shape, Summary, TokenClock};
use super::body::{self, Endpoint, Generation, Input, Prompt, Tokenize};
use super::choice::token_text;
use crate::gemma::Gemma;
use crate::gemma::chat;
use crate::gemma::constrain::{Grammar, Guide};
use crate::gemma::engine::{Engine, EngineConfig, Event, Rejected, Request};
use crate::tokenizer::Tokenizer;

/// What `dima serve` runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The name clients use in `"model"` (and `/v1/models` lists).
    pub model_name: String,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Bearer token required on every `/v1` request, if set.
    pub api_key: Option<String>,
    /// Engine limits.
    pub engine: EngineConfig,
    /// Stop gracefully on SIGINT/SIGTERM (`dima serve`); off where the
    /// process handles signals itself (`dima up`).
    pub handle_signals: bool,
    /// With a key: `/health` answers without it.
    pub public_health: bool,
    /// With a key: `/metrics` answers without it.
    pub public_metrics: bool,
    /// Most tokens one request may ask for (`max_tokens`); `None`: the
    /// model's context.
    pub max_tokens_cap: Option<usize>,
    /// How long a client may take to send a request's body (a slower one
    /// gets a 408).
    pub body_timeout: std::time::Duration,
    /// `/health` says `degraded` once the oldest waiting request has waited
    /// this long.
    pub degraded_after: std::time::Duration,
    /// How long a new connection may take to send its first request's
    /// headers (a slower one gets a 408 in OpenAI's shape and is closed).
    pub header_timeout: std::time::Duration,
    /// A generation request running longer is ended: its unfinished
    /// choices finish with `length`, and the log says `timed_out`. `None`:
    /// no limit.
    pub request_timeout: Option<std::time::Duration>,
    /// Most open connections; beyond, the server stops accepting until one
    /// closes.
    pub max_connections: usize,
    /// Most generation requests (streamed or not) one client address may
    /// have running or waiting at once; beyond, a 429. 0: no limit.
    pub max_streams_per_client: usize,
}

struct State {
    engine: Engine,
    /// Shared with every streaming response (a vocabulary is large to copy).
    tokenizer: Arc<Tokenizer>,
    /// How conversations become prompts.
    template: chat::ChatTemplate,
    /// Constrained decoding over the vocabulary, built on first use.
    guide: std::sync::OnceLock<Result<Guide, String>>,
    name: String,
    api_key: Option<String>,
    public_health: bool,
    public_metrics: bool,
    max_tokens_cap: Option<usize>,
    body_timeout: std::time::Duration,
    degraded_after: std::time::Duration,
    request_timeout: Option<std::time::Duration>,
    max_streams_per_client: usize,
    /// Generation requests in progress per client address.
    streams: Arc<Mutex<HashMap<IpAddr, usize>>>,
    next_id: AtomicU64,
    metrics: Metrics,
}

/// A client address's place among its concurrent generation requests
/// (`--max-streams-per-client`), given back on drop.
struct StreamSlot {
    streams: Arc<Mutex<HashMap<IpAddr, usize>>>,
    client: IpAddr,
}

impl StreamSlot {
    /// Takes a place for `client`, or says the limit is reached.
    fn take(state: &State, client: Option<IpAddr>) -> Result<Option<Self>, ServeError> {
        let (limit, Some(client)) = (state.max_streams_per_client, client) else {
            return Ok(None);
        };
        if limit == 0 {
            return Ok(None);
        }
        let mut streams = state.streams.lock().unwrap_or_else(|e| e.into_inner());
        let count = streams.entry(client).or_insert(0);
        if *count >= limit {
            return Err(ServeError::TooManyStreams { client, limit });
        }
        *count += 1;
        Ok(Some(Self {
            streams: Arc::clone(&state.streams),
            client,
        }))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = streams.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                streams.remove(&self.client);
            }
        }
    }
}

/// The server's Prometheus metrics (`GET /metrics`).
#[derive(Clone)]
struct Metrics {
    registry: prometheus::Registry,
    requests: prometheus::IntCounterVec,
    running: prometheus::IntGauge,
    waiting: prometheus::IntGauge,
    kv_bytes: prometheus::IntGauge,
    first_token: prometheus::Histogram,
    inter_token: prometheus::Histogram,
    tokens: prometheus::IntCounter,
    prefix_queries: prometheus::IntCounter,
    prefix_hits: prometheus::IntCounter,
    preemptions: prometheus::IntCounter,
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
        let registry = prometheus::Registry::new();
        let buckets = |from: f64| prometheus::exponential_buckets(from, 2.0, 14);
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("dima_serve_requests_total", "HTTP requests by status code"),
                &["status"],
            )?,
            running: IntGauge::new("dima_serve_requests_running", "Requests decoding now")?,
            waiting: IntGauge::new(
                "dima_serve_requests_waiting",
                "Requests waiting for a place",
            )?,
            kv_bytes: IntGauge::new(
                "dima_serve_kv_cache_bytes",
                "KV cache bytes held by the running requests",
            )?,
            first_token: Histogram::with_opts(
                HistogramOpts::new(
                    "dima_serve_time_to_first_token_seconds",
                    "From a request's arrival to its first token",
                )
                .buckets(buckets(0.005)?),
            )?,
            inter_token: Histogram::with_opts(
                HistogramOpts::new(
                    "dima_serve_inter_token_latency_seconds",
                    "Between consecutive tokens of a request",
                )
                .buckets(buckets(0.001)?),
            )?,
            tokens: IntCounter::new("dima_serve_generated_tokens_total", "Tokens generated")?,
            prefix_queries: IntCounter::new(
                "dima_serve_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache",
            )?,
            prefix_hits: IntCounter::new(
                "dima_serve_prefix_cache_hits_total",
                "Prompt tokens reused from the prefix cache instead of computed",
            )?,
            preemptions: IntCounter::new(
                "dima_serve_preemptions_total",
                "Running choices preempted (caches freed, recomputed later) because KV ran short",
            )?,
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.running.clone()))?;
        m.registry.register(Box::new(m.waiting.clone()))?;
        m.registry.register(Box::new(m.kv_bytes.clone()))?;
        m.registry.register(Box::new(m.first_token.clone()))?;
        m.registry.register(Box::new(m.inter_token.clone()))?;
        m.registry.register(Box::new(m.tokens.clone()))?;
        m.registry.register(Box::new(m.prefix_queries.clone()))?;
        m.registry.register(Box::new(m.prefix_hits.clone()))?;
        m.registry.register(Box::new(m.preemptions.clone()))?;
        Ok(m)
    }
}

/// Times a request's tokens into the histograms.
struct Clock {
    metrics: Metrics,
    arrived: std::time::Instant,
    first: Option<f64>,
    last: Option<std::time::Instant>,
}

impl TokenClock for Clock {
    fn token(&mut self) {
        let now = std::time::Instant::now();
        match self.last {
            None => {
                let first = (now - self.arrived).as_secs_f64();
                self.first = Some(first);
                self.metrics.first_token.observe(first);
            }
            Some(last) => self.metrics.inter_token.observe((now - last).as_secs_f64()),
        }
        self.metrics.tokens.inc();
        self.last = Some(now);
    }

    fn first_token_s(&self) -> Option<f64> {
        self.first
    }
}

/// Request ids: `req-1`, `req-2`, … over the server's life.
static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

fn next_request_id() -> String {
    format!("req-{}", REQUEST_IDS.fetch_add(1, Ordering::Relaxed))
}

/// Who asked what, and when: what a request's log line starts from. The
/// middleware puts it in the request's extensions; a stream takes it along
/// and writes the line when it ends.
#[derive(Clone, Debug)]
struct Logbook {
    id: String,
    method: String,
    route: String,
    client: String,
    started: std::time::Instant,
}

impl Logbook {
    /// The request's one line on the `dima::requests` target.
    fn write(&self, status: u16, summary: &Summary, ending: Option<Ending>) {
        tracing::info!(
            target: "dima::requests",
            request_id = %self.id,
            method = %self.method,
            route = %self.route,
            status,
            client = %self.client,
            total_s = self.started.elapsed().as_secs_f64(),
            time_to_first_token_s = summary.first_token_s.unwrap_or(f64::NAN),
            prompt_tokens = summary.prompt_tokens,
            completion_tokens = summary.completion_tokens,
            finish_reasons = %summary.finish_reasons,
            timed_out = summary.timed_out,
            stream = ending.map_or("", Ending::as_str),
            "request"
        );
    }
}

/// Marks a response whose stream writes its own log line at its end.
#[derive(Clone, Copy, Debug)]
struct LogsAtEnd;

/// Gives every request an id (`x-request-id` on every response, and
/// `request_id` in every error body) and writes one structured line per
/// request to the `dima::requests` log target: id, method, route, status,
/// client address, total seconds, and for answers the prompt and completion
/// tokens, time to first token, finish reasons and whether the request
/// timeout cut it. A stream's line is written when the stream ends, with
/// how it ended.
async fn request_log(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<actix_web::body::BoxBody>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    use actix_web::HttpMessage as _;
    if let Some(watch) = req.conn_data::<HeadWatch>() {
        watch.0.set(true);
    }
    let id = next_request_id();
    let book = Logbook {
        id: id.clone(),
        method: req.method().to_string(),
        route: req.path().to_owned(),
        client: req
            .peer_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
        started: std::time::Instant::now(),
    };
    req.extensions_mut().insert(book.clone());
    let res = next.call(req).await?;
    let status = res.status();
    let logs_at_end = res.response().extensions().get::<LogsAtEnd>().is_some();
    let facts = res
        .response()
        .extensions()
        .get::<Summary>()
        .cloned()
        .unwrap_or_default();
    let (req, response) = res.into_parts();
    let (mut response, body) = response.into_parts();
    let body = if status.is_client_error() || status.is_server_error() {
        // Error bodies are small and whole: the id goes into them.
        let bytes = actix_web::body::to_bytes(body).await.unwrap_or_default();
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(mut v) => {
                if let Some(error) = v.get_mut("error").and_then(Value::as_object_mut) {
                    error.insert("request_id".into(), Value::String(id.clone()));
                }
                actix_web::body::BoxBody::new(v.to_string())
            }
            Err(_) => actix_web::body::BoxBody::new(bytes),
        }
    } else {
        body
    };
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&id) {
        response.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("x-request-id"),
            value,
        );
    }
    if !logs_at_end {
        book.write(status.as_u16(), &facts, None);
    }
    Ok(actix_web::dev::ServiceResponse::new(
        req,
        response.set_body(body),
    ))
}

/// Set once a connection's first request has its headers: until then the
/// header timeout may answer a 408 on the raw socket.
struct HeadWatch(std::rc::Rc<std::cell::Cell<bool>>);

/// After `timeout`, answers a connection that has not sent its first
/// request's headers with a 408 in OpenAI's shape and closes it. Runs on
/// the connection's worker thread, like the connection itself, so the
/// connection cannot close between the check that it is still open (its
/// `HeadWatch` alive) and the write.
fn watch_head(
    fd: std::os::fd::RawFd,
    seen: std::rc::Weak<std::cell::Cell<bool>>,
    timeout: std::time::Duration,
) {
    actix_web::rt::spawn(async move {
        actix_web::rt::time::sleep(timeout).await;
        let Some(seen) = seen.upgrade() else {
            return;
        };
        if seen.get() {
            return;
        }
        let id = next_request_id();
        let error = ServeError::HeaderTimeout {
            seconds: timeout.as_secs_f64(),
        };
        let mut body = answer::error_body(&error);
        body["error"]["request_id"] = Value::String(id.clone());
        let body = body.to_string();
        let response = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        // SAFETY: `fd` is the socket of a connection still open (its
        // `HeadWatch` is alive, and only this thread could drop it); `send`
        // reads `response.len()` bytes from it and never blocks.
        unsafe {
            libc::send(
                fd,
                response.as_ptr().cast(),
                response.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
        tracing::info!(
            target: "dima::requests",
            request_id = %id,
            status = 408,
            timeout_s = timeout.as_secs_f64(),
            "request headers too slow: connection closed"
        );
    });
}

/// The raw socket of a request's connection (held open by the server for
/// as long as the request runs).
#[derive(Clone, Copy, Debug)]
struct ClientSocket(std::os::fd::RawFd);

impl ClientSocket {
    /// Whether the client has closed its side (FIN or RST): a peek at the
    /// socket reads end-of-stream or fails with anything but "would block".
    /// Bytes waiting (a pipelined next request) mean it is still there.
    fn gone(self) -> bool {
        let mut byte = 0u8;
        // SAFETY: `self.0` is the socket of the connection this request
        // arrived on, which the server keeps open until the request's
        // response is done; `recv` writes at most one byte into `byte`,
        // and MSG_PEEK | MSG_DONTWAIT neither consumes data nor blocks.
        let read = unsafe {
            libc::recv(
                self.0,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match read {
            0 => true,
            n if n > 0 => false,
            _ => {
                let e = std::io::Error::last_os_error();
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                )
            }
        }
    }
}

/// The error's answer in OpenAI's shape.
fn error_response(error: &ServeError) -> HttpResponse {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    if let ServeError::MethodNotAllowed { allowed, .. } = error {
        response.insert_header(("allow", *allowed));
    }
    // A full queue or a lost rank: try again, and say when.
    if matches!(status.as_u16(), 429 | 503) {
        response.insert_header(("retry-after", "1"));
    }
    response.json(answer::error_body(error))
}

/// How often a request that answers at the end checks that its client is
/// still connected.
const CLIENT_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// The most bytes a request body may have.
const MAX_BODY: usize = 1 << 22;

/// Reads the body up to [`MAX_BODY`] bytes (a larger one is a 413 in the
/// OpenAI error shape, not the framework's plain-text answer).
async fn read_body(mut payload: web::Payload) -> Result<web::BytesMut, ServeError> {
    use futures_util::StreamExt as _;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ServeError::Body {
            reason: e.to_string(),
        })?;
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ServeError::TooLarge { limit: MAX_BODY });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn bad_request(message: impl Into<String>) -> ServeError {
    ServeError::bad_request(message)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks the bearer token; `Some(response)` when it is wrong.
fn unauthorized(state: &State, req: &HttpRequest) -> Option<ServeError> {
    let key = state.api_key.as_ref()?;
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is
    // compared in constant time.
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let ok = given.is_some_and(|token| same_secret(token.as_bytes(), key.as_bytes()));
    (!ok).then_some(ServeError::Unauthorized)
}

/// Whether two secrets are equal, in time that depends only on their
/// lengths (the SHA-256 digests are compared byte by byte, all of them).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest as _;
    let (da, db) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Parses the body and checks the model name and token.
fn body_of(state: &State, req: &HttpRequest, bytes: &[u8]) -> Result<Value, ServeError> {
    json_of(state, req, bytes, true)
}

/// [`body_of`], where `model` may be left out unless `model_required`.
fn json_of(
    state: &State,
    req: &HttpRequest,
    bytes: &[u8],
    model_required: bool,
) -> Result<Value, ServeError> {
    if let Some(denied) = unauthorized(state, req) {
        return Err(denied);
    }
    let body: Value = serde_json::from_slice(bytes)
        .map_err(|e| bad_request(format!("the body is not valid JSON: {e}")))?;
    if !body.is_object() {
        return Err(bad_request("the body must be a JSON object"));
    }
    match body.get("model").and_then(Value::as_str) {
        Some(m) if m == state.name => Ok(body),
        Some(m) => Err(ServeError::ModelNotFound {
            requested: m.to_owned(),
            served: state.name.clone(),
        }),
        None if !model_required && body.get("model").is_none_or(Value::is_null) => Ok(body),
        None => Err(ServeError::invalid(
            "model",
            "`model` is required (a string)",
        )),
    }
}

/// Reads a small JSON body for the tokenizer routes.
async fn small_json(
    state: &State,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Value, ServeError> {
    let bytes = read_body(payload).await?;
    json_of(state, req, &bytes, false)
}

/// Counts a response into the requests metric.
fn counted(state: &State, response: HttpResponse) -> HttpResponse {
    state
        .metrics
        .requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    response
}

/// `POST /tokenize` (vLLM's shape): `{"count", "max_model_len",
/// "tokens", "token_strs"}` of a prompt or of chat messages rendered with
/// the chat template.
async fn tokenize(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let answered = async {
        let body = Tokenize::from_body(small_json(&state, &req, payload).await?)?;
        let ids = match &body.input {
            Input::Prompts {
                prompts,
                add_special_tokens,
            } => match prompts.first() {
                Some(Prompt::Text(text)) => {
                    state.tokenizer.encode(text, *add_special_tokens, false)
                }
                _ => Vec::new(),
            },
            chat => prepare_chat(&state, chat)?,
        };
        let strs = body.return_token_strs.then(|| {
            ids.iter()
                .map(|&id| token_text(&state.tokenizer, id))
                .collect::<Vec<_>>()
        });
        Ok::<_, ServeError>(HttpResponse::Ok().json(json!({
            "count": ids.len(),
            "max_model_len": state.engine.context(),
            "tokens": ids,
            "token_strs": strs,
        })))
    }
    .await;
    counted(&state, answered.unwrap_or_else(|e| error_response(&e)))
}

/// `POST /detokenize`: `{"prompt"}`, the text of `tokens`.
async fn detokenize(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let answered = async {
        let ids = body::detokenize(small_json(&state, &req, payload).await?)?;
        let vocab = state.tokenizer.len();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ServeError::invalid(
                "tokens",
                format!("`tokens` has {bad}; the vocabulary has {vocab} tokens"),
            ));
        }
        Ok(HttpResponse::Ok().json(json!({"prompt": state.tokenizer.decode(&ids)})))
    }
    .await;
    counted(&state, answered.unwrap_or_else(|e| error_response(&e)))
}

/// `GET /tokenizer_info`: what a client needs to tokenize as the server
/// does.
async fn tokenizer_info(state: web::Data<State>, req: HttpRequest) -> HttpResponse {
    if let Some(denied) = unauthorized(&state, &req) {
        return counted(&state, error_response(&denied));
    }
    let t = &state.tokenizer;
    let text = |id: u32| t.piece(id).map(str::to_owned);
    counted(
        &state,
        HttpResponse::Ok().json(json!({
            "tokenizer_class": "GemmaTokenizer",
            "vocab_size": t.len(),
            "model_max_length": state.engine.context(),
            "bos_token": text(t.bos()),
            "bos_token_id": t.bos(),
            "eos_token": text(crate::gemma::END_OF_GENERATION[0]),
            "eos_token_ids": crate::gemma::END_OF_GENERATION,
            "add_bos_token": true,
            "chat_template": state.template.source(),
            "chat_template_is_the_models": matches!(state.template, chat::ChatTemplate::Jinja { .. }),
        })),
    )
}

/// Chat messages as the chat template renders them, tokenized.
fn prepare_chat(state: &State, input: &Input) -> Result<Vec<u32>, ServeError> {
    let Input::Chat {
        messages,
        add_generation_prompt,
    } = input
    else {
        return Ok(Vec::new());
    };
    let turns: Vec<chat::Message<'_>> = messages
        .iter()
        .map(|t| chat::Message {
            role: t.role,
            content: &t.content,
        })
        .collect();
    state
        .template
        .encode(&state.tokenizer, &turns, *add_generation_prompt)
        .map_err(|e| ServeError::invalid("messages", e.to_string()))
}

async fn completions(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    respond(&state, &req, payload, Endpoint::Completions).await
}

async fn chat_completions(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    respond(&state, &req, payload, Endpoint::Chat).await
}

async fn respond(
    state: &web::Data<State>,
    req: &HttpRequest,
    payload: web::Payload,
    endpoint: Endpoint,
) -> HttpResponse {
    // A declared length over the limit is refused before reading.
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let body = match declared {
        Some(n) if n > MAX_BODY => Err(ServeError::TooLarge { limit: MAX_BODY }),
        _ => actix_web::rt::time::timeout(state.body_timeout, read_body(payload))
            .await
            .unwrap_or(Err(ServeError::BodyTimeout {
                seconds: state.body_timeout.as_secs_f64(),
            })),
    };
    let answered = match body {
        Ok(bytes) => answer(state, req, &bytes, endpoint).await,
        Err(e) => Err(e),
    };
    let response = match answered {
        Ok(response) => response,
        Err(e) => error_response(&e),
    };
    state
        .metrics
        .requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    response
}

async fn answer(
    state: &web::Data<State>,
    req: &HttpRequest,
    bytes: &[u8],
    endpoint: Endpoint,
) -> Result<HttpResponse, ServeError> {
    let body = body_of(state, req, bytes)?;
    let g = Generation::from_body(endpoint, body)?;
    let slot = StreamSlot::take(state, req.peer_addr().map(|a| a.ip()))?;
    let prompts = prepare(state, &g.input)?;
    let context = state.engine.context();
    let vocab = state.tokenizer.len();
    if let Some(&bad) = g.stop_token_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ServeError::invalid(
            "stop_token_ids",
            format!("`stop_token_ids` has {bad}; the vocabulary has {vocab} tokens"),
        ));
    }
    let length_param = match endpoint {
        Endpoint::Chat => "max_completion_tokens",
        Endpoint::Completions => "max_tokens",
    };
    if let Some(m) = g.max_tokens
        && m > context
    {
        return Err(ServeError::invalid(
            length_param,
            format!("`{length_param}` {m} is more than the model's context ({context} tokens)"),
        ));
    }
    if let (Some(m), Some(cap)) = (g.max_tokens, state.max_tokens_cap)
        && m > cap
    {
        return Err(ServeError::invalid(
            length_param,
            format!(
                "`{length_param}` {m} is more than this server allows per request ({cap}, --max-tokens-cap)"
            ),
        ));
    }
    let constraint = match &g.grammar {
        None => None,
        Some(grammar) => {
            let param = match grammar {
                Grammar::Lark(_) => "grammar",
                _ => "response_format",
            };
            let guide = state
                .guide
                .get_or_init(|| Guide::new(Arc::clone(&state.tokenizer)).map_err(|e| e.to_string()))
                .as_ref()
                .map_err(|e| ServeError::Failed { reason: e.clone() })?;
            Some(
                guide
                    .constraint(grammar)
                    .map_err(|e| ServeError::invalid(param, format!("`{param}`: {e}")))?,
            )
        }
    };
    let n = g.n;
    let batch = state.engine.config().max_batch;
    if n > batch {
        return Err(ServeError::invalid(
            "n",
            format!(
                "`n` is {n}; this server decodes at most {batch} sequences together (--max-batch)"
            ),
        ));
    }
    let ended: Arc<[AtomicBool]> = (0..prompts.len() * n)
        .map(|_| AtomicBool::new(false))
        .collect();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Event)>();
    for (p, prompt) in prompts.iter().enumerate() {
        let request = Request {
            prompt: prompt.ids.clone(),
            // Without a length: until end of generation or the context.
            max_tokens: g
                .max_tokens
                .unwrap_or(context.saturating_sub(prompt.ids.len())),
            sampling: g.sampling,
            n,
            stop_token_ids: g.stop_token_ids.clone(),
            logprobs: g.logprobs,
            prompt_logprobs: if g.echo { g.logprobs } else { None },
            constraint: constraint.clone(),
            ignore_eos: g.ignore_eos,
        };
        let (tx, ended_here) = (tx.clone(), Arc::clone(&ended));
        let sink = Box::new(move |e: Event| {
            if let Event::Token { choice, .. } | Event::Finished { choice, .. } = &e
                && ended_here[p * n + choice].load(Ordering::SeqCst)
            {
                return false;
            }
            tx.send((p, e)).is_ok()
        });
        if let Err(refused) = state.engine.submit(request, sink) {
            // The prompts already taken stop at their next token.
            for e in ended.iter() {
                e.store(true, Ordering::SeqCst);
            }
            return Err(match refused {
                Rejected::Invalid(message) => ServeError::invalid(
                    match endpoint {
                        Endpoint::Chat => "messages",
                        Endpoint::Completions => "prompt",
                    },
                    message,
                ),
                other => ServeError::Rejected(other),
            });
        }
    }
    drop(tx);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let meta = Meta {
        id: format!("{prefix}-{}", state.next_id.fetch_add(1, Ordering::Relaxed)),
        created: now(),
        model: state.name.clone(),
        endpoint,
    };
    let mut hidden = g.stop_token_ids.clone();
    hidden.extend(crate::gemma::END_OF_GENERATION);
    let shape = Shape {
        n,
        stop: g.stop.clone(),
        hidden,
        logprobs: g.logprobs.is_some(),
        tokens_as_ids: g.tokens_as_ids,
        echo: g.echo,
        include_usage: g.include_usage,
    };
    use actix_web::HttpMessage as _;
    let book = req.extensions().get::<Logbook>().cloned();
    let arrived = book
        .as_ref()
        .map_or_else(std::time::Instant::now, |b| b.started);
    let clock = Clock {
        metrics: state.metrics.clone(),
        arrived,
        first: None,
        last: None,
    };
    let deadline = state
        .request_timeout
        .map(|t| tokio::time::Instant::from_std(arrived + t));
    let answer = Answer::new(
        meta,
        Arc::clone(&state.tokenizer),
        prompts,
        shape,
        Arc::clone(&ended),
        Box::new(clock),
    );
    if g.stream {
        // A streaming client that leaves is found at the next write; the
        // stream writes the log line when it ends, and gives the client's
        // place back.
        let on_end: answer::OnEnd = Box::new(move |summary, ending| {
            drop(slot);
            if let Some(book) = book {
                book.write(200, &summary, Some(ending));
            }
        });
        let mut response = answer::stream(answer, rx, deadline, on_end);
        response.extensions_mut().insert(LogsAtEnd);
        Ok(response)
    } else {
        let socket = req.conn_data::<ClientSocket>().copied();
        let waiting = answer::whole(answer, rx, deadline);
        tokio::pin!(waiting);
        let mut every = actix_web::rt::time::interval(CLIENT_CHECK);
        loop {
            tokio::select! {
                done = &mut waiting => {
                    let (value, summary) = done?;
                    if summary.timed_out {
                        tracing::info!(
                            timeout_s = state.request_timeout.unwrap_or_default().as_secs_f64(),
                            "a request ran past the request timeout: its choices end with `length`"
                        );
                    }
                    let mut response = HttpResponse::Ok().json(value);
                    response.extensions_mut().insert(summary);
                    return Ok(response);
                }
                _ = every.tick() => {
                    if socket.is_some_and(ClientSocket::gone) {
                        // Every choice stops at its next token.
                        for e in ended.iter() {
                            e.store(true, Ordering::SeqCst);
                        }
                        tracing::info!("the client left before its answer: generation stopped");
                        return Err(ServeError::ClientGone);
                    }
                }
            }
        }
    }
}

/// The request's prompts as token ids (checked against the vocabulary and
/// the context) and the text `echo` shows.
fn prepare(state: &State, input: &Input) -> Result<Vec<Echo>, ServeError> {
    let tokenizer = &state.tokenizer;
    let context = state.engine.context();
    let vocab = tokenizer.len();
    let (param, prompts) = match input {
        // What clients send is text: special-token strings in it stay
        // text; only the chat template puts control tokens in.
        Input::Prompts {
            prompts,
            add_special_tokens,
        } => (
            "prompt",
            prompts
                .iter()
                .enumerate()
                .map(|(i, p)| match p {
                    Prompt::Text(text) => Ok(Echo {
                        ids: tokenizer.encode(text, *add_special_tokens, false),
                        text: text.clone(),
                    }),
                    Prompt::Ids(ids) => match ids.iter().find(|&&id| id as usize >= vocab) {
                        Some(bad) => Err(ServeError::invalid(
                            "prompt",
                            format!(
                                "`prompt[{i}]` has token id {bad}; the vocabulary has {vocab} tokens"
                            ),
                        )),
                        None => Ok(Echo {
                            ids: ids.clone(),
                            text: tokenizer.decode(ids),
                        }),
                    },
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        chat => {
            let ids = prepare_chat(state, chat)?;
            let text = tokenizer.decode(&ids);
            ("messages", vec![Echo { ids, text }])
        }
    };
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.is_empty() {
            return Err(ServeError::invalid(
                param,
                format!("`{param}[{i}]` is empty"),
            ));
        }
        if p.ids.len() >= context {
            return Err(ServeError::invalid(
                param,
                format!(
                    "the prompt has {} tokens; the model's context is {context}",
                    p.ids.len()
                ),
            ));
        }
    }
    Ok(prompts)
}

async fn models(state: web::Data<State>, req: HttpRequest) -> HttpResponse {
    if let Some(denied) = unauthorized(&state, &req) {
        return error_response(&denied);
    }
    HttpResponse::Ok().json(json!({
        "object": "list",
        "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "dima"}],
    }))
}

async fn health(state: web::Data<State>, req: HttpRequest) -> HttpResponse {
    if !state.public_health
        && let Some(denied) = unauthorized(&state, &req)
    {
        return error_response(&denied);
    }
    if let Some(reason) = state.engine.unavailable() {
        return HttpResponse::ServiceUnavailable().json(json!({
            "status": "unavailable",
            "model": state.name,
            "reason": reason,
        }));
    }
    // Still serving, but a request has waited past the bound: degraded
    // (a 200: the server works; a probe that wants it out reads `status`).
    let oldest = state.engine.oldest_wait();
    let status = if oldest > state.degraded_after {
        "degraded"
    } else {
        "ok"
    };
    HttpResponse::Ok().json(json!({
        "status": status,
        "model": state.name,
        "tensor_parallel": state.engine.world(),
        "running": state.engine.running(),
        "waiting": state.engine.waiting(),
        "oldest_wait_s": oldest.as_secs_f64(),
        "degraded_after_s": state.degraded_after.as_secs_f64(),
    }))
}

async fn metrics(state: web::Data<State>, req: HttpRequest) -> HttpResponse {
    if !state.public_metrics
        && let Some(denied) = unauthorized(&state, &req)
    {
        return error_response(&denied);
    }
    use prometheus::Encoder;
    let m = &state.metrics;
    m.running.set(state.engine.running() as i64);
    m.waiting.set(state.engine.waiting() as i64);
    m.kv_bytes.set(state.engine.kv_bytes() as i64);
    let (queries, hits) = state.engine.prefix_cache_counts();
    m.prefix_queries
        .inc_by((queries as u64).saturating_sub(m.prefix_queries.get()));
    m.prefix_hits
        .inc_by((hits as u64).saturating_sub(m.prefix_hits.get()));
    m.preemptions
        .inc_by((state.engine.preemptions() as u64).saturating_sub(m.preemptions.get()));
    let encoder = prometheus::TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&m.registry.gather(), &mut body) {
        Ok(()) => HttpResponse::Ok()
            .content_type(encoder.format_type())
            .body(body),
        Err(e) => HttpResponse::InternalServerError().body(format!("cannot encode metrics: {e}\n")),
    }
}

async fn wrong_method(path: &'static str, allowed: &'static str) -> HttpResponse {
    error_response(&ServeError::MethodNotAllowed { path, allowed })
}

async fn not_found() -> HttpResponse {
    error_response(&ServeError::NoSuchEndpoint)
}

/// A server running on its own thread.
pub struct Running {
    /// Where it listens.
    pub address: SocketAddr,
    state: web::Data<State>,
    handle: actix_web::dev::ServerHandle,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("address", &self.address)
            .finish()
    }
}

impl Running {
    /// Serves until the process is stopped (or the server fails).
    pub fn wait(self) -> Result<(), ServeError> {
        self.thread
            .join()
            .map_err(|_| ServeError::ServerPanicked)?
            .map_err(ServeError::Server)
    }

    /// Stops taking connections, lets open requests finish, then stops
    /// the engine (which finishes its requests and stops any ranks in
    /// other processes).
    pub fn stop(self) -> Result<(), ServeError> {
        futures_executor::block_on(self.handle.stop(true));
        let state = self.state.clone();
        let served = self.wait();
        state.engine.shutdown();
        served
    }
}

/// Starts serving `ranks` (every rank of the group, or rank 0 alone when
/// the others run in other processes) on a thread of its own; returns once
/// the server listens.
pub fn start(ranks: Vec<Gemma>, config: &ServeConfig) -> Result<Running, ServeError> {
    let Some(first) = ranks.first() else {
        return Err(ServeError::NoRank);
    };
    let tokenizer = first.tokenizer().clone();
    let listener = bind(config.listen)?;
    let engine = Engine::start(ranks, config.engine)?;
    start_engine(engine, tokenizer, listener, config)
}

/// Serves a running `engine` (any shard models: CPU ranks, or the model
/// on a GPU) on `listener`.
pub fn start_engine(
    engine: Engine,
    tokenizer: Tokenizer,
    listener: std::net::TcpListener,
    config: &ServeConfig,
) -> Result<Running, ServeError> {
    let tokenizer = Arc::new(tokenizer);
    let address = listener.local_addr().map_err(ServeError::Start)?;
    let template = match chat::ChatTemplate::from_source(tokenizer.chat_template()) {
        Ok(template) => template,
        Err(e) => {
            eprintln!("warning: {e}; chats use the built-in Gemma template");
            chat::ChatTemplate::BuiltIn
        }
    };
    let state = web::Data::new(State {
        engine,
        tokenizer,
        template,
        guide: std::sync::OnceLock::new(),
        name: config.model_name.clone(),
        api_key: config.api_key.clone(),
        public_health: config.public_health,
        public_metrics: config.public_metrics,
        max_tokens_cap: config.max_tokens_cap,
        body_timeout: config.body_timeout,
        degraded_after: config.degraded_after,
        request_timeout: config.request_timeout,
        max_streams_per_client: config.max_streams_per_client,
        streams: Arc::default(),
        next_id: AtomicU64::new(1),
        metrics: Metrics::new()?,
    });
    eprintln!(
        "serving {} on http://{address} (tensor-parallel {}, max batch {}, max waiting {}, \
         max tokens in flight {})",
        config.model_name,
        state.engine.world(),
        config.engine.max_batch,
        config.engine.max_waiting,
        config.engine.max_tokens_in_flight,
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let handle_signals = config.handle_signals;
    let header_timeout = config.header_timeout;
    // actix's own header timer answers an empty 408: it is only the
    // backstop behind `watch_head`'s.
    let backstop = header_timeout * 2 + std::time::Duration::from_secs(1);
    const WORKERS: usize = 2;
    let per_worker = config.max_connections.div_ceil(WORKERS).max(1);
    let kept = state.clone();
    let thread = std::thread::Builder::new()
        .name("dima-http".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .wrap(actix_web::middleware::from_fn(request_log))
                        .app_data(state.clone())
                        .service(
                            web::resource("/v1/completions")
                                .route(web::post().to(completions))
                                .default_service(web::to(|| {
                                    wrong_method("/v1/completions", "POST")
                                })),
                        )
                        .service(
                            web::resource("/v1/chat/completions")
                                .route(web::post().to(chat_completions))
                                .default_service(web::to(|| {
                                    wrong_method("/v1/chat/completions", "POST")
                                })),
                        )
                        .service(
                            web::resource("/tokenize")
                                .route(web::post().to(tokenize))
                                .default_service(web::to(|| wrong_method("/tokenize", "POST"))),
                        )
                        .service(
                            web::resource("/detokenize")
                                .route(web::post().to(detokenize))
                                .default_service(web::to(|| wrong_method("/detokenize", "POST"))),
                        )
                        .service(
                            web::resource("/tokenizer_info")
                                .route(web::get().to(tokenizer_info))
                                .default_service(web::to(|| {
                                    wrong_method("/tokenizer_info", "GET")
                                })),
                        )
                        .service(
                            web::resource("/v1/models")
                                .route(web::get().to(models))
                                .default_service(web::to(|| wrong_method("/v1/models", "GET"))),
                        )
                        .service(
                            web::resource("/health")
                                .route(web::get().to(health))
                                .default_service(web::to(|| wrong_method("/health", "GET"))),
                        )
                        .service(
                            web::resource("/metrics")
                                .route(web::get().to(metrics))
                                .default_service(web::to(|| wrong_method("/metrics", "GET"))),
                        )
                        .default_service(web::to(not_found))
                })
                .workers(WORKERS)
                .max_connections(per_worker)
                .client_request_timeout(backstop)
                // Each connection's socket, so a waiting request can see
                // its client leave (`client_gone`), and its header timer.
                .on_connect(move |connection, data| {
                    use std::os::fd::AsRawFd as _;
                    if let Some(socket) = connection.downcast_ref::<actix_web::rt::net::TcpStream>()
                    {
                        let fd = socket.as_raw_fd();
                        data.insert(ClientSocket(fd));
                        let seen = std::rc::Rc::new(std::cell::Cell::new(false));
                        watch_head(fd, std::rc::Rc::downgrade(&seen), header_timeout);
                        data.insert(HeadWatch(seen));
                    }
                });
                let server = if handle_signals {
                    server
                } else {
                    server.disable_signals()
                };
                let server = server.listen(listener)?.run();
                let _ = tx.send(server.handle());
                server.await
            })
        })
        .map_err(ServeError::Start)?;
    let Ok(handle) = rx.recv() else {
        // The thread ended before the server ran: its error says why.
        return match thread.join() {
            Ok(Err(e)) => Err(ServeError::Start(e)),
            _ => Err(ServeError::StoppedWhileStarting),
        };
    };
    Ok(Running {
        address,
        state: kept,
        handle,
        thread,
    })
}

/// Binds the server's listening socket.
pub fn bind(address: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    std::net::TcpListener::bind(address).map_err(|source| ServeError::Listen { address, source })
}
