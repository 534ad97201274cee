//! Outbox append throughput (512-byte events) in `async` and `sync` durability at several
//! batch sizes and concurrency levels, and the fdatasync latency of the disk under the
//! temporary directory (which bounds `sync` latency: one fsync per group commit).
//!
//! `cargo bench --bench outbox`; the latency report prints first, then criterion's groups.
//! Throughput is events/s over append-and-flush (async) or append-and-await (sync); the
//! cursor commits that keep the outbox from filling up are not timed.

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use ficus::outbox::{Durability, Outbox, OutboxMetrics, OutboxSettings};

const PAYLOAD: usize = 512;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn open(dir: &std::path::Path, durability: Durability) -> Outbox {
    let mut settings = OutboxSettings::new(dir);
    settings.durability = durability;
    let outbox = Outbox::open(settings, OutboxMetrics::unregistered()).expect("open outbox");
    outbox.reader("bench").expect("register the bench sink");
    outbox
}

/// Appends `events` payloads from `tasks` tasks in `batch`-sized appends, then waits until all
/// are durable: awaiting each ticket (sync) or one flush at the end (async).
async fn run(outbox: &Outbox, durability: Durability, tasks: usize, batch: usize, events: usize) {
    let payload = Bytes::from(vec![0x5a; PAYLOAD]);
    let per_task = events / tasks;
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let outbox = outbox.clone();
        let payload = payload.clone();
        handles.push(tokio::spawn(async move {
            let mut left = per_task;
            while left > 0 {
                let n = batch.min(left);
                let ticket = outbox
                    .append(vec![payload.clone(); n])
                    .expect("append (outbox full?)");
                if durability == Durability::Sync {
                    ticket.durable().await.expect("durable");
                }
                left -= n;
            }
        }));
    }
    for h in handles {
        h.await.expect("appender task");
    }
    outbox.flush().await.expect("flush");
}

fn bench_appends(c: &mut Criterion, durability: Durability, cases: &[(usize, usize, usize)]) {
    let rt = runtime();
    let name = match durability {
        Durability::Async => "outbox_append_async",
        Durability::Sync => "outbox_append_sync",
    };
    let mut group = c.benchmark_group(name);
    for &(tasks, batch, events) in cases {
        group.throughput(Throughput::Elements(events as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("tasks={tasks}/batch={batch}")),
            &(tasks, batch, events),
            |b, &(tasks, batch, events)| {
                let dir = tempfile::tempdir().expect("tempdir");
                let outbox = rt.block_on(async { open(dir.path(), durability) });
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut timed = Duration::ZERO;
                        for _ in 0..iters {
                            let start = Instant::now();
                            run(&outbox, durability, tasks, batch, events).await;
                            timed += start.elapsed();
                            // Free the segments, as a dispatcher would (untimed).
                            outbox
                                .commit("bench", outbox.durable_end())
                                .expect("commit");
                        }
                        timed
                    })
                });
                rt.block_on(outbox.close()).expect("close");
            },
        );
    }
    group.finish();
}

fn append_async(c: &mut Criterion) {
    // (tasks, payloads per append, events per iteration)
    bench_appends(
        c,
        Durability::Async,
        &[
            (1, 1, 50_000),
            (1, 16, 50_000),
            (4, 1, 50_000),
            (16, 1, 50_000),
            (16, 16, 50_000),
        ],
    );
}

fn append_sync(c: &mut Criterion) {
    bench_appends(
        c,
        Durability::Sync,
        &[
            (1, 1, 100),
            (16, 1, 1_600),
            (64, 1, 6_400),
            (256, 1, 12_800),
            (64, 16, 51_200),
        ],
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// fdatasync of a 528-byte append on this disk, and the outbox's own append-to-durable latency
/// for a single appender (one fsync each, nothing to group with).
fn latency_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("probe file");
    let record = [0x5au8; PAYLOAD + 16];
    let mut samples = Vec::with_capacity(500);
    for _ in 0..500 {
        file.write_all(&record).expect("write");
        let start = Instant::now();
        file.sync_data().expect("fdatasync");
        samples.push(start.elapsed());
    }
    samples.sort();
    println!(
        "fdatasync after a {}-byte append ({} samples, {}): p50 {:?}  p99 {:?}  max {:?}",
        record.len(),
        samples.len(),
        dir.path().display(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0),
    );

    let rt = runtime();
    let outbox = rt.block_on(async { open(dir.path(), Durability::Sync) });
    let payload = Bytes::from(vec![0x5a; PAYLOAD]);
    let mut samples = Vec::with_capacity(300);
    let syncs = outbox.sync_count();
    rt.block_on(async {
        for _ in 0..300 {
            let start = Instant::now();
            outbox
                .append(vec![payload.clone()])
                .expect("append")
                .durable()
                .await
                .expect("durable");
            samples.push(start.elapsed());
        }
    });
    samples.sort();
    println!(
        "outbox sync append->durable, one appender ({} samples, {} fdatasyncs): p50 {:?}  p99 {:?}",
        samples.len(),
        outbox.sync_count() - syncs,
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
    );
    rt.block_on(outbox.close()).expect("close");
    black_box(());
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = append_async, append_sync
}

fn main() {
    // Only when benchmarking (`cargo bench`), not when `cargo test --benches` smoke-runs it.
    if std::env::args().any(|a| a == "--bench") {
        latency_report();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
