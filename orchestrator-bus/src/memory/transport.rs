//! The in-process transport: consumer groups with bounded queues inside one process.

use std::collections::{HashMap, VecDeque};

use crate::fasthash::FxHashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::Notify;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::transport::{validate_group, validate_topic};
use orchestrator_core::{
    Clock, DeadLetter, DeadLetterQueue, Delivery, DeliveryInfo, DeliveryStream, Error,
    EventEnvelope, MaxEventSize, Result, Returned, Settler, SubscribeOptions, SystemClock,
    TopicPattern, Transport,
};

use super::InMemoryDeadLetterQueue;

const NAME: &str = "in-process";

/// How many events a consumer group's queue holds by default before publishers wait.
pub const DEFAULT_CAPACITY: usize = 1024;

/// A full queue wakes its waiting publishers once consumers have taken this many events
/// (or half the capacity, if less).
const LOW_WATER_GAP: usize = 64;

/// How many topics' routes are remembered before the route cache starts over.
const MAX_CACHED_ROUTES: usize = 4096;

/// A [`Transport`] inside one process: publishers and consumers are tasks of one tokio
/// runtime.
///
/// Each consumer group has one bounded queue (default [`DEFAULT_CAPACITY`] events) shared
/// by its consumers, who compete for its events. A publish puts the event in the queue of
/// every group with a pattern matching the topic, and waits while such a queue is full: a
/// slow group slows its publishers down instead of growing memory. A waiting publisher
/// goes on once the group's consumers have taken half the capacity or 64 events, whichever
/// is less (so that a fast publisher is not woken for every single event taken).
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
/// The prefetch of [`SubscribeOptions`] bounds how many deliveries one
/// [`DeliveryStream::next_batch`] hands out, so that a consumer holding a batch keeps no
/// more events from its competitors than it asked for. Clones share the same transport.
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
    /// Unique to this transport in the process (keys the per-thread route cache).
    id: u64,
    capacity: usize,
    max_event_size: MaxEventSize,
    clock: Arc<dyn Clock>,
    dead_letters: Arc<dyn DeadLetterQueue>,
    closer: Arc<Closer>,
    routes: RwLock<Routes>,
    /// Bumped whenever routes change (a subscription came or went, the transport closed),
    /// which invalidates every thread's cached route.
    generation: AtomicU64,
}

/// Numbers transports for [`Shared::id`].
static NEXT_TRANSPORT_ID: AtomicU64 = AtomicU64::new(0);

/// The route a thread published to last, so that a publisher sending one topic again and
/// again skips the lock and the map — and, when every queue has room, publishes under this
/// borrow without a reference count. A route kept here after its transport closed (or its
/// subscriptions changed) is never used again; until the thread publishes elsewhere it
/// keeps its groups' emptied queues (closing clears them) and the handles they share with
/// the transport (clock, dead-letter queue) alive — one route per thread at most.
struct CachedRoute {
    transport: u64,
    generation: u64,
    route: Arc<Route>,
}

thread_local! {
    static LAST_ROUTE: std::cell::RefCell<Option<CachedRoute>> =
        const { std::cell::RefCell::new(None) };
}

