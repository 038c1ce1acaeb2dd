//! Continuous batching's core on the real Gemma 3 270M model: one decode
//! step for several sequences at once gives each sequence what decoding it
//! alone gives.

use actors::gemma::{Gemma, KvCache, argmax};

fn model() -> Gemma {
    Gemma::load(&actors::models::gguf_path("gemma3-270m").unwrap()).unwrap()
}

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "1, 2, 3, 4,",
];

/// Greedy steps of one sequence alone: (tokens, logits per step).
fn alone(gemma: &Gemma, prompt: &str, steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let vocab = gemma.config().vocab;
    let ids = gemma.tokenizer().encode(prompt, true, false);
    let mut cache = gemma.new_cache();
    let mut logits = vec![0f32; vocab];
    gemma.prefill(&ids, &mut cache, Some(&mut logits)).unwrap();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        all.push(logits.clone());
        let next = argmax(&logits);
        tokens.push(next);
        gemma.forward(next, &mut cache, Some(&mut logits)).unwrap();
    }
    (tokens, all)
}

#[test]
fn a_batched_decode_step_equals_decoding_each_sequence_alone() {
    let gemma = model();
    let vocab = gemma.config().vocab;
    let steps = 5;
    let expected: Vec<_> = PROMPTS.iter().map(|p| alone(&gemma, p, steps)).collect();

    // Prefill each sequence, then decode all three together.
    let mut caches: Vec<KvCache> = Vec::new();
    let mut next = Vec::new();
    for p in PROMPTS {
        let ids = gemma.tokenizer().encode(p, true, false);
        let mut cache = gemma.new_cache();
        let mut logits = vec![0f32; vocab];
        gemma.prefill(&ids, &mut cache, Some(&mut logits)).unwrap();
        next.push(argmax(&logits));
        caches.push(cache);
    }
    let mut tokens: Vec<Vec<u32>> = next.iter().map(|t| vec![*t]).collect();
    let mut worst = 0f32;
    let mut logits = vec![0f32; PROMPTS.len() * vocab];
    for step in 1..steps {
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        gemma.decode(&next, &mut refs, &mut logits).unwrap();
        for (s, row) in logits.chunks_exact(vocab).enumerate() {
            let want = &expected[s].1[step];
            worst = row
                .iter()
                .zip(want)
                .fold(worst, |w, (a, b)| w.max((a - b).abs()));
            next[s] = argmax(row);
            tokens[s].push(next[s]);
        }
    }
    eprintln!("batched decode: largest logit difference from decoding alone {worst:e}");
    for (s, (want, _)) in expected.iter().enumerate() {
        assert_eq!(&tokens[s], want, "sequence {s}: greedy tokens");
    }
    assert!(worst < 1e-4, "logits differ by {worst}");
    // The caches hold each sequence's own length.
    for (cache, p) in caches.iter().zip(PROMPTS) {
        let prompt = gemma.tokenizer().encode(p, true, false).len();
        assert_eq!(cache.len(), prompt + steps - 1);
    }
}

