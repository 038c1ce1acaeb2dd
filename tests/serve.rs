//! `dima serve`: the OpenAI-compatible server on the real Gemma 3 270M
//! model, through real HTTP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use dima_tests::{free_port, http_get, run_dima, spawn_dima};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(300);

/// A running server, stopped on drop.
struct Server {
    child: std::process::Child,
    address: String,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        use std::io::BufRead;
        let address = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["serve", "--model", "gemma3-270m", "--listen", &address];
        args.extend_from_slice(extra);
        let mut child = spawn_dima(&args);
        // Ready when this process says it listens on the address (so a
        // concurrent test that got the same free port cannot answer for
        // it); stderr keeps being drained so the server never blocks on it.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let wanted = format!("on http://{address} ");
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) if line.contains(&wanted) => break,
                Ok(line) => seen.push(line),
                Err(_) => panic!("the server did not come up on {address}: {seen:?}"),
            }
        }
        let ready =
            dima_tests::eventually(Duration::from_secs(120), || http_get(&address, "/health"));
        assert!(ready.is_some(), "the server did not answer on {address}");
        Self { child, address }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[end + 2 + size + 2..];
    }
}

/// `POST path` with a JSON body (optionally a bearer token): status and body.
fn post(address: &str, path: &str, body: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let raw = &response[split + 4..];
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(raw)
    } else {
        raw.to_vec()
    };
    let status = head[9..12].parse().unwrap();
    (status, String::from_utf8(body).unwrap())
}

fn completion(prompt: &str, max_tokens: usize, stream: bool) -> String {
    let mut body = json!({"model": "gemma3-270m", "prompt": prompt, "max_tokens": max_tokens,
           "temperature": 0, "stream": stream});
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body.to_string()
}

/// A request that runs its full `max_tokens` (`ignore_eos`): whatever the
/// kernels' rounding, it does not end early at an end-of-generation token.
fn long_completion(max_tokens: usize, stream: bool) -> String {
    let mut body: Value =
        serde_json::from_str(&completion("Tell me a long story:", max_tokens, stream)).unwrap();
    body["ignore_eos"] = Value::Bool(true);
    body.to_string()
}

