//! `dima bench serve`: a bounded load test of `dima serve` through the
//! load client ([`actors::serve::client`]): for 1 and each level of
//! concurrent streams, aggregate tokens/s and its ratio to one stream, time
//! to first token and inter-token latency.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use actors::serve::client::{percentile, stream_completion};
use anyhow::{Context, bail};

use super::{free_port, levels_with_one};

/// Starts `dima serve` (this executable, `exe`) on `address` with a deep
/// queue, so a load test's requests wait rather than being refused.
fn spawn_server(
    exe: &Path,
    model: &str,
    address: &str,
    max_batch: usize,
    server_args: &[String],
) -> anyhow::Result<std::process::Child> {
    Command::new(exe)
        .args(["serve", "--model", model, "--listen", address])
        .args([
            "--max-batch",
            &max_batch.to_string(),
            "--max-waiting",
            "1024",
        ])
        .args(server_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting dima serve")
}

/// `dima bench serve`: starts `dima serve` (this executable) on a free
/// loopback port and, for each number of concurrent streams, has every
/// stream send `requests` streaming completions one after another (each
/// its own prompt, greedy, `max_tokens` tokens). Reports aggregate
/// completion tokens per second over the wall time, time to first token
/// and inter-token latency (p50, p99), and the ratio of aggregate tokens/s
/// to the single-stream figure of the same run. Bounded: streams ×
/// requests completions per level.
pub fn bench_serve(
    exe: &Path,
    model: &str,
    streams: &[usize],
    requests: usize,
    max_tokens: usize,
    max_batch: usize,
    server_args: &[String],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let address = format!("127.0.0.1:{}", free_port()?);
    let mut child = spawn_server(exe, model, &address, max_batch, server_args)?;
    let result = (|| -> anyhow::Result<Vec<serde_json::Value>> {
        wait_listening(&address, &mut child, "dima serve")?;
        let texts = [
            "The river carried the boat past quiet villages and",
            "Write a short story about a lighthouse keeper who",
            "The three most important ideas in economics are",
            "Once upon a time in a city of glass,",
        ];
        let levels = levels_with_one(streams);
        let mut rows = Vec::new();
        let mut single = None;
        for &c in &levels {
            let started = Instant::now();
            let handles: Vec<_> = (0..c)
                .map(|s| {
                    let (address, model) = (address.clone(), model.to_owned());
                    let prompts: Vec<String> = (0..requests)
                        .map(|r| format!("{} (request {s}.{r})", texts[(s + r) % texts.len()]))
                        .collect();
                    std::thread::spawn(move || {
                        prompts
                            .iter()
                            .map(|p| stream_completion(&address, &model, p, max_tokens, None))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            let mut first = Vec::new();
            let mut gaps = Vec::new();
            let mut tokens = 0;
            for h in handles {
                let runs = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
                for run in runs {
                    first.push(run.first_event_s);
                    gaps.extend(run.gaps_s);
                    tokens += run.completion_tokens;
                }
            }
            let wall = started.elapsed().as_secs_f64();
            let rate = tokens as f64 / wall;
            let base = *single.get_or_insert(rate);
            rows.push(serde_json::json!({
                "bench": "serve",
                "streams": c,
                "requests": c * requests,
                "max_tokens": max_tokens,
                "completion_tokens": tokens,
                "wall_s": wall,
                "tokens_per_s": rate,
                "over_single_stream": rate / base,
                "ttft_p50_s": percentile(&mut first, 0.5),
                "ttft_p99_s": percentile(&mut first, 0.99),
                "itl_p50_s": percentile(&mut gaps, 0.5),
                "itl_p99_s": percentile(&mut gaps, 0.99),
            }));
        }
        Ok(rows)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The shared-prefix workload of `dima bench serve --shared-prefix`.
#[derive(Debug, Clone)]
pub struct SharedPrefix {
    /// Tokens of the system prompt every request starts with.
    pub shared: usize,
    /// Tokens of each request's own suffix.
    pub suffix: usize,
    /// Concurrent streams.
    pub streams: usize,
    /// Completions per stream.
    pub requests: usize,
    /// Tokens per completion.
    pub max_tokens: usize,
    /// The server's --max-batch.
    pub max_batch: usize,
    /// The Python with `llama-cpp-python[server]` for the anchor.
    pub llama_python: Option<String>,
}

/// One server under the shared-prefix load.
struct Measured {
    ttft: Vec<f64>,
    tokens: u64,
    wall: f64,
}

/// Runs `streams` concurrent streams of `prompts` (stream `s` sends
/// `prompts[s]` in turn) against the server at `address`.
fn drive(
    address: &str,
    model: &str,
    prompts: &[Vec<String>],
    max_tokens: usize,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|mine| {
            let (address, model) = (address.to_owned(), model.to_owned());
            std::thread::spawn(move || {
                mine.iter()
                    .map(|p| stream_completion(&address, &model, p, max_tokens, None))
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .collect();
    let (mut ttft, mut tokens) = (Vec::new(), 0);
    for h in handles {
        for run in h
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??
        {
            ttft.push(run.first_event_s);
            tokens += run.completion_tokens;
        }
    }
    Ok(Measured {
        ttft,
        tokens,
        wall: started.elapsed().as_secs_f64(),
    })
}

/// Waits until `address` takes connections (or the child exits).
fn wait_listening(
    address: &str,
    child: &mut std::process::Child,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(300);
    while std::net::TcpStream::connect(address).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {address}");
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}

/// The body of `GET path` (HTTP/1.0, so the server closes when done).
fn get_text(address: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned()))
}

/// A counter's value in Prometheus text.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// `dima bench serve --shared-prefix`: every request is one system prompt
/// of `shared` tokens followed by its own `suffix` tokens (`streams`
/// streams, `requests` each). The same load runs against `dima serve` with
/// its prefix cache, without it (`--prefix-cache-mib 0`), and, given a
/// Python with `llama-cpp-python[server]`, against llama.cpp's OpenAI
/// server on the same GGUF with the same thread count. One JSON row per
/// server: time to first token p50/p99, aggregate tokens/s, the prefix
/// cache's hit rate (prompt tokens reused over looked up), and the ratios
/// to the cached run (TTFT) and to llama.cpp (tokens/s).
pub fn bench_serve_shared_prefix(
    exe: &Path,
    model: &str,
    w: &SharedPrefix,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let path = actors::models::gguf_path(model)?;
    let tokenizer = actors::gemma::load_tokenizer(&path)?;
    let system = tokenizer.decode(&super::bench_prompt(&tokenizer, w.shared + 1, 0)[1..]);
    let prompts: Vec<Vec<String>> = (0..w.streams)
        .map(|s| {
            (0..w.requests)
                .map(|r| {
                    let own = super::bench_prompt(&tokenizer, w.suffix + 1, 7 * s + 3 * r + 1);
                    format!(
                        "{system}\n\nRequest {s}.{r}: {}",
                        tokenizer.decode(&own[1..])
                    )
                })
                .collect()
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    for cache in [true, false] {
        let address = format!("127.0.0.1:{}", free_port()?);
        let mut child = Command::new(exe)
            .args(["serve", "--model", model, "--listen", &address])
            .args([
                "--max-batch",
                &w.max_batch.to_string(),
                "--max-waiting",
                "1024",
            ])
            .args(["--prefix-cache-mib", if cache { "1024" } else { "0" }])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting dima serve")?;
        let run = (|| {
            wait_listening(&address, &mut child, "dima serve")?;
            let m = drive(&address, model, &prompts, w.max_tokens)?;
            let metrics = get_text(&address, "/metrics").unwrap_or_default();
            let hits = counter(&metrics, "dima_serve_prefix_cache_hits_total");
            let queries = counter(&metrics, "dima_serve_prefix_cache_queries_total");
            anyhow::Ok((m, if queries > 0.0 { hits / queries } else { 0.0 }))
        })();
        let _ = child.kill();
        let _ = child.wait();
        let (m, hit_rate) = run?;
        rows.push((
            if cache {
                "dima (prefix cache)"
            } else {
                "dima (no prefix cache)"
            },
            m,
            Some(hit_rate),
        ));
    }
    match &w.llama_python {
        None => eprintln!(
            "llama.cpp anchor skipped: give --llama-python (a Python with llama-cpp-python[server])"
        ),
        Some(python) => {
            let port = free_port()?;
            let address = format!("127.0.0.1:{port}");
            let mut child = Command::new(python)
                .args(["-m", "llama_cpp.server", "--model"])
                .arg(&path)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--n_threads",
                    &threads.to_string(),
                    "--n_threads_batch",
                    &threads.to_string(),
                ])
                .args([
                    "--n_ctx",
                    &(w.shared + w.suffix + w.max_tokens + 256).to_string(),
                ])
                .args(["--model_alias", model])
                // Its default cuts a streaming request short when the next
                // one arrives; here every request runs to its end.
                .args(["--interrupt_requests", "False"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {python} -m llama_cpp.server"))?;
            let run = wait_listening(&address, &mut child, "the llama.cpp server")
                .and_then(|()| drive(&address, model, &prompts, w.max_tokens));
            let _ = child.kill();
            let _ = child.wait();
            rows.push(("llama.cpp server (llama-cpp-python)", run?, None));
        }
    }
    let rate = |m: &Measured| m.tokens as f64 / m.wall;
    let cached_p50 = percentile(&mut rows[0].1.ttft.clone(), 0.5);
    let llama_rate = rows.get(2).map(|r| rate(&r.1));
    Ok(rows
        .into_iter()
        .map(|(server, mut m, hit_rate)| {
            let p50 = percentile(&mut m.ttft, 0.5);
            serde_json::json!({
                "bench": "serve",
                "workload": "shared-prefix",
                "server": server,
                "streams": w.streams,
                "requests": w.streams * w.requests,
                "shared_prefix_tokens": w.shared,
                "suffix_tokens": w.suffix,
                "max_tokens": w.max_tokens,
                "threads": threads,
                "completion_tokens": m.tokens,
                "wall_s": m.wall,
                "tokens_per_s": rate(&m),
                "ttft_p50_s": p50,
                "ttft_p99_s": percentile(&mut m.ttft, 0.99),
                "prefix_cache_hit_rate": hit_rate,
                "ttft_p50_over_prefix_cache": p50 / cached_p50,
                "tokens_per_s_over_llama_cpp": llama_rate.map(|l| rate(&m) / l),
            })
        })
        .collect())
}

/// The mixed workload of `dima bench serve --mix`.
#[derive(Debug, Clone)]
pub struct Mix {
    /// Concurrent streams in both runs.
    pub streams: usize,
    /// Of those, the streams that send one long request each in the mixed
    /// run.
    pub long_streams: usize,
    /// Tokens of a short request.
    pub short_tokens: usize,
    /// Tokens of a long request.
    pub long_tokens: usize,
    /// Short requests per stream.
    pub requests: usize,
    /// The server's --max-batch.
    pub max_batch: usize,
}

/// `streams` threads, stream `s` sending `bodies[s]` in turn; every run's
/// stats by stream.
fn drive_bodies(
    address: &str,
    bodies: Vec<Vec<serde_json::Value>>,
) -> Vec<std::thread::JoinHandle<anyhow::Result<Vec<actors::serve::client::StreamStats>>>> {
    bodies
        .into_iter()
        .map(|mine| {
            let address = address.to_owned();
            std::thread::spawn(move || {
                mine.iter()
                    .map(|b| {
                        actors::serve::client::stream_body(&address, b, None)
                            .map_err(anyhow::Error::from)
                    })
                    .collect()
            })
        })
        .collect()
}

fn joined(
    handles: Vec<std::thread::JoinHandle<anyhow::Result<Vec<actors::serve::client::StreamStats>>>>,
) -> anyhow::Result<Vec<actors::serve::client::StreamStats>> {
    let mut all = Vec::new();
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
        );
    }
    Ok(all)
}

/// `dima bench serve --mix`: does a long request keep short ones waiting?
/// One server; first `streams` streams of short requests alone (the plain
/// figure: `requests` each, `short_tokens` tokens), then the same number
/// of streams of which `long_streams` each send one long request
/// (`long_tokens`) and the others the short requests, started once the
/// long ones are running. Every request is greedy with `ignore_eos`, so
/// each runs exactly its length. One row per run: the short requests' time
/// to first token p50/p99 and inter-token p99, aggregate tokens/s, and for
/// the mixed run the ratio of the short p99 to the plain run's (the bar: at
/// most 2).
pub fn bench_serve_mix(
    exe: &Path,
    model: &str,
    w: &Mix,
    server_args: &[String],
) -> anyhow::Result<Vec<serde_json::Value>> {
    if w.long_streams >= w.streams {
        bail!(
            "--long-streams {} leaves no short stream among --streams {}",
            w.long_streams,
            w.streams
        );
    }
    let address = format!("127.0.0.1:{}", free_port()?);
    let mut child = spawn_server(exe, model, &address, w.max_batch, server_args)?;
    let texts = [
        "The river carried the boat past quiet villages and",
        "Write a short story about a lighthouse keeper who",
        "The three most important ideas in economics are",
        "Once upon a time in a city of glass,",
    ];
    let body = |prompt: String, tokens: usize| {
        serde_json::json!({
            "model": model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": true,
            "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
        })
    };
    let shorts = |streams: usize, tag: &str| -> Vec<Vec<serde_json::Value>> {
        (0..streams)
            .map(|s| {
                (0..w.requests)
                    .map(|r| {
                        let text = texts[(s + r) % texts.len()];
                        body(format!("{text} ({tag} {s}.{r})"), w.short_tokens)
                    })
                    .collect()
            })
            .collect()
    };
    let result = (|| -> anyhow::Result<Vec<serde_json::Value>> {
        wait_listening(&address, &mut child, "dima serve")?;
        let running = || -> f64 {
            get_text(&address, "/health")
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|h| h["running"].as_f64())
                .unwrap_or(0.0)
        };
        // The plain run: short requests only.
        let started = Instant::now();
        let plain = joined(drive_bodies(&address, shorts(w.streams, "plain")))?;
        let plain_wall = started.elapsed().as_secs_f64();
        // The mixed run: the long requests first, then the short ones.
        let started = Instant::now();
        let long_bodies = (0..w.long_streams)
            .map(|s| {
                vec![body(
                    format!("{} (long {s})", texts[s % texts.len()]),
                    w.long_tokens,
                )]
            })
            .collect();
        let long = drive_bodies(&address, long_bodies);
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        while running() < w.long_streams as f64 {
            if Instant::now() > deadline {
                bail!("the long requests did not start within 120 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let short_started = Instant::now();
        let short = joined(drive_bodies(
            &address,
            shorts(w.streams - w.long_streams, "mixed"),
        ))?;
        let short_wall = short_started.elapsed().as_secs_f64();
        let long = joined(long)?;
        let mixed_wall = started.elapsed().as_secs_f64();
        let summary = |runs: &[actors::serve::client::StreamStats]| {
            let mut first: Vec<f64> = runs.iter().map(|r| r.first_event_s).collect();
            let mut gaps: Vec<f64> = runs.iter().flat_map(|r| r.gaps_s.clone()).collect();
            let tokens: u64 = runs.iter().map(|r| r.completion_tokens).sum();
            (
                percentile(&mut first, 0.5),
                percentile(&mut first, 0.99),
                percentile(&mut gaps, 0.99),
                tokens,
            )
        };
        let (p50, p99, itl99, tokens) = summary(&plain);
        let (mp50, mp99, mitl99, mtokens) = summary(&short);
        let (lp50, _, litl99, ltokens) = summary(&long);
        Ok(vec![
            serde_json::json!({
                "bench": "serve",
                "workload": "mix",
                "run": "plain (short requests only)",
                "streams": w.streams,
                "short_requests": plain.len(),
                "short_tokens": w.short_tokens,
                "wall_s": plain_wall,
                "tokens_per_s": tokens as f64 / plain_wall,
                "short_ttft_p50_s": p50,
                "short_ttft_p99_s": p99,
                "short_itl_p99_s": itl99,
            }),
            serde_json::json!({
                "bench": "serve",
                "workload": "mix",
                "run": "mixed (long and short requests)",
                "streams": w.streams,
                "long_streams": w.long_streams,
                "long_tokens": w.long_tokens,
                "short_requests": short.len(),
                "short_tokens": w.short_tokens,
                "wall_s": mixed_wall,
                "short_phase_s": short_wall,
                "tokens_per_s": (mtokens + ltokens) as f64 / mixed_wall,
                "short_ttft_p50_s": mp50,
                "short_ttft_p99_s": mp99,
                "short_itl_p99_s": mitl99,
                "long_ttft_p50_s": lp50,
                "long_itl_p99_s": litl99,
                "long_completion_tokens": ltokens,
                "short_ttft_p99_over_plain": mp99 / p99,
                "bar": "short_ttft_p99_over_plain <= 2",
            }),
        ])
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
