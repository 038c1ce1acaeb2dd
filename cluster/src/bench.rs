//! `dima bench count`: the count job end to end, against a sequential anchor.
//!
//! For each layout (processes × workers) the bench writes a manifest on
//! loopback, runs `dima up` on it as a user would (process start-up, timely
//! connection set-up, the job, shutdown: all inside the clock), checks the
//! result against the anchor, and reports events/s. The anchor is
//! [`count_sequential`]: the same events counted by one plain loop in this
//! process, timed in the same run, so the ratio survives a noisy machine.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use dataflows::{CountJob, count_sequential};

/// A processes × workers layout, written `PxW`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Processes.
    pub processes: usize,
    /// Workers per process.
    pub workers: usize,
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (p, w) = text
            .split_once('x')
            .ok_or_else(|| format!("{text:?} is not PxW, e.g. 2x1"))?;
        let parse = |s: &str| s.parse::<usize>().ok().filter(|n| (1..=64).contains(n));
        match (parse(p), parse(w)) {
            (Some(processes), Some(workers)) => Ok(Self { processes, workers }),
            _ => Err(format!(
                "{text:?} is not PxW with 1 to 64 of each, e.g. 2x1"
            )),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.processes, self.workers)
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The cluster part of a loopback manifest for `layout`, on free ports.
fn manifest_head(layout: Layout) -> anyhow::Result<String> {
    let mut text =
        String::from("[cluster]\nname = \"bench\"\n\n[telemetry]\nlog_level = \"warn\"\n\n");
    for _ in 0..layout.processes {
        text.push_str(&format!(
            "[[dataflow.processes]]\naddress = \"127.0.0.1:{}\"\nworkers = {}\n\n",
            free_port()?,
            layout.workers
        ));
    }
    Ok(text)
}

