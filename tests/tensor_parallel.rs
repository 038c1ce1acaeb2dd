//! Tensor parallelism on the real Gemma 3 270M model: ranks in one process
//! (threads joined by `kernels::collective::local_group`) give the same
//! greedy tokens as one rank, and logits within 1e-3.

use std::time::Duration;

use actors::gemma::{Gemma, argmax};
use kernels::collective::local_group;

/// Prompt plus greedy continuation: each step's logits and chosen token.
struct Run {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    weight_bytes: usize,
}

/// Every rank of a `tp`-way group runs the same greedy decode; rank 0's
/// view is returned (every rank gets the same logits).
fn greedy(tp: usize, prompt: &str, steps: usize) -> Vec<Run> {
    let path = actors::models::gguf_path("gemma3-270m").unwrap();
    let prompt = prompt.to_owned();
    let handles: Vec<_> = local_group(tp, Duration::from_secs(60))
        .into_iter()
        .map(|rank| {
            let (path, prompt) = (path.clone(), prompt.clone());
            std::thread::spawn(move || {
                let gemma = Gemma::load_rank(&path, tp, Box::new(rank), |_, _| {}).unwrap();
                let ids = gemma.tokenizer().encode(&prompt, true, false);
                let vocab = gemma.config().vocab;
                let mut cache = gemma.new_cache();
                let mut logits = vec![0f32; vocab];
                gemma.prefill(&ids, &mut cache, Some(&mut logits)).unwrap();
                let mut run = Run {
                    tokens: Vec::new(),
                    logits: Vec::new(),
                    weight_bytes: gemma.weight_bytes(),
                };
                for _ in 0..steps {
                    let next = argmax(&logits);
                    run.tokens.push(next);
                    run.logits.push(logits.clone());
                    gemma.forward(next, &mut cache, Some(&mut logits)).unwrap();
                }
                run
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn tp_2_and_4_in_process_match_one_rank() {
    let prompt = "The capital of France is";
    let steps = 6;
    let one = greedy(1, prompt, steps).remove(0);
    for tp in [2, 4] {
        let ranks = greedy(tp, prompt, steps);
        for (r, run) in ranks.iter().enumerate() {
            assert_eq!(run.tokens, one.tokens, "tp={tp} rank {r}: greedy tokens");
            let worst = run
                .logits
                .iter()
                .zip(&one.logits)
                .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
                .fold(0f32, f32::max);
            eprintln!(
                "tp={tp} rank {r}: tokens {:?}, largest logit difference from tp=1 {worst:e}, weights {} of {} bytes",
                run.tokens, run.weight_bytes, one.weight_bytes
            );
            assert!(worst < 1e-3, "tp={tp} rank {r}: logits differ by {worst}");
            // Each rank holds its slices only: well under the whole model.
            assert!(
                run.weight_bytes < one.weight_bytes * 2 / tp,
                "tp={tp} rank {r}: {} of {} weight bytes",
                run.weight_bytes,
                one.weight_bytes
            );
        }
        // Every rank computed the same logits.
        for run in &ranks[1..] {
            assert!(run.logits == ranks[0].logits, "tp={tp}: ranks disagree");
        }
    }
}

#[test]
fn impossible_layouts_and_mismatched_groups_are_load_errors() {
    let path = actors::models::gguf_path("gemma3-270m").unwrap();
    let mut ranks = local_group(3, Duration::from_secs(1));
    let err = Gemma::load_rank(&path, 3, Box::new(ranks.remove(0)), |_, _| {}).unwrap_err();
    assert_eq!(err.to_string(), "tp=3 does not divide 4 query heads");
    let mut ranks = local_group(2, Duration::from_secs(1));
    let err = Gemma::load_rank(&path, 4, Box::new(ranks.remove(1)), |_, _| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tp=4 needs a 4-rank collective, but this one has 2 ranks (this is rank 1)"
    );
}

fn generate_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "generate",
        "--model",
        "gemma3-270m",
        "--prompt",
        "The capital of France is",
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    args
}

/// `dima generate --tp 2` as threads of one process, and as two processes
/// (`--rank 0` and `--rank 1` over TCP on loopback), print exactly what
/// one rank prints.
#[test]
fn generate_with_tp_2_in_one_process_and_across_two_matches_one_rank() {
    let limit = Duration::from_secs(300);
    let one = dima_tests::run_dima(&generate_args(&["--max-tokens", "12"]), limit);
    one.assert_success();
    let threads = dima_tests::run_dima(&generate_args(&["--max-tokens", "12", "--tp", "2"]), limit);
    threads.assert_success();
    assert_eq!(threads.last_line(), one.last_line());

    let root = format!("127.0.0.1:{}", dima_tests::free_port());
    let peer = dima_tests::spawn_dima(&generate_args(&[
        "--max-tokens",
        "12",
        "--tp",
        "2",
        "--rank",
        "1",
        "--root",
        &root,
    ]));
    let lead = dima_tests::run_dima(
        &generate_args(&[
            "--max-tokens",
            "12",
            "--tp",
            "2",
            "--rank",
            "0",
            "--root",
            &root,
        ]),
        limit,
    );
    lead.assert_success();
    assert_eq!(lead.last_line(), one.last_line());
    let peer = dima_tests::wait(peer, limit);
    peer.assert_success();
    assert!(
        peer.stdout.trim().is_empty(),
        "rank 1 prints nothing: {}",
        peer.stdout
    );
}

/// Killing one rank's process mid-generation: the other rank stops with an
/// error naming it, within the collective timeout, instead of hanging.
#[test]
fn a_killed_rank_stops_the_other_with_a_clear_error() {
    let root = format!("127.0.0.1:{}", dima_tests::free_port());
    let common = [
        "--max-tokens",
        "2000",
        "--tp",
        "2",
        "--root",
        &root,
        "--collective-timeout",
        "5",
    ];
    let mut lead_args = common.to_vec();
    lead_args.extend(["--rank", "0"]);
    let mut peer_args = common.to_vec();
    peer_args.extend(["--rank", "1"]);
    let lead = dima_tests::spawn_dima(&generate_args(&lead_args));
    let mut peer = dima_tests::spawn_dima(&generate_args(&peer_args));
    // Let both load and start decoding, then kill rank 1.
    std::thread::sleep(Duration::from_secs(4));
    peer.kill().unwrap();
    let _ = peer.wait();
    let started = std::time::Instant::now();
    let done = dima_tests::wait(lead, Duration::from_secs(60));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "rank 0 took {:?}",
        started.elapsed()
    );
    assert!(!done.status.success(), "{}", done.stderr);
    assert!(done.stderr.contains("rank 1 went away"), "{}", done.stderr);
    done.assert_no_panic();
}

/// Random weights in the real shapes: each rank holds exactly the bytes
/// `random_weight_bytes` announced before allocating, the ranks of a
/// group run in lockstep to finite logits, and the same seed gives the
/// same model. A type whose blocks do not fit the rows is named.
#[test]
fn random_weights_have_the_announced_shapes_and_run_sharded() {
    use actors::gemma::GemmaConfig;
    use kernels::gguf::GgmlType;
    let config = GemmaConfig::preset("270m").unwrap();
    let tokenizer = || actors::Tokenizer::synthetic(config.vocab).unwrap();
    let one = |seed| {
        Gemma::random(
            config.clone(),
            tokenizer(),
            GgmlType::Q8_0,
            seed,
            Box::new(kernels::collective::SingleRank),
        )
        .unwrap()
    };
    let last_logits = |g: &Gemma| {
        let mut cache = g.new_cache();
        let mut logits = vec![0f32; g.config().vocab];
        g.prefill(&[2, 300, 301, 302], &mut cache, Some(&mut logits))
            .unwrap();
        logits
    };
    let a = one(5);
    assert_eq!(
        a.weight_bytes(),
        Gemma::random_weight_bytes(&config, 1, 0, GgmlType::Q8_0).unwrap()
    );
    let la = last_logits(&a);
    assert!(la.iter().all(|v| v.is_finite()));
    assert_eq!(la, last_logits(&one(5)), "same seed, same model");
    assert_ne!(la, last_logits(&one(6)));

    let handles: Vec<_> = local_group(2, Duration::from_secs(60))
        .into_iter()
        .map(|link| {
            let config = config.clone();
            std::thread::spawn(move || {
                let g = Gemma::random(
                    config.clone(),
                    actors::Tokenizer::synthetic(config.vocab).unwrap(),
                    GgmlType::BF16,
                    9,
                    Box::new(link),
                )
                .unwrap();
                let rank = g.shard().rank;
                let announced =
                    Gemma::random_weight_bytes(&config, 2, rank, GgmlType::BF16).unwrap();
                let mut cache = g.new_cache();
                let mut logits = vec![0f32; config.vocab];
                g.prefill(&[2, 300, 301], &mut cache, Some(&mut logits))
                    .unwrap();
                (g.weight_bytes(), announced, logits)
            })
        })
        .collect();
    let ranks: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (held, announced, logits) in &ranks {
        assert_eq!(held, announced);
        assert!(logits.iter().all(|v| v.is_finite()));
        assert_eq!(logits, &ranks[0].2, "every rank ends with the same logits");
    }

    let e = Gemma::random(
        config.clone(),
        tokenizer(),
        GgmlType::Q4K,
        1,
        Box::new(kernels::collective::SingleRank),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rows of 640 values are not whole 256-value blocks of q4_K"),
        "{e}"
    );
}

/// `--random-weights` announces the memory it needs and refuses, before
/// allocating, what the machine (here capped by DIMA_MEMORY_LIMIT) cannot
/// hold.
#[test]
fn random_weights_refuse_what_does_not_fit() {
    let run = |model: &str| {
        std::process::Command::new(dima_tests::dima_bin())
            .args([
                "bench",
                "decode",
                "--model",
                model,
                "--random-weights",
                "--batch",
                "2",
                "--prompt-tokens",
                "4",
                "--steps",
                "2",
            ])
            .env("DIMA_MEMORY_LIMIT", (1u64 << 30).to_string())
            .output()
            .unwrap()
    };
    let big = run("gemma3-27b");
    let err = String::from_utf8_lossy(&big.stderr);
    assert_eq!(big.status.code(), Some(1), "{err}");
    assert!(
        err.contains("gemma3-27b with random bf16 weights: 50.31 GiB of weights"),
        "{err}"
    );
    assert!(
        err.contains("needs 50.")
            && err.contains("has 1.00 GiB available")
            && err.contains("refusing"),
        "{err}"
    );
    let small = run("gemma3-270m");
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(small.status.success(), "{err}");
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&small.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r["tokens_per_s"].as_f64().unwrap() > 0.0)
    );
    let bad = run("gemma3-3b");
    assert_eq!(bad.status.code(), Some(2));
}
