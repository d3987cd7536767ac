//! A store wrapper that claims fewer capabilities than its store has, to test how callers
//! treat stores that lack them (the RabbitMQ and Kafka stores have no exact expected versions).

use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    AppendResult, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion, ReadAll,
    Result, StoreCapabilities,
};

/// Wraps a store and reports `capabilities` instead of the store's own (everything else is
/// passed through). Its name is `"limited"`.
#[derive(Debug, Clone)]
pub struct Limited<S> {
    inner: S,
    capabilities: StoreCapabilities,
}

impl<S: EventStore> Limited<S> {
    /// `inner`, claiming `capabilities`.
    pub fn new(inner: S, capabilities: StoreCapabilities) -> Self {
        Self {
            inner,
            capabilities,
        }
    }

    /// `inner`, claiming everything it has except exact expected versions.
    pub fn without_exact_versions(inner: S) -> Self {
        let mut capabilities = inner.capabilities();
        capabilities.expected_version = false;
        Self::new(inner, capabilities)
    }
}

#[async_trait]
impl<S: EventStore> EventStore for Limited<S> {
    fn name(&self) -> &'static str {
        "limited"
    }
    fn capabilities(&self) -> StoreCapabilities {
        self.capabilities
    }
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult> {
        self.inner.append(stream, expected, events).await
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
    fn lease(&self, name: &str) -> Option<Arc<dyn crate::Lease>> {
        self.inner.lease(name)
    }
}