/// Runs `dima up MANIFEST --job JOB` as a user would; returns its wall time
/// and its result line.
fn timed_up(
    exe: &Path,
    manifest: &Path,
    job: &str,
    layout: Layout,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let started = Instant::now();
    let output = Command::new(exe)
        .arg("up")
        .arg(manifest)
        .args(["--job", job])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running dima up")?;
    let elapsed = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("dima up ({layout}) failed: {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let got = serde_json::from_str(last).with_context(|| format!("result line {last:?}"))?;
    Ok((elapsed, got))
}

/// Writes a loopback manifest for `layout` running `job`.
pub fn write_manifest(path: &Path, layout: Layout, job: &CountJob) -> anyhow::Result<()> {
    let mut text = manifest_head(layout)?;
    text.push_str(&format!(
        "[jobs.count]\nevents = {}\nkeys = {}\nseed = {}\nepoch_events = {}\nmax_epochs_in_flight = {}\n",
        job.events, job.keys, job.seed, job.epoch_events, job.max_epochs_in_flight
    ));
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs the benchmark and prints one JSON line per layout on stdout.
pub fn bench_count(
    exe: &Path,
    job: &CountJob,
    layouts: &[Layout],
    repeat: usize,
) -> anyhow::Result<()> {
    let repeat = repeat.max(1);
    let mut anchor_times = Vec::new();
    let mut expected = None;
    for _ in 0..repeat {
        let started = Instant::now();
        expected = Some(count_sequential(job));
        anchor_times.push(started.elapsed().as_secs_f64());
    }
    let expected = expected.map(|s| s.to_json()).unwrap_or_default();
    let anchor_s = median(anchor_times);
    let anchor_rate = job.events as f64 / anchor_s;
    eprintln!(
        "anchor (sequential loop, one thread): {:.3} s, {:.0} events/s",
        anchor_s, anchor_rate
    );

    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    for layout in layouts {
        let manifest = dir.path().join(format!("bench-{layout}.toml"));
        let mut times = Vec::new();
        for _ in 0..repeat {
            write_manifest(&manifest, *layout, job)?;
            let (elapsed, got) = timed_up(exe, &manifest, "count", *layout)?;
            if got != expected {
                bail!("layout {layout}: result {got} differs from the anchor's {expected}");
            }
            times.push(elapsed);
        }
        let wall_s = median(times);
        let rate = job.events as f64 / wall_s;
        println!(
            "{}",
            serde_json::json!({
                "bench": "count",
                "layout": layout.to_string(),
                "events": job.events,
                "repeat": repeat,
                "wall_s": wall_s,
                "events_per_s": rate,
                "anchor": "sequential",
                "anchor_wall_s": anchor_s,
                "anchor_events_per_s": anchor_rate,
                "ratio_to_anchor": rate / anchor_rate,
                "result_matches_anchor": true,
            })
        );
    }
    Ok(())
}

/// The llama.cpp anchor script, run with the machine's python3.
const LLAMA_CPP_BENCH: &str = include_str!("../../scripts/reference/llama_cpp_bench.py");

/// `dima bench generate`: prefill and decode speed of Gemma on this CPU,
/// next to llama.cpp on the same file, prompt and thread count, same run.
///
/// The prompt is `prompt_tokens` ids (BOS, then a fixed English text,
/// repeated as needed); decoding is greedy for `new_tokens` steps and does
/// A benchmark prompt of `len` tokens: BOS, then a fixed English text
/// repeated, starting `offset` tokens into it.
fn bench_prompt(tokenizer: &actors::Tokenizer, len: usize, offset: usize) -> Vec<u32> {
    let text = "The river carried the boat past quiet villages, old mills and green fields, \
                while the travellers counted bridges and told stories about the towns they had left behind. ";
    let unit = tokenizer.encode(text, false, false);
    let mut ids = vec![tokenizer.bos()];
    ids.extend(unit.iter().cycle().skip(offset).take(len.saturating_sub(1)));
    ids
}

/// The levels of a scaling benchmark: 1 (the anchor) and every positive
/// level asked for, ascending, once each.
fn levels_with_one(asked: &[usize]) -> Vec<usize> {
    let mut levels: Vec<usize> = std::iter::once(1)
        .chain(asked.iter().copied().filter(|l| *l > 0))
        .collect();
    levels.sort_unstable();
    levels.dedup();
    levels
}

/// not stop at end-of-generation tokens, so both sides do the same work.
pub fn bench_generate(
    model_path: &Path,
    prompt_tokens: usize,
    new_tokens: usize,
    threads: usize,
    python: &str,
) -> anyhow::Result<serde_json::Value> {
    use actors::gemma::{Gemma, argmax};
    let gemma = Gemma::load(model_path)?;
    let ids = bench_prompt(gemma.tokenizer(), prompt_tokens, 0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()?;
    let (prefill_s, decode_s) = pool.install(|| {
        let mut cache = gemma.new_cache();
        let mut logits = vec![0f32; gemma.config().vocab];
        let started = Instant::now();
        gemma.prefill(&ids, &mut cache, Some(&mut logits))?;
        let prefill_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for _ in 0..new_tokens {
            let next = argmax(&logits);
            gemma.forward(next, &mut cache, Some(&mut logits))?;
        }
        Ok::<_, kernels::collective::CollectiveError>((prefill_s, started.elapsed().as_secs_f64()))
    })?;
    let prefill = ids.len() as f64 / prefill_s;
    let decode = new_tokens as f64 / decode_s;

    let anchor = Command::new(python)
        .args(["-c", LLAMA_CPP_BENCH])
        .arg(model_path)
        .arg(serde_json::to_string(&ids)?)
        .arg(new_tokens.to_string())
        .arg(threads.to_string())
        .stdin(Stdio::null())
        .output();
    let anchor = match anchor {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            serde_json::from_str::<serde_json::Value>(text.lines().last().unwrap_or_default()).ok()
        }
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            eprintln!(
                "anchor unavailable (install llama-cpp-python, see scripts/reference/llama_cpp_gemma3.py): {}",
                err.lines().last().unwrap_or_default()
            );
            None
        }
        Err(e) => {
            eprintln!("anchor unavailable: cannot run {python}: {e}");
            None
        }
    };
    let field = |key: &str| anchor.as_ref().and_then(|a| a[key].as_f64());
    let (anchor_prefill, anchor_decode) =
        (field("prefill_tokens_per_s"), field("decode_tokens_per_s"));
    Ok(serde_json::json!({
        "bench": "generate",
        "model": model_path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "kernel": format!("{:?}", kernels::quant::Kernel::detect()),
        "threads": threads,
        "prompt_tokens": ids.len(),
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": decode,
        "anchor": anchor.as_ref().map(|a| format!("llama.cpp (llama-cpp-python {})", a["version"].as_str().unwrap_or("?"))),
        "anchor_prefill_tokens_per_s": anchor_prefill,
        "anchor_decode_tokens_per_s": anchor_decode,
        "prefill_ratio": anchor_prefill.map(|a| prefill / a),
        "decode_ratio": anchor_decode.map(|a| decode / a),
    }))
}

/// One row of `dima bench events`.
fn events_row(
    source: &str,
    layout: &str,
    events: u64,
    wall_s: f64,
    ceiling: &str,
    ceiling_s: f64,
) -> serde_json::Value {
    let rate = events as f64 / wall_s;
    let ceiling_rate = events as f64 / ceiling_s;
    serde_json::json!({
        "bench": "events",
        "source": source,
        "layout": layout,
        "events": events,
        "wall_s": wall_s,
        "events_per_s": rate,
        "ceiling": ceiling,
        "ceiling_wall_s": ceiling_s,
        "ceiling_events_per_s": ceiling_rate,
        "ratio_to_ceiling": rate / ceiling_rate,
    })
}

/// Runs the `ads` pipeline (parse, validate, keyed exchange, count) over
/// `source_toml` on `layout` with `dima up`; returns the wall time after
/// checking that every event was read.
fn time_pipeline(
    exe: &Path,
    dir: &Path,
    layout: Layout,
    source_toml: &str,
    events: u64,
) -> anyhow::Result<f64> {
    let manifest = dir.join(format!("events-{layout}.toml"));
    let mut text = manifest_head(layout)?;
    text.push_str("[pipelines.ads]\nepoch_events = 20000\n\n[pipelines.ads.source]\n");
    text.push_str(source_toml);
    std::fs::write(&manifest, text).with_context(|| format!("writing {}", manifest.display()))?;
    let (elapsed, got) = timed_up(exe, &manifest, "pipelines", layout)?;
    let read = got["pipelines"][0]["read"].as_u64().unwrap_or(0);
    if read != events {
        bail!("layout {layout}: read {read} events, expected {events}");
    }
    Ok(elapsed)
}

/// `dima bench events`: events/s of the ads pipeline (parse + validate +
/// keyed exchange + count) from JSONL and, given a broker, from Kafka, per
/// layout, next to the ceiling of each source measured in the same run: one
/// thread reading the file's lines, and one plain rdkafka consumer draining
/// the topic (no parsing).
pub fn bench_events(
    exe: &Path,
    events: u64,
    layouts: &[Layout],
    repeat: usize,
    kafka: Option<&str>,
) -> anyhow::Result<()> {
    use std::io::BufRead;

    use dataflows::events::Family;
    use dataflows::pipelines::GeneratorSpec;

    let repeat = repeat.max(1);
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("ads.jsonl");
    let spec = GeneratorSpec {
        events,
        seed: 1,
        ..GeneratorSpec::new(Family::Ads)
    };
    crate::events::generate(&spec, &format!("jsonl:{}", path.display()), 4)?;

    let mut ceiling = Vec::new();
    for _ in 0..repeat {
        let started = Instant::now();
        let file = std::fs::File::open(&path)?;
        let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
        let mut line = Vec::new();
        let mut lines = 0u64;
        while reader.read_until(b'\n', &mut line)? > 0 {
            lines += 1;
            line.clear();
        }
        anyhow::ensure!(lines == events, "read {lines} lines of {events}");
        ceiling.push(started.elapsed().as_secs_f64());
    }
    let ceiling_s = median(ceiling);
    for layout in layouts {
        let mut times = Vec::new();
        for _ in 0..repeat {
            let source = format!("kind = \"jsonl\"\npath = \"{}\"\n", path.display());
            times.push(time_pipeline(exe, dir.path(), *layout, &source, events)?);
        }
        let row = events_row(
            "jsonl",
            &layout.to_string(),
            events,
            median(times),
            "line read, 1 thread",
            ceiling_s,
        );
        println!("{row}");
    }

    let Some(brokers) = kafka else {
        eprintln!("no --kafka BROKERS: Kafka rows skipped");
        return Ok(());
    };
    let topic = format!("dima-bench-{}", std::process::id());
    crate::events::generate(&spec, &format!("kafka:{brokers}/{topic}"), 4)?;
    let mut ceiling = Vec::new();
    for _ in 0..repeat {
        let started = Instant::now();
        dataflows::pipelines::kafka::drain_topic(brokers, &topic, events)
            .map_err(anyhow::Error::msg)?;
        ceiling.push(started.elapsed().as_secs_f64());
    }
    let ceiling_s = median(ceiling);
    for (run, layout) in layouts.iter().enumerate() {
        let mut times = Vec::new();
        for attempt in 0..repeat {
            let source = format!(
                "kind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup = \"bench-{run}-{attempt}-{}\"\nstop_at_end = true\n",
                std::process::id()
            );
            times.push(time_pipeline(exe, dir.path(), *layout, &source, events)?);
        }
        let row = events_row(
            "kafka",
            &layout.to_string(),
            events,
            median(times),
            "rdkafka consumer, 1 thread, no parsing",
            ceiling_s,
        );
        println!("{row}");
    }
    Ok(())
}

/// One policy's results over the seeds of [`bench_dispatch`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct PolicyRuns {
    /// The policy.
    pub policy: &'static str,
    /// Served rate per seed, in seed order.
    pub served_rate: Vec<f64>,
    /// Mean served rate.
    pub mean: f64,
    /// Sample standard deviation of the served rate.
    pub std: f64,
    /// Mean served rate per simulated hour (the learning curve).
    pub hourly: Vec<f64>,
    /// Mean revenue per online driver hour.
    pub revenue_per_driver_hour: f64,
    /// Mean median wait, s.
    pub wait_p50_s: f64,
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Runs a scenario under every policy for each seed (the same riders for
/// every policy of one seed), on all cores, and summarises per policy.
pub fn bench_dispatch(
    scenario: &dataflows::matching::Scenario,
    seeds: &[u64],
    hours: f64,
) -> Vec<PolicyRuns> {
    use dataflows::matching::{Policy, simulate};
    use rayon::prelude::*;
    let policies = [Policy::Value, Policy::Myopic, Policy::Nearest];
    let jobs: Vec<(Policy, u64)> = policies
        .iter()
        .flat_map(|p| seeds.iter().map(move |s| (*p, *s)))
        .collect();
    let reports: Vec<_> = jobs
        .par_iter()
        .map(|(p, s)| simulate(scenario, *p, hours, *s))
        .collect();
    policies
        .iter()
        .map(|policy| {
            let runs: Vec<_> = reports
                .iter()
                .filter(|r| r.policy == policy.name())
                .collect();
            let rates: Vec<f64> = runs.iter().map(|r| r.served_rate).collect();
            let (mean, std) = mean_std(&rates);
            let hours_seen = runs
                .iter()
                .map(|r| r.hourly_served_rate.len())
                .min()
                .unwrap_or(0);
            let hourly = (0..hours_seen)
                .map(|h| {
                    runs.iter().map(|r| r.hourly_served_rate[h]).sum::<f64>() / runs.len() as f64
                })
                .collect();
            let avg = |f: &dyn Fn(&dataflows::matching::SimReport) -> f64| {
                runs.iter().map(|r| f(r)).sum::<f64>() / runs.len() as f64
            };
            PolicyRuns {
                policy: policy.name(),
                served_rate: rates,
                mean,
                std,
                hourly,
                revenue_per_driver_hour: avg(&|r| r.revenue_per_driver_hour),
                wait_p50_s: avg(&|r| r.wait_p50_s),
            }
        })
        .collect()
}

/// The relative gain of `a` over `b` per seed: mean and sample standard deviation.
pub fn gain(a: &PolicyRuns, b: &PolicyRuns) -> (f64, f64) {
    let gains: Vec<f64> = a
        .served_rate
        .iter()
        .zip(&b.served_rate)
        .map(|(x, y)| x / y - 1.0)
        .collect();
    mean_std(&gains)
}

/// Draws the learning curves (served rate per simulated hour, mean over
/// seeds) of every policy into an SVG or PNG file.
pub fn plot_learning(path: &Path, title: &str, runs: &[PolicyRuns]) -> anyhow::Result<()> {
    let series: Vec<crate::plot::Series> = runs
        .iter()
        .map(|run| crate::plot::Series {
            name: run.policy.to_owned(),
            points: run
                .hourly
                .iter()
                .enumerate()
                .map(|(h, v)| (h as f64 + 0.5, *v))
                .collect(),
        })
        .collect();
    crate::plot::line_chart(path, title, "simulated hour", "served rate", &series)
}

/// One row of `dima bench assign`: our solver and its anchor on one problem.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AssignRow {
    /// `dense` (n × n, minimise, complete) or `sparse` (N × N, k nearest,
    /// maximise, unmatched allowed).
    pub kind: &'static str,
    /// Rows (= columns).
    pub n: usize,
    /// Allowed pairs.
    pub edges: usize,
    /// Our median solve time, ms.
    pub dima_ms: f64,
    /// Our objective.
    pub dima_objective: f64,
    /// The anchor's name and version.
    pub anchor: String,
    /// The anchor's median time, ms.
    pub anchor_ms: f64,
    /// The anchor's objective.
    pub anchor_objective: f64,
    /// anchor_ms / dima_ms (above 1: we are faster).
    pub speedup: f64,
}

fn median_ms<T>(repeat: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let started = std::time::Instant::now();
        last = Some(f());
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let result = last.unwrap_or_else(|| unreachable!("at least one run"));
    (median(times), result)
}

fn anchor(python: &str, args: &[String]) -> anyhow::Result<serde_json::Value> {
    run_script(python, "assignment_anchor.py", args)
}

/// Runs `scripts/bench/<name>` with `python`; its stdout's last line is JSON.
fn run_script(python: &str, name: &str, args: &[String]) -> anyhow::Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/bench")
        .join(name);
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} {} failed: {}",
            python,
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.trim().lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .with_context(|| format!("{} printed {last:?}, not JSON", script.display()))
}

