//! [`EventOrchestratorBuilder`]: transport, store, dead letters, retry defaults, clock,
//! schemas, query cache, saga concurrency.

use std::path::PathBuf;
use std::sync::Arc;

use orchestrator_bus::{EventBus, InProcessTransport};
use orchestrator_core::{Clock, DeadLetterQueue, EventStore, RetryPolicy, SystemClock, Transport};
use orchestrator_core::{EventSchemas, MaxEventSize};
use orchestrator_core::{InMemoryInbox, Inbox};
use orchestrator_cqrs::{CommandBus, QueryBus, QueryCacheConfig};
use orchestrator_saga::SagaOrchestrator;
use orchestrator_store::schema::ValidatingStore;
use orchestrator_store::{FileDeadLetterQueue, FileEventStore, InMemoryEventStore, SchemaRegistry};
use orchestrator_store::{MemoryLimits, WhenFull};

use super::EventOrchestrator;
use crate::connect::{self, Backend};
use crate::error::{Error, Result};
use crate::relay::{Relay, RelayOptions};

/// Where the builder gets a transport or a store from.
enum Source<T: ?Sized> {
    Ready(Arc<T>),
    Url(String),
}

/// Configures an [`EventOrchestrator`]; from [`EventOrchestrator::builder`].
///
/// Everything has a default: the in-process transport, the in-memory store (bounded: see
/// [`memory_limits`](Self::memory_limits)), the default [`RetryPolicy`], the system clock,
/// an empty schema registry, a query cache of 10,000 results for 30 s, up to 1024 sagas at
/// once.
///
/// **Dead letters in embedded mode.** With the embedded durable store — given by
/// [`store_url`](Self::store_url)`("file://DIR")` or by [`file_store`](Self::file_store) —
/// and the in-process transport, failed deliveries are parked on disk in `DIR/dead-letters`
/// (a [`FileDeadLetterQueue`]) unless [`dead_letter_queue`](Self::dead_letter_queue) names
/// another queue: they survive a restart, and
/// [`EventOrchestrator::dead_letters`] lists, reprocesses and discards them in the next run.
/// With any other store they live in memory, as long as the process.
///
/// ```
/// use std::time::Duration;
/// use orchestrator::prelude::*;
/// use orchestrator::store::FileEventStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let orchestrator = EventOrchestrator::builder()
///     // Events survive a restart: the embedded durable store.
///     .store(std::sync::Arc::new(FileEventStore::open(dir.path())?))
///     .retry_policy(RetryPolicy::exponential(5, Duration::from_millis(100)))
///     .build()
///     .await?;
/// // Or by URL, as the CLI does: .store_url("file:///var/lib/app"), .transport_url("redis://…").
/// # let _ = orchestrator;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct EventOrchestratorBuilder {
    transport: Option<Source<dyn Transport>>,
    store: Option<Source<dyn EventStore>>,
    dead_letters: Option<Arc<dyn DeadLetterQueue>>,
    /// The directory of a store given with [`file_store`](Self::file_store).
    file_store_dir: Option<PathBuf>,
    retry: RetryPolicy,
    clock: Arc<dyn Clock>,
    schemas: Option<Arc<SchemaRegistry>>,
    query_cache: Option<QueryCacheConfig>,
    max_concurrent_sagas: Option<usize>,
    commands: Option<CommandBus>,
    relay: RelayOptions,
    inbox: Option<Arc<dyn Inbox>>,
    application: Option<String>,
    /// The limits of the in-memory store the builder makes when given no store.
    memory_limits: MemoryLimits,
    /// That store, once made, for the relay to release what it published.
    memory_store: Option<InMemoryEventStore>,
    max_event_size: MaxEventSize,
}

impl Default for EventOrchestratorBuilder {
    fn default() -> Self {
        Self {
            transport: None,
            store: None,
            dead_letters: None,
            file_store_dir: None,
            retry: RetryPolicy::default(),
            clock: Arc::new(SystemClock),
            schemas: None,
            query_cache: Some(QueryCacheConfig::default()),
            max_concurrent_sagas: None,
            commands: None,
            relay: RelayOptions::default(),
            inbox: None,
            application: None,
            memory_limits: MemoryLimits::default().when_full(WhenFull::EvictReleased),
            memory_store: None,
            max_event_size: MaxEventSize::DEFAULT,
        }
    }
}

