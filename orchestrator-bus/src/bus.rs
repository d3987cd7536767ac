//! The event bus: handlers subscribed to topic patterns on any [`Transport`], with
//! filters, transforms, middleware, concurrency, per-key order, retry with backoff,
//! dead-lettering, metrics and graceful shutdown.
//!
//! Events are published to the topic named by their event type. A handler's outcome
//! settles each delivery: success acks it; a retryable error retries it with the
//! subscription's [`RetryPolicy`] backoff until the attempts are spent; then — or at once
//! for a permanent error — the event is dead-lettered with the reason, the attempts, the
//! first and last failure time and the subscription's name. A panicking handler is caught
//! and counts as a retryable failure. Nothing is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use orchestrator_core::transport::validate_topic;
use orchestrator_core::{
    Clock, Error, EventEnvelope, EventHandler, EventSchemas, NoSchemas, Result, RetryPolicy,
    SubscribeOptions, SystemClock, TopicPattern, Transport,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::dead_letters::DeadLetters;
use crate::dispatch::{self, Runner, Unfinished};
use crate::memory::InProcessTransport;
use crate::metrics::PublishMetrics;
use crate::middleware::{Deduplicate, Middleware};
use crate::subscription::{RetryMode, SubscriptionConfig};

/// Publishes events and runs subscribed handlers on a [`Transport`]. Clones share the
/// same bus.
///
/// ```
/// use std::sync::Arc;
/// use orchestrator_bus::{EventBus, InProcessTransport};
/// use orchestrator_core::{EventEnvelope, HandlerError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> orchestrator_core::Result<()> {
/// let bus = EventBus::new(Arc::new(InProcessTransport::new()));
/// let (tx, mut rx) = tokio::sync::mpsc::channel(8);
/// bus.subscribe("user.*", Arc::new(move |event: EventEnvelope| {
///     let tx = tx.clone();
///     async move { tx.send(event.event_type().to_owned()).await.ok(); Ok::<_, HandlerError>(()) }
/// })).await?;
/// bus.publish(EventEnvelope::new("user.created", &serde_json::json!({"id": 1}))?).await?;
/// assert_eq!(rx.recv().await.as_deref(), Some("user.created"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EventBus {
    transport: Arc<dyn Transport>,
    /// The transport again when it is the in-process one, for publishing without a boxed
    /// future.
    direct: Option<InProcessTransport>,
    retry: RetryPolicy,
    clock: Arc<dyn Clock>,
    schemas: Arc<dyn EventSchemas>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    closed: AtomicBool,
    subscriptions: Mutex<Vec<Arc<Control>>>,
    publish_metrics: PublishMetrics,
}

impl Shared {
    fn subscriptions(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Control>>> {
        // Pushes and retains only; a poisoned lock still guards a consistent list.
        self.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("transport", &self.transport.name())
            .field("retry", &self.retry)
            .field("subscriptions", &self.shared.subscriptions().len())
            .finish_non_exhaustive()
    }
}

/// What [`EventBus::shutdown`] left undone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// How many subscriptions were stopped.
    pub subscriptions: usize,
    /// Events still being handled, or waiting behind their key, when the deadline came.
    /// They were not acknowledged, so the transport delivers them again.
    pub unfinished: Vec<Unfinished>,
}

impl ShutdownReport {
    /// Whether everything finished in time.
    pub fn is_clean(&self) -> bool {
        self.unfinished.is_empty()
    }
}

