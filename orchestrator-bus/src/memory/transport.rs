//! The in-process transport: consumer groups with bounded queues inside one process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::transport::{validate_group, validate_topic};
use orchestrator_core::{
    Acknowledge, Clock, DeadLetter, DeadLetterQueue, Delivery, DeliveryInfo, DeliveryStream, Error,
    EventEnvelope, Result, SubscribeOptions, SystemClock, TopicPattern, Transport,
};

use super::InMemoryDeadLetterQueue;

const NAME: &str = "in-process";

/// How many events a consumer group's queue holds by default before publishers wait.
pub const DEFAULT_CAPACITY: usize = 1024;

/// How many topics' routes are remembered before the route cache starts over.
const MAX_CACHED_ROUTES: usize = 4096;

/// A [`Transport`] inside one process: publishers and consumers are tasks of one tokio
/// runtime.
///
/// Each consumer group has one bounded queue (default [`DEFAULT_CAPACITY`] events) shared
/// by its consumers, who compete for its events. A publish puts the event in the queue of
/// every group with a pattern matching the topic, and waits while such a queue is full: a
/// slow group slows its publishers down instead of growing memory.
///
/// - **Settling.** [`Delivery::ack`] forgets the event; [`Delivery::nack`] puts it back
///   after the delay (at the back of the queue), as the next attempt; [`Delivery::dead_letter`]
///   parks it in the dead-letter queue (an [`InMemoryDeadLetterQueue`] unless another is
///   given). A delivery dropped unsettled goes back to the queue at once, as the next
///   attempt. Redelivered events lose their place, so per-key order holds only for events
///   that succeed on their first attempt.
/// - **Groups exist while they have a consumer.** A group's patterns are the union of its
///   subscriptions' patterns. When its last subscription is dropped the group stops
///   receiving new events, but what is already queued stays and is delivered when a
///   consumer of that group subscribes again; [`Transport::redeliver`] still reaches it.
/// - **Closing.** [`close`](Self::close), or dropping the last clone of the transport, ends
///   every subscription (`next()` returns `Ok(None)`) and makes later calls fail with
///   [`Error::Closed`]; queued events are discarded with it.
/// - **Runtime.** Use it inside a tokio runtime: a nack's delay and the re-queueing of a
///   dropped delivery into a full queue run on spawned tasks.
///
/// The prefetch hint of [`SubscribeOptions`] is ignored: a consumer takes one event at a
/// time. Clones share the same transport.
///
/// ```
/// use orchestrator_bus::InProcessTransport;
/// use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> orchestrator_core::Result<()> {
/// let transport = InProcessTransport::with_capacity(64);
/// let mut emails = transport.subscribe(SubscribeOptions::new("emails", "user.*")?).await?;
/// transport.publish("user.created", EventEnvelope::new("user.created", &"ada")?).await?;
/// transport.close();
/// assert!(emails.next().await?.is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct InProcessTransport {
    handle: Arc<Handle>,
}

/// Closes the transport when the last clone of [`InProcessTransport`] goes away.
/// Subscriptions and pending settlements hold [`Shared`] only, so they cannot keep a
/// transport nobody can publish to alive.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close();
    }
}

struct Shared {
    capacity: usize,
    clock: Arc<dyn Clock>,
    dead_letters: Arc<dyn DeadLetterQueue>,
    closer: Arc<Closer>,
    routes: RwLock<Routes>,
}

#[derive(Default)]
struct Routes {
    /// Every group ever subscribed, with or without consumers.
    groups: HashMap<String, GroupEntry>,
    /// Which groups a topic goes to; cleared whenever a subscription comes or goes.
    by_topic: HashMap<String, Arc<Route>>,
    next_subscription: u64,
}

struct GroupEntry {
    queue: Arc<Group>,
    /// The live subscriptions and their patterns; none means the group is out of routing.
    subscriptions: Vec<(u64, Vec<TopicPattern>)>,
}

impl GroupEntry {
    fn matches(&self, topic: &str) -> bool {
        self.subscriptions
            .iter()
            .any(|(_, patterns)| patterns.iter().any(|p| p.matches(topic)))
    }
}

/// Where events published to one topic go.
struct Route {
    topic: Arc<str>,
    groups: Vec<Arc<Group>>,
}

/// One consumer group's queue: a bounded tokio channel whose receiver the group's
/// consumers take turns holding (competing consumers). The group keeps the receiver itself,
/// so the queue outlives its consumers.
struct Group {
    name: String,
    sender: mpsc::Sender<Message>,
    receiver: tokio::sync::Mutex<mpsc::Receiver<Message>>,
    closer: Arc<Closer>,
}

/// The transport's closed flag, and a way to wake whoever waits on a queue when it flips.
#[derive(Default)]
struct Closer {
    closed: AtomicBool,
    notify: Notify,
}