#[derive(Default)]
struct Routes {
    /// Every group ever subscribed, with or without consumers.
    groups: HashMap<String, GroupEntry>,
    /// Which groups a topic goes to; cleared whenever a subscription comes or goes.
    by_topic: FxHashMap<String, Arc<Route>>,
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

/// One consumer group's queue, shared by the group's consumers, who compete for its events.
/// The group keeps it itself, so the queue outlives its consumers.
///
/// A bounded FIFO under a mutex rather than a channel, for two reasons: a consumer takes a
/// whole batch under one lock, and a full queue wakes its waiting publishers only once
/// consumers took [`LOW_WATER_GAP`] events (or half the capacity, if less) instead of for
/// every event taken — otherwise a publisher faster than its consumers is parked and woken
/// once per event.
struct Group {
    name: Arc<str>,
    capacity: usize,
    /// Publishers waiting on a full queue are woken when it drains to this many events.
    low_water: usize,
    queue: std::sync::Mutex<Queue>,
    /// Consumers waiting for an event.
    not_empty: Notify,
    /// Publishers waiting for room.
    not_full: Notify,
    closer: Arc<Closer>,
    /// The transport's clock and dead-letter queue, here so that settling a delivery
    /// needs one handle (the group) instead of three.
    clock: Arc<dyn Clock>,
    dead_letters: Arc<dyn DeadLetterQueue>,
    /// Deliveries handed out and not settled yet, plus nacked ones waiting out their delay:
    /// with the queue, what the group still owes its handlers (see
    /// [`InProcessTransport::is_idle`]).
    outstanding: AtomicUsize,
}

struct Queue {
    messages: VecDeque<Message>,
    /// Consumers between finding the queue empty and waking up (may count one too many
    /// for a moment, which costs a spurious wake-up, never one too few).
    consumers_waiting: usize,
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
    fn new(name: &str, capacity: usize, shared: &Shared) -> Self {
        Self {
            name: name.into(),
            capacity,
            low_water: capacity - (capacity / 2).clamp(1, LOW_WATER_GAP),
            queue: std::sync::Mutex::new(Queue {
                messages: VecDeque::new(),
                consumers_waiting: 0,
            }),
            not_empty: Notify::new(),
            not_full: Notify::new(),
            closer: Arc::clone(&shared.closer),
            clock: Arc::clone(&shared.clock),
            dead_letters: Arc::clone(&shared.dead_letters),
            outstanding: AtomicUsize::new(0),
        }
    }

    /// One delivery (or delayed redelivery) less is outstanding.
    fn settled(&self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether nothing is queued and nothing handed out is unsettled.
    fn is_idle(&self) -> bool {
        self.outstanding.load(Ordering::Acquire) == 0 && self.lock().messages.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every critical section is a push, a drain or a counter change that cannot panic
        // halfway (short of allocation failure, which aborts): a poisoned lock still
        // guards a consistent queue.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `message` if there is room, waking a waiting consumer; hands it back if the
    /// queue is full.
    fn try_push(&self, message: Message) -> std::result::Result<(), Message> {
        let mut queue = self.lock();
        if queue.messages.len() >= self.capacity {
            return Err(message);
        }
        queue.messages.push_back(message);
        let wake = queue.consumers_waiting > 0;
        drop(queue);
        if wake {
            self.not_empty.notify_one();
        }
        Ok(())
    }

    /// Queues `message`, waiting while the queue is full; fails once the transport closes.
    /// Cancel-safe in that a cancelled send queued nothing.
    async fn send(&self, mut message: Message) -> Result<()> {
        loop {
            if self.closer.is_closed() {
                return Err(closed());
            }
            message = match self.try_push(message) {
                Ok(()) => return Ok(()),
                Err(message) => message,
            };
            // Full: wait for the consumers to drain it to the low-water mark. Registered
            // before looking again, so a drain in between is not missed.
            let room = self.not_full.notified();
            let closing = self.closer.notify.notified();
            tokio::pin!(room, closing);
            room.as_mut().enable();
            closing.as_mut().enable();
            if self.closer.is_closed() {
                return Err(closed());
            }
            if self.lock().messages.len() < self.capacity {
                continue;
            }
            tokio::select! {
                biased;
                () = closing => return Err(closed()),
                () = room => {}
            }
        }
    }

    /// Puts `message` back without waiting if there is room; hands it back if not. After
    /// the transport closed it is discarded, like every queued event.
    fn try_requeue(&self, message: Message) -> Option<Message> {
        if self.closer.is_closed() {
            return None;
        }
        self.try_push(message).err()
    }

    /// Waits for the next message, then appends it and up to `max - 1` more that are
    /// already queued to `into` (`max` of 0 counts as 1); `false` once the transport
    /// closes. Cancel-safe: messages are only taken off the queue in the poll that returns
    /// them.
    async fn recv_into(&self, max: usize, into: &mut Vec<Message>) -> bool {
        let max = max.max(1);
        loop {
            if self.closer.is_closed() {
                return false;
            }
            if self.take(max, into) {
                return true;
            }
            let ready = self.not_empty.notified();
            let closing = self.closer.notify.notified();
            tokio::pin!(ready, closing);
            ready.as_mut().enable();
            closing.as_mut().enable();
            {
                let mut queue = self.lock();
                if !queue.messages.is_empty() {
                    continue;
                }
                queue.consumers_waiting += 1;
            }
            let _waiting = WaitingConsumer(self);
            if self.closer.is_closed() {
                return false;
            }
            tokio::select! {
                biased;
                () = closing => return false,
                () = ready => {}
            }
        }
    }

    /// Moves up to `max` queued messages into `into`; `false` if there were none. Wakes
    /// the waiting publishers when this drains the queue to the low-water mark.
    fn take(&self, max: usize, into: &mut Vec<Message>) -> bool {
        let mut queue = self.lock();
        let before = queue.messages.len();
        if before == 0 {
            return false;
        }
        let taken = before.min(max);
        into.extend(queue.messages.drain(..taken));
        drop(queue);
        if before > self.low_water && before - taken <= self.low_water {
            self.not_full.notify_waiters();
        }
        true
    }

    /// How many messages wait.
    fn len(&self) -> usize {
        self.lock().messages.len()
    }
}

/// Counts a consumer as waiting on its group's queue until dropped.
struct WaitingConsumer<'a>(&'a Group);

impl Drop for WaitingConsumer<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        queue.consumers_waiting = queue.consumers_waiting.saturating_sub(1);
    }
}

