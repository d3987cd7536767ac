//! Event-sourced aggregates: state folded from a stream of events, changed only by handling
//! commands into new events.
//!
//! An [`Aggregate`] decides (`handle`: command → events, or a refusal) and evolves (`apply`:
//! event → state). An [`AggregateRepository`] runs a command against the aggregate of one id
//! over any [`EventStore`]:
//!
//! 1. **load** — the latest snapshot (if a [`SnapshotStore`] is configured and holds one of
//!    the current [`Aggregate::STATE_VERSION`]) and the events after it;
//! 2. **handle** the command against that state;
//! 3. **append** the events with [`ExpectedVersion::Exact`] the loaded version;
//! 4. on [`WrongExpectedVersion`](orchestrator_core::Error::WrongExpectedVersion) — someone
//!    else appended in between — wait per the [`RetryPolicy`], reload and go to 2, at most
//!    `max_attempts` times in all, then fail with [`Error::Conflict`]: no update is lost;
//! 5. after a successful append, save a snapshot when the [`SnapshotPolicy`] says one is due.
//!
//! With [`AggregateRepository::with_cache`] (for aggregates that are `Clone`), the state after
//! each command is kept in memory, and the next command on that aggregate starts from it
//! instead of reading the snapshot and the events back: step 1 costs nothing. The cache needs
//! no invalidation: the append in step 3 still checks the version, so a state made stale by
//! another writer (another process, or another repository) fails that check, and the retry
//! loads from the store.
//!
//! The store must honour exact expected versions (its
//! [`capabilities`](EventStore::capabilities)`().expected_version`). The stream of the
//! aggregate with id `id` is `"{TYPE}-{id}"`. Events are stored as JSON with their
//! [`AggregateEvent::event_type`]; snapshots are the state encoded with the core bincode codec,
//! so the state's serde form must suit bincode (no `#[serde(flatten)]`, untagged enums or
//! `skip_serializing_if`).
//!
//! ```
//! use std::sync::Arc;
//! use orchestrator_cqrs::{Aggregate, AggregateEvent, AggregateRepository};
//! use orchestrator_store::InMemoryEventStore;
//! use orchestrator_store::snapshot::{InMemorySnapshotStore, SnapshotPolicy};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
//! struct Account { open: bool, balance: i64 }
//!
//! #[derive(Clone, Copy)]
//! enum AccountCommand { Open, Deposit(i64), Withdraw(i64) }
//!
//! #[derive(Serialize, Deserialize)]
//! enum AccountEvent { Opened, Deposited(i64), Withdrew(i64) }
//!
//! impl AggregateEvent for AccountEvent {
//!     fn event_type(&self) -> &'static str {
//!         match self {
//!             Self::Opened => "account.opened",
//!             Self::Deposited(_) => "account.deposited",
//!             Self::Withdrew(_) => "account.withdrew",
//!         }
//!     }
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("{0}")]
//! struct Refused(&'static str);
//!
//! impl Aggregate for Account {
//!     const TYPE: &'static str = "account";
//!     type Command = AccountCommand;
//!     type Event = AccountEvent;
//!     type Error = Refused;
//!
//!     fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, Refused> {
//!         match (*command, self.open) {
//!             (AccountCommand::Open, false) => Ok(vec![AccountEvent::Opened]),
//!             (AccountCommand::Open, true) => Err(Refused("already open")),
//!             (_, false) => Err(Refused("not open")),
//!             (AccountCommand::Deposit(n), true) => Ok(vec![AccountEvent::Deposited(n)]),
//!             (AccountCommand::Withdraw(n), true) if n > self.balance => Err(Refused("insufficient funds")),
//!             (AccountCommand::Withdraw(n), true) => Ok(vec![AccountEvent::Withdrew(n)]),
//!         }
//!     }
//!
//!     fn apply(&mut self, event: AccountEvent) {
//!         match event {
//!             AccountEvent::Opened => self.open = true,
//!             AccountEvent::Deposited(n) => self.balance += n,
//!             AccountEvent::Withdrew(n) => self.balance -= n,
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_cqrs::Result<()> {
//! let accounts = AggregateRepository::<Account>::new(Arc::new(InMemoryEventStore::new()))?
//!     .with_snapshots(Arc::new(InMemorySnapshotStore::new()), SnapshotPolicy::every_n_events(2));
//! accounts.execute("a-1", AccountCommand::Open).await?;
//! let done = accounts.execute("a-1", AccountCommand::Deposit(100)).await?;
//! assert_eq!((done.state.balance, done.version), (100, 2));
//!
//! let refused = accounts.execute("a-1", AccountCommand::Withdraw(500)).await.unwrap_err();
//! assert_eq!(refused.rejection::<Refused>().map(|r| r.0), Some("insufficient funds"));
//!
//! let loaded = accounts.load("a-1").await?;
//! assert_eq!((loaded.snapshot_version, loaded.events_read), (Some(2), 0));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use orchestrator_core::{
    Clock, Event, EventEnvelope, EventStore, ExpectedVersion, Jitter, RetryPolicy, SystemClock,
};
use orchestrator_store::snapshot::{Snapshot, SnapshotPolicy, SnapshotStore, load_aggregate};
use orchestrator_store::temporal::{self, AsOf, Folded, fold_stream};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::context::{self, current_command};
use crate::error::{Error, Result};
use crate::telemetry;

