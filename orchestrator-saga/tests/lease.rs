//! Saga leases between two orchestrators sharing one store, as two processes share a Redis
//! store: a saga holds its lease from before its start is logged, and keeps it while it
//! waits for a concurrency slot, so the other's recovery leaves it alone; and a saga that
//! finished while the other waited for its lease is not run again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orchestrator_core::{
    AppendResult, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion,
    HandlerError, Lease, ReadAll, Result, StoreCapabilities,
};
use orchestrator_saga::{SagaDefinition, SagaOrchestrator, SagaStatus, SagaStep};
use orchestrator_store::InMemoryEventStore;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// How long a lease lasts without renewal: short, so that the test is quick.
const TTL: Duration = Duration::from_millis(300);

/// The leases of one shared store: key → (holder's token, expiry).
type Table = Arc<Mutex<HashMap<String, (u64, Instant)>>>;

/// Holds one lease's first `try_acquire` until the test opens it.
#[derive(Default)]
struct Gate {
    /// Notified when the `try_acquire` arrives.
    arrived: Notify,
    /// Lets it go on.
    open: Notify,
}

/// One candidate for a lease in [`Table`], the way `RedisLease` is one for its key.
struct SharedLease {
    table: Table,
    key: String,
    token: u64,
    gate: Mutex<Option<Arc<Gate>>>,
    /// Notified whenever a holder releases a lease.
    released: Arc<Notify>,
}

#[async_trait]
impl Lease for SharedLease {
    fn describe(&self) -> String {
        format!("test lease `{}`", self.key)
    }

    fn ttl(&self) -> Duration {
        TTL
    }

    async fn try_acquire(&self) -> Result<bool> {
        let gate = self.gate.lock().unwrap().take();
        if let Some(gate) = gate {
            gate.arrived.notify_one();
            gate.open.notified().await;
        }
        let mut table = self.table.lock().unwrap();
        let now = Instant::now();
        match table.get(&self.key) {
            Some((holder, expiry)) if *holder != self.token && *expiry > now => Ok(false),
            _ => {
                table.insert(self.key.clone(), (self.token, now + TTL));
                Ok(true)
            }
        }
    }

    async fn release(&self) -> Result<()> {
        let mut table = self.table.lock().unwrap();
        if table
            .get(&self.key)
            .is_some_and(|(holder, _)| *holder == self.token)
        {
            table.remove(&self.key);
            self.released.notify_one();
        }
        Ok(())
    }
}

/// An in-memory store whose leases compete across orchestrators, as a Redis store's do
/// across processes.
struct SharedStore {
    inner: InMemoryEventStore,
    leases: Table,
    tokens: AtomicU64,
    /// Set: the first time a saga's start is logged, this orchestrator runs `recover` before
    /// the append returns (another process looking for orphans at that very moment).
    recover_after_start: OnceLock<SagaOrchestrator>,
    recovered: AtomicBool,
    /// Set: the next lease made waits at this gate before its first `try_acquire`.
    gate: Mutex<Option<Arc<Gate>>>,
    released: Arc<Notify>,
}

impl SharedStore {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: InMemoryEventStore::new(),
            leases: Table::default(),
            tokens: AtomicU64::new(0),
            recover_after_start: OnceLock::new(),
            recovered: AtomicBool::new(false),
            gate: Mutex::default(),
            released: Arc::default(),
        })
    }
}

#[async_trait]
impl EventStore for SharedStore {
    fn name(&self) -> &'static str {
        "shared in-memory"
    }

    fn capabilities(&self) -> StoreCapabilities {
        self.inner.capabilities()
    }

    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult> {
        let start = events.iter().any(|e| e.event_type() == "saga.started");
        let result = self.inner.append(stream, expected, events).await?;
        if start
            && let Some(other) = self.recover_after_start.get()
            && !self.recovered.swap(true, Ordering::SeqCst)
        {
            let recovery = other.recover().await.unwrap();
            assert!(recovery.failed.is_empty(), "{:?}", recovery.failed);
        }
        Ok(result)
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>> {
        self.inner.read_stream(stream, from_version, limit).await
    }

    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        self.inner.read_all(query).await
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        self.inner.stream_version(stream).await
    }

    async fn head_position(&self) -> Result<u64> {
        self.inner.head_position().await
    }

    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        self.inner.subscribe(from_position, filter).await
    }

    fn lease(&self, name: &str) -> Option<Arc<dyn Lease>> {
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(SharedLease {
            table: Arc::clone(&self.leases),
            key: name.to_owned(),
            token,
            gate: Mutex::new(self.gate.lock().unwrap().take()),
            released: Arc::clone(&self.released),
        }))
    }
}