/// An event waiting in a group's queue. Kept small, since the queue moves it twice: a
/// first delivery carries no history, and an event published to the topic named by its
/// type (as on the bus) carries no topic.
struct Message {
    event: EventEnvelope,
    /// `None`: the event's type.
    topic: Option<Arc<str>>,
    /// `None` for a first delivery.
    history: Option<Box<History>>,
}

/// The delivery history of an event delivered before.
struct History {
    attempt: u32,
    first_attempt_at: DateTime<Utc>,
    last_error: Option<String>,
}

impl Message {
    /// A delivery handed back, as its next attempt.
    fn again(returned: Returned, error: Option<String>) -> Self {
        Self {
            event: returned.event,
            topic: returned.topic,
            history: Some(Box::new(History {
                attempt: returned.attempt.saturating_add(1),
                first_attempt_at: returned.first_attempt_at,
                last_error: error.or(returned.last_error),
            })),
        }
    }

    /// A first delivery of `event`, published to `topic`.
    fn new(event: EventEnvelope, topic: &Arc<str>) -> Self {
        let topic =
            (!crate::fasthash::same_str(topic, event.event_type())).then(|| Arc::clone(topic));
        Self {
            event,
            topic,
            history: None,
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

    /// Whether every event published so far has been settled by its groups: no group has
    /// an event queued, a delivery handed out and not acknowledged (or dead-lettered), or a
    /// retry waiting out its delay. The outbox relay checkpoints an in-process transport
    /// only when it is idle, since what is in its queues dies with the process.
    pub fn is_idle(&self) -> bool {
        let routes = self.handle.shared.read();
        routes.groups.values().all(|g| g.queue.is_idle())
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

    /// [`Transport::publish`] to the topic named by the event's type, without the boxed
    /// future (and without holding a copy of the topic): the bus calls this when its
    /// transport is an `InProcessTransport`.
    ///
    /// The part that needs no waiting runs here; what is left (a queue was full, or the
    /// route was not cached on this thread) is returned for [`send_rest`].
    pub(crate) fn publish_direct(&self, event: EventEnvelope) -> Result<Option<Unsent>> {
        self.check_size(&event)?;
        self.handle.shared.publish_now(event)
    }

    /// Refuses an event over the maximum event size, as `publish` does.
    pub(crate) fn check_size(&self, event: &EventEnvelope) -> Result<()> {
        self.handle.shared.max_event_size.check(event)
    }

    /// Finishes what [`publish_direct`](Self::publish_direct) could not send at once.
    pub(crate) async fn send_rest(&self, unsent: Unsent) -> Result<()> {
        let Unsent { route, from, event } = unsent;
        let route = match route {
            Some(route) => route,
            None => self.handle.shared.route(event.event_type())?,
        };
        send_from(&route, from, event).await
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
    max_event_size: Option<MaxEventSize>,
    clock: Option<Arc<dyn Clock>>,
    dead_letters: Option<Arc<dyn DeadLetterQueue>>,
}

impl std::fmt::Debug for InProcessTransportBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessTransportBuilder")
            .field("capacity", &self.capacity)
            .field("max_event_size", &self.max_event_size)
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

    /// The largest event `publish` accepts (default [`MaxEventSize::DEFAULT`]): a larger
    /// one is refused with [`Error::TooLarge`], and a batch with one is refused whole. The
    /// same limit as the broker transports', so that what works here works there.
    pub fn max_event_size(mut self, limit: MaxEventSize) -> Self {
        self.max_event_size = Some(limit);
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
            max_event_size: self.max_event_size.unwrap_or_default(),
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            dead_letters: self
                .dead_letters
                .unwrap_or_else(|| Arc::new(InMemoryDeadLetterQueue::new())),
            closer: Arc::new(Closer::default()),
            routes: RwLock::new(Routes::default()),
            generation: AtomicU64::new(0),
            id: NEXT_TRANSPORT_ID.fetch_add(1, Ordering::Relaxed),
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
        let mut routes = self.write();
        self.invalidate(&mut routes);
        for entry in routes.groups.values() {
            entry.queue.lock().messages.clear();
        }
    }

    /// Forgets every cached route: subscriptions changed.
    fn invalidate(&self, routes: &mut Routes) {
        routes.by_topic.clear();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The groups `topic` goes to, from this thread's last route, the cache, or worked out
    /// and cached. Checks that `topic` is valid (only topics that passed the check are
    /// cached).
    fn route(&self, topic: &str) -> Result<Arc<Route>> {
        if self.is_closed() {
            return Err(closed());
        }
        // Read before the lookup: a change in between leaves an entry that is already
        // out of date, so it is never used.
        let generation = self.generation.load(Ordering::Acquire);
        let last = LAST_ROUTE.with(|last| {
            let last = last.borrow();
            let cached = last.as_ref()?;
            self.is_current(cached, generation, topic)
                .then(|| Arc::clone(&cached.route))
        });
        if let Some(route) = last {
            return Ok(route);
        }
        let route = self.route_slow(topic)?;
        LAST_ROUTE.with(|last| {
            *last.borrow_mut() = Some(CachedRoute {
                transport: self.id,
                generation,
                route: Arc::clone(&route),
            });
        });
        Ok(route)
    }

    /// Whether `cached` is this transport's route for `topic`, still valid.
    fn is_current(&self, cached: &CachedRoute, generation: u64, topic: &str) -> bool {
        cached.transport == self.id
            && cached.generation == generation
            && crate::fasthash::same_str(&cached.route.topic, topic)
    }

    /// Publishes `event` to the topic named by its type without waiting, when this
    /// thread's cached route is current and every queue on it has room: the common case,
    /// with no reference count on the route and no future. Otherwise hands back what is
    /// left to send, for [`send_rest`].
    fn publish_now(&self, event: EventEnvelope) -> Result<Option<Unsent>> {
        if self.is_closed() {
            return Err(closed());
        }
        let generation = self.generation.load(Ordering::Acquire);
        LAST_ROUTE.with(|last| {
            let last = last.borrow();
            let Some(cached) = last
                .as_ref()
                .filter(|cached| self.is_current(cached, generation, event.event_type()))
            else {
                return Ok(Some(Unsent {
                    route: None,
                    from: 0,
                    event,
                }));
            };
            let route = &cached.route;
            Ok(try_send_from(route, 0, event).map(|(from, event)| Unsent {
                route: Some(Arc::clone(route)),
                from,
                event,
            }))
        })
    }

    fn route_slow(&self, topic: &str) -> Result<Arc<Route>> {
        if let Some(route) = self.read().by_topic.get(topic) {
            return Ok(Arc::clone(route));
        }
        validate_topic(topic)?;
        let mut routes = self.write();
        if routes.by_topic.len() >= MAX_CACHED_ROUTES {
            // Too many topics: start over (the routes stay valid, no invalidation).
            routes.by_topic.clear();
        }
        let route = Arc::new(Route {
            topic: orchestrator_core::intern_event_type(topic),
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
        self.invalidate(&mut routes);
    }
}

/// What [`Shared::publish_now`] could not send at once: the event, for the groups of
/// `route` from index `from` on (the whole route, still to be looked up, if `None`).
pub(crate) struct Unsent {
    route: Option<Arc<Route>>,
    from: usize,
    event: EventEnvelope,
}

/// Queues `event` in the groups of `route` from index `from` on while they have room;
/// returns where it stopped (a full queue) and the event, if it did.
fn try_send_from(
    route: &Route,
    from: usize,
    event: EventEnvelope,
) -> Option<(usize, EventEnvelope)> {
    let groups = route.groups.get(from..).unwrap_or_default();
    let (last, others) = groups.split_last()?;
    for (i, group) in others.iter().enumerate() {
        if group
            .try_push(Message::new(event.clone(), &route.topic))
            .is_err()
        {
            return Some((from + i, event));
        }
    }
    match last.try_push(Message::new(event, &route.topic)) {
        Ok(()) => None,
        Err(message) => Some((from + groups.len() - 1, message.event)),
    }
}

/// Puts `event` in the queue of every group of `route` from index `from` on, waiting while
/// a queue is full.
async fn send_from(route: &Route, from: usize, event: EventEnvelope) -> Result<()> {
    let groups = route.groups.get(from..).unwrap_or_default();
    let Some((last, others)) = groups.split_last() else {
        return Ok(());
    };
    for group in others {
        group
            .send(Message::new(event.clone(), &route.topic))
            .await?;
    }
    last.send(Message::new(event, &route.topic)).await
}

#[async_trait]
impl Transport for InProcessTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn publish(&self, topic: &str, event: EventEnvelope) -> Result<()> {
        if crate::fasthash::same_str(topic, event.event_type()) {
            return match self.publish_direct(event)? {
                None => Ok(()),
                Some(unsent) => self.send_rest(unsent).await,
            };
        }
        self.check_size(&event)?;
        let route = self.handle.shared.route(topic)?;
        send_from(&route, 0, event).await
    }

    async fn publish_batch(&self, topic: &str, events: Vec<EventEnvelope>) -> Result<()> {
        for event in &events {
            self.check_size(event)?;
        }
        let route = self.handle.shared.route(topic)?;
        for event in events {
            send_from(&route, 0, event).await?;
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
            .or_insert_with(|| GroupEntry {
                queue: Arc::new(Group::new(&options.group, capacity, shared)),
                subscriptions: Vec::new(),
            });
        entry.subscriptions.push((id, options.patterns));
        let group = Arc::clone(&entry.queue);
        shared.invalidate(&mut routes);
        Ok(Box::new(Subscription {
            shared: Arc::clone(shared),
            settler: Arc::new(GroupSettler {
                group: Arc::clone(&group),
            }),
            group,
            id,
            prefetch: options.prefetch.max(1),
            received: Vec::new(),
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
        queue.send(Message::new(event, &Arc::from(topic))).await
    }

    fn dead_letter_queue(&self) -> Arc<dyn DeadLetterQueue> {
        Arc::clone(&self.handle.shared.dead_letters)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// One consumer of a group; dropping it takes its patterns out of the group's routing.
struct Subscription {
    shared: Arc<Shared>,
    group: Arc<Group>,
    id: u64,
    /// The most deliveries one `next_batch` hands out (the subscription's prefetch).
    prefetch: usize,
    /// Settles this subscription's deliveries (a [`GroupSettler`]).
    settler: Arc<dyn Settler>,
    /// Scratch space for `next_batch`, kept between calls (always empty between them).
    received: Vec<Message>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.unsubscribe(&self.group.name, self.id);
    }
}

impl Subscription {
    /// Receives up to `max` messages into `self.received`; `false` once closed.
    async fn receive(&mut self, max: usize) -> bool {
        // `recv_into` (`false` once closed) is cancel-safe: dropping it before it completes
        // takes nothing off the queue.
        if !self.group.recv_into(max, &mut self.received).await {
            return false;
        }
        if self.shared.is_closed() {
            // Closing discards queued events; these go with them.
            self.received.clear();
            return false;
        }
        true
    }

    /// Hands `message` out as a delivery that settles with its group. `now` is read from
    /// the clock once per batch, when a first delivery needs it.
    fn deliver(&self, message: Message, now: &mut Option<DateTime<Utc>>) -> Delivery {
        let (attempt, first_attempt_at, last_error) = match message.history {
            None => (1, *now.get_or_insert_with(|| self.group.clock.now()), None),
            Some(history) => (
                history.attempt,
                history.first_attempt_at,
                history.last_error,
            ),
        };
        let info = DeliveryInfo {
            topic: message.topic,
            group: Arc::clone(&self.group.name),
            attempt,
            first_attempt_at,
            last_error,
        };
        // The delivery carries everything needed to queue it again (see `GroupSettler`):
        // no per-delivery settle state, no allocation. It is outstanding until settled.
        self.group.outstanding.fetch_add(1, Ordering::AcqRel);
        Delivery::with_settler(message.event, info, self.settler.clone())
    }
}

#[async_trait]
impl DeliveryStream for Subscription {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        if !self.receive(1).await {
            return Ok(None);
        }
        Ok(self
            .received
            .pop()
            .map(|message| self.deliver(message, &mut None)))
    }

    async fn next_batch(&mut self, max: usize, into: &mut Vec<Delivery>) -> Result<bool> {
        if !self.receive(max.min(self.prefetch)).await {
            return Ok(false);
        }
        let mut received = std::mem::take(&mut self.received);
        let mut now = None;
        into.extend(
            received
                .drain(..)
                .map(|message| self.deliver(message, &mut now)),
        );
        self.received = received;
        Ok(true)
    }
}

/// Settles the deliveries of a group: an ack forgets the event, a nack or a delivery
/// dropped unsettled queues it again as its next attempt, a dead letter parks it. One per
/// subscription, shared by its deliveries.
struct GroupSettler {
    group: Arc<Group>,
}

#[async_trait]
impl Settler for GroupSettler {
    fn ack(&self) -> Result<()> {
        self.group.settled();
        Ok(())
    }

    async fn nack(&self, returned: Returned, delay: Duration, reason: String) -> Result<()> {
        let message = Message::again(returned, Some(reason));
        if delay.is_zero() {
            requeue(&self.group, message);
            self.group.settled();
            return Ok(());
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Without a runtime to wait on, redeliver at once rather than lose the event.
            requeue(&self.group, message);
            self.group.settled();
            return Err(no_runtime("a nack's delay"));
        };
        let group = Arc::clone(&self.group);
        // Still outstanding while it waits out its delay.
        runtime.spawn(async move {
            group.clock.sleep(delay).await;
            // Fails only once the transport is closed, which discards queued events anyway.
            let _ = group.send(message).await;
            group.settled();
        });
        Ok(())
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<()> {
        // On an error the delivery releases itself, which queues it again (and settles it).
        self.group.dead_letters.push(letter).await?;
        self.group.settled();
        Ok(())
    }

    fn release(&self, returned: Returned) {
        requeue(&self.group, Message::again(returned, None));
        self.group.settled();
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