/// A dense n × n cost matrix, uniform in [0, 1000).
pub fn dense_problem(n: usize, seed: u64) -> Vec<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n * n).map(|_| rng.random::<f64>() * 1000.0).collect()
}

/// A dispatch-shaped sparse problem: n riders and n drivers uniform in a
/// square of side √n · 0.15 km (about 44 per km²), each rider linked to its
/// `k` nearest drivers with weight 10 − 3·km + uniform noise in [−1, 1].
pub fn sparse_problem(n: usize, k: usize, seed: u64) -> dataflows::matching::Problem {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let side = (n as f64).sqrt() * 0.15;
    let mut point = || (rng.random::<f64>() * side, rng.random::<f64>() * side);
    let riders: Vec<(f64, f64)> = (0..n).map(|_| point()).collect();
    let drivers: Vec<(f64, f64)> = (0..n).map(|_| point()).collect();
    // A grid of 0.3 km buckets for the nearest-k search.
    let cell = 0.3;
    let cells = (side / cell).ceil() as usize + 1;
    let mut grid = vec![Vec::new(); cells * cells];
    let at = |x: f64| ((x / cell) as usize).min(cells - 1);
    for (j, (x, y)) in drivers.iter().enumerate() {
        grid[at(*y) * cells + at(*x)].push(j);
    }
    let mut edges = Vec::with_capacity(n * k);
    for (i, (x, y)) in riders.iter().enumerate() {
        let (cx, cy) = (at(*x) as i64, at(*y) as i64);
        let mut found: Vec<(f64, usize)> = Vec::new();
        let mut ring = 1i64;
        loop {
            found.clear();
            for gy in (cy - ring).max(0)..=(cy + ring).min(cells as i64 - 1) {
                for gx in (cx - ring).max(0)..=(cx + ring).min(cells as i64 - 1) {
                    for &j in &grid[gy as usize * cells + gx as usize] {
                        let d = ((drivers[j].0 - x).powi(2) + (drivers[j].1 - y).powi(2)).sqrt();
                        found.push((d, j));
                    }
                }
            }
            // Complete once the k-th nearest lies within the searched radius.
            found.sort_by(|a, b| a.0.total_cmp(&b.0));
            if found.len() >= k && found[k - 1].0 <= ring as f64 * cell || ring as usize > cells {
                break;
            }
            ring += 1;
        }
        for (d, j) in found.into_iter().take(k) {
            let noise = rng.random::<f64>() * 2.0 - 1.0;
            edges.push((i, j, 10.0 - 3.0 * d + noise));
        }
    }
    dataflows::matching::Problem {
        rows: n,
        cols: n,
        edges,
    }
}

