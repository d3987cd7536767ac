//! [`EventOrchestrator`]: the facade that wires a transport, a store, the bus, sagas and
//! CQRS together.

mod builder;
mod cqrs;
mod replay;
mod saga;

use std::sync::Arc;
use std::time::Duration;

use orchestrator_bus::{DeadLetters, EventBus, ShutdownReport, Subscription, SubscriptionConfig};
use orchestrator_core::{
    AppendResult, Event, EventEnvelope, EventHandler, EventId, EventStore, ExpectedVersion,
    HandlerError, Inbox, MaxEventSize, RetryPolicy, Transport,
};
use orchestrator_cqrs::{CommandBus, QueryBus};
use orchestrator_saga::SagaOrchestrator;
use orchestrator_store::SchemaRegistry;
use serde_json::Value;
use tracing::Instrument as _;

use crate::error::Result;
use crate::propagation::{self, TracePropagation};
use crate::relay::{Relay, RelayStatus};

/// How many stored events this process's relay may have still to publish, per publisher
/// giving way to it, before another publisher gives way too (see `store_and_relay`).
const RELAY_LEAD: u64 = 16;

pub use builder::EventOrchestratorBuilder;
pub use replay::ReplayFilter;

/// The main entry point: publish events and subscribe handlers, run sagas, send commands
/// and queries, replay stored events — the original design's `EventOrchestrator`.
///
/// [`EventOrchestrator::new`] runs on the embedded default: the in-process transport and
/// the in-memory event store. [`EventOrchestrator::builder`] picks a transport, a store (the
/// embedded durable [`FileEventStore`](orchestrator_store::FileEventStore), a broker), the
/// retry defaults and the clock. The store is the one commit point: publishing appends to
/// it, and the [outbox relay](crate::relay) carries every stored event to the transport, so
/// nothing stored is lost between the two; saga logs go to the same store.
///
/// Clones share everything. Use it inside a tokio runtime.
///
/// ```
/// use orchestrator::prelude::*;
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> orchestrator::Result<()> {
/// let orchestrator = EventOrchestrator::new();
/// orchestrator.register_command_handler("create_user", |data: serde_json::Value| async move {
///     Ok::<_, HandlerError>(json!({"user_id": "USER123", "name": data["name"]}))
/// })?;
/// let user = orchestrator.send_command("create_user", json!({"name": "John"})).await?;
/// assert_eq!(user["user_id"], "USER123");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EventOrchestrator {
    bus: EventBus,
    store: Arc<dyn EventStore>,
    schemas: Arc<SchemaRegistry>,
    sagas: SagaOrchestrator,
    commands: CommandBus,
    queries: QueryBus,
    relay: Arc<Relay>,
    inbox: Arc<dyn Inbox>,
    names: Arc<SubscriptionNames>,
    /// Checked by `publish` before the append ([`EventOrchestratorBuilder::max_event_size`]).
    max_event_size: MaxEventSize,
}

/// Stable names for unnamed subscriptions, derived from the application's name (see
/// [`EventOrchestratorBuilder::application`]).
#[derive(Debug)]
pub(crate) struct SubscriptionNames {
    application: Option<String>,
    /// How many unnamed subscriptions each pattern list got so far.
    made: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl SubscriptionNames {
    pub(crate) fn new(application: Option<String>) -> Self {
        Self {
            application,
            made: std::sync::Mutex::default(),
        }
    }

    /// The name for the next unnamed subscription to `patterns`, if the application has one.
    fn next(&self, patterns: &[String]) -> Option<String> {
        let application = self.application.as_deref()?;
        // Group names allow letters, digits, `-`, `_`, `.` and `:`: `*` reads `any`, `#`
        // reads `all`, and several patterns are joined with `_`.
        let key = patterns
            .iter()
            .map(|p| {
                p.split('.')
                    .map(|word| match word {
                        "*" => "any".to_owned(),
                        "#" => "all".to_owned(),
                        other => other
                            .chars()
                            .map(|c| {
                                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                                    c
                                } else {
                                    '_'
                                }
                            })
                            .collect(),
                    })
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect::<Vec<_>>()
            .join("_");
        let mut made = self
            .made
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = made.entry(key.clone()).or_insert(0);
        *n += 1;
        Some(if *n == 1 {
            format!("{application}:{key}")
        } else {
            format!("{application}:{key}-{n}")
        })
    }
}

impl std::fmt::Debug for EventOrchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventOrchestrator")
            .field("bus", &self.bus)
            .field("store", &self.store.name())
            .field("sagas", &self.sagas.defined())
            .field("commands", &self.commands.command_names())
            .field("queries", &self.queries.query_names())
            .finish_non_exhaustive()
    }
}

