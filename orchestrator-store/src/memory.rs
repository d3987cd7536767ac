//! The in-memory event store: every event in one vector, in global order.
//!
//! Global positions have no gaps here, so the event at position `p` sits at index `p - 1`
//! of the log: reads and subscriptions start at their position directly, without scanning
//! what comes before. Each stream keeps the positions of its events, so `read_stream` touches
//! only that stream's events, and the versions of its event ids, so that an append sent
//! again is recognised ([idempotent appends](orchestrator_core::store#idempotent-appends)).
//!
//! Subscriptions are pull-based: each one keeps a cursor into the log and reads the next
//! batch only when its consumer asks for more, then sleeps on a [`watch`] of the head position
//! until an append moves it. A slow subscriber therefore holds at most one batch, and the
//! hand-over from catch-up to live has no gap and no duplicate because there is no hand-over:
//! stored and live events are read from the same log by the same cursor.
//!
//! # Limits
//!
//! The store keeps at most [`MemoryLimits`] worth of events: by default one million or
//! about 1 GiB, whichever comes first, and refuses appends past that with
//! [`Error::StoreFull`]. [`InMemoryEventStore::with_limits`] sets other limits, none, or
//! [`WhenFull::EvictReleased`]: the oldest events that were
//! [released](InMemoryEventStore::release_through) (in the `orchestrator` facade: published
//! by its outbox relay) are evicted to make room, and only those. After an eviction:
//!
//! - `read_all` and `subscribe` from an evicted position start at the oldest event kept
//!   ([`InMemoryEventStore::usage`] says which); a subscription that eviction overtakes
//!   (it had not read events that are now gone) yields one [`Error::Evicted`] naming the
//!   oldest kept position, then goes on from there.
//! - `read_stream` from an evicted version is [`Error::Evicted`] naming the stream's oldest
//!   kept version: an aggregate whose early events are gone must be loaded from a snapshot
//!   taken before they went (read from the snapshot's version on).
//! - Stream versions stay right (appends with expected versions work as before), but an
//!   append sent again whose original was evicted is no longer recognised as a retry.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use async_trait::async_trait;
use futures::StreamExt;
use orchestrator_core::store::{find_retried_append, validate_batch_ids, validate_stream_id};
use orchestrator_core::{
    AppendResult, Error, EventEnvelope, EventFilter, EventId, EventStore, EventStream,
    ExpectedVersion, MaxEventSize, ReadAll, Result, StoreCapabilities, StoredPosition,
};
use tokio::sync::watch;

mod limits;

pub use limits::{MemoryLimits, MemoryUsage, WhenFull};

/// How many matching events a subscription reads from the log at a time.
const SUBSCRIPTION_BATCH: usize = 256;

/// How many log entries one read looks at before letting go of the lock, so that a read
/// with a rarely matching filter does not hold appends back for long.
const SCAN_CHUNK: usize = 4096;

/// An [`EventStore`] that keeps its events in memory, for tests and for applications that
/// do not need their events to outlive the process.
///
/// Clones share the same events. Subscriptions end when the last clone is dropped. It keeps
/// at most [`MemoryLimits::default`] worth of events unless told otherwise: see the
/// [module docs](self#limits).
///
/// ```
/// use futures::StreamExt;
/// use orchestrator_core::{EventEnvelope, EventFilter, EventStore, ExpectedVersion};
/// use orchestrator_store::InMemoryEventStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> orchestrator_core::Result<()> {
/// let store = InMemoryEventStore::new();
/// let mut orders = store.subscribe(1, EventFilter::all().event_type("order.placed")).await?;
/// store
///     .append("order-1", ExpectedVersion::Any, vec![EventEnvelope::new("order.placed", &1)?])
///     .await?;
/// let placed = orders.next().await.expect("the store is open")?;
/// assert_eq!(placed.stream_id(), Some("order-1"));
/// assert_eq!(placed.global_position(), Some(1));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct InMemoryEventStore {
    inner: Arc<Inner>,
    max_event_size: MaxEventSize,
}

