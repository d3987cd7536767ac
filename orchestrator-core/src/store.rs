//! The event store: append-only streams of events, read back in order.
//!
//! Versions and positions: the first event of a stream has version 1, and a stream's version
//! is that of its last event. Global positions start at 1 and strictly increase in append
//! order across all streams (a backend may leave gaps). `from` arguments are inclusive, so a
//! reader that processed position `p` resumes from `p + 1`.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::envelope::EventEnvelope;
use crate::error::Result;

/// What the caller expects of a stream's version when appending (optimistic concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version.
    Any,
    /// The stream must not exist yet (have no events).
    NoStream,
    /// The stream must exist (have at least one event).
    StreamExists,
    /// The stream's last event must have exactly this version (`Exact(0)` = no events yet).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `actual` (`None`: no events) satisfies this expectation.
    pub fn is_satisfied_by(self, actual: Option<u64>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual.is_none(),
            Self::StreamExists => actual.is_some(),
            Self::Exact(0) => actual.is_none(),
            Self::Exact(n) => actual == Some(n),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::StreamExists => f.write_str("an existing stream"),
            Self::Exact(n) => write!(f, "version {n}"),
        }
    }
}

/// What an append wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append (the version of its last event).
    pub next_expected_version: u64,
    /// The global position of the first event written.
    pub first_position: u64,
    /// The global position of the last event written (the position to wait for in
    /// read-your-writes queries).
    pub last_position: u64,
}

/// Which events a read-all or a subscription returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    /// Only these event types; empty means every type.
    pub event_types: Vec<String>,
    /// Only events whose time is at or after this.
    pub from_time: Option<DateTime<Utc>>,
    /// Only events whose time is before this (exclusive).
    pub to_time: Option<DateTime<Utc>>,
    /// Only events of streams whose id starts with this.
    pub stream_prefix: Option<String>,
}

impl EventFilter {
    /// A filter that lets every event through.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only events of this type (may be called again to allow more types).
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_types.push(event_type.into());
        self
    }

    /// Only events at or after this time.
    pub fn from_time(mut self, time: DateTime<Utc>) -> Self {
        self.from_time = Some(time);
        self
    }

    /// Only events before this time.
    pub fn to_time(mut self, time: DateTime<Utc>) -> Self {
        self.to_time = Some(time);
        self
    }

    /// Only events of streams whose id starts with `prefix`.
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &EventEnvelope) -> bool {
        (self.event_types.is_empty() || self.event_types.iter().any(|t| t == event.event_type()))
            && self.from_time.is_none_or(|t| event.time() >= t)
            && self.to_time.is_none_or(|t| event.time() < t)
            && self
                .stream_prefix
                .as_deref()
                .is_none_or(|p| event.stream_id().is_some_and(|s| s.starts_with(p)))
    }
}

/// A read of the global order.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadAll {
    /// The first global position to return (inclusive); 0 or 1 reads from the start.
    pub from_position: u64,
    /// Which events to return.
    pub filter: EventFilter,
    /// At most this many events.
    pub limit: usize,
}

impl ReadAll {
    /// Every event from `from_position`, at most `limit`.
    pub fn from(from_position: u64, limit: usize) -> Self {
        Self {
            from_position,
            filter: EventFilter::all(),
            limit,
        }
    }

    /// Restricts the read with a filter.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }
}

/// What an event store can guarantee; the conformance suite checks each claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreCapabilities {
    /// Appends honour [`ExpectedVersion::Exact`], `NoStream` and `StreamExists` atomically;
    /// without it those return [`crate::Error::Unsupported`].
    pub expected_version: bool,
    /// An append of several events is all-or-nothing.
    pub atomic_batch: bool,
    /// Events survive a restart of the process.
    pub durable: bool,
    /// `read_stream` is supported.
    pub read_stream: bool,
}

impl StoreCapabilities {
    /// Every capability.
    pub const FULL: Self = Self {
        expected_version: true,
        atomic_batch: true,
        durable: true,
        read_stream: true,
    };

    /// Every capability but durability (an in-memory store).
    pub const IN_MEMORY: Self = Self {
        durable: false,
        ..Self::FULL
    };

    /// Builds capabilities from each flag.
    pub const fn new(
        expected_version: bool,
        atomic_batch: bool,
        durable: bool,
        read_stream: bool,
    ) -> Self {
        Self {
            expected_version,
            atomic_batch,
            durable,
            read_stream,
        }
    }
}

/// A live stream of stored events: catch-up, then live.
pub type EventStream = BoxStream<'static, Result<EventEnvelope>>;