impl Default for EventOrchestrator {
    fn default() -> Self {
        Self::new()
    }
}

impl EventOrchestrator {
    /// An orchestrator on the embedded default: in-process transport, in-memory store,
    /// default retry policy, system clock, empty schema registry.
    pub fn new() -> Self {
        EventOrchestratorBuilder::default().build_in_process()
    }

    /// A builder, to pick the transport, the store, the retry defaults, the clock, ….
    pub fn builder() -> EventOrchestratorBuilder {
        EventOrchestratorBuilder::default()
    }

    /// An orchestrator on the given transport and store, with `retry` for subscriptions
    /// (the builder's shortcut, for transports and stores at hand).
    pub fn with_parts(
        transport: Arc<dyn Transport>,
        store: Arc<dyn EventStore>,
        retry: RetryPolicy,
    ) -> Self {
        EventOrchestratorBuilder::default()
            .retry_policy(retry)
            .assemble(transport, store)
    }

    /// Subscribes `handler` to an event type or pattern (`"user.created"`, `"user.*"`,
    /// `"order.#"`). The handler — an async closure or fn taking the [`EventEnvelope`] and
    /// returning `Result<(), E>` for any error type `E` — receives each matching event
    /// published from now on. When it fails with a retryable error the event is retried
    /// with backoff, then dead-lettered; a permanent error dead-letters it at once.
    pub async fn subscribe(
        &self,
        event_type_or_pattern: &str,
        handler: impl EventHandler,
    ) -> Result<Subscription> {
        self.subscribe_with(SubscriptionConfig::new(event_type_or_pattern), handler)
            .await
    }

    /// The inbox for subscriptions that de-duplicate across restarts, fitting the store:
    /// a [`FileInbox`](orchestrator_store::FileInbox) in `<store dir>/inbox` for the
    /// embedded durable store, a `RedisInbox` under the prefix for the Redis store, the one
    /// given to [`EventOrchestratorBuilder::inbox`], else an
    /// [`InMemoryInbox`](orchestrator_core::InMemoryInbox) — which forgets on restart
    /// ([`Inbox::durable`] says which). Every call returns the same inbox.
    ///
    /// ```
    /// use orchestrator::prelude::*;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> orchestrator::Result<()> {
    /// let orchestrator = EventOrchestrator::new();
    /// orchestrator
    ///     .subscribe_with(
    ///         SubscriptionConfig::new("order.#").named("billing").inbox(orchestrator.inbox()),
    ///         |_event: EventEnvelope| async { Ok::<_, HandlerError>(()) },
    ///     )
    ///     .await?;
    /// assert!(!orchestrator.inbox().durable(), "the in-memory store keeps no inbox");
    /// # Ok(()) }
    /// ```
    pub fn inbox(&self) -> Arc<dyn Inbox> {
        Arc::clone(&self.inbox)
    }

    /// Subscribes `handler` with the bus's options: a name (consumer group), filter,
    /// transform, concurrency, per-key order, middleware, retry policy, deduplication. The
    /// facade adds [`TracePropagation`] to the middleware.
    pub async fn subscribe_with(
        &self,
        config: SubscriptionConfig,
        handler: impl EventHandler,
    ) -> Result<Subscription> {
        let config = match config.given_name() {
            Some(_) => config,
            None => match self.names.next(config.patterns()) {
                Some(name) => config.named(name),
                None => {
                    if self.transport().as_any().is_none() {
                        tracing::warn!(
                            patterns = ?config.patterns(),
                            transport = self.transport().name(),
                            "an unnamed subscription on a broker is ephemeral: its consumer \
                             group lives as long as this process, so events published while the \
                             process is down are not handled by it; name it, or name the \
                             application (EventOrchestratorBuilder::application)"
                        );
                    }
                    config
                }
            },
        };
        Ok(self
            .bus
            .subscribe_with(config.middleware(TracePropagation), Arc::new(handler))
            .await?)
    }