/// An engine step (`Gemma::step`) in which a long prompt joins (longer
/// than a prefill pass and than the 512-token sliding window, so its last
/// part wraps the local layers' ring inside the joint pass) while another
/// sequence decodes: each gets what it gets alone.
#[test]
fn a_long_prompt_joining_a_step_gets_what_it_gets_alone() {
    let gemma = model();
    let vocab = gemma.config().vocab;
    let text = "The river runs past the old mill, and the miller counts the sacks of grain. ";
    let mut long = gemma.tokenizer().encode(&text.repeat(60), true, false);
    long.truncate(600);
    assert!(long.len() == 600 && long.len() > actors::gemma::PREFILL_CHUNK * 2);

    // Alone: the long prompt's last logits; the short sequence's next step.
    let mut want_long = vec![0f32; vocab];
    gemma
        .prefill(&long, &mut gemma.new_cache(), Some(&mut want_long))
        .unwrap();
    let short = gemma.tokenizer().encode(PROMPTS[0], true, false);
    let mut short_cache = gemma.new_cache();
    let mut logits = vec![0f32; vocab];
    gemma
        .prefill(&short, &mut short_cache, Some(&mut logits))
        .unwrap();
    let next = argmax(&logits);
    let mut alone_cache = gemma.new_cache();
    gemma.prefill(&short, &mut alone_cache, None).unwrap();
    let mut want_short = vec![0f32; vocab];
    gemma
        .forward(next, &mut alone_cache, Some(&mut want_short))
        .unwrap();

    // Together: the long prompt joins while the short sequence decodes.
    let mut long_cache = gemma.new_cache();
    let mut both = vec![0f32; 2 * vocab];
    let step = [next];
    gemma
        .step(
            &[&long[..], &step[..]],
            &mut [&mut long_cache, &mut short_cache],
            &mut both,
        )
        .unwrap();
    let worst = |got: &[f32], want: &[f32]| {
        got.iter()
            .zip(want)
            .fold(0f32, |w, (a, b)| w.max((a - b).abs()))
    };
    let (long_diff, short_diff) = (
        worst(&both[..vocab], &want_long),
        worst(&both[vocab..], &want_short),
    );
    eprintln!("step: long prompt within {long_diff:e}, decoding sequence within {short_diff:e}");
    assert!(long_diff < 1e-4 && short_diff < 1e-4);
    assert_eq!(argmax(&both[..vocab]), argmax(&want_long));
    assert_eq!(argmax(&both[vocab..]), argmax(&want_short));
    assert_eq!(
        (long_cache.len(), short_cache.len()),
        (600, short.len() + 1)
    );
}

mod engine {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use actors::gemma::engine::{Engine, EngineConfig, Event, FinishReason, Rejected, Request};
    use actors::gemma::{Sampler, Sampling, generate};

    fn request(
        gemma: &actors::gemma::Gemma,
        prompt: &str,
        max_tokens: usize,
        seed: u64,
    ) -> Request {
        Request {
            prompt: gemma.tokenizer().encode(prompt, true, false),
            max_tokens,
            sampling: Sampling {
                temperature: if seed == 0 { 0.0 } else { 0.8 },
                top_k: 40,
                top_p: 0.95,
                seed,
            },
            ..Request::default()
        }
    }

    /// What each request generates alone (`generate`, its own sampler).
    fn alone_tokens(gemma: &actors::gemma::Gemma, requests: &[Request]) -> Vec<Vec<u32>> {
        requests
            .iter()
            .map(|r| {
                let mut sampler = Sampler::new(r.sampling);
                generate(gemma, &r.prompt, r.max_tokens, &mut sampler, |_| {})
                    .unwrap()
                    .0
            })
            .collect()
    }

    /// Both ranks of a tp=2 group, as threads of this process.
    fn two_ranks(path: &std::path::Path) -> Vec<actors::gemma::Gemma> {
        actors::serve::load_ranks(
            path,
            2,
            actors::serve::Placement::InProcess,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    /// A sink that forwards events to a channel.
    fn channel() -> (actors::gemma::engine::Sink, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel();
        (Box::new(move |e| tx.send(e).is_ok()), rx)
    }

    fn collect(rx: &mpsc::Receiver<Event>) -> (Vec<u32>, Event) {
        let mut tokens = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(120)).unwrap() {
                Event::Token { id, .. } => tokens.push(id),
                other => return (tokens, other),
            }
        }
    }