/// Our dense and sparse solvers against scipy and OR-tools on the same
/// problems, in the same run.
pub fn bench_assign(
    dense: &[usize],
    sparse: &[usize],
    k: usize,
    repeat: usize,
    python: &str,
) -> anyhow::Result<Vec<AssignRow>> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for &n in dense {
        let cost = dense_problem(n, n as u64);
        let (dima_ms, columns) = median_ms(repeat, || dataflows::matching::hungarian(&cost, n, n));
        let columns = columns.ok_or_else(|| anyhow::anyhow!("dense {n}: no assignment"))?;
        let objective: f64 = columns
            .iter()
            .enumerate()
            .map(|(r, c)| cost[r * n + c])
            .sum();
        let path = dir.path().join(format!("dense-{n}.bin"));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for v in &cost {
            file.write_all(&v.to_le_bytes())?;
        }
        file.flush()?;
        drop(file);
        let a = anchor(
            python,
            &[
                "dense".into(),
                path.display().to_string(),
                n.to_string(),
                repeat.to_string(),
            ],
        )?;
        std::fs::remove_file(&path)?;
        rows.push(assign_row("dense", n, n * n, dima_ms, objective, &a));
    }
    for &n in sparse {
        let problem = sparse_problem(n, k, n as u64 + 1);
        let (dima_ms, solved) = median_ms(repeat, || problem.solve_sparse(true));
        let solved = solved?;
        let path = dir.path().join(format!("sparse-{n}.bin"));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for (r, _, _) in &problem.edges {
            file.write_all(&(*r as u32).to_le_bytes())?;
        }
        for (_, c, _) in &problem.edges {
            file.write_all(&(*c as u32).to_le_bytes())?;
        }
        for (_, _, w) in &problem.edges {
            file.write_all(&w.to_le_bytes())?;
        }
        file.flush()?;
        drop(file);
        let a = anchor(
            python,
            &[
                "sparse".into(),
                path.display().to_string(),
                n.to_string(),
                n.to_string(),
                problem.edges.len().to_string(),
                repeat.to_string(),
            ],
        )?;
        rows.push(assign_row(
            "sparse",
            n,
            problem.edges.len(),
            dima_ms,
            solved.objective,
            &a,
        ));
    }
    Ok(rows)
}

