//! How much an [`InMemoryEventStore`](super::InMemoryEventStore) keeps, and what it does
//! when that is reached.

use orchestrator_core::MaxEventSize;
use std::time::Duration;

use orchestrator_core::{Error, EventEnvelope, Result};

use super::{InMemoryEventStore, Inner, State, as_u64};
use std::sync::Arc;

/// What a full [`InMemoryEventStore`](super::InMemoryEventStore) does with an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenFull {
    /// Refuse it with [`Error::StoreFull`](orchestrator_core::Error::StoreFull): every
    /// event stays readable, and nothing more is stored.
    #[default]
    Reject,
    /// Evict the oldest events that were
    /// [released](super::InMemoryEventStore::release_through) — in the `orchestrator`
    /// crate's `EventOrchestrator`, those its outbox relay has published — to make room. Events not released are never evicted: when only they are
    /// left, the append is refused with a temporary
    /// [`Error::StoreFull`](orchestrator_core::Error::StoreFull), to retry once more is
    /// released.
    EvictReleased,
}

/// The limits of an [`InMemoryEventStore`](super::InMemoryEventStore): how many events, and
/// about how many bytes, it keeps, and what it does when an append would pass either.
///
/// The default is what [`InMemoryEventStore::new`](super::InMemoryEventStore::new) uses:
/// [`DEFAULT_MAX_EVENTS`](Self::DEFAULT_MAX_EVENTS) events or
/// [`DEFAULT_MAX_BYTES`](Self::DEFAULT_MAX_BYTES) bytes, whichever comes first, and
/// [`WhenFull::Reject`]: a process that stores events without end gets an error it can act
/// on instead of running out of memory.
///
/// Bytes are counted per event as its data, type, id, stream id, source, subject and
/// headers plus [`EVENT_OVERHEAD_BYTES`](Self::EVENT_OVERHEAD_BYTES) for the rest (the
/// envelope, the log and index entries): an estimate of what the event holds in memory, not
/// an exact measure (a 200-byte JSON event counts about 800 bytes, about what the process
/// holds for it). Beyond the events, each
/// stream ever written keeps its id and version (about 100 bytes plus the id), also once all
/// its events are evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryLimits {
    /// The most events kept (`None`: no limit).
    pub max_events: Option<u64>,
    /// The most bytes kept, as estimated (`None`: no limit).
    pub max_bytes: Option<u64>,
    /// What an append that would pass a limit does.
    pub when_full: WhenFull,
    /// Under [`WhenFull::EvictReleased`], how long an append waits for events to be
    /// released when only unreleased ones are left, before it is refused (zero: at once).
    /// This is the back-pressure of a publisher that outruns the relay.
    pub max_wait: Duration,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_events: Some(Self::DEFAULT_MAX_EVENTS),
            max_bytes: Some(Self::DEFAULT_MAX_BYTES),
            when_full: WhenFull::Reject,
            max_wait: Self::DEFAULT_MAX_WAIT,
        }
    }
}

impl MemoryLimits {
    /// The default event limit: one million.
    pub const DEFAULT_MAX_EVENTS: u64 = 1_000_000;
    /// The default byte limit: 1 GiB.
    pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024 * 1024;
    /// The default [`max_wait`](Self::max_wait): 30 seconds.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);
    /// What each event is counted for beyond its variable-length parts.
    pub const EVENT_OVERHEAD_BYTES: u64 = 512;

    /// No limit: every event is kept as long as the store (the behaviour before limits
    /// existed; for tests and short-lived processes).
    pub fn unbounded() -> Self {
        Self {
            max_events: None,
            max_bytes: None,
            when_full: WhenFull::Reject,
            max_wait: Self::DEFAULT_MAX_WAIT,
        }
    }

    /// Keeps at most `events` events (at least 1).
    pub fn max_events(mut self, events: u64) -> Self {
        self.max_events = Some(events.max(1));
        self
    }

    /// Keeps at most about `bytes` bytes of events (at least one event's overhead).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes.max(Self::EVENT_OVERHEAD_BYTES));
        self
    }

    /// What an append that would pass a limit does.
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.when_full = policy;
        self
    }

    /// How long an append waits for room under [`WhenFull::EvictReleased`] (see
    /// [`max_wait`](Self::max_wait)).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }
}

