//! [`EventOrchestrator`]: the facade that wires a transport, a store and a bus together.

use std::sync::Arc;

use orchestrator_bus::{DeadLetters, EventBus, InProcessTransport, Subscription};
use orchestrator_core::{
    EventEnvelope, EventHandler, EventId, EventStore, ExpectedVersion, Result, RetryPolicy,
    StoredPosition, Transport,
};
use orchestrator_store::InMemoryEventStore;
use serde_json::Value;

/// The main entry point: publish events, subscribe handlers, keep every published event in
/// the event store.
///
/// [`EventOrchestrator::new`] runs on the embedded default: the in-process transport and
/// the in-memory event store. Use it inside a tokio runtime.
#[derive(Clone)]
pub struct EventOrchestrator {
    bus: EventBus,
    store: Arc<dyn EventStore>,
}

impl std::fmt::Debug for EventOrchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventOrchestrator")
            .field("bus", &self.bus)
            .field("store", &self.store.name())
            .finish()
    }
}

impl Default for EventOrchestrator {
    fn default() -> Self {
        Self::new()
    }
}

impl EventOrchestrator {
    /// An orchestrator on the embedded default: in-process transport, in-memory store,
    /// default retry policy.
    pub fn new() -> Self {
        Self::with_parts(
            Arc::new(InProcessTransport::new()),
            Arc::new(InMemoryEventStore::new()),
            RetryPolicy::default(),
        )
    }

    /// An orchestrator on the given transport and store, with `retry` for subscriptions.
    pub fn with_parts(
        transport: Arc<dyn Transport>,
        store: Arc<dyn EventStore>,
        retry: RetryPolicy,
    ) -> Self {
        Self {
            bus: EventBus::new(transport).with_retry_policy(retry),
            store,
        }
    }

    /// Subscribes `handler` to an event type or pattern (`"user.created"`, `"user.*"`,
    /// `"order.#"`). The handler receives each matching event published from now on; when it
    /// fails with a retryable error the event is retried with backoff, then dead-lettered.
    pub async fn subscribe(
        &self,
        event_type_or_pattern: &str,
        handler: impl EventHandler,
    ) -> Result<Subscription> {
        self.bus
            .subscribe(event_type_or_pattern, Arc::new(handler))
            .await
    }

    /// Publishes an event of `event_type` with a JSON payload; returns its id.
    ///
    /// The event is first appended to the event store (stream named after the event type),
    /// then published to subscribers.
    pub async fn publish_event(&self, event_type: &str, data: Value) -> Result<EventId> {
        self.publish(EventEnvelope::new(event_type, &data)?).await
    }

    /// Publishes a prepared envelope; returns its id. It is appended to its own stream if it
    /// names one, else to the stream named after its event type.
    pub async fn publish(&self, event: EventEnvelope) -> Result<EventId> {
        let id = event.id().clone();
        let stream = event.stream_id().unwrap_or(event.event_type()).to_owned();
        let written = self
            .store
            .as_ref()
            .append(&stream, ExpectedVersion::Any, vec![event.clone()])
            .await?;
        let stored = event.with_position(
            stream,
            StoredPosition {
                stream_version: written.next_expected_version,
                global_position: written.last_position,
            },
        );
        self.bus.publish(stored).await?;
        Ok(id)
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        self.bus.transport()
    }

    /// The bus.
    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// Events whose handlers failed for good: list, inspect, reprocess, discard, report.
    pub fn dead_letters(&self) -> DeadLetters {
        self.bus.dead_letters()
    }
}
