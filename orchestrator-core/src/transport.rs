//! The transport: how events travel from publishers to consumer groups.
//!
//! A consumer group subscribes to topic patterns. Within a group, consumers compete: each
//! event goes to one of them. Across groups, every group gets every matching event. Each
//! [`Delivery`] is settled exactly once: [`Delivery::ack`], [`Delivery::nack`] (redeliver
//! after a delay) or [`Delivery::dead_letter`] (park it in the [`DeadLetterQueue`]). A
//! delivery dropped without being settled is returned to the transport and redelivered, so
//! an event is never lost by forgetting it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::dlq::{DeadLetter, DeadLetterQueue};
use crate::envelope::EventEnvelope;
use crate::error::{Error, Result};
use crate::pattern::TopicPattern;

/// How a consumer group subscribes.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeOptions {
    /// The consumer group: consumers of one group share the work.
    pub group: String,
    /// The topic patterns the group receives.
    pub patterns: Vec<TopicPattern>,
    /// How many deliveries a consumer may hold unsettled at once (a hint; backends that
    /// have no such notion ignore it).
    pub prefetch: usize,
    /// A group that lives only as long as its consumer (a `tail`, a test, a subscription
    /// without a name): the transport removes what it keeps for the group (queues,
    /// consumer groups, retry streams) when the delivery stream is dropped, and the broker
    /// removes it after a while if the process dies first — see each backend's docs. An
    /// ephemeral group has one consumer: give it a unique name. Default false: a group
    /// keeps its place while its consumers are away, so a restarted process misses nothing.
    pub ephemeral: bool,
}

impl SubscribeOptions {
    /// Subscribes `group` to one pattern (`"user.created"`, `"user.*"`, `"order.#"`).
    pub fn new(group: impl Into<String>, pattern: &str) -> Result<Self> {
        let group = group.into();
        validate_group(&group)?;
        Ok(Self {
            group,
            patterns: vec![TopicPattern::parse(pattern)?],
            prefetch: 64,
            ephemeral: false,
        })
    }

    /// Makes the group [ephemeral](Self::ephemeral).
    pub fn ephemeral(mut self) -> Self {
        self.ephemeral = true;
        self
    }

    /// Adds another pattern.
    pub fn pattern(mut self, pattern: &str) -> Result<Self> {
        self.patterns.push(TopicPattern::parse(pattern)?);
        Ok(self)
    }

    /// Sets the prefetch hint (at least 1).
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Whether `topic` matches any of the patterns.
    pub fn matches(&self, topic: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(topic))
    }
}

/// Checks a consumer group name: non-empty ASCII letters, digits, `-`, `_`, `.` and `:`.
pub fn validate_group(group: &str) -> Result<()> {
    if group.is_empty()
        || !group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(Error::invalid(
            "consumer group",
            format!("`{group}`: use ASCII letters, digits, `-`, `_`, `.` or `:`"),
        ));
    }
    Ok(())
}

/// Checks a topic name: a valid event type (dot-separated segments, no wildcards).
pub fn validate_topic(topic: &str) -> Result<()> {
    crate::envelope::validate_event_type(topic).map_err(|e| match e {
        Error::InvalidInput { reason, .. } => Error::invalid("topic", reason),
        other => other,
    })
}

/// Settles a delivery with its transport. Implemented by each transport.
#[async_trait]
pub trait Acknowledge: Send + Sync {
    /// The delivery was handled.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Redeliver after `delay`, recording `reason` as the last error.
    async fn nack(self: Box<Self>, delay: Duration, reason: String) -> Result<()>;
    /// Park the delivery in the dead-letter queue.
    async fn dead_letter(self: Box<Self>, letter: DeadLetter) -> Result<()>;
}

/// Settles the deliveries of a transport that needs nothing per delivery beyond what the
/// [`Delivery`] itself carries: one shared settler (`Arc<dyn Settler>`) serves every
/// delivery of a subscription, so handing out a delivery allocates nothing. The
/// in-process transport uses it; brokers, which keep a message handle per delivery, use
/// [`Acknowledge`].
///
/// A delivery dropped unsettled — or whose dead-lettering failed — comes back through
/// [`release`](Self::release), so nothing is lost.
#[async_trait]
pub trait Settler: Send + Sync {
    /// The delivery was handled. Synchronous: a settler that needs a round trip uses
    /// [`Acknowledge`] instead.
    fn ack(&self) -> Result<()>;
    /// Deliver `returned` again after `delay`, as its next attempt, with `reason` as its
    /// last error.
    async fn nack(&self, returned: Returned, delay: Duration, reason: String) -> Result<()>;
    /// Park the letter in the dead-letter queue. On an error the delivery is released.
    async fn dead_letter(&self, letter: DeadLetter) -> Result<()>;
    /// Take back a delivery that was not settled, to deliver it again as its next attempt.
    /// Called from `Drop`: must not block.
    fn release(&self, returned: Returned);
}