/// What `event`, stored in `stream`, is counted for against [`MemoryLimits::max_bytes`].
pub(crate) fn event_bytes(stream: &str, event: &EventEnvelope) -> u64 {
    let headers: usize = event.headers().iter().map(|(k, v)| k.len() + v.len()).sum();
    let variable = event.data_bytes().len()
        + event.event_type().len()
        + event.id().as_str().len()
        + stream.len()
        + event.source().len()
        + event.subject().map_or(0, str::len)
        + headers;
    u64::try_from(variable).unwrap_or(u64::MAX) + MemoryLimits::EVENT_OVERHEAD_BYTES
}

/// What an [`InMemoryEventStore`] holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryUsage {
    /// Events kept.
    pub events: u64,
    /// What they count for against [`MemoryLimits::max_bytes`].
    pub bytes: u64,
    /// The position of the oldest event kept (the head plus one when none is).
    pub first_position: u64,
    /// Events evicted since the store was made.
    pub evicted: u64,
    /// Events up to this position may be evicted.
    pub released: u64,
}

impl State {
    /// Makes room for `count` events of `bytes` under `limits`, evicting released events if
    /// the policy allows; a [`Error::StoreFull`] when it cannot.
    pub(super) fn make_room(
        &mut self,
        limits: &MemoryLimits,
        count: u64,
        bytes: u64,
    ) -> Result<()> {
        loop {
            let events_over = limits
                .max_events
                .filter(|&max| as_u64(self.log.len()) + count > max);
            let bytes_over = limits
                .max_bytes
                .filter(|&max| self.bytes.saturating_add(bytes) > max);
            let limit = match (events_over, bytes_over) {
                (None, None) => return Ok(()),
                (Some(max), _) => format!("{max} events"),
                (None, Some(max)) => format!("about {max} bytes"),
            };
            if limits.when_full == WhenFull::EvictReleased
                && self.first <= self.released
                && self.evict_oldest()
            {
                continue;
            }
            let (hint, temporary) = match limits.when_full {
                WhenFull::Reject => (
                    "nothing more is stored; make the store with higher limits \
                     (InMemoryEventStore::with_limits, or the facade builder's memory_limits) \
                     or with WhenFull::EvictReleased, or use a durable store (FileEventStore)"
                        .to_owned(),
                    false,
                ),
                WhenFull::EvictReleased => (
                    format!(
                        "only released events are evicted, and events are released up to \
                         position {} of {} (an append waits up to {:?} for more): retry once \
                         more are released (in the facade: once the outbox relay has published \
                         them)",
                        self.released,
                        self.head(),
                        limits.max_wait
                    ),
                    true,
                ),
            };
            return Err(Error::StoreFull {
                store: "the in-memory event store",
                limit,
                hint,
                temporary,
            });
        }
    }

    /// Evicts the oldest event; false when there is none.
    pub(super) fn evict_oldest(&mut self) -> bool {
        let Some(event) = self.log.pop_front() else {
            return false;
        };
        let position = self.first;
        self.first += 1;
        let stream_id = event.stream_id().unwrap_or_default();
        self.bytes = self.bytes.saturating_sub(event_bytes(stream_id, &event));
        if let Some(stream) = self.streams.get_mut(stream_id) {
            // A stream's events are in global order, so its oldest kept is this one.
            if stream.positions.front() == Some(&position) {
                stream.positions.pop_front();
                stream.evicted += 1;
                if stream.ids.get(event.id()) == Some(&stream.evicted) {
                    stream.ids.remove(event.id());
                }
            }
        }
        true
    }
}

impl InMemoryEventStore {
    /// An empty store that keeps at most `limits` worth of events (see the
    /// [module docs](super#limits)).
    pub fn with_limits(limits: MemoryLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                ..Inner::default()
            }),
            max_event_size: MaxEventSize::DEFAULT,
        }
    }

    /// The limits the store was made with.
    pub fn limits(&self) -> MemoryLimits {
        self.inner.limits
    }

    /// Lets events up to `position` be evicted under [`WhenFull::EvictReleased`] (the
    /// `orchestrator` facade calls it with what its outbox relay has published). Released
    /// positions only grow; positions past the head are not released.
    pub fn release_through(&self, position: u64) {
        let mut state = self.inner.write();
        let released = position.min(state.head());
        if released > state.released {
            state.released = released;
            self.inner.released.send_replace(released);
        }
    }

    /// How many events (and bytes) the store holds, and what was evicted.
    pub fn usage(&self) -> MemoryUsage {
        let state = self.inner.read();
        MemoryUsage {
            events: as_u64(state.log.len()),
            bytes: state.bytes,
            first_position: state.first,
            evicted: state.first - 1,
            released: state.released,
        }
    }
}
