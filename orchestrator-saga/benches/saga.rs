//! Saga benchmarks: the per-step cost of the saga engine against the raw append cost of the
//! same store, measured in the same run, and the peak memory of 10,000 concurrent sagas.
//!
//! Run with `cargo bench -p orchestrator-saga --bench saga` (add
//! `-- --measurement-time 2 --warm-up-time 1` for a short run). Besides criterion's output,
//! it prints a report: the engine's marginal cost per step (a 21-step saga minus a 1-step
//! saga, over 20), the raw append cost (building the same record and appending it with an
//! exact expected version), their ratio (target ≤ 2), and the peak RSS after 10,000
//! sagas in flight at once.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, HandlerError};
use orchestrator_saga::{SagaDefinition, SagaOrchestrator, SagaStep};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;

/// Steps of the long saga; the short one has one.
const LONG: usize = 21;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// A store to measure on; the directory (if any) lives as long as the store.
struct Setup {
    name: &'static str,
    store: Arc<dyn EventStore>,
    _dir: Option<TempDir>,
}

fn setups() -> Vec<Setup> {
    let file = |name, fsync| {
        let dir = tempfile::tempdir().unwrap();
        let options = FileStoreOptions::default().fsync(fsync);
        let store = FileEventStore::open_with(dir.path(), options).unwrap();
        Setup {
            name,
            store: Arc::new(store),
            _dir: Some(dir),
        }
    };
    vec![
        Setup {
            name: "in-memory",
            store: Arc::new(InMemoryEventStore::new()),
            _dir: None,
        },
        file("file (fsync never)", FsyncPolicy::Never),
        file("file (fsync every append)", FsyncPolicy::EveryAppend),
    ]
}

fn step(name: String) -> SagaStep {
    let key = name.clone();
    SagaStep::new(name, move |_: Value| {
        let output = json!({ &key: true });
        async move { Ok::<_, HandlerError>(output) }
    })
}

fn orchestrator(store: Arc<dyn EventStore>) -> SagaOrchestrator {
    let orch = SagaOrchestrator::new(store);
    let long = (0..LONG).map(|i| step(format!("step-{i}")));
    orch.define(SagaDefinition::new("long", long).unwrap())
        .unwrap();
    orch.define(SagaDefinition::new("short", [step("step-0".into())]).unwrap())
        .unwrap();
    orch
}

/// Runs `sagas` sagas named `saga` one after the other.
fn run_sagas(rt: &Runtime, orch: &SagaOrchestrator, saga: &str, sagas: u64) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for n in 0..sagas {
            let outcome = orch.run(saga, json!({ "n": n })).await.unwrap();
            assert!(outcome.is_completed());
        }
        start.elapsed()
    })
}

/// Appends `appends` records shaped like a step's completion, `LONG` per stream, each with
/// an exact expected version: what logging the same transitions by hand costs.
fn raw_appends(rt: &Runtime, store: &dyn EventStore, appends: u64) -> Duration {
    let run = uuid::Uuid::now_v7();
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..appends {
            let (saga, version) = (i / LONG as u64, i % LONG as u64);
            let step = format!("step-{version}");
            let record = json!({
                "kind": "step_completed", "step": &step, "attempt": 1, "output": { &step: true }
            });
            let event = EventEnvelope::new("saga.step.completed", &record)
                .unwrap()
                .with_correlation_id(run.to_string());
            store
                .append(
                    &format!("raw-{run}-{saga}"),
                    ExpectedVersion::Exact(version),
                    vec![event],
                )
                .await
                .unwrap();
        }
        start.elapsed()
    })
}