    /// Subscribes a handler of the typed event `E` to its event type: each event is
    /// decoded into `E` first; one that does not decode is dead-lettered at once.
    pub async fn subscribe_typed<E, F, Fut, Fail>(&self, handler: F) -> Result<Subscription>
    where
        E: Event + Send + 'static,
        F: Fn(E) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::result::Result<(), Fail>> + Send + 'static,
        Fail: Into<HandlerError> + 'static,
    {
        let handler = Arc::new(handler);
        self.subscribe(E::EVENT_TYPE, move |event: EventEnvelope| {
            let handler = Arc::clone(&handler);
            async move {
                let typed = event
                    .to_event::<E>()
                    .map_err(|e| HandlerError::permanent(e.to_string()))?;
                handler(typed).await.map_err(Into::into)
            }
        })
        .await
    }

    /// Publishes an event of `event_type` with a JSON payload; returns its id.
    ///
    /// The event is appended to the event store (to the stream named after its event
    /// type); the outbox relay then publishes it to subscribers. Published from the handler
    /// of a command that has an id, its id is derived from the command's
    /// ([`next_event_id`](orchestrator_cqrs::next_event_id)), so a command retried with the
    /// same id writes its events once on a store with idempotent appends.
    pub async fn publish_event(&self, event_type: &str, data: Value) -> Result<EventId> {
        self.publish(with_command_id(EventEnvelope::new(event_type, &data)?))
            .await
    }

    /// Publishes a typed event; returns its id. Ids are derived from the command's as for
    /// [`publish_event`](Self::publish_event).
    pub async fn publish_typed<E: Event>(&self, event: &E) -> Result<EventId> {
        self.publish(with_command_id(EventEnvelope::from_event(event)?))
            .await
    }

    /// Publishes a prepared envelope; returns its id once the event is stored.
    ///
    /// In order: the event gets the current trace context (W3C `traceparent`) and, when
    /// published from a handler, the handled event (or the command, if it has an id) as its
    /// cause (see [`propagation`]); it is validated against the
    /// [schema registry](Self::schemas); it is appended to its own stream if it names one,
    /// else to the stream named after its event type. When this returns, the event is
    /// committed: the [outbox relay](crate::relay) publishes it on the transport, carrying its
    /// stored position, whatever happens to this process next (a durable store's relay
    /// resumes from its checkpoint after a restart). Publishing never waits for subscribers,
    /// so a handler that publishes cannot deadlock its own subscription. Use
    /// [`publish_and_wait`](Self::publish_and_wait) to wait until the event is on the
    /// transport. Published from a command handler, its position is recorded in the
    /// command's outcome ([`send_command_with`](Self::send_command_with)).
    pub async fn publish(&self, event: EventEnvelope) -> Result<EventId> {
        Ok(self.publish_stored(event).await?.0)
    }

    /// Publishes like [`publish`](Self::publish), then waits until the outbox relay has put
    /// the event on the transport (for a broker: the broker confirmed it). Fails with
    /// [`Closed`](orchestrator_core::Error::Closed) when this process does not relay
    /// ([`RelayOptions::disabled`](crate::RelayOptions::disabled)) or the orchestrator shuts
    /// down first; the event is stored all the same.
    pub async fn publish_and_wait(&self, event: EventEnvelope) -> Result<EventId> {
        let (id, written) = self.publish_stored(event).await?;
        self.relay.wait_for(written.last_position).await?;
        Ok(id)
    }

    async fn publish_stored(&self, event: EventEnvelope) -> Result<(EventId, AppendResult)> {
        let span = tracing::info_span!(
            "orchestrator.publish",
            otel.kind = "producer",
            event_type = %event.event_type(),
            event_id = %event.id(),
        );
        let event = match orchestrator_cqrs::current_command() {
            Some(command) => command.stamp(event),
            None => event,
        };
        let event = propagation::inject(propagation::with_cause(event), &span);
        self.store_and_relay(event).instrument(span).await
    }

