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

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

use super::ServeError;
use super::body::{ChatRequest, CompletionRequest};
use crate::gemma::Gemma;
use crate::gemma::chat;
use crate::gemma::engine::{Engine, EngineConfig, Event, FinishReason, Request};
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
}

struct State {
    engine: Engine,
    /// Shared with every streaming response (a vocabulary is large to copy).
    tokenizer: Arc<Tokenizer>,
    name: String,
    api_key: Option<String>,
    next_id: AtomicU64,
    metrics: Metrics,
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
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.running.clone()))?;
        m.registry.register(Box::new(m.waiting.clone()))?;
        m.registry.register(Box::new(m.kv_bytes.clone()))?;
        m.registry.register(Box::new(m.first_token.clone()))?;
        m.registry.register(Box::new(m.inter_token.clone()))?;
        m.registry.register(Box::new(m.tokens.clone()))?;
        Ok(m)
    }
}

/// Times a request's tokens into the histograms.
struct Clock {
    metrics: Metrics,
    arrived: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl Clock {
    fn token(&mut self) {
        let now = std::time::Instant::now();
        match self.last {
            None => self
                .metrics
                .first_token
                .observe((now - self.arrived).as_secs_f64()),
            Some(last) => self.metrics.inter_token.observe((now - last).as_secs_f64()),
        }
        self.metrics.tokens.inc();
        self.last = Some(now);
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
    response.json(json!({
        "error": {"message": error.to_string(), "type": error.error_type(), "param": null, "code": null}
    }))
}

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
        None => Err(bad_request("`model` is required")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    respond(&state, &req, payload, Kind::Completion).await
}

async fn chat_completions(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    respond(&state, &req, payload, Kind::Chat).await
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

async fn respond(
    state: &web::Data<State>,
    req: &HttpRequest,
    payload: web::Payload,
    kind: Kind,
) -> HttpResponse {
    // A declared length over the limit is refused before reading.
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let body = match declared {
        Some(n) if n > MAX_BODY => Err(ServeError::TooLarge { limit: MAX_BODY }),
        _ => read_body(payload).await,
    };
    let answered = match body {
        Ok(bytes) => answer(state, req, &bytes, kind).await,
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
    kind: Kind,
) -> Result<HttpResponse, ServeError> {
    let body = body_of(state, req, bytes)?;
    // What clients send is text: special-token strings in it stay text;
    // only the chat template puts control tokens in.
    let (p, prompt) = match kind {
        Kind::Completion => {
            let body = CompletionRequest::from_body(body)?;
            let p = body.common.params(16)?;
            (p, state.tokenizer.encode(&body.prompt, true, false))
        }
        Kind::Chat => {
            let body = ChatRequest::from_body(body)?;
            let p = body.common.params(16)?;
            (p, chat::encode(&state.tokenizer, &body.turns()?))
        }
    };
    let clock = Clock {
        metrics: state.metrics.clone(),
        arrived: std::time::Instant::now(),
        last: None,
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let request = Request {
        prompt,
        max_tokens: p.max_tokens,
        sampling: p.sampling,
    };
    state
        .engine
        .submit(request, Box::new(move |e| tx.send(e).is_ok()))
        .map_err(ServeError::Rejected)?;
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let meta = Meta {
        id,
        created: now(),
        model: state.name.clone(),
        kind,
    };
    if p.stream {
        Ok(stream(meta, rx, Arc::clone(&state.tokenizer), clock))
    } else {
        let body = whole(&meta, rx, &state.tokenizer, clock).await?;
        Ok(HttpResponse::Ok().json(body))
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        })
    }

    /// The response object (`streamed`: one chunk of a stream), with
    /// `usage` when given.
    fn object(
        &self,
        text: &str,
        reason: Option<&str>,
        usage: Option<Value>,
        streamed: bool,
    ) -> Value {
        let choice = match (self.kind, streamed) {
            (Kind::Completion, _) => {
                json!({"index": 0, "text": text, "finish_reason": reason, "logprobs": null})
            }
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
            }),
            (Kind::Chat, true) => json!({
                "index": 0,
                "delta": {"content": text},
                "finish_reason": reason,
            }),
        };
        let object = match (self.kind, streamed) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        };
        let mut value = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let Some(usage) = usage {
            value["usage"] = usage;
        }
        value
    }
}