/// An event-sourced aggregate; see the [module docs](self).
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate type, e.g. `"account"`: the prefix of its streams and a metric label.
    const TYPE: &'static str;
    /// The version of the state's shape; bump it when the state's fields change, so
    /// snapshots of the old shape are ignored (the state is folded from the events instead).
    const STATE_VERSION: u32 = 1;

    /// What the aggregate is asked to do.
    type Command: Send + Sync;
    /// What happened to it.
    type Event: AggregateEvent;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides: the events that `command` causes given the current state, or a refusal.
    /// It may run more than once for one command (after a conflict), on fresher state each
    /// time, so it must not have side effects.
    fn handle(&self, command: &Self::Command)
    -> std::result::Result<Vec<Self::Event>, Self::Error>;

    /// Evolves: the state after `event`. Events are facts, so this cannot fail.
    fn apply(&mut self, event: Self::Event);
}

/// An aggregate's event: a serde type that names its event type (dot-separated, e.g.
/// `"account.deposited"`) per value, so one enum can hold every event of the aggregate.
/// Every typed core [`Event`] is one.
pub trait AggregateEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The event type of this value.
    fn event_type(&self) -> &'static str;
    /// The schema version of this value's type.
    fn schema_version(&self) -> u32 {
        1
    }
}

impl<E: Event + Send + Sync + 'static> AggregateEvent for E {
    fn event_type(&self) -> &'static str {
        E::EVENT_TYPE
    }
    fn schema_version(&self) -> u32 {
        E::SCHEMA_VERSION
    }
}

/// An aggregate's state as the store's fold and snapshot code sees it.
#[derive(Default, Serialize, Deserialize)]
#[serde(transparent)]
struct StateOf<A>(A);

impl<A: Aggregate> temporal::Aggregate for StateOf<A> {
    const STATE_VERSION: u32 = A::STATE_VERSION;

    fn apply(&mut self, event: &EventEnvelope) -> orchestrator_core::Result<()> {
        self.0.apply(event.data()?);
        Ok(())
    }
}

/// An aggregate as loaded: its state and where its stream stands.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LoadedAggregate<A> {
    /// The state.
    pub state: A,
    /// The stream version the state includes (0: no events yet).
    pub version: u64,
    /// The global position of the last event included (0: none).
    pub position: u64,
    /// The version of the snapshot the load started from, if one was used.
    pub snapshot_version: Option<u64>,
    /// How many events were read after the snapshot (all of them without one).
    pub events_read: u64,
}

/// What executing a command did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Executed<A> {
    /// The state after the command's events.
    pub state: A,
    /// The stream version after the command.
    pub version: u64,
    /// How many events the command appended (0: the aggregate accepted it without change).
    pub events: usize,
    /// The global position of the last event appended; `None` when none was.
    pub position: Option<u64>,
    /// Attempts made (more than 1 after conflicts).
    pub attempts: u32,
    /// Whether a snapshot was saved after the command.
    pub snapshot_taken: bool,
}

