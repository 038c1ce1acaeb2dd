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
    let mut child = Command::new(exe)
        .args(["serve", "--model", model, "--listen", &address])
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
        .context("starting dima serve")?;
    let result = (|| -> anyhow::Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + std::time::Duration::from_secs(300);
        while std::net::TcpStream::connect(&address).is_err() {
            if Instant::now() > deadline {
                bail!("dima serve did not listen on {address}");
            }
            if let Some(status) = child.try_wait()? {
                bail!("dima serve exited: {status}");
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
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