/// The text of generated ids: end-of-generation tokens print nothing.
fn visible(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    let kept: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|id| !crate::gemma::END_OF_GENERATION.contains(id))
        .collect();
    tokenizer.decode(&kept)
}

/// Waits for the whole completion and answers with one JSON object.
async fn whole(
    meta: &Meta,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    tokenizer: &Tokenizer,
    mut clock: Clock,
) -> Result<Value, ServeError> {
    let mut ids = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token(id) => {
                clock.token();
                ids.push(id);
            }
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(meta.object(
                    &visible(tokenizer, &ids),
                    Some(finish_reason(reason)),
                    Some(Meta::usage(prompt_tokens, completion_tokens)),
                    false,
                ));
            }
            Event::Failed(reason) => return Err(ServeError::Failed { reason }),
        }
    }
    Err(ServeError::Failed {
        reason: "the engine stopped before the request finished".into(),
    })
}

/// Streams the completion as server-sent events.
fn stream(
    meta: Meta,
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    tokenizer: Arc<Tokenizer>,
    clock: Clock,
) -> HttpResponse {
    struct Progress {
        rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
        meta: Meta,
        tokenizer: Arc<Tokenizer>,
        pending: Vec<u8>,
        done: bool,
        clock: Clock,
    }
    let sse = |value: &Value| web::Bytes::from(format!("data: {value}\n\n"));
    let start = Progress {
        rx,
        meta,
        tokenizer,
        pending: Vec::new(),
        done: false,
        clock,
    };
    let events = futures_util::stream::unfold(start, move |mut p| async move {
        if p.done {
            return None;
        }
        loop {
            match p.rx.recv().await {
                Some(Event::Token(id)) => {
                    p.clock.token();
                    if crate::gemma::END_OF_GENERATION.contains(&id) {
                        continue;
                    }
                    p.pending.extend(p.tokenizer.piece_bytes(id, false));
                    // Whole UTF-8 characters only.
                    let valid = match std::str::from_utf8(&p.pending) {
                        Ok(s) => s.len(),
                        Err(e) => e.valid_up_to(),
                    };
                    if valid == 0 {
                        continue;
                    }
                    let text = String::from_utf8_lossy(&p.pending[..valid]).into_owned();
                    p.pending.drain(..valid);
                    let chunk = sse(&p.meta.object(&text, None, None, true));
                    return Some((Ok::<_, actix_web::Error>(chunk), p));
                }
                Some(Event::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    p.done = true;
                    let rest = String::from_utf8_lossy(&p.pending).into_owned();
                    let last = p.meta.object(
                        &rest,
                        Some(finish_reason(reason)),
                        Some(Meta::usage(prompt_tokens, completion_tokens)),
                        true,
                    );
                    let bytes = web::Bytes::from(format!("data: {last}\n\ndata: [DONE]\n\n"));
                    return Some((Ok(bytes), p));
                }
                Some(Event::Failed(reason)) => {
                    p.done = true;
                    let err = json!({"error": {"message": reason, "type": "server_error", "param": null, "code": null}});
                    return Some((Ok(sse(&err)), p));
                }
                None => return None,
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(events)
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

async fn health(state: web::Data<State>) -> HttpResponse {
    if let Some(reason) = state.engine.unavailable() {
        return HttpResponse::ServiceUnavailable().json(json!({
            "status": "unavailable",
            "model": state.name,
            "reason": reason,
        }));
    }
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "model": state.name,
        "tensor_parallel": state.engine.world(),
        "running": state.engine.running(),
        "waiting": state.engine.waiting(),
    }))
}

async fn metrics(state: web::Data<State>) -> HttpResponse {
    use prometheus::Encoder;
    let m = &state.metrics;
    m.running.set(state.engine.running() as i64);
    m.waiting.set(state.engine.waiting() as i64);
    m.kv_bytes.set(state.engine.kv_bytes() as i64);
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
    let state = web::Data::new(State {
        engine,
        tokenizer,
        name: config.model_name.clone(),
        api_key: config.api_key.clone(),
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
    let kept = state.clone();
    let thread = std::thread::Builder::new()
        .name("dima-http".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
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
                .workers(2);
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