/// Loads aggregates of type `A`, runs commands against them and appends their events; see
/// the [module docs](self). Cheap to clone.
pub struct AggregateRepository<A> {
    store: Arc<dyn EventStore>,
    snapshots: Option<(Arc<dyn SnapshotStore>, SnapshotPolicy)>,
    retry: RetryPolicy,
    clock: Arc<dyn Clock>,
    cache: Option<Arc<StateCache<A>>>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for AggregateRepository<A> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            snapshots: self.snapshots.clone(),
            retry: self.retry,
            clock: self.clock.clone(),
            cache: self.cache.clone(),
            _aggregate: PhantomData,
        }
    }
}

/// The states of recently used aggregates, by stream (see
/// [`AggregateRepository::with_cache`]). A command takes its aggregate's entry out while it
/// runs and puts the new state back once its events are appended: two commands on one
/// aggregate at once never share an entry (the second loads from the store).
struct StateCache<A> {
    entries: Mutex<CacheEntries<A>>,
    capacity: usize,
    /// `A::clone`: the entry keeps one copy, the caller gets the other.
    clone: fn(&A) -> A,
}

struct CacheEntries<A> {
    by_stream: HashMap<String, Cached<A>>,
    /// Bumped on every put: an entry's `used` says how recently it was put back.
    tick: u64,
}

struct Cached<A> {
    state: A,
    at: CachedAt,
    used: u64,
}

/// Where a cached state stands: its stream version, the global position of its last event,
/// and the version of the last snapshot taken of it.
#[derive(Clone, Copy)]
struct CachedAt {
    version: u64,
    position: u64,
    snapshot_version: Option<u64>,
}

impl CachedAt {
    fn of<A>(loaded: &LoadedAggregate<A>) -> Self {
        Self {
            version: loaded.version,
            position: loaded.position,
            snapshot_version: loaded.snapshot_version,
        }
    }
}

impl<A> StateCache<A> {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheEntries<A>> {
        // Each critical section is one map operation (or an eviction that only removes):
        // a panic cannot leave the map half-updated.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `stream`'s entry out, as a loaded aggregate.
    fn take(&self, stream: &str) -> Option<LoadedAggregate<A>> {
        let cached = self.lock().by_stream.remove(stream)?;
        Some(LoadedAggregate {
            state: cached.state,
            version: cached.at.version,
            position: cached.at.position,
            snapshot_version: cached.at.snapshot_version,
            events_read: 0,
        })
    }

    /// Keeps a copy of `state` for `stream`; when over capacity, forgets the least recently
    /// put eighth of the entries.
    fn put(&self, stream: &str, state: &A, at: CachedAt) {
        let state = (self.clone)(state);
        let mut entries = self.lock();
        entries.tick += 1;
        let used = entries.tick;
        entries
            .by_stream
            .insert(stream.to_owned(), Cached { state, at, used });
        if entries.by_stream.len() > self.capacity {
            let mut ages: Vec<u64> = entries.by_stream.values().map(|c| c.used).collect();
            let forget = (self.capacity / 8).max(1);
            let (_, cutoff, _) = ages.select_nth_unstable(forget - 1);
            let cutoff = *cutoff;
            entries.by_stream.retain(|_, c| c.used > cutoff);
        }
    }
}

impl<A: Aggregate> fmt::Debug for AggregateRepository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateRepository")
            .field("aggregate", &A::TYPE)
            .field("store", &self.store.name())
            .field("snapshots", &self.snapshots.as_ref().map(|(_, p)| p))
            .field("retry", &self.retry)
            .field("cache", &self.cache.as_ref().map(|c| c.capacity))
            .finish()
    }
}

impl<A: Aggregate + Clone> AggregateRepository<A> {
    /// Keeps the state of up to `capacity` recently used aggregates in memory, so that a
    /// command on one of them skips the load (snapshot and events): see the
    /// [module docs](self). A command that finds its aggregate's state stale (another writer
    /// appended) fails its version check and reloads, as without a cache. `capacity` 0 turns
    /// the cache off.
    pub fn with_cache(mut self, capacity: usize) -> Self {
        self.cache = (capacity > 0).then(|| {
            Arc::new(StateCache {
                entries: Mutex::new(CacheEntries {
                    by_stream: HashMap::new(),
                    tick: 0,
                }),
                capacity,
                clone: A::clone,
            })
        });
        self
    }
}

