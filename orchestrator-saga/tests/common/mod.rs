//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::{
    AppendResult, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion,
    HandlerError, ManualClock, ReadAll, Result as CoreResult, StoreCapabilities,
};
use orchestrator_saga::{SagaOrchestrator, SagaStep, StepInfo};
use orchestrator_store::InMemoryEventStore;
use serde_json::{Value, json};
use tokio::sync::watch;

/// A log of calls (`"do:a"`, `"undo:a"`) with the idempotency key of each.
#[derive(Clone, Default, Debug)]
pub struct Calls(Arc<Mutex<Vec<(String, String)>>>);

impl Calls {
    pub fn push(&self, call: String, context: &Value) {
        let key = StepInfo::from_context(context)
            .map(|i| i.idempotency_key)
            .unwrap_or_default();
        self.0.lock().unwrap().push((call, key));
    }

    /// Every call, in order.
    pub fn list(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// How many times `call` was made.
    pub fn count(&self, call: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| c == call)
            .count()
    }

    /// The idempotency keys `call` was made with.
    pub fn keys(&self, call: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| c == call)
            .map(|(_, k)| k.clone())
            .collect()
    }
}

/// A step that records `do:<name>` and outputs `{<name>: true}`.
pub fn ok_step(calls: &Calls, name: &str) -> SagaStep {
    let (calls, label) = (calls.clone(), name.to_owned());
    SagaStep::new(name, move |context: Value| {
        let (calls, label) = (calls.clone(), label.clone());
        async move {
            calls.push(format!("do:{label}"), &context);
            Ok::<_, HandlerError>(json!({ label: true }))
        }
    })
}

/// A step that records `do:<name>` and fails permanently.
pub fn failing_step(calls: &Calls, name: &str) -> SagaStep {
    let (calls, label) = (calls.clone(), name.to_owned());
    SagaStep::new(name, move |context: Value| {
        let (calls, label) = (calls.clone(), label.clone());
        async move {
            calls.push(format!("do:{label}"), &context);
            Err::<Value, _>(HandlerError::permanent(format!("{label} refused")))
        }
    })
}

/// Adds a compensation that records `undo:<name>`.
pub fn compensated(calls: &Calls, step: SagaStep) -> SagaStep {
    let (calls, label) = (calls.clone(), step.name().to_owned());
    step.with_compensation(move |context: Value| {
        let (calls, label) = (calls.clone(), label.clone());
        async move {
            calls.push(format!("undo:{label}"), &context);
            Ok::<_, HandlerError>(())
        }
    })
}

/// A step that never finishes.
pub fn stuck_step(name: &str) -> SagaStep {
    SagaStep::new(name, |_: Value| async {
        futures::future::pending::<()>().await;
        Ok::<_, HandlerError>(Value::Null)
    })
}

/// Waits (by yielding, not sleeping) until `condition` holds; panics after 10 s.
pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let wait = async {
        while !condition() {
            tokio::task::yield_now().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .is_err()
    {
        panic!("timed out waiting until {what}");
    }
}

/// Waits until the manual clock has at least `n` sleepers.
pub async fn until_sleepers(clock: &ManualClock, n: usize) {
    until(&format!("{n} sleepers"), || clock.sleepers() >= n).await;
}

/// Awaits `future`, panicking after 10 s (a guard against hangs, not a sleep).
pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("did not finish within 10 s")
}

/// An orchestrator on `store` with a manual clock.
pub fn orchestrator_on(store: Arc<dyn EventStore>, clock: &ManualClock) -> SagaOrchestrator {
    SagaOrchestrator::builder(store)
        .clock(Arc::new(clock.clone()))
        .build()
}

/// Where a [`CrashingStore`] stops the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Append number `n` (from 1) never happens: the process dies just before writing it.
    Before(usize),
    /// Append number `n` is written, then the process dies before hearing back.
    After(usize),
}

/// A store that stands for a process dying at one append: the append hangs forever
/// (before or after writing), so the runner stops there, as it would on a crash.
pub struct CrashingStore {
    inner: InMemoryEventStore,
    point: CrashPoint,
    appends: AtomicUsize,
    crashed: watch::Sender<bool>,
}

impl CrashingStore {
    pub fn new(inner: InMemoryEventStore, point: CrashPoint) -> Arc<Self> {
        Arc::new(Self {
            inner,
            point,
            appends: AtomicUsize::new(0),
            crashed: watch::Sender::new(false),
        })
    }

    /// Waits until the crash point is reached.
    pub async fn crashed(&self) {
        let mut rx = self.crashed.subscribe();
        within(rx.wait_for(|c| *c)).await.unwrap();
    }
}

#[async_trait]
impl EventStore for CrashingStore {
    fn name(&self) -> &'static str {
        "crashing"
    }
    fn capabilities(&self) -> StoreCapabilities {
        self.inner.capabilities()
    }
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> CoreResult<AppendResult> {
        let n = self.appends.fetch_add(1, Ordering::SeqCst) + 1;
        match self.point {
            CrashPoint::Before(at) if n >= at => {
                self.crashed.send_replace(true);
                futures::future::pending().await
            }
            CrashPoint::After(at) if n >= at => {
                if n == at {
                    self.inner.append(stream, expected, events).await?;
                }
                self.crashed.send_replace(true);
                futures::future::pending().await
            }
            _ => self.inner.append(stream, expected, events).await,
        }
    }
    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> CoreResult<Vec<EventEnvelope>> {
        self.inner.read_stream(stream, from_version, limit).await
    }
    async fn read_all(&self, query: ReadAll) -> CoreResult<Vec<EventEnvelope>> {
        self.inner.read_all(query).await
    }
    async fn stream_version(&self, stream: &str) -> CoreResult<Option<u64>> {
        self.inner.stream_version(stream).await
    }
    async fn head_position(&self) -> CoreResult<u64> {
        self.inner.head_position().await
    }
    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> CoreResult<EventStream> {
        self.inner.subscribe(from_position, filter).await
    }
}

/// The event types of a saga's log, in order.
pub async fn log_types(store: &dyn EventStore, stream: &str) -> Vec<String> {
    store
        .read_stream(stream, 1, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_type().to_owned())
        .collect()
}