struct Inner {
    state: RwLock<State>,
    limits: MemoryLimits,
    /// The released position ([`InMemoryEventStore::release_through`]); appends waiting for
    /// room wait on it.
    released: watch::Sender<u64>,
    /// The head position, sent on every append (while the write lock is held, so the value
    /// only grows); subscriptions wait on it, and see the store close when it drops.
    head: watch::Sender<u64>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            state: RwLock::default(),
            limits: MemoryLimits::default(),
            released: watch::Sender::new(0),
            head: watch::Sender::new(0),
        }
    }
}

struct State {
    /// Every event kept, in global order: the event at position `p` is
    /// `log[p - first]`.
    log: VecDeque<EventEnvelope>,
    /// The position of `log[0]`: 1 plus the number of events evicted.
    first: u64,
    /// What the kept events count for against [`MemoryLimits::max_bytes`].
    bytes: u64,
    /// Events up to this position may be evicted ([`InMemoryEventStore::release_through`]).
    released: u64,
    /// Each stream's events. A stream is only entered here by an append that writes to it;
    /// it stays when its events are evicted, to keep its version.
    streams: HashMap<String, StreamState>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            log: VecDeque::new(),
            first: 1,
            bytes: 0,
            released: 0,
            streams: HashMap::new(),
        }
    }
}

#[derive(Default)]
struct StreamState {
    /// How many of the stream's first versions were evicted.
    evicted: u64,
    /// The global positions of the stream's kept events: version `v` is at
    /// `positions[v - evicted - 1]`.
    positions: VecDeque<u64>,
    /// The version of each kept event id (the ids share their allocation with the logged
    /// events).
    ids: HashMap<EventId, u64>,
}

impl StreamState {
    fn version(&self) -> u64 {
        self.evicted + as_u64(self.positions.len())
    }

    /// Where the stream holds the event with this id.
    fn stored(&self, id: &EventId) -> Option<StoredPosition> {
        let stream_version = *self.ids.get(id)?;
        let global_position = *self
            .positions
            .get(index_of(stream_version.checked_sub(self.evicted)?))?;
        Some(StoredPosition {
            stream_version,
            global_position,
        })
    }
}

impl InMemoryEventStore {
    /// An empty store with the [default limits](MemoryLimits::default): one million events
    /// or about 1 GiB, appends past that refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuses events larger than `limit` (default [`MaxEventSize::DEFAULT`]) with
    /// [`Error::TooLarge`], writing nothing of their batch; the same limit as the broker
    /// stores', so that what works here works there.
    pub fn with_max_event_size(mut self, limit: MaxEventSize) -> Self {
        self.max_event_size = limit;
        self
    }
}

impl fmt::Debug for InMemoryEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.read();
        f.debug_struct("InMemoryEventStore")
            .field("head_position", &state.head())
            .field("streams", &state.streams.len())
            .finish()
    }
}

impl Inner {
    // A poisoned lock is recovered rather than propagated: the only code that writes the
    // state (`append`) checks everything first and then extends the log and the stream index
    // with operations that cannot panic half-way for reasons of ours, so a panic elsewhere
    // while a guard was held cannot have left the state half-written.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `events` if they fit (taking them out of the vector only then), under the
    /// write lock.
    fn append_now(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: &mut Vec<EventEnvelope>,
        bytes: u64,
    ) -> Result<AppendResult> {
        let mut guard = self.write();
        let state = &mut *guard;
        if let Some(existing) = state.streams.get(stream)
            && let Some(original) =
                find_retried_append(stream, expected, events, |id| existing.stored(id))?
        {
            return Ok(original);
        }
        let actual = state.stream_version(stream);
        if !expected.is_satisfied_by(actual) {
            return Err(Error::WrongExpectedVersion {
                stream: stream.to_owned(),
                expected,
                actual,
            });
        }
        let version = actual.unwrap_or(0);
        let head = state.head();
        let count = as_u64(events.len());
        if count == 0 {
            return Ok(AppendResult {
                next_expected_version: version,
                first_position: head + 1,
                last_position: head,
            });
        }
        state.make_room(&self.limits, count, bytes)?;
        let events = std::mem::take(events);
        // Eviction moved nothing the checks above looked at: versions stay, and `head` is
        // computed from positions, not from what is kept.
        state.bytes += bytes;
        state.log.reserve(events.len());
        let entry = state.streams.entry(stream.to_owned()).or_default();
        entry.positions.extend((1..=count).map(|i| head + i));
        entry.ids.reserve(events.len());
        entry.ids.extend(
            events
                .iter()
                .zip(1..)
                .map(|(event, i)| (event.id().clone(), version + i)),
        );
        state
            .log
            .extend(events.into_iter().zip(1..).map(|(event, i)| {
                event.with_position(
                    stream,
                    StoredPosition {
                        stream_version: version + i,
                        global_position: head + i,
                    },
                )
            }));
        let last_position = head + count;
        self.head.send_replace(last_position);
        Ok(AppendResult {
            next_expected_version: version + count,
            first_position: head + 1,
            last_position,
        })
    }
}

