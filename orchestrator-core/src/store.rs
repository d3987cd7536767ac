//! The event store: append-only streams of events, read back in order.
//!
//! Versions and positions: the first event of a stream has version 1, and a stream's version
//! is that of its last event. Global positions start at 1 and strictly increase in append
//! order across all streams (a backend may leave gaps). `from` arguments are inclusive, so a
//! reader that processed position `p` resumes from `p + 1`.
//!
//! # Idempotent appends
//!
//! A store whose [`StoreCapabilities::idempotent_append`] is true recognises an append it
//! already wrote by the ids of its events, so that a caller may safely send an append again
//! after a crash, a timeout or a lost reply. Let the batch be `e1..en` (n ≥ 1), appended to
//! stream `S` expecting `X`:
//!
//! - **A retry.** If `e1`'s id is in `S` at version `v`, `S` holds the ids of `e1..en` at
//!   versions `v..=v+n-1` in that order, and `X` was satisfied by the stream just before
//!   them (`X.is_satisfied_by(if v == 1 { None } else { Some(v - 1) })`, always true for
//!   [`ExpectedVersion::Any`]), the append writes nothing and returns the original
//!   [`AppendResult`]: `next_expected_version` `v + n - 1`, and the global positions of the
//!   first and last original events. This holds however many events were appended to `S`
//!   since.
//! - **A clash.** If some id of the batch is in `S` but the batch is not such a retry (other
//!   order, a partial overlap, another place, an expectation the original would not have
//!   met), the append writes nothing and fails with [`crate::Error::DuplicateEvent`].
//! - **A batch that repeats an id** within itself is [`crate::Error::InvalidInput`].
//!
//! Ids are unique per stream only: the same id in another stream is not looked at, and an
//! append of it there is written as usual. Without the capability a store does not look at
//! ids at all, and an append sent again is written again.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::envelope::{EventEnvelope, EventId, StoredPosition};
use crate::error::{Error, Result};

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
    /// An append that repeats an earlier one (the same event ids, in the same order, at the
    /// same place of the stream) returns the original result and writes nothing; an append
    /// that clashes with stored ids otherwise fails with [`Error::DuplicateEvent`]. See
    /// [Idempotent appends](self#idempotent-appends).
    pub idempotent_append: bool,
}

impl StoreCapabilities {
    /// Every capability.
    pub const FULL: Self = Self {
        expected_version: true,
        atomic_batch: true,
        durable: true,
        read_stream: true,
        idempotent_append: true,
    };

    /// Every capability but durability (an in-memory store).
    pub const IN_MEMORY: Self = Self {
        durable: false,
        ..Self::FULL
    };

