//! `dima serve`: an OpenAI-compatible HTTP server (actix-web) in front of
//! the continuous-batching engine ([`actors::gemma::engine`]).
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
use actors::gemma::engine::{Engine, EngineConfig, Event, FinishReason, Rejected, Request};
use actors::gemma::{Gemma, Sampling};
use actors::tokenizer::Tokenizer;
use serde_json::{Value, json};

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

/// An error for the client, answered in OpenAI's shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(json!({
            "error": {"message": self.message, "type": self.kind, "param": null, "code": null}
        }))
    }
}

fn error(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        kind,
        message: message.into(),
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks the bearer token; `Some(response)` when it is wrong.
fn unauthorized(state: &State, req: &HttpRequest) -> Option<ApiError> {
    let key = state.api_key.as_ref()?;
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    (given != Some(key.as_str())).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong bearer token (Authorization: Bearer …)",
        )
    })
}

/// The request parameters both endpoints share.
struct Params {
    max_tokens: usize,
    sampling: Sampling,
    stream: bool,
}

fn params(body: &Value, default_max: usize) -> Result<Params, ApiError> {
    let number = |key: &str| -> Result<Option<f64>, ApiError> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad_request(format!("`{key}` must be a number, not {v}"))),
        }
    };
    let whole = |key: &str, default: u64| -> Result<u64, ApiError> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_u64().ok_or_else(|| {
                bad_request(format!("`{key}` must be a non-negative integer, not {v}"))
            }),
        }
    };
    if whole("n", 1)? != 1 {
        return Err(bad_request("only `n` = 1 is supported"));
    }
    let sampling = Sampling {
        temperature: number("temperature")?.unwrap_or(1.0) as f32,
        top_k: whole("top_k", 0)? as usize,
        top_p: number("top_p")?.unwrap_or(1.0) as f32,
        seed: whole("seed", 0)?,
    };
    sampling.check().map_err(|e| bad_request(e.to_string()))?;
    let max_tokens = whole("max_tokens", default_max as u64)? as usize;
    if max_tokens == 0 {
        return Err(bad_request("`max_tokens` must be at least 1"));
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(bad_request(format!(
                "`stream` must be true or false, not {v}"
            )));
        }
    };
    Ok(Params {
        max_tokens,
        sampling,
        stream,
    })
}

/// Parses the body and checks the model name and token.
fn body_of(state: &State, req: &HttpRequest, bytes: &[u8]) -> Result<Value, ApiError> {
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
        Some(m) => Err(error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model `{m}` does not exist; this server serves `{}`",
                state.name
            ),
        )),
        None => Err(bad_request("`model` is required")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// Gemma's chat template over OpenAI messages (a system message is put in
/// front of the first user turn: Gemma has no system role).
fn chat_prompt(messages: &Value) -> Result<String, ApiError> {
    let list = messages
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| bad_request("`messages` must be a non-empty array"))?;
    let mut text = String::new();
    let mut system = String::new();
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_request(format!("messages[{i}].content must be a string")))?;
        match role {
            "system" | "developer" => {
                system.push_str(content);
                system.push_str("\n\n");
            }
            "user" => {
                text.push_str("<start_of_turn>user\n");
                text.push_str(&std::mem::take(&mut system));
                text.push_str(content);
                text.push_str("<end_of_turn>\n");
            }
            "assistant" => {
                text.push_str("<start_of_turn>model\n");
                text.push_str(content);
                text.push_str("<end_of_turn>\n");
            }
            other => {
                return Err(bad_request(format!(
                    "messages[{i}].role {other:?} is not system, user or assistant"
                )));
            }
        }
    }
    text.push_str("<start_of_turn>model\n");
    Ok(text)
}

async fn completions(state: web::Data<State>, req: HttpRequest, bytes: web::Bytes) -> HttpResponse {
    respond(&state, &req, &bytes, Kind::Completion).await
}

async fn chat_completions(
    state: web::Data<State>,
    req: HttpRequest,
    bytes: web::Bytes,
) -> HttpResponse {
    respond(&state, &req, &bytes, Kind::Chat).await
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
    bytes: &[u8],
    kind: Kind,
) -> HttpResponse {
    let response = match answer(state, req, bytes, kind).await {
        Ok(response) => response,
        Err(e) => e.response(),
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
) -> Result<HttpResponse, ApiError> {
    let body = body_of(state, req, bytes)?;
    let p = params(&body, 16)?;
    let (text, special) = match kind {
        Kind::Completion => match body.get("prompt") {
            Some(Value::String(s)) => (s.clone(), false),
            _ => return Err(bad_request("`prompt` must be a string")),
        },
        Kind::Chat => (
            chat_prompt(body.get("messages").unwrap_or(&Value::Null))?,
            true,
        ),
    };
    let prompt = state.tokenizer.encode(&text, true, special);
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
        .map_err(|e| match e {
            Rejected::Busy { .. } => error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                e.to_string(),
            ),
            Rejected::Invalid(_) => bad_request(e.to_string()),
            Rejected::Stopped | Rejected::Unavailable(_) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                e.to_string(),
            ),
        })?;
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
        match whole(&meta, rx, &state.tokenizer, clock).await {
            Ok(body) => Ok(HttpResponse::Ok().json(body)),
            Err(reason) => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                reason,
            )),
        }
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
        .filter(|id| !actors::gemma::END_OF_GENERATION.contains(id))
        .collect();
    tokenizer.decode(&kept)
}

