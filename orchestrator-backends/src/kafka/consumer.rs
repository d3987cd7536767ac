//! One subscription: a group consumer, the task that pumps its messages, its deliveries and
//! their settling.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use orchestrator_core::{DeadLetter, EventEnvelope, Result};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::client::kafka_error;
use super::live::LiveConsumer;
use super::names;
use super::offsets::{Slot, Tracker};
use super::transport::Shared;
use super::wire;

/// How often settled offsets are handed to librdkafka (which commits them every commit
/// interval).
const STORE_INTERVAL: Duration = Duration::from_millis(50);

/// The longest pause between attempts to park a message that must not be lost.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the pump, the consumer's callbacks, the stream and the deliveries of one
/// subscription share.
pub(crate) struct Subscription {
    pub(crate) transport: Arc<Shared>,
    pub(crate) group: String,
    pub(crate) retry_topic: String,
    tracker: Mutex<Tracker>,
    /// Settled deliveries on their way to the tracker: acks do not contend with the pump for
    /// the tracker's lock; the pump applies them in batches.
    settled_tx: mpsc::UnboundedSender<Slot>,
    settled_rx: Mutex<mpsc::UnboundedReceiver<Slot>>,
    /// How many times partitions were revoked: a delivery read since the last revocation
    /// belongs to a current assignment without asking the tracker.
    revocations: AtomicU64,
    /// Which of the two consumers (bit 0: events, bit 1: retries) had an assignment.
    assignments: watch::Sender<u8>,
    /// How many rebalances happened (assignment changes).
    rebalances: AtomicU64,
    /// Set for an ephemeral group: where its partitions are read from.
    pub(crate) ephemeral: Option<Ephemeral>,
}

/// Where an ephemeral group reads each partition from. It commits no offsets (so it leaves
/// nothing on the broker), so it places every partition it is assigned itself: at the end
/// offset the partition had when the subscription was made, or, once messages were settled,
/// after the last one; a partition it knows nothing of (a topic created later) from its
/// start.
#[derive(Default)]
pub(crate) struct Ephemeral {
    positions: Mutex<HashMap<(String, i32), i64>>,
}

impl Ephemeral {
    /// Records where `topic`/`partition` is to be read from.
    pub(crate) fn set(&self, topic: &str, partition: i32, offset: i64) {
        self.positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((topic.to_owned(), partition), offset);
    }

    fn advance(&self, offsets: &[(Arc<str>, i32, i64)]) {
        let mut positions = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (topic, partition, offset) in offsets {
            let at = positions
                .entry((topic.to_string(), *partition))
                .or_insert(*offset);
            *at = (*at).max(*offset);
        }
    }

    /// Sets the offset of every partition of an assignment.
    fn place(&self, tpl: &mut TopicPartitionList) {
        let positions = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let wanted: Vec<(String, i32, Offset)> = tpl
            .elements()
            .iter()
            .map(|e| {
                let offset = positions
                    .get(&(e.topic().to_owned(), e.partition()))
                    .map_or(Offset::Beginning, |&o| Offset::Offset(o));
                (e.topic().to_owned(), e.partition(), offset)
            })
            .collect();
        drop(positions);
        for (topic, partition, offset) in wanted {
            if let Err(error) = tpl.set_partition_offset(&topic, partition, offset) {
                tracing::warn!(%error, topic, partition, "cannot place an ephemeral group's partition");
            }
        }
    }
}

impl Subscription {
    pub(crate) fn new(
        transport: Arc<Shared>,
        group: String,
        retry_topic: String,
        ephemeral: bool,
    ) -> Self {
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        Self {
            ephemeral: ephemeral.then(Ephemeral::default),
            transport,
            group,
            retry_topic,
            tracker: Mutex::new(Tracker::default()),
            settled_tx,
            settled_rx: Mutex::new(settled_rx),
            revocations: AtomicU64::new(0),
            assignments: watch::Sender::new(0),
            rebalances: AtomicU64::new(0),
        }
    }

    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the retry consumer — and, with `events`, the event consumer — got its
    /// first assignment (possibly empty: more consumers than partitions).
    pub(crate) async fn assigned(&self, events: bool) {
        let wanted = if events { 0b11 } else { 0b10 };
        let mut rx = self.assignments.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = rx.wait_for(|bits| *bits & wanted == wanted).await;
    }