/// A delivery handed back to its [`Settler`]: what the transport needs to queue it again.
#[derive(Debug, Clone)]
pub struct Returned {
    /// The event.
    pub event: EventEnvelope,
    /// The topic it was published to; `None` when that is the event's type.
    pub topic: Option<Arc<str>>,
    /// The attempt the delivery was (the next one is `attempt + 1`).
    pub attempt: u32,
    /// When it was first delivered to the group.
    pub first_attempt_at: DateTime<Utc>,
    /// The last error recorded so far.
    pub last_error: Option<String>,
}

/// How a delivery is settled.
enum Acker {
    Boxed(Box<dyn Acknowledge>),
    Shared(Arc<dyn Settler>),
    /// Settled (or being settled).
    Done,
}

/// One event handed to one consumer of a group.
pub struct Delivery {
    event: EventEnvelope,
    /// `None`: the event's type (no reference count per delivery on a string that
    /// publishers share).
    topic: Option<Arc<str>>,
    group: Arc<str>,
    attempt: u32,
    first_attempt_at: DateTime<Utc>,
    last_error: Option<String>,
    acker: Acker,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        // A `Box<dyn Acknowledge>` handles its own drop; a shared settler is told here.
        if let Acker::Shared(settler) = std::mem::replace(&mut self.acker, Acker::Done) {
            settler.release(self.returned());
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("event_id", self.event.id())
            .field("event_type", &self.event.event_type())
            .field("topic", &self.topic())
            .field("group", &self.group)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// The redelivery history a transport keeps with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// The topic it was published to; `None` when that is the event's type, as on the
    /// event bus (which spares a reference count per delivery).
    pub topic: Option<Arc<str>>,
    /// The consumer group it is delivered to.
    pub group: Arc<str>,
    /// 1 for the first delivery, 2 for the first redelivery, …
    pub attempt: u32,
    /// When it was first delivered to this group.
    pub first_attempt_at: DateTime<Utc>,
    /// The reason given by the last nack, if any.
    pub last_error: Option<String>,
}

impl Delivery {
    /// Made by transports.
    pub fn new(event: EventEnvelope, info: DeliveryInfo, acker: Box<dyn Acknowledge>) -> Self {
        Self::build(event, info, Acker::Boxed(acker))
    }

    /// Made by transports that settle through one shared [`Settler`]: no allocation per
    /// delivery.
    pub fn with_settler(
        event: EventEnvelope,
        info: DeliveryInfo,
        settler: Arc<dyn Settler>,
    ) -> Self {
        Self::build(event, info, Acker::Shared(settler))
    }

    fn build(event: EventEnvelope, info: DeliveryInfo, acker: Acker) -> Self {
        Self {
            event,
            topic: info.topic,
            group: info.group,
            attempt: info.attempt.max(1),
            first_attempt_at: info.first_attempt_at,
            last_error: info.last_error,
            acker,
        }
    }

    /// What a [`Settler`] needs to queue this delivery again.
    fn returned(&mut self) -> Returned {
        Returned {
            event: self.event.clone(),
            topic: self.topic.clone(),
            attempt: self.attempt,
            first_attempt_at: self.first_attempt_at,
            last_error: self.last_error.take(),
        }
    }

    /// The event.
    pub fn event(&self) -> &EventEnvelope {
        &self.event
    }

    /// The topic it was published to.
    pub fn topic(&self) -> &str {
        match &self.topic {
            Some(topic) => topic,
            None => self.event.event_type(),
        }
    }

    /// The topic, shared (a reference count, no copy).
    pub fn topic_shared(&self) -> Arc<str> {
        match &self.topic {
            Some(topic) => Arc::clone(topic),
            None => self.event.event_type_shared(),
        }
    }

    /// The consumer group it was delivered to.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Which attempt this is: 1 for the first delivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the event was first delivered to this group.
    pub fn first_attempt_at(&self) -> DateTime<Utc> {
        self.first_attempt_at
    }