fn criterion_benches(c: &mut Criterion) {
    let rt = runtime();
    for setup in setups() {
        let orch = orchestrator(setup.store.clone());
        let mut group = c.benchmark_group(format!("saga/{}", setup.name));
        group.bench_function(BenchmarkId::new("raw_append", 1), |b| {
            b.iter_custom(|iters| raw_appends(&rt, &*setup.store, iters));
        });
        group.bench_function(BenchmarkId::new("saga_steps", 1), |b| {
            b.iter_custom(|iters| run_sagas(&rt, &orch, "short", iters));
        });
        group.bench_function(BenchmarkId::new("saga_steps", LONG), |b| {
            b.iter_custom(|iters| run_sagas(&rt, &orch, "long", iters));
        });
        group.finish();
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The engine's marginal cost per step and the raw append cost, as medians of rounds.
fn report_ratios() {
    let rt = runtime();
    println!("\nper-step cost vs raw append (medians of 9 rounds)");
    println!(
        "{:<28} {:>14} {:>14} {:>8}",
        "store", "step (ns)", "append (ns)", "ratio"
    );
    for setup in setups() {
        let orch = orchestrator(setup.store.clone());
        let sagas: u64 = if setup.name.contains("every append") {
            20
        } else {
            300
        };
        let appends = sagas * (LONG as u64 - 1);
        run_sagas(&rt, &orch, "long", sagas / 4 + 1); // warm up
        raw_appends(&rt, &*setup.store, appends / 4 + 1);
        let (mut steps, mut raws) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            let long = run_sagas(&rt, &orch, "long", sagas).as_secs_f64();
            let short = run_sagas(&rt, &orch, "short", sagas).as_secs_f64();
            steps.push((long - short) / appends as f64 * 1e9);
            raws.push(
                raw_appends(&rt, &*setup.store, appends).as_secs_f64() / appends as f64 * 1e9,
            );
        }
        let (step, raw) = (median(steps), median(raws));
        println!(
            "{:<28} {:>14.0} {:>14.0} {:>8.2}",
            setup.name,
            step,
            raw,
            step / raw
        );
    }
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak RSS with 10,000 sagas in flight at once (each parked in its second step).
fn report_memory() {
    const SAGAS: usize = 10_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let before = vm_hwm_kib();
    let took = rt.block_on(async {
        let orch = SagaOrchestrator::builder(Arc::new(InMemoryEventStore::new()))
            .max_concurrent(SAGAS)
            .build();
        let gate = Arc::new(Semaphore::new(0));
        let parked = gate.clone();
        let hold = SagaStep::new("hold", move |_: Value| {
            let gate = parked.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                Ok::<_, HandlerError>(json!({ "released": true }))
            }
        });
        orch.define(
            SagaDefinition::new(
                "order",
                [step("validate".into()), hold, step("ship".into())],
            )
            .unwrap(),
        )
        .unwrap();
        let start = Instant::now();
        let mut handles = Vec::with_capacity(SAGAS);
        for n in 0..SAGAS {
            handles.push(
                orch.start("order", json!({ "order_id": n, "amount": 99.99 }))
                    .await
                    .unwrap(),
            );
        }
        while handles
            .iter()
            .any(|h| h.snapshot().running_steps.is_empty())
        {
            tokio::task::yield_now().await;
        }
        let in_flight = vm_hwm_kib();
        gate.add_permits(SAGAS);
        for handle in &handles {
            assert!(handle.outcome().await.unwrap().is_completed());
        }
        (start.elapsed(), in_flight)
    });
    let after = vm_hwm_kib();
    println!(
        "\n10,000 concurrent sagas (3 steps, all parked in step 2 at once), in-memory store: \
         {:.2?} start to finish; VmHWM before {} KiB, with all in flight {} KiB, after {} KiB",
        took.0,
        before.unwrap_or(0),
        took.1.unwrap_or(0),
        after.unwrap_or(0)
    );
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    if std::env::args().any(|a| a == "--bench") {
        report_memory();
    }
    criterion_benches(&mut criterion);
    criterion.final_summary();
    if std::env::args().any(|a| a == "--bench") {
        report_ratios();
    }
}
