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
    let path = cluster::models::gguf_path("gemma3-270m").unwrap();
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
    let path = cluster::models::gguf_path("gemma3-270m").unwrap();
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
