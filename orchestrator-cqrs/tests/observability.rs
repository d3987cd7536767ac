//! Metrics through the `metrics` facade and spans per command, aggregate command and query.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use orchestrator_core::HandlerError;
use orchestrator_cqrs::telemetry::{
    CACHE_HITS, CACHE_MISSES, COMMAND_DURATION, CONFLICTS, QUERY_DURATION, RETRIES, SNAPSHOTS,
    UNAUTHORIZED, VALIDATION_FAILURES, describe_metrics,
};
use orchestrator_cqrs::{
    AggregateRepository, AuthorizationMiddleware, CommandBus, CommandRequest, FieldError, QueryBus,
};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::snapshot::{InMemorySnapshotStore, SnapshotPolicy};
use serde_json::{Value, json};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Collects the names of the spans created.
#[derive(Clone, Default)]
struct Spans {
    names: Arc<Mutex<Vec<String>>>,
    next: Arc<AtomicU64>,
}

impl Subscriber for Spans {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attributes: &Attributes<'_>) -> Id {
        self.names
            .lock()
            .unwrap()
            .push(attributes.metadata().name().to_owned());
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn commands_aggregates_and_queries_record_metrics_and_spans() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let spans = Spans::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();

    metrics::with_local_recorder(&recorder, || {
        tracing::subscriber::with_default(spans.clone(), || {
            describe_metrics();
            runtime.block_on(async {
                let events = InMemoryEventStore::new();
                let accounts = AggregateRepository::<Account>::new(shared(events.clone()))
                    .unwrap()
                    .with_snapshots(
                        Arc::new(InMemorySnapshotStore::new()),
                        SnapshotPolicy::every_n_events(2),
                    );
                let bus = CommandBus::builder()
                    .middleware(AuthorizationMiddleware::new(|r: &CommandRequest| {
                        match r.principal.as_deref() {
                            Some("mallory") => Err("no".to_owned()),
                            _ => Ok(()),
                        }
                    }))
                    .build();
                let repo = accounts.clone();
                let needs_amount = |input: &Value| match input["amount"].as_i64() {
                    Some(_) => vec![],
                    None => vec![FieldError::new("/amount", "is required")],
                };
                bus.register_with_validator("deposit", needs_amount, move |input: Value| {
                    let repo = repo.clone();
                    async move {
                        let amount = input["amount"].as_i64().unwrap_or_default();
                        let done = repo.execute("a-1", AccountCommand::Deposit(amount)).await?;
                        Ok::<_, HandlerError>(json!(done.state.balance))
                    }
                })
                .unwrap();
                accounts
                    .execute(
                        "a-1",
                        AccountCommand::Open {
                            owner: "ann".into(),
                        },
                    )
                    .await
                    .unwrap();
                bus.send("deposit", json!({ "amount": 5 })).await.unwrap();
                bus.send("deposit", json!({})).await.unwrap_err();
                bus.dispatch(
                    CommandRequest::new("deposit", json!({ "amount": 1 }))
                        .with_principal("mallory"),
                )
                .await
                .unwrap_err();
                bus.send("unknown", json!({})).await.unwrap_err();

                // Two concurrent deposits from the same version: one conflict, one retry.
                let store = Arc::new(BarrierStore::new(events.clone(), 2));
                let racing = AggregateRepository::<Account>::new(store).unwrap();
                let (a, b) = tokio::join!(
                    racing.execute("a-1", AccountCommand::Deposit(1)),
                    racing.execute("a-1", AccountCommand::Deposit(2)),
                );
                a.unwrap();
                b.unwrap();

                let queries = QueryBus::new();
                queries
                    .register("balance", |_: Value| async {
                        Ok::<_, HandlerError>(json!(8))
                    })
                    .unwrap();
                for _ in 0..3 {
                    queries.execute("balance", json!({})).await.unwrap();
                }
            });
        });
    });

    let mut counters: HashMap<(String, String), u64> = HashMap::new();
    let mut histograms: HashMap<(String, String), usize> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let id = (key.name().to_owned(), labels.join(","));
        match value {
            DebugValue::Counter(n) => *counters.entry(id).or_default() += n,
            DebugValue::Histogram(samples) => *histograms.entry(id).or_default() += samples.len(),
            DebugValue::Gauge(_) => {}
        }
    }
    let counter =
        |name: &str, labels: &str| counters.get(&(name.to_owned(), labels.to_owned())).copied();
    let samples = |name: &str, labels: &str| {
        histograms
            .get(&(name.to_owned(), labels.to_owned()))
            .copied()
    };

    assert_eq!(
        samples(COMMAND_DURATION, "command=deposit,outcome=ok"),
        Some(1)
    );
    assert_eq!(
        samples(COMMAND_DURATION, "command=deposit,outcome=validation"),
        Some(1)
    );
    assert_eq!(
        samples(COMMAND_DURATION, "command=deposit,outcome=unauthorized"),
        Some(1)
    );
    assert_eq!(
        samples(COMMAND_DURATION, "command=unknown,outcome=no_handler"),
        Some(1)
    );
    assert_eq!(
        counter(VALIDATION_FAILURES, "kind=command,name=deposit"),
        Some(1)
    );
    assert_eq!(counter(UNAUTHORIZED, "command=deposit"), Some(1));
    assert_eq!(counter(CONFLICTS, "aggregate=account"), Some(1));
    assert_eq!(counter(RETRIES, "aggregate=account"), Some(1));
    assert_eq!(
        counter(SNAPSHOTS, "aggregate=account"),
        Some(1),
        "at version 2"
    );
    assert_eq!(
        counter(CACHE_MISSES, "query=balance,reason=absent"),
        Some(1)
    );
    assert_eq!(counter(CACHE_HITS, "query=balance"), Some(2));
    assert_eq!(
        samples(QUERY_DURATION, "query=balance,cache=miss,outcome=ok"),
        Some(1)
    );
    assert_eq!(
        samples(QUERY_DURATION, "query=balance,cache=hit,outcome=ok"),
        Some(2)
    );

    let names = spans.names.lock().unwrap();
    let count = |name: &str| names.iter().filter(|n| *n == name).count();
    assert_eq!(count("cqrs.command"), 4);
    // open, the deposit through the bus, the two racing deposits.
    assert_eq!(count("cqrs.aggregate"), 4);
    assert_eq!(count("cqrs.query"), 3);
}