/// The log index of global position `position` (positions start at 1).
fn index_of(position: u64) -> usize {
    usize::try_from(position.saturating_sub(1)).unwrap_or(usize::MAX)
}

/// A count or index as a position or version.
fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl State {
    fn head(&self) -> u64 {
        self.first - 1 + as_u64(self.log.len())
    }

    fn stream_version(&self, stream: &str) -> Option<u64> {
        self.streams.get(stream).map(StreamState::version)
    }

    /// The kept event at `position`.
    fn at(&self, position: u64) -> Option<&EventEnvelope> {
        self.log
            .get(usize::try_from(position.checked_sub(self.first)?).ok()?)
    }

    /// Looks at the events from position `from` up to `until` (inclusive, and no further
    /// than the head), passing those that match `filter` to `take` until it has taken
    /// `limit`. Returns the position of the first event not looked at.
    fn scan(
        &self,
        from: u64,
        until: u64,
        filter: &EventFilter,
        limit: usize,
        mut take: impl FnMut(&EventEnvelope),
    ) -> u64 {
        // Positions before the oldest kept event are gone: start at it.
        let offset = self.first - 1;
        let start = index_of(from.max(self.first) - offset).min(self.log.len());
        let end = usize::try_from(until.saturating_sub(offset))
            .map_or(self.log.len(), |u| u.min(self.log.len()));
        let mut taken = 0;
        let mut next = start;
        for event in self.log.range(start..end.max(start)) {
            if taken == limit {
                break;
            }
            next += 1;
            if filter.matches(event) {
                take(event);
                taken += 1;
            }
        }
        as_u64(next) + 1 + offset
    }
}

