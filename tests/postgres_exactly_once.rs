//! Exactly-once read models on PostgreSQL: a counter kept by a `PostgresReadModelStore`
//! equals the number of events exactly, although its runs crash between an event's writes
//! and their commit (the whole runtime dropped, as a killed process would be), and its apply
//! fails after writing (retried, then parked and restarted).
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pg_support;

use pg_support::{DropSchema, config, schema};

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use async_trait::async_trait;
use orchestrator::backends::postgres::PostgresEventStore;
use orchestrator::core::testkit::services::{postgres_url, unreachable};
use orchestrator::core::{
    EventEnvelope, EventStore, ExpectedVersion, HandlerError, ReadModelStore, RetryPolicy,
};
use orchestrator::cqrs::{QueryBus, ReadModel, ReadModelDefinition};
use orchestrator::store::projection::{ProjectionOptions, ProjectionState};
use serde_json::{Value, json};

/// How many events each test appends.
const EVENTS: u64 = 120;

/// A store in a schema of the test's own with [`EVENTS`] events at positions 1 ..= EVENTS,
/// or `None` (after saying why) when PostgreSQL is unreachable.
async fn store_with_events(schema: &str) -> Option<PostgresEventStore> {
    let store = match PostgresEventStore::connect(config(schema)).await {
        Ok(store) => store,
        Err(error) => {
            let url = orchestrator::connect::redact(&postgres_url());
            unreachable("PostgreSQL", &url, &error);
            return None;
        }
    };
    for batch in 0..EVENTS / 10 {
        let events = (0..10)
            .map(|i| EventEnvelope::new("tick", &json!({"n": batch * 10 + i})).unwrap())
            .collect();
        store
            .append(
                &format!("clock-{}", batch % 3),
                ExpectedVersion::Any,
                events,
            )
            .await
            .unwrap();
    }
    assert_eq!(store.head_position().await.unwrap(), EVENTS);
    Some(store)
}

/// What the counter does besides counting, to break its own runs.
#[derive(Clone, Copy)]
enum Trouble {
    None,
    /// At this position: tell the test the writes are made, then wait forever (the test
    /// drops the runtime: a crash between the writes and the commit).
    HangAfterWriting(u64),
    /// At every position divisible by this: fail, retryably, after writing, on the first
    /// attempt.
    FailAfterWriting(u64),
    /// At this position: fail for good after writing (the projection parks).
    ParkAfterWriting(u64),
}