    /// Five requests (greedy and sampled, different lengths) through an
    /// engine that decodes at most three at a time, two of them submitted
    /// while the others are running: each gets exactly the tokens it gets
    /// alone.
    #[test]
    fn requests_joining_and_leaving_get_what_they_get_alone() {
        let gemma = super::model();
        let specs = [
            ("The capital of France is", 6, 0),
            ("Write a haiku about the sea:", 9, 7),
            ("1, 2, 3, 4,", 4, 0),
            ("Once upon a time", 8, 11),
            ("The best way to learn Rust is", 5, 3),
        ];
        let requests: Vec<Request> = specs
            .iter()
            .map(|(p, n, seed)| request(&gemma, p, *n, *seed))
            .collect();
        let alone = alone_tokens(&gemma, &requests);
        let engine = Engine::start(
            vec![gemma],
            EngineConfig {
                max_batch: 3,
                max_waiting: 8,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        let mut receivers = Vec::new();
        for r in &requests[..3] {
            let (sink, rx) = channel();
            engine.submit(r.clone(), sink).unwrap();
            receivers.push(rx);
        }
        // Join while the first three are decoding.
        let first = receivers[0].recv_timeout(Duration::from_secs(120)).unwrap();
        assert!(matches!(first, Event::Token { .. }));
        for r in &requests[3..] {
            let (sink, rx) = channel();
            engine.submit(r.clone(), sink).unwrap();
            receivers.push(rx);
        }
        for (i, rx) in receivers.iter().enumerate() {
            let (mut tokens, end) = collect(rx);
            if i == 0
                && let Event::Token { id: t, .. } = first
            {
                tokens.insert(0, t);
            }
            assert_eq!(tokens, alone[i], "request {i}");
            let Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                ..
            } = end
            else {
                panic!("request {i}: {end:?}");
            };
            assert_eq!(prompt_tokens, requests[i].prompt.len());
            assert_eq!(completion_tokens, tokens.len());
            let stopped = tokens
                .last()
                .is_some_and(|t| actors::gemma::END_OF_GENERATION.contains(t));
            let want = if stopped {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            assert_eq!(reason, want, "request {i}");
        }
    }

    /// Over the waiting limit: refused at once. A client that goes away
    /// ends its request, and the engine goes on serving the others.
    #[test]
    fn a_full_queue_refuses_and_a_gone_client_frees_its_place() {
        let gemma = super::model();
        let mut long = request(&gemma, "Tell me a long story:", 400, 5);
        long.ignore_eos = true;
        let short = request(&gemma, "The capital of France is", 3, 0);
        let engine = Engine::start(
            vec![gemma],
            EngineConfig {
                max_batch: 1,
                max_waiting: 1,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        // The long request runs until its client goes away.
        let gone = Arc::new(AtomicBool::new(false));
        let (tx, first_tokens) = mpsc::channel();
        let flag = Arc::clone(&gone);
        engine
            .submit(
                long,
                Box::new(move |e| {
                    let _ = tx.send(e);
                    !flag.load(Ordering::SeqCst)
                }),
            )
            .unwrap();
        first_tokens.recv_timeout(Duration::from_secs(120)).unwrap();
        // One waits (the batch is full), the next is refused.
        let (sink, waiting_rx) = channel();
        engine.submit(short.clone(), sink).unwrap();
        assert_eq!(engine.waiting(), 1);
        let (sink, _) = channel();
        assert_eq!(
            engine.submit(short, sink).unwrap_err(),
            Rejected::Busy {
                waiting: 1,
                limit: 1
            }
        );
        // The long request's client goes away: the waiting one runs.
        gone.store(true, Ordering::SeqCst);
        let (tokens, end) = collect(&waiting_rx);
        assert_eq!(tokens.len(), 3);
        assert!(
            matches!(
                end,
                Event::Finished {
                    reason: FinishReason::Length,
                    ..
                }
            ),
            "{end:?}"
        );
        // The long request never finished: its client left first.
        let rest: Vec<Event> = first_tokens.try_iter().collect();
        assert!(
            !rest.iter().any(|e| matches!(e, Event::Finished { .. })),
            "{rest:?}"
        );
        // Once nothing runs, the shards free every cache.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while (engine.running(), engine.kv_bytes()) != (0, 0) {
            assert!(std::time::Instant::now() < deadline, "{engine:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The tokens-in-flight limit: a request that cannot fit alone is
    /// refused with the numbers; two that cannot run together run one after
    /// the other, each with its own tokens.
    #[test]
    fn the_tokens_in_flight_limit_queues_or_refuses() {
        let gemma = super::model();
        let a = request(&gemma, "The capital of France is", 4, 0);
        let b = request(&gemma, "Water boils at", 4, 0);
        let alone = alone_tokens(&gemma, &[a.clone(), b.clone()]);
        let budget = a.prompt.len() + 4;
        assert!(b.prompt.len() + 4 <= budget);
        let engine = Engine::start(
            vec![gemma],
            EngineConfig {
                max_tokens_in_flight: budget,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        let mut too_big = a.clone();
        too_big.max_tokens = 5;
        let (sink, _) = channel();
        let Rejected::Invalid(message) = engine.submit(too_big, sink).unwrap_err() else {
            panic!("not Invalid");
        };
        assert!(
            message.contains(&format!("at most {budget} tokens in flight")),
            "{message}"
        );
        // One log for both requests: b starts only after a has finished.
        let (tx, rx) = mpsc::channel();
        for (name, r) in [("a", a), ("b", b)] {
            let tx = tx.clone();
            engine
                .submit(r, Box::new(move |e| tx.send((name, e)).is_ok()))
                .unwrap();
        }
        drop(tx);
        let log: Vec<(&str, Event)> = rx.iter().collect();
        let finished_a = log
            .iter()
            .position(|(n, e)| *n == "a" && matches!(e, Event::Finished { .. }))
            .unwrap();
        let first_b = log.iter().position(|(n, _)| *n == "b").unwrap();
        assert!(finished_a < first_b, "{log:?}");
        for (i, name) in ["a", "b"].iter().enumerate() {
            let tokens: Vec<u32> = log
                .iter()
                .filter_map(|(n, e)| match e {
                    Event::Token { id, .. } if n == name => Some(*id),
                    _ => None,
                })
                .collect();
            assert_eq!(tokens, alone[i], "request {name}");
        }
    }

    /// Admission charges what a request has used plus a short look-ahead:
    /// three requests start together although their whole budgets do not
    /// fit, and when their caches outgrow `max_tokens_in_flight` the
    /// newest is preempted and later recomputed. Each still gets exactly
    /// the tokens it gets alone, greedy and sampled.
    #[test]
    fn preempted_requests_are_recomputed_to_what_they_get_alone() {
        let gemma = super::model();
        let requests = [
            request(&gemma, "The capital of France is", 40, 0),
            request(&gemma, "Once upon a time", 40, 9),
            request(&gemma, "Write a poem about the sea:", 40, 0),
        ];
        let alone = alone_tokens(&gemma, &requests);
        let biggest = requests.iter().map(|r| r.prompt.len() + 40).max().unwrap();
        let engine = Engine::start(
            vec![gemma],
            EngineConfig {
                max_tokens_in_flight: biggest + 20,
                lookahead: 4,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        for (i, r) in requests.iter().enumerate() {
            let tx = tx.clone();
            engine
                .submit(r.clone(), Box::new(move |e| tx.send((i, e)).is_ok()))
                .unwrap();
        }
        drop(tx);
        let log: Vec<(usize, Event)> = rx.iter().collect();
        // All three were running before any finished.
        let first_finish = log
            .iter()
            .position(|(_, e)| matches!(e, Event::Finished { .. }))
            .unwrap();
        for i in 0..3 {
            assert!(
                log[..first_finish].iter().any(|(j, _)| *j == i),
                "request {i} had not started when the first finished"
            );
        }
        assert!(engine.preemptions() > 0, "nothing was preempted");
        for (i, want) in alone.iter().enumerate() {
            let tokens: Vec<u32> = log
                .iter()
                .filter_map(|(j, e)| match e {
                    Event::Token { id, .. } if *j == i => Some(*id),
                    _ => None,
                })
                .collect();
            assert_eq!(&tokens, want, "request {i}");
            let end = log.iter().rev().find(|(j, _)| *j == i).unwrap();
            assert!(
                matches!(end.1, Event::Finished { completion_tokens, .. } if completion_tokens == want.len()),
                "request {i}: {:?}",
                end.1
            );
        }
    }

    /// A tiny model with random weights over a 512-token vocabulary: its
    /// sampled text ends by itself often enough to find such a seed.
    fn tiny_random() -> actors::gemma::Gemma {
        use actors::gemma::{GemmaConfig, LayerKind};
        let config = GemmaConfig {
            vocab: 512,
            hidden: 64,
            layers: 2,
            ffn: 128,
            heads: 2,
            kv_heads: 1,
            head_dim: 32,
            window: 16,
            layer_kinds: vec![LayerKind::Local, LayerKind::Global],
            context: 256,
            ..GemmaConfig::preset("270m").unwrap()
        };
        actors::gemma::Gemma::random(
            config,
            actors::Tokenizer::synthetic(512).unwrap(),
            kernels::gguf::GgmlType::Q8_0,
            3,
            Box::new(kernels::collective::SingleRank),
        )
        .unwrap()
    }

    /// `ignore_eos`: generation goes on past an end-of-generation token to
    /// `max_tokens`, with the same tokens up to it; a stop token id still
    /// ends it.
    #[test]
    fn ignore_eos_runs_to_max_tokens() {
        let gemma = tiny_random();
        let ask = |seed| Request {
            prompt: vec![2, 300, 301, 302],
            max_tokens: 40,
            sampling: Sampling {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                seed,
            },
            ..Request::default()
        };
        // A seed whose text ends by itself.
        let (r, plain) = (1..500)
            .map(|seed| {
                let r = ask(seed);
                let tokens = alone_tokens(&gemma, std::slice::from_ref(&r)).remove(0);
                (r, tokens)
            })
            .find(|(_, t)| t.len() < 30)
            .expect("no seed in 1..500 ends within 30 tokens");
        assert!(actors::gemma::END_OF_GENERATION.contains(plain.last().unwrap()));
        let engine = Engine::start(vec![gemma], EngineConfig::default()).unwrap();
        let mut ignoring = r.clone();
        ignoring.ignore_eos = true;
        let (sink, rx) = channel();
        engine.submit(ignoring.clone(), sink).unwrap();
        let (tokens, end) = collect(&rx);
        assert_eq!(tokens.len(), 40, "{tokens:?}");
        assert_eq!(tokens[..plain.len()], plain[..]);
        assert!(
            matches!(
                end,
                Event::Finished {
                    reason: FinishReason::Length,
                    ..
                }
            ),
            "{end:?}"
        );
        // A stop token id still stops it (the first token after the end).
        let after = tokens[plain.len()];
        ignoring.stop_token_ids = vec![after];
        let (sink, rx) = channel();
        engine.submit(ignoring, sink).unwrap();
        let (stopped, end) = collect(&rx);
        let at = tokens.iter().position(|&t| t == after).unwrap();
        assert_eq!(stopped, tokens[..=at], "stops at the first {after}");
        assert!(
            matches!(
                end,
                Event::Finished {
                    reason: FinishReason::Stop,
                    ..
                }
            ),
            "{end:?}"
        );
    }

    /// Shard actors for two in-process ranks: the engine's tokens equal
    /// one rank's, for greedy and sampled requests decoding together.
    #[test]
    fn an_engine_over_two_shard_actors_matches_one_rank() {
        let gemma = super::model();
        let requests = [
            request(&gemma, "The capital of France is", 6, 0),
            request(&gemma, "Once upon a time", 8, 3),
            request(&gemma, "def fibonacci(n):", 5, 0),
        ];
        let alone = alone_tokens(&gemma, &requests);
        drop(gemma);
        let path = actors::models::gguf_path("gemma3-270m").unwrap();
        let ranks = two_ranks(&path);
        let engine = Engine::start(ranks, EngineConfig::default()).unwrap();
        assert_eq!(engine.world(), 2);
        let receivers: Vec<_> = requests
            .iter()
            .map(|r| {
                let (sink, rx) = channel();
                engine.submit(r.clone(), sink).unwrap();
                rx
            })
            .collect();
        for (i, rx) in receivers.iter().enumerate() {
            let (tokens, end) = collect(rx);
            assert_eq!(tokens, alone[i], "request {i}");
            assert!(matches!(end, Event::Finished { .. }), "{end:?}");
        }
    }

    #[test]
    fn an_engine_needs_all_ranks_or_rank_0() {
        let path = actors::models::gguf_path("gemma3-270m").unwrap();
        let mut ranks = two_ranks(&path);
        let rank1 = ranks.pop().unwrap();
        let e = Engine::start(vec![rank1], EngineConfig::default()).unwrap_err();
        assert!(e.to_string().contains("given ranks [1]"), "{e}");
        assert!(Engine::start(Vec::new(), EngineConfig::default()).is_err());
        let e = Engine::start(
            ranks,
            EngineConfig {
                max_batch: 0,
                ..EngineConfig::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_batch (0)"), "{e}");
    }

    /// Every event of one request until each of its `n` choices finished:
    /// per choice, its tokens with their log-probabilities; and the time
    /// to the first token.
    fn run_choices(
        engine: &Engine,
        request: Request,
    ) -> (Vec<Vec<(u32, actors::gemma::TokenLogprob)>>, Duration) {
        let n = request.n;
        let (sink, rx) = channel();
        let started = std::time::Instant::now();
        engine.submit(request, sink).unwrap();
        let mut out = vec![Vec::new(); n];
        let (mut finished, mut first) = (0, None);
        while finished < n {
            match rx.recv_timeout(Duration::from_secs(300)).unwrap() {
                Event::Token {
                    choice,
                    id,
                    logprob,
                } => {
                    first.get_or_insert_with(|| started.elapsed());
                    out[choice].push((id, logprob.expect("logprobs were asked for")));
                }
                Event::Finished { .. } => finished += 1,
                other => panic!("{other:?}"),
            }
        }
        (out, first.unwrap_or_default())
    }

    /// A prompt of `shared` tokens (BOS first) followed by `suffix`.
    fn long_prompt(gemma: &actors::gemma::Gemma, shared: usize, suffix: &str) -> Vec<u32> {
        let text = "The river runs past the old mill, under the stone bridge and on \
                    towards the sea, where the boats wait for the tide. "
            .repeat(40);
        let mut ids = gemma.tokenizer().encode(&text, true, false);
        assert!(ids.len() > shared);
        ids.truncate(shared);
        ids.extend(gemma.tokenizer().encode(suffix, false, false));
        ids
    }

    /// The prefix cache: a second request sharing a 600-token prefix (longer
    /// than the 512-position window of the local layers) gets exactly the
    /// log-probabilities (so the logits) of a cold run, bit for bit, and
    /// its first token sooner.
    #[test]
    fn a_shared_prefix_longer_than_the_window_is_reused_bit_for_bit() {
        let gemma = super::model();
        assert!(gemma.config().window < 600);
        let first = long_prompt(&gemma, 600, " Where does the river go?");
        let second = long_prompt(&gemma, 600, " What waits for the tide?");
        let ask = |prompt: &Vec<u32>| Request {
            prompt: prompt.clone(),
            max_tokens: 6,
            logprobs: Some(20),
            ..Request::default()
        };
        let cold_engine = Engine::start(
            vec![gemma],
            EngineConfig {
                prefix_cache_bytes: 0,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        assert_eq!(cold_engine.prefix_cache_capacity(), 0);
        let (cold, cold_ttft) = run_choices(&cold_engine, ask(&second));
        drop(cold_engine);
        let engine = Engine::start(vec![super::model()], EngineConfig::default()).unwrap();
        assert!(engine.prefix_cache_capacity() >= 1200);
        run_choices(&engine, ask(&first));
        let (warm, warm_ttft) = run_choices(&engine, ask(&second));
        assert_eq!(
            warm, cold,
            "the same tokens and log-probabilities, bit for bit"
        );
        let (queries, hits) = engine.prefix_cache_counts();
        assert_eq!(queries, first.len() + second.len());
        assert!(hits >= 600, "{hits} of {queries} prompt tokens reused");
        assert!(
            warm_ttft.as_secs_f64() < 0.5 * cold_ttft.as_secs_f64(),
            "time to first token: warm {warm_ttft:?}, cold {cold_ttft:?}"
        );
        // The same prompt again (a few positions more than the entry it
        // reused were not worth an entry of their own: the shared 600 are
        // reused again).
        let (again, _) = run_choices(&engine, ask(&second));
        assert_eq!(again, cold);
        assert!(engine.prefix_cache_counts().1 >= hits + 600);
    }

    /// The same answer at two layouts: with the prefix cache, a request
    /// sharing a 600-token prefix gets the same greedy tokens on two
    /// tensor-parallel ranks (each keeping its slice of every entry) as a
    /// cold run on one rank.
    #[test]
    fn the_prefix_cache_gives_one_rank_s_tokens_on_two_ranks() {
        let gemma = super::model();
        let first = long_prompt(&gemma, 600, " Where does the river go?");
        let second = long_prompt(&gemma, 600, " What waits for the tide?");
        let ask = |prompt: &Vec<u32>| Request {
            prompt: prompt.clone(),
            max_tokens: 6,
            logprobs: Some(0),
            ..Request::default()
        };
        let ids = |c: &[(u32, actors::gemma::TokenLogprob)]| -> Vec<u32> {
            c.iter().map(|t| t.0).collect()
        };
        let cold = Engine::start(
            vec![gemma],
            EngineConfig {
                prefix_cache_bytes: 0,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        let (alone, _) = run_choices(&cold, ask(&second));
        drop(cold);
        let path = actors::models::gguf_path("gemma3-270m").unwrap();
        let engine = Engine::start(two_ranks(&path), EngineConfig::default()).unwrap();
        assert_eq!(engine.world(), 2);
        run_choices(&engine, ask(&first));
        let (warm, _) = run_choices(&engine, ask(&second));
        assert!(engine.prefix_cache_counts().1 >= 600);
        assert_eq!(ids(&warm[0]), ids(&alone[0]));
    }

    /// `n` choices share one prefill (the cache is copied): choice `i`
    /// gets the tokens a request alone with the choice's seed gets (the
    /// log-probabilities to rounding: three rows through the weights at
    /// once are summed in another order than one).
    #[test]
    fn choices_share_a_prefill_and_each_gets_its_own_draw() {
        use actors::gemma::engine::choice_seed;
        let gemma = super::model();
        let base = request(&gemma, "Once upon a time", 8, 21);
        let engine = Engine::start(vec![gemma], EngineConfig::default()).unwrap();
        let ask = |n: usize, seed: u64| Request {
            n,
            logprobs: Some(0),
            sampling: Sampling {
                seed,
                ..base.sampling
            },
            ..base.clone()
        };
        let (together, _) = run_choices(&engine, ask(3, 21));
        for (i, choice) in together.iter().enumerate() {
            let (alone, _) = run_choices(&engine, ask(1, choice_seed(21, i)));
            let ids = |c: &[(u32, actors::gemma::TokenLogprob)]| -> Vec<u32> {
                c.iter().map(|t| t.0).collect()
            };
            assert_eq!(ids(choice), ids(&alone[0]), "choice {i}");
            for (a, b) in choice.iter().zip(&alone[0]) {
                assert!(
                    (a.1.logprob - b.1.logprob).abs() < 1e-4,
                    "choice {i}: {a:?} {b:?}"
                );
            }
        }
        assert_ne!(together[0], together[1], "choices draw differently");
    }

    /// A shard whose model has gone wrong: every logit is NaN.
    struct NanShard;

    impl actors::gemma::engine::ShardModel for NanShard {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            1
        }
        fn vocab(&self) -> usize {
            8
        }
        fn context(&self) -> usize {
            64
        }
        fn kv_bytes_per_token(&self) -> Option<usize> {
            None
        }
        fn broadcast_bytes(
            &self,
            _bytes: &mut Vec<u8>,
        ) -> Result<(), actors::gemma::engine::EngineError> {
            Ok(())
        }
        fn step(
            &mut self,
            s: &actors::gemma::engine::Schedule,
        ) -> Result<actors::gemma::engine::StepOutput, actors::gemma::engine::EngineError> {
            Ok(actors::gemma::engine::StepOutput {
                logits: vec![f32::NAN; (s.admit.len() + s.decode.len()) * 8],
                ..Default::default()
            })
        }
    }

    /// Non-finite logits end the request with the reason (not token 0),
    /// and the engine goes on taking requests.
    #[test]
    fn non_finite_logits_end_the_request_with_an_error() {
        let engine =
            Engine::start_shards(vec![Box::new(NanShard)], EngineConfig::default()).unwrap();
        for _ in 0..2 {
            let (sink, rx) = channel();
            engine
                .submit(
                    Request {
                        prompt: vec![2, 3, 4],
                        max_tokens: 4,
                        ..Request::default()
                    },
                    sink,
                )
                .unwrap();
            match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
                Event::Failed(reason) => assert!(reason.contains("non-finite logit"), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