#[async_trait]
impl EventStore for InMemoryEventStore {
    fn name(&self) -> &'static str {
        "in-memory"
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities::IN_MEMORY
    }

    fn lease(&self, name: &str) -> Option<Arc<dyn orchestrator_core::Lease>> {
        // Only this process sees the store.
        Some(Arc::new(orchestrator_core::LocalLease::new(format!(
            "lease `{name}` of the in-memory store"
        ))))
    }

    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult> {
        validate_stream_id(stream)?;
        validate_batch_ids(&events)?;
        self.max_event_size.check_append(stream, &events)?;
        let limits = self.inner.limits;
        let bytes: u64 = events.iter().map(|e| limits::event_bytes(stream, e)).sum();
        if let Some(max) = limits.max_events.filter(|&max| as_u64(events.len()) > max) {
            return Err(Error::invalid(
                "append",
                format!(
                    "{} events can never fit an in-memory store limited to {max} events; \
                     append fewer at a time or raise MemoryLimits::max_events",
                    events.len()
                ),
            ));
        }
        if let Some(max) = limits.max_bytes.filter(|&max| bytes > max) {
            return Err(Error::invalid(
                "append",
                format!(
                    "events of about {bytes} bytes can never fit an in-memory store limited \
                     to about {max} bytes; append less at a time or raise \
                     MemoryLimits::max_bytes"
                ),
            ));
        }
        let mut events = events;
        let mut released = self.inner.released.subscribe();
        let mut deadline = None;
        loop {
            // Marked as seen before trying, so a release after the try wakes the wait below.
            released.borrow_and_update();
            match self.inner.append_now(stream, expected, &mut events, bytes) {
                Err(
                    full @ Error::StoreFull {
                        temporary: true, ..
                    },
                ) if !limits.max_wait.is_zero() => {
                    let deadline = *deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + limits.max_wait);
                    match tokio::time::timeout_at(deadline, released.changed()).await {
                        Ok(Ok(())) => {}
                        // Timed out, or the store is being dropped.
                        _ => return Err(full),
                    }
                }
                other => return other,
            }
        }
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>> {
        validate_stream_id(stream)?;
        let state = self.inner.read();
        let Some(entry) = state.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let from = from_version.max(1);
        if from <= entry.evicted && limit > 0 {
            return Err(Error::Evicted {
                what: format!("stream `{stream}` from version {from}"),
                first_kept: entry.evicted + 1,
                hint: "the in-memory store evicted its oldest events to stay within its \
                       limits; load the aggregate from a snapshot taken before (reading from \
                       the snapshot's version on), or keep events in a durable store"
                    .to_owned(),
            });
        }
        let start = index_of(from - entry.evicted).min(entry.positions.len());
        Ok(entry
            .positions
            .range(start..)
            .take(limit)
            .filter_map(|&p| state.at(p).cloned())
            .collect())
    }

    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        let ReadAll {
            from_position,
            filter,
            limit,
        } = query;
        // Events appended while this read runs are not waited for: it ends at today's head.
        let until = self.inner.read().head();
        let mut events = Vec::new();
        let mut next = from_position.max(1);
        while events.len() < limit && next <= until {
            let chunk_end = next.saturating_add(as_u64(SCAN_CHUNK) - 1).min(until);
            let state = self.inner.read();
            next = state.scan(next, chunk_end, &filter, limit - events.len(), |e| {
                events.push(e.clone());
            });
        }
        Ok(events)
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        validate_stream_id(stream)?;
        Ok(self.inner.read().stream_version(stream))
    }

    async fn head_position(&self) -> Result<u64> {
        Ok(self.inner.read().head())
    }

    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        let subscription = Subscription {
            store: Arc::downgrade(&self.inner),
            head: self.inner.head.subscribe(),
            // What was evicted before the subscription began is skipped quietly, as by
            // `read_all`; what is evicted under it is reported.
            next: from_position.max(self.inner.read().first),
            filter,
            buffer: VecDeque::new(),
        };
        Ok(futures::stream::unfold(subscription, |mut sub| async move {
            let event = sub.next_event().await?;
            Some((event, sub))
        })
        .boxed())
    }
}

/// One subscriber's cursor into the log.
struct Subscription {
    /// Weak, so that a subscription does not keep a dropped store alive.
    store: Weak<Inner>,
    head: watch::Receiver<u64>,
    /// The position of the next event to look at.
    next: u64,
    filter: EventFilter,
    /// Matching events read from the log but not yet delivered (at most one batch).
    buffer: VecDeque<EventEnvelope>,
}