    /// Settles a delivery (applied by the pump; a closed subscription ignores it, and the
    /// message comes back from the committed offset).
    pub(super) fn settle(&self, slot: &Slot) {
        let _ = self.settled_tx.send(slot.clone());
    }

    /// Applies the settlements sent since the last call to the tracker.
    fn apply_settled(&self) {
        let mut rx = self
            .settled_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if rx.is_empty() {
            return;
        }
        let mut tracker = self.tracker();
        while let Ok(slot) = rx.try_recv() {
            tracker.settle(&slot);
        }
    }

    /// Whether a delivery read when `revocations` had the value `seen` still belongs to the
    /// current assignment of its partition.
    pub(super) fn still_current(&self, slot: &Slot, seen: u64) -> bool {
        self.revocations.load(Ordering::SeqCst) == seen || self.is_current(slot)
    }

    pub(super) fn is_current(&self, slot: &Slot) -> bool {
        self.tracker().is_current(slot)
    }

    /// Hands the offsets settled since the last call to librdkafka's offset store, each to
    /// the consumer that owns its partition.
    fn store_offsets(&self, events: &GroupConsumer, retries: &GroupConsumer) {
        self.apply_settled();
        let pending = {
            let mut tracker = self.tracker();
            if !tracker.is_dirty() {
                return;
            }
            tracker.take_pending()
        };
        self.store_split(events, retries, pending);
    }

    fn store_split(
        &self,
        events: &GroupConsumer,
        retries: &GroupConsumer,
        pending: Vec<(Arc<str>, i32, i64)>,
    ) {
        if let Some(ephemeral) = &self.ephemeral {
            ephemeral.advance(&pending);
        }
        let (retry, event): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|(topic, ..)| **topic == *self.retry_topic);
        store(events, &event);
        store(retries, &retry);
    }
}

fn store<C: Consumer<X>, X: ConsumerContext>(consumer: &C, offsets: &[(Arc<str>, i32, i64)]) {
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (topic, partition, offset) in offsets {
        if tpl
            .add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .is_err()
        {
            return;
        }
    }
    if let Err(error) = consumer.store_offsets(&tpl) {
        // A partition lost in a rebalance meanwhile: its next owner reads from the last
        // committed offset, so nothing is lost.
        tracing::debug!(%error, "storing settled offsets failed");
    }
}

/// Which of a subscription's two consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Reads the event topics, in the group `<prefix><group>`.
    Events,
    /// Reads the group's retry topic, in a group named as that topic.
    Retries,
}

/// A consumer's callbacks: keep the tracker in step with the partition assignment.
pub(crate) struct Context {
    sub: Arc<Subscription>,
    role: Role,
}

