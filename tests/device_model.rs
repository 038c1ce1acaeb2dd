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
    let gemma = Gemma::load(&cluster::models::gguf_path("gemma3-270m").unwrap()).unwrap();
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
    // Together.
    let vocab = gemma.config().vocab;
    let mut pool = device.new_pool(3, 64).unwrap();
    let mut next: Vec<u32> = prompts
        .iter()
        .enumerate()
        .map(|(s, p)| actors::gemma::argmax(&device.prefill(p, s, &mut pool).unwrap()))
        .collect();
    for step in 0..steps {
        let logits = device.decode(&next, &[0, 1, 2], &mut pool).unwrap();
        for (s, row) in logits.chunks(vocab).enumerate() {
            assert_eq!(next[s], alone[s][step].0, "sequence {s} step {step}");
            assert_eq!(row, &alone[s][step].1[..], "sequence {s} step {step}");
            next[s] = actors::gemma::argmax(row);
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
                Event::Token(t) => tokens.push(t),
                Event::Finished { .. } => break,
                Event::Failed(e) => panic!("request {i}: {e}"),
            }
        }
        assert_eq!(tokens, alone[i], "request {i}");
    }
    drop(gemma);
}