/// Which orchestrator ran each saga's step, by the saga's input `n`.
type Runs = Arc<Mutex<Vec<(&'static str, String)>>>;

/// Defines saga `slow` on `orchestrator` (`who`): one step that records its run and takes
/// twice as long as a lease lasts.
fn define(orchestrator: &SagaOrchestrator, who: &'static str, runs: &Runs) {
    let runs = Arc::clone(runs);
    let step = SagaStep::new("slow", move |context: Value| {
        let runs = Arc::clone(&runs);
        async move {
            let saga = context["n"].to_string();
            runs.lock().unwrap().push((who, saga));
            // Longer than the lease lasts: the sagas behind it wait longer still.
            tokio::time::sleep(TTL * 2).await;
            Ok::<_, HandlerError>(json!({}))
        }
    });
    orchestrator
        .define(SagaDefinition::new("slow", vec![step]).unwrap())
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_is_held_before_its_start_is_logged() {
    let store = SharedStore::new();
    let runs = Runs::default();
    let runner = SagaOrchestrator::new(store.clone() as Arc<dyn EventStore>);
    define(&runner, "runner", &runs);
    let other = SagaOrchestrator::new(store.clone() as Arc<dyn EventStore>);
    define(&other, "other", &runs);
    store.recover_after_start.set(other.clone()).ok().unwrap();

    let outcome = runner
        .start("slow", json!({ "n": 0 }))
        .await
        .unwrap()
        .outcome()
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert!(
        store.recovered.load(Ordering::SeqCst),
        "the other did not look"
    );
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs, [("runner", "0".to_owned())], "run by both");
    assert!(other.list(None).is_empty(), "the other resumed the saga");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_waiting_for_a_slot_keeps_its_lease() {
    let store = SharedStore::new();
    let runs = Runs::default();
    let runner = SagaOrchestrator::builder(store.clone() as Arc<dyn EventStore>)
        .max_concurrent(1)
        .build();
    define(&runner, "runner", &runs);
    let other = SagaOrchestrator::new(store.clone() as Arc<dyn EventStore>);
    define(&other, "other", &runs);
    let _watch = other.watch_orphans(Duration::from_millis(20));

    let mut handles = Vec::new();
    for n in 0..3 {
        handles.push(runner.start("slow", json!({ "n": n })).await.unwrap());
    }
    for handle in handles {
        let outcome = handle.outcome().await.unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed);
    }
    let runs = runs.lock().unwrap().clone();
    assert_eq!(
        runs.iter().filter(|(who, _)| *who == "other").count(),
        0,
        "the other orchestrator ran sagas the runner still held: {runs:?}"
    );
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(other.list(None).is_empty(), "the other resumed sagas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_finished_while_another_waited_for_its_lease_is_not_run_again() {
    let store = SharedStore::new();
    let runs = Runs::default();
    let (started, go_on) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let define = |orchestrator: &SagaOrchestrator, who: &'static str| {
        let (runs, started, go_on) = (Arc::clone(&runs), Arc::clone(&started), go_on.clone());
        let step = SagaStep::new("held", move |context: Value| {
            let (runs, started, go_on) = (Arc::clone(&runs), started.clone(), go_on.clone());
            async move {
                runs.lock().unwrap().push((who, context["n"].to_string()));
                if who == "runner" {
                    started.notify_one();
                    go_on.notified().await;
                }
                Ok::<_, HandlerError>(json!({}))
            }
        });
        orchestrator
            .define(SagaDefinition::new("held", vec![step]).unwrap())
            .unwrap();
    };
    let runner = SagaOrchestrator::new(store.clone() as Arc<dyn EventStore>);
    define(&runner, "runner");
    let other = SagaOrchestrator::new(store.clone() as Arc<dyn EventStore>);
    define(&other, "other");

    let handle = runner.start("held", json!({ "n": 0 })).await.unwrap();
    started.notified().await;
    // The other reads the unfinished saga's log, then waits for its lease...
    let gate = Arc::new(Gate::default());
    *store.gate.lock().unwrap() = Some(Arc::clone(&gate));
    let resuming = tokio::spawn({
        let (other, id) = (other.clone(), handle.id());
        async move { other.resume(id).await }
    });
    gate.arrived.notified().await;
    // ...while the runner finishes it and lets its lease go.
    go_on.notify_one();
    assert_eq!(
        handle.outcome().await.unwrap().status,
        SagaStatus::Completed
    );
    store.released.notified().await;
    gate.open.notify_one();
    let resumed = resuming.await.unwrap().unwrap();
    assert_eq!(
        resumed.outcome().await.unwrap().status,
        SagaStatus::Completed
    );
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs, [("runner", "0".to_owned())], "run again");
}
