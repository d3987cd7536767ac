//! Publish → handle throughput of the event bus on the in-process transport, against a raw
//! bounded `tokio::sync::mpsc` channel carrying the same envelopes, in the same run.
//!
//! Each iteration publishes 20,000 distinct envelopes (prepared once, before timing; each
//! publish sends a clone, a reference count), as an application publishes distinct events.
//! Both the raw channel and the bus carry the very same envelopes. This isolates what the
//! bus adds per event, and is what the ≥ 0.5× target is judged on.
//!
//! A second pair (`*_building`, 1 subscriber) has the publisher build each envelope as it
//! publishes it (`EventEnvelope::new` with the ~200-byte JSON payload), as an application
//! does: a reference figure for how much of an application's publish path the bus takes.
//!
//! `cargo bench -p orchestrator-bus --bench bus`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use orchestrator_bus::{EventBus, InProcessTransport};
use orchestrator_core::{EventEnvelope, HandlerError, SubscribeOptions, Transport};
use tokio::sync::{Notify, mpsc};

const EVENTS: u64 = 20_000;

/// Where a publisher gets its events.
#[derive(Clone)]
enum Source {
    /// Clones of `EVENTS` distinct envelopes prepared before timing.
    Prepared(Arc<Vec<EventEnvelope>>),
    /// Each envelope built as it is published.
    Built,
}

impl Source {
    fn prepared() -> Self {
        Self::Prepared(Arc::new((0..EVENTS).map(|_| envelope()).collect()))
    }

    fn get(&self, i: usize) -> EventEnvelope {
        match self {
            Self::Prepared(events) => events[i].clone(),
            Self::Built => envelope(),
        }
    }
}

/// A ~200-byte JSON payload.
fn envelope() -> EventEnvelope {
    let payload = serde_json::json!({
        "order_id": "ORDER-0000000001",
        "customer": "customer-0000000042",
        "amount_cents": 99_99,
        "currency": "EUR",
        "lines": [{"sku": "SKU-1", "qty": 1}, {"sku": "SKU-2", "qty": 3}],
        "note": "leave at the door, ring twice",
    });
    EventEnvelope::new("order.placed", &payload).unwrap()
}

struct Counter {
    handled: AtomicU64,
    target: AtomicU64,
    done: Notify,
}

impl Counter {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            handled: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            done: Notify::new(),
        })
    }

    fn hit(&self) {
        let n = self.handled.fetch_add(1, Ordering::AcqRel) + 1;
        if n == self.target.load(Ordering::Acquire) {
            self.done.notify_one();
        }
    }

    async fn run(&self, expected: u64, publish: impl std::future::Future<Output = ()>) {
        let target = self.handled.load(Ordering::Acquire) + expected;
        self.target.store(target, Ordering::Release);
        let notified = self.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        publish.await;
        if self.handled.load(Ordering::Acquire) < target {
            notified.await;
        }
    }
}

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// Times `publish` (spawned as a task: task → task, as in DESIGN.md) until `counter` saw
/// `expected` more handled events, once per iteration.
fn timed<P, F>(
    group: &mut Group<'_>,
    rt: &tokio::runtime::Runtime,
    id: &str,
    counter: &Arc<Counter>,
    expected: u64,
    publish: P,
) where
    P: Fn() -> F + Clone + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    group.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (counter, publish) = (counter.clone(), publish.clone());
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    // Spawned inside `run`, once the counter knows what to wait for.
                    let publish = publish.clone();
                    counter
                        .run(expected, async move {
                            tokio::spawn(publish()).await.unwrap();
                        })
                        .await;
                }
                start.elapsed()
            }
        });
    });
}