    /// The reason given when the previous attempt was nacked.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Acknowledges: the event was handled and will not be delivered to this group again.
    pub async fn ack(mut self) -> Result<()> {
        match std::mem::replace(&mut self.acker, Acker::Done) {
            Acker::Boxed(acker) => acker.ack().await,
            Acker::Shared(settler) => settler.ack(),
            Acker::Done => Ok(()),
        }
    }

    /// Acknowledges at once when the transport settles in process (through a shared
    /// [`Settler`], whose `ack` is synchronous), returning its outcome; otherwise hands
    /// the delivery back untouched, to [`ack`](Self::ack) with an await. Consumers that
    /// handle many events per poll use it to skip a future per delivery.
    pub fn try_ack_now(mut self) -> std::result::Result<Result<()>, Delivery> {
        match std::mem::replace(&mut self.acker, Acker::Done) {
            Acker::Shared(settler) => Ok(settler.ack()),
            Acker::Done => Ok(Ok(())),
            boxed @ Acker::Boxed(_) => {
                self.acker = boxed;
                Err(self)
            }
        }
    }

    /// Negative acknowledgement: deliver again after `delay`, as attempt `attempt() + 1`.
    pub async fn nack(mut self, delay: Duration, reason: impl Into<String>) -> Result<()> {
        match std::mem::replace(&mut self.acker, Acker::Done) {
            Acker::Boxed(acker) => acker.nack(delay, reason.into()).await,
            Acker::Shared(settler) => {
                let returned = self.returned();
                settler.nack(returned, delay, reason.into()).await
            }
            Acker::Done => Ok(()),
        }
    }

    /// Parks the event in the dead-letter queue with `reason`; the letter records the
    /// attempts so far, the first and last failure time, the topic and the group.
    pub async fn dead_letter(self, reason: impl Into<String>) -> Result<()> {
        let (attempts, first) = (self.attempt, self.first_attempt_at);
        self.dead_letter_after(reason, attempts, first, Utc::now())
            .await
    }

    /// Parks the event in the dead-letter queue with the failure story told by the caller:
    /// for consumers that retried in place, so the transport's own counts fall short.
    pub async fn dead_letter_after(
        mut self,
        reason: impl Into<String>,
        attempts: u32,
        first_failure_at: DateTime<Utc>,
        last_failure_at: DateTime<Utc>,
    ) -> Result<()> {
        let letter = DeadLetter::new(
            self.event.clone(),
            self.topic().to_owned(),
            self.group.to_string(),
            reason.into(),
            attempts.max(self.attempt),
            first_failure_at,
            last_failure_at,
        );
        match std::mem::replace(&mut self.acker, Acker::Done) {
            Acker::Boxed(acker) => acker.dead_letter(letter).await,
            Acker::Shared(settler) => {
                let result = settler.dead_letter(letter).await;
                if result.is_err() {
                    settler.release(self.returned());
                }
                result
            }
            Acker::Done => Ok(()),
        }
    }
}

/// The deliveries of one subscription.
#[async_trait]
pub trait DeliveryStream: Send {
    /// The next delivery; `Ok(None)` once the subscription or the transport is closed.
    ///
    /// Must be cancel-safe: dropping the future before it completes loses no event (a
    /// message taken from the broker but not yet returned must come back, as if its
    /// delivery had been dropped unsettled).
    async fn next(&mut self) -> Result<Option<Delivery>>;