impl std::fmt::Debug for EventOrchestratorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let describe = |source: Option<String>| source.unwrap_or_else(|| "default".to_owned());
        f.debug_struct("EventOrchestratorBuilder")
            .field(
                "transport",
                &describe(self.transport.as_ref().map(|s| match s {
                    Source::Ready(t) => t.name().to_owned(),
                    Source::Url(url) => connect::redact(url),
                })),
            )
            .field(
                "store",
                &describe(self.store.as_ref().map(|s| match s {
                    Source::Ready(t) => t.name().to_owned(),
                    Source::Url(url) => connect::redact(url),
                })),
            )
            .field("retry", &self.retry)
            .field("query_cache", &self.query_cache)
            .field("max_event_size", &self.max_event_size)
            .finish_non_exhaustive()
    }
}

impl EventOrchestratorBuilder {
    /// Carries events on `transport` (a broker transport, or an
    /// [`InProcessTransport`] you configured).
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(Source::Ready(transport));
        self
    }

    /// Carries events on the transport `url` names, connected by [`build`](Self::build):
    /// `memory:`, `redis://…`, `amqp://…`, `kafka://host:port` (see [`crate::connect`]).
    pub fn transport_url(mut self, url: impl Into<String>) -> Self {
        self.transport = Some(Source::Url(url.into()));
        self
    }

    /// Keeps events (and saga logs) in `store`: the embedded durable
    /// [`FileEventStore`](orchestrator_store::FileEventStore) for events that survive a
    /// restart, or a broker-backed store. To have dead letters kept beside a
    /// `FileEventStore` too, give it with [`file_store`](Self::file_store) instead.
    pub fn store(mut self, store: Arc<dyn EventStore>) -> Self {
        self.store = Some(Source::Ready(store));
        self.file_store_dir = None;
        self
    }

    /// Keeps events (and saga logs) in the embedded durable `store`, and — with the
    /// in-process transport and no [`dead_letter_queue`](Self::dead_letter_queue) given —
    /// dead letters in a [`FileDeadLetterQueue`] in its directory's `dead-letters`, so they
    /// survive a restart (see the [type docs](Self)).
    pub fn file_store(mut self, store: FileEventStore) -> Self {
        let dir = store.dir().to_owned();
        self.store = Some(Source::Ready(Arc::new(store)));
        self.file_store_dir = Some(dir);
        self
    }

    /// Keeps events in the store `url` names, opened by [`build`](Self::build): `memory:`,
    /// `file://DIR`, `redis://…`, `amqp://…`, `kafka://host:port`. With `file://DIR` and the
    /// in-process transport, dead letters are kept in `DIR/dead-letters` (see the
    /// [type docs](Self)).
    pub fn store_url(mut self, url: impl Into<String>) -> Self {
        self.store = Some(Source::Url(url.into()));
        self.file_store_dir = None;
        self
    }

    /// Parks failed deliveries in `queue`. Applies to the default in-process transport; a
    /// broker transport keeps its own durable queue, and giving both is an error. Without
    /// it, the in-process transport parks them in `DIR/dead-letters` on a `file://DIR` store,
    /// else in memory.
    pub fn dead_letter_queue(mut self, queue: Arc<dyn DeadLetterQueue>) -> Self {
        self.dead_letters = Some(queue);
        self
    }

    /// The retry policy of subscriptions that name none.
    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The clock for retry backoff, saga timeouts and the query cache's time-to-live (tests
    /// pass a [`ManualClock`](orchestrator_core::ManualClock)).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Validates and upcasts events with `registry` (shared, so you can keep registering).
    pub fn schemas(mut self, registry: Arc<SchemaRegistry>) -> Self {
        self.schemas = Some(registry);
        self
    }

    /// The query cache's capacity and time-to-live.
    pub fn query_cache(mut self, config: QueryCacheConfig) -> Self {
        self.query_cache = Some(config);
        self
    }

    /// No query cache: every query runs its handler.
    pub fn without_query_cache(mut self) -> Self {
        self.query_cache = None;
        self
    }

    /// How many sagas run at once (default 1024); more wait for a slot.
    pub fn max_concurrent_sagas(mut self, sagas: usize) -> Self {
        self.max_concurrent_sagas = Some(sagas);
        self
    }

    /// Sends commands through `bus` — one built with middleware (logging, authorization,
    /// idempotency by command id) — instead of a plain one.
    pub fn command_bus(mut self, bus: CommandBus) -> Self {
        self.commands = Some(bus);
        self
    }

    /// Names the application. Its unnamed subscriptions then get stable names derived from
    /// it — `<application>:<pattern>` with `*` written `any` and `#` written `all`
    /// (`billing:order.all` for `order.#`), and `…-<n>` for the `n`-th unnamed subscription
    /// to the same patterns (in the order they are made) — so that a
    /// restarted process rejoins its consumer groups on a broker and resumes where it left
    /// off, instead of starting new groups that miss what was published while it was down.
    /// Without it, an unnamed subscription is ephemeral: a new unique group on every start,
    /// removed when it stops (and a warning on a broker transport). A subscription made
    /// [`ephemeral`](orchestrator_bus::SubscriptionConfig::ephemeral) is never given a
    /// stable name.
    pub fn application(mut self, name: impl Into<String>) -> Self {
        self.application = Some(name.into());
        self
    }

    /// How the outbox relay runs: its name, checkpoint frequency, or
    /// [`RelayOptions::disabled`] for a process that must not relay (see [`crate::relay`]).
    pub fn relay(mut self, options: RelayOptions) -> Self {
        self.relay = options;
        self
    }

    /// The limits of the in-memory store used when no store is given (or `memory:` is):
    /// by default [`MemoryLimits::default`] (one million events or about 1 GiB) with
    /// [`WhenFull::EvictReleased`], so a long-running process keeps the newest events and
    /// never loses one the outbox relay has not published yet: the oldest published ones
    /// are evicted, and a publish that finds only unpublished ones waits (up to
    /// [`MemoryLimits::max_wait`]) for the relay to catch up. After an eviction, reading an
    /// aggregate's evicted events is [`Error::Evicted`](orchestrator_core::Error::Evicted):
    /// such aggregates need snapshots (see
    /// [`orchestrator_store::memory`](orchestrator_store::memory#limits)).
    /// [`MemoryLimits::unbounded`] keeps everything, as before limits existed. A store given
    /// with [`store`](Self::store) keeps its own limits.
    pub fn memory_limits(mut self, limits: MemoryLimits) -> Self {
        self.memory_limits = limits;
        self
    }

    /// The in-memory store made when none is given, with the builder's limits.
    fn memory_store(&mut self) -> Arc<dyn EventStore> {
        let store = InMemoryEventStore::with_limits(self.memory_limits)
            .with_max_event_size(self.max_event_size);
        self.memory_store = Some(store.clone());
        Arc::new(store)
    }

    /// The largest event the orchestrator accepts (default [`MaxEventSize::DEFAULT`], 900 KiB,
    /// under every supported broker's default message size): `publish` refuses a larger one
    /// with [`TooLarge`](orchestrator_core::Error::TooLarge) before storing anything, and
    /// the store and transport the builder makes — the defaults, and those given by URL —
    /// refuse larger ones too (a store or transport you give ready-made keeps the limit it
    /// was configured with).
    pub fn max_event_size(mut self, limit: MaxEventSize) -> Self {
        self.max_event_size = limit;
        self
    }

    /// The inbox [`EventOrchestrator::inbox`] hands out, instead of the store's (for another
    /// retention, or another place to keep the ids).
    pub fn inbox(mut self, inbox: Arc<dyn Inbox>) -> Self {
        self.inbox = Some(inbox);
        self
    }

    /// Connects what was given by URL and builds the orchestrator.
    ///
    /// On a durable store with a broker transport the outbox relay starts at once, so that
    /// events stored before a crash and not yet published are published now (a broker keeps
    /// them for consumer groups that subscribe later). With the in-process transport, which
    /// delivers only to subscriptions that exist, it starts with the first publish or with
    /// [`EventOrchestrator::start_relay`]: subscribe first, then start it.
    ///
    /// A URL naming a backend this build does not carry is [`Error::FeatureDisabled`]; an
    /// unreachable broker is the backend's connection error.
    pub async fn build(mut self) -> Result<EventOrchestrator> {
        let store_dir = match &self.store {
            Some(Source::Url(url)) => match Backend::parse(url)? {
                Backend::File(dir) => Some(dir),
                _ => None,
            },
            Some(Source::Ready(_)) => self.file_store_dir.take(),
            None => None,
        };
        let limit = self.max_event_size;
        let store: Arc<dyn EventStore> = match self.store.take() {
            None => self.memory_store(),
            Some(Source::Url(url)) if Backend::parse(&url)? == Backend::Memory => {
                self.memory_store()
            }
            Some(Source::Ready(store)) => store,
            Some(Source::Url(url)) => connect::store_with_limit(&url, limit).await?,
        };
        let transport = match self.transport.take() {
            Some(Source::Url(url)) if Backend::parse(&url)? == Backend::Memory => None,
            Some(Source::Url(url)) => Some(connect::transport_with_limit(&url, limit).await?),
            Some(Source::Ready(transport)) => Some(transport),
            None => None,
        };
        let transport = match transport {
            Some(transport) if self.dead_letters.is_some() => {
                return Err(Error::Core(orchestrator_core::Error::invalid(
                    "dead-letter queue",
                    format!(
                        "the {} transport keeps its own dead-letter queue; \
                         `dead_letter_queue` applies to the in-process transport only",
                        transport.name()
                    ),
                )));
            }
            Some(transport) => transport,
            None => {
                if let Some(dir) = store_dir
                    && self.dead_letters.is_none()
                {
                    self.dead_letters = Some(file_dead_letters(dir).await?);
                }
                self.in_process_transport()
            }
        };
        let orchestrator = self.assemble(transport, store);
        let in_process = orchestrator
            .transport()
            .as_any()
            .is_some_and(|t| t.is::<InProcessTransport>());
        if orchestrator.store.capabilities().durable && !in_process {
            orchestrator.relay.ensure_started();
        }
        Ok(orchestrator)
    }

    /// The embedded default, which needs nothing connected.
    pub(super) fn build_in_process(mut self) -> EventOrchestrator {
        let transport = self.in_process_transport();
        let store = self.memory_store();
        self.assemble(transport, store)
    }

    fn in_process_transport(&mut self) -> Arc<dyn Transport> {
        let mut builder = InProcessTransport::builder()
            .clock(Arc::clone(&self.clock))
            .max_event_size(self.max_event_size);
        if let Some(queue) = self.dead_letters.take() {
            builder = builder.dead_letter_queue(queue);
        }
        Arc::new(builder.build())
    }

    pub(super) fn assemble(
        self,
        transport: Arc<dyn Transport>,
        store: Arc<dyn EventStore>,
    ) -> EventOrchestrator {
        let schemas = self.schemas.unwrap_or_default();
        let inbox = self.inbox.or_else(|| store.inbox()).unwrap_or_else(|| {
            Arc::new(InMemoryInbox::default().with_clock(Arc::clone(&self.clock)))
        });
        let bus = EventBus::new(transport)
            .with_retry_policy(self.retry)
            .with_clock(Arc::clone(&self.clock))
            .with_schemas(schemas.clone());
        // The relay reads events as stored: an event that cannot be upcast is still
        // published, and dead-lettered by the subscriptions that cannot take it.
        let mut relay = Relay::new(self.relay, Arc::clone(&store), bus.clone());
        if let Some(memory) = self.memory_store {
            // What the relay has published may be evicted; nothing else ever is.
            relay = relay.on_relayed(Arc::new(move |position| memory.release_through(position)));
        }
        let relay = Arc::new(relay);
        // Every other reader — aggregates, read models, temporal queries, replay, saga waits,
        // the user — sees events upcast to their type's latest version, and every append is
        // validated: one place does both.
        let store: Arc<dyn EventStore> = Arc::new(ValidatingStore::new(
            store,
            schemas.clone() as Arc<dyn EventSchemas>,
        ));
        let mut sagas =
            SagaOrchestrator::builder(Arc::clone(&store)).clock(Arc::clone(&self.clock));
        if let Some(limit) = self.max_concurrent_sagas {
            sagas = sagas.max_concurrent(limit);
        }
        let queries = QueryBus::builder().clock(self.clock);
        let queries = match self.query_cache {
            Some(config) => queries.cache(config),
            None => queries.without_cache(),
        };
        EventOrchestrator {
            relay,
            bus,
            store,
            schemas,
            sagas: sagas.build(),
            commands: self.commands.unwrap_or_default(),
            queries: queries.build(),
            inbox,
            names: Arc::new(super::SubscriptionNames::new(self.application)),
            max_event_size: self.max_event_size,
        }
    }
}

/// The durable dead-letter queue beside the embedded store in `store_dir`.
async fn file_dead_letters(store_dir: PathBuf) -> Result<Arc<dyn DeadLetterQueue>> {
    let dir = FileDeadLetterQueue::dir_in_store(store_dir);
    // Opening lists the directory and deletes what a crash left: blocking file I/O.
    let queue = tokio::task::spawn_blocking(move || FileDeadLetterQueue::open(dir))
        .await
        .map_err(|e| {
            orchestrator_core::Error::backend(
                "file",
                false,
                format!("opening the dead-letter queue failed: {e}"),
            )
        })??;
    Ok(Arc::new(queue))
}