fn assign_row(
    kind: &'static str,
    n: usize,
    edges: usize,
    dima_ms: f64,
    dima_objective: f64,
    anchor: &serde_json::Value,
) -> AssignRow {
    let anchor_ms = anchor["ms"].as_f64().unwrap_or(f64::NAN);
    AssignRow {
        kind,
        n,
        edges,
        dima_ms,
        dima_objective,
        anchor: anchor["solver"].as_str().unwrap_or("?").to_owned(),
        anchor_ms,
        anchor_objective: anchor["objective"].as_f64().unwrap_or(f64::NAN),
        speedup: anchor_ms / dima_ms,
    }
}

/// `dima bench matching`: the dispatch pipeline with its matcher (value
/// policy) over a JSONL file of city events, through `dima up`, per layout.
/// The file's span of event time over the wall time of the run is the
/// simulated seconds per wall second; the matcher reports its window p99.
pub fn bench_matching(
    exe: &Path,
    input: &Path,
    layouts: &[Layout],
    repeat: usize,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    let (mut first, mut last, mut lines) = (i64::MAX, i64::MIN, 0u64);
    let file =
        std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        lines += 1;
        if let Ok(event) = dataflows::events::parse_line(&line) {
            first = first.min(event.event_time());
            last = last.max(event.event_time());
        }
    }
    anyhow::ensure!(
        first < last,
        "{}: no events with a time span",
        input.display()
    );
    let span_s = (last - first) as f64 / 1000.0;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    for layout in layouts {
        let mut runs = Vec::new();
        for _ in 0..repeat.max(1) {
            let manifest = dir.path().join(format!("matching-{layout}.toml"));
            let mut text = manifest_head(*layout)?;
            text.push_str(&format!(
                "[pipelines.dispatch]\nepoch_events = 20000\n\n[pipelines.dispatch.source]\nkind = \"jsonl\"\npath = \"{}\"\n\n[pipelines.dispatch.matching]\npolicy = \"value\"\n",
                input.display()
            ));
            std::fs::write(&manifest, text)
                .with_context(|| format!("writing {}", manifest.display()))?;
            let (elapsed, got) = timed_up(exe, &manifest, "pipelines", *layout)?;
            let p = &got["pipelines"][0];
            anyhow::ensure!(
                p["read"].as_u64() == Some(lines),
                "layout {layout}: read {} of {lines} lines",
                p["read"]
            );
            runs.push((elapsed, p["matching"].clone()));
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (wall_s, m) = runs.swap_remove(runs.len() / 2);
        println!(
            "{}",
            serde_json::json!({
                "bench": "matching",
                "layout": layout.to_string(),
                "events": lines,
                "simulated_s": span_s,
                "wall_s": wall_s,
                "simulated_s_per_wall_s": span_s / wall_s,
                "window_p99_ms": m["window_p99_ms"],
                "windows": m["windows"],
                "requests": m["requests"],
                "dispatched": m["dispatched"],
                "late_events": m["late_events"],
                "value_states": m["value_states"],
            })
        );
    }
    Ok(())
}