/// Counts events: `count` is read, incremented and written back, and each event's position
/// gets a document `at-<position>` holding the count it made. Applied twice, an event
/// would bump the count past the number of events; missed, its document would be absent.
struct Counter {
    trouble: Trouble,
    written: Option<mpsc::Sender<u64>>,
    failed: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl Counter {
    fn new(trouble: Trouble) -> Self {
        Self {
            trouble,
            written: None,
            failed: std::sync::Mutex::default(),
        }
    }
}

#[async_trait]
impl ReadModel for Counter {
    async fn apply(
        &self,
        event: EventEnvelope,
        documents: &Arc<dyn ReadModelStore>,
    ) -> Result<(), HandlerError> {
        let position = event.global_position().unwrap();
        let count = documents
            .get("count")
            .await?
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
            + 1;
        documents.put("count", json!(count)).await?;
        documents
            .put(&format!("at-{position:04}"), json!(count))
            .await?;
        match self.trouble {
            Trouble::HangAfterWriting(at) if at == position => {
                if let Some(written) = &self.written {
                    written.send(position).unwrap();
                }
                std::future::pending::<()>().await;
            }
            Trouble::FailAfterWriting(every)
                if position.is_multiple_of(every)
                    && self.failed.lock().unwrap().insert(position) =>
            {
                return Err(HandlerError::retryable("failed after writing"));
            }
            Trouble::ParkAfterWriting(at) if at == position => {
                return Err(HandlerError::permanent("refused after writing"));
            }
            _ => {}
        }
        Ok(())
    }
}

fn definition(store: &PostgresEventStore, counter: Counter) -> ReadModelDefinition {
    let documents: Arc<dyn ReadModelStore> = Arc::new(store.read_model_store("ticks").unwrap());
    ReadModelDefinition::new("ticks", counter)
        .storage(documents)
        .projection_options(
            ProjectionOptions::default()
                .retry(RetryPolicy::exponential(5, Duration::from_millis(1)))
                .checkpoint_every(1000),
        )
}

/// Runs the counter in a runtime of its own until it has written (not committed) the event
/// at `crash_at`, then drops that runtime with every task and connection of it, as a
/// killed process would lose them.
fn run_until_crash(schema: &str, crash_at: u64) {
    let schema = schema.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (written, heard) = mpsc::channel();
        runtime.spawn(async move {
            let store = PostgresEventStore::connect(config(&schema)).await.unwrap();
            let mut counter = Counter::new(Trouble::HangAfterWriting(crash_at));
            counter.written = Some(written);
            let queries = QueryBus::new();
            let _model = queries
                .attach_read_model(Arc::new(store.clone()), definition(&store, counter))
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let at = heard
            .recv_timeout(Duration::from_secs(60))
            .expect("the counter never reached the crash point");
        assert_eq!(at, crash_at);
        runtime.shutdown_background();
    })
    .join()
    .unwrap();
}

/// The counter's documents as committed: `count`, the position, and each `at-` document.
async fn committed(store: &PostgresEventStore) -> (u64, u64, Vec<(String, Value)>) {
    let documents = store.read_model_store("ticks").unwrap();
    let count = documents
        .get("count")
        .await
        .unwrap()
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let position = documents.position().await.unwrap().unwrap();
    let mut all = documents.list().await.unwrap();
    all.retain(|(key, _)| key.starts_with("at-"));
    (count, position, all)
}

/// Every event applied once: `count` is the number of events, and event `p` made count `p`.
fn assert_exactly_once(count: u64, position: u64, at: &[(String, Value)], upto: u64) {
    assert_eq!(position, upto, "the position is not the last event applied");
    assert_eq!(count, upto, "applied {count} times for {upto} events");
    let expected: Vec<(String, Value)> = (1..=upto)
        .map(|p| (format!("at-{p:04}"), json!(p)))
        .collect();
    assert_eq!(at, expected, "an event was missed or applied twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_between_writes_and_commit_apply_nothing_twice() {
    let schema = schema("once_crash");
    let Some(store) = store_with_events(&schema).await else {
        return;
    };
    let _drop = DropSchema(schema.clone());

    for crash_at in [17, 18, 64, 101] {
        run_until_crash(&schema, crash_at);
        // The crashed run's writes for `crash_at` never committed: the documents stop just
        // before it, and agree with the position.
        let (count, position, at) = committed(&store).await;
        assert_exactly_once(count, position, &at, crash_at - 1);
    }

    // A last run, failing after writing now and then: the retries start from clean
    // documents each time.
    let queries = QueryBus::new();
    let model = queries
        .attach_read_model(
            Arc::new(store.clone()),
            definition(&store, Counter::new(Trouble::FailAfterWriting(7))),
        )
        .await
        .unwrap();
    model.wait_for_position(EVENTS).await.unwrap();
    model.stop().await;
    let (count, position, at) = committed(&store).await;
    assert_exactly_once(count, position, &at, EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_read_model_resumes_at_the_refused_event_without_its_writes() {
    let schema = schema("once_park");
    let Some(store) = store_with_events(&schema).await else {
        return;
    };
    let _drop = DropSchema(schema.clone());

    let queries = QueryBus::new();
    let model = queries
        .attach_read_model(
            Arc::new(store.clone()),
            definition(&store, Counter::new(Trouble::ParkAfterWriting(50))),
        )
        .await
        .unwrap();
    let status = model
        .wait_for_position(EVENTS)
        .await
        .expect_err("the read model went past the refused event");
    eprintln!("parked as expected: {status}");
    assert_eq!(model.status().unwrap().state, ProjectionState::Parked);
    model.stop().await;
    let (count, position, at) = committed(&store).await;
    assert_exactly_once(count, position, &at, 49);

    // A new process (a new query bus, a new store connection), the model fixed.
    let store = PostgresEventStore::connect(config(&schema)).await.unwrap();
    let queries = QueryBus::new();
    let model = queries
        .attach_read_model(
            Arc::new(store.clone()),
            definition(&store, Counter::new(Trouble::None)),
        )
        .await
        .unwrap();
    model.wait_for_position(EVENTS).await.unwrap();
    let stopped = model.stop().await.unwrap();
    assert_eq!(
        stopped.applied,
        EVENTS - 49,
        "the restart did not resume at the refused event"
    );
    let (count, position, at) = committed(&store).await;
    assert_exactly_once(count, position, &at, EVENTS);
}