impl Context {
    pub(crate) fn new(sub: Arc<Subscription>, role: Role) -> Self {
        Self { sub, role }
    }
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    /// What rdkafka's default does (pre-rebalance hook, assign or unassign, post-rebalance
    /// hook), except that an ephemeral group's new partitions are placed first (see
    /// [`Ephemeral`]).
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        if assign && let Some(ephemeral) = &self.sub.ephemeral {
            ephemeral.place(tpl);
        }
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            other => Rebalance::Error(KafkaError::Rebalance(other.into())),
        };
        self.pre_rebalance(base, &rebalance);
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let done = match (assign, cooperative) {
            (true, true) => base.incremental_assign(tpl),
            (true, false) => base.assign(tpl),
            (false, true) => base.incremental_unassign(tpl),
            (false, false) => base.unassign(),
        };
        if let Err(error) = done {
            tracing::warn!(%error, group = %self.sub.group, assign, "applying a Kafka rebalance failed");
        }
        self.post_rebalance(base, &rebalance);
    }

    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut tracker = self.sub.tracker();
                for e in tpl.elements() {
                    tracker.assign(e.topic(), e.partition());
                }
            }
            Rebalance::Revoke(tpl) => {
                self.sub.revocations.fetch_add(1, Ordering::SeqCst);
                self.sub.apply_settled();
                let pending: Vec<(Arc<str>, i32, i64)> = {
                    let mut tracker = self.sub.tracker();
                    tpl.elements()
                        .iter()
                        .filter_map(|e| {
                            tracker
                                .revoke(e.topic(), e.partition())
                                .map(|o| (Arc::from(e.topic()), e.partition(), o))
                        })
                        .collect()
                };
                // Still assigned here: librdkafka commits these as it lets the partitions go.
                if let Some(ephemeral) = &self.sub.ephemeral {
                    ephemeral.advance(&pending);
                }
                store(base, &pending);
            }
            Rebalance::Error(error) => {
                tracing::warn!(%error, group = %self.sub.group, "Kafka rebalance failed");
            }
        }
        self.sub.rebalances.fetch_add(1, Ordering::SeqCst);
    }

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::debug!(group = %self.sub.group, partitions = tpl.count(), "assigned");
            let bit = match self.role {
                Role::Events => 0b01,
                Role::Retries => 0b10,
            };
            self.sub.assignments.send_modify(|bits| *bits |= bit);
        }
    }
}

/// The group consumer of one subscription.
pub(crate) type GroupConsumer = StreamConsumer<Context>;

/// A message read, waiting to be handed out.
pub(crate) struct Pending {
    pub(super) event: EventEnvelope,
    pub(super) topic: Arc<str>,
    pub(super) attempt: u32,
    pub(super) first_attempt_at: DateTime<Utc>,
    pub(super) last_error: Option<String>,
    pub(super) slot: Slot,
    /// The subscription's revocation count when the message was read.
    pub(super) seen: u64,
}

/// The subscription's task: reads messages, turns them into pending deliveries, holds
/// retries until they are due, hands them to the stream and stores settled offsets.
///
/// It reads only while nothing waits for the application: when the application is behind,
/// the consumer stops fetching (librdkafka's own prefetch queue bounds memory) instead of
/// pausing partitions, which would discard what librdkafka already fetched.
pub(crate) async fn pump(
    sub: Arc<Subscription>,
    consumer: Arc<GroupConsumer>,
    retries: Arc<GroupConsumer>,
    tx: mpsc::Sender<Pending>,
) {
    let live = LiveConsumer::new(&sub.transport.config.prefix);
    let max_delayed = sub.transport.config.max_delayed;
    let mut ready: VecDeque<Pending> = VecDeque::new();
    let mut delayed: BTreeMap<(i64, u64), Pending> = BTreeMap::new();
    let mut sequence = 0_u64;
    let mut logical: HashMap<String, Arc<str>> = HashMap::new();
    let (mut retries_paused, mut paused_at) = (false, 0);
    let mut store_tick = tokio::time::interval(STORE_INTERVAL);
    store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    'pump: loop {
        if !hand_over(&tx, &mut ready) {
            break;
        }
        // Too many retries waiting out their delay: stop reading the retry topic for a while.
        let want_paused = if retries_paused {
            delayed.len() >= max_delayed / 2
        } else {
            delayed.len() >= max_delayed
        };
        let rebalances = sub.rebalances.load(Ordering::SeqCst);
        if want_paused != retries_paused || (want_paused && rebalances != paused_at) {
            apply_pause(&retries, want_paused);
            (retries_paused, paused_at) = (want_paused, rebalances);
        }
        let due_in = delayed.first_key_value().map(|(&(due, _), _)| {
            let wait = due.saturating_sub(Utc::now().timestamp_millis());
            tokio::time::Instant::now() + Duration::from_millis(u64::try_from(wait).unwrap_or(0))
        });
        let read = ready.is_empty();

        tokio::select! {
            biased;
            () = tx.closed() => break,
            permit = tx.reserve(), if !read => match permit {
                Ok(permit) => {
                    if let Some(p) = ready.pop_front() {
                        permit.send(p);
                    }
                }
                Err(_) => break,
            },
            () = sleep_until(due_in), if due_in.is_some() => {
                let now = Utc::now().timestamp_millis();
                while let Some(entry) = delayed.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    ready.push_back(entry.remove());
                }
            }
            _ = store_tick.tick() => sub.store_offsets(&consumer, &retries),
            message = consumer.recv(), if read => {
                if !take(&sub, message, &mut logical, &mut ready, &mut delayed, &mut sequence) {
                    break;
                }
                // Take what librdkafka already holds without a trip through the scheduler.
                loop {
                    if !hand_over(&tx, &mut ready) {
                        break 'pump;
                    }
                    if !ready.is_empty() {
                        break;
                    }
                    let Some(message) = consumer.recv().now_or_never() else {
                        break;
                    };
                    if !take(&sub, message, &mut logical, &mut ready, &mut delayed, &mut sequence) {
                        break 'pump;
                    }
                }
            }
            message = retries.recv(), if read => {
                if !take(&sub, message, &mut logical, &mut ready, &mut delayed, &mut sequence) {
                    break;
                }
            }
        }
    }
    // Deliveries still held settle into a tracker that owns nothing: they come back from the
    // committed offset to the group's next consumer.
    sub.apply_settled();
    sub.revocations.fetch_add(1, Ordering::SeqCst);
    let pending = sub.tracker().revoke_all();
    sub.store_split(&consumer, &retries, pending);
    close_detached(move || {
        drop(consumer);
        drop(retries);
        drop(live);
    });
}