impl<A: Aggregate> AggregateRepository<A> {
    /// A repository over `store`, without snapshots, retrying conflicts up to 10 attempts in
    /// all (1 ms doubling to 100 ms, full jitter).
    ///
    /// A store that cannot honour exact expected versions (its
    /// [`capabilities`](EventStore::capabilities)`().expected_version` is `false`: the
    /// RabbitMQ and Kafka stores) is refused here with
    /// [`Unsupported`](orchestrator_core::Error::Unsupported) naming the stores that can,
    /// rather than failing on the first command.
    pub fn new(store: Arc<dyn EventStore>) -> crate::Result<Self> {
        if !store.capabilities().expected_version {
            return Err(orchestrator_core::Error::Unsupported {
                backend: store.name(),
                operation: "exact expected versions (an aggregate repository needs them)",
                hint: "keep aggregates in a store that checks versions: the in-memory, file \
                       or Redis store",
            }
            .into());
        }
        Ok(Self {
            store,
            snapshots: None,
            retry: RetryPolicy::exponential(10, Duration::from_millis(1))
                .with_max_delay(Duration::from_millis(100))
                .with_jitter(Jitter::Full),
            clock: Arc::new(SystemClock),
            cache: None,
            _aggregate: PhantomData,
        })
    }

    /// Loads from (and saves to) `snapshots`, taking one when `policy` says it is due.
    pub fn with_snapshots(
        mut self,
        snapshots: Arc<dyn SnapshotStore>,
        policy: SnapshotPolicy,
    ) -> Self {
        self.snapshots = Some((snapshots, policy));
        self
    }