impl EventBus {
    /// A bus on `transport` with the default [`RetryPolicy`], the system clock and no
    /// schemas.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        let direct = transport
            .as_any()
            .and_then(|any| any.downcast_ref::<InProcessTransport>())
            .cloned();
        Self {
            transport,
            direct,
            retry: RetryPolicy::default(),
            clock: Arc::new(SystemClock),
            schemas: Arc::new(NoSchemas),
            shared: Arc::new(Shared::default()),
        }
    }

    /// Sets the retry policy of subscriptions that name none.
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the clock that times in-place retries (tests pass a
    /// [`ManualClock`](orchestrator_core::ManualClock)).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Validates events on publish and upcasts them before handlers see them.
    pub fn with_schemas(mut self, schemas: Arc<dyn EventSchemas>) -> Self {
        self.schemas = schemas;
        self
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// The dead-letter tools: list, inspect, reprocess, discard, report.
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters::new(
            self.transport.dead_letter_queue(),
            Arc::clone(&self.transport),
        )
    }

    /// Publishes `event` to the topic named by its event type, after schema validation.
    pub async fn publish(&self, event: EventEnvelope) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::Closed {
                what: "event bus".to_owned(),
            });
        }
        // Validates the type as a topic the first time it is published.
        let published = self
            .shared
            .publish_metrics
            .counter(event.event_type(), validate_topic)?;
        self.schemas.validate(&event)?;
        match &self.direct {
            // The common case, without a span: the in-process transport usually queues the
            // event right here, with no future at all.
            Some(direct) if crate::spans_off() => {
                if let Some(unsent) = direct.publish_direct(event)? {
                    direct.send_rest(unsent).await?;
                }
            }
            _ => {
                let span = tracing::info_span!(
                    "bus.publish",
                    event_type = %event.event_type(),
                    event_id = %event.id(),
                );
                if span.is_disabled() {
                    self.send(event).await?;
                } else {
                    self.send(event).instrument(span).await?;
                }
            }
        }
        published.increment(1);
        Ok(())
    }

    /// Publishes `events`, all of one event type, to the topic named by that type, in order,
    /// after schema validation of each: one [`Transport::publish_batch`] call, so broker
    /// transports send them in one round trip. An empty batch does nothing; events of
    /// several types are [`Error::InvalidInput`].
    pub async fn publish_batch(&self, events: Vec<EventEnvelope>) -> Result<()> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::Closed {
                what: "event bus".to_owned(),
            });
        }
        let topic = first.event_type_shared();
        if let Some(other) = events.iter().find(|e| e.event_type() != &*topic) {
            return Err(Error::invalid(
                "event batch",
                format!(
                    "a batch goes to one topic, but it holds `{topic}` and `{}` events: \
                     publish them in one batch per type",
                    other.event_type()
                ),
            ));
        }
        let published = self
            .shared
            .publish_metrics
            .counter(&topic, validate_topic)?;
        for event in &events {
            self.schemas.validate(event)?;
        }
        let count = events.len() as u64;
        match &self.direct {
            Some(direct) => {
                // All checked before one is sent: a batch with an event over the maximum
                // size sends nothing, as on every transport.
                for event in &events {
                    direct.check_size(event)?;
                }
                for event in events {
                    if let Some(unsent) = direct.publish_direct(event)? {
                        direct.send_rest(unsent).await?;
                    }
                }
            }
            None => {
                self.transport
                    .as_ref()
                    .publish_batch(&topic, events)
                    .await?
            }
        }
        published.increment(count);
        Ok(())
    }

    /// Sends `event` to the topic named by its type on the transport.
    async fn send(&self, event: EventEnvelope) -> Result<()> {
        match &self.direct {
            // The in-process transport, called without a boxed future.
            Some(direct) => match direct.publish_direct(event)? {
                None => Ok(()),
                Some(unsent) => direct.send_rest(unsent).await,
            },
            None => {
                let topic = event.event_type_shared();
                // `as_ref`: the transport itself, not the boxing `Arc<T>` forwarding impl.
                self.transport.as_ref().publish(&topic, event).await
            }
        }
    }

    /// Subscribes `handler` to `pattern` (`"user.created"`, `"user.*"`, `"order.#"`) with
    /// default options: it receives every matching event published from now on.
    pub async fn subscribe(
        &self,
        pattern: &str,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Subscription> {
        self.subscribe_with(SubscriptionConfig::new(pattern), handler)
            .await
    }

    /// Subscribes `handler` with the given options.
    pub async fn subscribe_with(
        &self,
        config: SubscriptionConfig,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Subscription> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::Closed {
                what: "event bus".to_owned(),
            });
        }
        let patterns = config
            .patterns
            .iter()
            .map(|p| TopicPattern::parse(p))
            .collect::<Result<Vec<_>>>()?;
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| format!("sub-{}", uuid::Uuid::now_v7().simple()));
        let mut options = SubscribeOptions::new(name.clone(), "#")?;
        options.patterns = patterns;
        options.ephemeral = config.ephemeral || config.name.is_none();
        options = options.prefetch(config.concurrency.saturating_mul(4).max(64));

        let mut chain: Vec<Arc<dyn Middleware>> = Vec::new();
        if let Some(inbox) = &config.inbox {
            if inbox.durable() && config.name.is_none() {
                tracing::warn!(
                    subscription = %name,
                    inbox = %inbox.describe(),
                    "a durable inbox on an unnamed subscription: its ids are kept under a \
                     random name, so they do not outlive this subscription; name it"
                );
            }
            chain.push(Arc::new(Deduplicate::with_inbox(Arc::clone(inbox))));
        }
        chain.extend(config.middleware.iter().cloned());
        let mode = config.retry_mode.unwrap_or(if config.ordered {
            RetryMode::InPlace
        } else {
            RetryMode::Redeliver
        });
        let runner = Arc::new(Runner::new(
            name.clone(),
            handler,
            chain,
            config.filter.clone(),
            config.transform.clone(),
            config.retry.unwrap_or(self.retry),
            mode,
            config.concurrency,
            config.ordered,
            Arc::clone(&self.clock),
            Arc::clone(&self.schemas),
        ));

        let stream = self.transport.as_ref().subscribe(options).await?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(dispatch::run(Arc::clone(&runner), stream, stopped));
        let control = Arc::new(Control {
            name,
            patterns: config.patterns.join(", "),
            stop,
            task: Mutex::new(Some(task)),
            runner,
        });
        let mut subscriptions = self.shared.subscriptions();
        subscriptions.retain(|c| !c.is_finished());
        subscriptions.push(Arc::clone(&control));
        Ok(Subscription { control })
    }

    /// Stops the bus: no more publishes or subscriptions, each subscription stops taking
    /// deliveries, and handlers in flight get until `deadline` to finish. What did not
    /// finish is reported — its deliveries were not acknowledged, so the transport keeps
    /// them for redelivery.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        self.shared.closed.store(true, Ordering::Release);
        let subscriptions: Vec<Arc<Control>> = self.shared.subscriptions().drain(..).collect();
        let count = subscriptions.len();
        let waits = subscriptions.iter().map(|c| c.stop_within(deadline));
        let unfinished = futures::future::join_all(waits)
            .await
            .into_iter()
            .flatten()
            .collect();
        ShutdownReport {
            subscriptions: count,
            unfinished,
        }
    }
}

