//! The device model (`actors::gemma::device::DeviceGemma`, the forward pass
//! the GPU runs) over the plain-Rust device, against the CPU model on the
//! real Gemma 3 270M: this checks its cache slots, local rings, prompt
//! chunks and batched steps without a GPU. The device rounds activations to
//! bf16 before every matrix product (as the GPU does), so logits differ
//! from the f32 CPU model by that rounding, not more.

use actors::gemma::Gemma;
use actors::gemma::device::{DeviceGemma, generate};
use kernels::device::Host;

fn models() -> (Gemma, DeviceGemma<Host>) {
    let gemma = Gemma::load(&actors::models::gguf_path("gemma3-270m").unwrap()).unwrap();
    let device = DeviceGemma::upload(&gemma, Host, |_, _| {}).unwrap();
    (gemma, device)
}

#[test]
fn the_device_model_follows_the_cpu_model() {
    let (gemma, device) = models();
    // What the GPU path announces (and checks against free memory) before
    // uploading is what the upload holds.
    assert_eq!(
        device.weight_bytes(),
        Gemma::random_weight_bytes(gemma.config(), 1, 0, kernels::gguf::GgmlType::BF16).unwrap()
    );
    let tok = gemma.tokenizer();
    let short = tok.encode("The capital of France is", true, false);
    // 600 tokens through prompt chunks of 64: the local layers' rings
    // (512 + 64 slots) wrap while the prompt is still running.
    let text = "The river carried the boat past quiet villages, old mills and green fields. ";
    let unit = tok.encode(text, false, false);
    let mut long = vec![tok.bos()];
    long.extend(unit.iter().cycle().take(599));
    for (prompt, chunk, steps) in [(&short, None, 8), (&long, Some(64), 4)] {
        let rows = actors::gemma::device::parity(
            &gemma,
            &device,
            std::slice::from_ref(prompt),
            steps,
            chunk,
        )
        .unwrap();
        let r = &rows[0];
        eprintln!("{r}");
        assert_eq!(r["top1_equal"], true, "{r}");
        assert!(r["argmax_agreement"].as_f64().unwrap() >= 0.75, "{r}");
        assert!(r["max_abs_diff"].as_f64().unwrap() < 0.5, "{r}");
    }
}

/// Several sequences in one batched step get what each gets alone, and a
/// generation stops as the CPU's does.
#[test]
#[allow(clippy::needless_range_loop)] // steps index every sequence's log
fn batched_steps_equal_single_steps_on_the_device() {
    let (gemma, device) = models();
    let tok = gemma.tokenizer();
    let prompts = [
        tok.encode("The capital of France is", true, false),
        tok.encode("1, 2, 3, 4,", true, false),
        tok.encode("Write a haiku about the sea:", true, false),
    ];
    let steps = 4;
    // Alone.
    let mut alone = Vec::new();
    for p in &prompts {
        let mut pool = device.new_pool(1, 64).unwrap();
        let mut logits = device.prefill(p, 0, &mut pool).unwrap();
        let mut rows = Vec::new();
        for _ in 0..steps {
            let next = actors::gemma::argmax(&logits);
            logits = device.decode(&[next], &[0], &mut pool).unwrap();
            rows.push((next, logits.clone()));
        }
        alone.push(rows);
    }
    // Together: the three prompts in one pool, each prompt's first token.
    let vocab = gemma.config().vocab;
    let prefilled = || {
        let mut pool = device.new_pool(3, 64).unwrap();
        let next: Vec<u32> = prompts
            .iter()
            .enumerate()
            .map(|(s, p)| actors::gemma::argmax(&device.prefill(p, s, &mut pool).unwrap()))
            .collect();
        (pool, next)
    };
    let (mut pool, mut next) = prefilled();
    for step in 0..steps {
        let logits = device.decode(&next, &[0, 1, 2], &mut pool).unwrap();
        for (s, row) in logits.chunks(vocab).enumerate() {
            assert_eq!(next[s], alone[s][step].0, "sequence {s} step {step}");
            assert_eq!(row, &alone[s][step].1[..], "sequence {s} step {step}");
            next[s] = actors::gemma::argmax(row);
        }
    }
    // The greedy step (argmax on the device, only ids come back) picks
    // what the host's argmax of the logits picks.
    let (mut pool, mut next) = prefilled();
    for step in 0..steps {
        next = device.decode_greedy(&next, &[0, 1, 2], &mut pool).unwrap();
        for s in 0..3 {
            assert_eq!(
                next[s],
                actors::gemma::argmax(&alone[s][step].1),
                "sequence {s} step {step}"
            );
        }
    }
    // Greedy generation matches the CPU model's tokens here.
    let mut sampler = actors::gemma::Sampler::new(actors::gemma::Sampling::default());
    let ids = generate(&device, &prompts[0], 6, &mut sampler, |_| {}).unwrap();
    let mut sampler = actors::gemma::Sampler::new(actors::gemma::Sampling::default());
    let (cpu, _) = actors::gemma::generate(&gemma, &prompts[0], 6, &mut sampler, |_| {}).unwrap();
    assert_eq!(ids, cpu);
}

