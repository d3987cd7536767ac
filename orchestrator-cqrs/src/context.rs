//! The command being handled, as seen from inside its handler: its id and correlation id (so
//! the events it causes name it), and the global position its appends reached (so the
//! sender learns where to wait for read-your-writes).
//!
//! The command bus opens a scope around each handler call. Inside it, an
//! [`AggregateRepository`](crate::AggregateRepository) and a [`PositionTrackingStore`] record
//! the position of every append; handlers that append some other way call
//! [`record_position`]. The scope belongs to the handler's task: work the handler spawns
//! onto other tasks is not tracked.
//!
//! ```
//! use std::sync::Arc;
//! use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, HandlerError};
//! use orchestrator_cqrs::{CommandBus, PositionTrackingStore};
//! use orchestrator_store::InMemoryEventStore;
//! use serde_json::{Value, json};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_cqrs::Result<()> {
//! let store = Arc::new(PositionTrackingStore::new(InMemoryEventStore::new()));
//! let bus = CommandBus::new();
//! let events = store.clone();
//! bus.register("create_user", move |input: Value| {
//!     let events = events.clone();
//!     async move {
//!         let created = EventEnvelope::new("user.created", &input)?;
//!         events.append("user-1", ExpectedVersion::NoStream, vec![created]).await?;
//!         Ok::<_, HandlerError>(json!({ "user_id": "user-1" }))
//!     }
//! })?;
//! let outcome = bus.send("create_user", json!({ "name": "John" })).await?;
//! assert_eq!(outcome.position, Some(1)); // wait for this before reading the new user
//! # Ok(())
//! # }
//! ```

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use orchestrator_core::{
    AppendResult, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion, ReadAll,
    StoreCapabilities,
};

tokio::task_local! {
    static SCOPE: Scope;
}

struct Scope {
    info: CommandInfo,
    position: Cell<Option<u64>>,
}

/// The command whose handler is running.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandInfo {
    /// The command's name.
    pub name: Arc<str>,
    /// The command's id, if the sender gave one.
    pub id: Option<Arc<str>>,
    /// The correlation id the sender gave, if any.
    pub correlation_id: Option<Arc<str>>,
}

impl CommandInfo {
    /// Stamps `event` as caused by this command: its causation id is the command id, its
    /// correlation id the command's correlation id (or else its id). Ids already set on the
    /// event are kept.
    pub fn stamp(&self, event: EventEnvelope) -> EventEnvelope {
        let mut event = event;
        if event.causation_id().is_none()
            && let Some(id) = &self.id
        {
            event = event.with_causation_id(&**id);
        }
        if event.correlation_id().is_none()
            && let Some(id) = self.correlation_id.as_ref().or(self.id.as_ref())
        {
            event = event.with_correlation_id(&**id);
        }
        event
    }
}

/// The command whose handler is running on this task, if any.
pub fn current_command() -> Option<CommandInfo> {
    SCOPE.try_with(|scope| scope.info.clone()).ok()
}

/// The id for the next event emitted by the running command (or by the saga step that sends
/// it): `<command id>/<n>` for its `n`-th event (1, 2, …). `None` outside any scope that
/// derives ids (a command without an id, outside a saga step, derives none).
///
/// A command sent again with the same id (a client's retry after a timeout) whose handler
/// emits the same events in the same order gets the same ids, so a store with idempotent
/// appends writes them once ([`StoreCapabilities::idempotent_append`](orchestrator_core::StoreCapabilities)).
/// The counting is [`orchestrator_core::derived_id`]'s, shared with saga steps.
pub fn next_event_id() -> Option<String> {
    orchestrator_core::derived_id::next_derived_id()
}

/// Records that the running command wrote up to global `position`; the command's outcome
/// reports the highest position recorded. Outside a command handler it does nothing.
pub fn record_position(position: u64) {
    let _ = SCOPE.try_with(|scope| {
        let highest = scope.position.get().map_or(position, |p| p.max(position));
        scope.position.set(Some(highest));
    });
}