/// A raw bounded(1024) channel per subscriber, one consumer task each.
fn bench_raw(
    group: &mut Group<'_>,
    rt: &tokio::runtime::Runtime,
    id: &str,
    subscribers: usize,
    source: &Source,
) {
    let counter = Counter::new();
    let senders: Vec<mpsc::Sender<EventEnvelope>> = (0..subscribers)
        .map(|_| {
            let (tx, mut rx) = mpsc::channel::<EventEnvelope>(1024);
            let counter = counter.clone();
            rt.spawn(async move {
                while let Some(e) = rx.recv().await {
                    std::hint::black_box(&e);
                    counter.hit();
                }
            });
            tx
        })
        .collect();
    let source = source.clone();
    let expected = EVENTS * subscribers as u64;
    timed(group, rt, id, &counter, expected, move || {
        let (senders, source) = (senders.clone(), source.clone());
        async move {
            for i in 0..EVENTS as usize {
                let event = source.get(i);
                for tx in &senders {
                    tx.send(event.clone()).await.unwrap();
                }
            }
        }
    });
}

/// The bus: no-op handlers, one subscription (consumer group) per subscriber.
fn bench_bus(
    group: &mut Group<'_>,
    rt: &tokio::runtime::Runtime,
    id: &str,
    subscribers: usize,
    source: &Source,
) {
    let counter = Counter::new();
    let bus = EventBus::new(Arc::new(InProcessTransport::new()));
    rt.block_on(async {
        for _ in 0..subscribers {
            let counter = counter.clone();
            bus.subscribe(
                "order.#",
                Arc::new(move |e: EventEnvelope| {
                    std::hint::black_box(&e);
                    counter.hit();
                    async { Ok::<_, HandlerError>(()) }
                }),
            )
            .await
            .unwrap();
        }
    });
    let source = source.clone();
    let expected = EVENTS * subscribers as u64;
    timed(group, rt, id, &counter, expected, move || {
        let (bus, source) = (bus.clone(), source.clone());
        async move {
            for i in 0..EVENTS as usize {
                bus.publish(source.get(i)).await.unwrap();
            }
        }
    });
}

/// The in-process transport alone (publish, next, ack), to split the bus's cost.
fn bench_transport(group: &mut Group<'_>, rt: &tokio::runtime::Runtime, source: &Source) {
    let counter = Counter::new();
    let transport = Arc::new(InProcessTransport::new());
    rt.block_on(async {
        let mut stream = transport
            .subscribe(SubscribeOptions::new("raw-transport", "order.#").unwrap())
            .await
            .unwrap();
        let counter = counter.clone();
        tokio::spawn(async move {
            while let Ok(Some(d)) = stream.next().await {
                std::hint::black_box(d.event());
                d.ack().await.unwrap();
                counter.hit();
            }
        });
    });
    let source = source.clone();
    let id = "transport_only/1_subscribers";
    timed(group, rt, id, &counter, EVENTS, move || {
        let (transport, source) = (transport.clone(), source.clone());
        async move {
            for i in 0..EVENTS as usize {
                // `as_ref`: the transport itself, not the boxing `Arc<T>` forwarding impl.
                transport
                    .as_ref()
                    .publish("order.placed", source.get(i))
                    .await
                    .unwrap();
            }
        }
    });
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let prepared = Source::prepared();
    let mut group = c.benchmark_group("publish_to_handle");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));

    for subscribers in [1usize, 4] {
        bench_raw(
            &mut group,
            &rt,
            &format!("raw_mpsc/{subscribers}_subscribers"),
            subscribers,
            &prepared,
        );
        if subscribers == 1 {
            bench_transport(&mut group, &rt, &prepared);
        }
        bench_bus(
            &mut group,
            &rt,
            &format!("bus/{subscribers}_subscribers"),
            subscribers,
            &prepared,
        );
    }
    bench_raw(
        &mut group,
        &rt,
        "raw_mpsc_building/1_subscribers",
        1,
        &Source::Built,
    );
    bench_bus(
        &mut group,
        &rt,
        "bus_building/1_subscribers",
        1,
        &Source::Built,
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
