//! The orchestrator: definitions, starting and recovering sagas, queries, event delivery.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use orchestrator_core::{
    Clock, EventEnvelope, EventStore, Lease, SubscribeOptions, SystemClock, Transport,
};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::definition::SagaDefinition;
use crate::engine::Runner;
use crate::error::{Error, Result};
use crate::events::{EventListener, EventRouter, EventRouting};
use crate::id::SagaId;
use crate::instance::{Instance, SagaHandle};
use crate::log::{Live, LogWriter, Record, read_log};
use crate::status::{SagaOutcome, SagaSnapshot, SagaStatus};
use crate::step::RESERVED_KEY;
use crate::telemetry;

mod recovery;

pub use recovery::{OrphanWatch, Recovery, StoredSaga};

/// What the runners share.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) router: EventRouter,
    definitions: RwLock<HashMap<String, Arc<SagaDefinition>>>,
    registry: Mutex<Registry>,
    permits: Arc<Semaphore>,
    /// Whether the store honours `ExpectedVersion::Exact`.
    exact: bool,
    retain_finished: usize,
    shut_down: AtomicBool,
}

#[derive(Default)]
struct Registry {
    instances: HashMap<SagaId, Arc<Instance>>,
    /// Finished sagas, oldest first, so the oldest are forgotten past `retain_finished`.
    finished: VecDeque<SagaId>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Critical sections are single map and deque operations, so a poisoned lock holds
        // consistent data.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn finished(&self, id: SagaId) {
        let mut registry = self.registry();
        registry.finished.push_back(id);
        while registry.finished.len() > self.retain_finished {
            if let Some(old) = registry.finished.pop_front() {
                registry.instances.remove(&old);
            }
        }
    }
}

/// Reports a runner that ended without publishing its result: it was aborted (shutdown)
/// or it panicked.
struct StopGuard(Arc<Instance>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        if !self.0.is_done() {
            let reason = if std::thread::panicking() {
                Error::RunnerPanicked { id: self.0.id }
            } else {
                Error::Shutdown
            };
            self.0.finish(Err(Arc::new(reason)));
        }
    }
}

/// Runs sagas: keeps their definitions, starts instances under a concurrency limit, logs
/// every transition to the event store, recovers unfinished sagas after a crash, answers
/// queries, and hands events to the sagas waiting for them.
///
/// Clones share everything. See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct SagaOrchestrator {
    shared: Arc<Shared>,
}

/// Configures a [`SagaOrchestrator`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct SagaOrchestratorBuilder {
    store: Arc<dyn EventStore>,
    clock: Arc<dyn Clock>,
    max_concurrent: usize,
    retain_finished: usize,
    event_buffer: usize,
}

impl SagaOrchestratorBuilder {
    /// The clock for timeouts, backoff and deadlines (default: the system clock). Tests
    /// pass an [`orchestrator_core::ManualClock`].
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How many sagas run at once (default 1024, at least 1); more wait for a slot, with
    /// status `Running`.
    pub fn max_concurrent(mut self, sagas: usize) -> Self {
        self.max_concurrent = sagas.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// How many finished sagas stay queryable in memory (default 10,000); older ones are
    /// still in the store ([`SagaOrchestrator::load`]).
    pub fn retain_finished(mut self, sagas: usize) -> Self {
        self.retain_finished = sagas;
        self
    }

    /// How many delivered events that no wait expects yet are kept for waits that start
    /// later (default 1024; 0 disables the buffer).
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = events;
        self
    }

    /// Builds the orchestrator.
    pub fn build(self) -> SagaOrchestrator {
        let exact = self.store.capabilities().expected_version;
        SagaOrchestrator {
            shared: Arc::new(Shared {
                store: self.store,
                clock: self.clock,
                router: EventRouter::new(self.event_buffer),
                definitions: RwLock::default(),
                registry: Mutex::default(),
                permits: Arc::new(Semaphore::new(self.max_concurrent)),
                exact,
                retain_finished: self.retain_finished,
                shut_down: AtomicBool::new(false),
            }),
        }
    }
}

