//! A store wrapper that validates on append and upcasts on read.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use orchestrator_core::schema::EventSchemas;
use orchestrator_core::{
    AppendResult, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion, ReadAll,
    Result, StoreCapabilities,
};

/// Wraps any [`EventStore`]: every event appended is validated first (one invalid event
/// rejects the whole append, which writes nothing), and every event read — by
/// `read_stream`, `read_all` or a subscription — is upcast to its type's latest version.
///
/// Filters of `read_all` and `subscribe` apply to the events as stored.
///
/// ```
/// use std::sync::Arc;
/// use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion};
/// use orchestrator_store::InMemoryEventStore;
/// use orchestrator_store::schema::{SchemaRegistry, SchemaVersion, ValidatingStore};
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = SchemaRegistry::new()
///     .with(SchemaVersion::new("user.created", 1, json!({ "required": ["name"] })))?;
/// let store = ValidatingStore::new(InMemoryEventStore::new(), Arc::new(registry));
/// let nameless = EventEnvelope::new("user.created", &json!({}))?;
/// let err = store.append("user-1", ExpectedVersion::Any, vec![nameless]).await.unwrap_err();
/// assert_eq!(err.decode_field(), Some("/name"));
/// # Ok(())
/// # }
/// ```
pub struct ValidatingStore<S> {
    inner: S,
    schemas: Arc<dyn EventSchemas>,
}

impl<S> ValidatingStore<S> {
    /// Wraps `inner`, checking events with `schemas`.
    pub fn new(inner: S, schemas: Arc<dyn EventSchemas>) -> Self {
        Self { inner, schemas }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn upcast_all(&self, events: Vec<EventEnvelope>) -> Result<Vec<EventEnvelope>> {
        events.into_iter().map(|e| self.schemas.upcast(e)).collect()
    }
}

impl<S: fmt::Debug> fmt::Debug for ValidatingStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidatingStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<S: EventStore> EventStore for ValidatingStore<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
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
        for event in &events {
            self.schemas.validate(event)?;
        }
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>> {
        let events = self.inner.read_stream(stream, from_version, limit).await?;
        self.upcast_all(events)
    }

    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        let events = self.inner.read_all(query).await?;
        self.upcast_all(events)
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        self.inner.stream_version(stream).await
    }

    async fn head_position(&self) -> Result<u64> {
        self.inner.head_position().await
    }

    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        let schemas = self.schemas.clone();
        let events = self.inner.subscribe(from_position, filter).await?;
        Ok(events
            .map(move |item| item.and_then(|e| schemas.upcast(e)))
            .boxed())
    }

    fn inbox(&self) -> Option<std::sync::Arc<dyn orchestrator_core::Inbox>> {
        self.inner.inbox()
    }

    fn lease(&self, name: &str) -> Option<std::sync::Arc<dyn orchestrator_core::Lease>> {
        self.inner.lease(name)
    }
}