impl Closer {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Returns `false` if it was already closed.
    fn close(&self) -> bool {
        if self.closed.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.notify.notify_waiters();
        true
    }
}

impl Group {
    /// Queues `message`, waiting while the queue is full; fails once the transport closes.
    async fn send(&self, message: Message) -> Result<()> {
        // The fast path registers no waiter.
        let message = match self.sender.try_send(message) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed()),
            Err(mpsc::error::TrySendError::Full(message)) => message,
        };
        let closing = self.closer.notify.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        if self.closer.is_closed() {
            return Err(closed());
        }
        tokio::select! {
            sent = self.sender.send(message) => sent.map_err(|_| closed()),
            () = closing => Err(closed()),
        }
    }

    /// Puts `message` back without waiting if there is room; hands it back if not.
    fn try_requeue(&self, message: Message) -> Option<Message> {
        match self.sender.try_send(message) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => None,
            Err(mpsc::error::TrySendError::Full(message)) => Some(message),
        }
    }

    /// The next message, or `None` once the transport closes. Cancel-safe: a message is
    /// only taken off the queue in the same poll that returns it.
    async fn recv(&self) -> Option<Message> {
        // The fast path (a message waiting, no other consumer holding the queue) registers
        // no waiter.
        if !self.closer.is_closed()
            && let Ok(mut receiver) = self.receiver.try_lock()
            && let Ok(message) = receiver.try_recv()
        {
            return Some(message);
        }
        let closing = self.closer.notify.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        if self.closer.is_closed() {
            return None;
        }
        tokio::select! {
            biased;
            () = &mut closing => None,
            mut receiver = self.receiver.lock() => {
                if let Ok(message) = receiver.try_recv() {
                    return Some(message);
                }
                tokio::select! {
                    biased;
                    () = closing => None,
                    message = receiver.recv() => message,
                }
            }
        }
    }

    /// How many messages wait.
    fn len(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
    }
}

/// An event waiting in a group's queue, with its delivery history.
struct Message {
    event: EventEnvelope,
    topic: Arc<str>,
    attempt: u32,
    /// Set when the event is first handed to a consumer.
    first_attempt_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
}

impl Message {
    fn new(event: EventEnvelope, topic: Arc<str>) -> Self {
        Self {
            event,
            topic,
            attempt: 1,
            first_attempt_at: None,
            last_error: None,
        }
    }
}

fn closed() -> Error {
    Error::Closed {
        what: "in-process transport".to_owned(),
    }
}

impl InProcessTransport {
    /// A transport with queues of [`DEFAULT_CAPACITY`] events and an
    /// [`InMemoryDeadLetterQueue`].
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A transport whose consumer-group queues hold `capacity` events (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self::builder().capacity(capacity).build()
    }

    /// A transport that parks dead letters in `dead_letters`.
    pub fn with_dead_letter_queue(dead_letters: Arc<dyn DeadLetterQueue>) -> Self {
        Self::builder().dead_letter_queue(dead_letters).build()
    }

    /// Sets capacity and dead-letter queue together.
    pub fn builder() -> InProcessTransportBuilder {
        InProcessTransportBuilder::default()
    }

    /// How many events each consumer group's queue holds.
    pub fn capacity(&self) -> usize {
        self.handle.shared.capacity
    }

    /// How many events wait in `group`'s queue (`None` if the group was never subscribed).
    pub fn queued(&self, group: &str) -> Option<usize> {
        let routes = self.handle.shared.read();
        routes.groups.get(group).map(|g| g.queue.len())
    }

    /// Closes the transport: every subscription's `next()` returns `Ok(None)`, publishers
    /// waiting on a full queue and every later call fail with [`Error::Closed`], and queued
    /// events are discarded. Closing twice is harmless.
    pub fn close(&self) {
        self.handle.shared.close();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.handle.shared.is_closed()
    }
}

impl Default for InProcessTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InProcessTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = &self.handle.shared;
        f.debug_struct("InProcessTransport")
            .field("capacity", &shared.capacity)
            .field("groups", &shared.read().groups.len())
            .field("dead_letters", &shared.dead_letters.name())
            .field("closed", &shared.is_closed())
            .finish()
    }
}

/// Configures an [`InProcessTransport`]: `InProcessTransport::builder().capacity(256)
/// .dead_letter_queue(dlq).build()`.
#[derive(Default)]
pub struct InProcessTransportBuilder {
    capacity: Option<usize>,
    clock: Option<Arc<dyn Clock>>,
    dead_letters: Option<Arc<dyn DeadLetterQueue>>,
}

impl std::fmt::Debug for InProcessTransportBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessTransportBuilder")
            .field("capacity", &self.capacity)
            .field("clock", &self.clock)
            .field(
                "dead_letters",
                &self.dead_letters.as_ref().map(|d| d.name()),
            )
            .finish()
    }
}