/// Runs `handler` in the scope of command `info`; returns its output and the highest position
/// recorded. The position is also recorded in the enclosing command's scope, if any, so a
/// command that sends another reports the other's writes too.
pub(crate) async fn scoped<F: Future>(info: CommandInfo, handler: F) -> (F::Output, Option<u64>) {
    let base = info.id.clone();
    let scope = Scope {
        info,
        position: Cell::new(None),
    };
    let run = SCOPE.scope(scope, async move {
        let output = handler.await;
        let position = SCOPE.with(|scope| scope.position.get());
        (output, position)
    });
    // A command with an id names the ids of the events it emits.
    let (output, position) = match base {
        Some(base) => orchestrator_core::derived_id::derive_ids(base, run).await,
        None => run.await,
    };
    if let Some(p) = position {
        record_position(p);
    }
    (output, position)
}

/// An [`EventStore`] that records the position of every append made inside a command
/// handler (see the [module docs](self)), so dynamic handlers that append directly report
/// where they wrote. Everything else passes through unchanged.
#[derive(Debug, Clone, Default)]
pub struct PositionTrackingStore<S> {
    inner: S,
}

impl<S> PositionTrackingStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

#[async_trait]
impl<S: EventStore> EventStore for PositionTrackingStore<S> {
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
    ) -> orchestrator_core::Result<AppendResult> {
        let events = match current_command() {
            Some(info) => events.into_iter().map(|e| info.stamp(e)).collect(),
            None => events,
        };
        let written = !events.is_empty();
        let result = self.inner.append(stream, expected, events).await?;
        if written {
            record_position(result.last_position);
        }
        Ok(result)
    }
    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> orchestrator_core::Result<Vec<EventEnvelope>> {
        self.inner.read_stream(stream, from_version, limit).await
    }
    async fn read_all(&self, query: ReadAll) -> orchestrator_core::Result<Vec<EventEnvelope>> {
        self.inner.read_all(query).await
    }
    async fn stream_version(&self, stream: &str) -> orchestrator_core::Result<Option<u64>> {
        self.inner.stream_version(stream).await
    }
    async fn head_position(&self) -> orchestrator_core::Result<u64> {
        self.inner.head_position().await
    }
    async fn subscribe(
        &self,
        from_position: u64,
        filter: EventFilter,
    ) -> orchestrator_core::Result<EventStream> {
        self.inner.subscribe(from_position, filter).await
    }

    fn lease(&self, name: &str) -> Option<std::sync::Arc<dyn orchestrator_core::Lease>> {
        self.inner.lease(name)
    }

    fn inbox(&self) -> Option<std::sync::Arc<dyn orchestrator_core::Inbox>> {
        self.inner.inbox()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> CommandInfo {
        CommandInfo {
            name: "c".into(),
            id: Some(id.into()),
            correlation_id: None,
        }
    }

    #[tokio::test]
    async fn positions_are_scoped_and_nest() {
        record_position(99); // outside a scope: ignored
        let ((), outer) = scoped(info("outer"), async {
            record_position(3);
            let ((), inner) = scoped(info("inner"), async {
                assert_eq!(current_command().unwrap().id.as_deref(), Some("inner"));
                record_position(7);
            })
            .await;
            assert_eq!(inner, Some(7));
            record_position(5);
        })
        .await;
        assert_eq!(outer, Some(7));
        assert!(current_command().is_none());
    }

    #[test]
    fn stamping_keeps_ids_already_set() {
        let event = EventEnvelope::new("a.b", &1).unwrap();
        let stamped = info("cmd-1").stamp(event.clone());
        assert_eq!(stamped.causation_id(), Some("cmd-1"));
        assert_eq!(stamped.correlation_id(), Some("cmd-1"));
        let own = event.with_correlation_id("mine");
        assert_eq!(info("cmd-1").stamp(own).correlation_id(), Some("mine"));
    }
}