/// An append-only store of event streams.
///
/// Object-safe (`Arc<dyn EventStore>`), because stores are picked at run time by the
/// umbrella's builder. Every implementation runs
/// `orchestrator_core::testkit::store::run_all` (feature `testkit`).
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// The implementation's name ("in-memory", "redis", …), for errors and metrics.
    fn name(&self) -> &'static str;

    /// What this store guarantees.
    fn capabilities(&self) -> StoreCapabilities;

    /// Appends `events` to `stream` if its version satisfies `expected`.
    ///
    /// On a mismatch returns [`crate::Error::WrongExpectedVersion`] and writes nothing.
    /// The stored events get the stream id, their stream version and global position.
    /// An empty `events` still checks `expected`, writes nothing, and reports the current
    /// version with the empty position range `head + 1 ..= head`.
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult>;

    /// Reads up to `limit` events of `stream`, from version `from_version` (inclusive) on.
    /// A stream that does not exist reads as empty; an invalid stream id is
    /// [`crate::Error::InvalidInput`].
    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>>;

    /// Reads events in global order: exactly `min(limit, matching events from the
    /// position)`, so callers page by resuming after the last position returned.
    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>>;

    /// The stream's current version, `None` if it has no events.
    async fn stream_version(&self, stream: &str) -> Result<Option<u64>>;

    /// The global position of the last event written, 0 when the store is empty.
    async fn head_position(&self) -> Result<u64>;

    /// Events from `from_position` (inclusive; 0 is the start) that pass `filter`: first those already
    /// stored, then new ones as they are appended, with no gap and no duplicate at the
    /// hand-over. The stream ends only when the store closes; errors are items.
    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream>;

    /// A lease named `name` that elects one process among those using this store (the outbox
    /// relay's, saga recovery's); `None` when the store has none, and then nothing keeps
    /// two processes from running the same singleton work on it.
    ///
    /// Stores only one process can use return a [`LocalLease`](crate::LocalLease); stores
    /// shared between processes return one kept in the backend.
    fn lease(&self, name: &str) -> Option<Arc<dyn crate::Lease>> {
        let _ = name;
        None
    }

    /// The [`Inbox`](crate::Inbox) kept beside this store's events, for subscriptions that
    /// de-duplicate across restarts; `None` when the store keeps none (then an
    /// [`InMemoryInbox`](crate::InMemoryInbox) is the fallback, which forgets on restart).
    ///
    /// Each call on one store returns the same inbox (or one sharing its state), so that
    /// every subscription of a process uses one view of the ids.
    fn inbox(&self) -> Option<Arc<dyn crate::Inbox>> {
        None
    }
}

#[async_trait]
impl<S: EventStore + ?Sized> EventStore for Arc<S> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn capabilities(&self) -> StoreCapabilities {
        (**self).capabilities()
    }
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult> {
        (**self).append(stream, expected, events).await
    }
    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>> {
        (**self).read_stream(stream, from_version, limit).await
    }
    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        (**self).read_all(query).await
    }
    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        (**self).stream_version(stream).await
    }
    async fn head_position(&self) -> Result<u64> {
        (**self).head_position().await
    }
    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        (**self).subscribe(from_position, filter).await
    }
    fn lease(&self, name: &str) -> Option<Arc<dyn crate::Lease>> {
        (**self).lease(name)
    }
    fn inbox(&self) -> Option<Arc<dyn crate::Inbox>> {
        (**self).inbox()
    }
}

/// Checks a stream id: non-empty, no control characters.
pub fn validate_stream_id(stream: &str) -> Result<()> {
    if stream.is_empty() {
        return Err(crate::Error::invalid("stream id", "must not be empty"));
    }
    if stream.chars().any(char::is_control) {
        return Err(crate::Error::invalid(
            "stream id",
            format!("{stream:?} contains control characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_version_rules() {
        use ExpectedVersion::*;
        assert!(Any.is_satisfied_by(None) && Any.is_satisfied_by(Some(3)));
        assert!(NoStream.is_satisfied_by(None) && !NoStream.is_satisfied_by(Some(1)));
        assert!(StreamExists.is_satisfied_by(Some(1)) && !StreamExists.is_satisfied_by(None));
        assert!(Exact(0).is_satisfied_by(None));
        assert!(Exact(2).is_satisfied_by(Some(2)) && !Exact(2).is_satisfied_by(Some(3)));
        assert!(!Exact(2).is_satisfied_by(None));
    }
}