impl SagaOrchestrator {
    /// An orchestrator logging to `store`, with the default settings.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self::builder(store).build()
    }

    /// A builder for an orchestrator logging to `store`.
    pub fn builder(store: Arc<dyn EventStore>) -> SagaOrchestratorBuilder {
        SagaOrchestratorBuilder {
            store,
            clock: Arc::new(SystemClock),
            max_concurrent: 1024,
            retain_finished: 10_000,
            event_buffer: 1024,
        }
    }

    fn definitions(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<SagaDefinition>>> {
        // Writers only insert into the map, so a poisoned lock holds consistent data.
        self.shared
            .definitions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a saga definition under its name; a name already defined is an error.
    ///
    /// Running sagas needs a store that honours exact expected versions (each log record is
    /// appended at the version the runner last wrote, so that two runners of one saga cannot
    /// both go on). On a store that cannot (the RabbitMQ and Kafka stores), defining is
    /// refused with [`Unsupported`](orchestrator_core::Error::Unsupported) naming the stores
    /// that can, before any saga runs; inspecting stored sagas ([`list_stored`](Self::list_stored),
    /// [`load`](Self::load)) works on every store.
    pub fn define(&self, definition: SagaDefinition) -> Result<()> {
        if !self.shared.exact {
            return Err(orchestrator_core::Error::Unsupported {
                backend: self.shared.store.name(),
                operation: "exact expected versions (running sagas needs them)",
                hint: "keep saga logs in a store that checks versions: the in-memory, file or \
                       Redis store",
            }
            .into());
        }
        let mut definitions = self
            .shared
            .definitions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if definitions.contains_key(definition.name()) {
            return Err(Error::AlreadyDefined {
                saga: definition.name().to_owned(),
            });
        }
        definitions.insert(definition.name().to_owned(), Arc::new(definition));
        Ok(())
    }

    /// The definition registered under `name`.
    pub fn definition(&self, name: &str) -> Option<Arc<SagaDefinition>> {
        self.definitions().get(name).cloned()
    }

    /// The names of every defined saga.
    pub fn defined(&self) -> Vec<String> {
        let mut names: Vec<_> = self.definitions().keys().cloned().collect();
        names.sort();
        names
    }

    fn check_open(&self) -> Result<()> {
        if self.shared.shut_down.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        Ok(())
    }

    /// Starts saga `saga` with `input` (a JSON object; `null` is taken as `{}`) as its
    /// context.
    ///
    /// Returns once the start is recorded in the store: from then on, a crash does not lose
    /// the saga ([`recover`](Self::recover) carries it on). The saga runs in the background
    /// as soon as a concurrency slot is free.
    pub async fn start(&self, saga: &str, input: Value) -> Result<SagaHandle> {
        self.check_open()?;
        let definition = self.definition(saga).ok_or_else(|| Error::UndefinedSaga {
            saga: saga.to_owned(),
        })?;
        let invalid = |reason: String| Error::InvalidInput {
            saga: saga.to_owned(),
            reason,
        };
        let input = match input {
            Value::Object(fields) => fields,
            Value::Null => Map::new(),
            other => {
                return Err(invalid(format!(
                    "the input must be a JSON object, not {}",
                    json_kind(&other)
                )));
            }
        };
        if input.contains_key(RESERVED_KEY) {
            return Err(invalid(format!(
                "the key `{RESERVED_KEY}` is reserved for step information"
            )));
        }
        let id = SagaId::new();
        let time = self.shared.clock.now();
        let name = definition.shared_name().clone();
        let instance = Instance::new(id, name.clone(), Live::new(saga.to_owned(), time));
        let log = LogWriter::new(id, 0, self.shared.exact);
        let started = Record::Started {
            saga: saga.to_owned(),
            input,
        };
        // Registered before the start is logged, so a concurrent `recover` here that sees the
        // log also sees a saga being run here and leaves it alone.
        self.shared
            .registry()
            .instances
            .insert(id, instance.clone());
        // The lease is taken before the start is logged: once the log shows the saga, another
        // process's `recover` may look for it, and must find it held. A fresh id: nobody else
        // holds its lease. Should taking it fail (the backend is unreachable), the saga runs
        // all the same: only this process knows its id until its start is logged.
        let lease = self.take_lease(id).await.unwrap_or_else(|e| {
            tracing::warn!(saga_id = %id, error = %e, "could not take the lease of a new saga");
            None
        });
        let logged = log
            .append(&*self.shared.store, time, started, |record, time| {
                instance.with_live(|l| l.apply(record, time));
            })
            .await;
        if let Err(e) = logged {
            self.shared.registry().instances.remove(&id);
            if let Some(lease) = lease
                && let Err(e) = lease.release().await
            {
                tracing::debug!(saga_id = %id, error = %e, "releasing the lease of a saga that did not start failed; it expires");
            }
            return Err(e);
        }
        metrics::counter!(telemetry::SAGAS_STARTED, "saga" => name).increment(1);
        self.spawn(definition, instance.clone(), log, lease);
        Ok(SagaHandle { instance })
    }

    /// Starts saga `saga` and waits for its outcome.
    pub async fn run(&self, saga: &str, input: Value) -> Result<SagaOutcome> {
        self.start(saga, input).await?.outcome().await
    }

    /// Takes the lease of saga `id` from the store (`None`: the store has none, or only this
    /// process can use it, so that there is nobody to compete with). Held elsewhere: [`Error::RunningElsewhere`].
    pub(crate) async fn take_lease(&self, id: SagaId) -> Result<Option<Arc<dyn Lease>>> {
        let Some(lease) = self
            .shared
            .store
            .lease(&format!("saga.{}", id.as_uuid()))
            .filter(|lease| !lease.is_local())
        else {
            return Ok(None);
        };
        if lease.try_acquire().await? {
            Ok(Some(lease))
        } else {
            Err(Error::RunningElsewhere {
                id,
                lease: lease.describe(),
            })
        }
    }

    fn spawn(
        &self,
        definition: Arc<SagaDefinition>,
        instance: Arc<Instance>,
        log: LogWriter,
        lease: Option<Arc<dyn Lease>>,
    ) {
        let shared = self.shared.clone();
        let span = tracing::info_span!("saga", saga = %instance.saga, saga_id = %instance.id);
        let guard = StopGuard(instance.clone());
        let runner = Runner::new(shared.clone(), definition, instance.clone(), log);
        let task = tokio::spawn(
            async move {
                let guard = guard;
                let permits = shared.permits.clone();
                let run = async move {
                    // The semaphore is never closed, so acquiring fails only if it were;
                    // running without a permit is then the lesser evil.
                    let _permit = permits.acquire_owned().await.ok();
                    runner.run().await
                };
                // The lease is renewed while the saga waits for a slot too: a saga that waited
                // longer than the lease lasts would otherwise look orphaned to the other
                // processes, which would resume it while this one still runs it.
                let result = match &lease {
                    None => run.await,
                    Some(held) => tokio::select! {
                        result = run => result,
                        () = orchestrator_core::lease::renew_until_lost(held.as_ref()) => {
                            tracing::warn!(lease = %held.describe(), "the saga's lease was lost; its runner stops where it stands");
                            Err(Error::RunningElsewhere {
                                id: guard.0.id,
                                lease: held.describe(),
                            })
                        }
                    },
                };
                if let Err(e) = &result {
                    tracing::error!(error = %e, "saga runner stopped before the saga finished");
                }
                guard.0.finish(result.map_err(Arc::new));
                shared.finished(guard.0.id);
                if let Some(lease) = lease
                    && let Err(e) = lease.release().await
                {
                    tracing::debug!(error = %e, "releasing a saga's lease failed; it expires");
                }
            }
            .instrument(span),
        );
        instance.set_task(task.abort_handle());
    }

    /// The saga `id`, if this orchestrator started or recovered it (and has not forgotten it,
    /// see [`SagaOrchestratorBuilder::retain_finished`]).
    pub fn get(&self, id: SagaId) -> Option<SagaHandle> {
        let instance = self.shared.registry().instances.get(&id).cloned()?;
        Some(SagaHandle { instance })
    }

    /// The status of saga `id`, if this orchestrator knows it.
    pub fn status(&self, id: SagaId) -> Option<SagaStatus> {
        self.get(id).map(|h| h.status())
    }

    /// The sagas this orchestrator knows, optionally only those with `status`, oldest first.
    pub fn list(&self, status: Option<SagaStatus>) -> Vec<SagaHandle> {
        let mut handles: Vec<_> = self
            .shared
            .registry()
            .instances
            .values()
            .map(|instance| SagaHandle {
                instance: instance.clone(),
            })
            .collect();
        if let Some(status) = status {
            handles.retain(|h| h.status() == status);
        }
        handles.sort_by_key(SagaHandle::id);
        handles
    }

    /// Reads saga `id`'s state from the store — any saga logged there, whoever ran it.
    pub async fn load(&self, id: SagaId) -> Result<SagaSnapshot> {
        let events = read_log(&*self.shared.store, id).await?;
        if events.is_empty() {
            return Err(Error::NotFound { id });
        }
        Ok(Live::replay(id, &events)?.snapshot(id))
    }

    /// Hands an event to the sagas waiting for its type and correlation id (see
    /// [`WaitForEvent`](crate::WaitForEvent)); an event no wait expects yet is buffered for
    /// the next wait that registers for it.
    pub fn deliver_event(&self, event: EventEnvelope) -> EventRouting {
        self.shared.router.deliver(event)
    }

    /// How many delivered events wait in the buffer for a wait that expects them.
    pub fn buffered_events(&self) -> usize {
        self.shared.router.buffered()
    }

    /// Subscribes to `transport` and delivers every event received to the waiting sagas.
    /// Each delivery is acknowledged only once every saga it reached has logged what it did
    /// with it (or it was dropped from the full buffer, or no wait can take it): a saga that
    /// stops first — a crash, a store that cannot be written — hands it back to the
    /// transport, which delivers it again, so the saga finds it when it is recovered.
    /// Unmatched events wait in the buffer unacknowledged until a wait takes them.
    pub async fn listen(
        &self,
        transport: &dyn Transport,
        options: SubscribeOptions,
    ) -> Result<EventListener> {
        let deliveries = transport.subscribe(options).await?;
        let shared = self.shared.clone();
        Ok(EventListener::spawn(deliveries, move |event| {
            shared.router.route(event)
        }))
    }

    /// Stops every running saga where it stands, as a crash would, and refuses new work.
    /// Their logs keep every recorded transition, so another orchestrator on the same store
    /// can [`recover`](Self::recover) them; their handles report [`Error::Interrupted`].
    pub fn shutdown(&self) {
        self.shared.shut_down.store(true, Ordering::Release);
        let instances: Vec<_> = self.shared.registry().instances.values().cloned().collect();
        for instance in instances {
            if !instance.is_done() {
                instance.stop(Error::Shutdown);
            }
        }
    }
}

impl std::fmt::Debug for SagaOrchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaOrchestrator")
            .field("store", &self.shared.store.name())
            .field("defined", &self.defined())
            .field("sagas", &self.shared.registry().instances.len())
            .field("available_slots", &self.shared.permits.available_permits())
            .finish()
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