/// Closes consumers on a thread of their own: leaving the group commits the stored offsets
/// and talks to the cluster, which blocks — for as long as the cluster is away, since
/// librdkafka's close has no timeout. Neither the async threads nor a runtime shutting down
/// (which waits for its blocking tasks) may be held up by that.
pub(crate) fn close_detached(close: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("orchestrator-kafka-close".into())
        .spawn(close);
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start a thread to close a Kafka consumer");
    }
}

/// Hands ready deliveries to the stream while it has room; false once it is gone.
fn hand_over(tx: &mpsc::Sender<Pending>, ready: &mut VecDeque<Pending>) -> bool {
    while let Some(p) = ready.pop_front() {
        match tx.try_send(p) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(p)) => {
                ready.push_front(p);
                break;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
        }
    }
    true
}

/// Takes what a consumer read: a message becomes ready or delayed; an error is logged.
/// Returns false when the consumer failed for good.
fn take(
    sub: &Arc<Subscription>,
    message: std::result::Result<BorrowedMessage<'_>, rdkafka::error::KafkaError>,
    logical: &mut HashMap<String, Arc<str>>,
    ready: &mut VecDeque<Pending>,
    delayed: &mut BTreeMap<(i64, u64), Pending>,
    sequence: &mut u64,
) -> bool {
    match message {
        Ok(message) => {
            let now = Utc::now();
            if let Some((p, due)) = read(sub, &message, logical, now) {
                if due > now.timestamp_millis() {
                    *sequence += 1;
                    delayed.insert((due, *sequence), p);
                } else {
                    ready.push_back(p);
                }
            }
            true
        }
        Err(error) => {
            let error = kafka_error(error);
            if error.is_temporary() {
                tracing::warn!(%error, group = %sub.group, "Kafka consumer error; carrying on");
                true
            } else {
                tracing::error!(%error, group = %sub.group, "Kafka consumer failed; closing the subscription");
                false
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Pauses or resumes every partition assigned to `consumer`.
fn apply_pause(consumer: &GroupConsumer, pause: bool) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(error) = result {
        tracing::debug!(%error, pause, "pausing or resuming partitions failed");
    }
}

/// Turns a message into a pending delivery and its due time (ms since the epoch), or
/// dead-letters it when it is not a CloudEvent.
fn read(
    sub: &Arc<Subscription>,
    message: &BorrowedMessage<'_>,
    logical: &mut HashMap<String, Arc<str>>,
    now: DateTime<Utc>,
) -> Option<(Pending, i64)> {
    let kafka_topic = message.topic();
    let seen = sub.revocations.load(Ordering::SeqCst);
    let slot = sub
        .tracker()
        .begin(kafka_topic, message.partition(), message.offset())?;
    let (topic, attempt, first_attempt_at, last_error, due) = if kafka_topic == sub.retry_topic {
        match wire::read_retry(message.headers()) {
            // Ephemeral groups share a retry topic: another group's retry is not ours.
            Some(info)
                if sub.ephemeral.is_some() && info.group.as_deref() != Some(sub.group.as_str()) =>
            {
                sub.settle(&slot);
                return None;
            }
            Some(info) => (
                Arc::from(info.topic.as_str()),
                info.attempt,
                info.first_attempt_at.unwrap_or(now),
                info.last_error,
                info.due_at_ms,
            ),
            None => {
                let reason = format!(
                    "a message in retry topic `{kafka_topic}` without the `{}` header",
                    wire::TOPIC
                );
                dead_letter_raw(sub, message, kafka_topic.to_owned(), slot, reason);
                return None;
            }
        }
    } else {
        let topic = match logical.get(kafka_topic) {
            Some(t) => Arc::clone(t),
            None => {
                let prefix = &sub.transport.config.prefix;
                let t: Arc<str> = names::logical_topic(prefix, kafka_topic)
                    .unwrap_or_else(|| kafka_topic.to_owned())
                    .into();
                logical.insert(kafka_topic.to_owned(), Arc::clone(&t));
                t
            }
        };
        (topic, 1, now, None, 0)
    };
    // A message over the limit is dead-lettered undecoded.
    let limit = sub.transport.config.max_event_size;
    let event = match message.payload().map(|bytes| limit.decode(bytes)) {
        Some(Ok(event)) => event,
        Some(Err(error)) => {
            let reason = format!("not a CloudEvent: {error}");
            dead_letter_raw(sub, message, topic.to_string(), slot, reason);
            return None;
        }
        None => {
            let reason = "not a CloudEvent: the message has no value".to_owned();
            dead_letter_raw(sub, message, topic.to_string(), slot, reason);
            return None;
        }
    };
    Some((
        Pending {
            event,
            topic,
            attempt,
            first_attempt_at,
            last_error,
            slot,
            seen,
        },
        due,
    ))
}

/// Parks a message that is not an event in the dead-letter queue, from a task of its own so
/// the consumer keeps going; settles it once parked.
fn dead_letter_raw(
    sub: &Arc<Subscription>,
    message: &BorrowedMessage<'_>,
    topic: String,
    slot: Slot,
    reason: String,
) {
    tracing::warn!(
        kafka_topic = message.topic(),
        partition = message.partition(),
        offset = message.offset(),
        group = %sub.group,
        %reason,
        "dead-lettering a message that is not an event"
    );
    let value = message.payload().unwrap_or_default();
    let event = match wire::undecodable(
        value,
        message.topic(),
        message.partition(),
        message.offset(),
    ) {
        Ok(event) => event,
        Err(error) => {
            // Constant type and content type, digits in the headers: cannot happen; if it
            // did, the message stays unsettled and comes back after a restart.
            tracing::error!(%error, "cannot wrap an undecodable message");
            return;
        }
    };
    let now = Utc::now();
    let letter = DeadLetter::new(event, topic, sub.group.clone(), reason, 1, now, now);
    let sub = Arc::clone(sub);
    tokio::spawn(async move {
        let dlq = sub.transport.dlq.clone();
        persist(&sub, &slot, || {
            let dlq = dlq.clone();
            let letter = letter.clone();
            async move {
                use orchestrator_core::DeadLetterQueue as _;
                dlq.push(letter).await
            }
        })
        .await;
    });
}

/// Runs `write` until it succeeds (then settles `slot`) or the slot's partition moved on
/// (then the message comes back from the committed offset anyway).
pub(super) async fn persist<F, Fut>(sub: &Subscription, slot: &Slot, mut write: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match write().await {
            Ok(()) => {
                sub.settle(slot);
                return;
            }
            Err(error) if sub.is_current(slot) => {
                tracing::warn!(%error, group = %sub.group, "parking a message failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(_) => return,
        }
    }
}