/// Waits for the whole completion and answers with one JSON object.
async fn whole(
    meta: &Meta,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    tokenizer: &Tokenizer,
    mut clock: Clock,
) -> Result<Value, String> {
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
            Event::Failed(reason) => return Err(reason),
        }
    }
    Err("the engine stopped before the request finished".into())
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
                    if actors::gemma::END_OF_GENERATION.contains(&id) {
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
        return denied.response();
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

async fn not_found() -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint (try /v1/completions, /v1/chat/completions, /v1/models, /health)",
    )
    .response()
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
    pub fn wait(self) -> anyhow::Result<()> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the HTTP server panicked"))??;
        Ok(())
    }

    /// Stops taking connections, lets open requests finish, then stops
    /// the engine (which finishes its requests and stops any ranks in
    /// other processes).
    pub fn stop(self) -> anyhow::Result<()> {
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
pub fn start(ranks: Vec<Gemma>, config: &ServeConfig) -> anyhow::Result<Running> {
    let Some(first) = ranks.first() else {
        anyhow::bail!("no rank to serve");
    };
    let tokenizer = first.tokenizer().clone();
    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let engine = Engine::start(ranks, config.engine).map_err(|e| anyhow::anyhow!("{e}"))?;
    start_engine(engine, tokenizer, listener, config)
}

/// Serves a running `engine` (any shard models: CPU ranks, or the model
/// on a GPU) on `listener`.
pub fn start_engine(
    engine: Engine,
    tokenizer: Tokenizer,
    listener: std::net::TcpListener,
    config: &ServeConfig,
) -> anyhow::Result<Running> {
    let tokenizer = Arc::new(tokenizer);
    let address = listener.local_addr()?;
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
                        .app_data(web::PayloadConfig::new(1 << 22))
                        .route("/v1/completions", web::post().to(completions))
                        .route("/v1/chat/completions", web::post().to(chat_completions))
                        .route("/v1/models", web::get().to(models))
                        .route("/health", web::get().to(health))
                        .route("/metrics", web::get().to(metrics))
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
        })?;
    let Ok(handle) = rx.recv() else {
        // The thread ended before the server ran: its error says why.
        return match thread.join() {
            Ok(Err(e)) => Err(anyhow::anyhow!("cannot start the HTTP server: {e}")),
            _ => Err(anyhow::anyhow!("the HTTP server stopped while starting")),
        };
    };
    Ok(Running {
        address,
        state: kept,
        handle,
        thread,
    })
}

/// Serves `ranks` until the process is stopped.
pub fn serve(ranks: Vec<Gemma>, config: &ServeConfig) -> anyhow::Result<()> {
    start(ranks, config)?.wait()
}

/// Where the ranks of a tensor-parallel group run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Every rank in this process, as threads sharing memory.
    InProcess,
    /// This process runs `rank` only; the group meets over TCP at rank 0's
    /// `root` address.
    Tcp {
        /// This process's rank.
        rank: usize,
        /// Rank 0's address.
        root: SocketAddr,
    },
}

/// Loads the ranks of a `tp`-way group that this process runs: every rank
/// ([`Placement::InProcess`], in rank order, loaded in parallel) or one.
/// Each rank reads only its own slices; a peer that does not answer within
/// `timeout` is an error, never a hang.
pub fn load_ranks(
    path: &std::path::Path,
    tp: usize,
    placement: Placement,
    timeout: std::time::Duration,
) -> anyhow::Result<Vec<Gemma>> {
    if tp == 0 {
        anyhow::bail!("the tensor-parallel size must be at least 1");
    }
    match placement {
        Placement::InProcess if tp == 1 => Ok(vec![Gemma::load(path)?]),
        Placement::InProcess => {
            let loads: Vec<_> = kernels::collective::local_group(tp, timeout)
                .into_iter()
                .map(|link| {
                    let path = path.to_path_buf();
                    std::thread::spawn(move || {
                        Gemma::load_rank(&path, tp, Box::new(link), |_, _| {})
                    })
                })
                .collect();
            let mut ranks = Vec::with_capacity(tp);
            for (rank, load) in loads.into_iter().enumerate() {
                let gemma = load
                    .join()
                    .map_err(|_| anyhow::anyhow!("loading rank {rank} panicked"))??;
                ranks.push(gemma);
            }
            Ok(ranks)
        }
        Placement::Tcp { rank, root } => {
            if rank >= tp {
                anyhow::bail!("rank {rank} is not below the tensor-parallel size {tp}");
            }
            let link = kernels::collective::TcpRank::connect(rank, tp, root, timeout)?;
            Ok(vec![Gemma::load_rank(path, tp, Box::new(link), |_, _| {})?])
        }
    }
}

/// One line per rank: its slices' weight bytes.
pub fn describe_ranks(ranks: &[Gemma]) -> String {
    ranks
        .iter()
        .map(|g| {
            format!(
                "rank {} of {}: {:.1} MiB of weights",
                g.shard().rank,
                g.collective().world(),
                g.weight_bytes() as f64 / (1 << 20) as f64
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