/// What `dima bench learner` runs: the learner over a logged CSV (the
/// columns as `dima learner evaluate` takes them), next to Vowpal Wabbit and
/// `lambda-learner` on the same file.
#[derive(Clone, Debug)]
pub struct LearnerBench {
    /// The log (header row; `.gz` is decompressed).
    pub input: std::path::PathBuf,
    /// The entity column.
    pub entity_column: String,
    /// The label column.
    pub label_column: String,
    /// Fixed-effect features.
    pub features: Vec<String>,
    /// Random-effect features.
    pub entity_features: Vec<String>,
    /// Hashed categorical features of the fixed effect (columns, or
    /// columns crossed with `*`).
    pub hashed: Vec<String>,
    /// Hash bits of those features.
    pub hash_bits: u32,
    /// Rows per window.
    pub batch_size: usize,
    /// Windows before the scored rows: the fixed effect is fitted on them,
    /// δ and λ are tuned on them, VW's learning rate is chosen on them.
    pub warmup_batches: usize,
    /// δ and λ; tuned on the warm-up rows when `None`.
    pub params: Option<dataflows::learner::StepParams>,
    /// Full or diagonal precision.
    pub full: bool,
    /// Worker counts for the timely operator.
    pub workers: Vec<usize>,
    /// Timed runs per row; the median is reported.
    pub repeat: usize,
    /// A Python with `vowpalwabbit` and `lambda-learner`.
    pub python: String,
    /// Windows `lambda-learner` is timed on (it is ~300× slower).
    pub lambda_learner_batches: usize,
}

/// Opens a CSV, decompressing `.gz`.
pub fn open_log(path: &Path) -> anyhow::Result<Box<dyn std::io::BufRead>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(std::io::BufReader::with_capacity(1 << 16, file))
    })
}

/// Progressive logloss and AUC of the scores of rows at or after `first`.
fn scored_metrics(
    outputs: &[dataflows::learner::LearnerOutput],
    first: u64,
) -> (usize, Option<f64>, Option<f64>) {
    use dataflows::learner::LearnerOutput;
    let mut scored: Vec<(f64, f64)> = outputs
        .iter()
        .filter_map(|o| match o {
            LearnerOutput::Scored { id, p, y } if *id >= first => Some((*p, *y)),
            _ => None,
        })
        .collect();
    let logloss = dataflows::learner::ads::logloss(&scored);
    let auc = dataflows::learner::ads::auc(&mut scored);
    (scored.len(), logloss, auc)
}