/// The continuous-batching engine over the device model (as `dima serve
/// --backend cuda` runs it, here on the plain-Rust device): requests
/// joining and leaving get what each gets alone, greedy or sampled, and the
/// pool's sequences are reused.
#[test]
fn the_engine_serves_the_device_model() {
    use actors::gemma::engine::{Engine, EngineConfig, Event, Request};
    use actors::gemma::{Sampler, Sampling};
    let (gemma, device) = models();
    let tok = gemma.tokenizer();
    let requests: Vec<Request> = [
        ("The capital of France is", 5, 0u64),
        ("Once upon a time", 6, 3),
        ("def fibonacci(n):", 4, 0),
        ("1, 2, 3, 4,", 3, 9),
    ]
    .iter()
    .map(|(p, n, seed)| Request {
        prompt: tok.encode(p, true, false),
        max_tokens: *n,
        sampling: Sampling {
            temperature: if *seed == 0 { 0.0 } else { 0.8 },
            top_k: 40,
            top_p: 0.95,
            seed: *seed,
        },
        ..Request::default()
    })
    .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            let mut sampler = Sampler::new(r.sampling);
            generate(&device, &r.prompt, r.max_tokens, &mut sampler, |_| {}).unwrap()
        })
        .collect();
    // Two sequences for four requests: the last two wait, then reuse them.
    let config = EngineConfig {
        max_batch: 2,
        ..EngineConfig::default()
    };
    let engine = Engine::start_device(device, config, 64).unwrap();
    let receivers: Vec<_> = requests
        .iter()
        .map(|r| {
            let (tx, rx) = std::sync::mpsc::channel();
            engine
                .submit(r.clone(), Box::new(move |e| tx.send(e).is_ok()))
                .unwrap();
            rx
        })
        .collect();
    for (i, rx) in receivers.iter().enumerate() {
        let mut tokens = Vec::new();
        loop {
            match rx
                .recv_timeout(std::time::Duration::from_secs(120))
                .unwrap()
            {
                Event::Token { id, .. } => tokens.push(id),
                Event::Finished { .. } => break,
                Event::Failed(e) => panic!("request {i}: {e}"),
                Event::Prompt(_) => panic!("request {i}: no prompt logprobs were asked for"),
            }
        }
        assert_eq!(tokens, alone[i], "request {i}");
    }
    drop(gemma);
}

/// Tensor parallelism on the device model (tp=2, the ranks joined by
/// in-process collectives, as NCCL joins GPUs): the same greedy tokens as
/// one rank and logits within bf16 noise (0.25), and an engine over the two
/// device shards serves requests exactly as one rank does alone.
#[test]
fn the_device_model_shards_like_the_cpu_model() {
    use actors::gemma::engine::{DeviceShard, Engine, EngineConfig, Event, Request, ShardModel};
    use std::time::Duration;
    let (gemma, one) = models();
    let prompt = gemma
        .tokenizer()
        .encode("The capital of France is", true, false);
    let steps = 5;
    // One rank.
    let mut pool = one.new_pool(1, 64).unwrap();
    let mut logits = one.prefill(&prompt, 0, &mut pool).unwrap();
    let mut want = Vec::new();
    for _ in 0..steps {
        let next = actors::gemma::argmax(&logits);
        want.push((next, logits.clone()));
        logits = one.decode(&[next], &[0], &mut pool).unwrap();
    }
    drop(gemma);
    // Two ranks, each on its own thread (their collectives meet).
    let path = actors::models::gguf_path("gemma3-270m").unwrap();
    let load = || {
        let cpu = actors::serve::load_ranks(
            &path,
            2,
            actors::serve::Placement::InProcess,
            Duration::from_secs(60),
        )
        .unwrap();
        cpu.iter()
            .zip(kernels::collective::local_group(2, Duration::from_secs(60)))
            .map(|(g, link)| DeviceGemma::upload_rank(g, Host, Box::new(link), |_, _| {}).unwrap())
            .collect::<Vec<_>>()
    };
    let handles: Vec<_> = load()
        .into_iter()
        .map(|rank| {
            let prompt = prompt.clone();
            std::thread::spawn(move || {
                let mut pool = rank.new_pool(1, 64).unwrap();
                let mut logits = rank.prefill(&prompt, 0, &mut pool).unwrap();
                let mut got = Vec::new();
                for _ in 0..steps {
                    let next = actors::gemma::argmax(&logits);
                    got.push((next, logits.clone()));
                    logits = rank.decode(&[next], &[0], &mut pool).unwrap();
                }
                got
            })
        })
        .collect();
    let ranks: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (r, got) in ranks.iter().enumerate() {
        for (step, ((t, l), (wt, wl))) in got.iter().zip(&want).enumerate() {
            assert_eq!(t, wt, "rank {r} step {step}");
            let worst = l
                .iter()
                .zip(wl)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Partial sums in another order can flip a bf16 rounding of an
            // activation: differences of bf16 size, not more.
            eprintln!("rank {r} step {step}: largest logit difference {worst}");
            assert!(worst < 0.25, "rank {r} step {step}: {worst}");
        }
    }

    // The engine over both device shards (one arbiter each).
    let request = Request {
        prompt: prompt.clone(),
        max_tokens: steps,
        sampling: actors::gemma::Sampling::default(),
        ..Request::default()
    };
    let shards: Vec<Box<dyn ShardModel>> = load()
        .into_iter()
        .map(|m| Box::new(DeviceShard::new(m, 2, 64).unwrap()) as Box<dyn ShardModel>)
        .collect();
    let engine = Engine::start_shards(shards, EngineConfig::default()).unwrap();
    assert_eq!(engine.world(), 2);
    let (tx, rx) = std::sync::mpsc::channel();
    engine
        .submit(request, Box::new(move |e| tx.send(e).is_ok()))
        .unwrap();
    let mut tokens = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)).unwrap() {
            Event::Token { id, .. } => tokens.push(id),
            Event::Finished { .. } => break,
            Event::Failed(e) => panic!("{e}"),
            Event::Prompt(_) => panic!("no prompt logprobs were asked for"),
        }
    }
    let greedy: Vec<u32> = want.iter().map(|(t, _)| *t).collect();
    assert_eq!(tokens, greedy);
}