    /// Waits for the next delivery like [`next`](Self::next), then appends it and up to
    /// `max - 1` more that are ready without waiting to `into`. Returns `Ok(false)` (and
    /// appends nothing) once the subscription or the transport is closed.
    ///
    /// Consumers that pull many small events use it to pay one call per batch instead of
    /// one per event. The default takes one delivery through `next`; transports override
    /// it to drain what they already hold. Cancel-safe like `next`, and `max` of 0 counts
    /// as 1.
    async fn next_batch(&mut self, max: usize, into: &mut Vec<Delivery>) -> Result<bool> {
        let _ = max;
        match self.next().await? {
            Some(delivery) => {
                into.push(delivery);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Carries events from publishers to consumer groups.
///
/// Object-safe (`Arc<dyn Transport>`): the umbrella picks the transport at run time. Every
/// implementation runs `orchestrator_core::testkit::transport::run_all` (feature `testkit`).
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// The implementation's name ("in-process", "redis", …).
    fn name(&self) -> &'static str;

    /// Publishes `event` to `topic`; returns once the transport has accepted it (for
    /// brokers: once the broker confirmed it). May wait when consumers are behind.
    async fn publish(&self, topic: &str, event: EventEnvelope) -> Result<()>;

    /// Publishes several events to one topic, in order. Backends override this to use one
    /// round trip.
    async fn publish_batch(&self, topic: &str, events: Vec<EventEnvelope>) -> Result<()> {
        for event in events {
            self.publish(topic, event).await?;
        }
        Ok(())
    }

    /// Subscribes a consumer of `options.group`. Once this returns, the group receives
    /// every event published later to a matching topic.
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn DeliveryStream>>;

    /// Delivers `event` again to `group` alone, as if just published to `topic` (used to
    /// reprocess dead letters, attempt count reset). A group the transport has never seen
    /// is [`Error::NotFound`].
    async fn redeliver(&self, group: &str, topic: &str, event: EventEnvelope) -> Result<()>;

    /// Where this transport parks dead-lettered deliveries.
    fn dead_letter_queue(&self) -> Arc<dyn DeadLetterQueue>;

    /// The transport as `Any`, for layers that take a faster path with a transport they
    /// know (the bus calls the in-process transport directly, without a boxed future).
    /// `None` (the default) keeps every layer on the trait.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    async fn publish(&self, topic: &str, event: EventEnvelope) -> Result<()> {
        (**self).publish(topic, event).await
    }
    async fn publish_batch(&self, topic: &str, events: Vec<EventEnvelope>) -> Result<()> {
        (**self).publish_batch(topic, events).await
    }
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn DeliveryStream>> {
        (**self).subscribe(options).await
    }
    async fn redeliver(&self, group: &str, topic: &str, event: EventEnvelope) -> Result<()> {
        (**self).redeliver(group, topic, event).await
    }
    fn dead_letter_queue(&self) -> Arc<dyn DeadLetterQueue> {
        (**self).dead_letter_queue()
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        (**self).as_any()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records what happened to the deliveries it settles.
    #[derive(Default)]
    struct Log(Mutex<Vec<&'static str>>);

    impl Log {
        fn push(&self, what: &'static str) {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(what);
        }
        fn taken(&self) -> Vec<&'static str> {
            std::mem::take(
                &mut *self
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
        }
    }

    #[async_trait]
    impl Settler for Log {
        fn ack(&self) -> Result<()> {
            self.push("shared ack");
            Ok(())
        }
        async fn nack(&self, _: Returned, _: Duration, _: String) -> Result<()> {
            self.push("shared nack");
            Ok(())
        }
        async fn dead_letter(&self, _: DeadLetter) -> Result<()> {
            self.push("shared dead letter");
            Ok(())
        }
        fn release(&self, _: Returned) {
            self.push("released");
        }
    }

    struct BoxedAcker(Arc<Log>);

    #[async_trait]
    impl Acknowledge for BoxedAcker {
        async fn ack(self: Box<Self>) -> Result<()> {
            self.0.push("boxed ack");
            Ok(())
        }
        async fn nack(self: Box<Self>, _: Duration, _: String) -> Result<()> {
            self.0.push("boxed nack");
            Ok(())
        }
        async fn dead_letter(self: Box<Self>, _: DeadLetter) -> Result<()> {
            self.0.push("boxed dead letter");
            Ok(())
        }
    }

    fn info() -> DeliveryInfo {
        DeliveryInfo {
            topic: None,
            group: "g".into(),
            attempt: 1,
            first_attempt_at: Utc::now(),
            last_error: None,
        }
    }

    fn event() -> EventEnvelope {
        EventEnvelope::new("order.placed", &1).unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn try_ack_now_settles_shared_deliveries_and_hands_boxed_ones_back() {
        let log = Arc::new(Log::default());
        let shared = Delivery::with_settler(event(), info(), log.clone());
        assert_eq!(shared.topic(), "order.placed", "no topic: the event's type");
        assert!(matches!(shared.try_ack_now(), Ok(Ok(()))));
        assert_eq!(log.taken(), ["shared ack"], "acked once, not released");

        let boxed = Delivery::new(event(), info(), Box::new(BoxedAcker(log.clone())));
        let Err(boxed) = boxed.try_ack_now() else {
            panic!("a boxed acker cannot ack without waiting");
        };
        assert!(log.taken().is_empty(), "handed back untouched");
        boxed.ack().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(log.taken(), ["boxed ack"]);
    }
}