/// `dima bench learner`: learn examples per second of the sequential loop
/// and of the timely operator (per worker count), from memory and counting
/// the CSV parse, with progressive logloss and AUC over the rows after the
/// warm-up; then the anchors on the same file. Returns one JSON value per
/// row and a closing summary with the ratios.
pub fn bench_learner(b: &LearnerBench) -> anyhow::Result<Vec<serde_json::Value>> {
    use dataflows::learner::evaluate::{EvalConfig, fit_fixed_effect, read_csv_hashed, tune};
    use dataflows::learner::{LearnerConfig, StepParams, learn_in_process, learn_sequential};

    let read = || -> anyhow::Result<dataflows::learner::evaluate::Dataset> {
        read_csv_hashed(
            open_log(&b.input)?,
            &b.entity_column,
            &b.label_column,
            &b.features,
            &b.entity_features,
            &b.hashed,
            b.hash_bits,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", b.input.display()))
    };
    let (parse_ms, data) = median_ms(b.repeat, read);
    let data = data?;
    let n = data.len();
    let warm_rows = b.warmup_batches * b.batch_size;
    if b.batch_size == 0 || n <= warm_rows {
        anyhow::bail!(
            "{} rows leave nothing to score after {} warm-up batches of {}",
            n,
            b.warmup_batches,
            b.batch_size
        );
    }
    let (params, tuned) = match b.params {
        Some(p) => (p, false),
        None => {
            let config = EvalConfig {
                batch_size: b.batch_size,
                warmup_batches: b.warmup_batches,
                params: StepParams {
                    delta: 0.8,
                    lambda: 1.0,
                },
                refit_every: 10,
                full: b.full,
            };
            let (delta, lambda) = tune(&data, &config)?;
            (StepParams { delta, lambda }, true)
        }
    };
    let fixed = fit_fixed_effect(&data, 0..warm_rows, params.lambda)?;
    let config = LearnerConfig {
        p: data.pr,
        params,
        full: b.full,
        fixed: None,
    };
    let (build_ms, _) = median_ms(b.repeat, || data.windows(b.batch_size, &fixed));
    let mut rows = Vec::new();
    let row = |run: &str,
               workers: usize,
               learn_ms: f64,
               outputs: &[dataflows::learner::LearnerOutput]| {
        let (scored, logloss, auc) = scored_metrics(outputs, warm_rows as u64);
        let failed = outputs
            .iter()
            .filter(|o| matches!(o, dataflows::learner::LearnerOutput::Failed { .. }))
            .count();
        serde_json::json!({
            "bench": "learner",
            "side": "dima",
            "run": run,
            "workers": workers,
            "examples": n,
            "seconds": learn_ms / 1000.0,
            "examples_per_s": n as f64 / (learn_ms / 1000.0),
            "from_file_examples_per_s": n as f64 / ((parse_ms + build_ms + learn_ms) / 1000.0),
            "scored": scored,
            "logloss": logloss,
            "auc": auc,
            "failed_updates": failed,
        })
    };
    // The oracle loop: one thread, no dataflow.
    let windows = data.windows(b.batch_size, &fixed);
    let (ms, (_, outputs)) = median_ms(b.repeat, || learn_sequential(&windows, &config));
    rows.push(row("sequential", 1, ms, &outputs));
    drop(windows);
    for &workers in &b.workers {
        let mut times = Vec::new();
        let mut last = Vec::new();
        for _ in 0..b.repeat.max(1) {
            let windows = data.windows(b.batch_size, &fixed);
            let started = std::time::Instant::now();
            last = learn_in_process(windows, config, workers).map_err(anyhow::Error::msg)?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        rows.push(row("operator", workers, median(times), &last));
    }

    let input = b.input.display().to_string();
    let columns = [
        input,
        "--entity-column".into(),
        b.entity_column.clone(),
        "--label-column".into(),
        b.label_column.clone(),
        format!("--features={}", b.features.join(",")),
        format!("--entity-features={}", b.entity_features.join(",")),
    ];
    let mut vw_args = vec!["vw".to_owned()];
    vw_args.extend(columns.iter().cloned());
    vw_args.extend([
        format!("--hashed-features={}", b.hashed.join(",")),
        format!("--warmup-rows={warm_rows}"),
        format!("--repeat={}", b.repeat.max(1)),
    ]);
    let hint = "needs `pip install vowpalwabbit==9.11.9 lambda-learner==0.1.0 'scipy<1.18' scikit-learn` in --python";
    let mut vw = run_script(&b.python, "learner_anchors.py", &vw_args).context(hint)?;
    vw["bench"] = "learner".into();
    vw["side"] = "anchor".into();
    // lambda-learner gets the fixed effect's scores as offsets, row by row.
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let offsets_path = scratch.path().join("offsets.txt");
    let ll_rows = (b.lambda_learner_batches.max(1) * b.batch_size).min(n);
    let offsets: String = (0..ll_rows)
        .map(|i| format!("{:e}\n", data.fixed_score(i, &fixed)))
        .collect();
    std::fs::write(&offsets_path, offsets)
        .with_context(|| format!("writing {}", offsets_path.display()))?;
    let mut ll_args = vec!["lambda-learner".to_owned()];
    ll_args.extend(columns.iter().cloned());
    ll_args.extend([
        format!("--batch-size={}", b.batch_size),
        format!("--batches={}", b.lambda_learner_batches.max(1)),
        format!("--offsets={}", offsets_path.display()),
        format!("--delta={}", params.delta),
        format!("--lambda={}", params.lambda),
        format!("--hessian={}", if b.full { "full" } else { "diagonal" }),
    ]);
    let mut ll = run_script(&b.python, "learner_anchors.py", &ll_args).context(hint)?;
    ll["bench"] = "learner".into();
    ll["side"] = "anchor".into();

    let rate = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let vw_rate = rate(&vw, "examples_per_s");
    let ll_rate = rate(&ll, "examples_per_s");
    let mut ratios = serde_json::Map::new();
    for r in &rows {
        let name = match r["run"].as_str() {
            Some("sequential") => "sequential".to_owned(),
            _ => format!("operator_{}w", r["workers"]),
        };
        ratios.insert(
            format!("{name}_over_vw"),
            (rate(r, "examples_per_s") / vw_rate).into(),
        );
        ratios.insert(
            format!("{name}_from_file_over_vw"),
            (rate(r, "from_file_examples_per_s") / vw_rate).into(),
        );
        ratios.insert(
            format!("{name}_over_lambda_learner"),
            (rate(r, "examples_per_s") / ll_rate).into(),
        );
    }
    let summary = serde_json::json!({
        "bench": "learner",
        "summary": true,
        "input": b.input.display().to_string(),
        "rows": n,
        "scored_from_row": warm_rows,
        "params": {"delta": params.delta, "lambda": params.lambda, "tuned": tuned, "hessian": if b.full { "full" } else { "diagonal" }},
        "hashed_features": b.hashed,
        "hash_bits": if b.hashed.is_empty() { 0 } else { b.hash_bits },
        "parse_s": parse_ms / 1000.0,
        "build_windows_s": build_ms / 1000.0,
        "ratios": ratios,
        "logloss": {"dima": rows[0]["logloss"], "vw": vw["logloss"]},
        "auc": {"dima": rows[0]["auc"], "vw": vw["auc"]},
    });
    rows.push(vw);
    rows.push(ll);
    rows.push(summary);
    Ok(rows)
}

/// `dima bench decode`: aggregate decode tokens per second when `batch`
/// sequences take each step together ([`actors::gemma::Gemma::decode`]),
/// for each batch size, next to one sequence alone in the same run (the
/// anchor, batch 1). Each sequence has its own prompt of `prompt_tokens`
/// tokens, prefilled first (not timed); then `steps` greedy steps are
/// timed. One JSON value per batch size.
pub fn bench_decode(
    gemma: &actors::gemma::Gemma,
    batches: &[usize],
    prompt_tokens: usize,
    steps: usize,
    threads: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    use actors::gemma::{KvCache, argmax};
    let vocab = gemma.config().vocab;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()?;
    let sizes = levels_with_one(batches);
    let mut rows = Vec::new();
    let mut single = None;
    for &b in &sizes {
        let (seconds, generated) = pool.install(|| -> anyhow::Result<(f64, usize)> {
            let mut caches: Vec<KvCache> = Vec::with_capacity(b);
            let mut next = Vec::with_capacity(b);
            let mut logits = vec![0f32; vocab];
            for s in 0..b {
                // Different prompts: each starts at its own offset of the text.
                let ids = bench_prompt(gemma.tokenizer(), prompt_tokens, s * 7);
                let mut cache = gemma.new_cache();
                gemma.prefill(&ids, &mut cache, Some(&mut logits))?;
                next.push(argmax(&logits));
                caches.push(cache);
            }
            let mut step_logits = vec![0f32; b * vocab];
            let started = Instant::now();
            for _ in 0..steps {
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                gemma.decode(&next, &mut refs, &mut step_logits)?;
                for (t, row) in next.iter_mut().zip(step_logits.chunks_exact(vocab)) {
                    *t = argmax(row);
                }
            }
            Ok((started.elapsed().as_secs_f64(), b * steps))
        })?;
        let rate = generated as f64 / seconds;
        let base = *single.get_or_insert(rate);
        rows.push(serde_json::json!({
            "bench": "decode",
            "batch": b,
            "prompt_tokens": prompt_tokens,
            "steps": steps,
            "threads": threads,
            "seconds": seconds,
            "tokens_per_s": rate,
            "per_sequence_tokens_per_s": rate / b as f64,
            "over_batch_1": rate / base,
            "weight_bytes": gemma.weight_bytes(),
            "weight_bytes_per_s": gemma.weight_bytes() as f64 * steps as f64 / seconds,
        }));
    }
    Ok(rows)
}

/// One streaming completion against `address`: (time to the first event,
/// gaps between later events, completion tokens). Reads the server-sent
/// events as they arrive.
pub(crate) fn stream_once(
    address: &str,
    model: &str,
    prompt: &str,
    max_tokens: usize,
    api_key: Option<&str>,
) -> anyhow::Result<(f64, Vec<f64>, u64)> {
    use std::io::{BufRead, Write};
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "stream": true,
    })
    .to_string();
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(600)))?;
    let auth = api_key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let reader = std::io::BufReader::new(stream);
    let (mut first, mut last, mut gaps, mut tokens) = (None, None, Vec::new(), 0u64);
    for line in reader.lines() {
        let line = line?;
        if line.starts_with("HTTP/1.1 ") && !line.starts_with("HTTP/1.1 200") {
            bail!("{line}");
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let now = started.elapsed().as_secs_f64();
        match last {
            None => first = Some(now),
            Some(t) => gaps.push(now - t),
        }
        last = Some(now);
        let chunk: serde_json::Value = serde_json::from_str(data)?;
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    let first = first.context("no events in the stream")?;
    Ok((first, gaps, tokens))
}

pub(crate) fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let at = ((values.len() - 1) as f64 * q).round() as usize;
    values[at]
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
                            .map(|p| stream_once(&address, &model, p, max_tokens, None))
                            .collect::<anyhow::Result<Vec<_>>>()
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
                for (f, g, t) in runs {
                    first.push(f);
                    gaps.extend(g);
                    tokens += t;
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