    /// Retries conflicts per `policy` (`max_attempts` attempts in all).
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sleeps retry delays on `clock`, and dates snapshots with it.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Whether states are cached (see [`with_cache`](Self::with_cache)), and how many.
    pub fn cached(&self) -> Option<usize> {
        self.cache.as_ref().map(|c| c.lock().by_stream.len())
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The stream of the aggregate with id `id`: `"{TYPE}-{id}"`.
    pub fn stream_id(id: &str) -> String {
        format!("{}-{id}", A::TYPE)
    }

    /// Loads the aggregate with id `id` (the default state if its stream has no events).
    pub async fn load(&self, id: &str) -> Result<LoadedAggregate<A>> {
        self.load_stream(&Self::stream_id(id)).await
    }

    async fn load_stream(&self, stream: &str) -> Result<LoadedAggregate<A>> {
        let (folded, snapshot_version) = match &self.snapshots {
            Some((snapshots, _)) => {
                let loaded =
                    load_aggregate::<StateOf<A>>(&*self.store, &**snapshots, stream).await?;
                let snapshot_version = loaded.snapshot_version();
                let events = loaded.events_read();
                let (version, position) = (loaded.version(), loaded.folded().position);
                let mut folded = Folded::new(loaded.into_state());
                (folded.version, folded.position, folded.events) = (version, position, events);
                (folded, snapshot_version)
            }
            None => {
                let start = Folded::new(StateOf::<A>::default());
                let folded =
                    fold_stream(&*self.store, stream, 1, AsOf::Latest, start, |state, e| {
                        temporal::Aggregate::apply(state, e)
                    })
                    .await?;
                (folded, None)
            }
        };
        Ok(LoadedAggregate {
            state: folded.state.0,
            version: folded.version,
            position: folded.position,
            snapshot_version,
            events_read: folded.events,
        })
    }

    /// Runs `command` against the aggregate with id `id`: load, handle, append with the
    /// loaded version, retrying on conflicts; see the [module docs](self). Inside a command
    /// handler, the events name the command (causation and correlation ids) and their
    /// position is recorded for the command's outcome.
    pub async fn execute(&self, id: &str, command: A::Command) -> Result<Executed<A>> {
        let stream = Self::stream_id(id);
        let span = tracing::info_span!("cqrs.aggregate", aggregate = A::TYPE, stream = %stream);
        self.execute_on(&stream, &command).instrument(span).await
    }

    async fn execute_on(&self, stream: &str, command: &A::Command) -> Result<Executed<A>> {
        let command_info = current_command();
        let mut attempts = 0;
        loop {
            attempts += 1;
            // From the cache on the first attempt only: after a conflict, what it held (if a
            // command put something back meanwhile) is no fresher than the store.
            let loaded = match self.cache.as_ref().filter(|_| attempts == 1) {
                Some(cache) => match cache.take(stream) {
                    Some(loaded) => loaded,
                    None => self.load_stream(stream).await?,
                },
                None => self.load_stream(stream).await?,
            };
            let events = match loaded.state.handle(command) {
                Ok(events) => events,
                Err(e) => {
                    self.keep(stream, &loaded.state, CachedAt::of(&loaded));
                    return Err(Error::Rejected {
                        aggregate: A::TYPE,
                        source: Box::new(e),
                    });
                }
            };
            if events.is_empty() {
                self.keep(stream, &loaded.state, CachedAt::of(&loaded));
                return Ok(Executed {
                    state: loaded.state,
                    version: loaded.version,
                    events: 0,
                    position: None,
                    attempts,
                    snapshot_taken: false,
                });
            }
            let mut envelopes = Vec::with_capacity(events.len());
            for event in &events {
                // The store sets the stream id and position; only a non-default schema
                // version needs setting here.
                let mut envelope = EventEnvelope::new(event.event_type(), event)?;
                if event.schema_version() != 1 {
                    envelope = envelope.with_schema_version(event.schema_version());
                }
                if let Some(info) = &command_info {
                    envelope = info.stamp(envelope);
                }
                envelopes.push(envelope);
            }
            let expected = ExpectedVersion::Exact(loaded.version);
            match self.store.append(stream, expected, envelopes).await {
                Ok(written) => {
                    context::record_position(written.last_position);
                    let count = events.len();
                    let mut state = loaded.state;
                    for event in events {
                        state.apply(event);
                    }
                    let mut executed = Executed {
                        state,
                        version: written.next_expected_version,
                        events: count,
                        position: Some(written.last_position),
                        attempts,
                        snapshot_taken: false,
                    };
                    let (state, taken) = self
                        .snapshot_if_due(
                            stream,
                            loaded.snapshot_version,
                            executed.state,
                            executed.version,
                            written.last_position,
                        )
                        .await;
                    (executed.state, executed.snapshot_taken) = (state, taken);
                    let snapshot_version = if taken {
                        Some(executed.version)
                    } else {
                        loaded.snapshot_version
                    };
                    let at = CachedAt {
                        version: executed.version,
                        position: written.last_position,
                        snapshot_version,
                    };
                    self.keep(stream, &executed.state, at);
                    return Ok(executed);
                }
                Err(orchestrator_core::Error::WrongExpectedVersion { .. }) => {
                    metrics::counter!(telemetry::CONFLICTS, "aggregate" => A::TYPE).increment(1);
                    let Some(delay) = self.retry.delay_after(attempts) else {
                        return Err(Error::Conflict {
                            stream: stream.to_owned(),
                            attempts,
                        });
                    };
                    metrics::counter!(telemetry::RETRIES, "aggregate" => A::TYPE).increment(1);
                    tracing::debug!(stream, attempts, ?delay, "conflict: reloading and retrying");
                    self.clock.sleep(delay).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Puts `state` (a copy) in the cache, if there is one.
    fn keep(&self, stream: &str, state: &A, at: CachedAt) {
        if let Some(cache) = &self.cache {
            cache.put(stream, state, at);
        }
    }

    /// Saves a snapshot of `state` at `version` if one is due; a failure to save is logged
    /// and otherwise ignored (the events are written; the snapshot is only a cache).
    async fn snapshot_if_due(
        &self,
        stream: &str,
        snapshot_version: Option<u64>,
        state: A,
        version: u64,
        position: u64,
    ) -> (A, bool) {
        let Some((snapshots, policy)) = &self.snapshots else {
            return (state, false);
        };
        if !policy.is_due(snapshot_version, version) {
            return (state, false);
        }
        let mut folded = Folded::new(StateOf(state));
        (folded.version, folded.position) = (version, position);
        let saved = match Snapshot::of(stream, &folded, self.clock.now()) {
            Ok(snapshot) => snapshots.save(snapshot).await,
            Err(e) => Err(e),
        };
        let taken = match saved {
            Ok(()) => {
                metrics::counter!(telemetry::SNAPSHOTS, "aggregate" => A::TYPE).increment(1);
                true
            }
            Err(e) => {
                tracing::warn!(stream, version, "could not save a snapshot: {e}");
                false
            }
        };
        (folded.state.0, taken)
    }
}