    /// Builds capabilities from each flag; `idempotent_append` is false (see
    /// [`with_idempotent_append`](Self::with_idempotent_append)).
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
            idempotent_append: false,
        }
    }

    /// These capabilities with [`idempotent_append`](Self::idempotent_append) set to `yes`.
    pub const fn with_idempotent_append(mut self, yes: bool) -> Self {
        self.idempotent_append = yes;
        self
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
    ///
    /// With [`StoreCapabilities::idempotent_append`], an append that repeats one already
    /// written — the same event ids in the same order, at the same versions, with an
    /// expectation the stream met before the originals — writes nothing and returns the
    /// original result, even if the stream grew since; so a caller may send an append again
    /// when it does not know whether the first attempt landed. An append some of whose ids
    /// the stream holds otherwise fails with [`crate::Error::DuplicateEvent`], and one that
    /// repeats an id within itself with [`crate::Error::InvalidInput`]. Ids are checked
    /// within `stream` only. The precise rules are in the
    /// [module docs](self#idempotent-appends).
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

/// Checks that no event id appears twice in one append: such a batch is an
/// [`Error::InvalidInput`] for stores with [`StoreCapabilities::idempotent_append`].
pub fn validate_batch_ids(events: &[EventEnvelope]) -> Result<()> {
    if events.len() < 2 {
        return Ok(());
    }
    let mut seen = HashSet::with_capacity(events.len());
    for event in events {
        if !seen.insert(event.id()) {
            return Err(Error::invalid(
                "append",
                format!(
                    "event id {} appears twice in one batch; every event of a stream needs an \
                     id of its own",
                    event.id()
                ),
            ));
        }
    }
    Ok(())
}

/// Decides whether an append of `events` to `stream` expecting `expected` repeats an
/// earlier append, for stores with [`StoreCapabilities::idempotent_append`] (see the
/// [module docs](self#idempotent-appends) for the rules).
///
/// `stored` answers where `stream` already holds an event with an id (`None`: it holds
/// none); it must see every append acknowledged before, and none may land in between
/// (call this under the store's append lock). Call [`validate_batch_ids`] first. Returns
/// `Ok(None)` when no id of the batch is in the stream (check `expected` and write as
/// usual), `Ok(Some(original))` for a retry (write nothing, return `original`), and
/// [`Error::DuplicateEvent`] when some id is in the stream but the batch is no retry.
pub fn find_retried_append(
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventEnvelope],
    mut stored: impl FnMut(&EventId) -> Option<StoredPosition>,
) -> Result<Option<AppendResult>> {
    let mut first: Option<StoredPosition> = None;
    let mut last: Option<StoredPosition> = None;
    let mut clash: Option<(&EventId, u64)> = None;
    let mut in_place = true;
    for (offset, event) in (0_u64..).zip(events) {
        let Some(found) = stored(event.id()) else {
            in_place = false;
            if clash.is_some() {
                break;
            }
            continue;
        };
        clash.get_or_insert((event.id(), found.stream_version));
        match first {
            None if offset == 0 => first = Some(found),
            Some(f) if f.stream_version.checked_add(offset) == Some(found.stream_version) => {}
            _ => in_place = false,
        }
        if !in_place {
            break;
        }
        last = Some(found);
    }
    let Some((event_id, version)) = clash else {
        return Ok(None);
    };
    if let (true, Some(first), Some(last)) = (in_place, first, last) {
        let before = first.stream_version.checked_sub(1).filter(|&v| v > 0);
        if expected.is_satisfied_by(before) {
            return Ok(Some(AppendResult {
                next_expected_version: last.stream_version,
                first_position: first.global_position,
                last_position: last.global_position,
            }));
        }
    }
    Err(Error::DuplicateEvent {
        stream: stream.to_owned(),
        event_id: event_id.clone(),
        version,
    })
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

    fn events(n: usize) -> Vec<EventEnvelope> {
        (0..n)
            .map(|i| EventEnvelope::new("t.e", &i).unwrap())
            .collect()
    }

    /// A stream holding `held` at versions 1.. and positions 10, 20, ….
    fn lookup(held: &[EventEnvelope]) -> impl FnMut(&EventId) -> Option<StoredPosition> + '_ {
        |id| {
            let at = held.iter().position(|e| e.id() == id)? as u64 + 1;
            Some(StoredPosition {
                stream_version: at,
                global_position: at * 10,
            })
        }
    }

    #[test]
    fn batch_ids_must_be_distinct() {
        let batch = events(3);
        assert!(validate_batch_ids(&batch).is_ok());
        assert!(validate_batch_ids(&[]).is_ok());
        let repeated = vec![batch[0].clone(), batch[1].clone(), batch[0].clone()];
        assert!(matches!(
            validate_batch_ids(&repeated),
            Err(Error::InvalidInput { .. })
        ));
    }

    #[test]
    fn retries_are_recognised() {
        use ExpectedVersion::*;
        let held = events(5);
        let retry = |expected, batch: &[EventEnvelope]| {
            find_retried_append("s", expected, batch, lookup(&held))
        };
        let original = |first: u64, last: u64| {
            Some(AppendResult {
                next_expected_version: last,
                first_position: first * 10,
                last_position: last * 10,
            })
        };
        assert_eq!(retry(Any, &events(2)).unwrap(), None);
        assert_eq!(retry(Any, &held[1..4]).unwrap(), original(2, 4));
        assert_eq!(retry(Exact(1), &held[1..4]).unwrap(), original(2, 4));
        assert_eq!(retry(StreamExists, &held[1..2]).unwrap(), original(2, 2));
        assert_eq!(retry(NoStream, &held[..2]).unwrap(), original(1, 2));
        assert_eq!(retry(Exact(0), &held[..1]).unwrap(), original(1, 1));

        let clash = |expected, batch: Vec<EventEnvelope>| match retry(expected, &batch) {
            Err(Error::DuplicateEvent {
                stream,
                event_id,
                version,
            }) => (stream, event_id, version),
            other => panic!("expected DuplicateEvent, got {other:?}"),
        };
        let id = |i: usize| held[i].id().clone();
        let s = "s".to_owned();
        // Another order, a gap, a partial overlap either way, an unmet expectation.
        assert_eq!(
            clash(Any, vec![held[2].clone(), held[1].clone()]),
            (s.clone(), id(2), 3)
        );
        assert_eq!(
            clash(Any, vec![held[1].clone(), held[3].clone()]),
            (s.clone(), id(1), 2)
        );
        let fresh = events(1).remove(0);
        assert_eq!(
            clash(Any, vec![held[4].clone(), fresh.clone()]),
            (s.clone(), id(4), 5)
        );
        assert_eq!(
            clash(Any, vec![fresh, held[0].clone()]),
            (s.clone(), id(0), 1)
        );
        assert_eq!(clash(Exact(3), held[1..3].to_vec()), (s.clone(), id(1), 2));
        assert_eq!(clash(NoStream, held[1..3].to_vec()), (s, id(1), 2));
        let message = Error::DuplicateEvent {
            stream: "s".to_owned(),
            event_id: id(1),
            version: 2,
        }
        .to_string();
        assert!(
            message.contains("already stored in stream `s` at version 2")
                && message.contains("not a retry"),
            "{message}"
        );
    }
}