    async fn store_and_relay(&self, event: EventEnvelope) -> Result<(EventId, AppendResult)> {
        if self.relay.stopping() {
            return Err(orchestrator_core::Error::Closed {
                what: "event orchestrator (it was shut down)".to_owned(),
            }
            .into());
        }
        let id = event.id().clone();
        let stream = event.stream_id().unwrap_or(event.event_type()).to_owned();
        // Here, and not only in the store, so that a store given ready-made with a larger
        // limit does not accept what the transport will refuse.
        self.max_event_size
            .check_append(&stream, std::slice::from_ref(&event))?;
        let written = self
            .store
            .as_ref()
            .append(&stream, ExpectedVersion::Any, vec![event])
            .instrument(tracing::debug_span!("orchestrator.append", stream = %stream))
            .await?;
        // Inside a command handler: the command's outcome reports where it wrote, for
        // read-your-writes queries.
        orchestrator_cqrs::record_position(written.last_position);
        self.relay.ensure_started();
        // An in-memory append never waits, so a task publishing in a loop would keep the
        // relay (woken on this worker, where no idle worker can take it) from running until
        // its cooperative budget runs out: 128 appends, a latency of ~100 µs for events that
        // could be delivered in a few. Once the relay is more than a few events behind for
        // each publish in flight, give way; otherwise spend a unit of the budget, which
        // yields when it is used up. (With many publishers the relay is always some events
        // behind: the lead grows with the publishers already giving way, so that they do not
        // all yield on every publish, which only adds task switches.)
        let lead = RELAY_LEAD.saturating_mul(self.relay.giving_way() + 1);
        if self.relay.behind(written.last_position) > lead {
            let _giving_way = self.relay.give_way();
            tokio::task::yield_now().await;
        } else {
            tokio::task::consume_budget().await;
        }
        Ok((id, written))
    }

    /// Starts the outbox relay now, if it is not running. It starts on its own with the
    /// first publish, and, on a durable store with a broker transport, when the orchestrator
    /// is built. With the in-process transport and a durable store, call it once your
    /// subscriptions are in place: events stored before a crash and not yet handled then
    /// reach them (the in-process transport delivers only to subscriptions that exist).
    pub fn start_relay(&self) {
        self.relay.ensure_started();
    }

    /// What the outbox relay is doing: its state, the position it has published up to, its
    /// checkpoint and lease (see [`crate::relay`]).
    pub fn relay_status(&self) -> RelayStatus {
        self.relay.status()
    }

    /// Events whose handlers failed for good: list, inspect, reprocess, discard, report.
    pub fn dead_letters(&self) -> DeadLetters {
        self.bus.dead_letters()
    }

    /// The schema registry: JSON Schemas per event type and version, and upcasters. Events
    /// are validated against it before they are stored and published, and upcast before
    /// handlers see them. Register schemas at any time.
    pub fn schemas(&self) -> &Arc<SchemaRegistry> {
        &self.schemas
    }

    /// The event store, as the orchestrator's own parts use it: appends are validated
    /// against the [schema registry](Self::schemas) (one invalid event rejects the append),
    /// and every read — `read_stream`, `read_all`, subscriptions, and so aggregates, read
    /// models, temporal queries, replay and saga waits — returns events upcast to their
    /// type's latest version. Appending here is publishing: the outbox relay delivers
    /// what is appended (see [`crate::relay`]).
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

    /// Stops the orchestrator: no more publishes or subscriptions; the outbox relay
    /// publishes what is stored (within `deadline`), then handlers in flight get the rest of
    /// `deadline` to finish (what did not finish is reported, and redelivered by
    /// durable transports); running sagas stop where they stand (their logs let
    /// [`SagaOrchestrator::recover`] carry them on); read models stop.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        // What is stored is published first (within the deadline; a durable store's relay
        // carries the rest on after a restart), then subscriptions stop.
        let started = std::time::Instant::now();
        if !self.relay.drain_and_stop(deadline).await {
            tracing::warn!(
                relay = %self.relay.options().name,
                "shut down before the outbox relay published every stored event"
            );
        }
        let report = self
            .bus
            .shutdown(deadline.saturating_sub(started.elapsed()))
            .await;
        self.sagas.shutdown();
        self.queries.shutdown().await;
        report
    }
}

/// `event` with the id the running command or saga step derives for its next event, if any
/// (an envelope the caller built keeps its own id: see [`EventOrchestrator::publish`]).
fn with_command_id(event: EventEnvelope) -> EventEnvelope {
    // A command id or idempotency key is non-empty, so its derived id always parses.
    match orchestrator_core::derived_id::next_derived_id().map(EventId::parse) {
        Some(Ok(id)) => event.with_id(id),
        _ => event,
    }
}