/// A subscription's controls, shared by its handle and the bus.
struct Control {
    name: String,
    patterns: String,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    runner: Arc<Runner>,
}

impl Control {
    fn take_task(&self) -> Option<JoinHandle<()>> {
        self.task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn is_finished(&self) -> bool {
        self.task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
    }

    /// Stops taking deliveries and waits up to `deadline` for those held; returns the ones
    /// that did not finish (aborted, so the transport redelivers them).
    async fn stop_within(&self, deadline: Duration) -> Vec<Unfinished> {
        let _ = self.stop.send(true);
        let Some(mut task) = self.take_task() else {
            return Vec::new();
        };
        if tokio::time::timeout(deadline, &mut task).await.is_ok() {
            return Vec::new();
        }
        // Deliveries spread over tasks (concurrency above 1) are listed before the abort
        // drops their tickets; the one-at-a-time loop records what it held as it is
        // dropped.
        let mut unfinished = self.runner.unfinished();
        task.abort();
        // Wait for the abort to drop the held deliveries back to the transport.
        let _ = task.await;
        unfinished.extend(self.runner.take_abandoned());
        tracing::warn!(
            subscription = %self.name,
            unfinished = unfinished.len(),
            "subscription stopped with deliveries unfinished; they will be redelivered"
        );
        unfinished
    }
}

/// A running subscription. Dropping the handle leaves it running; call
/// [`Subscription::unsubscribe`] to stop it.
pub struct Subscription {
    control: Arc<Control>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.control.name)
            .field("patterns", &self.control.patterns)
            .finish()
    }
}

impl Subscription {
    /// The subscription's name: its consumer group, recorded in dead letters.
    pub fn name(&self) -> &str {
        &self.control.name
    }

    /// The patterns subscribed to, comma-separated.
    pub fn patterns(&self) -> &str {
        &self.control.patterns
    }

    /// Whether the subscription has stopped (unsubscribed, or its transport closed).
    pub fn is_finished(&self) -> bool {
        self.control.is_finished()
    }

    /// Stops taking deliveries and waits for the ones being handled to be settled.
    pub async fn unsubscribe(self) {
        let _ = self.control.stop_within(Duration::MAX).await;
    }

    /// Stops taking deliveries and gives those being handled until `deadline`; returns the
    /// ones that did not finish (they will be redelivered).
    pub async fn unsubscribe_within(self, deadline: Duration) -> Vec<Unfinished> {
        self.control.stop_within(deadline).await
    }
}