impl InProcessTransportBuilder {
    /// How many events each consumer group's queue holds (at least 1; default
    /// [`DEFAULT_CAPACITY`]).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity.max(1));
        self
    }

    /// Where dead letters go (default: a new [`InMemoryDeadLetterQueue`]).
    pub fn dead_letter_queue(mut self, dead_letters: Arc<dyn DeadLetterQueue>) -> Self {
        self.dead_letters = Some(dead_letters);
        self
    }

    /// The clock that times nack delays and stamps first-attempt times (default: the
    /// system clock). Tests pass a [`orchestrator_core::ManualClock`].
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The transport.
    pub fn build(self) -> InProcessTransport {
        let shared = Shared {
            capacity: self.capacity.unwrap_or(DEFAULT_CAPACITY),
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            dead_letters: self
                .dead_letters
                .unwrap_or_else(|| Arc::new(InMemoryDeadLetterQueue::new())),
            closer: Arc::new(Closer::default()),
            routes: RwLock::new(Routes::default()),
        };
        InProcessTransport {
            handle: Arc::new(Handle {
                shared: Arc::new(shared),
            }),
        }
    }
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, Routes> {
        // Each change to `Routes` is a single insert, retain or clear that cannot panic
        // halfway (short of allocation failure, which aborts), so a lock poisoned by a
        // panicking holder still guards consistent routes: keep routing.
        self.routes.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Routes> {
        // See `read` for why a poisoned lock is safe to use.
        self.routes.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closed(&self) -> bool {
        self.closer.is_closed()
    }

    fn close(&self) {
        // Wakes every consumer waiting on an empty queue and every publisher waiting on a
        // full one, of every group (they share the closer). `subscribe` checks the flag
        // under the routes lock, so no group is created after this.
        if !self.closer.close() {
            return;
        }
        self.write().by_topic.clear();
    }

    /// The groups `topic` goes to, from the cache or worked out and cached. Checks that
    /// `topic` is valid (only topics that passed the check are cached).
    fn route(&self, topic: &str) -> Result<Arc<Route>> {
        if self.is_closed() {
            return Err(closed());
        }
        if let Some(route) = self.read().by_topic.get(topic) {
            return Ok(Arc::clone(route));
        }
        validate_topic(topic)?;
        let mut routes = self.write();
        if routes.by_topic.len() >= MAX_CACHED_ROUTES {
            routes.by_topic.clear();
        }
        let route = Arc::new(Route {
            topic: Arc::from(topic),
            groups: routes
                .groups
                .values()
                .filter(|entry| entry.matches(topic))
                .map(|entry| Arc::clone(&entry.queue))
                .collect(),
        });
        routes.by_topic.insert(topic.to_owned(), Arc::clone(&route));
        Ok(route)
    }

    fn unsubscribe(&self, group: &str, id: u64) {
        let mut routes = self.write();
        if let Some(entry) = routes.groups.get_mut(group) {
            entry.subscriptions.retain(|(sub, _)| *sub != id);
        }
        routes.by_topic.clear();
    }
}

/// Puts `event` in the queue of every group of `route`, waiting while a queue is full.
async fn send_to(route: &Route, event: EventEnvelope) -> Result<()> {
    let Some((last, others)) = route.groups.split_last() else {
        return Ok(());
    };
    for group in others {
        let message = Message::new(event.clone(), Arc::clone(&route.topic));
        group.send(message).await?;
    }
    last.send(Message::new(event, Arc::clone(&route.topic)))
        .await
}

#[async_trait]
impl Transport for InProcessTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn publish(&self, topic: &str, event: EventEnvelope) -> Result<()> {
        let route = self.handle.shared.route(topic)?;
        send_to(&route, event).await
    }

    async fn publish_batch(&self, topic: &str, events: Vec<EventEnvelope>) -> Result<()> {
        let route = self.handle.shared.route(topic)?;
        for event in events {
            send_to(&route, event).await?;
        }
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn DeliveryStream>> {
        validate_group(&options.group)?;
        if options.patterns.is_empty() {
            return Err(Error::invalid(
                "subscription",
                format!(
                    "group `{}` has no topic pattern; give at least one (`#` matches every topic)",
                    options.group
                ),
            ));
        }
        let shared = &self.handle.shared;
        let mut routes = shared.write();
        if shared.is_closed() {
            return Err(closed());
        }
        let id = routes.next_subscription;
        routes.next_subscription += 1;
        let capacity = shared.capacity;
        let entry = routes
            .groups
            .entry(options.group.clone())
            .or_insert_with(|| {
                let (sender, receiver) = mpsc::channel(capacity);
                GroupEntry {
                    queue: Arc::new(Group {
                        name: options.group.clone(),
                        sender,
                        receiver: tokio::sync::Mutex::new(receiver),
                        closer: Arc::clone(&shared.closer),
                    }),
                    subscriptions: Vec::new(),
                }
            });
        entry.subscriptions.push((id, options.patterns));
        let group = Arc::clone(&entry.queue);
        routes.by_topic.clear();
        Ok(Box::new(Subscription {
            shared: Arc::clone(shared),
            group,
            id,
        }))
    }

    async fn redeliver(&self, group: &str, topic: &str, event: EventEnvelope) -> Result<()> {
        validate_group(group)?;
        validate_topic(topic)?;
        let shared = &self.handle.shared;
        if shared.is_closed() {
            return Err(closed());
        }
        let queue = shared
            .read()
            .groups
            .get(group)
            .map(|entry| Arc::clone(&entry.queue));
        let queue = queue.ok_or_else(|| Error::NotFound {
            what: format!(
                "consumer group `{group}` on the in-process transport (it was never subscribed)"
            ),
        })?;
        queue.send(Message::new(event, Arc::from(topic))).await
    }

    fn dead_letter_queue(&self) -> Arc<dyn DeadLetterQueue> {
        Arc::clone(&self.handle.shared.dead_letters)
    }
}

/// One consumer of a group; dropping it takes its patterns out of the group's routing.
struct Subscription {
    shared: Arc<Shared>,
    group: Arc<Group>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.unsubscribe(&self.group.name, self.id);
    }
}