/// Starts a streamed request that runs until the returned socket is dropped
/// (20,000 tokens, more than any test waits for), and reads its first bytes,
/// so the request is running when this returns.
fn hold_stream(a: &str) -> TcpStream {
    let mut long = TcpStream::connect(a).unwrap();
    let body = long_completion(20_000, true);
    write!(
        long,
        "POST /v1/completions HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 256];
    let n = long.read(&mut first).unwrap();
    let head = String::from_utf8_lossy(&first[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    long
}

/// The text of a stream of server-sent events, checking the framing: every
/// event is one `data: …` line and a blank line, the last chunk with a
/// choice has `finish_reason`, a last chunk without choices has the
/// `usage` (OpenAI's `stream_options.include_usage`), and `data: [DONE]`
/// ends it.
fn sse_text(body: &str) -> (String, Value) {
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    let mut text = String::new();
    let mut last = Value::Null;
    let mut usage = Value::Null;
    for event in &events[..events.len() - 1] {
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("{event:?}"));
        assert!(!data.contains('\n'), "one line per event: {data:?}");
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert!(usage.is_null(), "the usage chunk is the last: {body}");
        match chunk["choices"].as_array().map(Vec::len) {
            Some(0) => usage = chunk["usage"].clone(),
            _ => {
                assert!(chunk["usage"].is_null(), "{chunk}");
                text.push_str(chunk["choices"][0]["text"].as_str().unwrap());
                last = chunk;
            }
        }
    }
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    (text, usage)
}

#[test]
fn completions_stream_and_not_equal_dima_generate_under_concurrency() {
    let server = Server::start(&["--max-batch", "4"]);
    let prompts = [
        "The capital of France is",
        "Write a haiku about the sea:",
        "1, 2, 3, 4,",
        "The best way to learn Rust is",
    ];
    // What one request alone gives (the CLI, greedy).
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            let done = run_dima(
                &[
                    "generate",
                    "--model",
                    "gemma3-270m",
                    "--prompt",
                    p,
                    "--max-tokens",
                    "10",
                    "--format",
                    "json",
                ],
                LIMIT,
            );
            done.assert_success();
            let v: Value = serde_json::from_str(done.last_line()).unwrap();
            v["text"].as_str().unwrap().to_owned()
        })
        .collect();
    // All at once, half streaming.
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (address, body) = (server.address.clone(), completion(p, 10, i % 2 == 1));
            std::thread::spawn(move || post(&address, "/v1/completions", &body, None))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 200, "{body}");
        if i % 2 == 1 {
            let (text, usage) = sse_text(&body);
            assert_eq!(text, expected[i], "stream {i}");
            assert_eq!(usage["completion_tokens"], 10);
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["object"], "text_completion");
            assert_eq!(v["choices"][0]["text"], expected[i].as_str(), "request {i}");
            assert_eq!(v["choices"][0]["finish_reason"], "length");
            let usage = &v["usage"];
            assert_eq!(usage["completion_tokens"], 10);
            assert_eq!(
                usage["total_tokens"].as_u64(),
                Some(usage["prompt_tokens"].as_u64().unwrap() + 10)
            );
        }
    }
    // Chat: the same text as `dima generate --chat`.
    let chat = run_dima(
        &[
            "generate",
            "--model",
            "gemma3-270m",
            "--prompt",
            "Name a color.",
            "--chat",
            "--max-tokens",
            "8",
            "--format",
            "json",
        ],
        LIMIT,
    );
    chat.assert_success();
    let want: Value = serde_json::from_str(chat.last_line()).unwrap();
    let body = json!({"model": "gemma3-270m", "temperature": 0, "max_tokens": 8,
                      "messages": [{"role": "user", "content": "Name a color."}]});
    let (status, got) = post(
        &server.address,
        "/v1/chat/completions",
        &body.to_string(),
        None,
    );
    assert_eq!(status, 200, "{got}");
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(got["object"], "chat.completion");
    assert_eq!(got["choices"][0]["message"]["role"], "assistant");
    let visible = want["text"].as_str().unwrap().replace("<end_of_turn>", "");
    assert_eq!(
        got["choices"][0]["message"]["content"].as_str().unwrap(),
        visible
    );

    let models: Value =
        serde_json::from_str(&http_get(&server.address, "/v1/models").unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "gemma3-270m");

    // Prometheus: 5 answered requests, 48 tokens, a first-token time each.
    let text = http_get(&server.address, "/metrics").unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert_eq!(value("dima_serve_requests_total{status=\"200\"}"), 5.0);
    assert_eq!(value("dima_serve_generated_tokens_total"), 48.0);
    assert_eq!(value("dima_serve_time_to_first_token_seconds_count"), 5.0);
    assert_eq!(value("dima_serve_inter_token_latency_seconds_count"), 43.0);
    // The gauges follow the engine, which frees the last cache a moment
    // after it sends the last token.
    let idle = dima_tests::eventually(Duration::from_secs(10), || {
        let text = http_get(&server.address, "/metrics")?;
        [
            "dima_serve_requests_running 0",
            "dima_serve_requests_waiting 0",
            "dima_serve_kv_cache_bytes 0",
        ]
        .iter()
        .all(|line| text.lines().any(|l| l == *line))
        .then_some(())
    });
    assert!(idle.is_some(), "the gauges return to 0:\n{text}");
}

