//! The count job's dataflow inside one process, against a plain loop.
//!
//! Isolates: generation, the keyed exchange between worker threads, per-epoch
//! counting and the gather on worker 0 — the dataflow work of `dima up --job
//! count` without process start-up or TCP (`dima bench count` measures those,
//! end to end).
//! Leaves out: processes, sockets, telemetry export (metrics are recorded into
//! a registry nobody reads).
//! Anchor: `count_sequential`, the same events counted by one loop into one
//! hash map on one thread, measured in the same run.
//! Run: `cargo bench -p dima-benches --bench count_job`

use std::sync::atomic::AtomicBool;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dataflows::{CountJob, DataflowMetrics, count_sequential, run_count};

const EVENTS: u64 = 1_000_000;

fn job() -> CountJob {
    CountJob {
        events: EVENTS,
        keys: 100_000,
        ..CountJob::default()
    }
}

fn dataflow(workers: usize) -> u64 {
    let job = job();
    let metrics = DataflowMetrics::detached();
    let stop = AtomicBool::new(false);
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        run_count(worker, &job, &metrics, &stop)
            .summary
            .map_or(0, |s| s.events)
    })
    .expect("timely starts");
    guards
        .join()
        .into_iter()
        .map(|r| r.expect("worker ok"))
        .sum()
}

fn count_job(c: &mut Criterion) {
    let mut group = c.benchmark_group("count_job");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10);
    group.bench_function("anchor_sequential_loop", |b| {
        b.iter(|| count_sequential(&job()).events)
    });
    for workers in [1, 2] {
        group.bench_function(format!("dataflow_{workers}_workers"), |b| {
            b.iter(|| dataflow(workers))
        });
    }
    group.finish();
}

criterion_group!(benches, count_job);
criterion_main!(benches);