#[async_trait]
impl DeliveryStream for Subscription {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        if self.shared.is_closed() {
            return Ok(None);
        }
        // `recv` is cancel-safe: dropping it before it completes takes nothing off the queue.
        let Some(mut message) = self.group.recv().await else {
            return Ok(None);
        };
        if self.shared.is_closed() {
            return Ok(None);
        }
        let first_attempt_at = *message
            .first_attempt_at
            .get_or_insert_with(|| self.shared.clock.now());
        let info = DeliveryInfo {
            topic: message.topic.to_string(),
            group: self.group.name.clone(),
            attempt: message.attempt,
            first_attempt_at,
            last_error: message.last_error.clone(),
        };
        let event = message.event.clone();
        let settle = Settle {
            group: Arc::clone(&self.group),
            clock: Arc::clone(&self.shared.clock),
            dead_letters: Arc::clone(&self.shared.dead_letters),
            message: Some(message),
        };
        Ok(Some(Delivery::new(event, info, Box::new(settle))))
    }
}

/// Settles one delivery. Holds the message until it is settled, so that a delivery
/// dropped unsettled (or whose dead-lettering failed) goes back to its queue.
struct Settle {
    group: Arc<Group>,
    clock: Arc<dyn Clock>,
    dead_letters: Arc<dyn DeadLetterQueue>,
    /// `None` once settled.
    message: Option<Message>,
}

impl Settle {
    /// The message as its next attempt.
    fn next_attempt(&mut self, error: Option<String>) -> Option<Message> {
        let mut message = self.message.take()?;
        message.attempt = message.attempt.saturating_add(1);
        if error.is_some() {
            message.last_error = error;
        }
        Some(message)
    }
}

#[async_trait]
impl Acknowledge for Settle {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.message = None;
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Duration, reason: String) -> Result<()> {
        let Some(message) = self.next_attempt(Some(reason)) else {
            return Ok(());
        };
        if delay.is_zero() {
            requeue(&self.group, message);
            return Ok(());
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Without a runtime to wait on, redeliver at once rather than lose the event.
            requeue(&self.group, message);
            return Err(no_runtime("a nack's delay"));
        };
        let group = Arc::clone(&self.group);
        let clock = Arc::clone(&self.clock);
        runtime.spawn(async move {
            clock.sleep(delay).await;
            // Fails only once the transport is closed, which discards queued events anyway.
            let _ = group.send(message).await;
        });
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        // On failure `self` is dropped still holding the message, which re-queues it.
        self.dead_letters.push(letter).await?;
        self.message = None;
        Ok(())
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        if let Some(message) = self.next_attempt(None) {
            requeue(&self.group, message);
        }
    }
}

/// Puts a message back at once: straight into the queue when there is room, else through
/// a task that waits for room (never blocking the caller, which may be a `Drop`).
fn requeue(group: &Arc<Group>, message: Message) {
    let Some(message) = group.try_requeue(message) else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!(
            group = %group.name,
            "{}; an unsettled in-process delivery was lost",
            no_runtime("re-queueing into a full queue")
        );
        return;
    };
    let queue = Arc::clone(group);
    runtime.spawn(async move {
        // Fails only once the transport is closed, which discards queued events anyway.
        let _ = queue.send(message).await;
    });
}

fn no_runtime(what: &str) -> Error {
    Error::backend(
        NAME,
        false,
        format!("{what} needs a tokio runtime; use the in-process transport inside one"),
    )
}