impl Subscription {
    /// The next matching event, waiting for appends when caught up, or an
    /// [`Error::Evicted`] when eviction overtook the cursor; `None` once the store is dropped.
    async fn next_event(&mut self) -> Option<Result<EventEnvelope>> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                return Some(Ok(event));
            }
            // Marking the head as seen before reading the log means that any append the read
            // misses changes the head afterwards, so `changed()` below cannot miss it.
            self.head.borrow_and_update();
            let caught_up = {
                let store = self.store.upgrade()?;
                let state = store.read();
                if self.next < state.first {
                    let error = Error::Evicted {
                        what: format!("the events from position {}", self.next),
                        first_kept: state.first,
                        hint: "the subscription fell behind an in-memory store that evicts \
                               its oldest events; it goes on from the oldest kept"
                            .to_owned(),
                    };
                    self.next = state.first;
                    return Some(Err(error));
                }
                let until = self.next.saturating_add(as_u64(SCAN_CHUNK) - 1);
                let buffer = &mut self.buffer;
                self.next = state.scan(self.next, until, &self.filter, SUBSCRIPTION_BATCH, |e| {
                    buffer.push_back(e.clone());
                });
                self.next > state.head()
            };
            if self.buffer.is_empty() && caught_up {
                // An error means the sender, and so the store, is gone.
                self.head.changed().await.ok()?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use orchestrator_core::ExpectedVersion::Any;

    use super::*;

    fn event(event_type: &str) -> EventEnvelope {
        EventEnvelope::new(event_type, &serde_json::json!({})).unwrap()
    }

    #[tokio::test]
    async fn positions_and_versions_start_at_one() {
        let store = InMemoryEventStore::new();
        assert_eq!(store.head_position().await.unwrap(), 0);
        let written = store
            .append("s", Any, vec![event("a.b"), event("a.c")])
            .await
            .unwrap();
        assert_eq!(
            written,
            AppendResult {
                next_expected_version: 2,
                first_position: 1,
                last_position: 2,
            }
        );
        let empty = store.append("s", Any, vec![]).await.unwrap();
        assert_eq!((empty.first_position, empty.last_position), (3, 2));
    }

    #[tokio::test]
    async fn clones_share_the_events() {
        let store = InMemoryEventStore::new();
        store
            .clone()
            .append("s", Any, vec![event("a.b")])
            .await
            .unwrap();
        assert_eq!(store.stream_version("s").await.unwrap(), Some(1));
        assert!(format!("{store:?}").contains("head_position: 1"));
    }

    #[tokio::test]
    async fn reads_and_subscriptions_cross_scan_chunks() {
        let store = InMemoryEventStore::new();
        let filler: Vec<_> = (0..SCAN_CHUNK * 2 + 10)
            .map(|_| event("filler.x"))
            .collect();
        store.append("filler", Any, filler).await.unwrap();
        store
            .append("rare", Any, vec![event("rare.x")])
            .await
            .unwrap();
        let rare = EventFilter::all().event_type("rare.x");

        let read = store
            .read_all(ReadAll::from(0, 10).filter(rare.clone()))
            .await
            .unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].global_position(), Some(as_u64(SCAN_CHUNK * 2 + 11)));
        let all = store.read_all(ReadAll::from(5, usize::MAX)).await.unwrap();
        assert_eq!(all.len(), SCAN_CHUNK * 2 + 7);

        let mut sub = store.subscribe(0, rare).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap();
        assert_eq!(got.unwrap().unwrap().stream_id(), Some("rare"));
    }

    #[tokio::test]
    async fn subscriptions_end_when_the_store_is_dropped() {
        let store = InMemoryEventStore::new();
        store.append("s", Any, vec![event("a.b")]).await.unwrap();
        let mut waiting = store.subscribe(1, EventFilter::all()).await.unwrap();
        let mut later = store.subscribe(1, EventFilter::all()).await.unwrap();
        assert!(waiting.next().await.unwrap().is_ok());
        let pending = tokio::spawn(async move { waiting.next().await.is_none() });
        tokio::task::yield_now().await;
        drop(store);
        let ended = tokio::time::timeout(Duration::from_secs(5), pending).await;
        assert!(ended.unwrap().unwrap(), "a waiting subscription must end");
        assert!(
            later.next().await.is_none(),
            "a subscription not yet caught up ends too"
        );
    }

    #[tokio::test]
    async fn a_slow_subscriber_holds_at_most_one_batch() {
        let store = InMemoryEventStore::new();
        let events: Vec<_> = (0..SUBSCRIPTION_BATCH * 3).map(|_| event("a.b")).collect();
        store.append("s", Any, events).await.unwrap();
        let mut sub = Subscription {
            store: Arc::downgrade(&store.inner),
            head: store.inner.head.subscribe(),
            next: 1,
            filter: EventFilter::all(),
            buffer: VecDeque::new(),
        };
        assert!(sub.next_event().await.unwrap().is_ok());
        assert_eq!(sub.buffer.len(), SUBSCRIPTION_BATCH - 1);
    }

    #[test]
    fn a_poisoned_lock_is_recovered() {
        let store = InMemoryEventStore::new();
        let inner = store.inner.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = inner.write();
            panic!("poison the lock");
        })
        .join();
        assert!(panicked.is_err() && store.inner.state.is_poisoned());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            store.append("s", Any, vec![event("a.b")]).await.unwrap();
            assert_eq!(store.head_position().await.unwrap(), 1);
        });
    }
}