#[test]
fn bad_requests_get_openai_errors_and_nothing_breaks_the_server() {
    let server = Server::start(&["--api-key", "s3cret", "--public-health", "--public-metrics"]);
    let a = &server.address;
    let ok = Some("s3cret");
    let cases: [(&str, Option<&str>, u16, &str); 8] = [
        ("{bad json", ok, 400, "not valid JSON"),
        ("[1, 2]", ok, 400, "must be a JSON object"),
        (
            r#"{"model":"nope","prompt":"x"}"#,
            ok,
            404,
            "does not exist",
        ),
        (r#"{"prompt":"x"}"#, ok, 400, "`model` is required"),
        (
            r#"{"model":"gemma3-270m","prompt":7}"#,
            ok,
            400,
            "`prompt` must be a string",
        ),
        (
            r#"{"model":"gemma3-270m","prompt":"x","temperature":-1}"#,
            ok,
            400,
            "temperature",
        ),
        (
            r#"{"model":"gemma3-270m","prompt":"x","max_tokens":0}"#,
            ok,
            400,
            "max_tokens",
        ),
        (
            r#"{"model":"gemma3-270m","prompt":"x"}"#,
            Some("wrong"),
            401,
            "bearer token",
        ),
    ];
    for (body, token, status, needle) in cases {
        let (got, text) = post(a, "/v1/completions", body, token);
        assert_eq!(got, status, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
        assert!(v["error"]["type"].is_string());
    }
    // Still serving.
    let (status, text) = post(a, "/v1/completions", &completion("Hi", 2, false), ok);
    assert_eq!(status, 200, "{text}");
    let metrics = http_get(a, "/metrics").unwrap();
    for line in [
        "dima_serve_requests_total{status=\"400\"} 6",
        "dima_serve_requests_total{status=\"401\"} 1",
        "dima_serve_requests_total{status=\"404\"} 1",
        "dima_serve_requests_total{status=\"200\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

/// One request decodes at a time and one may wait: the next is refused
/// with 429 at once. When the running request's client goes away, its place
/// is freed and the waiting one is served.
#[test]
fn a_full_queue_answers_429() {
    let server = Server::start(&["--max-batch", "1", "--max-waiting", "1"]);
    let a = server.address.clone();
    // A long streaming request that runs until its client goes away. Its
    // response head can come before the engine admits it (under load, CI):
    // the next request is sent once it runs, or it would find the one
    // waiting place still taken by it.
    let long = hold_stream(&a);
    let runs = dima_tests::eventually(Duration::from_secs(60), || {
        let health: Value = serde_json::from_str(&http_get(&a, "/health")?).ok()?;
        (health["running"] == 1 && health["waiting"] == 0).then_some(())
    });
    assert!(
        runs.is_some(),
        "the long request runs: {:?}",
        http_get(&a, "/health")
    );
    let waiting = {
        let a = a.clone();
        std::thread::spawn(move || post(&a, "/v1/completions", &completion("Hi", 3, false), None))
    };
    // Once one runs and one waits, the next is refused.
    let full = dima_tests::eventually(Duration::from_secs(60), || {
        let health: Value = serde_json::from_str(&http_get(&a, "/health")?).ok()?;
        (health["running"] == 1 && health["waiting"] == 1).then_some(())
    });
    assert!(
        full.is_some(),
        "one running and one waiting: {:?}, the waiting request finished: {}",
        http_get(&a, "/health"),
        waiting.is_finished()
    );
    let (status, busy) = post(&a, "/v1/completions", &completion("Hi", 3, false), None);
    assert_eq!(status, 429, "{busy}");
    assert!(
        busy.contains("rate_limit_error") && busy.contains("waiting"),
        "{busy}"
    );
    // A 429 says when to try again.
    let (status, head, _) = post_raw(&a, &completion("Hi", 3, false));
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("\r\nretry-after: 1"), "{head}");
    drop(long); // the client goes away
    let (status, text) = waiting.join().unwrap();
    assert_eq!(status, 200, "{text}");
}

/// `dima bench serve` runs its bounded load and reports every level.
#[test]
fn bench_serve_reports_each_level() {
    let done = run_dima(
        &[
            "bench",
            "serve",
            "--streams",
            "2",
            "--requests",
            "1",
            "--max-tokens",
            "4",
        ],
        LIMIT,
    );
    done.assert_success();
    let rows = done.json_lines();
    assert_eq!(rows.len(), 2, "{}", done.stdout);
    for (row, streams) in rows.iter().zip([1, 2]) {
        assert_eq!(row["streams"], streams);
        assert_eq!(row["completion_tokens"], 4 * streams);
        for key in [
            "tokens_per_s",
            "ttft_p50_s",
            "ttft_p99_s",
            "itl_p50_s",
            "itl_p99_s",
        ] {
            assert!(row[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {row}");
        }
    }
    assert_eq!(rows[0]["over_single_stream"], 1.0);
}

/// `dima bench serve --mix` runs the plain and the mixed load and reports
/// the short requests' time to first token in both, with the ratio; every
/// request runs its full length (`ignore_eos`).
#[test]
fn bench_serve_mix_reports_both_runs() {
    let done = run_dima(
        &[
            "bench",
            "serve",
            "--mix",
            "--streams",
            "3",
            "--long-streams",
            "1",
            "--long-tokens",
            "24",
            "--short-tokens",
            "4",
            "--requests",
            "1",
        ],
        LIMIT,
    );
    done.assert_success();
    let rows = done.json_lines();
    assert_eq!(rows.len(), 2, "{}", done.stdout);
    assert_eq!(rows[0]["short_requests"], 3, "{}", rows[0]);
    assert_eq!(rows[1]["short_requests"], 2, "{}", rows[1]);
    assert_eq!(rows[1]["long_completion_tokens"], 24, "{}", rows[1]);
    for row in &rows {
        for key in ["short_ttft_p50_s", "short_ttft_p99_s", "tokens_per_s"] {
            assert!(row[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {row}");
        }
    }
    let ratio = rows[1]["short_ttft_p99_over_plain"].as_f64().unwrap();
    let want = rows[1]["short_ttft_p99_s"].as_f64().unwrap()
        / rows[0]["short_ttft_p99_s"].as_f64().unwrap();
    assert!((ratio - want).abs() < 1e-9, "{ratio} vs {want}");
    let refused = run_dima(
        &[
            "bench",
            "serve",
            "--mix",
            "--streams",
            "2",
            "--long-streams",
            "2",
        ],
        LIMIT,
    );
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("leaves no short stream"),
        "{}",
        refused.stderr
    );
}

/// Tensor parallelism across two processes: rank 1 follows rank 0's
/// engine over TCP, and the server answers exactly what `dima generate`
/// gives alone. Killing rank 1 turns the next request, and `/health`,
/// into a 503 naming the lost rank within the collective timeout; nothing
/// hangs.
#[test]
fn two_processes_serve_and_a_killed_rank_gives_503() {
    let root = format!("127.0.0.1:{}", free_port());
    let common = [
        "--tp",
        "2",
        "--root",
        root.as_str(),
        "--collective-timeout",
        "4",
    ];
    let mut follower_args = vec!["serve", "--model", "gemma3-270m", "--rank", "1"];
    follower_args.extend_from_slice(&common);
    let mut follower = spawn_dima(&follower_args);
    let mut leader_args = vec!["--rank", "0"];
    leader_args.extend_from_slice(&common);
    let server = Server::start(&leader_args);
    let health: Value =
        serde_json::from_str(&http_get(&server.address, "/health").unwrap()).unwrap();
    assert_eq!(health["tensor_parallel"], 2, "{health}");

    let prompt = "The capital of France is";
    let alone = run_dima(
        &[
            "generate",
            "--model",
            "gemma3-270m",
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
            "--format",
            "json",
        ],
        LIMIT,
    );
    alone.assert_success();
    let want: Value = serde_json::from_str(alone.last_line()).unwrap();
    let handles: Vec<_> = [false, true]
        .into_iter()
        .map(|stream| {
            let (address, body) = (server.address.clone(), completion(prompt, 8, stream));
            std::thread::spawn(move || post(&address, "/v1/completions", &body, None))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let text = if i == 1 {
            sse_text(&body).0
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_owned()
        };
        assert_eq!(text, want["text"].as_str().unwrap(), "request {i}");
    }

    follower.kill().unwrap();
    follower.wait().unwrap();
    let started = std::time::Instant::now();
    let (status, body) = post(
        &server.address,
        "/v1/completions",
        &completion(prompt, 8, false),
        None,
    );
    assert_eq!(status, 503, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("rank 1"), "{message}");
    assert_eq!(error["error"]["type"], "server_error");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // From now on: 503 at once, and /health says why.
    let (status, body) = post(
        &server.address,
        "/v1/completions",
        &completion(prompt, 2, true),
        None,
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the model is unavailable"), "{body}");
    assert!(http_get(&server.address, "/health").is_none());
}

/// `body` posted to `/v1/completions` as one raw HTTP/1.1 exchange, the
/// connection closed after: (status, lower-cased head, body).
fn post_raw(address: &str, body: &str) -> (u16, String, String) {
    exchange(
        address,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// One raw HTTP/1.1 exchange: (status, head, body).
fn exchange(address: &str, request: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// The HTTP edges answer in OpenAI's error shape: a known route asked with
/// the wrong method is a 405 with `Allow`, an oversized body a 413 (refused
/// from its declared length, before it is read); the bearer scheme is
/// case-insensitive and a wrong token is still a 401.
#[test]
fn http_edges_answer_in_the_openai_shape() {
    let server = Server::start(&["--api-key", "s3cret", "--public-health"]);
    let a = &server.address;
    let shaped = |body: &str| -> Value {
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
        assert!(v["error"]["message"].is_string(), "{body}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        v
    };
    let (status, head, body) = exchange(
        a,
        &format!("GET /v1/completions HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 405, "{head}{body}");
    assert!(head.contains("\r\nallow: post"), "{head}");
    assert!(
        shaped(&body)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("POST")
    );
    let (status, head, body) = exchange(
        a,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer s3cret\r\n\
             Content-Type: application/json\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 413, "{head}{body}");
    shaped(&body);
    // A max_tokens past the context is refused, not capped in silence.
    let (status, huge) = post(
        a,
        "/v1/completions",
        r#"{"model":"gemma3-270m","prompt":"Hi","max_tokens":1000000000000000000}"#,
        Some("s3cret"),
    );
    assert_eq!(status, 400, "{huge}");
    assert!(huge.contains("`max_tokens` 1000000000000000000"), "{huge}");
    let body = completion("Hi", 2, false);
    for (token, want) in [
        ("bearer s3cret", 200),
        ("BEARER s3cret", 200),
        ("Bearer wrong", 401),
    ] {
        let (status, head, text) = exchange(
            a,
            &format!(
                "POST /v1/completions HTTP/1.1\r\nHost: {a}\r\nAuthorization: {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert_eq!(status, want, "{token}: {head}{text}");
    }
}

/// `--api-key-file` reads the key from a file (its first line), so it is
/// not in the process list; a wrong or missing token is a 401.
#[test]
fn the_api_key_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let server = Server::start(&["--api-key-file", file.to_str().unwrap(), "--public-health"]);
    let a = &server.address;
    let body = completion("Hi", 2, false);
    let (status, text) = post(a, "/v1/completions", &body, Some("from-a-file"));
    assert_eq!(status, 200, "{text}");
    let (status, text) = post(a, "/v1/completions", &body, None);
    assert_eq!(status, 401, "{text}");
    // Every route wants the key, but for what the operator opened
    // (`--public-health` here; `/metrics` stays guarded).
    for (path, without) in [
        ("/health", "200"),
        ("/metrics", "401"),
        ("/v1/models", "401"),
        ("/tokenizer_info", "401"),
    ] {
        let (head, _) = raw_get(a, path, None);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {without}")),
            "{path}: {head}"
        );
        let (head, _) = raw_get(a, path, Some("from-a-file"));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "{path} with the key: {head}"
        );
    }
    let (status, text) = post(a, "/tokenize", &json!({"prompt": "x"}).to_string(), None);
    assert_eq!(status, 401, "{text}");
    // An empty key file is refused at start.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let done = run_dima(
        &[
            "serve",
            "--model",
            "gemma3-270m",
            "--api-key-file",
            empty.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
    assert!(done.stderr.contains("holds no key"), "{}", done.stderr);
}

/// The official `openai` Python client against the server
/// (tests/python/openai_client.py): models, completions and chat, plain and
/// streamed, with stop strings, logprobs checked against `dima score`,
/// echo, n, seed, content parts, the tokenizer routes and the error cases.
/// Needs a Python with `openai` (`DIMA_API_PYTHON`, set by scripts/test.sh);
/// without it the test says so and passes.
#[test]
fn the_official_openai_client_gets_what_it_asks_for() {
    let Some(python) = std::env::var_os("DIMA_API_PYTHON") else {
        eprintln!(
            "DIMA_API_PYTHON is not set: skipping the openai client checks (scripts/test.sh sets it)"
        );
        return;
    };
    let server = Server::start(&["--max-batch", "4"]);
    let script = dima_tests::repo_root().join("tests/python/openai_client.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(format!("http://{}", server.address))
        .arg("gemma3-270m")
        .arg(dima_tests::dima_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

/// `dima bench serve --shared-prefix` on a small load: one row with the
/// prefix cache (most prompt tokens reused) and one without (none).
#[test]
fn bench_serve_shared_prefix_reports_both_servers() {
    let done = run_dima(
        &[
            "bench",
            "serve",
            "--model",
            "gemma3-270m",
            "--shared-prefix",
            "160",
            "--suffix-tokens",
            "8",
            "--streams",
            "3",
            "--requests",
            "1",
            "--max-tokens",
            "2",
        ],
        LIMIT,
    );
    done.assert_success();
    let rows = done.json_lines();
    assert_eq!(rows.len(), 2, "{}", done.stdout);
    assert_eq!(rows[0]["server"], "dima (prefix cache)");
    assert_eq!(rows[1]["server"], "dima (no prefix cache)");
    for row in &rows {
        assert_eq!(row["workload"], "shared-prefix");
        assert_eq!(row["completion_tokens"], 6, "{row}");
        assert!(row["ttft_p50_s"].as_f64().unwrap() > 0.0);
    }
    // Three prompts of ~175 tokens sharing 160: the two that wait a step
    // reuse the first one's entry.
    let hit = rows[0]["prefix_cache_hit_rate"].as_f64().unwrap();
    assert!(hit > 0.5, "hit rate {hit}");
    assert_eq!(rows[1]["prefix_cache_hit_rate"], 0.0);
}

/// `dima bench constrain`: a schema-valid document followed token by token
/// through the llguidance constraint, next to a draw and a decode step.
#[test]
fn bench_constrain_reports_the_cost_per_token() {
    let done = run_dima(&["bench", "constrain", "--tokens", "60"], LIMIT);
    done.assert_success();
    let row: Value = serde_json::from_str(done.last_line()).unwrap();
    assert_eq!(row["bench"], "constrain");
    assert!(row["tokens"].as_u64().unwrap() >= 60);
    for key in [
        "mask_and_follow_us_per_token",
        "sample_us_per_token",
        "decode_step_us",
        "over_decode_step",
    ] {
        assert!(row[key].as_f64().unwrap() > 0.0, "{key}: {row}");
    }
}

/// lm-evaluation-harness (`local-completions`, its remote tokenizer over
/// `/tokenize`) on two small tasks the test writes (tests/lm_eval): a
/// 50-item multiple choice scored by loglikelihood (`echo` + `logprobs`)
/// and a `generate_until` task with stop sequences, compared item by item
/// with the committed fixture tests/lm_eval/llama_cpp.json
/// (tests/lm_eval/compare.py): within 0.05 of exact arithmetic (float64)
/// on every loglikelihood, the same answers and greedy texts up to
/// near-ties; llama.cpp's numbers are reported next to them, and its
/// chosen answers must agree on at least 80%. Needs `DIMA_API_PYTHON` with
/// `lm-eval[api]` (scripts/test.sh).
#[test]
fn lm_evaluation_harness_matches_exact_arithmetic_and_llama_cpp() {
    let Some(python) = std::env::var_os("DIMA_API_PYTHON") else {
        eprintln!("DIMA_API_PYTHON is not set: skipping lm-eval (scripts/test.sh sets it)");
        return;
    };
    let root = dima_tests::repo_root().join("tests/lm_eval");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        // The tasks are local files: nothing is fetched from the hub.
        let out = std::process::Command::new(&python)
            .args(args)
            .current_dir(dir.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_DATASETS_OFFLINE", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .chars()
            .rev()
            .take(4000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        (out.status.success(), stdout, tail)
    };
    let tasks = dir.path().join("tasks");
    let (ok, out, err) = run(&[root.join("make_tasks.py").as_os_str(), tasks.as_os_str()]);
    assert!(ok, "{out}\n{err}");
    let server = Server::start(&[]);
    let ours = dir.path().join("ours.json");
    let base = format!("http://{}", server.address);
    let (ok, out, err) = run(&[
        root.join("run_lm_eval.py").as_os_str(),
        std::ffi::OsStr::new(&base),
        std::ffi::OsStr::new("gemma3-270m"),
        tasks.as_os_str(),
        ours.as_os_str(),
    ]);
    assert!(ok, "lm-eval failed:\n{out}\n{err}");
    let (ok, out, err) = run(&[
        root.join("compare.py").as_os_str(),
        root.join("llama_cpp.json").as_os_str(),
        ours.as_os_str(),
    ]);
    eprintln!("{out}");
    assert!(ok, "{out}\n{err}");
}

/// `GET path`, with a bearer token when given: the status line and headers,
/// and the body.
fn raw_get(address: &str, path: &str, token: Option<&str>) -> (String, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.to_owned(), body.to_owned())
}

/// A non-streaming client that closes its connection (FIN) while its
/// request runs: generation stops within a step or two (`running` back to
/// 0), and the server goes on answering.
#[test]
fn a_client_that_closes_ends_its_request() {
    let server = Server::start(&[]);
    let a = server.address.clone();
    let body = long_completion(3000, false);
    let mut stream = TcpStream::connect(&a).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let running = |a: &str| -> u64 {
        let health: Value = serde_json::from_str(&http_get(a, "/health").unwrap()).unwrap();
        health["running"].as_u64().unwrap()
    };
    let started =
        dima_tests::eventually(Duration::from_secs(60), || (running(&a) == 1).then_some(()));
    assert!(started.is_some(), "the request did not start");
    std::thread::sleep(Duration::from_secs(1));
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    drop(stream);
    let closed = std::time::Instant::now();
    let stopped =
        dima_tests::eventually(Duration::from_secs(5), || (running(&a) == 0).then_some(()));
    assert!(stopped.is_some(), "still running 5 s after the client left");
    assert!(
        closed.elapsed() < Duration::from_secs(2),
        "{:?}",
        closed.elapsed()
    );
    let (status, text) = post(&a, "/v1/completions", &completion("Hi", 2, false), None);
    assert_eq!(status, 200, "{text}");
}

/// Every response carries `x-request-id`; an error body carries the same id
/// as `error.request_id` (and the server logs one line per request).
#[test]
fn every_response_has_a_request_id() {
    let server = Server::start(&[]);
    let (head, body) = raw_get(&server.address, "/no/such/route", None);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no x-request-id: {head}"))
        .trim()
        .to_owned();
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["request_id"], id.as_str(), "{body}");
    let (head, _) = raw_get(&server.address, "/v1/models", None);
    assert!(head.contains("x-request-id: req-"), "{head}");
}

/// `--max-tokens-cap`: more is a 400 naming `max_tokens` (never a silent
/// cap); a body sent too slowly is a 408 in OpenAI's shape.
#[test]
fn the_max_tokens_cap_and_a_slow_body_are_refused() {
    let server = Server::start(&["--max-tokens-cap", "64", "--body-timeout-s", "1"]);
    let a = server.address.clone();
    let (status, text) = post(&a, "/v1/completions", &completion("Hi", 65, false), None);
    assert_eq!(status, 400, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["param"], "max_tokens", "{text}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-tokens-cap")
    );
    let (status, text) = post(&a, "/v1/completions", &completion("Hi", 64, false), None);
    assert_eq!(status, 200, "{text}");
    // Headers, then a body that never finishes arriving.
    let mut stream = TcpStream::connect(&a).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
    )
    .unwrap();
    let started = std::time::Instant::now();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response.contains("\"type\":\"invalid_request_error\""),
        "{response}"
    );
    assert!(response.contains("did not arrive within 1 s"), "{response}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// `/health` says `degraded` once the oldest waiting request has waited
/// longer than `--degraded-after-s`, and `ok` again when none waits.
#[test]
fn health_is_degraded_while_a_request_waits_too_long() {
    let server = Server::start(&["--max-batch", "1", "--degraded-after-s", "0.5"]);
    let a = server.address.clone();
    let health =
        |a: &str| -> Value { serde_json::from_str(&http_get(a, "/health").unwrap()).unwrap() };
    assert_eq!(health(&a)["status"], "ok");
    // One long request runs until its client goes away; a second waits
    // behind it.
    let long = hold_stream(&a);
    let queued = dima_tests::eventually(Duration::from_secs(60), || {
        (health(&a)["running"] == 1).then_some(())
    });
    assert!(queued.is_some());
    let waiting = {
        let (a, body) = (a.clone(), completion("Hi", 2, false));
        std::thread::spawn(move || post(&a, "/v1/completions", &body, None))
    };
    let degraded = dima_tests::eventually(Duration::from_secs(30), || {
        let h = health(&a);
        (h["status"] == "degraded").then_some(h)
    });
    let h = degraded.expect("degraded while a request waits");
    assert!(h["oldest_wait_s"].as_f64().unwrap() > 0.5, "{h}");
    drop(long);
    assert_eq!(waiting.join().unwrap().0, 200);
    let ok = dima_tests::eventually(Duration::from_secs(10), || {
        (health(&a)["status"] == "ok").then_some(())
    });
    assert!(ok.is_some(), "ok again once none waits: {}", health(&a));
}

/// The chunks of a server-sent-event body (the `[DONE]` line left out).
fn sse_chunks(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| panic!("{d}")))
        .collect()
}

/// The abuse suite: what one careless or hostile client can try, bounded
/// in count and time, against one server on loopback.
/// - Two requests for 10^18 tokens: 400s. Two that may run to the end of
///   the context (`ignore_eos`, no length): they start (admission charges
///   use plus a look-ahead, not the whole budget).
/// - A third request from the same address runs; a fourth is over
///   `--max-streams-per-client`: a 429 in OpenAI's shape with
///   `Retry-After`.
/// - Beside the two long ones, a 4-token request finishes within 2 s.
/// - `--request-timeout-s`: the long streams end with `finish_reason:
///   "length"` at the timeout, and nothing is left running.
/// - Headers that never finish: a 408 in OpenAI's shape, and the
///   connection closed.
/// - Chat content holding every control-token string: `/tokenize` with the
///   messages shows control tokens only where the template puts them.
#[test]
fn one_client_cannot_starve_or_hold_the_server() {
    let server = Server::start(&[
        "--max-streams-per-client",
        "3",
        "--request-timeout-s",
        "20",
        "--header-timeout-s",
        "1",
    ]);
    let a = server.address.clone();
    for _ in 0..2 {
        let (status, text) = post(
            &a,
            "/v1/completions",
            r#"{"model":"gemma3-270m","prompt":"Hi","max_tokens":1000000000000000000}"#,
            None,
        );
        assert_eq!(status, 400, "{text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["param"], "max_tokens", "{text}");
    }
    let health =
        |a: &str| -> Value { serde_json::from_str(&http_get(a, "/health").unwrap()).unwrap() };
    // Two streams that would fill the context.
    let started = std::time::Instant::now();
    let long: Vec<_> = (0..2)
        .map(|i| {
            let a = a.clone();
            let body =
                json!({"model": "gemma3-270m", "prompt": format!("Story {i}: once upon a time"),
                "ignore_eos": true, "temperature": 0, "stream": true})
                .to_string();
            std::thread::spawn(move || post(&a, "/v1/completions", &body, None))
        })
        .collect();
    let both = dima_tests::eventually(Duration::from_secs(60), || {
        (health(&a)["running"] == 2).then_some(())
    });
    assert!(both.is_some(), "the long requests did not both start");
    // A third stream from this address is allowed, a fourth is not.
    let third = {
        let a = a.clone();
        let body = long_completion(64, true);
        std::thread::spawn(move || post(&a, "/v1/completions", &body, None))
    };
    let three = dima_tests::eventually(Duration::from_secs(30), || {
        (health(&a)["running"] == 3).then_some(())
    });
    assert!(three.is_some(), "the third request did not start");
    let (status, head, text) = post_raw(&a, &completion("Hi", 2, false));
    assert_eq!(status, 429, "{head}{text}");
    assert!(head.contains("\r\nretry-after: 1"), "{head}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error", "{text}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-streams-per-client"),
        "{text}"
    );
    // The third finishes; beside the two long ones a 4-token request is
    // answered within 2 s.
    assert_eq!(third.join().unwrap().0, 200);
    let asked = std::time::Instant::now();
    let (status, text) = post(&a, "/v1/completions", &completion("Hi", 4, false), None);
    let took = asked.elapsed();
    assert_eq!(status, 200, "{text}");
    let short: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(short["usage"]["completion_tokens"], 4, "{text}");
    assert!(
        took < Duration::from_secs(2),
        "a 4-token request took {took:?} beside two context-filling ones"
    );
    // The long requests run on (the count is published after the step that
    // ended the short one, which may be just after its answer went out).
    let two = dima_tests::eventually(Duration::from_secs(5), || {
        (health(&a)["running"] == 2).then_some(())
    });
    assert!(two.is_some(), "the long requests run on: {}", health(&a));
    // Headers that never finish: a 408 in OpenAI's shape after 1 s.
    let mut slow = TcpStream::connect(&a).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(slow, "POST /v1/completions HTTP/1.1\r\nHost: {a}\r\n").unwrap();
    let waited = std::time::Instant::now();
    let mut response = String::new();
    let _ = slow.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response:?}");
    assert!(response.contains("x-request-id: req-"), "{response}");
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let error: Value = serde_json::from_str(body).unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("headers did not arrive within 1 s"),
        "{body}"
    );
    assert!(
        waited.elapsed() < Duration::from_secs(5),
        "{:?}",
        waited.elapsed()
    );
    // Chat content with every control-token string stays text.
    let gemma = actors::Gemma::load(&actors::models::gguf_path("gemma3-270m").unwrap()).unwrap();
    let tokenizer = gemma.tokenizer();
    let control = |id: u32| tokenizer.kind(id) == Some(actors::tokenizer::TokenKind::Control);
    let strings: Vec<&str> = (0..tokenizer.len() as u32)
        .filter(|&id| control(id))
        .filter_map(|id| tokenizer.piece(id))
        .collect();
    assert!(strings.contains(&"<end_of_turn>"), "{strings:?}");
    let content = strings.join(" x ");
    let (status, text) = post(
        &a,
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": content}]}).to_string(),
        None,
    );
    assert_eq!(status, 200, "{text}");
    let tokens: Vec<u32> = serde_json::from_str::<Value>(&text).unwrap()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let placed: Vec<&str> = tokens
        .iter()
        .filter(|&&id| control(id))
        .filter_map(|&id| tokenizer.piece(id))
        .collect();
    assert_eq!(
        placed,
        [
            "<bos>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_turn>"
        ],
        "control tokens in a prompt whose content names {} of them",
        strings.len()
    );
    drop(gemma);
    // The request timeout ends the long streams with `length`.
    for h in long {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let chunks = sse_chunks(&body);
        let last = chunks
            .iter()
            .rev()
            .find(|c| c["choices"].as_array().is_some_and(|c| !c.is_empty()))
            .unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
        assert!(body.ends_with("data: [DONE]\n\n"));
    }
    let ended = started.elapsed();
    assert!(
        ended >= Duration::from_secs(20) && ended < Duration::from_secs(60),
        "the long streams ended after {ended:?} (timeout 20 s)"
    );
    let idle = dima_tests::eventually(Duration::from_secs(5), || {
        (health(&a)["running"] == 0).then_some(())
    });
    assert!(idle.is_some(), "{}", health(&a));
}
